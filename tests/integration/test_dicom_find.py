"""C-FIND against `pacsvault serve`, with dcmtk findscu as the PACS: what a query
returns at each level of both models, how it is refused, C-CANCEL, hostile
identifiers at the socket, and the audit record every query leaves."""
from __future__ import annotations

import json
import random
import re
import socket
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.support.daemon import (
    Daemon,
    dcmtk_env,
    free_port,
    init_instance,
    run_cli,
    storescu,
)
from tests.support.dataset import make_instance

pytestmark = pytest.mark.needs_dcmtk

STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ROOT = "1.2.826.0.1.3680043.8.498.77"
# (patient id, name, study, date, accession, modality, instances)
STUDIES = [
    ("PID-4471", "DOE^JOHN", f"{ROOT}.1", "20240105", "ACC-A1", "CT", 3),
    ("PID-4471", "DOE^JOHN", f"{ROOT}.2", "20240210", "ACC-B2", "MR", 2),
    ("PID-5582", "ROE^JANE", f"{ROOT}.3", "20240107", "ACC-C3", "CT", 2),
    ("PID-6693", "Müller^Jürgen", f"{ROOT}.4", "20240301", "ACC-D4", "US", 1),
]
BIG_STUDY, BIG_N = f"{ROOT}.9", 300          # for C-CANCEL: enough matches to interrupt
KIND = {"CT": "CT", "MR": "MR", "US": "US"}


def _write_study(out: Path, rng: random.Random, pid: str, name: str, study: str, date: str,
                 accession: str, modality: str, n: int) -> None:
    for i in range(n):
        path = out / f"{study}-{i}.dcm"
        make_instance(path, kind=KIND[modality], size=600, study_uid=study,
                      series_uid=f"{study}.1", sop_uid=f"{study}.1.{i + 1}", patient_id=pid,
                      rng=rng)
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.StudyDate, ds.AccessionNumber = name, date, accession
        ds.InstanceNumber = i + 1
        ds.save_as(path)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("find")
    cfg = init_instance(root / "pv")
    text = cfg.read_text().replace("max_query_matches = 1000", "max_query_matches = 500")
    assert "max_query_matches = 500" in text
    cfg.write_text(text)
    for ae in ("STORESCU", "FINDSCU"):
        run_cli(cfg, "peer", "add", ae, "127.0.0.1")
    d = Daemon(cfg, free_port(), free_port()).start()
    src, rng = root / "src", random.Random(7)
    src.mkdir()
    for row in STUDIES:
        _write_study(src, rng, *row)
    _write_study(src, rng, "PID-7704", "BIG^STUDY", BIG_STUDY, "20230101", "ACC-Z9", "CT", BIG_N)
    assert storescu(d.dicom_port, src).returncode == 0
    yield d
    d.stop()


