"""The listener keeps a small data set in memory and spools a large one as it arrives."""
from pathlib import Path

from archive.daemon.engine_scp import _Store
from archive.dicom.net import dimse
from archive.dicom.part10 import dataset_offset

CT = "1.2.840.10008.5.1.4.1.1.2"


def _store(tmp_path: Path, limit: int) -> _Store:
    cmd = dimse.Command(dimse.C_STORE_RQ, message_id=1, affected_sop_class=CT,
                        affected_sop_instance="1.2.3", priority=0, data_set_type=1)
    return _Store(1, cmd, "1.2.840.10008.1.2.1", tmp_path, limit)


def test_a_data_set_under_the_threshold_never_touches_the_spool(tmp_path: Path):
    st = _store(tmp_path, 4096)
    for _ in range(4):
        st.write(b"x" * 100)
    path, data = st.finish()
    assert path is None and data is not None and data.endswith(b"x" * 400)
    assert list(tmp_path.iterdir()) == []
    st.discard()


def test_a_data_set_over_the_threshold_goes_to_the_spool_whole_and_is_removed(tmp_path: Path):
    st = _store(tmp_path, 1000)
    chunks = [bytes([i]) * 300 for i in range(10)]
    for c in chunks:
        st.write(c)
    assert st.buffer is None                # memory released once it spilled
    path, data = st.finish()
    assert data is None and path is not None and path.parent == tmp_path
    with open(path, "rb") as f:
        offset = dataset_offset(f)
        f.seek(offset)
        assert f.read() == b"".join(chunks)
    st.discard()
    assert list(tmp_path.iterdir()) == []


def test_an_aborted_transfer_leaves_nothing(tmp_path: Path):
    st = _store(tmp_path, 500)
    st.write(b"y" * 2000)
    assert list(tmp_path.iterdir())
    st.discard()
    assert list(tmp_path.iterdir()) == []
