"""One catalog test suite, run against every catalog backend (SQLite and PostgreSQL).

The embedded default (SQLite) forgives things PostgreSQL refuses: NUL characters
in text, values longer than a VARCHAR, foreign keys to rows another transaction
has not committed, ids reused after a rollback, and it serializes all writers.
Each test here runs unchanged on both; a difference between the two halves is a
bug in pacsvault, not in the test.
"""
from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text, update

from archive.app.ingest import IngestService, Outcome, StoreRequest
from archive.app.status import collect
from archive.catalog import repo
from archive.catalog.engine import make_engine, schema_is_current, upgrade
from archive.catalog.fastpath import RawTx
from archive.catalog.models import Copy, Instance, Patient, Series, Study
from archive.catalog.uow import Catalog
from archive.config.schema import CatalogSettings, Settings, SiteSettings
from archive.dicom.attributes import read_attributes
from archive.dicom.part10 import dataset_offset
from archive.errors import InvalidInput
from archive.peers import PeerRegistry, add_peer, list_peers, remove_peer
from replication.mirror import MirrorWriter
from replication.repair import repair_missing
from tests.support.dataset import Made, make_instance
from tests.support.verify import audit, sha256_file
from tiers.backend import Unavailable
from tiers.fs import FilesystemBackend
from tiers.layout import instance_key

pytestmark = pytest.mark.timeout(180)

TABLES = {"alembic_version", "patients", "studies", "series", "instances", "copies", "peers",
          "bundles", "leases", "scrub_runs", "scrub_findings", "job_runs", "dr_volumes",
          "dr_segments", "dr_instances", "dr_custody", "drills", "users", "password_history",
          "sessions", "audit_log", "audit_head", "audit_checkpoints", "ingest_in_flight",
          "restore_requests", "atna_cursors"}


class Site(FilesystemBackend):
    """A real filesystem site whose writes fail while ``down`` is set."""

    down = False

    def put(self, key, payload, *, replace=False):  # noqa: ANN001
        if self.down:
            raise Unavailable("put", self.name, "injected: site down")
        return super().put(key, payload, replace=replace)


@dataclass
class Env:
    url: str
    dialect: str
    catalog: Catalog
    a: Site
    b: Site
    ingest: IngestService
    tmp: Path

    @property
    def sites(self) -> dict[str, Path]:
        return {"site-a": self.a.root, "site-b": self.b.root}

    def count(self, model) -> int:  # noqa: ANN001
        with self.catalog.unit() as uow:
            return uow.session.scalar(select(func.count()).select_from(model))

    def rows(self, stmt):  # noqa: ANN001
        with self.catalog.unit() as uow:
            rows = uow.session.execute(stmt).all()
            uow.session.expunge_all()  # keep loaded ORM objects readable after the unit
            return rows


@pytest.fixture
def env(catalog_url: str, dialect: str, tmp_path: Path):
    engine = make_engine(catalog_url)
    upgrade(engine)
    catalog = Catalog(engine)
    a = Site("site-a", tmp_path / "sites" / "a")
    b = Site("site-b", tmp_path / "sites" / "b")
    a.initialize()
    b.initialize()
    mirror = MirrorWriter([a, b], timeout_s=30, retry_after_s=0)
    yield Env(catalog_url, dialect, catalog, a, b, IngestService(catalog, mirror), tmp_path)
    mirror.close()
    catalog.close()


def req(made: Made, ae: str = "STORESCU") -> StoreRequest:
    return StoreRequest(made.path, made.sop_class, made.sop_uid, made.transfer_syntax, ae)


def dataset_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        off = dataset_offset(f)
        f.seek(off)
        return f.read()


# -- schema ---------------------------------------------------------------------------

