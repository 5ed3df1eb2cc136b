"""A real Orthanc (Debian 1.10) as the PACS that pulls priors back from `pacsvault serve`:
it queries pacsvault (C-FIND) and retrieves into itself (C-MOVE, Orthanc the move
destination), all through Orthanc's REST API. What Orthanc then holds is compared
with what pacsvault was given: the same instances, the same data set bytes.

Deflated data sets: Orthanc's C-STORE SCP re-serializes what it receives, and for
deflate it keeps the write buffer at the inflated length, so the stored deflated
stream is followed by zero bytes (a plain dcmtk storescu push of the original file
ends the same way; the test checks that too). Every other syntax is stored as sent.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest

from archive.dicom.part10 import dataset_offset
from tests.conftest import require_tool
from tests.support.daemon import Daemon, free_port, init_instance, run_cli, storescu
from tests.support.dataset import DEFLATED_LE, Made, make_ct_series, make_varied_study
from tests.support.orthanc import ORTHANC_BIN, Orthanc, OrthancError, orthanc_binary

pytestmark = [pytest.mark.needs_orthanc, pytest.mark.needs_dcmtk]

PATIENT_A = "TEST-0001"         # make_varied_study's patient
PATIENT_B = "PAT-B-2207"


@dataclass
class Vault:
    config: Path
    daemon: Daemon
    orthanc: Orthanc
    prior: list[Made]           # patient A: every kind and transfer syntax, one study
    recent: list[Made]          # patient A: a second study of two CT series
    other: list[Made]           # patient B

    @property
    def by_sop(self) -> dict[str, Made]:
        return {m.sop_uid: m for m in self.prior + self.recent + self.other}


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    require_tool(orthanc_binary() or ORTHANC_BIN)
    require_tool("storescu")
    root = tmp_path_factory.mktemp("move-orthanc")
    prior = make_varied_study(root / "prior", per_kind=1, size=6000)
    assert {str(pydicom.dcmread(m.path, stop_before_pixels=True).PatientID)
            for m in prior} == {PATIENT_A}
    recent = make_ct_series(root / "recent1", 4, size=6000, seed=3, patient_id=PATIENT_A)
    recent += make_ct_series(root / "recent2", 3, size=6000, seed=4, patient_id=PATIENT_A,
                             study_uid=recent[0].study_uid)
    other = make_ct_series(root / "other", 3, size=6000, seed=5, patient_id=PATIENT_B)

    cfg = init_instance(root / "pv")
    orthanc_dicom_port = free_port()
    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    # ORTHANC both calls pacsvault and is where the sub-operations' C-STOREs go.
    run_cli(cfg, "peer", "add", "ORTHANC", "127.0.0.1", "--port", str(orthanc_dicom_port))
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    orthanc = None
    try:
        r = storescu(d.dicom_port, [m.path for m in prior + recent + other])
        assert r.returncode == 0, r.stdout + r.stderr
        orthanc = Orthanc(root / "orthanc", dicom_port=orthanc_dicom_port,
                          modalities={"pacsvault": ("PACSVAULT", "127.0.0.1", d.dicom_port)})
        orthanc.start()
        yield Vault(cfg, d, orthanc, prior, recent, other)
    finally:
        if orthanc is not None:
            orthanc.stop()
        d.stop()


@pytest.fixture
def pv(vault: Vault) -> Vault:
    """The module's pacsvault and Orthanc, with Orthanc emptied of earlier tests' moves."""
    for patient in vault.orthanc.get("/patients"):
        vault.orthanc.request("DELETE", f"/patients/{patient}")
    assert vault.orthanc.count_instances() == 0
    return vault


def held(orthanc: Orthanc) -> dict[str, str]:
    """SOP Instance UID -> Orthanc's instance ID, for everything Orthanc holds."""
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"]
            for i in orthanc.get("/instances?expand")}


def data_set(raw: bytes) -> bytes:
    return raw[dataset_offset(io.BytesIO(raw)):]


def stored_data_set(orthanc: Orthanc, orthanc_id: str) -> bytes:
    return data_set(orthanc.request("GET", f"/instances/{orthanc_id}/file", raw=True))


def retrieves(cfg: Path, *args: str) -> list[dict]:
    """The audit trail's retrieve records, each with its detail as a dict."""
    out = json.loads(run_cli(cfg, "audit", *args, "--json").stdout)
    records = [r for r in out["records"] if r["action"] == "retrieve"]
    for r in records:
        if not isinstance(r["detail"], dict):
            r["detail"] = json.loads(r["detail"])
    return records


def answer_value(answer: dict, tag: str) -> str:
    return answer[tag]["Value"]


