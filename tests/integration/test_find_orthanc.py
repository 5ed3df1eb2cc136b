"""A real Orthanc (Debian 1.10) acting as the PACS queries `pacsvault serve` over C-FIND.

Orthanc is driven through its REST API (POST /modalities/pacsvault/query, then
/queries/<id>/answers/<n>/content); what it reports is what it decoded from
pacsvault's responses. Orthanc queries PATIENT in Patient Root and the other levels
in Study Root. With "Normalize": false it sends the keys given plus a few of its own
(empty, so universal: AccessionNumber, PatientID, StudyInstanceUID at the levels they
belong to) and SpecificCharacterSet from its DefaultEncoding (Latin1 unless set).

One archive holds seven patients (two share a Patient ID under different issuers,
one's ID is another's plus a character) and eight studies, loaded with dcmtk storescu.
A refused query makes Orthanc's REST call fail; pacsvault's status for it is read
from its audit trail, where every query is recorded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.conftest import require_tool
from tests.support.daemon import Daemon, free_port, init_instance, run_cli, storescu
from tests.support.dataset import SOP_CLASSES, make_instance
from tests.support.orthanc import ORTHANC_BIN, Orthanc, OrthancError, orthanc_binary

pytestmark = [pytest.mark.needs_orthanc, pytest.mark.needs_dcmtk]

MAX_MATCHES = 5     # the archive's cap: below the 8 studies and 7 patients it holds
PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"

# key -> (PatientID, IssuerOfPatientID, PatientName, SpecificCharacterSet of its files)
PATIENTS = {
    "A": ("PV-A", "HOSP-1", "DOE^JOHN", "ISO_IR 100"),
    "B": ("PV-B", "HOSP-1", "Doe^Jane", "ISO_IR 100"),
    "T": ("PV-B", "HOSP-2", "Roe^Richard", "ISO_IR 100"),      # B's ID, another hospital
    "P": ("PV-A2", "HOSP-1", "Smith^Ann", "ISO_IR 100"),       # A's ID is a prefix of it
    "C": ("PV-C", "", "Müller^Jürgen", "ISO_IR 192"),
    "D": ("PV-D", "", "Gonçalves^José", "ISO_IR 100"),
    "E": ("PV-E", "", "Παπαδόπουλος^Νίκος", "ISO_IR 192"),   # not representable in Latin-1
}
# key -> (patient, StudyDate, AccessionNumber, [(kind, instances) per series])
STUDIES = {
    "A1": ("A", "20240105", "ACC-A1", [("CT", 2), ("MR", 1)]),
    "A2": ("A", "20240310", "ACC-A2", [("CR", 1)]),
    "B1": ("B", "20240120", "ACC-B1", [("US", 1)]),
    "T1": ("T", "20240111", "ACC-T1", [("MR", 1)]),
    "P1": ("P", "20240115", "ACC-P1", [("CT", 1)]),
    "C1": ("C", "20230601", "ACC-C1", [("MR", 1)]),
    "D1": ("D", "20230602", "ACC-D1", [("CT", 1)]),
    "E1": ("E", "20230603", "ACC-E1", [("MR", 1)]),
}


@dataclass
class Loaded:
    study_uid: dict[str, str] = field(default_factory=dict)             # study key -> UID
    series: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # -> [(UID, modality)]
    sops: dict[str, set[str]] = field(default_factory=dict)            # series UID -> SOP UIDs

    def key_of(self, study_uid: str) -> str:
        return next(k for k, uid in self.study_uid.items() if uid == study_uid)


def _write_archive_input(directory: Path) -> tuple[Loaded, list[Path]]:
    loaded, paths = Loaded(), []
    for key, (patient, day, accession, series) in STUDIES.items():
        pid, issuer, name, charset = PATIENTS[patient]
        study = loaded.study_uid[key] = generate_uid()
        loaded.series[key] = []
        attrs = {"SpecificCharacterSet": charset, "PatientName": name, "StudyDate": day,
                 "AccessionNumber": accession, **({"IssuerOfPatientID": issuer} if issuer else {})}
        for n, (kind, count) in enumerate(series, 1):
            series_uid = generate_uid()
            loaded.series[key].append((series_uid, SOP_CLASSES[kind][1]))
            loaded.sops[series_uid] = set()
            for i in range(1, count + 1):
                made = make_instance(directory / f"{key}-{n}-{i}.dcm", kind=kind, size=512,
                                     study_uid=study, series_uid=series_uid, patient_id=pid,
                                     raw_overrides={**attrs, "SeriesNumber": n,
                                                    "InstanceNumber": i})
                loaded.sops[series_uid].add(made.sop_uid)
                paths.append(made.path)
    return loaded, paths


@dataclass
class Setup:
    daemon: Daemon
    orthanc: Orthanc            # Orthanc as installed: DefaultEncoding Latin1
    orthanc_utf8: Orthanc       # one set to DefaultEncoding Utf8
    loaded: Loaded


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    require_tool("storescu")
    require_tool(orthanc_binary() or ORTHANC_BIN)
    tmp = tmp_path_factory.mktemp("find")
    cfg = init_instance(tmp / "pv")
    # C-FIND is offered by the pacsvault engine only (not the pynetdicom fallback).
    text = cfg.read_text()
    text = text.replace("max_query_matches = 1000", f"max_query_matches = {MAX_MATCHES}")
    text = text.replace('engine = "pynetdicom"', 'engine = "pacsvault"')
    assert f"max_query_matches = {MAX_MATCHES}" in text and 'engine = "pacsvault"' in text
    cfg.write_text(text)
    run_cli(cfg, "peer", "add", "ORTHANC", "127.0.0.1")
    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    loaded, paths = _write_archive_input(tmp / "in")
    daemon = Daemon(cfg, free_port(), free_port(), workers=2).start()
    started: list[Orthanc] = []
    try:
        r = storescu(daemon.dicom_port, paths)
        assert r.returncode == 0, r.stderr
        st = daemon.status()
        assert st["instances"] == len(paths) and st["studies"] == len(STUDIES), st
        pacsvault = {"pacsvault": ("PACSVAULT", "127.0.0.1", daemon.dicom_port)}
        for name, extra in (("orthanc", {}), ("orthanc-utf8", {"DefaultEncoding": "Utf8"})):
            o = Orthanc(tmp / name, aet="ORTHANC", modalities=pacsvault, extra_config=extra)
            started.append(o)
            o.start()
        yield Setup(daemon, started[0], started[1], loaded)
    finally:
        for o in started:
            o.stop()
        try:
            daemon.stop()
        except AssertionError:
            daemon.kill9()


def find(orthanc: Orthanc, level: str, query: dict[str, str]) -> list[dict]:
    """Orthanc's C-FIND to pacsvault; each answer as Orthanc decoded it (simplified tags)."""
    r = orthanc.post_json("/modalities/pacsvault/query",
                          {"Level": level, "Query": query, "Normalize": False}, timeout=60)
    path = r["Path"]
    return [orthanc.get(f"{path}/answers/{n}/content?simplify") for n in orthanc.get(f"{path}/answers")]


