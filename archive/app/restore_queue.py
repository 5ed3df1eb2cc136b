"""Studies queued to come back online from DR volumes.

A retrieve (C-MOVE, C-GET, WADO-RS) that needs instances only DR volumes hold
fails at once, naming the volumes; the study is queued here so that, once the
volumes are loaded, `pacsvault restore --queued` (run by whoever holds the DR
identity: the daemon never does) brings every pending study back online. The
requestor asks again then, and is served from the sites.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import select

from archive.catalog.models import Instance, RestoreRequest, Study
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow


@dataclass
class Pending:
    study_fk: int
    study_uid: str
    barcodes: list[str]
    requested_by: str


def queue(catalog: Catalog, instance_ids: set[int], barcodes: list[str], requested_by: str,
          clock: Clock = utcnow) -> int:
    """Queue the studies of these instances (once each: a pending request gains the
    new barcodes). Returns how many studies were newly queued."""
    added = 0
    with catalog.unit(write=True) as uow:
        s = uow.session
        studies = set(s.scalars(select(Instance.study_fk).distinct()
                                .where(Instance.id.in_(list(instance_ids)[:10_000]))))
        for fk in sorted(studies):
            row = s.scalars(select(RestoreRequest).where(
                RestoreRequest.study_fk == fk, RestoreRequest.state == "pending")).first()
            if row is None:
                s.add(RestoreRequest(study_fk=fk, requested_at=clock(),
                                     requested_by=requested_by[:128],
                                     barcodes=json.dumps(sorted(barcodes)), state="pending"))
                added += 1
            else:
                row.barcodes = json.dumps(sorted(set(json.loads(row.barcodes)) | set(barcodes)))
        uow.commit()
    return added


def pending(catalog: Catalog) -> list[Pending]:
    with catalog.unit() as uow:
        rows = uow.session.execute(
            select(RestoreRequest.study_fk, Study.study_uid, RestoreRequest.barcodes,
                   RestoreRequest.requested_by)
            .join(Study, Study.id == RestoreRequest.study_fk)
            .where(RestoreRequest.state == "pending").order_by(RestoreRequest.requested_at))
        return [Pending(fk, uid, json.loads(b), who) for fk, uid, b, who in rows]


def mark_done(catalog: Catalog, study_fks: list[int], clock: Clock = utcnow) -> None:
    with catalog.unit(write=True) as uow:
        for row in uow.session.scalars(select(RestoreRequest).where(
                RestoreRequest.study_fk.in_(study_fks), RestoreRequest.state == "pending")):
            row.state, row.done_at = "done", clock()
        uow.commit()
