"""Catch-up replication: copy objects that a site missed while it was down.

A copy marked 'missing' is rewritten from a copy whose catalog state is 'ok',
after re-reading that source and checking it against the catalog SHA-256 (a
repair never spreads a bad copy). The catalog checksum is never changed here.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from archive.catalog import repo
from archive.catalog.models import Copy, Instance
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from tiers.backend import Backend, BackendError
from tiers.verified_copy import copy_verified

log = logging.getLogger("pacsvault.repair")


@dataclass
class RepairReport:
    repaired: int = 0
    failed: int = 0
    no_source: int = 0
    sites: dict[str, int] = field(default_factory=dict)


def repair_missing(catalog: Catalog, sites: list[Backend], scratch: Path, *,
                   batch: int = 200, clock: Clock = utcnow) -> RepairReport:
    """Repair up to ``batch`` missing copies per healthy site, oldest first."""
    report = RepairReport()
    by_name = {s.name: s for s in sites}
    for target in sites:
        if not target.health().ok:
            continue
        with catalog.unit() as uow:
            todo = [(c.id, c.instance_fk, c.key) for c in
                    repo.under_replicated(uow.session, target.name, batch)]
        for copy_id, instance_fk, key in todo:
            with catalog.unit() as uow:
                sha = uow.session.scalar(select(Instance.sha256).where(Instance.id == instance_fk))
                sources = [(c.location, c.key) for c in repo.good_copies(uow.session, instance_fk)
                           if c.location in by_name and c.location != target.name]
            done = False
            for src_name, src_key in sources:
                try:
                    spooled = copy_verified(functools.partial(by_name[src_name].open, src_key), sha,
                                            scratch)
                except BackendError as e:
                    log.warning("repair source %s unreadable: %s", src_name, e)
                    continue
                if spooled is None:
                    log.error("repair source copy on %s does not match the catalog "
                              "(instance id %d); not used", src_name, instance_fk)
                    continue
                try:
                    target.put(key, spooled, replace=True)
                except BackendError as e:
                    log.warning("repair to %s failed: %s", target.name, e)
                    report.failed += 1
                    spooled.path.unlink(missing_ok=True)
                    break
                spooled.path.unlink(missing_ok=True)
                with catalog.unit() as uow:
                    c = uow.session.get(Copy, copy_id)
                    c.state, c.verified_at = "ok", clock()
                    uow.commit()
                report.repaired += 1
                report.sites[target.name] = report.sites.get(target.name, 0) + 1
                done = True
                break
            else:
                if not sources:
                    report.no_source += 1
            if not done and target.health().ok is False:
                break
    if report.repaired:
        log.warning("repaired %d under-replicated copies (%s)", report.repaired,
                    ", ".join(f"{k}: {v}" for k, v in report.sites.items()))
    return report
