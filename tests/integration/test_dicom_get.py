"""C-GET against `pacsvault serve` with dcmtk getscu: the instances come back on the
requestor's own association, byte for byte as received, in the syntax they were
stored in (never converted: one the requestor will not take is a counted failure)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_dicom_move import sent_as_received, serving
from tests.support.daemon import dcmtk_env, run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install

pytestmark = pytest.mark.needs_dcmtk


@pytest.fixture
def pv(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.ct = make_ct_series(tmp_path / "ct", 6, size=20_000)
    inst.varied = make_varied_study(tmp_path / "v", per_kind=1, size=8_000)
    inst.ingest(inst.ct + inst.varied)
    inst.by_sop = {m.sop_uid: m for m in inst.ct + inst.varied}
    run_cli(inst.config, "peer", "add", "GETSCU", "127.0.0.1")
    return inst


def getscu(port: int, out: Path, *keys: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-d", "-aet", "GETSCU", "-aec", "PACSVAULT", "-S", "-od", str(out), *extra]
    for k in keys:
        args += ["-k", k]
    r = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True,
                       env=dcmtk_env(), timeout=300)
    text = r.stdout + r.stderr
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", text)
    assert statuses, text[-3000:]
    assert "Release Failed" not in text, text[-2000:]
    return int(statuses[-1], 16), text


def got(out: Path) -> dict[str, bytes]:
    import pydicom

    from archive.dicom.part10 import dataset_offset

    result = {}
    for p in out.iterdir():
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        with open(p, "rb") as f:
            f.seek(dataset_offset(f))
            result[uid] = f.read()
    return result


def test_a_series_comes_back_on_the_same_association_byte_for_byte(pv, tmp_path):
    ct = pv.ct[0]
    with serving(pv) as d:
        status, _ = getscu(d.dicom_port, tmp_path / "a", "QueryRetrieveLevel=SERIES",
                           f"StudyInstanceUID={ct.study_uid}", f"SeriesInstanceUID={ct.series_uid}")
        assert status == 0x0000
        received = got(tmp_path / "a")
        assert set(received) == {m.sop_uid for m in pv.ct} and sent_as_received(pv, received)
        one = pv.ct[4].sop_uid
        status, _ = getscu(d.dicom_port, tmp_path / "b", "QueryRetrieveLevel=IMAGE",
                           f"StudyInstanceUID={ct.study_uid}", f"SeriesInstanceUID={ct.series_uid}",
                           f"SOPInstanceUID={one}")
        assert status == 0x0000 and set(got(tmp_path / "b")) == {one}


def test_what_the_requestor_cannot_take_as_stored_is_a_counted_failure(pv, tmp_path):
    # getscu offers one transfer syntax per storage class (explicit VR here): the
    # compressed members of the varied study cannot go back unconverted.
    study = pv.varied[0].study_uid
    with serving(pv) as d:
        status, out = getscu(d.dicom_port, tmp_path / "a", "QueryRetrieveLevel=STUDY",
                             f"StudyInstanceUID={study}")
    received = got(tmp_path / "a")
    plain = {m.sop_uid for m in pv.varied if m.transfer_syntax in (
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2")}
    assert received and set(received) <= plain           # only what fits, never converted
    assert sent_as_received(pv, received)
    failed = len(pv.varied) - len(received)
    assert failed > 0 and status == 0xB000
    assert re.search(rf"Failed Suboperations\s*:\s*{failed}\b", out)
    assert "not taken by the destination" in out


def test_each_get_is_audited(pv, tmp_path):
    ct = pv.ct[0]
    with serving(pv) as d:
        getscu(d.dicom_port, tmp_path / "a", "QueryRetrieveLevel=STUDY",
               f"StudyInstanceUID={ct.study_uid}")
    out = json.loads(run_cli(pv.config, "audit", "--study", ct.study_uid, "--json").stdout)
    gets = [r for r in out["records"] if r["action"] == "retrieve"]
    assert len(gets) == 1
    detail = gets[0]["detail"] if isinstance(gets[0]["detail"], dict) else \
        json.loads(gets[0]["detail"])
    assert detail["destination_ae"] == "GETSCU" and detail["completed"] == len(pv.ct)
    assert detail["sop_class"] == "1.2.840.10008.5.1.4.1.2.2.3"