def findscu(port: int, out: Path, *keys: str, model: str = "-S", extra: tuple = ()
            ) -> tuple[str, list[pydicom.Dataset]]:
    """(final status text, the pending responses' identifiers)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-v", "-aet", "FINDSCU", "-aec", "PACSVAULT", model, "-X", "-od", str(out),
            *extra]
    for k in keys:
        args += ["-k", k]
    r = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True,
                       env=dcmtk_env(), timeout=120)
    final = re.search(r"Received Final Find Response \(([^)]*)\)", r.stdout + r.stderr)
    assert final, r.stdout + r.stderr
    return final.group(1), [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_study_level_returns_exactly_that_patients_studies(daemon, tmp_path):
    status, rsp = findscu(daemon.dicom_port, tmp_path, "QueryRetrieveLevel=STUDY",
                          "PatientID=PID-4471", "StudyInstanceUID", "AccessionNumber", "StudyDate",
                          "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                          "NumberOfStudyRelatedSeries", "PatientName")
    assert status == "Success"
    got = {(r.StudyInstanceUID, r.AccessionNumber, r.StudyDate, r.ModalitiesInStudy,
            int(r.NumberOfStudyRelatedInstances), int(r.NumberOfStudyRelatedSeries),
            str(r.PatientName), r.PatientID) for r in rsp}
    assert got == {(s[2], s[4], s[3], s[5], s[6], 1, s[1], s[0]) for s in STUDIES[:2]}


def test_patient_root_wildcard_name_matches_regardless_of_case(daemon, tmp_path):
    status, rsp = findscu(daemon.dicom_port, tmp_path, "QueryRetrieveLevel=PATIENT",
                          "PatientName=doe*", "PatientID", "NumberOfPatientRelatedStudies",
                          model="-P")
    assert status == "Success"
    assert [(str(r.PatientName), r.PatientID, int(r.NumberOfPatientRelatedStudies))
            for r in rsp] == [("DOE^JOHN", "PID-4471", 2)]


def test_date_range_then_series_and_images_of_one_study(daemon, tmp_path):
    status, rsp = findscu(daemon.dicom_port, tmp_path / "a", "QueryRetrieveLevel=STUDY",
                          "StudyDate=20240101-20240131", "StudyInstanceUID")
    assert status == "Success"
    assert {r.StudyInstanceUID for r in rsp} == {STUDIES[0][2], STUDIES[2][2]}
    study = STUDIES[0][2]
    status, rsp = findscu(daemon.dicom_port, tmp_path / "b", "QueryRetrieveLevel=SERIES",
                          f"StudyInstanceUID={study}", "SeriesInstanceUID", "Modality",
                          "NumberOfSeriesRelatedInstances")
    assert status == "Success"
    assert [(r.SeriesInstanceUID, r.Modality, int(r.NumberOfSeriesRelatedInstances))
            for r in rsp] == [(f"{study}.1", "CT", 3)]
    status, rsp = findscu(daemon.dicom_port, tmp_path / "c", "QueryRetrieveLevel=IMAGE",
                          f"StudyInstanceUID={study}", f"SeriesInstanceUID={study}.1",
                          "SOPInstanceUID", "InstanceNumber", "SOPClassUID")
    assert status == "Success"
    assert sorted((r.SOPInstanceUID, int(r.InstanceNumber)) for r in rsp) == \
        [(f"{study}.1.{i}", i) for i in (1, 2, 3)]
    assert {r.SOPClassUID for r in rsp} == {"1.2.840.10008.5.1.4.1.1.2"}


def test_a_non_ascii_name_is_found_and_comes_back_declared(daemon, tmp_path):
    status, rsp = findscu(daemon.dicom_port, tmp_path, "SpecificCharacterSet=ISO_IR 192",
                          "QueryRetrieveLevel=STUDY", "PatientName=müller*", "PatientID",
                          "StudyInstanceUID")
    assert status == "Success"
    assert len(rsp) == 1
    # The request's character set carries it, so the answer is in it and says so.
    assert rsp[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(rsp[0].PatientName) == "Müller^Jürgen" and rsp[0].PatientID == "PID-6693"


def test_refusals_name_the_problem_and_never_answer_partly(daemon, tmp_path):
    # Series level without the study's unique key: not hierarchical.
    status, rsp = findscu(daemon.dicom_port, tmp_path / "a", "QueryRetrieveLevel=SERIES",
                          "SeriesInstanceUID")
    assert "DataSetDoesNotMatchSOPClass" in status and rsp == []
    # A key below the query level.
    status, rsp = findscu(daemon.dicom_port, tmp_path / "b", "QueryRetrieveLevel=STUDY",
                          "PatientID=PID-4471", "SOPInstanceUID")
    assert "DataSetDoesNotMatchSOPClass" in status and rsp == []
    # A date that is no date.
    status, rsp = findscu(daemon.dicom_port, tmp_path / "c", "QueryRetrieveLevel=STUDY",
                          "StudyDate=20241345", "StudyInstanceUID")
    assert "UnableToProcess" in status, status
    assert rsp == []
    # A Patient Root query at the patient level sent on the Study Root model.
    status, rsp = findscu(daemon.dicom_port, tmp_path / "d", "QueryRetrieveLevel=PATIENT",
                          "PatientID")
    assert "DataSetDoesNotMatchSOPClass" in status and rsp == []


def test_c_cancel_stops_the_matches(daemon, tmp_path):
    status, rsp = findscu(daemon.dicom_port, tmp_path, "QueryRetrieveLevel=IMAGE",
                          f"StudyInstanceUID={BIG_STUDY}", f"SeriesInstanceUID={BIG_STUDY}.1",
                          "SOPInstanceUID", extra=("--cancel", "1"))
    assert "Cancel" in status, status
    assert 1 <= len(rsp) < BIG_N


def test_each_query_is_audited_and_no_patient_data_is_logged(daemon, tmp_path):
    findscu(daemon.dicom_port, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=PID-5582",
            "StudyInstanceUID")
    out = run_cli(daemon.config, "audit", "--patient", "PID-5582", "--json").stdout
    queries = [r for r in json.loads(out)["records"] if r["action"] == "query"]
    assert queries, out
    q = queries[-1]
    assert q["outcome"] == "success" and q["source"].startswith("FINDSCU@127.0.0.1")
    detail = q["detail"] if isinstance(q["detail"], dict) else json.loads(q["detail"])
    assert detail["matches"] == 1 and detail["level"] == "STUDY"
    assert detail["sop_class"] == STUDY_ROOT
    log = daemon.log()
    for phi in ("PID-5582", "DOE", "ROE^JANE", "ACC-A1"):
        assert phi not in log


# -- hostile identifiers at the socket ----------------------------------------------------

def _associate(port: int, ts: tuple[str, ...] = (EXPLICIT_LE,)):  # noqa: ANN202
    from archive.dicom.net import association as A
    from archive.dicom.net import pdu as P

    s = socket.create_connection(("127.0.0.1", port))
    a = A.Association(requestor=True, max_pdu_length=65536)
    a.request_association(P.AssociateRQ(
        "PACSVAULT", "FINDSCU", (P.PresentationContextRQ(1, STUDY_ROOT, ts),),
        P.UserInformation(max_length=65536, implementation_class_uid="1.2.3")))
    s.sendall(a.data_to_send())
    s.settimeout(10)
    while True:
        ev = a.next_event()
        if isinstance(ev, A.Accepted):
            return s, a, ev
        assert ev is None, ev
        a.receive_data(s.recv(65536))


def _final(s, a):  # noqa: ANN001, ANN202
    from archive.dicom.net import dimse

    while True:
        ev = a.next_event()
        if isinstance(ev, dimse.CommandReceived) and ev.command.status != 0xFF00:
            return ev.command
        if ev is None:
            a.receive_data(s.recv(65536))


def _find(s, a, message_id: int, data: bytes):  # noqa: ANN001, ANN202
    from archive.dicom.net import dimse

    a.send_message(1, dimse.Command(dimse.C_FIND_RQ, message_id=message_id,
                                    affected_sop_class=STUDY_ROOT, priority=0,
                                    data_set_type=dimse.DATA_SET_PRESENT), data)
    s.sendall(a.data_to_send())
    return _final(s, a)


def _identifier(**keys: str) -> bytes:
    from archive.dicom import identifier

    return identifier.encode(keys, "STUDY", EXPLICIT_LE)


def test_hostile_identifiers_are_refused_and_the_association_goes_on(daemon):
    s, a, _ = _associate(daemon.dicom_port)
    try:
        oversized = _identifier(StudyInstanceUID="") + b"\x09\x00\x10\x00UN\x00\x00" + \
            struct.pack("<I", 70_000) + b"A" * 70_000                # 70 KB, then more PDUs
        rsp = _find(s, a, 1, oversized)
        assert rsp.status == 0xC000 and "longer than" in (rsp.error_comment or "")
        rsp = _find(s, a, 2, b"\xff" * 97 + b"\x00")                 # not a data set
        assert rsp.status in (0xA900, 0xC000)
        rsp = _find(s, a, 3, _identifier(StudyInstanceUID="", PatientID="P" * 65))   # > LO
        assert rsp.status == 0xC000 and "P" * 65 not in (rsp.error_comment or "")
        rsp = _find(s, a, 4, _identifier(StudyInstanceUID="", PatientID="PID-5582"))
        assert rsp.status == 0x0000                                  # still served
    finally:
        s.close()


def test_a_query_context_is_not_accepted_in_a_compressed_syntax(daemon):
    from archive.dicom.net import pdu as P

    _, _, accepted = _associate(daemon.dicom_port, ("1.2.840.10008.1.2.4.50", EXPLICIT_LE))
    [ctx] = accepted.accept.contexts
    assert ctx.result == P.ACCEPTANCE and ctx.transfer_syntax == EXPLICIT_LE
    s, a, accepted = _associate(daemon.dicom_port, ("1.2.840.10008.1.2.4.50",))
    s.close()
    [ctx] = accepted.accept.contexts
    assert ctx.result == P.TRANSFER_SYNTAXES_NOT_SUPPORTED


def test_more_matches_than_the_cap_refuse_the_whole_query(tmp_path):
    cfg = init_instance(tmp_path / "pv")
    cfg.write_text(cfg.read_text().replace("max_query_matches = 1000", "max_query_matches = 2"))
    for ae in ("STORESCU", "FINDSCU"):
        run_cli(cfg, "peer", "add", ae, "127.0.0.1")
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    try:
        src, rng = tmp_path / "src", random.Random(3)
        src.mkdir()
        for row in STUDIES[:3]:
            _write_study(src, rng, *row)
        assert storescu(d.dicom_port, src).returncode == 0
        status, rsp = findscu(d.dicom_port, tmp_path / "a", "QueryRetrieveLevel=STUDY",
                              "StudyInstanceUID")
        assert "OutOfResources" in status or "A700" in status.upper(), status
        assert rsp == []
        status, rsp = findscu(d.dicom_port, tmp_path / "b", "QueryRetrieveLevel=STUDY",
                              "PatientID=PID-4471", "StudyInstanceUID")
        assert status == "Success" and len(rsp) == 2
    finally:
        d.stop()


def _pynetdicom_find(port: int, level: str, keys: dict, ext: bytes | None):  # noqa: ANN202
    """(what the acceptor answered to the extended negotiation, [(status, identifier)])."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(STUDY_ROOT, EXPLICIT_LE)
    neg = []
    if ext is not None:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = STUDY_ROOT
        item.service_class_application_information = ext
        neg = [item]
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSVAULT", ext_neg=neg)
    assert assoc.is_established
    try:
        agreed = assoc.acceptor.sop_class_extended.get(STUDY_ROOT)
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for k, v in keys.items():
            setattr(ds, k, v)
        out = [(status.Status, ident) for status, ident in assoc.send_c_find(ds, STUDY_ROOT)]
    finally:
        assoc.release()
    return agreed, out


