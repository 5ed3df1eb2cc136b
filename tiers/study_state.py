"""One study as tiering sees it: its instances and where each has copies.

Loaded in three queries (study+patient, instances+series, copies) so that a
50,000-image study costs the same few round trips as a one-image study.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from archive.catalog.models import Bundle, Copy, Instance, Patient, Series, Study

ONLINE_STATES = ("ok", "missing", "corrupt", "purging")   # a row still naming a site file


@dataclass
class CopyRow:
    id: int
    location: str
    key: str
    state: str
    bundle_fk: int | None
    frame_offset: int | None
    frame_length: int | None


@dataclass
class InstanceRow:
    id: int
    sop_uid: str
    version: int
    series_uid: str
    sop_class: str
    transfer_syntax: str
    size: int
    sha256: str
    received_at: datetime
    calling_ae: str
    conflict: bool
    copies: dict[str, CopyRow] = field(default_factory=dict)

    def ok_at(self, location: str) -> bool:
        c = self.copies.get(location)
        return c is not None and c.state == "ok"


@dataclass
class StudyState:
    study: Study
    patient: Patient
    series: dict[str, Series]
    instances: list[InstanceRow]

    def manifest_study(self) -> dict:
        """What a bundle's manifest says about its study: enough to rebuild the
        catalog rows from the bundle alone (patient data stays inside the body)."""
        st, p = self.study, self.patient

        def t(v: datetime | None) -> str | None:
            return v.isoformat() if v is not None else None
        return {
            "study_uid": st.study_uid, "study_date": st.study_date, "study_time": st.study_time,
            "accession": st.accession, "description": st.description,
            "calling_ae": st.calling_ae, "first_received_at": t(st.first_received_at),
            "last_received_at": t(st.last_received_at),
            "patient": {"patient_id": p.patient_id, "issuer": p.issuer, "name": p.name,
                        "birth_date": p.birth_date, "sex": p.sex},
            "series": [{"series_uid": s.series_uid, "modality": s.modality,
                        "series_number": s.series_number}
                       for s in sorted(self.series.values(), key=lambda s: s.series_uid)],
        }


def load(session: Session, study_fk: int) -> StudyState:
    study, patient = session.execute(
        select(Study, Patient).join(Patient, Patient.id == Study.patient_fk)
        .where(Study.id == study_fk)).one()
    # The study's series rows, and any row its instances point at: a catalog rebuilt
    # from foreign media may still file an instance under another study's series.
    series = {s.id: s for s in session.scalars(select(Series).where(or_(
        Series.study_fk == study_fk,
        Series.id.in_(select(Instance.series_fk).where(Instance.study_fk == study_fk)))))}
    # Core rows, not ORM objects: a 50,000-image study loads in a fraction of the time.
    rows = session.execute(
        select(Instance.id, Instance.sop_uid, Instance.version, Instance.series_fk,
               Instance.sop_class, Instance.transfer_syntax, Instance.size, Instance.sha256,
               Instance.received_at, Instance.calling_ae, Instance.conflict)
        .where(Instance.study_fk == study_fk).order_by(Instance.series_fk, Instance.id))
    instances = {r.id: InstanceRow(r.id, r.sop_uid, r.version, series[r.series_fk].series_uid,
                                   r.sop_class, r.transfer_syntax, r.size, r.sha256,
                                   r.received_at, r.calling_ae, r.conflict) for r in rows}
    q = (select(Copy.id, Copy.instance_fk, Copy.location, Copy.key, Copy.state, Copy.bundle_fk,
                Copy.frame_offset, Copy.frame_length)
         .join(Instance, Instance.id == Copy.instance_fk).where(Instance.study_fk == study_fk))
    for c in session.execute(q):
        instances[c.instance_fk].copies[c.location] = CopyRow(
            c.id, c.location, c.key, c.state, c.bundle_fk, c.frame_offset, c.frame_length)
    session.expunge_all()  # plain snapshots: usable after the unit of work ends
    return StudyState(study, patient, {s.series_uid: s for s in series.values()
                                       if s.study_fk == study_fk},
                      list(instances.values()))


def bundles_of(session: Session, study_fk: int, states: tuple[str, ...]) -> list[Bundle]:
    """Detached snapshots of the study's bundles in these states, oldest first."""
    out = list(session.scalars(select(Bundle).where(Bundle.study_fk == study_fk,
                                                    Bundle.state.in_(states))
                               .order_by(Bundle.id)))
    for b in out:
        session.expunge(b)
    return out


def study_fk_of(session: Session, study_uid: str) -> int | None:
    return session.scalar(select(Study.id).where(Study.study_uid == study_uid))
