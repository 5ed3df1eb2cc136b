"""Scrubs: re-read every online copy, compare with the catalog, repair from a good copy.

For each site, the catalog's copies there (state ok, corrupt or missing) are
read back from the device in copy-id order and hashed by ``threads`` workers
under a MB/s cap. A copy whose file is gone is *missing*; one whose size or
SHA-256 differs from the catalog is *corrupt*. Either is repaired from a copy
that verifies right now: the mirror on another site, else the instance's frame
in a verified study bundle on the object tier; the repaired file is read back
again before the catalog says ok. With no good copy anywhere the finding is
*unrecoverable*: the copy is marked and the study named; the catalog SHA-256 is
never changed to fit a file. Files on a site that the catalog does not know are
*orphans*: reported, deleted only when asked.

Progress (site and copy id) is saved in ``scrub_runs`` every batch, so a run
killed or stopped is resumed by the next one; every finding is a
``scrub_findings`` row. The report names every damaged object by SOP Instance
UID and study; ``ok`` is false whenever anything was found, repaired or not.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import bindparam, select, update

from archive import phi
from archive.catalog.models import Bundle, Copy, Instance, ScrubFinding, ScrubRun, Study
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.errors import describe_failure
from tiers.backend import Backend, BackendError, BulkHasher, FilePayload, ObjectNotFound
from tiers.bundle import BundleError
from tiers.verified_copy import copy_verified, frame_verified

log = logging.getLogger("pacsvault.scrub")

BATCH = 256
SLICE = 64      # copies one worker reads in a row (its read-ahead runs within a slice)
STATES = ("ok", "corrupt", "missing")


@dataclass
class Finding:
    kind: str                    # missing | corrupt | unrecoverable | orphan
    site: str
    key: str
    sop_uid: str | None = None
    study_uid: str | None = None
    repaired_from: str | None = None
    detail: str = ""


@dataclass
class ScrubReport:
    run_id: int
    sites: list[str]
    resumed: bool = False
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    skipped_sites: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings and not self.skipped_sites

    def to_json(self) -> dict[str, Any]:
        repaired = sum(1 for f in self.findings if f.repaired_from)
        return {
            "run_id": self.run_id, "sites": self.sites, "resumed": self.resumed, "ok": self.ok,
            "objects": self.objects, "bytes": self.bytes, "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.bytes / 1e6 / self.seconds, 1) if self.seconds > 0 else None,
            "damaged": sum(1 for f in self.findings if f.kind != "orphan"),
            "repaired": repaired,
            "unrecoverable": sum(1 for f in self.findings if f.kind == "unrecoverable"),
            "orphans": sum(1 for f in self.findings if f.kind == "orphan"),
            "skipped_sites": self.skipped_sites,
            "findings": [asdict(f) for f in self.findings],
        }


class _RateLimit:
    """At most ``mb_per_s`` MB/s over all threads (0: no limit)."""

    def __init__(self, mb_per_s: float) -> None:
        self.rate = mb_per_s * 1e6
        self.t0 = time.monotonic()
        self.done = 0
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            self.done += n
            ahead = self.done / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)


# The next copies to scrub at a site by copy id, with the catalog's size and SHA-256:
# one ordered index seek per state (ix_copies_location_state), merged in _copies_after.
# With ``state IN (...)`` the database would read and sort every remaining copy of the
# site for each batch, which grows with the catalog. Built once: building the
# statement costs more than running it.
_NEXT_COPIES = [
    select(Copy.id, Copy.instance_fk, Copy.key, Copy.state, Instance.size, Instance.sha256)
    .join(Instance, Instance.id == Copy.instance_fk)
    .where(Copy.location == bindparam("site"), Copy.state == state,
           Copy.id > bindparam("after"))
    .order_by(Copy.id).limit(BATCH)
    for state in STATES]


def _copies_after(session: Any, site: str, after: int) -> list[Any]:
    rows = [r for q in _NEXT_COPIES for r in session.execute(q, {"site": site, "after": after})]
    return sorted(rows, key=lambda r: r.id)[:BATCH]


def _hash(site: Backend, keys: list[str]) -> Iterator[tuple[int, str] | None | BackendError]:
    """(size, SHA-256) of each stored copy read back, in order; None if it is gone,
    the BackendError if it cannot be read."""
    if isinstance(site, BulkHasher):  # FilesystemBackend: one open per file, read-ahead
        yield from site.hash_each(keys)
        return
    for key in keys:
        try:
            yield site.stat(key).size, site.sha256(key)  # type: ignore[attr-defined]
        except ObjectNotFound:
            yield None
        except BackendError as e:
            yield e


class Scrubber:
    def __init__(self, catalog: Catalog, sites: list[Backend], tier: Backend | None, *,
                 scratch: Path, max_mb_per_s: float = 0, threads: int = 2,
                 clock: Clock = utcnow, stop: threading.Event | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.catalog = catalog
        self.sites = {s.name: s for s in sites}
        self.tier = tier
        self.scratch = scratch
        self.limit = _RateLimit(max_mb_per_s)
        self.threads = threads
        self.clock = clock
        self.stop = stop or threading.Event()
        self.progress = progress or (lambda n: None)

    # -- the run -------------------------------------------------------------------
    def run(self, site_names: list[str], *, sample: float = 1.0, seed: int | None = None,
            delete_orphans: bool = False) -> ScrubReport:
        t0 = time.monotonic()
        run, resumed = self._start(site_names, sample)
        report = ScrubReport(run.id, site_names, resumed)
        if resumed:   # the report covers the whole run, the interrupted part included
            report.objects, report.bytes = run.objects, run.bytes
            report.findings = self._earlier_findings(run.id)
        rng = random.Random(seed if seed is not None else run.id)
        started = run.cursor_site == ""
        for name in site_names:
            if not started and name != run.cursor_site:
                continue                     # finished by the interrupted run
            start_after = run.cursor_copy_id if not started else 0
            started = True
            site = self.sites[name]
            health = site.health()
            if not health.ok:
                report.skipped_sites[name] = health.reason
                log.error("scrub skipped site %s: %s", name, health.reason)
                continue
            if not self._scrub_site(run.id, site, start_after, sample, rng, report):
                break                        # stopped or the site failed mid-way
            if sample >= 1.0:
                self._orphans(run.id, site, delete_orphans, report)
        report.seconds = time.monotonic() - t0
        self._finish(run.id, report)
        return report

    def _start(self, site_names: list[str], sample: float) -> tuple[ScrubRun, bool]:
        """Resume the newest unfinished run over the same sites, else start one."""
        wanted = ",".join(site_names)
        now = self.clock()
        with self.catalog.unit(write=True) as uow:
            s = uow.session
            prev = s.scalars(select(ScrubRun).where(ScrubRun.state != "done")
                             .order_by(ScrubRun.id.desc()).limit(1)).first()
            if prev is not None and prev.sites == wanted and prev.sample == sample:
                prev.state = "running"
                uow.commit()
                s.expunge(prev)
                return prev, True
            s.execute(update(ScrubRun).where(ScrubRun.state != "done")
                      .values(state="abandoned", finished_at=now))
            run = ScrubRun(sites=wanted, sample=sample, state="running", started_at=now,
                           cursor_site="", cursor_copy_id=0, objects=0, bytes=0,
                           findings=0, repaired=0)
            s.add(run)
            uow.commit()
            s.expunge(run)
            return run, False

    def _scrub_site(self, run_id: int, site: Backend, after: int, sample: float,
                    rng: random.Random, report: ScrubReport) -> bool:
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="scrub")

        def read(after: int) -> tuple[list[Any], list[tuple[list[Any], Future]]]:
            """The next batch of copies, handed to the pool in slices."""
            with self.catalog.unit() as uow:
                rows = _copies_after(uow.session, site.name, after)
            todo = [r for r in rows if sample >= 1.0 or rng.random() < sample]
            parts = [todo[i:i + SLICE] for i in range(0, len(todo), SLICE)]
            return rows, [(p, pool.submit(self._check, site, p)) for p in parts]

        try:
            batch = None if self.stop.is_set() else read(after)
            while batch is not None:
                rows, parts = batch
                if not rows:
                    return True
                # The next batch is read while this one is recorded: the pool never
                # waits for the catalog. The cursor still moves only past recorded copies.
                following = None if self.stop.is_set() else read(rows[-1].id)
                results = [(r, got) for p, fut in parts for r, got in zip(p, fut.result())]
                if not site.health().ok:     # unmounted mid-scrub: say so, resume later
                    report.skipped_sites[site.name] = "became unavailable during the scrub"
                    return False
                for r, got in results:
                    report.objects += 1
                    report.bytes += got[0] if got else 0
                    if got is None or got != (r.size, r.sha256):
                        try:
                            self._damaged(run_id, site, r, got, report)
                        except Exception as e:  # noqa: BLE001 - one bad object never stops the scrub
                            self._failed(site.name, r.key, e, report)
                    elif r.state != "ok":
                        self._set_copy(r.id, "ok")   # a copy thought bad now verifies
                self._save(run_id, site.name, rows[-1].id, report)
                self.progress(len(rows))
                batch = None if self.stop.is_set() else following
            return False
        finally:
            pool.shutdown(wait=True, cancel_futures=True)   # reads of a batch not recorded

    def _check(self, site: Backend, rows: list[Any]) -> list[tuple[int, str] | None]:
        """Read back consecutive copies: (size, SHA-256), None if gone, (-1, "") if unreadable."""
        out: list[tuple[int, str] | None] = []
        hashes = _hash(site, [r.key for r in rows])
        try:
            for r in rows:
                self.limit.take(r.size)     # before the read it pays for
                got = next(hashes)
                if isinstance(got, BackendError):
                    log.warning("scrub could not read a copy on %s: %s", site.name, got)
                    got = (-1, "")
                out.append(got)
        finally:
            hashes.close()
        return out

    # -- damage and repair ------------------------------------------------------------
    def _damaged(self, run_id: int, site: Backend, row: Any, got: tuple[int, str] | None,
                 report: ScrubReport) -> None:
        kind = "missing" if got is None else "corrupt"
        detail = ("file missing" if got is None else
                  f"size {got[0]} != {row.size}" if got[0] != row.size else "SHA-256 differs")
        with self.catalog.unit() as uow:
            sop, study = uow.session.execute(
                select(Instance.sop_uid, Study.study_uid).join(Study, Study.id == Instance.study_fk)
                .where(Instance.id == row.instance_fk)).one()
        source = self._repair(site, row)
        if source is None:
            self._set_copy(row.id, kind)
            kind = "unrecoverable"
            detail += "; no verified copy anywhere (online mirror or object tier)"
            log.error("scrub: object %s on %s is damaged and has no good copy anywhere",
                      phi.token(sop), site.name)
        else:
            log.warning("scrub: object %s on %s was %s; repaired from %s",
                        phi.token(sop), site.name, detail, source)
        f = Finding(kind, site.name, row.key, sop, study, source, detail)
        report.findings.append(f)
        with self.catalog.unit(write=True) as uow:
            uow.session.add(ScrubFinding(run_fk=run_id, kind=kind, location=site.name,
                                         key=row.key, instance_fk=row.instance_fk,
                                         repaired_from=source, detail=detail[:256],
                                         found_at=self.clock()))
            uow.commit()

    def _failed(self, location: str, key: str, e: Exception, report: ScrubReport) -> None:
        """Damage that could not even be recorded or repaired: a named finding (so the
        run exits non-zero), and the scrub goes on with the next object."""
        why = describe_failure(e)
        report.findings.append(Finding("failed", location, key,
                                       detail=f"damaged, not handled: {why}"))
        log.error("scrub: %s on %s damaged and not handled (%s); going on", key, location, why)

    def repair_copy(self, target: Backend, row: Any) -> str | None:
        """Rewrite one copy (row: id, instance_fk, key, size, sha256) on ``target``
        from a copy that verifies now; the source's name, or None (site rebuild)."""
        return self._repair(target, row)

    def _repair(self, target: Backend, row: Any) -> str | None:
        """Write a verified good copy over the bad one; the source's name, or None."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        with self.catalog.unit() as uow:
            others = list(uow.session.execute(
                select(Copy.location, Copy.key, Copy.bundle_fk, Copy.frame_offset,
                       Copy.frame_length)
                .where(Copy.instance_fk == row.instance_fk, Copy.state == "ok",
                       Copy.location != target.name)))
            bundles = {b.id: (b.key, b.version_id) for b in uow.session.scalars(
                select(Bundle).where(Bundle.state == "ok",
                                     Bundle.id.in_([o.bundle_fk for o in others if o.bundle_fk])))}
        order = sorted(others, key=lambda o: o.location not in self.sites)   # mirrors first
        for o in order:
            payload = None
            try:
                if o.location in self.sites:
                    payload = self._fetch(lambda: self.sites[o.location].open(o.key), row)
                elif self.tier is not None and o.location == self.tier.name and o.bundle_fk in bundles:
                    key, version = bundles[o.bundle_fk]
                    payload = self._fetch_frame(key, version, o.frame_offset, o.frame_length, row)
                if payload is None:
                    continue
                target.put(row.key, payload, replace=True)   # put re-reads and verifies
                self._set_copy(row.id, "ok")
                return o.location
            except (BackendError, BundleError, OSError) as e:
                log.warning("scrub repair from %s failed: %s", o.location, e)
            finally:
                if payload is not None:
                    payload.path.unlink(missing_ok=True)
        return None

    def _fetch(self, open_source, row: Any) -> FilePayload | None:  # noqa: ANN001
        return copy_verified(open_source, row.sha256, self.scratch, size=row.size,
                             suffix=".scrub.tmp")

    def _fetch_frame(self, key: str, version: str | None, offset: int, length: int,
                     row: Any) -> FilePayload | None:
        try:
            return frame_verified(lambda: self.tier.open_range(  # type: ignore[union-attr]
                key, offset, length, version_id=version), length, row.size, row.sha256,
                self.scratch, suffix=".scrub.tmp")
        except BundleError:
            return None

    # -- orphans ------------------------------------------------------------------------
    def _orphans(self, run_id: int, site: Backend, delete: bool, report: ScrubReport) -> None:
        with self.catalog.unit() as uow:
            known = set(uow.session.scalars(select(Copy.key).where(
                Copy.location == site.name, Copy.state.in_(STATES + ("purging",)))))
        for info in site.list("objects/"):
            if info.key in known or self.stop.is_set():
                continue
            detail = "not in the catalog"
            if delete:
                site.delete(info.key)
                detail += "; deleted (--delete-orphans)"
            report.findings.append(Finding("orphan", site.name, info.key, detail=detail))
            with self.catalog.unit(write=True) as uow:
                uow.session.add(ScrubFinding(run_fk=run_id, kind="orphan", location=site.name,
                                             key=info.key, detail=detail, found_at=self.clock()))
                uow.commit()

    def _earlier_findings(self, run_id: int) -> list[Finding]:
        with self.catalog.unit() as uow:
            rows = uow.session.execute(
                select(ScrubFinding, Instance.sop_uid, Study.study_uid)
                .outerjoin(Instance, Instance.id == ScrubFinding.instance_fk)
                .outerjoin(Study, Study.id == Instance.study_fk)
                .where(ScrubFinding.run_fk == run_id).order_by(ScrubFinding.id))
            return [Finding(f.kind, f.location, f.key, sop, study, f.repaired_from, f.detail)
                    for f, sop, study in rows]

    # -- bookkeeping -----------------------------------------------------------------------
    def _set_copy(self, copy_id: int, state: str) -> None:
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(Copy).where(Copy.id == copy_id).values(
                state=state, verified_at=self.clock() if state == "ok" else None))
            uow.commit()

    def _save(self, run_id: int, site: str, cursor: int, report: ScrubReport) -> None:
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(ScrubRun).where(ScrubRun.id == run_id).values(
                cursor_site=site, cursor_copy_id=cursor,
                objects=report.objects,
                bytes=report.bytes, findings=len(report.findings),
                repaired=sum(1 for f in report.findings if f.repaired_from)))
            uow.commit()

    def _finish(self, run_id: int, report: ScrubReport) -> None:
        done = not self.stop.is_set() and not report.skipped_sites
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(ScrubRun).where(ScrubRun.id == run_id).values(
                state="done" if done else "interrupted", finished_at=self.clock(),
                objects=report.objects, bytes=report.bytes, findings=len(report.findings),
                repaired=sum(1 for f in report.findings if f.repaired_from)))
            uow.commit()


def last_runs(catalog: Catalog, n: int = 10) -> list[dict]:
    with catalog.unit() as uow:
        rows = uow.session.scalars(select(ScrubRun).order_by(ScrubRun.id.desc()).limit(n))
        return [{"id": r.id, "sites": r.sites, "state": r.state, "started_at": r.started_at,
                 "finished_at": r.finished_at, "objects": r.objects, "bytes": r.bytes,
                 "findings": r.findings, "repaired": r.repaired} for r in rows]