def studies(answers: list[dict], loaded: Loaded) -> set[str]:
    assert all(a["QueryRetrieveLevel"] == "STUDY" for a in answers), answers
    keys = [loaded.key_of(a["StudyInstanceUID"]) for a in answers]
    assert len(keys) == len(set(keys)), f"a study answered twice: {keys}"
    return set(keys)


def query_records(config: Path, after: int = 0) -> list[dict]:
    """pacsvault's audit records of C-FIND queries (action "query") after record ``after``."""
    since = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%d")
    out = json.loads(run_cli(config, "audit", "--since", since, "--json").stdout)
    return [r for r in out["records"] if r["action"] == "query" and r["id"] > after]


def last_record_id(config: Path) -> int:
    since = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%d")
    out = json.loads(run_cli(config, "audit", "--since", since, "--json").stdout)
    return max(r["id"] for r in out["records"])


# -- 1. STUDY level -----------------------------------------------------------------

def test_study_level_by_patient_id_returns_that_patients_studies_with_their_attributes(setup):
    answers = find(setup.orthanc, "Study", {
        "PatientID": "PV-A", "PatientName": "", "StudyInstanceUID": "", "AccessionNumber": "",
        "StudyDate": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": ""})
    assert studies(answers, setup.loaded) == {"A1", "A2"}
    got = {setup.loaded.key_of(a["StudyInstanceUID"]): a for a in answers}
    for key, a in got.items():
        _, day, accession, series = STUDIES[key]
        assert a["PatientID"] == "PV-A" and a["PatientName"] == "DOE^JOHN"
        assert a["AccessionNumber"] == accession
        assert a["StudyDate"] == day
        assert set(a["ModalitiesInStudy"].split("\\")) == {kind for kind, _ in series}
        assert a["NumberOfStudyRelatedSeries"] == str(len(series))
        assert a["NumberOfStudyRelatedInstances"] == str(sum(n for _, n in series))
    assert got["A1"]["NumberOfStudyRelatedInstances"] == "3"


def test_study_level_date_ranges_return_only_the_studies_in_range(setup):
    def in_range(value: str) -> set[str]:
        return studies(find(setup.orthanc, "Study", {"StudyDate": value, "StudyInstanceUID": ""}),
                       setup.loaded)

    assert in_range("20240101-20240131") == {"A1", "T1", "P1", "B1"}
    assert in_range("20240106-20240119") == {"T1", "P1"}
    assert in_range("20240111-20240115") == {"T1", "P1"}          # both ends inclusive
    assert in_range("20240301-") == {"A2"}
    assert in_range("-20231231") == {"C1", "D1", "E1"}
    assert in_range("20240120") == {"B1"}
    assert in_range("20240201-20240229") == set()


def test_study_level_patient_name_wildcard_and_modalities_match(setup):
    loaded = setup.loaded
    for pattern in ("DOE*", "doe*", "Doe^J*", "d?e^*"):
        answers = find(setup.orthanc, "Study", {"PatientName": pattern, "StudyInstanceUID": ""})
        assert studies(answers, loaded) == {"A1", "A2", "B1"}, pattern
        assert {a["PatientName"] for a in answers} == {"DOE^JOHN", "Doe^Jane"}  # as received
    # A single value is an exact match of the whole name (case aside), not a prefix.
    assert studies(find(setup.orthanc, "Study", {"PatientName": "doe^jane"}), loaded) == {"B1"}
    assert studies(find(setup.orthanc, "Study", {"PatientName": "DOE"}), loaded) == set()
    # ModalitiesInStudy: a study matches if any of its series has any of the values.
    by_modality = find(setup.orthanc, "Study", {"PatientID": "PV-A", "ModalitiesInStudy": "MR\\US"})
    assert studies(by_modality, loaded) == {"A1"}
    assert set(by_modality[0]["ModalitiesInStudy"].split("\\")) == {"CT", "MR"}
    assert studies(find(setup.orthanc, "Study", {"ModalitiesInStudy": "C*", "StudyDate": "2024"
                                                 "0101-20241231"}), loaded) == {"A1", "A2", "P1"}
    assert studies(find(setup.orthanc, "Study", {"AccessionNumber": "ACC-B1"}), loaded) == {"B1"}


def test_patient_level_in_patient_root_counts_the_patients_studies(setup):
    answers = find(setup.orthanc, "Patient", {
        "PatientID": "PV-A", "PatientName": "", "NumberOfPatientRelatedStudies": "",
        "NumberOfPatientRelatedSeries": "", "NumberOfPatientRelatedInstances": ""})
    assert len(answers) == 1
    a = answers[0]
    assert a["QueryRetrieveLevel"] == "PATIENT"
    assert (a["PatientID"], a["PatientName"]) == ("PV-A", "DOE^JOHN")
    assert (a["NumberOfPatientRelatedStudies"], a["NumberOfPatientRelatedSeries"],
            a["NumberOfPatientRelatedInstances"]) == ("2", "3", "4")


# -- 2. SERIES and IMAGE level (Study Root) -----------------------------------------------

def test_series_and_instance_levels_return_exactly_what_was_stored(setup):
    loaded = setup.loaded
    study = loaded.study_uid["A1"]
    answers = find(setup.orthanc, "Series", {
        "StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
        "NumberOfSeriesRelatedInstances": ""})
    assert all(a["QueryRetrieveLevel"] == "SERIES" and a["StudyInstanceUID"] == study
               for a in answers)
    assert sorted((a["SeriesInstanceUID"], a["Modality"]) for a in answers) == \
        sorted(loaded.series["A1"])
    for a in answers:
        assert a["NumberOfSeriesRelatedInstances"] == str(len(loaded.sops[a["SeriesInstanceUID"]]))
    mr = find(setup.orthanc, "Series", {"StudyInstanceUID": study, "Modality": "MR"})
    assert [a["SeriesInstanceUID"] for a in mr] == [u for u, m in loaded.series["A1"] if m == "MR"]

    # IMAGE level as Orthanc asks by default: it adds SOPInstanceUID to the keys itself.
    for series_uid, _ in loaded.series["A1"]:
        answers = find(setup.orthanc, "Instance", {
            "StudyInstanceUID": study, "SeriesInstanceUID": series_uid, "InstanceNumber": ""})
        assert all(a["QueryRetrieveLevel"] == "IMAGE" and a["SeriesInstanceUID"] == series_uid
                   and a["StudyInstanceUID"] == study for a in answers)
        sops = [a["SOPInstanceUID"] for a in answers]
        assert len(sops) == len(set(sops)) and set(sops) == loaded.sops[series_uid]
        assert sorted(a["InstanceNumber"] for a in answers) == \
            [str(i) for i in range(1, len(sops) + 1)]


# Orthanc 1.10 puts (0002,0003) MediaStorageSOPInstanceUID (and (0002,0002) for
# SOPClassUID) into an IMAGE identifier whenever the query names those keys: the
# identifier's framing check must let them through (they are then set aside).
def test_instance_level_with_sop_instance_and_class_uid_keys(setup):
    loaded = setup.loaded
    study = loaded.study_uid["A1"]
    for series_uid, modality in loaded.series["A1"]:
        answers = find(setup.orthanc, "Instance", {
            "StudyInstanceUID": study, "SeriesInstanceUID": series_uid, "SOPInstanceUID": "",
            "SOPClassUID": ""})
        assert {a["SOPInstanceUID"] for a in answers} == loaded.sops[series_uid]
        assert {a["SOPClassUID"] for a in answers} == {SOP_CLASSES[modality][0]}
    # "Does the archive hold this instance?": one SOP Instance UID, one answer.
    series_uid = loaded.series["A1"][0][0]
    one = sorted(loaded.sops[series_uid])[0]
    answers = find(setup.orthanc, "Instance", {
        "StudyInstanceUID": study, "SeriesInstanceUID": series_uid, "SOPInstanceUID": one})
    assert [a["SOPInstanceUID"] for a in answers] == [one]


# -- 3. Character sets ---------------------------------------------------------------------

def test_non_ascii_patient_names_reach_orthanc_decoded(setup):
    loaded = setup.loaded
    # Orthanc as installed asks in Latin-1: a name stored in UTF-8 (Müller) and one stored
    # in Latin-1 (Gonçalves) both come back as the same characters.
    for pid, name in (("PV-C", "Müller^Jürgen"), ("PV-D", "Gonçalves^José")):
        answers = find(setup.orthanc, "Study", {"PatientID": pid, "PatientName": ""})
        assert [a["PatientName"] for a in answers] == [name], pid
        answers = find(setup.orthanc, "Patient", {"PatientID": pid, "PatientName": ""})
        assert [a["PatientName"] for a in answers] == [name], pid
    # The query's own non-ASCII value is decoded too, and folded: ü matches Ü.
    assert studies(find(setup.orthanc, "Study", {"PatientName": "MÜLLER*"}), loaded) == {"C1"}
    assert studies(find(setup.orthanc, "Study", {"PatientName": "gonç*"}), loaded) == {"D1"}
    assert studies(find(setup.orthanc, "Study", {"PatientName": "Muller*"}), loaded) == set()
    # A name the request's Latin-1 cannot carry goes out in UTF-8, declared, never with
    # replacement characters; Orthanc on Latin-1 then drops the letters it cannot keep in
    # its own Latin-1 answers (it shows "^"), but a "?" would be pacsvault's substitution.
    greek = find(setup.orthanc, "Study", {"PatientID": "PV-E", "PatientName": ""})
    assert len(greek) == 1 and "?" not in greek[0]["PatientName"], greek
    # Orthanc set to UTF-8 asks in ISO_IR 192 and gets Greek and German back intact.
    for pid, name in (("PV-E", "Παπαδόπουλος^Νίκος"), ("PV-C", "Müller^Jürgen")):
        answers = find(setup.orthanc_utf8, "Study", {"PatientID": pid, "PatientName": ""})
        assert [a["PatientName"] for a in answers] == [name], pid
    answers = find(setup.orthanc_utf8, "Study", {"PatientName": "παπαδόπουλοσ*"})
    assert studies(answers, loaded) == {"E1"}


# -- 4. Privacy ------------------------------------------------------------------------------

def test_a_query_for_one_patient_never_returns_another_patients_data(setup):
    o, loaded = setup.orthanc, setup.loaded
    for pid, expected in (("PV-A", {"A1", "A2"}), ("PV-A2", {"P1"}), ("PV-C", {"C1"}),
                          ("PV-D", {"D1"}), ("PV-E", {"E1"})):
        answers = find(o, "Study", {"PatientID": pid, "StudyInstanceUID": ""})
        assert {a["PatientID"] for a in answers} == {pid}
        assert studies(answers, loaded) == expected, pid
    # Nothing near the ID matches it: case, a prefix, SQL LIKE characters, a trailing space
    # (insignificant in DICOM) is the same ID.
    for near in ("pv-a", "PV-", "PV_A", "PV_A*", "PV%", "PV-A%", "PV-[A]*", "PV-A_"):
        assert find(o, "Study", {"PatientID": near}) == [], near
    assert studies(find(o, "Study", {"PatientID": "PV-A "}), loaded) == {"A1", "A2"}
    with pytest.raises(OrthancError):       # a list of IDs is refused (0xC000), not merged
        find(o, "Study", {"PatientID": "PV-A\\PV-B"})
    assert studies(find(o, "Study", {"PatientID": "PV-A?"}), loaded) == {"P1"}
    # One Patient ID, two issuers: the issuer tells the patients apart.
    for issuer, expected in (("HOSP-1", {"B1"}), ("HOSP-2", {"T1"})):
        answers = find(o, "Study", {"PatientID": "PV-B", "IssuerOfPatientID": issuer,
                                    "PatientName": ""})
        assert studies(answers, loaded) == expected, issuer
        assert {(a["PatientID"], a["IssuerOfPatientID"]) for a in answers} == {("PV-B", issuer)}
    both = find(o, "Study", {"PatientID": "PV-B", "IssuerOfPatientID": ""})
    assert {(a["PatientID"], a["IssuerOfPatientID"]) for a in both} == \
        {("PV-B", "HOSP-1"), ("PV-B", "HOSP-2")}    # universal issuer: both, each labelled
    # Below the study level, another patient's ID narrows a study's series and instances
    # to nothing; a list of studies is narrowed to the patient's.
    a1 = loaded.study_uid["A1"]
    ct = loaded.series["A1"][0][0]
    assert find(o, "Series", {"StudyInstanceUID": a1, "PatientID": "PV-B"}) == []
    assert find(o, "Instance", {"StudyInstanceUID": a1, "SeriesInstanceUID": ct,
                                "PatientID": "PV-B"}) == []
    listed = find(o, "Study", {"StudyInstanceUID": f"{a1}\\{loaded.study_uid['B1']}",
                               "PatientID": "PV-A"})
    assert studies(listed, loaded) == {"A1"}
    assert {a["PatientID"] for a in find(o, "Series", {"StudyInstanceUID": a1})} == {"PV-A"}


# -- Refusals and the audit trail ---------------------------------------------------------------

def test_refused_queries_fail_in_orthanc_and_every_query_is_audited(setup):
    o, cfg = setup.orthanc, setup.daemon.config
    before = last_record_id(cfg)
    answered = find(o, "Study", {"PatientID": "PV-A"})
    assert len(answered) == 2
    refused = [
        ("Study", {"PatientID": "*"}, "0xA700"),                 # 8 studies > the cap of 5
        ("Patient", {"PatientName": "*"}, "0xA700"),             # 7 patients
        ("Study", {"StudyDate": "20241399"}, "0xC000"),          # not a date
        ("Series", {"PatientID": "PV-A"}, "0xA900"),             # no StudyInstanceUID
        ("Instance", {"StudyInstanceUID": setup.loaded.study_uid["A1"],
                      "SeriesInstanceUID": "*"}, "0xA900"),     # wildcard in a unique key
    ]
    for level, query, _ in refused:
        with pytest.raises(OrthancError) as e:
            find(o, level, query)
        assert e.value.status >= 400, (level, query)
    assert len(find(o, "Study", {"PatientID": "PV-E"})) == 1     # the archive answers on

    records = query_records(cfg, before)
    assert len(records) == 2 + len(refused), records
    assert all(r["actor"] == "ORTHANC" and r["source"] == "ORTHANC@127.0.0.1" for r in records)
    first, *failed, last = records
    assert (first["outcome"], first["patient_id"], first["study_uid"]) == ("success", "PV-A", None)
    assert first["detail"]["level"] == "STUDY" and first["detail"]["matches"] == 2
    assert first["detail"]["sop_class"] == STUDY_ROOT and first["detail"]["status"] == "0x0000"
    assert "PatientID" in first["detail"]["keys"]
    for r, (level, query, status) in zip(failed, refused):
        assert (r["outcome"], r["detail"]["status"], r["detail"]["matches"]) == \
            ("failure", status, 0), (level, query, r)
    assert failed[1]["detail"]["sop_class"] == PATIENT_ROOT
    assert failed[3]["patient_id"] == "PV-A"
    assert failed[4]["study_uid"] == setup.loaded.study_uid["A1"]
    assert (last["outcome"], last["patient_id"], last["detail"]["matches"]) == ("success", "PV-E", 1)
    # Per patient, the trail answers who looked: Orthanc's queries by PV-A's ID.
    by_patient = json.loads(run_cli(cfg, "audit", "--patient", "PV-A", "--json").stdout)["records"]
    assert any(r["action"] == "query" and r["actor"] == "ORTHANC" for r in by_patient)
    # Values are not in the detail (only key names), and no PHI reached the log.
    assert "DOE" not in json.dumps(records)
    log = setup.daemon.log()
    for phi in ("PV-A", "PV-B", "DOE^JOHN", "Müller", "HOSP-1", setup.loaded.study_uid["A1"]):
        assert phi not in log, phi