def test_migrations_build_exactly_the_models(catalog_url: str) -> None:
    """Alembic's autogenerate finds nothing to do: the migrations and models.py agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from archive.catalog.models import Base

    engine = make_engine(catalog_url)
    try:
        upgrade(engine)
        with engine.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_upgrade_from_empty_then_idempotent(catalog_url: str) -> None:
    engine = make_engine(catalog_url)
    try:
        assert not schema_is_current(engine)
        upgrade(engine)
        assert schema_is_current(engine)
        upgrade(engine)  # a second `pacsvault init` on an existing catalog
        assert schema_is_current(engine)
        insp = inspect(engine)
        assert set(insp.get_table_names()) == TABLES
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        # The lookups that must stay fast at 10 million rows have their indexes on
        # every backend (a unique constraint is an index too).
        def indexed(table: str) -> set[tuple[str, ...]]:
            cols = {tuple(ix["column_names"]) for ix in insp.get_indexes(table)}
            cols |= {tuple(uq["column_names"]) for uq in insp.get_unique_constraints(table)}
            return cols
        assert ("sop_uid", "version") in indexed("instances")
        assert ("study_fk",) in indexed("instances")
        assert ("series_fk",) in indexed("instances")
        assert ("study_uid",) in indexed("studies")
        assert ("series_uid",) in indexed("series")
        assert ("instance_fk", "location") in indexed("copies")
        assert ("location", "state", "id") in indexed("copies")
        assert ("patient_id", "issuer") in indexed("patients")
    finally:
        engine.dispose()
    # A new process (a fresh engine) sees the same current schema.
    engine = make_engine(catalog_url)
    try:
        assert schema_is_current(engine)
    finally:
        engine.dispose()


# -- ingest ---------------------------------------------------------------------------

def test_store_end_to_end(env: Env) -> None:
    m = make_instance(env.tmp / "in" / "1.dcm", size=5000, patient_id="PAT-1")
    r = env.ingest.store(req(m))
    assert r.outcome is Outcome.STORED and r.acknowledged
    assert r.missing_sites == [] and not r.conflict

    (inst,) = env.rows(select(Instance))
    inst = inst[0]
    assert (inst.sop_uid, inst.version, inst.conflict) == (m.sop_uid, 1, False)
    assert inst.sop_class == m.sop_class and inst.transfer_syntax == m.transfer_syntax
    assert inst.calling_ae == "STORESCU" and inst.received_at is not None
    copies = [c for (c,) in env.rows(select(Copy).order_by(Copy.location))]
    key = instance_key(m.study_uid, m.sop_uid)
    assert [(c.location, c.key, c.state) for c in copies] == [
        ("site-a", key, "ok"), ("site-b", key, "ok")]
    assert all(c.verified_at is not None for c in copies)
    for root in env.sites.values():
        stored = root / key
        assert stored.stat().st_size == inst.size
        assert sha256_file(stored) == inst.sha256
        # pacsvault's own meta, then the data set bytes exactly as received.
        assert stored.read_bytes().endswith(dataset_bytes(m.path))
    (study,) = env.rows(select(Study))
    (series,) = env.rows(select(Series))
    (patient,) = env.rows(select(Patient))
    assert study[0].study_uid == m.study_uid and series[0].series_uid == m.series_uid
    assert series[0].study_fk == study[0].id == inst.study_fk and inst.series_fk == series[0].id
    assert patient[0].patient_id == "PAT-1" and study[0].patient_fk == patient[0].id
    assert (study[0].study_date, series[0].modality) == ("20240102", "CT")
    a = audit(env.url, env.sites)
    assert a.instances == 1 and a.ok_copies == 2 and not a.bad and not a.temp_files


def test_identical_bytes_again_is_a_duplicate_without_a_row(env: Env) -> None:
    m = make_instance(env.tmp / "in" / "1.dcm", size=3000)
    assert env.ingest.store(req(m)).outcome is Outcome.STORED
    for ae in ("STORESCU", "OTHERPEER"):  # the meta is ours: any sender hashes the same
        r = env.ingest.store(req(m, ae))
        assert r.outcome is Outcome.DUPLICATE and r.acknowledged
    assert env.count(Instance) == 1 and env.count(Copy) == 2
    assert len(list(env.a.root.rglob("*.dcm"))) == 1


def test_same_sop_uid_different_bytes_becomes_a_second_version(env: Env) -> None:
    m1 = make_instance(env.tmp / "in" / "1.dcm", size=3000)
    assert env.ingest.store(req(m1)).outcome is Outcome.STORED
    key1 = instance_key(m1.study_uid, m1.sop_uid)
    before = {n: sha256_file(root / key1) for n, root in env.sites.items()}
    mtime = (env.a.root / key1).stat().st_mtime_ns

    m2 = make_instance(env.tmp / "in" / "2.dcm", size=3000, study_uid=m1.study_uid,
                       series_uid=m1.series_uid, sop_uid=m1.sop_uid)
    r = env.ingest.store(req(m2))
    assert r.outcome is Outcome.STORED and r.conflict

    rows = [i for (i,) in env.rows(select(Instance).order_by(Instance.version))]
    assert [(i.version, i.conflict) for i in rows] == [(1, False), (2, True)]
    assert rows[0].sha256 != rows[1].sha256
    keys = {c.instance_fk: c.key for (c,) in env.rows(select(Copy))}
    assert keys[rows[0].id] == key1
    assert keys[rows[1].id] != key1
    assert keys[rows[1].id] == instance_key(m1.study_uid, m1.sop_uid, rows[1].sha256)
    # The first file is untouched on both sites.
    assert {n: sha256_file(root / key1) for n, root in env.sites.items()} == before
    assert (env.a.root / key1).stat().st_mtime_ns == mtime
    with env.catalog.unit() as uow:
        assert sorted(repo.versions_of(uow.session, m1.sop_uid)) == [
            (1, rows[0].sha256), (2, rows[1].sha256)]
    # Either version sent again is a duplicate.
    assert env.ingest.store(req(m1)).outcome is Outcome.DUPLICATE
    assert env.ingest.store(req(m2)).outcome is Outcome.DUPLICATE
    assert env.count(Instance) == 2 and env.count(Study) == 1 and env.count(Series) == 1
    a = audit(env.url, env.sites)
    assert a.ok_copies == 4 and not a.bad


# Values PostgreSQL refuses (NUL) or that overflow a VARCHAR, and names in the
# character sets real archives receive. Each must be stored, not refused.
ODD = {
    "nul": {"PatientName": "Test\x00^Nul\x00", "PatientID": "ID\x00\x00X",
            "StudyDescription": "a\x00b", "AccessionNumber": "A\x00C"},
    "over_long": {"PatientName": "A" * 400, "PatientID": "P" * 100, "IssuerOfPatientID": "I" * 90,
                  "StudyDescription": "D" * 200, "AccessionNumber": "9" * 40,
                  "PatientSex": "UNKNOWNSEXVALUE123", "StudyTime": "101500.123456789012",
                  "Modality": "MODALITYTOOLONG123", "SeriesNumber": "1234567890123"},
    "utf8": {"SpecificCharacterSet": "ISO_IR 192",
             "PatientName": "Müller^Jürgen=山田^太郎", "StudyDescription": "Ångström \U0001F600"},
    "latin1": {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Buc^Jérôme"},
    "greek": {"SpecificCharacterSet": "ISO_IR 126", "PatientName": "Διονυσιος"},
    "japanese": {"SpecificCharacterSet": ["", "ISO 2022 IR 87"],
                 "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
    "chinese": {"SpecificCharacterSet": "GB18030", "PatientName": "Wang^XiaoDong=王^小东"},
    "bad_utf8": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": b"Bad\xff\xfe^Bytes\xc3"},
    "controls": {"PatientName": "Tab\tNew\nLine\x1b[31m", "PatientID": "\x7f\x01"},
    "long_non_ascii": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "é" * 400,
                       "StudyDescription": "字" * 100},
}


@pytest.mark.filterwarnings("ignore")  # pydicom warns about the over-long values we write
@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_strings_are_stored(env: Env, case: str) -> None:
    m = make_instance(env.tmp / "in" / f"{case}.dcm", size=2000, raw_overrides=ODD[case])
    expect = read_attributes(m.path)  # the normalized values (NULs dropped, cut to width)
    r = env.ingest.store(req(m))
    assert r.outcome is Outcome.STORED, r.reason
    ((p, st, se),) = env.rows(
        select(Patient, Study, Series).join(Study, Study.patient_fk == Patient.id)
        .join(Series, Series.study_fk == Study.id))
    assert (p.patient_id, p.issuer, p.name, p.sex) == (
        expect.patient_id, expect.issuer, expect.patient_name, expect.sex)
    assert (st.description, st.accession, st.study_time) == (
        expect.study_description, expect.accession, expect.study_time)
    assert (se.modality, se.series_number) == (expect.modality, expect.series_number)
    for value in (p.patient_id, p.name, st.description, st.accession):
        assert "\x00" not in value
    assert len(p.name) <= 324 and len(p.patient_id) <= 64 and len(st.description) <= 64
    # The same object again is recognized as such (the lookups work on these rows too).
    assert env.ingest.store(req(m)).outcome is Outcome.DUPLICATE


def _failing_commit(self: RawTx) -> None:
    """A catalog that fails at COMMIT (disk full, I/O error, lost connection)."""
    raise sqlite3.OperationalError("injected: database or disk is full")


def test_catalog_failure_at_commit_is_not_acknowledged(env: Env, monkeypatch) -> None:  # noqa: ANN001
    m = make_instance(env.tmp / "in" / "1.dcm", size=2000)
    real = RawTx.commit
    monkeypatch.setattr(RawTx, "commit", _failing_commit)
    r = env.ingest.store(req(m))
    assert r.outcome is Outcome.CATALOG_DOWN and not r.acknowledged
    monkeypatch.setattr(RawTx, "commit", real)
    assert env.count(Instance) == env.count(Study) == env.count(Patient) == 0
    # The peer retries; the copies already on the sites are reused.
    assert env.ingest.store(req(m)).outcome is Outcome.STORED
    assert env.count(Instance) == 1 and env.count(Copy) == 2


def test_cached_parent_ids_do_not_outlive_a_rolled_back_commit(env: Env, monkeypatch,  # noqa: ANN001
                                                               request) -> None:  # noqa: ANN001
    """Ingest caches study/series ids while the transaction that inserted them is
    still open. If that transaction rolls back, SQLite hands the same ids to the
    next new study (INTEGER PRIMARY KEY reuses max(rowid)+1), and the next object
    of the first study is filed under the other patient's study."""
    x1 = make_instance(env.tmp / "in" / "x1.dcm", size=2000, patient_id="PAT-X")
    x2 = make_instance(env.tmp / "in" / "x2.dcm", size=2000, patient_id="PAT-X",
                       study_uid=x1.study_uid, series_uid=x1.series_uid)
    y1 = make_instance(env.tmp / "in" / "y1.dcm", size=2000, patient_id="PAT-Y")
    real = RawTx.commit
    monkeypatch.setattr(RawTx, "commit", _failing_commit)
    assert env.ingest.store(req(x1)).outcome is Outcome.CATALOG_DOWN
    monkeypatch.setattr(RawTx, "commit", real)
    assert env.ingest.store(req(y1)).outcome is Outcome.STORED
    assert env.ingest.store(req(x2)).outcome is Outcome.STORED
    rows = env.rows(
        select(Instance.sop_uid, Study.study_uid, Series.series_uid, Patient.patient_id)
        .join(Study, Study.id == Instance.study_fk).join(Series, Series.id == Instance.series_fk)
        .join(Patient, Patient.id == Study.patient_fk))
    filed = {sop: (study, series, pat) for sop, study, series, pat in rows}
    assert filed[y1.sop_uid] == (y1.study_uid, y1.series_uid, "PAT-Y")
    assert filed[x2.sop_uid] == (x1.study_uid, x1.series_uid, "PAT-X")


