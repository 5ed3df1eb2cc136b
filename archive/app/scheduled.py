"""The scheduled jobs' bodies: what each job runs, how its run is recorded
(``job_runs``), leased, logged and alerted. The daemon's scheduler calls them on
their cron lines (archive/daemon/scheduler.py); tests and catch-up runs call them
directly.

Jobs now: ``migrate`` ([lifecycle].schedule), ``scrub`` ([scrub].schedule) and
``scrub-objects`` ([scrub].objects_schedule) and ``dr-write`` ([dr].schedule,
once recipients are configured) and ``drill`` ([drill].schedule) and
``audit-verify`` ([audit].verify_schedule: the keyed audit chain, checked) and
``catalog-backup`` ([catalog].backup_schedule).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from archive import audit, jobs
from archive.alerts import (
    Alert,
    audit_alert,
    dr_alert,
    drill_alert,
    migrate_alert,
    scrub_alert,
    send_alert,
)
from archive.app.audit_records import (
    audit_drill,
    audit_findings,
    audit_migration,
    audit_volumes,
)
from archive.app.compose import (
    open_catalog,
    open_dr_writer,
    open_driller,
    open_migrator,
    open_object_scrubber,
    open_scrubber,
)
from archive.catalog import lease
from archive.catalog.uow import Catalog
from archive.clock import utcnow
from archive.config.cron import cron_trigger
from archive.config.schema import Settings

log = logging.getLogger("pacsvault.scheduler")

DAEMON = "pacsvault serve"       # the actor the audit trail names for scheduled jobs


@dataclass
class Outcome:
    """What a job body hands back to ``_run_job``."""
    report: dict                 # returned to the caller (tests, catch-up)
    ok: bool
    summary: dict                # kept in job_runs: counts only
    line: str                    # the daemon log line: counts only, no UIDs
    alert: Alert | None = None


def run_job(settings: Settings, name: str, trigger: str, scheduled_for: datetime | None,
             body: Callable[[Catalog, int], Outcome], lease_name: str | None) -> dict:
    """Run one job: recorded in job_runs, under its lease (skipped if another run
    holds it), logged with counts only, alerting when the body says so."""

    catalog = open_catalog(settings)
    try:
        with jobs.recorded(catalog, name, trigger, scheduled_for=scheduled_for) as rec:
            try:
                if lease_name is None:           # the body takes its own lease
                    out = body(catalog, rec.id)
                else:
                    with lease.lease(catalog, lease_name, what=f"the {name} job", ttl_s=120):
                        out = body(catalog, rec.id)
            except lease.LeaseHeld as e:
                log.warning("scheduled %s skipped: %s", name, e)
                rec.outcome, rec.summary = "skipped", {"reason": "lease held by another run"}
                return {"skipped": str(e)}
            rec.outcome = "ok" if out.ok else "findings"
            rec.summary = out.summary
    finally:
        catalog.close()
    log.log(logging.INFO if out.ok else logging.ERROR, "scheduled %s: %s", name, out.line)
    if out.alert is not None:
        send_alert(settings.alerts, out.alert)
    return out.report


def run_migrate_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                    scheduled_for: datetime | None = None) -> dict:
    """One policy run of the lifecycle migration; returns the report's totals."""

    def body(catalog: Catalog, run_id: int) -> Outcome:
        report = open_migrator(settings, catalog, stop).run()
        t = report.to_json()["totals"]
        n = len(report.findings)
        audit_migration(catalog, DAEMON, report)
        return Outcome(t, report.ok, {**t, "findings": n},
                       f"{t['studies']} studies, {t['instances']} instances, {t['bytes']} bytes "
                       f"moved, {t['failed']} failed, {n} findings in {t['seconds']:.1f}s",
                       None if report.ok else migrate_alert(t, n, run_id))
    return run_job(settings, "migrate", trigger, scheduled_for, body, "job:migrate")


def _scrub_outcome(catalog: Catalog, j: dict, what: str) -> Outcome:

    audit_findings(catalog, DAEMON, j)
    return Outcome(j, j["ok"], scrub_summary(j),
                   f"run {j['run_id']}: {j['objects']} {what}, {j['bytes']} bytes, {j['damaged']} "
                   f"damaged, {j['repaired']} repaired, {j['unrecoverable']} unrecoverable, "
                   f"{j['orphans']} orphans", scrub_alert(j))


def run_scrub_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                  scheduled_for: datetime | None = None) -> dict:
    """A scheduled scrub of every site (resumes an interrupted one)."""

    def body(catalog: Catalog, run_id: int) -> Outcome:
        report = open_scrubber(settings, catalog, stop).run([s.name for s in settings.sites])
        return _scrub_outcome(catalog, report.to_json(), "copies")
    return run_job(settings, "scrub", trigger, scheduled_for, body, "job:scrub")


def run_scrub_objects_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                          scheduled_for: datetime | None = None) -> dict:
    """A scheduled read-back of every study bundle on the object tier."""

    def body(catalog: Catalog, run_id: int) -> Outcome:
        return _scrub_outcome(catalog, open_object_scrubber(settings, catalog, stop).run().to_json(),
                              "bundles")
    return run_job(settings, "scrub-objects", trigger, scheduled_for, body, "job:scrub")


