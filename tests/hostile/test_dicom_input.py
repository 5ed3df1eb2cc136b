"""Malformed, crafted and oversized objects over the network: a clear DICOM failure
status, a log line without PHI, no crash, no file on any site, no catalog row."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from archive.dicom.part10 import file_meta
from tests.conftest import site_paths
from tests.support.dataset import NOT_FOR_STORESCU, make_instance, make_varied_study
from tests.support.scu import REJECTED, send_files
from tests.support.verify import audit, sqlite_url

CT = "1.2.840.10008.5.1.4.1.1.2"
ELE = "1.2.840.10008.1.2.1"


def crafted(path: Path, meta_uid: str, ds_bytes: bytes, sop_class: str = CT, ts: str = ELE) -> Path:
    # The meta carries a UID that pynetdicom will put in the command; the data
    # set carries whatever the test wants.
    path.write_bytes(file_meta(sop_class, meta_uid, ts) + ds_bytes)
    return path


def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def minimal(sop_uid: bytes, study: bytes = b"1.2.3", series: bytes = b"1.2.3.4",
            sop_class: bytes = CT.encode()) -> bytes:
    out = el(0x0008, 0x0016, b"UI", sop_class) + el(0x0008, 0x0018, b"UI", sop_uid)
    out += el(0x0010, 0x0010, b"PN", b"Hostile^Patient") + el(0x0010, 0x0020, b"LO", b"PID-HOSTILE")
    if study is not None:
        out += el(0x0020, 0x000D, b"UI", study)
    if series is not None:
        out += el(0x0020, 0x000E, b"UI", series)
    return out


def assert_nothing_stored(daemon) -> None:
    sites = site_paths(daemon.config)
    a = audit(sqlite_url(daemon.config.parent), sites)
    assert a.instances == 0
    for root in sites.values():
        assert not [p for p in root.rglob("*") if p.is_file() and p.name != "PACSVAULT-SITE.json"]
    assert "Hostile^Patient" not in daemon.log() and "PID-HOSTILE" not in daemon.log()
    assert "Traceback" not in daemon.log()


def test_malformed_truncated_and_missing_uids(daemon, tmp_path: Path):
    good = minimal(b"1.2.3.4.5")
    cases = {
        "garbage": crafted(tmp_path / "g.dcm", "1.2.3.4.5", b"\xde\xad\xbe\xef" * 100),
        "truncated": crafted(tmp_path / "t.dcm", "1.2.3.4.5",
                             good + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 100000) + b"\x00" * 500),
        "no_study": crafted(tmp_path / "s.dcm", "1.2.3.4.5", minimal(b"1.2.3.4.5", study=None)),
        "no_series": crafted(tmp_path / "r.dcm", "1.2.3.4.5", minimal(b"1.2.3.4.5", series=None)),
        "huge_length": crafted(tmp_path / "h.dcm", "1.2.3.4.5",
                               good + struct.pack("<HH2sHI", 0x0009, 0x0010, b"UN", 0, 0xFFFFFFF0)),
        "nested_forever": crafted(tmp_path / "n.dcm", "1.2.3.4.5",
                                  good + (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
                                          + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)) * 200),
        "empty": crafted(tmp_path / "e.dcm", "1.2.3.4.5", b""),
    }
    statuses = send_files(daemon.dicom_port, list(cases.values()))
    for (name, _), status in zip(cases.items(), statuses):
        assert 0xC000 <= status <= 0xCFFF or status == 0xA900, (name, hex(status))
    assert_nothing_stored(daemon)


@pytest.mark.parametrize("evil", [
    b"../../../../tmp/pwned", b"/etc/passwd", b"1.2.3/../../x", b"1." + b"2" * 70, b"1.2.abc",
    b"1.2.3\x00/../x", b"..",
])
def test_uids_crafted_to_escape_are_refused(daemon, tmp_path: Path, evil: bytes):
    # Evil UID in the data set (study, series and instance), valid one in the command.
    files = [
        crafted(tmp_path / "a.dcm", "1.2.3.4.5", minimal(b"1.2.3.4.5", study=evil)),
        crafted(tmp_path / "b.dcm", "1.2.3.4.5", minimal(b"1.2.3.4.5", series=evil)),
        crafted(tmp_path / "c.dcm", "1.2.3.4.5", minimal(evil)),
    ]
    statuses = send_files(daemon.dicom_port, files)
    assert all(s != 0 and s != REJECTED for s in statuses), [hex(s) for s in statuses]
    assert_nothing_stored(daemon)
    assert not Path("/tmp/pwned").exists()


def test_wrong_sop_class_is_a_mismatch(daemon, tmp_path: Path):
    m = make_instance(tmp_path / "mr.dcm", kind="MR")
    # The command says CT (from the meta), the data set says MR.
    data = m.path.read_bytes()
    from archive.dicom.part10 import dataset_offset

    with open(m.path, "rb") as f:
        ds = data[dataset_offset(f):]
    f2 = crafted(tmp_path / "x.dcm", m.sop_uid, ds, sop_class=CT)
    assert send_files(daemon.dicom_port, [f2]) == [0xA900]
    assert_nothing_stored(daemon)


def test_duplicate_uid_with_different_bytes_keeps_both(daemon, tmp_path: Path):
    first = make_instance(tmp_path / "1.dcm", size=3000)
    second = make_instance(tmp_path / "2.dcm", size=5000, study_uid=first.study_uid,
                           series_uid=first.series_uid, sop_uid=first.sop_uid)
    assert send_files(daemon.dicom_port, [first.path]) == [0]
    site_a = site_paths(daemon.config)["site-a"]
    original = next(site_a.rglob(first.sop_uid + ".dcm"))
    before = original.read_bytes()
    assert send_files(daemon.dicom_port, [second.path, first.path]) == [0, 0]
    assert original.read_bytes() == before  # never overwritten
    st = daemon.status()
    assert st["instances"] == 2 and st["conflicts"] == 1
    assert len(list(site_a.rglob(first.sop_uid + "*.dcm"))) == 2


def test_retired_and_private_classes_are_stored(daemon, tmp_path: Path):
    made = make_varied_study(tmp_path / "rp", kinds=NOT_FOR_STORESCU)
    assert send_files(daemon.dicom_port, [m.path for m in made]) == [0] * len(made)
    a = audit(sqlite_url(daemon.config.parent), site_paths(daemon.config))
    assert a.instances == len(made) and a.ok_copies == 2 * len(made) and not a.bad


def test_unknown_calling_ae_is_rejected_before_data(daemon, tmp_path: Path):
    m = make_instance(tmp_path / "x.dcm")
    assert send_files(daemon.dicom_port, [m.path], aet="INTRUDER") == [REJECTED]
    # pynetdicom will not even send these; dcmtk will.
    from tests.support.daemon import echoscu

    for weird in ("STORE\\SCU", "STORESCU\x01", "'; DROP TABLE--"):
        r = echoscu(daemon.dicom_port, aet=weird)
        assert r.returncode != 0
    assert daemon.status()["instances"] == 0