# -- concurrency ----------------------------------------------------------------------

def _race(n: int, fn) -> list:  # noqa: ANN001
    barrier = threading.Barrier(n)
    out: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a storing thread hung"
    assert not errors, errors
    return out


def test_eight_threads_store_the_same_new_object(env: Env) -> None:
    m = make_instance(env.tmp / "in" / "same.dcm", size=4000)
    results = _race(8, lambda i: env.ingest.store(req(m)))
    assert all(r.acknowledged for r in results), [(r.outcome, r.reason) for r in results]
    assert sorted(r.outcome.value for r in results) == ["duplicate"] * 7 + ["stored"]
    assert env.count(Instance) == 1 and env.count(Copy) == 2
    assert env.count(Study) == env.count(Series) == env.count(Patient) == 1
    a = audit(env.url, env.sites)
    assert a.ok_copies == 2 and not a.bad and not a.temp_files
    assert len(list(env.b.root.rglob("*.dcm"))) == 1


@pytest.mark.parametrize("series_per_object", [False, True], ids=["one-series", "eight-series"])
def test_eight_threads_store_a_new_study(env: Env, series_per_object: bool) -> None:
    first = make_instance(env.tmp / "in" / "0.dcm", size=3000, patient_id="PAT-RACE")
    made = [first] + [
        make_instance(env.tmp / "in" / f"{i}.dcm", size=3000, patient_id="PAT-RACE",
                      study_uid=first.study_uid,
                      series_uid=None if series_per_object else first.series_uid)
        for i in range(1, 8)]
    results = _race(8, lambda i: env.ingest.store(req(made[i])))
    assert [r.outcome for r in results] == [Outcome.STORED] * 8, [r.reason for r in results]
    assert env.count(Instance) == 8 and env.count(Copy) == 16
    assert env.count(Study) == 1 and env.count(Patient) == 1
    assert env.count(Series) == (8 if series_per_object else 1)
    (study_id,) = env.rows(select(Study.id))[0]
    assert {fk for (fk,) in env.rows(select(Instance.study_fk))} == {study_id}
    assert {fk for (fk,) in env.rows(select(Series.study_fk))} == {study_id}
    a = audit(env.url, env.sites)
    assert a.ok_copies == 16 and not a.bad and not a.temp_files


