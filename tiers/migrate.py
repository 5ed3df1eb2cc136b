"""Migration: move a study's online copies into one verified study bundle.

Per study, under the study's lease (tiers/recall.py takes the same one):

1. finish purges a crash interrupted (rows in state 'purging');
2. settle bundles a crash left 'pending': adopt one whose stored object
   verifies and whose every instance frame matches the catalog, else abandon it;
3. re-verify the bundles already holding instances that are still online
   (a recalled study moves again without re-uploading when its bundle is intact;
   a damaged bundle is marked corrupt, reported, and its instances re-bundled);
4. bundle the instances without a verified object copy: compress them from an
   online copy (the mirror copy when the first does not match the catalog) into
   a local temporary bundle, record it 'pending', upload it (tiers.backend put
   verifies what the store holds), check every frame of the local bundle against
   the catalog SHA-256, then commit the bundle and the instances' object copies;
5. purge: mark the online copies 'purging', delete the files, mark them 'purged'.

The online copies are deleted only in step 5, only for instances whose object
copy was verified in this run, so a crash at any point leaves the online copies
or a verified object copy, never neither. A re-run resumes from the catalog.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable

from sqlalchemy import select, update

from archive import failpoints, phi
from archive.catalog import lease
from archive.catalog.models import Bundle, Copy
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.config.schema import Settings
from archive.errors import InvalidInput, PacsvaultError, describe_failure
from archive.uids import validate_uid
from tiers import policy
from tiers.backend import (
    Backend,
    BackendError,
    FilePayload,
    ObjectLocked,
    ObjectNotFound,
    TempSweeper,
    Unavailable,
    UploadSweeper,
)
from tiers.bundle import (
    BundleError,
    BundleReader,
    Member,
    Written,
    check_frames,
    extract_to,
    skip_to,
    write_bundle,
)
from tiers.growing import GrowingFile, WriterFailed
from tiers.layout import bundle_key
from tiers.study_state import InstanceRow, StudyState, bundles_of, load, study_fk_of

log = logging.getLogger("pacsvault.migrate")

STUDY_LEASE_TTL_S = 120
DAMAGE = {"corrupt-bundle", "corrupt-online-copy"}
# Studies at least this big are compressed and uploaded at once (tiers/growing.py);
# smaller ones are written first and stored with one PUT.
STREAM_MIN_BYTES = 16 * 1024 * 1024
# Threads reading, checking and compressing instances ahead of the bundle writer.
COMPRESS_WORKERS = 2


def study_lease_name(study_uid: str) -> str:
    return f"study:{study_uid}"


class NoSuchStudy(InvalidInput):
    """study {} is not in the catalog"""


@dataclass
class Finding:
    """Damage found on the way; the operator must hear of it (exit status, report)."""

    kind: str                      # corrupt-online-copy | corrupt-bundle | no-source | ...
    study_uid: str
    detail: str
    sop_uid: str | None = None
    location: str | None = None


@dataclass
class StudyResult:
    study_uid: str
    outcome: str = "planned"       # planned | migrated | verified | failed | skipped
    reason: str = ""               # the rule that selected it, or what went wrong
    instances: int = 0             # instances that were online
    bytes: int = 0                 # their uncompressed bytes
    bundled: int = 0               # instances put into new bundles in this run
    stored_bytes: int = 0          # bundle bytes written to the tier in this run
    purged: int = 0                # online files deleted
    bundles: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class KeptStudy:
    """A study the policy keeps online (dry run): the config key that kept it and why."""
    study_uid: str
    reason: str          # never_migrate_studies, min_online_days, no rule matches, ...
    detail: str
    instances: int = 0
    bytes: int = 0


@dataclass
class MigrateReport:
    dry_run: bool
    tier: str
    studies: list[StudyResult] = field(default_factory=list)
    kept: list[KeptStudy] = field(default_factory=list)    # filled by a dry run
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(1 for s in self.studies if s.outcome == "failed")

    @property
    def ok(self) -> bool:
        return not self.failed and not self.findings

    def to_json(self) -> dict[str, Any]:
        moved = [s for s in self.studies if s.outcome in ("migrated", "verified", "planned")]
        total_bytes = sum(s.bytes for s in moved)
        return {
            "dry_run": self.dry_run,
            "tier": self.tier,
            "ok": self.ok,
            "studies": [asdict(s) for s in self.studies],
            "kept": [asdict(k) for k in self.kept],
            "findings": [asdict(f) for f in self.findings],
            "totals": {
                "studies": len(moved),
                "kept": len(self.kept),
                "failed": self.failed,
                "instances": sum(s.instances for s in moved),
                "bytes": total_bytes,
                "bundled_instances": sum(s.bundled for s in moved),
                "stored_bytes": sum(s.stored_bytes for s in moved),
                "purged_copies": sum(s.purged for s in moved),
                "seconds": round(self.seconds, 3),
                "mb_per_s": round(total_bytes / 1e6 / self.seconds, 1)
                if self.seconds > 0 and not self.dry_run else None,
            },
        }


class Migrator:
    def __init__(self, catalog: Catalog, sites: list[Backend], tier: Backend,
                 settings: Settings, *, clock: Clock = utcnow,
                 progress: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.catalog = catalog
        self.stop = stop or threading.Event()   # set: finish the current study, then return
        self.sites = {s.name: s for s in sites}
        self.tier = tier
        self.settings = settings
        self.policy = settings.lifecycle
        self.level = settings.objects.compression_level
        self.scratch = settings.ingest.spool_dir / "migrate"
        self.clock = clock
        self.progress = progress or (lambda n: None)
        self._verified_now: set[int] = set()   # bundle ids verified by this run

    # -- planning ------------------------------------------------------------------
    def plan(self, study_uids: list[str] | None = None,
             kept: list[KeptStudy] | None = None) -> list[StudyResult]:
        """Studies to move: the forced ones, else what the policy selects now. With
        ``kept``, every other online study is added to it with what kept it."""
        site_names = list(self.sites)
        with self.catalog.unit() as uow:
            if study_uids:
                fks = []
                for raw in study_uids:
                    uid = validate_uid(raw, "Study Instance")
                    fk = study_fk_of(uow.session, uid)
                    if fk is None:
                        raise NoSuchStudy(uid)
                    fks.append(fk)
                facts = {f.study_fk: f for f in policy.candidates(
                    uow.session, site_names, self.tier.name, study_fks=fks)}
                uids = dict(zip(fks, (validate_uid(u, "Study Instance") for u in study_uids)))
                out = []
                for fk in dict.fromkeys(fks):
                    f = facts.get(fk)
                    out.append(StudyResult(uids[fk], reason="forced (--study)",
                                           instances=f.online_instances if f else 0,
                                           bytes=f.online_bytes if f else 0))
                return out
            now = self.clock()
            cutoff = now - timedelta(days=self.policy.min_online_days)
            # Explaining needs the young studies too; a real run skips them in SQL.
            found = policy.candidates(uow.session, site_names, self.tier.name,
                                      received_before=None if kept is not None else cutoff)
        out = []
        for f in found:
            if not self.policy.purge_online and f.unprotected == 0:
                d = policy.Decision(False, "already migrated", "every online instance has a "
                                    "verified object copy (purge_online = false keeps them)")
            elif len(out) >= self.policy.max_studies_per_run:
                if kept is None:
                    break
                d = policy.decide(f, self.policy, now)
                if d.migrate:
                    d = policy.Decision(False, "max_studies_per_run", f"rule {d.reason} matches; "
                                        f"beyond max_studies_per_run = "
                                        f"{self.policy.max_studies_per_run}: a later run takes it")
            else:
                d = policy.decide(f, self.policy, now)
            if d.migrate:
                out.append(StudyResult(f.study_uid, reason=d.reason,
                                       instances=f.online_instances, bytes=f.online_bytes))
            elif kept is not None:
                kept.append(KeptStudy(f.study_uid, d.reason, d.detail, f.online_instances,
                                      f.online_bytes))
        return out

    # -- running -------------------------------------------------------------------
    def run(self, study_uids: list[str] | None = None, *, dry_run: bool = False) -> MigrateReport:
        t0 = time.monotonic()
        report = MigrateReport(dry_run, self.tier.name)
        if not dry_run:
            self.sweep_scratch()
            self._sweep_tier_temp()
            self._sweep_uploads()
            self.finish_interrupted_purges(report)
        report.studies = self.plan(study_uids, kept=report.kept if dry_run else None)
        if dry_run:
            report.seconds = time.monotonic() - t0
            return report
        health = self.tier.health()
        if not health.ok:
            for s in report.studies:
                s.outcome, s.reason = "failed", f"object tier unavailable: {health.reason}"
            report.seconds = time.monotonic() - t0
            return report
        for i, result in enumerate(report.studies):
            if self.stop.is_set():
                for rest in report.studies[i:]:
                    rest.outcome, rest.reason = "skipped", "stopping (daemon shutdown)"
                break
            try:
                with lease.lease(self.catalog, study_lease_name(result.study_uid),
                                 what=f"study {phi.token(result.study_uid)}",
                                 ttl_s=STUDY_LEASE_TTL_S, wait_s=30) as held:
                    self.migrate_study(result, report, held)
            except Unavailable as e:
                result.outcome, result.reason = "failed", str(e)
                log.error("object tier unavailable; stopping this run: %s", e)
                for rest in report.studies[i + 1:]:
                    rest.outcome, rest.reason = "skipped", "object tier unavailable"
                break
            except (PacsvaultError, BundleError) as e:
                result.outcome, result.reason = "failed", str(e)
                log.error("migration of study %s failed: %s", phi.token(result.study_uid), e)
            except Exception as e:  # noqa: BLE001 - one bad study never stops the others
                why = describe_failure(e)
                result.outcome, result.reason = "failed", why
                report.findings.append(Finding("study-failed", result.study_uid,
                                               f"not migrated: {why}"))
                log.error("migration of study %s failed (%s); going on with the others",
                          result.study_uid, why)
                log.debug("migration of study %s failed", result.study_uid, exc_info=True)
        report.seconds = time.monotonic() - t0
        return report

    def migrate_study(self, result: StudyResult, report: MigrateReport,
                      held: lease.HeldLease | None = None) -> None:
        t0 = time.monotonic()
        with self.catalog.unit() as uow:
            study_fk = study_fk_of(uow.session, result.study_uid)
            if study_fk is None:
                raise NoSuchStudy(result.study_uid)
        self._finish_purges(study_fk, report)
        self._settle_pending(study_fk, report)
        state = self._load(study_fk)
        online = [i for i in state.instances if self._online(i)]
        result.instances = len(online)
        result.bytes = sum(i.size for i in online)

        damage_before = len(report.findings)
        covered = self._verify_existing(state, online, report)
        need = [i for i in online if i.id not in covered]
        if need:
            self._check_lease(held)
            sources = [i for i in need if self._sources(i)]
            for i in need:
                if not self._sources(i):
                    report.findings.append(Finding(
                        "no-source", state.study.study_uid,
                        "no online copy in state ok: not migrated (scrub or repair first)",
                        sop_uid=i.sop_uid))
            if sources:
                bundle_id, key, stored = self._bundle(state, sources, report, held)
                covered.update(i.id for i in sources)
                result.bundled += len(sources)
                result.stored_bytes += stored
                result.bundles.append(key)
        damaged = any(f.kind in DAMAGE for f in report.findings[damage_before:])
        if damaged:
            # Keep the online copies while someone looks at what went wrong on
            # the tier; a later clean run verifies the new bundle and purges.
            result.reason += "; damage found: online copies kept until a clean run"
        elif self.policy.purge_online:
            self._check_lease(held)
            result.purged = self._purge(state.study.study_uid,
                                        [i.id for i in online if i.id in covered], report)
        if any(i.id not in covered for i in online):
            result.outcome = "failed"
            result.reason = result.reason + "; some instances have no verified object copy"
        else:
            result.outcome = "migrated" if result.bundled else "verified"
        result.seconds = round(time.monotonic() - t0, 3)
        self.progress(1)
        log.info("study %s %s: %d instances, %d bundled, %d online copies purged",
                 phi.token(result.study_uid), result.outcome, result.instances,
                 result.bundled, result.purged)

    # -- helpers -------------------------------------------------------------------
    def _load(self, study_fk: int) -> StudyState:
        with self.catalog.unit() as uow:
            return load(uow.session, study_fk)

    def _online(self, inst: InstanceRow) -> bool:
        return any(c.state in ("ok", "missing", "corrupt") for name, c in inst.copies.items()
                   if name in self.sites)

    def _sources(self, inst: InstanceRow) -> list[tuple[str, str]]:
        """(site, key) of copies to bundle from: healthy sites first."""
        found = [(name, c.key) for name, c in inst.copies.items()
                 if name in self.sites and c.state == "ok"]
        return sorted(found, key=lambda nk: not self.sites[nk[0]].health().ok)

    @staticmethod
    def _check_lease(held: lease.HeldLease | None) -> None:
        if held is not None and held.lost:
            raise lease.LeaseHeld("the study", "lease lost during migration")

    def _sweep_tier_temp(self) -> None:
        """Remove the temp files a killed run left in a directory tier's tmp/: whole
        bundles, patient data. Only our own temp naming, never one a live writer holds."""
        if not isinstance(self.tier, TempSweeper):
            return
        n = self.tier.sweep_temp()
        if n:
            log.info("removed %d temp files an interrupted run left on %s", n, self.tier.name)

    def _sweep_uploads(self) -> None:
        """Abort multipart uploads a crash left on the tier over a day ago (their
        parts may hold patient data and cost storage); S3 only."""
        if not isinstance(self.tier, UploadSweeper):
            return
        try:
            n = self.tier.sweep_uploads()
        except BackendError as e:
            log.warning("could not sweep stale multipart uploads: %s", e)
            return
        if n:
            log.warning("aborted %d stale multipart uploads on %s", n, self.tier.name)

    def sweep_scratch(self, stale_after_s: float = 3600) -> int:
        """Remove local bundle files a killed run left (they hold patient data).
        A file whose bundle is no longer 'pending' is finished with; one with no
        row yet is being built by a live run unless it is an hour old; 'pending'
        ones are settled under the study's lease (_settle_pending)."""
        if not self.scratch.is_dir():
            return 0
        files = {p.name.split(".")[0]: p for p in self.scratch.glob("*.pvb.tmp")}
        if not files:
            return 0
        with self.catalog.unit() as uow:
            states = {u: st for u, st in uow.session.execute(
                select(Bundle.bundle_uuid, Bundle.state).where(Bundle.bundle_uuid.in_(list(files))))}
        removed = 0
        for bundle_uuid, path in files.items():
            state = states.get(bundle_uuid)
            try:
                old = time.time() - path.stat().st_mtime > stale_after_s
            except FileNotFoundError:
                continue
            if (state is not None and state != "pending") or (state is None and old):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- step 1: interrupted purges -------------------------------------------------
    def finish_interrupted_purges(self, report: MigrateReport) -> int:
        with self.catalog.unit() as uow:
            fks = sorted(set(uow.session.scalars(
                select(Copy.instance_fk).where(Copy.state == "purging"))))
        if not fks:
            return 0
        return self._delete_purging(fks, report, "(interrupted run)")

    def _finish_purges(self, study_fk: int, report: MigrateReport) -> None:
        state = self._load(study_fk)
        ids = [i.id for i in state.instances
               if any(c.state == "purging" for c in i.copies.values())]
        if ids:
            self._delete_purging(ids, report, state.study.study_uid)

    # -- step 2: pending bundles ------------------------------------------------------
    def _settle_pending(self, study_fk: int, report: MigrateReport) -> None:
        with self.catalog.unit() as uow:
            pending = bundles_of(uow.session, study_fk, ("pending",))
        if not pending:
            return
        state = self._load(study_fk)
        for b in pending:
            (self.scratch / f"{b.bundle_uuid}.pvb.tmp").unlink(missing_ok=True)
            try:
                self.tier.stat(b.key)
            except ObjectNotFound:
                self._set_bundle_state(b.id, "abandoned")
                continue
            entries = self._verify_stored_bundle(b, state)
            if entries is None:
                self._discard_bad(b, state, report, "left by an interrupted run")
                continue
            self._commit_bundle(b.id, entries, b.version_id, b.server_checksum, adopted=True)
            self._verified_now.add(b.id)
            log.info("adopted bundle of study %s left by an interrupted run",
                     phi.token(state.study.study_uid))

    def _verify_stored_bundle(self, b: Bundle, state: StudyState) -> list[tuple[InstanceRow, dict]] | None:
        """Read a stored bundle back: its SHA-256 and every frame against the catalog.
        The (instance, manifest entry) pairs if all is well, else None."""
        try:
            if not self.tier.verify(b.key, b.sha256, b.size, checksum=b.server_checksum,
                                    version_id=b.version_id):
                return None
            reader = BundleReader(self._range_reader(b.key, b.version_id), b.size)
            by_sop = {(i.sop_uid, i.version): i for i in state.instances}
            out = []
            for entry in reader.manifest["instances"]:
                inst = by_sop.get((entry["sop_uid"], entry.get("version", 1)))
                if inst is None or inst.sha256 != entry["sha256"] or inst.size != entry["size"]:
                    return None
                out.append((inst, entry))
            with self.tier.open(b.key, version_id=b.version_id) as f:  # type: ignore[call-arg]
                check_frames(f, [e for _, e in out])
            return out
        except (BundleError, ObjectNotFound):
            return None

    def _range_reader(self, key: str, version_id: str | None):  # noqa: ANN202
        def read(offset: int, length: int) -> bytes:
            with self.tier.open_range(key, offset, length, version_id=version_id) as f:  # type: ignore[attr-defined]
                return f.read()
        return read

    # -- step 3: bundles already on the tier ----------------------------------------------
    def _verify_existing(self, state: StudyState, online: list[InstanceRow],
                         report: MigrateReport) -> set[int]:
        """Instance ids (among the online ones) whose object copy is verified now."""
        tier = self.tier.name
        by_bundle: dict[int, list[InstanceRow]] = {}
        for i in online:
            c = i.copies.get(tier)
            if c is not None and c.state == "ok" and c.bundle_fk is not None:
                by_bundle.setdefault(c.bundle_fk, []).append(i)
        covered: set[int] = set()
        for bundle_fk, insts in by_bundle.items():
            with self.catalog.unit() as uow:
                b = uow.session.get(Bundle, bundle_fk)
                if b is not None:
                    uow.session.expunge(b)
            if b is None or b.state != "ok":
                continue
            if b.id not in self._verified_now:
                try:
                    intact = self.tier.verify(b.key, b.sha256, b.size,
                                              checksum=b.server_checksum, version_id=b.version_id)
                except ObjectNotFound:
                    intact = False
                if not intact:
                    self._discard_bad(b, state, report, "failed verification")
                    continue
                self._touch_bundle(b.id)
                self._verified_now.add(b.id)
            covered.update(i.id for i in insts)
        return covered

    def _discard_bad(self, b: Bundle, state: StudyState, report: MigrateReport, why: str) -> None:
        """A stored bundle that does not verify: mark it and its copies corrupt, try
        to delete it (Object Lock may forbid that), and tell the operator."""
        report.findings.append(Finding("corrupt-bundle", state.study.study_uid,
                                       f"bundle {b.key} {why}; online copies kept, re-bundled",
                                       location=self.tier.name))
        log.error("bundle of study %s on %s %s; online copies kept",
                  phi.token(state.study.study_uid), self.tier.name, why)
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(Bundle).where(Bundle.id == b.id).values(state="corrupt"))
            uow.session.execute(update(Copy).where(Copy.bundle_fk == b.id, Copy.state == "ok")
                                .values(state="corrupt"))
            uow.commit()
        try:
            self.tier.delete(b.key)
        except ObjectLocked:
            pass
        except BackendError as e:
            log.warning("could not delete a damaged bundle: %s", e)

    # -- step 4: a new bundle --------------------------------------------------------------
    def _bundle(self, state: StudyState, insts: list[InstanceRow], report: MigrateReport,
                held: lease.HeldLease | None) -> tuple[str, str, int]:
        bundle_id = str(uuid.uuid4())
        key = bundle_key(state.study.study_uid, bundle_id)
        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f"{bundle_id}.pvb.tmp"
        # By instance id: two versions of one SOP UID are two objects with their own files.
        used = {i.id: self._sources(i) for i in insts}
        members = [self._member(i, used[i.id]) for i in insts]
        with self.catalog.unit(write=True) as uow:
            # Size and SHA-256 follow once the bundle is written, always before
            # the upload can complete (a streamed upload waits for the end).
            row = Bundle(bundle_uuid=bundle_id, study_fk=state.study.id,
                         location=self.tier.name, key=key, size=0, sha256="",
                         instances=len(insts), state="pending", created_at=self.clock())
            uow.session.add(row)
            uow.commit()
            row_id = row.id
        failpoints.hit("migrate.after_bundle_row")
        tmp.touch()          # readers may open it before the writer's first byte
        growing = GrowingFile(tmp)

        def build() -> Written:
            with open(tmp, "w+b") as f:
                w = write_bundle(f, state.manifest_study(), members, level=self.level,
                                 now=self.clock(), bundle_id=bundle_id, on_frame=growing.publish,
                                 workers=COMPRESS_WORKERS)
            with self.catalog.unit(write=True) as uow:
                uow.session.execute(update(Bundle).where(Bundle.id == row_id)
                                    .values(size=w.size, sha256=w.sha256))
                uow.commit()
            growing.finish(w.size, w.sha256)
            return w

        try:
            if sum(i.size for i in insts) >= STREAM_MIN_BYTES:
                # Compress, check and upload at once: the upload reads the bundle
                # while it is being written (tiers/growing.py).
                writer = _Thread(build, growing)
                check = _LocalCheck(growing)
                writer.start()
                check.start()
                try:
                    info = self.tier.put(key, growing)
                except Exception:
                    writer.join()
                    if writer.error is not None:
                        raise writer.error from None   # the real cause, not its echo
                    raise
                finally:
                    writer.join()
                    check.join()
                written = writer.result
            else:
                written = build()
                check = _LocalCheck(growing)
                check.start()
                try:
                    info = self.tier.put(key, FilePayload(tmp, written.size, written.sha256))
                finally:
                    check.join()
            failpoints.hit("migrate.after_upload")
            self._report_bad_sources(state, insts, used, written, report)
            if check.error is not None:
                self._set_bundle_state(row_id, "corrupt")
                try:
                    self.tier.delete(key)
                except BackendError:
                    pass
                raise BundleError(f"local bundle failed its own check: {check.error}")
            self._check_lease(held)
            entries = list(zip(insts, written.manifest["instances"]))
            self._commit_bundle(row_id, entries, info.version_id, info.checksum, adopted=False)
            self._verified_now.add(row_id)
            failpoints.hit("migrate.after_tier_commit")
            return bundle_id, key, written.size
        finally:
            tmp.unlink(missing_ok=True)

    def _report_bad_sources(self, state: StudyState, insts: list[InstanceRow],
                            used: dict[int, list[tuple[str, str]]], written: Written,
                            report: MigrateReport) -> None:
        by_version = {(i.sop_uid, i.version): i for i in insts}
        for sop_uid, version, index, why in written.bad_sources:
            inst = by_version[(sop_uid, version)]
            site, _ = used[inst.id][index]
            self._mark_copy(inst.id, site, "corrupt")
            report.findings.append(Finding("corrupt-online-copy", state.study.study_uid,
                                           f"online copy {why}; bundled from the mirror",
                                           sop_uid=sop_uid, location=site))

    def _member(self, inst: InstanceRow, sources: list[tuple[str, str]]) -> Member:
        opens = [self._opener(site, key) for site, key in sources]
        return Member(
            sop_uid=inst.sop_uid, series_uid=inst.series_uid, sop_class=inst.sop_class,
            transfer_syntax=inst.transfer_syntax, size=inst.size, sha256=inst.sha256,
            open=opens[0], alternatives=tuple(opens[1:]), version=inst.version,
            extra={"received_at": inst.received_at.isoformat(), "calling_ae": inst.calling_ae,
                   "conflict": inst.conflict})

    def _opener(self, site: str, key: str):  # noqa: ANN202
        backend = self.sites[site]
        return lambda: backend.open(key)

    def _commit_bundle(self, bundle_fk: int, entries: list[tuple[InstanceRow, dict]],
                       version_id: str | None, checksum: str | None, *, adopted: bool) -> None:
        """The bundle is verified: record it and point each instance's object copy at its frame."""
        now = self.clock()
        retain = None
        s3 = self.settings.objects.s3
        if s3 is not None and s3.object_lock_mode != "none" and not adopted:
            retain = now + timedelta(days=s3.retain_days)
        tier = self.tier.name
        with self.catalog.unit(write=True) as uow:
            s = uow.session
            b = s.get(Bundle, bundle_fk)
            b.state, b.verified_at = "ok", now
            b.version_id, b.server_checksum = version_id, checksum
            if retain is not None:
                b.retain_until = retain
            key = b.key
            existing = {c.instance_fk: c for c in s.scalars(
                select(Copy).where(Copy.instance_fk.in_([i.id for i, _ in entries]),
                                   Copy.location == tier))}
            for inst, entry in entries:
                c = existing.get(inst.id)
                if c is None:
                    c = Copy(instance_fk=inst.id, location=tier)
                    s.add(c)
                c.key, c.state, c.verified_at = key, "ok", now
                c.bundle_fk, c.frame_offset, c.frame_length = bundle_fk, entry["offset"], entry["length"]
            uow.commit()

    def _set_bundle_state(self, bundle_fk: int, state: str) -> None:
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(Bundle).where(Bundle.id == bundle_fk).values(state=state))
            uow.commit()

    def _touch_bundle(self, bundle_fk: int) -> None:
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(Bundle).where(Bundle.id == bundle_fk)
                                .values(verified_at=self.clock()))
            uow.commit()

    def _mark_copy(self, instance_fk: int, location: str, state: str) -> None:
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(Copy).where(Copy.instance_fk == instance_fk,
                                                   Copy.location == location).values(state=state))
            uow.commit()

    # -- step 5: purge -----------------------------------------------------------------------
    def _purge(self, study_uid: str, instance_ids: list[int], report: MigrateReport) -> int:
        if not instance_ids:
            return 0
        sites = list(self.sites)
        with self.catalog.unit(write=True) as uow:
            for chunk in _chunks(instance_ids):
                uow.session.execute(
                    update(Copy).where(Copy.instance_fk.in_(chunk), Copy.location.in_(sites),
                                       Copy.state.in_(("ok", "missing", "corrupt")))
                    .values(state="purging"))
            uow.commit()
        return self._delete_purging(instance_ids, report, study_uid)

    def _delete_purging(self, instance_ids: list[int], report: MigrateReport,
                        study_uid: str) -> int:
        """Delete the files of 'purging' copies, site by site; mark them 'purged'
        once gone. A site that fails keeps its rows 'purging' for the next run."""
        deleted = 0
        for chunk in _chunks(instance_ids):
            with self.catalog.unit() as uow:
                rows = list(uow.session.execute(
                    select(Copy.id, Copy.location, Copy.key)
                    .where(Copy.instance_fk.in_(chunk), Copy.state == "purging")))
            by_site: dict[str, list[tuple[int, str]]] = {}
            for copy_id, location, key in rows:
                by_site.setdefault(location, []).append((copy_id, key))
            done: list[int] = []
            targets = [(loc, items) for loc, items in by_site.items() if loc in self.sites]
            # The sites are independent disks: delete on all of them at once.
            with ThreadPoolExecutor(max(1, len(targets)), thread_name_prefix="purge") as pool:
                futures = [(loc, items, pool.submit(self.sites[loc].delete_many,
                                                    [key for _, key in items]))
                           for loc, items in targets]
                for location, items, fut in futures:
                    try:
                        fut.result()
                    except BackendError as e:
                        report.findings.append(Finding(
                            "purge-pending", study_uid,
                            f"online copies not deleted yet ({e}); retried by the next run",
                            location=location))
                        continue
                    done += [copy_id for copy_id, _ in items]
                    deleted += len(items)
                    failpoints.hit("migrate.mid_purge")
            with self.catalog.unit(write=True) as uow:
                for ids in _chunks(done):
                    uow.session.execute(update(Copy).where(Copy.id.in_(ids))
                                        .values(state="purged", verified_at=None))
                uow.commit()
        return deleted


def _chunks(ids: list[int], n: int = 500):  # noqa: ANN202
    for i in range(0, len(ids), n):
        yield ids[i:i + n]


class _Thread(threading.Thread):
    """Runs ``fn``; keeps its result or its exception (and fails the growing file)."""

    def __init__(self, fn, growing: GrowingFile) -> None:  # noqa: ANN001
        super().__init__(name="bundle-writer", daemon=True)
        self.fn, self.growing = fn, growing
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            self.growing.fail(e)


class _LocalCheck(threading.Thread):
    """Decompress every frame of the local bundle and check it against the
    manifest entry (whose SHA-256 is the catalog's), following the writer:
    what the store verified is these bytes, and these bytes hold the right
    instances."""

    def __init__(self, growing: GrowingFile) -> None:
        super().__init__(name="bundle-check", daemon=True)
        self.growing = growing
        self.error: str | None = None

    def run(self) -> None:
        try:
            with self.growing.open() as r:
                pos = 0
                for entry in self.growing.entries():
                    pos = skip_to(r, pos, entry["offset"])
                    extract_to(r, entry["length"], entry)
                    pos += entry["length"]
        except (BundleError, OSError, WriterFailed) as e:
            self.error = str(e)
