"""Migration 0010 on a catalog holding objects, and the backfill that fills its
columns from the online copies (archive/catalog/backfill_query.py), on SQLite and
PostgreSQL; and `pacsvault init` running that backfill on an existing install."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select, text, update

from archive.app.ingest import IngestService, Outcome, StoreRequest
from archive.catalog import backfill_query
from archive.catalog.backfill_query import BackfillReport, backfill_query_attributes
from archive.catalog.engine import _alembic_config, make_engine, upgrade
from archive.catalog.models import Copy, Instance, Patient, Series, Study
from archive.catalog.uow import Catalog
from archive.dicom import pn
from archive.dicom.attributes import read_attributes
from replication.mirror import MirrorWriter
from tests.support.daemon import run_cli
from tests.support.dataset import Made, make_instance
from tests.support.tiering import Install
from tiers.fs import FilesystemBackend

pytestmark = pytest.mark.timeout(300)

NEW_COLUMNS = {"patients": {"name_fold"},
               "studies": {"study_id", "referring_physician", "referring_physician_fold"},
               "series": {"series_description", "series_date", "series_time"},
               "instances": {"instance_number"}}


def made_objects(directory: Path) -> list[Made]:
    """Two patients; study 1 has a 3-instance CT series and an SR, study 2 one MR."""
    s1 = {"PatientName": "Müller^Jürgen", "StudyID": "S1", "ReferringPhysicianName": "Who^Doctor",
          "SeriesDescription": "AX", "SeriesDate": "20240102", "SeriesTime": "1016"}
    s2 = {"PatientName": "Other^Patient", "StudyID": "S2", "SeriesDescription": "T1"}
    first = make_instance(directory / "1.dcm", patient_id="PAT-1",
                          raw_overrides={**s1, "InstanceNumber": "1"})
    out = [first]
    out += [make_instance(directory / f"{n}.dcm", patient_id="PAT-1", study_uid=first.study_uid,
                          series_uid=first.series_uid, raw_overrides={**s1, "InstanceNumber": n})
            for n in ("2", "3")]
    out.append(make_instance(directory / "sr.dcm", kind="SR", patient_id="PAT-1",
                             study_uid=first.study_uid,
                             raw_overrides={**s1, "SeriesDescription": "Report",
                                            "InstanceNumber": "9"}))
    out.append(make_instance(directory / "mr.dcm", kind="MR", patient_id="PAT-2",
                             raw_overrides={**s2, "InstanceNumber": "4"}))
    return out


@dataclass
class Env:
    url: str
    catalog: Catalog
    sites: list[FilesystemBackend]
    made: list[Made]

    @property
    def sources(self) -> dict:
        return {s.name: (lambda c, s=s: s.open(c.key)) for s in self.sites}

    def forget(self) -> None:
        """The new columns as a catalog from before 0010 has them: NULL."""
        with self.catalog.unit(write=True) as uow:
            for model, cols in ((Patient, NEW_COLUMNS["patients"]), (Study, NEW_COLUMNS["studies"]),
                                (Series, NEW_COLUMNS["series"]),
                                (Instance, NEW_COLUMNS["instances"])):
                uow.session.execute(update(model).values({c: None for c in cols}))
            uow.commit()

    def values(self) -> dict[str, tuple]:
        """SOP UID -> what the catalog holds for it, at every level."""
        with self.catalog.unit() as uow:
            rows = uow.session.execute(
                select(Instance.sop_uid, Instance.instance_number, Series.series_description,
                       Series.series_date, Series.series_time, Study.study_id,
                       Study.referring_physician, Study.referring_physician_fold,
                       Patient.name_fold)
                .join(Series, Series.id == Instance.series_fk)
                .join(Study, Study.id == Instance.study_fk)
                .join(Patient, Patient.id == Study.patient_fk)).all()
        return {r[0]: tuple(r[1:]) for r in rows}


def expected(m: Made, *, series_from: Made | None = None) -> tuple:
    a = read_attributes(m.path)
    s = read_attributes((series_from or m).path)
    return (a.instance_number, s.series_description, s.series_date, s.series_time, a.study_id,
            a.referring_physician, a.referring_physician_fold, a.patient_name_fold)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.needs_pg)])
def env(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    engine = make_engine(url)
    upgrade(engine)
    catalog = Catalog(engine)
    sites = [FilesystemBackend(n, tmp_path / n) for n in ("site-a", "site-b")]
    for s in sites:
        s.initialize()
    mirror = MirrorWriter(sites, timeout_s=30, retry_after_s=0)
    svc = IngestService(catalog, mirror)
    made = made_objects(tmp_path / "in")
    for m in made:
        r = svc.store(StoreRequest(m.path, m.sop_class, m.sop_uid, m.transfer_syntax, "MOD"))
        assert r.outcome is Outcome.STORED, r.reason
    svc.close()
    mirror.close()
    yield Env(url, catalog, sites, made)
    catalog.close()


def test_migration_down_and_up_on_a_catalog_holding_objects(env: Env):
    engine = env.catalog.engine
    counts_before = _counts(engine)
    command.downgrade(_alembic_config(engine), "0009")
    insp = inspect(engine)
    for table, cols in NEW_COLUMNS.items():
        assert not cols & {c["name"] for c in insp.get_columns(table)}
    assert _counts(engine) == counts_before
    upgrade(engine)
    insp = inspect(engine)
    for table, cols in NEW_COLUMNS.items():
        columns = {c["name"]: c for c in insp.get_columns(table)}
        assert cols <= set(columns) and all(columns[c]["nullable"] for c in cols)
    assert ("name_fold",) in {tuple(ix["column_names"]) for ix in insp.get_indexes("patients")}
    assert ("modality", "study_fk") in {tuple(ix["column_names"])
                                        for ix in insp.get_indexes("series")}
    assert _counts(engine) == counts_before
    assert all(v == (None,) * 8 for v in env.values().values())   # rows from before: NULL
    if engine.dialect.name == "postgresql":
        # Byte order whatever the database's locale, so a name prefix uses the index.
        with engine.connect() as c:
            collations = dict(c.execute(text(
                "SELECT column_name, collation_name FROM information_schema.columns "
                "WHERE column_name IN ('name_fold', 'referring_physician_fold')")).all())
        assert collations == {"name_fold": "C", "referring_physician_fold": "C"}


def _counts(engine) -> dict[str, int]:  # noqa: ANN001
    with engine.connect() as c:
        return {t: c.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                for t in ("patients", "studies", "series", "instances", "copies")}


def test_backfill_fills_what_the_objects_hold_then_finds_nothing_to_do(env: Env, caplog):
    env.forget()
    caplog.set_level(logging.DEBUG)
    report = backfill_query_attributes(env.catalog, env.sources, batch=2)
    assert (report.instances, report.series, report.studies, report.names) == (5, 3, 2, 2)
    assert (report.unreadable, report.unread_parents) == (0, 0)
    got = env.values()
    ct_first = env.made[0]
    for m in env.made:
        # Series and study attributes are read from the first object of each.
        assert got[m.sop_uid] == expected(m, series_from=ct_first if m in env.made[:3] else m)
    assert got[ct_first.sop_uid] == ("1", "AX", "20240102", "1016", "S1", "Who^Doctor",
                                     "who^doctor", "müller^jürgen")
    assert str(BackfillReport()) in str(backfill_query_attributes(env.catalog, env.sources))
    # Nothing that names a patient or an object reaches the log.
    for m in env.made:
        assert m.sop_uid not in caplog.text and m.study_uid not in caplog.text
    for phi in ("PAT-1", "Müller", "müller", "Who^Doctor", "objects/"):
        assert phi not in caplog.text


def test_backfill_touches_only_null_rows(env: Env):
    env.forget()
    with env.catalog.unit(write=True) as uow:
        uow.session.execute(update(Series).where(Series.series_uid == env.made[0].series_uid)
                            .values(series_description="set at ingest"))
        uow.commit()
    backfill_query_attributes(env.catalog, env.sources)
    assert env.values()[env.made[0].sop_uid][1] == "set at ingest"


class Stop(Exception):
    pass


def test_an_interrupted_backfill_resumes(env: Env, monkeypatch):
    env.forget()
    reads: list[str] = []
    real = backfill_query.read_attributes

    def counting(f):  # noqa: ANN001
        reads.append("x")
        return real(f)

    monkeypatch.setattr(backfill_query, "read_attributes", counting)

    def stop(report: BackfillReport) -> None:
        raise Stop()

    with pytest.raises(Stop):
        backfill_query_attributes(env.catalog, env.sources, batch=2, progress=stop)
    assert sum(v[0] is not None for v in env.values().values()) == 2   # the first batch stayed
    report = backfill_query_attributes(env.catalog, env.sources, batch=2)
    assert report.instances == 3 and len(reads) == 5                 # nothing read twice
    assert all(None not in v for v in env.values().values())


def test_objects_without_an_online_copy_stay_null_and_are_counted(env: Env):
    env.forget()
    mr = env.made[-1]
    with env.catalog.unit(write=True) as uow:       # moved to the object tier: purged online
        uow.session.execute(update(Copy).where(Copy.instance_fk.in_(
            select(Instance.id).where(Instance.sop_uid == mr.sop_uid))).values(state="purged"))
        uow.commit()
    ct = env.made[1]
    for site in env.sites:                          # and one file lost from both sites
        for p in site.root.rglob(f"*{ct.sop_uid}*"):
            p.unlink()
    report = backfill_query_attributes(env.catalog, env.sources)
    assert (report.instances, report.unreadable) == (3, 2)
    assert report.unread_parents == 2               # the MR's series and study
    got = env.values()
    assert got[mr.sop_uid][:7] == (None,) * 7 and got[mr.sop_uid][-1] == "other^patient"
    assert got[ct.sop_uid][0] is None and got[ct.sop_uid][1] == "AX"   # its series was read


def test_a_series_numbered_at_ingest_is_read_from_one_of_its_instances(env: Env):
    """Ingest now writes the new columns; a series (or study) from before may still be
    NULL when all its instances are not: one of them is read for it."""
    backfill_query_attributes(env.catalog, env.sources)
    with env.catalog.unit(write=True) as uow:
        uow.session.execute(update(Series).values(series_description=None))
        uow.session.execute(update(Study).values(study_id=None, referring_physician=None,
                                                 referring_physician_fold=None))
        uow.commit()
    report = backfill_query_attributes(env.catalog, env.sources)
    assert (report.instances, report.series, report.studies) == (0, 3, 2)
    assert env.values()[env.made[0].sop_uid][1:8] == expected(env.made[0])[1:8]


def test_init_on_an_existing_install_fills_the_query_columns(tmp_path: Path):
    inst = Install.create(tmp_path / "pv")
    made = made_objects(tmp_path / "in")
    inst.ingest(made)
    env = Env("", inst.catalog(), [], made)
    try:
        env.forget()
        p = run_cli(inst.config, "init", "--config", str(inst.config))
        assert "query attributes filled: 5 instances, 3 series, 2 studies" in p.stdout
        assert env.values()[made[-1].sop_uid] == expected(made[-1])
        p = run_cli(inst.config, "init", "--config", str(inst.config))
        assert "query attributes" not in p.stdout            # nothing left to do
    finally:
        env.catalog.close()
    for m in made:
        assert m.sop_uid not in p.stdout + p.stderr
    assert pn.fold("Müller") not in p.stdout + p.stderr


def test_init_fills_migrated_objects_from_their_bundle_frames(tmp_path: Path):
    # Migrated with the online copies purged: only the object tier holds the objects.
    inst = Install.create(tmp_path / "pv")
    made = made_objects(tmp_path / "in")
    inst.ingest(made)
    studies = sorted({m.study_uid for m in made})
    for study in studies:
        run_cli(inst.config, "migrate", "--study", study)
    assert not inst.site_files()
    env = Env("", inst.catalog(), [], made)
    try:
        env.forget()
        p = run_cli(inst.config, "init", "--config", str(inst.config))
        assert "query attributes filled: 5 instances, 3 series, 2 studies" in p.stdout
        assert "0 instances and 0 series/studies without a readable copy" in p.stdout
        got = env.values()
        assert all(got[m.sop_uid] == expected(m) for m in made)
    finally:
        env.catalog.close()
    assert not list((inst.settings.ingest.spool_dir / "backfill").glob("*"))  # no scratch left
