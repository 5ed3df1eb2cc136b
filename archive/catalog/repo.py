"""Catalog queries used by ingest, repair and status (SQLAlchemy 2 select())."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from archive.catalog.models import Copy, Instance, Patient, Peer, Series, Study


def _insert_ignore(session: Session, model, values: dict) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: concurrent workers may race on the same study."""
    dialect = session.get_bind().dialect.name
    mod = postgresql if dialect == "postgresql" else sqlite
    session.execute(mod.insert(model).values(**values).on_conflict_do_nothing())


def ensure_patient(session: Session, patient_id: str, issuer: str, name: str,
                   birth_date: str, sex: str) -> int:
    q = select(Patient.id).where(Patient.patient_id == patient_id, Patient.issuer == issuer)
    found = session.scalar(q)
    if found is None:
        _insert_ignore(session, Patient, dict(patient_id=patient_id, issuer=issuer, name=name,
                                              birth_date=birth_date, sex=sex))
        found = session.scalar(q)
    return found


def ensure_study(session: Session, study_uid: str, patient_fk: int, now: datetime,
                 **fields: str) -> int:
    q = select(Study.id).where(Study.study_uid == study_uid)
    found = session.scalar(q)
    if found is None:
        _insert_ignore(session, Study, dict(study_uid=study_uid, patient_fk=patient_fk,
                                            first_received_at=now, last_received_at=now,
                                            **fields))
        found = session.scalar(q)
    return found


def touch_study(session: Session, study_fk: int, now: datetime) -> None:
    session.execute(update(Study).where(Study.id == study_fk).values(last_received_at=now))


def ensure_series(session: Session, series_uid: str, study_fk: int, modality: str,
                  series_number: str) -> int:
    """The study's row for this series UID (rows are per study: a UID reused by
    another study gets a row of its own, flagged uid_reused on both)."""
    q = select(Series.id).where(Series.study_fk == study_fk, Series.series_uid == series_uid)
    found = session.scalar(q)
    if found is None:
        elsewhere = session.scalar(select(Series.id).where(
            Series.series_uid == series_uid, Series.study_fk != study_fk).limit(1)) is not None
        _insert_ignore(session, Series, dict(series_uid=series_uid, study_fk=study_fk,
                                             modality=modality, series_number=series_number,
                                             uid_reused=elsewhere))
        if elsewhere:
            session.execute(update(Series).where(Series.series_uid == series_uid)
                            .values(uid_reused=True))
        found = session.scalar(q)
    return found


def versions_of(session: Session | Connection, sop_uid: str) -> list[tuple[int, str]]:
    """(version, sha256) of every stored version of a SOP Instance UID."""
    rows = session.execute(
        select(Instance.version, Instance.sha256).where(Instance.sop_uid == sop_uid)
    )
    return [(v, s) for v, s in rows]


def under_replicated(session: Session, location: str, limit: int) -> list[Copy]:
    """Missing copies on one site, oldest first (the repair queue)."""
    q = (select(Copy).where(Copy.location == location, Copy.state == "missing")
         .order_by(Copy.id).limit(limit))
    return list(session.scalars(q))


def good_copies(session: Session, instance_fk: int) -> list[Copy]:
    q = select(Copy).where(Copy.instance_fk == instance_fk, Copy.state == "ok")
    return list(session.scalars(q))


def peers(session: Session) -> list[Peer]:
    return list(session.scalars(select(Peer).order_by(Peer.ae_title, Peer.host)))


def counts_by_location(session: Session) -> dict[str, dict[str, int]]:
    """{location: {state: count, 'bytes_ok': n}} in one pass over copies."""
    out: dict[str, dict[str, int]] = {}
    q = (select(Copy.location, Copy.state, func.count(), func.coalesce(func.sum(Instance.size), 0))
         .join(Instance, Instance.id == Copy.instance_fk)
         .group_by(Copy.location, Copy.state))
    for location, state, n, size in session.execute(q):
        d = out.setdefault(location, {})
        d[state] = int(n)
        if state == "ok":
            d["bytes_ok"] = int(size)
    return out


def studies_by_location(session: Session) -> dict[str, int]:
    q = (select(Copy.location, func.count(func.distinct(Instance.study_fk)))
         .join(Instance, Instance.id == Copy.instance_fk)
         .where(Copy.state == "ok").group_by(Copy.location))
    return {loc: int(n) for loc, n in session.execute(q)}


def oldest_missing(session: Session) -> datetime | None:
    """Received time of the oldest under-replicated object (ids grow with time, so the
    smallest missing copy id per site, found through ix_copies_missing, is enough)."""
    firsts = (select(func.min(Copy.instance_fk).label("i")).where(Copy.state == "missing")
              .group_by(Copy.location).subquery())
    q = select(func.min(Instance.received_at)).where(Instance.id.in_(select(firsts.c.i)))
    return session.scalar(q)
