"""Scheduled jobs inside `pacsvault serve` (APScheduler).

Each job has a cron schedule in the config and runs under a catalog lease named
``job:<name>``, so one run at a time even when two daemons share a PostgreSQL
catalog, or an operator runs the same verb by hand. After downtime a missed run
is made up once (coalesced), if it is less than a day late.

Jobs now: ``migrate`` ([lifecycle].schedule) and ``scrub`` ([scrub].schedule).
DR writes and drills join this table as they arrive.
"""
from __future__ import annotations

import logging
import re
import threading

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

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


def run_migrate_job(settings: Settings, stop: threading.Event) -> dict:
    """One policy run of the lifecycle migration; returns the report's totals."""
    from archive.bootstrap import open_catalog, open_object_tier, open_sites
    from archive.catalog import lease
    from tiers.migrate import Migrator

    catalog = open_catalog(settings)
    try:
        migrator = Migrator(catalog, open_sites(settings), open_object_tier(settings), settings,
                            stop=stop)
        try:
            with lease.lease(catalog, "job:migrate", what="the migrate job", ttl_s=120):
                report = migrator.run()
        except lease.LeaseHeld as e:
            log.warning("scheduled migrate skipped: %s", e)
            return {"skipped": str(e)}
    finally:
        catalog.close()
    totals = report.to_json()["totals"]
    level = logging.INFO if report.ok else logging.ERROR
    # Counts only: study UIDs and findings are in the CLI report, not the daemon log.
    log.log(level, "scheduled migrate: %d studies, %d instances, %d bytes moved, %d failed, "
                   "%d findings in %.1fs", totals["studies"], totals["instances"], totals["bytes"],
            totals["failed"], len(report.findings), totals["seconds"])
    return totals


def run_scrub_job(settings: Settings, stop: threading.Event) -> dict:
    """A scheduled scrub of every site (resumes an interrupted one)."""
    from archive.bootstrap import open_catalog, open_scrubber
    from archive.catalog import lease

    catalog = open_catalog(settings)
    try:
        scrubber = open_scrubber(settings, catalog, stop)
        try:
            with lease.lease(catalog, "job:scrub", what="the scrub job", ttl_s=120):
                report = scrubber.run([s.name for s in settings.sites])
        except lease.LeaseHeld as e:
            log.warning("scheduled scrub skipped: %s", e)
            return {"skipped": str(e)}
    finally:
        catalog.close()
    j = report.to_json()
    log.log(logging.INFO if report.ok else logging.ERROR,
            "scheduled scrub run %d: %d copies, %d bytes, %d damaged, %d repaired, "
            "%d unrecoverable, %d orphans", j["run_id"], j["objects"], j["bytes"], j["damaged"],
            j["repaired"], j["unrecoverable"], j["orphans"])
    return j


def start_scheduler(settings: Settings, stop: threading.Event) -> BackgroundScheduler | None:
    jobs = []
    if settings.lifecycle.schedule.strip():
        jobs.append(("migrate", settings.lifecycle.schedule, run_migrate_job))
    if settings.scrub.schedule.strip():
        jobs.append(("scrub", settings.scrub.schedule, run_scrub_job))
    if not jobs:
        return None
    sched = BackgroundScheduler(timezone="UTC", job_defaults={
        "coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S})
    for name, cron, fn in jobs:
        sched.add_job(fn, cron_trigger(cron), args=(settings, stop),
                      id=name, name=name)
    sched.start()
    for job in sched.get_jobs():
        log.info("scheduled job %s: next run %s", job.id, job.next_run_time)
    return sched