# -- replication debt: the repair queue, counts, status ------------------------------

def test_under_replicated_is_oldest_first_and_repair_fixes_it(env: Env) -> None:
    made = [make_instance(env.tmp / "in" / f"{i}.dcm", size=1500 + i) for i in range(6)]
    for m in made:
        assert env.ingest.store(req(m)).outcome is Outcome.STORED
    ids = [i for (i,) in env.rows(select(Instance.id).order_by(Instance.id))]
    # A scrub finds site-b's copies gone, in no particular order; separate updates
    # also scatter the rows physically (PostgreSQL appends an updated row).
    with env.catalog.unit() as uow:
        for idx in (4, 1, 5, 2):
            uow.session.execute(update(Copy).where(Copy.instance_fk == ids[idx],
                                                   Copy.location == "site-b")
                                .values(state="missing", verified_at=None))
            uow.session.flush()
        uow.session.execute(update(Copy).where(Copy.instance_fk == ids[0],
                                               Copy.location == "site-b").values(state="corrupt"))
        uow.commit()
    for idx in (4, 1, 5, 2):
        (env.b.root / instance_key(made[idx].study_uid, made[idx].sop_uid)).unlink()
    with env.catalog.unit() as uow:
        queue = repo.under_replicated(uow.session, "site-b", 100)
        assert [c.instance_fk for c in queue] == [ids[1], ids[2], ids[4], ids[5]]
        assert [c.id for c in queue] == sorted(c.id for c in queue)
        assert [c.instance_fk for c in repo.under_replicated(uow.session, "site-b", 2)] == [
            ids[1], ids[2]]
        assert repo.under_replicated(uow.session, "site-a", 100) == []
        assert {c.location for c in repo.good_copies(uow.session, ids[1])} == {"site-a"}

    report = repair_missing(env.catalog, [env.a, env.b], env.tmp / "scratch")
    assert (report.repaired, report.failed, report.no_source) == (4, 0, 0)
    assert report.sites == {"site-b": 4}
    with env.catalog.unit() as uow:
        assert repo.under_replicated(uow.session, "site-b", 100) == []
        states = dict(uow.session.execute(
            select(Copy.instance_fk, Copy.state).where(Copy.location == "site-b")).all())
    assert states == {ids[0]: "corrupt", **{ids[i]: "ok" for i in range(1, 6)}}
    a = audit(env.url, env.sites)
    assert not a.bad and a.missing_copies == 0 and not a.temp_files