def run_dr_write_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                     scheduled_for: datetime | None = None) -> dict:
    """Write the studies not yet on a DR volume of the pool ([dr] device)."""

    def body(catalog: Catalog, run_id: int) -> Outcome:
        report = open_dr_writer(settings, catalog, recipients=list(settings.dr.recipients),
                                stop=stop).run()
        j = report.to_json()
        audit_volumes(catalog, DAEMON, j)
        return Outcome(j, report.ok, report.summary(),
                       f"{j['studies']} studies, {j['bytes']} bytes on {len(j['volumes'])} "
                       f"volumes ({', '.join(v['barcode'] for v in j['volumes']) or 'none'}); "
                       f"{j['pending_studies']} studies pending"
                       + (f"; load volume {j['next_barcode']}" if j["next_barcode"] else ""),
                       dr_alert(j, run_id) if not report.ok or j["next_barcode"] else None)
    return run_job(settings, "dr-write", trigger, scheduled_for, body, None)


def run_drill_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                  scheduled_for: datetime | None = None) -> dict:
    """A restore drill of [drill] tiers (DR needs the identity: not in the daemon)."""

    def body(catalog: Catalog, run_id: int) -> Outcome:
        report = open_driller(settings, catalog, trigger="schedule", actor=DAEMON
                              ).run(list(settings.drill.tiers), settings.drill.sample)
        j = report.to_json()
        audit_drill(catalog, DAEMON, j)
        figures = ", ".join(f"{t}: {f['instances']} instances in {f['time_to_last_s']}s"
                            for t, f in j["figures"].items()) or "nothing to drill"
        return Outcome(j, report.ok, report.summary(),
                       f"drill {j['drill_id']} (seed {j['seed']}): {figures}; "
                       f"{len(j['failures'])} failures",
                       None if report.ok else drill_alert(j))
    return run_job(settings, "drill", trigger, scheduled_for, body, "job:drill")


def run_audit_verify_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                         scheduled_for: datetime | None = None) -> dict:
    """Check the audit chain under the install's key; a broken chain or a missing key
    is a critical alert (no record contents in it: the position and why)."""
    def body(catalog: Catalog, run_id: int) -> Outcome:
        r = audit.verify(catalog, audit.key_path(settings.data_dir))
        bad = r["first_bad"] or {}
        summary = {"records": r["records"], "checkpoints": r["checkpoints"],
                   **({"position": bad["position"]} if bad.get("position") is not None else {})}
        line = (f"{r['records']} records intact" if r["ok"] else
                f"BROKEN at record {bad['position']}: {bad['why']}" if bad.get("position")
                is not None else f"cannot be verified: {bad['why']}")
        return Outcome(r, r["ok"], summary, line, None if r["ok"] else audit_alert(r, run_id))
    return run_job(settings, "audit-verify", trigger, scheduled_for, body, "job:audit-verify")


def run_catalog_backup_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                           scheduled_for: datetime | None = None) -> dict:
    """A catalog backup to every place (archive/app/catalog_backup.py); a place that
    cannot take it is a warning alert."""
    from archive.app.catalog_backup import backup
    from archive.app.compose import open_object_tier_or_none, open_sites

    def body(catalog: Catalog, run_id: int) -> Outcome:
        tier = open_object_tier_or_none(settings)
        report = backup(settings, catalog, open_sites(settings),
                        tier if tier.health().ok else None)
        if not tier.health().ok:
            report.places[settings.objects.name] = "failed: unreachable"
        j = report.to_json()
        failed = sorted(k for k, v in report.places.items() if v.startswith("failed"))
        summary = {"bytes": report.bytes, "written": sum(v == "written" for v in
                                                         report.places.values()),
                   "failed": len(failed), "removed": report.removed}
        return Outcome(j, report.ok, summary,
                       f"{report.name}, {report.bytes} bytes: "
                       + ", ".join(f"{k} {v.split(':')[0]}" for k, v in report.places.items()),
                       None if report.ok else Alert(
                           "catalog-backup", "warning", "a catalog backup could not be "
                           "written to " + ", ".join(failed or ["any place"]),
                           counts={"places_failed": len(failed)}, run_id=run_id))
    return run_job(settings, "catalog-backup", trigger, scheduled_for, body, "job:catalog-backup")


def scrub_summary(j: dict) -> dict:
    """A scrub report's counts, for job_runs and alerts (no UIDs)."""
    return {k: j[k] for k in ("run_id", "objects", "bytes", "damaged", "repaired",
                              "unrecoverable", "orphans")} | {"skipped_sites": len(j["skipped_sites"])}


def configured_jobs(settings: Settings) -> list[tuple[str, str, object]]:
    """(name, cron, function) of every job with a schedule in the config."""
    out = []
    if settings.lifecycle.schedule.strip():
        out.append(("migrate", settings.lifecycle.schedule, run_migrate_job))
    if settings.scrub.schedule.strip():
        out.append(("scrub", settings.scrub.schedule, run_scrub_job))
    if settings.scrub.objects_schedule.strip():
        out.append(("scrub-objects", settings.scrub.objects_schedule, run_scrub_objects_job))
    if settings.dr.schedule.strip() and settings.dr.recipients:
        out.append(("dr-write", settings.dr.schedule, run_dr_write_job))
    if settings.drill.schedule.strip():
        out.append(("drill", settings.drill.schedule, run_drill_job))
    if settings.audit.verify_schedule.strip():
        out.append(("audit-verify", settings.audit.verify_schedule, run_audit_verify_job))
    if settings.catalog.backup_schedule.strip():
        out.append(("catalog-backup", settings.catalog.backup_schedule, run_catalog_backup_job))
    return out


def schedule_of(settings: Settings) -> list[dict]:
    """Each configured job's cron line and next due time (UTC)."""
    now = utcnow()
    return [{"job": name, "schedule": cron,
             "next_run": cron_trigger(cron).get_next_fire_time(None, now + timedelta(seconds=1))
             .isoformat()} for name, cron, _ in configured_jobs(settings)]