def test_orthanc_finds_one_patients_priors_and_retrieves_them_byte_for_byte(pv: Vault):
    o = pv.orthanc
    q = o.post_json("/modalities/pacsvault/query",
                    {"Level": "Study", "Query": {"PatientID": PATIENT_A}})
    answers = o.get(f"/queries/{q['ID']}/answers?expand")
    studies = {pv.prior[0].study_uid, pv.recent[0].study_uid}
    assert {answer_value(a, "0020,000d") for a in answers} == studies
    assert {answer_value(a, "0010,0020") for a in answers} == {PATIENT_A}
    assert len(answers) == 2

    # One C-MOVE per answer, Orthanc naming itself the destination.
    o.post_json(f"/queries/{q['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    got = held(o)
    assert set(got) == {m.sop_uid for m in pv.prior + pv.recent}     # none of patient B's
    by_sop = pv.by_sop
    assert {by_sop[uid].transfer_syntax for uid in got} >= {m.transfer_syntax for m in pv.prior}
    deflated = []
    for uid, oid in got.items():
        m = by_sop[uid]
        assert o.instance_metadata(oid, "RemoteAET") == "PACSVAULT"
        assert o.instance_metadata(oid, "TransferSyntax") == m.transfer_syntax, m.path.name
        original, stored = data_set(m.path.read_bytes()), stored_data_set(o, oid)
        if m.transfer_syntax == DEFLATED_LE:
            # The deflated stream as sent, then Orthanc's zero tail (see the docstring).
            assert stored[:len(original)] == original, m.path.name
            assert not stored[len(original):].strip(b"\0"), m.path.name
            deflated.append((m, stored))
        else:
            assert stored == original, m.path.name
    assert len(deflated) == 1
    # Control: the zero tail is Orthanc's. The original file pushed straight to Orthanc
    # by storescu is stored exactly as what pacsvault's sub-operation left.
    m, via_pacsvault = deflated[0]
    o.request("DELETE", f"/instances/{got[m.sop_uid]}")
    r = storescu(o.dicom_port, [m.path], aec="ORTHANC")
    assert r.returncode == 0, r.stdout + r.stderr
    assert stored_data_set(o, held(o)[m.sop_uid]) == via_pacsvault

    for study, made in ((pv.prior[0].study_uid, pv.prior),
                        (pv.recent[0].study_uid, pv.recent)):
        [rec] = [r for r in retrieves(pv.config, "--study", study)
                 if r["detail"]["level"] == "STUDY"]
        assert rec["detail"]["destination_ae"] == "ORTHANC"
        assert rec["detail"]["completed"] == len(made) and rec["detail"]["failed"] == 0
        assert rec["detail"]["status"] == "0x0000"
        assert rec["source"].startswith("ORTHANC@127.0.0.1")
    log = pv.daemon.log()
    assert PATIENT_A not in log and not any(s in log for s in studies)


def test_a_series_level_move_brings_exactly_that_series(pv: Vault):
    o = pv.orthanc
    series = pv.recent[0].series_uid
    wanted = {m.sop_uid for m in pv.recent if m.series_uid == series}
    assert 0 < len(wanted) < len(pv.recent)         # the study has another series
    o.post_json("/modalities/pacsvault/move", {
        "Level": "Series", "TargetAet": "ORTHANC", "Synchronous": True,
        "Resources": [{"StudyInstanceUID": pv.recent[0].study_uid,
                       "SeriesInstanceUID": series}]})
    got = held(o)
    assert set(got) == wanted
    for uid, oid in got.items():
        assert stored_data_set(o, oid) == data_set(pv.by_sop[uid].path.read_bytes())
    [rec] = [r for r in retrieves(pv.config, "--study", pv.recent[0].study_uid)
             if r["detail"]["level"] == "SERIES"]
    assert rec["detail"]["destination_ae"] == "ORTHANC"
    assert rec["detail"]["completed"] == len(wanted) and rec["detail"]["failed"] == 0


def test_a_move_to_a_destination_pacsvault_does_not_know_fails_and_sends_nothing(pv: Vault):
    o = pv.orthanc
    study = pv.recent[0].study_uid
    # STRANGER is unknown; STORESCU is a known caller but has no port: not a destination.
    for target in ("STRANGER", "STORESCU"):
        with pytest.raises(OrthancError) as e:
            o.post_json("/modalities/pacsvault/move", {
                "Level": "Study", "TargetAet": target, "Synchronous": True,
                "Resources": [{"StudyInstanceUID": study}]})
        assert e.value.status == 500
        assert json.loads(e.value.body)["Details"] == \
            'C-MOVE SCU to AET "PACSVAULT" has failed with DIMSE status 0xA801'
    assert o.count_instances() == 0
    since = (date.today() - timedelta(days=1)).isoformat()
    refused = {r["detail"]["destination_ae"]: r for r in retrieves(pv.config, "--since", since)
               if r["detail"]["status"] == "0xA801"}
    assert set(refused) == {"STRANGER", "STORESCU"}
    assert all(r["detail"]["completed"] == 0 and r["source"].startswith("ORTHANC@")
               for r in refused.values())