def test_site_down_at_ingest_then_repaired(env: Env) -> None:
    env.b.down = True
    made = [make_instance(env.tmp / "in" / f"{i}.dcm", size=1200) for i in range(3)]
    for m in made:
        r = env.ingest.store(req(m))
        assert r.outcome is Outcome.STORED and r.missing_sites == ["site-b"]
    with env.catalog.unit() as uow:
        queue = repo.under_replicated(uow.session, "site-b", 10)
        assert len(queue) == 3 and [c.id for c in queue] == sorted(c.id for c in queue)
        assert repo.oldest_missing(uow.session) is not None
    env.b.down = False
    report = repair_missing(env.catalog, [env.a, env.b], env.tmp / "scratch")
    assert report.repaired == 3
    a = audit(env.url, env.sites)
    assert a.ok_copies == 6 and a.missing_copies == 0 and not a.bad
    with env.catalog.unit() as uow:
        assert repo.oldest_missing(uow.session) is None


def test_counts_by_location_and_status(env: Env) -> None:
    both = [make_instance(env.tmp / "in" / f"b{i}.dcm", size=1000 * (i + 1)) for i in range(3)]
    one = [make_instance(env.tmp / "in" / f"o{i}.dcm", size=700, study_uid=both[0].study_uid)
           for i in range(2)]
    for m in both:
        assert env.ingest.store(req(m)).outcome is Outcome.STORED
    env.b.down = True
    for m in one:
        assert env.ingest.store(req(m)).missing_sites == ["site-b"]
    sizes = dict(env.rows(select(Instance.sop_uid, Instance.size)))
    all_bytes = sum(sizes.values())
    both_bytes = sum(sizes[m.sop_uid] for m in both)
    with env.catalog.unit() as uow:
        counts = repo.counts_by_location(uow.session)
        by_study = repo.studies_by_location(uow.session)
    assert counts == {"site-a": {"ok": 5, "bytes_ok": all_bytes},
                      "site-b": {"ok": 3, "bytes_ok": both_bytes, "missing": 2}}
    assert by_study == {"site-a": 3, "site-b": 3}

    settings = Settings(catalog=CatalogSettings(url=env.url), sites=(
        SiteSettings(name="site-a", path=env.a.root), SiteSettings(name="site-b", path=env.b.root)))
    later = lambda: datetime.now(timezone.utc) + timedelta(hours=1)  # noqa: E731
    st = collect(settings, env.catalog, [env.a, env.b], clock=later)
    assert (st["instances"], st["studies"], st["bytes"], st["conflicts"]) == (5, 3, all_bytes, 0)
    assert st["under_replicated"] == 2 and st["healthy"] is False
    assert 3500 < st["oldest_under_replicated_age_s"] < 3700
    assert st["catalog"] == env.url.split("://", 1)[0]
    rows = {s["name"]: s for s in st["sites"]}
    assert (rows["site-a"]["objects"], rows["site-a"]["missing"], rows["site-a"]["bytes"]) == (
        5, 0, all_bytes)
    assert (rows["site-b"]["objects"], rows["site-b"]["missing"], rows["site-b"]["studies"]) == (
        3, 2, 3)

    env.b.down = False
    repair_missing(env.catalog, [env.a, env.b], env.tmp / "scratch")
    tier = FilesystemBackend("objects", env.tmp / "objects")
    assert collect(settings, env.catalog, [env.a, env.b])["healthy"] is False  # no object tier
    tier.initialize()
    st = collect(settings, env.catalog, [env.a, env.b], tier=tier)
    assert st["under_replicated"] == 0 and st["oldest_under_replicated_age_s"] is None
    assert st["healthy"] is True and st["object_tier"]["healthy"] is True


