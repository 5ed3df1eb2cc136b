"""C-MOVE against `pacsvault serve`, with dcmtk movescu asking and dcmtk storescp as
the destination: from the online sites (one down, one copy rotten), from the object
tier after migration, and from DR volumes only (a clear failure naming them); every
instance sent byte for byte as received; refusals, C-CANCEL and the audit trail."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pydicom
import pytest

from archive.dicom.part10 import dataset_offset
from tests.integration.test_dr import configure, db
from tests.integration.test_scrub_alerts import HOOK
from tests.support.daemon import Daemon, dcmtk_env, free_port, run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.storescp import start_storescp
from tests.support.tiering import Install

pytestmark = pytest.mark.needs_dcmtk


@pytest.fixture
def pv(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.varied = make_varied_study(tmp_path / "v", per_kind=1, size=20_000)
    inst.ct = make_ct_series(tmp_path / "ct", 8, size=20_000)
    inst.ingest(inst.varied + inst.ct)
    inst.by_sop = {m.sop_uid: m for m in inst.varied + inst.ct}
    # +B: storescp writes what arrived byte for byte (otherwise it re-writes a deflated
    # data set without its pad byte), so the comparison is of what was sent.
    scp = start_storescp(tmp_path / "dest", aet="DEST", extra_args=("+B",))
    run_cli(inst.config, "peer", "add", "MOVESCU", "127.0.0.1")
    run_cli(inst.config, "peer", "add", "DEST", "127.0.0.1", "--port", str(scp.port))
    inst.scp = scp
    yield inst
    scp.stop()


@contextmanager
def serving(inst: Install):
    d = Daemon(inst.config, free_port(), free_port(), workers=1).start()
    try:
        yield d
    finally:
        d.stop()


def movescu(port: int, *keys: str, model: str = "-S", dest: str = "DEST",
            extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """(the final response's status, movescu's whole output at debug level)."""
    args = ["movescu", "-d", "-aet", "MOVESCU", "-aec", "PACSVAULT", "-aem", dest, model, *extra]
    for k in keys:
        args += ["-k", k]
    r = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True,
                       env=dcmtk_env(), timeout=300)
    out = r.stdout + r.stderr
    assert "Received Final Move Response" in out, out[-3000:]
    final = out[out.rindex("Received Final Move Response"):]
    status = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", final)
    assert status, final[-3000:]
    return int(status.group(1), 16), out


def received(inst: Install) -> dict[str, bytes]:
    """SOP Instance UID -> the data set bytes (after the Part 10 header) storescp wrote;
    the directory is emptied for the next move."""
    out = {}
    for p in inst.scp.received():
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        with open(p, "rb") as f:
            f.seek(dataset_offset(f))
            out[uid] = f.read()
        p.unlink()
    return out


def sent_as_received(inst: Install, got: dict[str, bytes]) -> bool:
    for uid, body in got.items():
        with open(inst.by_sop[uid].path, "rb") as f:
            f.seek(dataset_offset(f))
            if f.read() != body:
                return False
    return True


def test_study_series_and_image_moves_send_exactly_those_instances_byte_for_byte(pv):
    study = pv.varied[0].study_uid
    with serving(pv) as d:
        status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        got = received(pv)
        assert status == 0x0000
        assert set(got) == {m.sop_uid for m in pv.varied}      # every kind and syntax
        assert sent_as_received(pv, got)

        ct = pv.ct[0]
        status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=SERIES",
                            f"StudyInstanceUID={ct.study_uid}",
                            f"SeriesInstanceUID={ct.series_uid}")
        got = received(pv)
        assert status == 0x0000 and set(got) == {m.sop_uid for m in pv.ct}

        two = [pv.ct[2].sop_uid, pv.ct[5].sop_uid]
        status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=IMAGE",
                            f"StudyInstanceUID={ct.study_uid}",
                            f"SeriesInstanceUID={ct.series_uid}",
                            "SOPInstanceUID=" + "\\".join(two))
        got = received(pv)
        assert status == 0x0000 and set(got) == set(two) and sent_as_received(pv, got)

        pid = str(pydicom.dcmread(ct.path, stop_before_pixels=True).PatientID)
        status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=PATIENT", f"PatientID={pid}",
                            model="-P")
        assert status == 0x0000 and set(received(pv)) == set(pv.by_sop)


def test_an_unknown_destination_and_non_unique_keys_are_refused(pv):
    study = pv.ct[0].study_uid
    with serving(pv) as d:
        status, out = movescu(d.dicom_port, "QueryRetrieveLevel=STUDY",
                              f"StudyInstanceUID={study}", dest="NOWHERE")
        assert status == 0xA801
        status, out = movescu(d.dicom_port, "QueryRetrieveLevel=STUDY",
                              f"StudyInstanceUID={study[:6]}*")
        assert status == 0xA900
        status, out = movescu(d.dicom_port, "QueryRetrieveLevel=SERIES",
                              f"StudyInstanceUID={study}")        # no SeriesInstanceUID
        assert status == 0xA900
    assert received(pv) == {}


def test_a_site_down_and_a_rotten_copy_are_served_from_the_twin(pv):
    ct = pv.ct[0]
    a, b = pv.settings.sites
    victim = pv.ct[3].sop_uid
    [rotten] = (b.path / "objects").rglob(f"{victim}.dcm")
    raw = bytearray(rotten.read_bytes())
    raw[-40] ^= 0xFF
    rotten.write_bytes(bytes(raw))
    with serving(pv) as d:
        # Site A gone: everything comes from B; the rotten copy there has no twin now.
        gone = a.path.with_name(a.path.name + ".gone")
        a.path.rename(gone)
        try:
            status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=SERIES",
                                f"StudyInstanceUID={ct.study_uid}",
                                f"SeriesInstanceUID={ct.series_uid}")
        finally:
            gone.rename(a.path)
        got = received(pv)
        assert set(got) == {m.sop_uid for m in pv.ct} - {victim}
        assert sent_as_received(pv, got)
        assert status == 0xB000                     # complete, one failure
        # Site A back: the rotten instance is sent from A, its copy on B queued for repair.
        status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=SERIES",
                            f"StudyInstanceUID={ct.study_uid}",
                            f"SeriesInstanceUID={ct.series_uid}")
        got = received(pv)
        assert status == 0x0000 and set(got) == {m.sop_uid for m in pv.ct}
        assert sent_as_received(pv, got)
    states = dict(db(pv, "select c.location, c.state from copies c join instances i on "
                         "i.id = c.instance_fk where i.sop_uid = ?", victim))
    assert states == {a.name: "ok", b.name: "missing"}        # the repair loop's queue


def test_a_migrated_study_is_sent_straight_from_the_object_tier(pv):
    study = pv.varied[0].study_uid
    run_cli(pv.config, "migrate", "--study", study)
    assert not any(any((s.path / "objects").rglob(f"{pv.varied[0].sop_uid}.dcm"))
                   for s in pv.settings.sites)                 # purged online
    with serving(pv) as d:
        status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
    got = received(pv)
    assert status == 0x0000 and set(got) == {m.sop_uid for m in pv.varied}
    assert sent_as_received(pv, got)


def only_on_dr_volumes(inst: Install, tmp_path) -> tuple:  # noqa: ANN001
    """Every study written to DR volumes, then both sites' files lost; alerts go to a
    file. (the DR key file, the alerts file, the volumes' barcodes)"""
    hook, alerts = tmp_path / "hook.py", tmp_path / "alerts.jsonl"
    hook.write_text(HOOK)
    with open(inst.config, "a") as f:
        f.write("\n[alerts]\n" f"command = {json.dumps([sys.executable, str(hook), str(alerts)])}\n")
    key = tmp_path / "dr-key.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(key)).stdout.strip())
    assert json.loads(run_cli(inst.config, "dr", "write", "--json").stdout)["complete"]
    barcodes = {r[0] for r in db(inst, "select barcode from dr_volumes")}
    for s in inst.settings.sites:
        shutil.rmtree(s.path / "objects")
        (s.path / "objects").mkdir()
    return key, alerts, barcodes


def test_a_study_only_on_dr_volumes_fails_naming_the_volumes(pv, tmp_path):
    key, alerts, barcodes = only_on_dr_volumes(pv, tmp_path)
    study = pv.ct[0].study_uid
    with serving(pv) as d:
        status, out = movescu(d.dicom_port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        log = d.log()
    assert status == 0xA702                         # nothing could be sent
    comment = re.search(r"Error Comment\s+LO \[([^\]]*)\]", out) or \
        re.search(r"\(0000,0902\) LO \[([^\]]*)\]", out)
    assert comment and "DR volumes" in comment.group(1), out[-2000:]
    assert any(b in comment.group(1) for b in barcodes)
    assert any(b in log for b in barcodes) and "only on DR volumes" in log
    assert received(pv) == {}
    [alert] = [json.loads(x) for x in alerts.read_text().splitlines()]
    assert alert["source"] == "retrieve" and all(b in alert["summary"] for b in barcodes)
    assert alert["counts"]["instances"] == len(pv.ct) and study not in json.dumps(alert)
    assert "restore --queued" in alert["summary"]

    # The study was queued; once the volumes are readable it comes back online and the
    # same move succeeds, byte for byte.
    st = json.loads(run_cli(pv.config, "status", "--json").stdout)
    assert st["restore_queue"]["studies"] == 1
    assert set(st["restore_queue"]["volumes"]) <= barcodes and st["restore_queue"]["volumes"]
    back = json.loads(run_cli(pv.config, "restore", "--queued", "--identity", str(key),
                              "--json").stdout)
    assert back["queued"] == 1 and back["restored"] == len(pv.ct)
    assert json.loads(run_cli(pv.config, "status", "--json").stdout)["restore_queue"] == \
        {"studies": 0, "volumes": []}
    with serving(pv) as d:
        status, _ = movescu(d.dicom_port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
    got = received(pv)
    assert status == 0x0000 and set(got) == {m.sop_uid for m in pv.ct}
    assert sent_as_received(pv, got)
    empty = json.loads(run_cli(pv.config, "restore", "--queued", "--identity", str(key),
                               "--json").stdout)
    assert empty == {"queued": 0, "restored": 0}


def test_c_cancel_stops_a_move_between_sub_operations(tmp_path):
    inst = Install.create(tmp_path / "pv")
    big = make_ct_series(tmp_path / "ct", 300, size=100_000)   # ~2 s of sub-operations
    inst.ingest(big)
    inst.by_sop = {m.sop_uid: m for m in big}
    scp = start_storescp(tmp_path / "dest", aet="DEST")
    inst.scp = scp
    run_cli(inst.config, "peer", "add", "MOVESCU", "127.0.0.1")
    run_cli(inst.config, "peer", "add", "DEST", "127.0.0.1", "--port", str(scp.port))
    try:
        with serving(inst) as d:
            status, out = movescu(d.dicom_port, "QueryRetrieveLevel=STUDY",
                                  f"StudyInstanceUID={big[0].study_uid}", extra=("--cancel", "1"))
    finally:
        scp.stop()
    assert status == 0xFE00
    assert 0 < len(received(inst)) < len(big)


def test_each_move_is_audited_with_its_destination(pv):
    study = pv.ct[0].study_uid
    with serving(pv) as d:
        movescu(d.dicom_port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        movescu(d.dicom_port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}",
                dest="NOWHERE")
        log = d.log()
    # The operator sees both in the log too, by AE title and counts only.
    assert f"C-MOVE from MOVESCU@127.0.0.1 to DEST: {len(pv.ct)} sent, 0 failed, status " \
        "0x0000" in log
    assert "C-MOVE from MOVESCU@127.0.0.1 to NOWHERE: 0 sent, 0 failed, status 0xA801 " \
        "(move destination unknown" in log
    out = json.loads(run_cli(pv.config, "audit", "--study", study, "--json").stdout)
    moves = [r for r in out["records"] if r["action"] == "retrieve"]
    assert len(moves) == 1, moves                   # the refused one named no study
    detail = moves[0]["detail"] if isinstance(moves[0]["detail"], dict) else \
        json.loads(moves[0]["detail"])
    assert detail["destination_ae"] == "DEST" and detail["completed"] == len(pv.ct)
    assert moves[0]["source"].startswith("MOVESCU@127.0.0.1")
    assert study not in log

