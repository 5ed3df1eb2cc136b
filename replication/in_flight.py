"""Resolve instances that ingest committed while their copies were being written.

Ingest commits an instance's row at the same time as its copies are written
(archive/app/ingest.py) and marks it in ``ingest_in_flight`` until every copy
has its outcome. A daemon killed in between leaves the mark. Here each of the
instance's copies that the row calls 'ok' is checked on its site. All there with
the instance's size and SHA-256 (a file is linked under its name only after it
was verified): the object may have been acknowledged, and the mark goes. One
absent: it was not, since an answer waits until every copy has its outcome and
a failed one is marked 'missing' before it. Its rows are deleted, as if the
crash had come before the commit; the files that did arrive are taken up again
when the sender re-sends the object (identical bytes under the same key), or
reported as orphans by a scrub if it never does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select

from archive.catalog.models import Copy, IngestInFlight, Instance
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from tiers.backend import Backend, BackendError, ObjectNotFound

log = logging.getLogger("pacsvault.repair")


@dataclass
class SettleReport:
    confirmed: int = 0        # instances whose copies were all found
    removed: int = 0          # rows of objects never acknowledged
    unreadable: int = 0       # instances left for a later pass (a site could not be asked)


def settle_in_flight(catalog: Catalog, sites: list[Backend], *, older_than_s: float,
                     clock: Clock = utcnow) -> SettleReport:
    """Resolve in-flight marks at least ``older_than_s`` old (0 when no other process
    can be writing: the daemon's start on SQLite)."""
    report = SettleReport()
    by_name = {s.name: s for s in sites}
    now = clock()
    with catalog.unit() as uow:
        todo = uow.session.execute(
            select(IngestInFlight.instance_fk, Instance.size, Instance.sha256)
            .join(Instance, IngestInFlight.instance_fk == Instance.id)
            .where(IngestInFlight.started_at <= now - timedelta(seconds=older_than_s))).all()
    for instance_fk, size, sha in todo:
        with catalog.unit() as uow:
            copies = [(c.id, c.location, c.key) for c in uow.session.scalars(
                select(Copy).where(Copy.instance_fk == instance_fk, Copy.state == "ok",
                                   Copy.bundle_fk.is_(None)))]
        found: dict[int, bool] = {}
        try:
            for copy_id, location, key in copies:
                site = by_name.get(location)
                if site is None:
                    raise BackendError("check", location, "not a configured site")
                try:
                    found[copy_id] = site.stat(key).size == size and site.sha256(key) == sha
                except ObjectNotFound:
                    found[copy_id] = False
        except BackendError as e:
            log.warning("an object in flight at a stop is left for the next pass: %s", e)
            report.unreadable += 1
            continue
        with catalog.unit(write=True) as uow:
            if uow.session.get(IngestInFlight, instance_fk) is None:
                continue                          # settled meanwhile by its own ingest
            uow.session.execute(delete(IngestInFlight)
                                .where(IngestInFlight.instance_fk == instance_fk))
            if not all(found.values()):
                uow.session.execute(delete(Copy).where(Copy.instance_fk == instance_fk))
                uow.session.execute(delete(Instance).where(Instance.id == instance_fk))
                report.removed += 1
            else:
                report.confirmed += 1
            uow.commit()
    if report.removed:
        log.warning("%d object(s) being received when the daemon stopped lacked a copy: "
                    "never acknowledged, removed from the catalog (the sender re-sends them)",
                    report.removed)
    if report.confirmed:
        log.info("%d object(s) being received at a stop were confirmed on their sites",
                 report.confirmed)
    return report
