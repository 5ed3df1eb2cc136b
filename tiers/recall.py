"""Recall: bring a migrated study back onto the online sites, verified.

Under the study's lease (the one migration takes), for every instance that
lacks a copy on a site: read its frame from the study bundle, decompress it,
check its SHA-256 against the catalog, and write it to each such site with the
sites' own verified put. Where a bundle holds most of what is needed it is read
in one sequential GET, otherwise frame by frame with ranged GETs. Reading,
decompressing and the site writes overlap (a bounded queue between a reader
thread and a small pool of writers), so a recall runs near the slower of the
object store and the sites.

The object copies stay: a recalled study that ages again is re-migrated by
verifying its bundle, without re-uploading it. The study's recall time is
recorded; the lifecycle policy keeps it online for ``keep_recalled_days``.
"""
from __future__ import annotations

import io
import logging
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from sqlalchemy import update

from archive import failpoints, phi
from archive.catalog import lease
from archive.catalog.models import Bundle, Copy, Study
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.uids import validate_uid
from tiers.backend import Backend, BackendError, FilePayload, ObjectExists
from tiers.bundle import BundleError, extract_to, skip_to
from tiers.layout import instance_key
from tiers.migrate import STUDY_LEASE_TTL_S, NoSuchStudy, study_lease_name
from tiers.study_state import InstanceRow, bundles_of, load, study_fk_of

log = logging.getLogger("pacsvault.recall")

STREAM_FRACTION = 0.5       # read the whole bundle when at least this share is needed
QUEUE_DEPTH = 8             # decoded instances waiting for the writers (bounds memory)
WRITERS = 4
IN_MEMORY_MAX = 16 * 1024 * 1024   # larger instances are decoded into a scratch file


class _Desync(BundleError):
    """A damaged frame in a sequential read: later frames are read by range."""


@dataclass
class RecallReport:
    study_uid: str
    instances: int = 0          # instances of the study
    already_online: int = 0
    recalled: int = 0
    bytes: int = 0              # uncompressed bytes written back (per instance, not per site)
    seconds: float = 0.0
    sites: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["mb_per_s"] = round(self.bytes / 1e6 / self.seconds, 1) if self.seconds > 0 else None
        return d


@dataclass(frozen=True)
class _Bytes:
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> BinaryIO:
        import io
        return io.BytesIO(self.data)


@dataclass
class _Job:
    inst: InstanceRow
    targets: list[tuple[str, str]]          # (site, key) to write
    payload: _Bytes | FilePayload | None = None
    error: str = ""                          # could not be read from the object tier
    written: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)   # (site, key, why)


