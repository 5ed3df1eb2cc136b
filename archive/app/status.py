"""What `pacsvault status` reports: per-site counts and health, replication debt."""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select, true

from archive import break_glass, jobs
from archive.app.catalog_backup import newest
from archive.app.rpo import exposure
from archive.app.scheduled import schedule_of
from archive.catalog import repo
from archive.catalog.models import (
    Bundle,
    Copy,
    DrVolume,
    Instance,
    RestoreRequest,
    ScrubFinding,
    ScrubRun,
    Series,
    Study,
)
from archive.catalog.uow import Catalog
from archive.clock import Clock, iso, utcnow
from archive.config.paths import site_risks
from archive.config.schema import Settings
from dr.custody import aware
from dr.format import GOOD_STATES
from tiers.backend import Backend


def _object_tier(settings: Settings, s, by_loc: dict, studies_by_loc: dict,  # noqa: ANN001
                 tier: Backend | None) -> dict[str, Any]:
    name = settings.objects.name
    counts = by_loc.get(name, {})
    bundles = {st: (int(n), int(b)) for st, n, b in s.execute(
        select(Bundle.state, func.count(), func.coalesce(func.sum(Bundle.size), 0))
        .where(Bundle.location == name).group_by(Bundle.state))}
    purging = s.scalar(select(func.count()).select_from(Copy).where(Copy.state == "purging")) or 0
    if tier is None:
        healthy, reason = False, "not configured"
    else:
        h = tier.health()
        healthy, reason = h.ok, h.reason
    return {
        "name": name,
        "kind": settings.objects.kind,
        "healthy": healthy,
        "health": reason,
        "objects": counts.get("ok", 0),          # instances with a verified object copy
        "bytes": counts.get("bytes_ok", 0),      # their uncompressed size
        "studies": studies_by_loc.get(name, 0),
        "corrupt": counts.get("corrupt", 0),
        "bundles": bundles.get("ok", (0, 0))[0],
        "stored_bytes": bundles.get("ok", (0, 0))[1],
        "corrupt_bundles": bundles.get("corrupt", (0, 0))[0],
        "purges_pending": purging,
    }


def _last_scrub(s) -> dict[str, Any] | None:  # noqa: ANN001
    """The newest finished scrub of the sites and what it found."""
    run = s.scalars(select(ScrubRun).where(ScrubRun.state == "done")
                    .order_by(ScrubRun.id.desc()).limit(1)).first()
    if run is None:
        return None
    kinds = dict(s.execute(select(ScrubFinding.kind, func.count())
                           .where(ScrubFinding.run_fk == run.id).group_by(ScrubFinding.kind)).all())
    return {"run_id": run.id, "sites": run.sites.split(","),
            "finished_at": iso(run.finished_at), "objects": run.objects, "bytes": run.bytes,
            "findings": run.findings, "repaired": run.repaired,
            "unrecoverable": kinds.get("unrecoverable", 0), "orphans": kinds.get("orphan", 0)}


def _jobs(settings: Settings, catalog: Catalog) -> dict[str, Any]:
    latest = jobs.latest(catalog)
    out = {}
    for sch in schedule_of(settings):
        out[sch["job"]] = {"schedule": sch["schedule"], "next_run": sch["next_run"],
                           "last_run": None, "last_ok_at": None}
    for name, facts in latest.items():
        out.setdefault(name, {"schedule": "", "next_run": None}).update(facts)
    return out


