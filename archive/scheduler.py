"""Scheduled jobs inside `pacsvault serve` (APScheduler).

Each job has a cron schedule in the config and runs under a catalog lease named
``job:<name>``, so one run at a time even when two daemons share a PostgreSQL
catalog, or an operator runs the same verb by hand. After downtime a missed run
is made up once (coalesced), if it is less than a day late: by APScheduler
while the daemon runs, and at start-up from the catalog's record of runs
(archive/jobs.py), since a daemon that was down does not remember the schedule.
Every run, skipped and failed ones included, is a ``job_runs`` row.

Jobs now: ``migrate`` ([lifecycle].schedule), ``scrub`` ([scrub].schedule) and
``scrub-objects`` ([scrub].objects_schedule) and ``dr-write`` ([dr].schedule,
once recipients are configured) and ``drill`` ([drill].schedule).
"""
from __future__ import annotations

import logging
import re
import threading
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from archive import jobs
from archive.alerts import dr_alert, drill_alert, migrate_alert, scrub_alert, send_alert
from archive.clock import utcnow
from archive.config.schema import Settings

log = logging.getLogger("pacsvault.scheduler")

MISFIRE_GRACE_S = 24 * 3600
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def cron_trigger(expr: str) -> CronTrigger:
    """A 5-field crontab line with cron's meaning. APScheduler 3 numbers weekdays
    from Monday = 0, cron from Sunday = 0 (or 7): numeric weekdays are turned into
    names first, so "0 3 * * 0" runs on Sunday as every admin expects."""
    fields = expr.split()
    if len(fields) == 5:
        fields[4] = re.sub(r"\d+", lambda m: _DAYS[int(m.group())] if int(m.group()) <= 7
                           else m.group(), fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone="UTC")


def run_migrate_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                    scheduled_for: datetime | None = None) -> dict:
    """One policy run of the lifecycle migration; returns the report's totals."""
    from archive.bootstrap import open_catalog, open_object_tier, open_sites
    from archive.catalog import lease
    from tiers.migrate import Migrator

    catalog = open_catalog(settings)
    try:
        with jobs.recorded(catalog, "migrate", trigger, scheduled_for=scheduled_for) as rec:
            migrator = Migrator(catalog, open_sites(settings), open_object_tier(settings),
                                settings, stop=stop)
            try:
                with lease.lease(catalog, "job:migrate", what="the migrate job", ttl_s=120):
                    report = migrator.run()
            except lease.LeaseHeld as e:
                log.warning("scheduled migrate skipped: %s", e)
                rec.outcome, rec.summary = "skipped", {"reason": "lease held by another run"}
                return {"skipped": str(e)}
            totals = report.to_json()["totals"]
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = {**totals, "findings": len(report.findings)}
    finally:
        catalog.close()
    if not report.ok:
        send_alert(settings.alerts, migrate_alert(totals, len(report.findings), rec.id))
    level = logging.INFO if report.ok else logging.ERROR
    # Counts only: study UIDs and findings are in the CLI report, not the daemon log.
    log.log(level, "scheduled migrate: %d studies, %d instances, %d bytes moved, %d failed, "
                   "%d findings in %.1fs", totals["studies"], totals["instances"], totals["bytes"],
            totals["failed"], len(report.findings), totals["seconds"])
    return totals


def run_scrub_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                  scheduled_for: datetime | None = None) -> dict:
    """A scheduled scrub of every site (resumes an interrupted one)."""
    from archive.bootstrap import open_catalog, open_scrubber
    from archive.catalog import lease

    catalog = open_catalog(settings)
    try:
        with jobs.recorded(catalog, "scrub", trigger, scheduled_for=scheduled_for) as rec:
            scrubber = open_scrubber(settings, catalog, stop)
            try:
                with lease.lease(catalog, "job:scrub", what="the scrub job", ttl_s=120):
                    report = scrubber.run([s.name for s in settings.sites])
            except lease.LeaseHeld as e:
                log.warning("scheduled scrub skipped: %s", e)
                rec.outcome, rec.summary = "skipped", {"reason": "lease held by another run"}
                return {"skipped": str(e)}
            j = report.to_json()
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = scrub_summary(j)
    finally:
        catalog.close()
    alert = scrub_alert(j)
    if alert is not None:
        send_alert(settings.alerts, alert)
    log.log(logging.INFO if report.ok else logging.ERROR,
            "scheduled scrub run %d: %d copies, %d bytes, %d damaged, %d repaired, "
            "%d unrecoverable, %d orphans", j["run_id"], j["objects"], j["bytes"], j["damaged"],
            j["repaired"], j["unrecoverable"], j["orphans"])
    return j


def run_scrub_objects_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                          scheduled_for: datetime | None = None) -> dict:
    """A scheduled read-back of every study bundle on the object tier."""
    from archive.bootstrap import open_catalog, open_object_scrubber
    from archive.catalog import lease

    catalog = open_catalog(settings)
    try:
        with jobs.recorded(catalog, "scrub-objects", trigger, scheduled_for=scheduled_for) as rec:
            scrubber = open_object_scrubber(settings, catalog, stop)
            try:
                with lease.lease(catalog, "job:scrub", what="the scrub job", ttl_s=120):
                    report = scrubber.run()
            except lease.LeaseHeld as e:
                log.warning("scheduled object-tier scrub skipped: %s", e)
                rec.outcome, rec.summary = "skipped", {"reason": "lease held by another run"}
                return {"skipped": str(e)}
            j = report.to_json()
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = scrub_summary(j)
    finally:
        catalog.close()
    log.log(logging.INFO if report.ok else logging.ERROR,
            "scheduled object-tier scrub run %d: %d bundles, %d bytes, %d damaged, %d repaired, "
            "%d unrecoverable", j["run_id"], j["objects"], j["bytes"], j["damaged"],
            j["repaired"], j["unrecoverable"])
    alert = scrub_alert(j)
    if alert is not None:
        send_alert(settings.alerts, alert)
    return j


