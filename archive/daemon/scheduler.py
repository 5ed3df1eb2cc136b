"""Scheduled jobs inside `pacsvault serve` (APScheduler wiring only; the job
bodies are archive/app/scheduled.py).

Each job has a cron schedule in the config and runs under a catalog lease named
``job:<name>``, so one run at a time even when two daemons share a PostgreSQL
catalog, or an operator runs the same verb by hand. After downtime a missed run
is made up once (coalesced), if it is less than a day late: by APScheduler
while the daemon runs, and at start-up from the catalog's record of runs
(archive/jobs.py), since a daemon that was down does not remember the schedule.
Every run, skipped and failed ones included, is a ``job_runs`` row.
"""
from __future__ import annotations

import logging
import threading
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from archive import jobs
from archive.app.compose import open_catalog
from archive.app.scheduled import configured_jobs
from archive.clock import utcnow
from archive.config.cron import cron_trigger
from archive.config.schema import Settings

log = logging.getLogger("pacsvault.scheduler")

MISFIRE_GRACE_S = 24 * 3600



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