def test_relational_and_combined_date_time_queries_when_negotiated(daemon):
    """PS3.4 C.5.1.1: a requestor that negotiates relational queries may search every
    series without naming the study; combined date-time matching likewise. Without
    the negotiation the same query is refused (hierarchical search)."""
    keys = {"SeriesInstanceUID": "", "PatientID": "PID-5582", "Modality": ""}
    agreed, out = _pynetdicom_find(daemon.dicom_port, "SERIES", keys, None)
    assert agreed is None and out[-1][0] == 0xA900           # StudyInstanceUID required
    agreed, out = _pynetdicom_find(daemon.dicom_port, "SERIES", keys, b"\x01\x01\x01\x01")
    assert agreed == b"\x01\x01\x00\x00"       # relational and combined: yes; fuzzy, tz: no
    assert out[-1][0] == 0x0000
    assert [i.SeriesInstanceUID for s, i in out if s == 0xFF00] == [f"{ROOT}.3.1"]
    # Every study was at 10:15. From 2024-01-05 12:00 to 2024-01-07 as one range: the
    # study of the 7th only (the 5th's was before noon); as two separate ranges (date
    # in range and time after noon): none.
    keys = {"StudyInstanceUID": "", "StudyDate": "20240105-20240107", "StudyTime": "120000-"}
    agreed, out = _pynetdicom_find(daemon.dicom_port, "STUDY", keys, b"\x00\x01")
    assert agreed == b"\x00\x01" and out[-1][0] == 0x0000
    assert {i.StudyInstanceUID for s, i in out if s == 0xFF00} == {f"{ROOT}.3"}
    _, out = _pynetdicom_find(daemon.dicom_port, "STUDY", keys, None)
    assert out[-1][0] == 0x0000 and [s for s, _ in out if s == 0xFF00] == []