def run_dr_write_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                     scheduled_for: datetime | None = None) -> dict:
    """Write the studies not yet on a DR volume of the pool ([dr] device)."""
    from archive.bootstrap import open_catalog, open_object_tier_or_none, open_sites
    from archive.catalog import lease
    from dr.writer import DrWriter

    catalog = open_catalog(settings)
    try:
        with jobs.recorded(catalog, "dr-write", trigger, scheduled_for=scheduled_for) as rec:
            tier = open_object_tier_or_none(settings)
            writer = DrWriter(catalog, open_sites(settings),
                              tier if hasattr(tier, "open_range") else None, settings.dr,
                              recipients=list(settings.dr.recipients), stop=stop)
            try:
                report = writer.run()
            except lease.LeaseHeld as e:
                log.warning("scheduled DR write skipped: %s", e)
                rec.outcome, rec.summary = "skipped", {"reason": "lease held by another run"}
                return {"skipped": str(e)}
            j = report.to_json()
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = {k: j[k] for k in ("studies", "instances", "bytes", "stream_bytes",
                                             "pending_studies")} | {
                "volumes": [v["barcode"] for v in j["volumes"]]}
    finally:
        catalog.close()
    log.log(logging.INFO if report.ok else logging.ERROR,
            "scheduled DR write: %d studies, %d bytes on %d volumes (%s); %d studies pending%s",
            j["studies"], j["bytes"], len(j["volumes"]),
            ", ".join(v["barcode"] for v in j["volumes"]) or "none", j["pending_studies"],
            f"; load volume {j['next_barcode']}" if j["next_barcode"] else "")
    if not report.ok or j["next_barcode"]:
        send_alert(settings.alerts, dr_alert(j, rec.id))
    return j


def run_drill_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                  scheduled_for: datetime | None = None) -> dict:
    """A restore drill of [drill] tiers (DR needs the identity: not in the daemon)."""
    from archive.bootstrap import open_catalog, open_driller

    catalog = open_catalog(settings)
    try:
        with jobs.recorded(catalog, "drill", trigger, scheduled_for=scheduled_for) as rec:
            report = open_driller(settings, catalog, trigger="schedule", actor="pacsvault serve"
                                  ).run(list(settings.drill.tiers), settings.drill.sample)
            j = report.to_json()
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = {"drill_id": j["drill_id"], "seed": j["seed"],
                           "failures": len(j["failures"]),
                           "tiers": {t: f["instances"] for t, f in j["figures"].items()}}
    finally:
        catalog.close()
    log.log(logging.INFO if report.ok else logging.ERROR,
            "scheduled drill %d (seed %d): %s; %d failures", j["drill_id"], j["seed"],
            ", ".join(f"{t}: {f['instances']} instances in {f['time_to_last_s']}s"
                      for t, f in j["figures"].items()) or "nothing to drill", len(j["failures"]))
    if not report.ok:
        send_alert(settings.alerts, drill_alert(j))
    return j


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
    return out


def schedule_of(settings: Settings) -> list[dict]:
    """Each configured job's cron line and next due time (UTC)."""
    now = utcnow()
    return [{"job": name, "schedule": cron,
             "next_run": cron_trigger(cron).get_next_fire_time(None, now + timedelta(seconds=1))
             .isoformat()} for name, cron, _ in configured_jobs(settings)]


def _scheduled(fn, name: str, cron: str):  # noqa: ANN001, ANN202
    """The job body APScheduler calls: records the due time it ran for."""
    trigger = cron_trigger(cron)

    def run(settings: Settings, stop: threading.Event) -> dict:
        due = jobs.last_fire_time(trigger, utcnow() + timedelta(seconds=1),
                                  timedelta(seconds=MISFIRE_GRACE_S))
        return fn(settings, stop, "schedule", due)
    run.__name__ = f"{name}_job"
    return run


def start_scheduler(settings: Settings, stop: threading.Event) -> BackgroundScheduler | None:
    todo = configured_jobs(settings)
    if not todo:
        return None
    from archive.bootstrap import open_catalog

    sched = BackgroundScheduler(timezone="UTC", job_defaults={
        "coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S})
    catalog = open_catalog(settings)
    try:
        jobs.settle_interrupted(catalog)
        for name, cron, fn in todo:
            trigger = cron_trigger(cron)
            sched.add_job(_scheduled(fn, name, cron), trigger, args=(settings, stop),
                          id=name, name=name)
            missed = jobs.missed_fire_time(catalog, name, trigger, utcnow(),
                                           timedelta(seconds=MISFIRE_GRACE_S))
            if missed is not None:
                # Down when it was due: run it once now (not once per missed time).
                log.warning("job %s was due at %s while the daemon was down; running it now",
                            name, missed.isoformat(timespec="minutes"))
                sched.add_job(fn, "date", run_date=utcnow() + timedelta(seconds=2),
                              args=(settings, stop, "catch-up", missed), id=f"{name}-catch-up",
                              name=f"{name} (catch-up)")
    finally:
        catalog.close()
    sched.start()
    for job in sched.get_jobs():
        log.info("scheduled job %s: next run %s", job.id, job.next_run_time)
    return sched