class Recaller:
    def __init__(self, catalog: Catalog, sites: list[Backend], tier: Backend, *,
                 scratch: Path | None = None, clock: Clock = utcnow,
                 progress: Callable[[int], None] | None = None) -> None:
        self.catalog = catalog
        self.scratch = scratch or Path(tempfile.gettempdir())
        self.sites = sites
        self.tier = tier
        self.clock = clock
        self.progress = progress or (lambda n: None)

    def recall(self, study_uid: str) -> RecallReport:
        uid = validate_uid(study_uid, "Study Instance")
        with self.catalog.unit() as uow:
            study_fk = study_fk_of(uow.session, uid)
        if study_fk is None:
            raise NoSuchStudy(uid)
        with lease.lease(self.catalog, study_lease_name(uid), what=f"study {phi.token(uid)}",
                         ttl_s=STUDY_LEASE_TTL_S, wait_s=60):
            return self._recall(uid, study_fk)

    def _recall(self, uid: str, study_fk: int) -> RecallReport:
        t0 = time.monotonic()
        report = RecallReport(uid)
        with self.catalog.unit() as uow:
            state = load(uow.session, study_fk)
            bundles = {b.id: b for b in bundles_of(uow.session, study_fk, ("ok",))}
        healthy = [s for s in self.sites if s.health().ok]
        report.sites = [s.name for s in healthy]
        report.instances = len(state.instances)
        if not healthy:
            raise BackendError("recall", "online sites", "no healthy site to recall to")
        by_bundle: dict[int, list[_Job]] = {}
        for inst in state.instances:
            targets = []
            for site in healthy:
                c = inst.copies.get(site.name)
                if c is None or c.state == "purged":
                    key = c.key if c is not None else instance_key(
                        uid, inst.sop_uid, inst.sha256 if inst.version > 1 else None)
                    targets.append((site.name, key))
            if not targets:
                report.already_online += 1
                continue
            tier_copy = inst.copies.get(self.tier.name)
            if tier_copy is None or tier_copy.state != "ok" or tier_copy.bundle_fk not in bundles:
                report.failures.append({"sop_uid": inst.sop_uid,
                                        "reason": "no verified object copy to recall from"})
                continue
            by_bundle.setdefault(tier_copy.bundle_fk, []).append(_Job(inst, targets))

        jobs: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        done: list[_Job] = []
        lock = threading.Lock()
        site_by_name = {s.name: s for s in healthy}

        def write(job: _Job) -> None:
            if job.payload is not None:
                for site, key in job.targets:
                    self._put(site_by_name[site], uid, job, key)
                if isinstance(job.payload, FilePayload):
                    job.payload.path.unlink(missing_ok=True)
            with lock:
                done.append(job)
                n = len(done)
            if n == 1:
                failpoints.hit("recall.mid_write")
            self.progress(1)

        def writers() -> None:
            with ThreadPoolExecutor(WRITERS, thread_name_prefix="recall-write") as pool:
                while (job := jobs.get()) is not None:
                    pool.submit(write, job)

        consumer = threading.Thread(target=writers, name="recall-writers", daemon=True)
        consumer.start()
        try:
            for bundle_fk, todo in by_bundle.items():
                b = bundles[bundle_fk]
                for job in self._decode(b, todo):
                    jobs.put(job)
        finally:
            jobs.put(None)
            consumer.join()

        self._record(study_fk, done, report)
        report.seconds = round(time.monotonic() - t0, 3)
        log.info("recalled study %s: %d instances in %.1fs, %d failures", phi.token(uid),
                 report.recalled, report.seconds, len(report.failures))
        return report

    @staticmethod
    def _put(site: Backend, uid: str, job: _Job, key: str) -> None:
        try:
            try:
                site.put(key, job.payload)
            except ObjectExists:
                # Other bytes sit at the first-version key: never replace them.
                key = instance_key(uid, job.inst.sop_uid, job.inst.sha256)
                site.put(key, job.payload)
            job.written.append((site.name, key))
        except BackendError as e:
            job.failed.append((site.name, key, str(e)))

    def _decode(self, b: Bundle, todo: list[_Job]) -> Iterator[_Job]:
        """Yield each job with its verified bytes or its error. The bundle is read
        in one sequential GET when most of it is needed, else frame by frame; after
        a damaged frame the rest is read frame by frame."""
        tier = self.tier.name
        remaining = sorted(todo, key=lambda j: j.inst.copies[tier].frame_offset or 0)
        need = sum(j.inst.copies[tier].frame_length or 0 for j in remaining)
        try:
            if need >= STREAM_FRACTION * b.size:
                with self.tier.open(b.key, version_id=b.version_id) as f:  # type: ignore[call-arg]
                    pos = 0
                    while remaining:
                        job = remaining[0]
                        c = job.inst.copies[tier]
                        pos = skip_to(f, pos, c.frame_offset)
                        try:
                            self._decode_one(job, f, c.frame_length)
                        except _Desync:
                            yield remaining.pop(0)
                            break
                        pos += c.frame_length
                        yield remaining.pop(0)
            while remaining:
                job = remaining[0]
                c = job.inst.copies[tier]
                try:
                    with self.tier.open_range(b.key, c.frame_offset, c.frame_length,  # type: ignore[attr-defined]
                                              version_id=b.version_id) as f:
                        self._decode_one(job, f, c.frame_length)
                except _Desync:
                    pass
                yield remaining.pop(0)
        except (BackendError, BundleError) as e:
            for job in remaining:
                job.error = job.error or f"object tier: {e}"
                yield job

    def _decode_one(self, job: _Job, src: BinaryIO, length: int) -> None:
        """Decompress one frame from ``src`` and check it against the CATALOG's
        size and SHA-256 (not the manifest's); small instances stay in memory,
        large ones go to a scratch file, so memory stays bounded."""
        inst = job.inst
        entry = {"size": inst.size, "sha256": inst.sha256}
        try:
            if inst.size <= IN_MEMORY_MAX:
                sink = io.BytesIO()
                extract_to(src, length, entry, sink)
                job.payload = _Bytes(sink.getvalue(), inst.sha256)
            else:
                self.scratch.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(dir=self.scratch, suffix=".recall.tmp")
                try:
                    with open(fd, "wb") as out:
                        extract_to(src, length, entry, out)
                except BaseException:
                    Path(name).unlink(missing_ok=True)
                    raise
                job.payload = FilePayload(Path(name), inst.size, inst.sha256)
        except BundleError as e:
            job.error = f"object copy damaged: {e}"
            # the stream is now somewhere inside this frame: the rest of the bundle
            # cannot be read in order; ranged reads still can
            raise _Desync(str(e)) from None

    def _record(self, study_fk: int, done: list[_Job], report: RecallReport) -> None:
        now = self.clock()
        with self.catalog.unit(write=True) as uow:
            s = uow.session
            for job in done:
                if job.error or not job.written:
                    why = job.error or "; ".join(f"{site}: {e}" for site, _, e in job.failed)
                    report.failures.append({"sop_uid": job.inst.sop_uid, "reason": why})
                    if job.error.startswith("object copy damaged"):
                        s.execute(update(Copy).where(Copy.instance_fk == job.inst.id,
                                                     Copy.location == self.tier.name)
                                  .values(state="corrupt"))
                    continue
                # A site that failed gets a 'missing' copy: the repair loop fills it.
                for (site, key), state in ([(w, "ok") for w in job.written]
                                           + [((f[0], f[1]), "missing") for f in job.failed]):
                    c = job.inst.copies.get(site)
                    values = dict(key=key, state=state, verified_at=now if state == "ok" else None)
                    if c is not None:
                        s.execute(update(Copy).where(Copy.id == c.id).values(**values))
                    else:
                        s.add(Copy(instance_fk=job.inst.id, location=site, **values))
                report.recalled += 1
                report.bytes += job.inst.size
            if report.recalled:
                s.execute(update(Study).where(Study.id == study_fk)
                          .values(recalled_at=now, last_access_at=now))
            uow.commit()
