"""Scrub of the object tier: read every study bundle back, check every instance.

Each bundle in state 'ok' is read front to back in one GET (from the device
for the directory tier), hashed whole against the catalog's bundle SHA-256,
and every instance frame in it is decompressed and checked against the
catalog's size and SHA-256 for that instance (the catalog is the reference,
not the bundle's own manifest).

A damaged frame marks that instance's object copy 'corrupt' (the other frames
stay usable). Repair: when every instance of the bundle still has a verified
online copy (copy-only mode, or a recalled study), the study is bundled again
from them (tiers/migrate.py, with the purge switched off) and the damaged
bundle is retired. When the study exists only on the tier, the damaged
instances are *unrecoverable* from the online and object tiers: the finding
names them and their study, and the exit status is non-zero. Runs, resume
cursor (bundle id) and findings use the same catalog tables as site scrubs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from typing import Any, BinaryIO

from sqlalchemy import func, select, update

from archive import phi
from archive.catalog.models import Bundle, Copy, Instance, ScrubFinding, Study
from archive.config.schema import Settings
from replication.scrub import Finding, Scrubber, ScrubReport
from tiers.backend import Backend, BackendError, LocalFile, ObjectNotFound
from tiers.bundle import BundleError, extract_to, skip_to
from tiers.migrate import Migrator

log = logging.getLogger("pacsvault.scrub")

_CHUNK = 1 << 20


class _Counting:
    """A reader that hashes and counts what passes through it."""

    def __init__(self, src: BinaryIO) -> None:
        self.src, self.pos, self.h = src, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.src.read(n)
        self.pos += len(b)
        self.h.update(b)
        return b


class ObjectTierScrubber(Scrubber):
    """Scrubber over the object tier's bundles (the bookkeeping is the site scrub's)."""

    def __init__(self, catalog, sites: list[Backend], tier: Backend, settings: Settings,  # noqa: ANN001
                 **kw: Any) -> None:
        super().__init__(catalog, sites, tier, **kw)
        self.settings = settings

    def run(self, site_names: list[str] | None = None, *, sample: float = 1.0,  # type: ignore[override]
            seed: int | None = None, delete_orphans: bool = False) -> ScrubReport:
        t0 = time.monotonic()
        name = self.tier.name  # type: ignore[union-attr]
        run, resumed = self._start([name], sample)
        report = ScrubReport(run.id, [name], resumed)
        if resumed:
            report.objects, report.bytes = run.objects, run.bytes
            report.findings = self._earlier_findings(run.id)
        rng = random.Random(seed if seed is not None else run.id)
        health = self.tier.health()  # type: ignore[union-attr]
        if not health.ok:
            report.skipped_sites[name] = health.reason
            log.error("scrub skipped the object tier %s: %s", name, health.reason)
        else:
            after = run.cursor_copy_id if resumed else 0
            while not self.stop.is_set():
                with self.catalog.unit() as uow:
                    bundles = list(uow.session.scalars(
                        select(Bundle).where(Bundle.location == name, Bundle.state == "ok",
                                             Bundle.id > after).order_by(Bundle.id).limit(64)))
                    for b in bundles:
                        uow.session.expunge(b)
                if not bundles:
                    break
                for b in bundles:
                    if self.stop.is_set():
                        break
                    if sample >= 1.0 or rng.random() < sample:
                        try:
                            self._scrub_bundle(run.id, b, report)
                        except Exception as e:  # noqa: BLE001 - one bad bundle never stops the scrub
                            self._failed(b.location, b.key, e, report)
                    after = b.id
                    self._save(run.id, name, after, report)
                    self.progress(1)
        report.seconds = time.monotonic() - t0
        self._finish(run.id, report)
        return report

    # -- one bundle -------------------------------------------------------------------
    def _entries(self, bundle_id: int) -> list[Any]:
        with self.catalog.unit() as uow:
            return list(uow.session.execute(
                select(Copy.id, Copy.instance_fk, Copy.frame_offset.label("offset"),
                       Copy.frame_length.label("length"), Instance.size, Instance.sha256,
                       Instance.sop_uid)
                .join(Instance, Instance.id == Copy.instance_fk)
                .where(Copy.bundle_fk == bundle_id, Copy.state.in_(("ok", "corrupt")))
                .order_by(Copy.frame_offset)))

    def _read_back(self, b: Bundle, entries: list[Any]) -> tuple[list[Any], str | None]:
        """(entries whose frame is damaged, what is wrong with the whole object or None)."""
        self.limit.take(b.size)
        bad, good = [], set()
        try:
            with self.tier.open(b.key, version_id=b.version_id) as f:  # type: ignore[union-attr,call-arg]
                if isinstance(f, LocalFile):   # directory tier: read the device, not the cache
                    try:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    except (OSError, ValueError):
                        pass
                src = _Counting(f)
                for e in entries:
                    try:
                        skip_to(src, src.pos, e.offset)
                        extract_to(src, e.length, {"size": e.size, "sha256": e.sha256})
                        good.add(e.id)
                    except BundleError as err:
                        bad.append((e, str(err)))
                        if src.pos < e.offset + e.length:   # resynchronise at the next frame
                            skip_to(src, src.pos, e.offset + e.length)
                while src.read(_CHUNK):
                    pass
        except ObjectNotFound:
            return [(e, "bundle missing") for e in entries], "bundle missing from the tier"
        except BundleError as err:     # ends before a frame: everything after it is lost
            done = good | {e.id for e, _ in bad}
            return bad + [(e, str(err)) for e in entries if e.id not in done], str(err)
        whole = None
        if src.pos != b.size:
            whole = f"size {src.pos} != {b.size}"
        elif src.h.hexdigest() != b.sha256:
            whole = "bundle SHA-256 differs"
        return bad, whole

    def _scrub_bundle(self, run_id: int, b: Bundle, report: ScrubReport) -> None:
        entries = self._entries(b.id)
        try:
            bad, whole = self._read_back(b, entries)
        except BackendError as e:
            log.warning("scrub could not read bundle %s: %s", b.id, e)
            bad, whole = [(e_, "unreadable") for e_ in entries], f"unreadable: {e}"
        report.objects += 1
        report.bytes += b.size
        if not bad and whole is None:
            with self.catalog.unit(write=True) as uow:
                uow.session.execute(update(Bundle).where(Bundle.id == b.id)
                                    .values(verified_at=self.clock()))
                uow.commit()
            return
        with self.catalog.unit() as uow:
            study_uid = uow.session.scalar(select(Study.study_uid).where(Study.id == b.study_fk))
        for e, _ in bad:
            self._set_copy(e.id, "corrupt")
        source = self._rebundle(b, study_uid) if (bad or whole) else None
        log.error("scrub: bundle of study %s on %s damaged (%d instance frames%s); %s",
                  phi.token(study_uid), b.location, len(bad),
                  f", {whole}" if whole else "",
                  f"bundled again from {source}" if source else "no online copy to rebuild it")
        # Each finding with its instance id: two versions of one SOP UID are two objects.
        findings = [(Finding("corrupt" if source else "unrecoverable", b.location, b.key,
                             e.sop_uid, study_uid, source,
                             f"instance frame: {why}" + ("" if source else
                                                         "; no verified copy online or on the tier")),
                     e.instance_fk) for e, why in bad]
        if whole and not bad:
            # Every instance frame still verifies: the data is intact, the container is not.
            findings.append((Finding("corrupt", b.location, b.key, None, study_uid, source,
                                     f"{whole}; every instance frame verifies"), None))
        for f, inst in findings:
            report.findings.append(f)
            with self.catalog.unit(write=True) as uow:
                uow.session.add(ScrubFinding(run_fk=run_id, kind=f.kind, location=f.site,
                                             key=f.key, instance_fk=inst,
                                             repaired_from=f.repaired_from,
                                             detail=f.detail[:256], found_at=self.clock()))
                uow.commit()

    def _rebundle(self, b: Bundle, study_uid: str) -> str | None:
        """Bundle the study again from its online copies when every instance of the
        damaged bundle has one; the damaged bundle is retired by the migrator."""

        with self.catalog.unit() as uow:
            s = uow.session
            in_bundle = set(s.scalars(select(Copy.instance_fk).where(Copy.bundle_fk == b.id)))
            online = set(s.scalars(select(Copy.instance_fk).where(
                Copy.instance_fk.in_(in_bundle), Copy.location.in_(list(self.sites)),
                Copy.state == "ok").group_by(Copy.instance_fk).having(func.count() > 0)))
        if not in_bundle or online != in_bundle:
            return None
        copy_only = self.settings.model_copy(update={
            "lifecycle": self.settings.lifecycle.model_copy(update={"purge_online": False})})
        result = Migrator(self.catalog, list(self.sites.values()), self.tier,  # type: ignore[arg-type]
                          copy_only, clock=self.clock).run([study_uid])
        if result.studies and result.studies[0].outcome in ("migrated", "verified"):
            with self.catalog.unit() as uow:
                still = uow.session.scalar(select(func.count()).select_from(Copy).where(
                    Copy.instance_fk.in_(in_bundle), Copy.location == b.location,
                    Copy.state == "ok", Copy.bundle_fk != b.id))
            if still == len(in_bundle):
                return "online"
        return None
