"""A Series Instance UID reused across studies, on every catalog backend: each study
keeps its own series row (objects stay filed under the study they were sent in),
both rows are flagged, and a catalog written by the old schema (one row per series
UID) is repaired by the migration."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import select, text

from archive.app.ingest import Outcome
from archive.catalog.engine import (
    _alembic_config,
    make_engine,
    schema_is_current,
    upgrade,
)
from archive.catalog.models import Instance, Series, Study
from tests.conformance.test_catalog import Env, env, req  # noqa: F401 - the shared fixture
from tests.support.dataset import make_instance

pytestmark = pytest.mark.timeout(180)
SHARED = "1.2.826.0.1.3680043.8.498.77.1"


def filed(e: Env) -> dict[str, tuple[str, str, bool]]:
    """SOP UID -> (study UID of the instance's series row, series UID, uid_reused)."""
    rows = e.rows(select(Instance.sop_uid, Study.study_uid, Series.series_uid, Series.uid_reused)
                  .join(Series, Series.id == Instance.series_fk)
                  .join(Study, Study.id == Series.study_fk))
    return {sop: (study, series, bool(reused)) for sop, study, series, reused in rows}


def test_a_series_uid_reused_by_another_study_is_filed_under_the_study_sent(env: Env) -> None:
    a1 = make_instance(env.tmp / "in" / "a1.dcm", size=2000, series_uid=SHARED, patient_id="PA")
    b1 = make_instance(env.tmp / "in" / "b1.dcm", size=2000, series_uid=SHARED, patient_id="PB")
    a2 = make_instance(env.tmp / "in" / "a2.dcm", size=2000, series_uid=SHARED, patient_id="PA",
                       study_uid=a1.study_uid)
    for m in (a1, b1, a2):
        assert env.ingest.store(req(m)).outcome is Outcome.STORED
    got = filed(env)
    assert got[a1.sop_uid] == got[a2.sop_uid] == (a1.study_uid, SHARED, True)
    assert got[b1.sop_uid] == (b1.study_uid, SHARED, True)
    assert env.count(Series) == 2
    # A series UID used by one study only is not flagged.
    c = make_instance(env.tmp / "in" / "c.dcm", size=2000)
    assert env.ingest.store(req(c)).outcome is Outcome.STORED
    assert filed(env)[c.sop_uid] == (c.study_uid, c.series_uid, False)


def test_upgrade_refiles_what_the_old_schema_misfiled(catalog_url: str) -> None:
    """Under revision 0008 the second study's object was filed under the first
    study's series row; upgrading gives it a row of its own study, flagged."""
    engine = make_engine(catalog_url)
    try:
        command.upgrade(_alembic_config(engine), "0008")
        now = datetime(2026, 1, 1, tzinfo=timezone.utc)
        with engine.begin() as c:
            c.execute(text("INSERT INTO patients (id, patient_id, issuer, name, birth_date, sex) "
                           "VALUES (1, 'P', '', '', '', '')"))
            for sid, uid in ((1, "1.2.3.1"), (2, "1.2.3.2")):
                c.execute(text("INSERT INTO studies (id, study_uid, patient_fk, study_date, "
                               "study_time, accession, description, calling_ae, "
                               "first_received_at, last_received_at) VALUES "
                               "(:i, :u, 1, '', '', '', '', 'X', :t, :t)"),
                          {"i": sid, "u": uid, "t": now})
            c.execute(text("INSERT INTO series (series_uid, study_fk, modality, series_number) "
                           "VALUES (:s, 1, 'CT', '1')"), {"s": SHARED})
            series_fk = c.execute(text("SELECT id FROM series")).scalar_one()
            for iid, study in ((1, 1), (2, 2), (3, 2)):
                c.execute(text("INSERT INTO instances (id, sop_uid, version, series_fk, study_fk, "
                               "sop_class, transfer_syntax, size, sha256, received_at, "
                               "calling_ae, conflict) VALUES (:i, :u, 1, :se, :s, '1.2', '1.2', 1, "
                               "'x', :t, 'X', false)"),
                          {"i": iid, "u": f"1.2.4.{iid}", "se": series_fk, "s": study, "t": now})
        upgrade(engine)
        assert schema_is_current(engine)
        with engine.connect() as c:
            rows = c.execute(text(
                "SELECT i.id, s.study_fk, s.series_uid, s.modality, s.uid_reused FROM instances i "
                "JOIN series s ON s.id = i.series_fk ORDER BY i.id")).all()
        assert [(i, st, uid, mod, bool(r)) for i, st, uid, mod, r in rows] == [
            (1, 1, SHARED, "CT", True), (2, 2, SHARED, "CT", True), (3, 2, SHARED, "CT", True)]
        # The new rule holds in the database itself: one row per (study, series UID).
        with pytest.raises(Exception), engine.begin() as c:
            c.execute(text("INSERT INTO series (series_uid, study_fk, modality, series_number, "
                           "uid_reused) VALUES (:s, 2, '', '', false)"), {"s": SHARED})
    finally:
        engine.dispose()