def test_counts_on_an_empty_catalog(env: Env) -> None:
    with env.catalog.unit() as uow:
        assert repo.counts_by_location(uow.session) == {}
        assert repo.studies_by_location(uow.session) == {}
        assert repo.oldest_missing(uow.session) is None
        assert repo.versions_of(uow.session, "1.2.3") == []
        assert repo.under_replicated(uow.session, "site-a", 10) == []


# -- peers ----------------------------------------------------------------------------

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_peers_add_list_remove_and_check(env: Env) -> None:
    add_peer(env.catalog, "STORESCU", "127.0.0.1", None, NOW)
    add_peer(env.catalog, "STORESCU", "127.0.0.1", 11113, NOW)  # update, not a second row
    add_peer(env.catalog, " MODALITY1 ", "10.1.2.3", 104, NOW)
    add_peer(env.catalog, "MODALITY1", "localhost", None, NOW)
    peers = list_peers(env.catalog)
    assert [(p.ae_title, p.host, p.port) for p in peers] == [
        ("MODALITY1", "10.1.2.3", 104), ("MODALITY1", "localhost", None),
        ("STORESCU", "127.0.0.1", 11113)]

    reg = PeerRegistry(env.catalog, allow_any=False, ttl_s=0)
    assert reg.check("STORESCU", "127.0.0.1")[0]
    assert reg.check("STORESCU", "::ffff:127.0.0.1")[0]
    ok, why = reg.check("STORESCU", "10.9.9.9")
    assert not ok and "not allowed from 10.9.9.9" in why
    ok, why = reg.check("STRANGER", "127.0.0.1")
    assert not ok and "not a known peer" in why
    assert reg.check("MODALITY1", "10.1.2.3")[0]
    assert reg.check("MODALITY1", "127.0.0.1")[0]  # localhost resolved at load
    assert PeerRegistry(env.catalog, allow_any=True).check("ANYONE", "192.0.2.1")[0]

    assert remove_peer(env.catalog, "MODALITY1", "10.1.2.3") == 1
    assert remove_peer(env.catalog, "MODALITY1", "10.1.2.3") == 0
    assert not reg.check("MODALITY1", "10.1.2.3")[0]
    assert remove_peer(env.catalog, "MODALITY1", None) == 1
    assert remove_peer(env.catalog, "STORESCU", None) == 1
    assert list_peers(env.catalog) == []
    assert not reg.check("STORESCU", "127.0.0.1")[0]
    for bad_ae in ("", "A" * 17, "BACK\\SLASH", "NUL\x00AE", "ÄÖÜ"):
        with pytest.raises(InvalidInput):
            add_peer(env.catalog, bad_ae, "127.0.0.1", None, NOW)
    for bad_port in (0, 65536):
        with pytest.raises(InvalidInput):
            add_peer(env.catalog, "STORESCU", "127.0.0.1", bad_port, NOW)