def collect(settings: Settings, catalog: Catalog, sites: list[Backend],
            clock: Clock = utcnow, tier: Backend | None = None) -> dict[str, Any]:
    with catalog.unit() as uow:
        s = uow.session
        by_loc = repo.counts_by_location(s)
        studies_by_loc = repo.studies_by_location(s)
        instances = s.scalar(select(func.count()).select_from(Instance)) or 0
        total_bytes = s.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0
        studies = s.scalar(select(func.count()).select_from(Study)) or 0
        conflicts = s.scalar(select(func.count()).select_from(Instance)
                             .where(Instance.conflict == true())) or 0
        reused_series = s.scalar(select(func.count(func.distinct(Series.series_uid)))
                                 .where(Series.uid_reused == true())) or 0
        oldest = repo.oldest_missing(s)
        objects = _object_tier(settings, s, by_loc, studies_by_loc, tier)
        last_scrub = _last_scrub(s)
        unprotected = exposure(s, settings, clock)
        queued = s.execute(select(RestoreRequest.barcodes).where(
            RestoreRequest.state == "pending")).scalars().all()
        atna = _atna_backlog(s, settings, clock)
        # Every DR volume carries a catalog snapshot taken when it was opened.
        newest_volume = s.execute(select(DrVolume.barcode, DrVolume.created_at).where(
            DrVolume.pool == settings.dr.pool, DrVolume.state.in_(GOOD_STATES))
            .order_by(DrVolume.created_at.desc()).limit(1)).first()
    job_table = _jobs(settings, catalog)
    # The newest catalog backup on each place (catalog backup): name and age.
    backups = {p.name: newest(p, clock) for p in [*sites, *([tier] if tier is not None else [])]
               if p.health().ok}
    if newest_volume is not None:
        backups[f"dr:{settings.dr.pool}"] = {
            "name": newest_volume.barcode,
            "age_s": max(0.0, (clock() - aware(newest_volume.created_at)).total_seconds())}
    site_rows = []
    under = 0
    for site in sites:
        h = site.health()
        counts = by_loc.get(site.name, {})
        missing = counts.get("missing", 0)
        under += missing
        site_rows.append({
            "name": site.name,
            "path": str(getattr(site, "root", "")),
            "healthy": h.ok,
            "health": h.reason,
            "free_bytes": h.free_bytes,
            "objects": counts.get("ok", 0),
            "bytes": counts.get("bytes_ok", 0),
            "studies": studies_by_loc.get(site.name, 0),
            "missing": missing,
            "corrupt": counts.get("corrupt", 0),
        })
    oldest_age = None
    if oldest is not None:
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=clock().tzinfo)
        oldest_age = max(0.0, (clock() - oldest).total_seconds())
    return {
        "ae_title": settings.dicom.ae_title,
        "dicom_port": settings.dicom.port,
        "catalog": settings.catalog.url.split("://", 1)[0],
        "instances": instances,
        "studies": studies,
        "bytes": int(total_bytes),
        "conflicts": conflicts,
        # Series UIDs sent in more than one study (kept apart per study).
        "series_uid_reused": reused_series,
        "under_replicated": under,
        "oldest_under_replicated_age_s": oldest_age,
        "sites": site_rows,
        "object_tier": objects,
        "last_scrub": last_scrub,
        # Acknowledged data not yet protected at each level (RPO exposure).
        "unprotected": unprotected,
        "jobs": job_table,
        "catalog_backups": backups,
        # Audit records the ATNA collector has not taken yet (they wait in the trail).
        "atna": atna,
        # Break-glass access: sealed, open (until when, why) or broken (make a new seal).
        "emergency": break_glass.state(settings.data_dir),
        # Studies a retrieve needed from DR volumes, waiting for `restore --queued`.
        "restore_queue": {"studies": len(queued), "volumes": sorted(
            {b for row in queued for b in json.loads(row)})},
        # Configuration that weakens protection (e.g. both sites on one filesystem).
        "risks": site_risks(settings),
        # Damage a scrub could not repair keeps the install unhealthy until dealt with.
        "healthy": all(r["healthy"] and not r["corrupt"] for r in site_rows) and under == 0
        and objects["healthy"] and not objects["corrupt"],
    }


def _atna_backlog(s, settings: Settings, clock: Clock) -> dict[str, Any] | None:  # noqa: ANN001
    if not settings.audit.syslog:
        return None
    from archive.catalog.models import AtnaCursor, AuditRecord
    from archive.config.syslog_url import parse_url
    scheme, host, port = parse_url(settings.audit.syslog)
    collector = f"{scheme}://{host}:{port}"
    cur = s.scalar(select(AtnaCursor.last_id).where(AtnaCursor.collector == collector))
    if cur is None:
        return {"collector": collector, "waiting": 0, "oldest_age_s": None}
    waiting = s.scalar(select(func.count()).select_from(AuditRecord)
                       .where(AuditRecord.id > cur)) or 0
    oldest = s.scalar(select(AuditRecord.at).where(AuditRecord.id == cur + 1)) if waiting else None
    return {"collector": collector, "waiting": waiting,
            "oldest_age_s": max(0.0, (clock() - aware(oldest)).total_seconds())
            if oldest is not None else None}
