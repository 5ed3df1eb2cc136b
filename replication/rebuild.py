"""Site rebuild: refill an empty or replaced online site, then prove it.

1. The site must carry its marker file. A replaced disk has none, but neither
   has an unmounted mount point, and filling that would fill the root disk: the
   marker is written only when the operator says so (``initialize=True``).
2. Instances with a verified copy on another online site but no copy row for
   this site (a site added to the config) get one, in state 'missing'.
3. Every copy the catalog expects here (ok, missing, corrupt; oldest first) is
   looked at: a file with the right size is left for step 4; an absent or
   wrong-sized one is rewritten from a copy that verifies now (the mirror, else
   the instance's frame in a verified study bundle on the object tier) by
   ``threads`` workers, through the site's verified write.
4. Final verification: a full scrub of the site re-reads and hashes every copy
   (repairing what step 3 left, e.g. same-sized bit rot) and gives the count.

Copies in state 'purged' stay purged: their studies live on the object tier
for both sites, and `pacsvault recall` brings a study back to every site.
The catalog SHA-256 is never changed here.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import and_, exists, func, insert, select
from sqlalchemy.orm import aliased

from archive import phi
from archive.catalog.models import Copy, Instance, Study
from archive.catalog.uow import Catalog
from archive.errors import InvalidInput
from replication.scrub import STATES, Scrubber
from tiers.backend import Backend, BackendError, ObjectNotFound, TempSweeper

log = logging.getLogger("pacsvault.rebuild")

BATCH = 512


@dataclass
class RebuildReport:
    site: str
    initialized: bool = False
    rows_added: int = 0
    expected: int = 0
    present: int = 0
    restored: dict[str, int] = field(default_factory=dict)     # source -> copies
    bytes_restored: int = 0
    unrecoverable: list[dict[str, str]] = field(default_factory=list)
    verified: int = 0
    verified_bytes: int = 0
    verification_run: int | None = None
    verification_findings: int = 0
    seconds: float = 0.0
    verify_seconds: float = 0.0
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return (not self.stopped and not self.unrecoverable and self.verified == self.expected)

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site, "ok": self.ok, "initialized": self.initialized,
            "rows_added": self.rows_added, "expected": self.expected,
            "already_present": self.present, "restored": self.restored,
            "restored_total": sum(self.restored.values()), "bytes_restored": self.bytes_restored,
            "mb_per_s": round(self.bytes_restored / 1e6 / self.seconds, 1) if self.seconds else None,
            "unrecoverable": self.unrecoverable, "verified": self.verified,
            "verified_bytes": self.verified_bytes, "verification_scrub_run": self.verification_run,
            "verification_findings": self.verification_findings,
            "seconds": round(self.seconds, 3), "verify_seconds": round(self.verify_seconds, 3),
            "stopped": self.stopped,
        }


class SiteRebuilder:
    def __init__(self, catalog: Catalog, scrubber: Scrubber, site: Backend, *,
                 threads: int = 4, stop: threading.Event | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.catalog = catalog
        self.scrubber = scrubber
        self.site = site
        self.others = [n for n in scrubber.sites if n != site.name]
        self.threads = threads
        self.stop = stop or threading.Event()
        self.progress = progress or (lambda n: None)
        self._lock = threading.Lock()

    def expected(self) -> int:
        """Copies the site should hold once rebuilt (after ``add_missing_rows``)."""
        with self.catalog.unit() as uow:
            return uow.session.scalar(select(func.count()).select_from(Copy).where(
                Copy.location == self.site.name, Copy.state.in_(STATES))) or 0

    def prepare(self, initialize: bool, report: RebuildReport) -> None:
        health = self.site.health()
        if not health.ok:
            if not initialize or "missing" not in health.reason:
                raise InvalidInput(
                    f"site {self.site.name} is not usable: {health.reason}. If this is the "
                    f"new, mounted disk for it, run again with --initialize" if "missing" in
                    health.reason else f"site {self.site.name} is not usable: {health.reason}")
            self.site.initialize()                       # type: ignore[attr-defined]
            report.initialized = True
            log.warning("site %s initialized for a rebuild", self.site.name)
        if isinstance(self.site, TempSweeper):
            self.site.sweep_temp()      # temp files of a rebuild that was killed
        report.rows_added = self.add_missing_rows()

    def add_missing_rows(self) -> int:
        """A 'missing' copy row here for every instance verified on another site only."""
        here = aliased(Copy)
        mine = select(here.id).where(here.instance_fk == Instance.id,
                                     here.location == self.site.name)
        with self.catalog.unit(write=True) as uow:
            rows = uow.session.execute(
                select(Instance.id, func.min(Copy.key))
                .join(Copy, and_(Copy.instance_fk == Instance.id,
                                 Copy.location.in_(self.others), Copy.state == "ok"))
                .where(~exists(mine)).group_by(Instance.id)).all()
            for i in range(0, len(rows), 1000):
                uow.session.execute(insert(Copy), [
                    {"instance_fk": fk, "location": self.site.name, "key": key,
                     "state": "missing"} for fk, key in rows[i:i + 1000]])
            uow.commit()
        return len(rows)

    def refill(self, report: RebuildReport) -> None:
        after = 0
        with ThreadPoolExecutor(self.threads, thread_name_prefix="rebuild") as pool:
            while not self.stop.is_set():
                with self.catalog.unit() as uow:
                    rows = list(uow.session.execute(
                        select(Copy.id, Copy.instance_fk, Copy.key, Instance.size,
                               Instance.sha256)
                        .join(Instance, Instance.id == Copy.instance_fk)
                        .where(Copy.location == self.site.name, Copy.state.in_(STATES),
                               Copy.id > after).order_by(Copy.id).limit(BATCH)))
                if not rows:
                    return
                list(pool.map(lambda r: self._one(r, report), rows))
                after = rows[-1].id
                self.progress(len(rows))
                if not self.site.health().ok:
                    raise BackendError("rebuild", self.site.name,
                                       f"became unusable: {self.site.health().reason}")
            report.stopped = True

    def _one(self, row: Any, report: RebuildReport) -> None:
        try:
            if self.site.stat(row.key).size == row.size:
                with self._lock:
                    report.present += 1       # hashed in the verification pass
                return
        except ObjectNotFound:
            pass
        source = self.scrubber.repair_copy(self.site, row)
        with self._lock:
            if source is None:
                report.unrecoverable.append(self._name(row))
            else:
                report.restored[source] = report.restored.get(source, 0) + 1
                report.bytes_restored += row.size

    def _name(self, row: Any) -> dict[str, str]:
        with self.catalog.unit() as uow:
            sop, study = uow.session.execute(
                select(Instance.sop_uid, Study.study_uid).join(Study, Study.id == Instance.study_fk)
                .where(Instance.id == row.instance_fk)).one()
        log.error("rebuild of %s: object %s has no verified copy anywhere",
                  self.site.name, phi.token(sop))
        return {"sop_uid": sop, "study_uid": study}

    def verify(self, report: RebuildReport) -> None:
        scrub = self.scrubber.run([self.site.name])
        j = scrub.to_json()
        report.verification_run = j["run_id"]
        report.verification_findings = j["damaged"]
        bad = {f.sop_uid for f in scrub.findings if f.kind == "unrecoverable"}
        report.verified = j["objects"] - len(bad) if not scrub.skipped_sites else 0
        report.verified_bytes = j["bytes"]
        known = {u["sop_uid"] for u in report.unrecoverable}
        report.unrecoverable += [{"sop_uid": f.sop_uid, "study_uid": f.study_uid}
                                 for f in scrub.findings
                                 if f.kind == "unrecoverable" and f.sop_uid not in known]
        report.stopped = report.stopped or self.stop.is_set()

    def run(self, *, initialize: bool = False,
            phase: Callable[[str, int], Callable[[int], None]] | None = None) -> RebuildReport:
        """``phase(label, total)`` is told when each pass starts and returns its
        progress callback (the CLI's progress bars)."""
        phase = phase or (lambda label, total: (lambda n: None))
        t0 = time.monotonic()
        report = RebuildReport(self.site.name)
        self.prepare(initialize, report)
        report.expected = self.expected()
        self.progress = phase(f"refilling {self.site.name}", report.expected)
        self.refill(report)
        report.seconds = time.monotonic() - t0
        if not report.stopped:
            t1 = time.monotonic()
            self.scrubber.progress = phase(f"verifying {self.site.name}", report.expected)
            self.verify(report)
            report.verify_seconds = time.monotonic() - t1
        return report