HOSTS = {
    "nul": "10.0.0.1\x00evil",
    "control": "host\x07name",
    "non_ascii": "bücher.example",
    "long_label": "h" * 64 + ".example",
    "max_len": ".".join(["h" * 63] * 4),
    "too_long": "h" * 256,
    "space": "two words",
    "padded": "  10.0.0.2\t",
}
# (case, dialect or None for every dialect): known bugs, fixes proposed in the report.


@pytest.mark.parametrize("case", sorted(HOSTS))
def test_peer_host_is_refused_or_stored_exactly(env: Env, case: str, request) -> None:  # noqa: ANN001
    """A host is either refused as invalid input or stored and listed as given
    (stripped), never a database error that differs between backends; and a row
    the daemon cannot resolve never stops the allow-list from being reloaded."""
    add_peer(env.catalog, "GOOD", "127.0.0.1", None, NOW)
    reg = PeerRegistry(env.catalog, allow_any=False, ttl_s=0)
    assert reg.check("GOOD", "127.0.0.1")[0]
    host = HOSTS[case]
    try:
        add_peer(env.catalog, "PEER", host, None, NOW)
        stored = True
    except InvalidInput:
        stored = False
    listed = [p.host for p in list_peers(env.catalog) if p.ae_title == "PEER"]
    assert listed == ([host.strip()] if stored else [])
    # Changes to the list still reach a running registry, and a new one loads.
    assert remove_peer(env.catalog, "GOOD", None) == 1
    assert not reg.check("GOOD", "127.0.0.1")[0], "allow-list no longer refreshes"
    add_peer(env.catalog, "OTHER", "127.0.0.1", None, NOW)
    assert PeerRegistry(env.catalog, allow_any=False, ttl_s=0).check("OTHER", "127.0.0.1")[0]
    if stored:
        assert remove_peer(env.catalog, "PEER", host) == 1


def test_sha256_column_holds_what_the_sites_hold(env: Env) -> None:
    """The catalog SHA-256 is the hash of the Part 10 file on the site (lowercase hex)."""
    m = make_instance(env.tmp / "in" / "1.dcm", size=2222)
    env.ingest.store(req(m))
    ((sha, size),) = env.rows(select(Instance.sha256, Instance.size))
    data = (env.a.root / instance_key(m.study_uid, m.sop_uid)).read_bytes()
    assert sha == hashlib.sha256(data).hexdigest() and size == len(data)
