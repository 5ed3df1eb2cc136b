"""C-FIND matching over a real catalog (archive/catalog/query.py), on SQLite and PostgreSQL.

The catalog is filled through the real ingest path (two filesystem sites), then
the query attributes are filled by the backfill, as on an install migrated to
0010. Every matching type at every level, the keys each level allows, refusals
(malformed, oversized, wrong level), the cap, and that a query for one patient
never returns another's data.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import delete, select

from archive.app.ingest import IngestService, Outcome, StoreRequest
from archive.catalog import query as q
from archive.catalog.backfill_query import backfill_query_attributes
from archive.catalog.engine import make_engine, upgrade
from archive.catalog.models import Copy, Instance
from archive.catalog.uow import Catalog
from replication.mirror import MirrorWriter
from tests.support.dataset import make_instance
from tiers.fs import FilesystemBackend

pytestmark = pytest.mark.timeout(300)

P, S = q.PATIENT_ROOT, q.STUDY_ROOT


@dataclass
class Archive:
    catalog: Catalog
    uids: dict[str, str]          # name -> UID of the studies, series and instances below


def _study(patient: str, name: str, date: str, time: str, accession: str, description: str,
           study_id: str, physician: str, charset: str = "ISO_IR 100") -> dict:
    return {"PatientName": name, "StudyDate": date, "StudyTime": time,
            "AccessionNumber": accession, "StudyDescription": description, "StudyID": study_id,
            "ReferringPhysicianName": physician, "SpecificCharacterSet": charset}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql",
                                                               marks=pytest.mark.needs_pg)])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("query")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'catalog.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    engine = make_engine(url)
    upgrade(engine)
    catalog = Catalog(engine)
    sites = [FilesystemBackend(n, tmp / n) for n in ("site-a", "site-b")]
    for s in sites:
        s.initialize()
    mirror = MirrorWriter(sites, timeout_s=30, retry_after_s=0)
    ingest = IngestService(catalog, mirror)
    uids: dict[str, str] = {}

    def store(tag: str, kind: str, patient: str, study: dict, study_tag: str, series_tag: str,
              number: str, series: dict | None = None, sop_uid: str | None = None) -> None:
        made = make_instance(tmp / "in" / f"{tag}.dcm", kind=kind, patient_id=patient,
                             study_uid=uids.get(study_tag), series_uid=uids.get(series_tag),
                             sop_uid=sop_uid, size=600,
                             raw_overrides={**study, "InstanceNumber": number, **(series or {})})
        uids.setdefault(study_tag, made.study_uid)
        uids.setdefault(series_tag, made.series_uid)
        uids.setdefault(tag, made.sop_uid)
        r = ingest.store(StoreRequest(made.path, made.sop_class, made.sop_uid,
                                      made.transfer_syntax, "MODALITY"))
        assert r.outcome is Outcome.STORED, r.reason

    a1 = _study("PAT-A", "Doe^Jane", "20240102", "101500", "ACC_1", "CT [head]", "S1",
                "Who^Doctor")
    a2 = _study("PAT-A", "Doe^Jane", "20230615", "235900", "ACC%2", "MR knee!", "S2", "")
    b1 = _study("PAT-B", "DOE^JOHN", "20240103", "0800", "ACCX1", "CT chest", "S3",
                "WHO^DOCTOR")
    c1 = _study("PAT-C", "Müller^Jürgen", "20220101", "120000", "ACC3", "Knie", "S4",
                "Straße^Émile")
    e1 = _study("PAT-E", "Lost^Copies", "20200101", "090000", "ACC4", "lost", "S5", "")
    ct = {"SeriesDescription": "AX 5mm", "SeriesDate": "20240102", "SeriesTime": "101600"}
    store("a1ct1", "CT", "PAT-A", a1, "A1", "A1-CT", "1", ct)
    store("a1ct2", "CT", "PAT-A", a1, "A1", "A1-CT", "2", ct)
    store("a1sr", "SR", "PAT-A", a1, "A1", "A1-SR", "1", {"SeriesDescription": "Report"})
    store("a2mr", "MR", "PAT-A", a2, "A2", "A2-MR", "1", {"SeriesDescription": "T1"})
    # The same SOP Instance UID with other bytes: a second version, the one that counts.
    store("a2mr-v2", "MR", "PAT-A", a2, "A2", "A2-MR", "7", {"SeriesDescription": "T1"},
          sop_uid=uids["a2mr"])
    # Patient B's modality reused A1's CT series UID (filed under B's study, flagged).
    uids["B1-CT"] = uids["A1-CT"]
    store("b1ct", "CT", "PAT-B", b1, "B1", "B1-CT", "1", {"SeriesDescription": "AX 5mm"})
    store("c1mr", "MR", "PAT-C", c1, "C1", "C1-MR", "3")
    store("e1ct", "CT", "PAT-E", e1, "E1", "E1-CT", "1")
    # E's copies are all gone: still found, by what was kept at ingest.
    with catalog.unit(write=True) as uow:
        (e_id,) = uow.session.scalars(select(Instance.id).where(Instance.sop_uid == uids["e1ct"]))
        uow.session.execute(delete(Copy).where(Copy.instance_fk == e_id))
        uow.commit()
    # Ingest wrote the query attributes already: nothing is left for the backfill.
    report = backfill_query_attributes(catalog, {s.name: (lambda c, s=s: s.open(c.key))
                                                 for s in sites})
    assert report.instances == 0 and report.unreadable == 0
    mirror.close()
    yield Archive(catalog, uids)
    catalog.close()


def find(archive: Archive, level: str, model: str, keys: dict, **kw) -> list[dict]:
    return list(q.find(archive.catalog, level, model, keys, max_matches=kw.pop("cap", 100), **kw))


def uids_of(rows: list[dict], key: str) -> set[str]:
    return {r[key] for r in rows}


def studies(archive: Archive, *names: str) -> set[str]:
    return {archive.uids[n] for n in names}


# -- PATIENT level -------------------------------------------------------------

def test_patient_level_names_case_insensitive_and_counts(archive: Archive):
    rows = find(archive, q.PATIENT, P, {"PatientName": "doe*", "PatientBirthDate": "",
                                        "NumberOfPatientRelatedStudies": "",
                                        "NumberOfPatientRelatedSeries": "",
                                        "NumberOfPatientRelatedInstances": ""})
    by_id = {r["PatientID"]: r for r in rows}
    assert set(by_id) == {"PAT-A", "PAT-B"}
    assert by_id["PAT-A"]["PatientName"] == "Doe^Jane"          # returned as received
    assert by_id["PAT-A"]["PatientBirthDate"] == "19700101"
    # A: 2 studies, 3 series, 4 instances (the MR's first version does not count).
    assert [by_id["PAT-A"][k] for k in ("NumberOfPatientRelatedStudies",
                                        "NumberOfPatientRelatedSeries",
                                        "NumberOfPatientRelatedInstances")] == ["2", "3", "4"]
    assert by_id["PAT-B"]["NumberOfPatientRelatedInstances"] == "1"


@pytest.mark.parametrize("value,expect", [
    ("DOE^JANE", {"PAT-A"}), ("doe^jane^^", {"PAT-A"}), ("doe", set()), ("D?E^J*", {"PAT-A", "PAT-B"}),
    ("*JOHN", {"PAT-B"}), ("müller*", {"PAT-C"}), ("MÜLLER^JÜRGEN", {"PAT-C"}), ("*", None),
])
def test_patient_name_matching(archive: Archive, value, expect):
    rows = find(archive, q.PATIENT, P, {"PatientName": value})
    everyone = {"PAT-A", "PAT-B", "PAT-C", "PAT-E"}
    assert uids_of(rows, "PatientID") == (everyone if expect is None else expect)


def test_patient_name_case_sensitive_when_configured(archive: Archive):
    rows = find(archive, q.PATIENT, P, {"PatientName": "Doe*"}, case_insensitive_pn=False)
    assert uids_of(rows, "PatientID") == {"PAT-A"}
    assert find(archive, q.PATIENT, P, {"PatientName": "doe^jane"}, case_insensitive_pn=False) == []
    assert uids_of(find(archive, q.PATIENT, P, {"PatientName": "Doe^Jane"},
                        case_insensitive_pn=False), "PatientID") == {"PAT-A"}


def test_referring_physician_matches_folded(archive: Archive):
    rows = find(archive, q.STUDY, S, {"ReferringPhysicianName": "who^doctor"})
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, "A1", "B1")
    rows = find(archive, q.STUDY, S, {"ReferringPhysicianName": "STRASSE*"})
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, "C1")
    assert rows[0]["ReferringPhysicianName"] == "Straße^Émile"


# -- STUDY level ---------------------------------------------------------------

def test_study_level_patient_root_needs_a_single_patient_id(archive: Archive):
    for keys in ({}, {"PatientID": ""}, {"PatientID": "PAT-*"}, {"PatientID": "PAT-A\\PAT-B"}):
        with pytest.raises(q.IdentifierInvalid, match="PatientID is required"):
            find(archive, q.STUDY, P, keys)
    rows = find(archive, q.STUDY, P, {"PatientID": "PAT-A", "StudyDate": "",
                                      "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
                                      "NumberOfStudyRelatedInstances": "", "StudyID": "",
                                      "AccessionNumber": ""})
    by_uid = {r["StudyInstanceUID"]: r for r in rows}
    assert set(by_uid) == studies(archive, "A1", "A2")
    a1, a2 = by_uid[archive.uids["A1"]], by_uid[archive.uids["A2"]]
    assert (a1["PatientID"], a1["StudyDate"], a1["StudyID"], a1["AccessionNumber"]) == (
        "PAT-A", "20240102", "S1", "ACC_1")
    assert (a1["ModalitiesInStudy"], a1["NumberOfStudyRelatedSeries"],
            a1["NumberOfStudyRelatedInstances"]) == ("CT\\SR", "2", "3")
    assert (a2["ModalitiesInStudy"], a2["NumberOfStudyRelatedInstances"]) == ("MR", "1")


@pytest.mark.parametrize("value,expect", [
    ("20240102", {"A1"}), ("20240101-20240131", {"A1", "B1"}), ("-20231231", {"A2", "C1", "E1"}),
    ("20240103-", {"B1"}), ("20230615-20230615", {"A2"}), ("19000101-19991231", set()),
])
def test_study_date_matching(archive: Archive, value, expect):
    rows = find(archive, q.STUDY, S, {"StudyDate": value})
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, *expect)


@pytest.mark.parametrize("value,expect", [
    ("0700-1100", {"A1", "B1", "E1"}), ("2300-", {"A2"}), ("-09", {"B1", "E1"}), ("08", {"B1"}),
    ("1015", {"A1"}), ("101500", {"A1"}), ("101501", set()), ("120000.000-120000", {"C1"}),
])
def test_study_time_matching(archive: Archive, value, expect):
    rows = find(archive, q.STUDY, S, {"StudyTime": value})
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, *expect)


def test_combined_date_and_time_range(archive: Archive):
    keys = {"StudyDate": "20230615-20240102", "StudyTime": "2300-1100"}
    # One date-time range: 15 June 2023 23:00 to 2 January 2024 11:00.
    rows = find(archive, q.STUDY, S, keys, combined_datetime=True)
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, "A1", "A2")
    # Each on its own, a time range that ends before it starts cannot match anything.
    with pytest.raises(q.ValueInvalid, match="ends before it starts"):
        find(archive, q.STUDY, S, keys)
    rows = find(archive, q.STUDY, S, {"StudyDate": "20240102-20240103",
                                      "StudyTime": "1100-0900"}, combined_datetime=True)
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, "B1")
    rows = find(archive, q.STUDY, S, {"StudyDate": "20240102", "StudyTime": "1000-1100"},
                combined_datetime=True)
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, "A1")


@pytest.mark.parametrize("key,value", [
    ("StudyDate", "2024-01-01"), ("StudyDate", "20241301"), ("StudyDate", "20240230"),
    ("StudyDate", "abc"), ("StudyDate", "-"), ("StudyDate", "20240102-20230101"),
    ("StudyDate", "2024*"), ("StudyDate", "20240101-20240102-20240103"),
    ("PatientBirthDate", "1970"), ("StudyTime", "2500"), ("StudyTime", "10:15"),
    ("StudyTime", "1061"), ("StudyTime", "10.5"), ("StudyTime", "1100-1000"),
])
def test_malformed_dates_and_times_are_refused(archive: Archive, key, value):
    with pytest.raises(q.ValueInvalid, match=key):
        find(archive, q.STUDY, S, {key: value})


def test_list_of_uids(archive: Archive):
    value = archive.uids["A1"] + "\\" + archive.uids["B1"] + "\\1.2.3.4"
    rows = find(archive, q.STUDY, S, {"StudyInstanceUID": value})
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, "A1", "B1")
    for bad in ("1.2.*", "1.2.3\\abc", "1..2", archive.uids["A1"] + "?"):
        with pytest.raises(q.ValueInvalid, match="StudyInstanceUID"):
            find(archive, q.STUDY, S, {"StudyInstanceUID": bad})


@pytest.mark.parametrize("key,value,expect", [
    ("AccessionNumber", "ACC_*", {"A1"}),          # '_' is not "any character"
    ("AccessionNumber", "ACC%*", {"A2"}),          # '%' is not "any run"
    ("AccessionNumber", "ACC?1", {"A1", "B1"}),    # '?' is one character
    ("AccessionNumber", "ACC_1", {"A1"}),
    ("AccessionNumber", "acc_1", set()),           # not a person name: case counts
    ("StudyDescription", "CT [*", {"A1"}),         # '[' is not a GLOB class
    ("StudyDescription", "CT [h?ad]", {"A1"}),
    ("StudyDescription", "*knee!", {"A2"}),        # '!' is PostgreSQL's escape here
    ("StudyDescription", "*!", {"A2"}),
    ("StudyDescription", "CT*", {"A1", "B1"}),
    ("StudyDescription", "**", {"A1", "A2", "B1", "C1", "E1"}),
    ("StudyID", "S?", {"A1", "A2", "B1", "C1", "E1"}),
])
def test_wildcards_do_not_widen(archive: Archive, key, value, expect):
    rows = find(archive, q.STUDY, S, {key: value})
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, *expect)


@pytest.mark.parametrize("value,expect", [
    ("MR", {"A2", "C1"}), ("CT\\SR", {"A1", "B1", "E1"}), ("S*", {"A1"}), ("XA", set()),
    ("SR\\M?", {"A1", "A2", "C1"}),
])
def test_modalities_in_study_matching(archive: Archive, value, expect):
    rows = find(archive, q.STUDY, S, {"ModalitiesInStudy": value})
    assert uids_of(rows, "StudyInstanceUID") == studies(archive, *expect)


# -- SERIES and IMAGE levels -----------------------------------------------------

def test_series_level(archive: Archive):
    with pytest.raises(q.IdentifierInvalid, match="StudyInstanceUID is required"):
        find(archive, q.SERIES, S, {"Modality": "CT"})
    with pytest.raises(q.IdentifierInvalid, match="PatientID is required"):
        find(archive, q.SERIES, P, {"StudyInstanceUID": archive.uids["A1"]})
    rows = find(archive, q.SERIES, S, {"StudyInstanceUID": archive.uids["A1"], "Modality": "",
                                       "SeriesDescription": "", "SeriesDate": "",
                                       "SeriesTime": "", "SeriesNumber": "",
                                       "NumberOfSeriesRelatedInstances": ""})
    by_uid = {r["SeriesInstanceUID"]: r for r in rows}
    assert set(by_uid) == {archive.uids["A1-CT"], archive.uids["A1-SR"]}
    ct = by_uid[archive.uids["A1-CT"]]
    assert (ct["StudyInstanceUID"], ct["Modality"], ct["SeriesDescription"], ct["SeriesDate"],
            ct["SeriesTime"], ct["SeriesNumber"], ct["NumberOfSeriesRelatedInstances"]) == (
        archive.uids["A1"], "CT", "AX 5mm", "20240102", "101600", "1", "2")
    rows = find(archive, q.SERIES, S, {"StudyInstanceUID": archive.uids["A1"],
                                       "SeriesDescription": "ax*"})
    assert rows == []                               # LO: case counts
    rows = find(archive, q.SERIES, P, {"PatientID": "PAT-A", "StudyInstanceUID": archive.uids["A1"],
                                       "Modality": "SR"})
    assert rows == [{"PatientID": "PAT-A", "StudyInstanceUID": archive.uids["A1"],
                     "SeriesInstanceUID": archive.uids["A1-SR"], "Modality": "SR"}]


def test_image_level_counts_the_latest_version_once(archive: Archive):
    rows = find(archive, q.IMAGE, S, {"StudyInstanceUID": archive.uids["A2"],
                                      "SeriesInstanceUID": archive.uids["A2-MR"],
                                      "InstanceNumber": "", "SOPClassUID": ""})
    assert rows == [{"StudyInstanceUID": archive.uids["A2"],
                     "SeriesInstanceUID": archive.uids["A2-MR"], "SOPInstanceUID": archive.uids["a2mr"],
                     "InstanceNumber": "7", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}]
    rows = find(archive, q.IMAGE, S, {"StudyInstanceUID": archive.uids["A1"],
                                      "SeriesInstanceUID": archive.uids["A1-CT"],
                                      "InstanceNumber": "2"})
    assert uids_of(rows, "SOPInstanceUID") == {archive.uids["a1ct2"]}
    with pytest.raises(q.ValueInvalid, match="InstanceNumber"):
        find(archive, q.IMAGE, S, {"StudyInstanceUID": archive.uids["A1"],
                                   "SeriesInstanceUID": archive.uids["A1-CT"], "InstanceNumber": "1*"})


def test_an_instance_without_any_copy_is_found(archive: Archive):
    rows = find(archive, q.IMAGE, P, {"PatientID": "PAT-E", "StudyInstanceUID": archive.uids["E1"],
                                      "SeriesInstanceUID": archive.uids["E1-CT"],
                                      "InstanceNumber": ""})
    # Found by what ingest kept, its instance number included (no copy is read).
    assert rows == [{"PatientID": "PAT-E", "StudyInstanceUID": archive.uids["E1"],
                     "SeriesInstanceUID": archive.uids["E1-CT"],
                     "SOPInstanceUID": archive.uids["e1ct"], "InstanceNumber": "1"}]


@pytest.mark.parametrize("level,model,keys,below", [
    (q.PATIENT, P, {"StudyDate": ""}, "StudyDate"),
    (q.STUDY, S, {"Modality": "CT"}, "Modality"),
    (q.STUDY, P, {"PatientID": "PAT-A", "SOPInstanceUID": ""}, "SOPInstanceUID"),
    (q.SERIES, S, {"StudyInstanceUID": "1.2.3", "InstanceNumber": ""}, "InstanceNumber"),
])
def test_keys_below_the_query_level_are_refused(archive: Archive, level, model, keys, below):
    with pytest.raises(q.IdentifierInvalid, match=f"{below} is a .* key, below"):
        find(archive, level, model, keys)


def test_models_and_levels_checked(archive: Archive):
    with pytest.raises(q.IdentifierInvalid, match="no PATIENT level"):
        find(archive, q.PATIENT, S, {"PatientName": ""})
    with pytest.raises(q.IdentifierInvalid):
        find(archive, "FRAME", S, {})
    with pytest.raises(q.IdentifierInvalid):
        find(archive, q.STUDY, "WORKLIST", {})


# -- what leaks and what is refused ---------------------------------------------

STUDIES_OF = {"PAT-A": {"A1", "A2"}, "PAT-B": {"B1"}, "PAT-C": {"C1"}, "PAT-E": {"E1"}}


@pytest.mark.parametrize("patient", sorted(STUDIES_OF))
def test_a_patients_query_never_returns_another_patients_data(archive: Archive, patient):
    mine = studies(archive, *STUDIES_OF[patient])
    rows = find(archive, q.STUDY, P, {"PatientID": patient, "PatientName": "",
                                      "StudyDescription": "", "ModalitiesInStudy": "",
                                      "NumberOfPatientRelatedInstances": ""})
    assert uids_of(rows, "StudyInstanceUID") == mine
    assert {r["PatientID"] for r in rows} == {patient}
    for tag in ("A1", "A2", "B1", "C1", "E1"):
        uid = archive.uids[tag]
        series = find(archive, q.SERIES, P, {"PatientID": patient, "StudyInstanceUID": uid})
        assert (series != []) == (uid in mine)
        # A1's CT series UID is also B1's: each study sees only its own row.
        images = find(archive, q.IMAGE, P, {"PatientID": patient, "StudyInstanceUID": uid,
                                            "SeriesInstanceUID": archive.uids["A1-CT"]})
        expect = {"A1": {"a1ct1", "a1ct2"}, "B1": {"b1ct"}}.get(tag, set()) if uid in mine else set()
        assert uids_of(images, "SOPInstanceUID") == {archive.uids[n] for n in expect}


def test_the_cap_is_detected_before_anything_is_returned(archive: Archive):
    assert len(q.find(archive.catalog, q.STUDY, S, {}, max_matches=5)) == 5
    with pytest.raises(q.TooManyMatches) as e:
        q.find(archive.catalog, q.STUDY, S, {}, max_matches=4)
    assert e.value.limit == 4
    with pytest.raises(q.TooManyMatches):
        q.find(archive.catalog, q.IMAGE, P, {"PatientID": "PAT-A",
                                             "StudyInstanceUID": archive.uids["A1"],
                                             "SeriesInstanceUID": archive.uids["A1-CT"]},
               max_matches=1)


@pytest.mark.parametrize("keys,match", [
    ({"PatientName": "A" * 195}, "PatientName: longer than 194"),
    ({"AccessionNumber": "1" * 17}, "AccessionNumber: longer than 16"),
    ({"StudyDate": "20240101-202401010"}, "StudyDate: longer than 17"),
    ({"StudyInstanceUID": "\\".join(["1.2.3"] * 1001)}, "more than 1000 UIDs"),
    ({f"Private{i}": "" for i in range(300)}, "more than 256 keys"),
    ({"NumberOfStudyRelatedInstances": "3"}, "computed"),
    ({"StudyDescription": "a\\b"}, "several values"),
    ({"StudyDescription": 3}, "not text"),
])
def test_oversized_and_unmatchable_values_are_refused(archive: Archive, keys, match):
    with pytest.raises(q.ValueInvalid, match=match):
        find(archive, q.STUDY, S, keys)


def test_errors_never_carry_the_value(archive: Archive):
    secret = "Secret^Patient"
    for keys in ({"PatientBirthDate": secret}, {"PatientName": secret * 20},
                 {"StudyInstanceUID": secret}):
        with pytest.raises(q.QueryError) as e:
            find(archive, q.STUDY, S, keys)
        assert "Secret" not in str(e.value)


def test_unknown_keys_are_reported_not_matched(archive: Archive):
    m = q.find(archive.catalog, q.STUDY, S, {"AccessionNumber": "ACCX1", "BodyPartExamined": "CHEST",
                                           "QueryRetrieveLevel": "STUDY"}, max_matches=10)
    assert m.unsupported == ["BodyPartExamined"]
    assert [sorted(r) for r in m] == [["AccessionNumber", "StudyInstanceUID"]]
