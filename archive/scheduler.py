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
once recipients are configured) and ``drill`` ([drill].schedule) and
``audit-verify`` ([audit].verify_schedule: the keyed audit chain, checked).
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from archive import audit, jobs
from archive.alerts import Alert, audit_alert, dr_alert, drill_alert, migrate_alert, scrub_alert, send_alert
from archive.catalog.uow import Catalog
from archive.clock import utcnow
from archive.config.schema import Settings

log = logging.getLogger("pacsvault.scheduler")

MISFIRE_GRACE_S = 24 * 3600
DAEMON = "pacsvault serve"       # the actor the audit trail names for scheduled jobs
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


@dataclass
class Outcome:
    """What a job body hands back to ``_run_job``."""
    report: dict                 # returned to the caller (tests, catch-up)
    ok: bool
    summary: dict                # kept in job_runs: counts only
    line: str                    # the daemon log line: counts only, no UIDs
    alert: Alert | None = None


def _run_job(settings: Settings, name: str, trigger: str, scheduled_for: datetime | None,
             body: Callable[[Catalog, int], Outcome], lease_name: str | None) -> dict:
    """Run one job: recorded in job_runs, under its lease (skipped if another run
    holds it), logged with counts only, alerting when the body says so."""
    from archive.bootstrap import open_catalog
    from archive.catalog import lease

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
    from archive.bootstrap import open_object_tier, open_sites
    from tiers.migrate import Migrator

    def body(catalog: Catalog, run_id: int) -> Outcome:
        report = Migrator(catalog, open_sites(settings), open_object_tier(settings), settings,
                          stop=stop).run()
        t = report.to_json()["totals"]
        n = len(report.findings)
        from archive.cli.tiering import audit_migration
        audit_migration(catalog, DAEMON, report)
        return Outcome(t, report.ok, {**t, "findings": n},
                       f"{t['studies']} studies, {t['instances']} instances, {t['bytes']} bytes "
                       f"moved, {t['failed']} failed, {n} findings in {t['seconds']:.1f}s",
                       None if report.ok else migrate_alert(t, n, run_id))
    return _run_job(settings, "migrate", trigger, scheduled_for, body, "job:migrate")


def _scrub_outcome(catalog: Catalog, j: dict, what: str) -> Outcome:
    from archive.cli.scrub import audit_findings

    audit_findings(catalog, DAEMON, j)
    return Outcome(j, j["ok"], scrub_summary(j),
                   f"run {j['run_id']}: {j['objects']} {what}, {j['bytes']} bytes, {j['damaged']} "
                   f"damaged, {j['repaired']} repaired, {j['unrecoverable']} unrecoverable, "
                   f"{j['orphans']} orphans", scrub_alert(j))


def run_scrub_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                  scheduled_for: datetime | None = None) -> dict:
    """A scheduled scrub of every site (resumes an interrupted one)."""
    from archive.bootstrap import open_scrubber

    def body(catalog: Catalog, run_id: int) -> Outcome:
        report = open_scrubber(settings, catalog, stop).run([s.name for s in settings.sites])
        return _scrub_outcome(catalog, report.to_json(), "copies")
    return _run_job(settings, "scrub", trigger, scheduled_for, body, "job:scrub")


def run_scrub_objects_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                          scheduled_for: datetime | None = None) -> dict:
    """A scheduled read-back of every study bundle on the object tier."""
    from archive.bootstrap import open_object_scrubber

    def body(catalog: Catalog, run_id: int) -> Outcome:
        return _scrub_outcome(catalog, open_object_scrubber(settings, catalog, stop).run().to_json(),
                              "bundles")
    return _run_job(settings, "scrub-objects", trigger, scheduled_for, body, "job:scrub")


def run_dr_write_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                     scheduled_for: datetime | None = None) -> dict:
    """Write the studies not yet on a DR volume of the pool ([dr] device)."""
    from archive.bootstrap import open_object_tier_or_none, open_sites
    from dr.signing import writer_key
    from dr.writer import DrWriter

    def body(catalog: Catalog, run_id: int) -> Outcome:
        tier = open_object_tier_or_none(settings)
        report = DrWriter(catalog, open_sites(settings),
                          tier if hasattr(tier, "open_range") else None, settings.dr,
                          recipients=list(settings.dr.recipients),
                          signing_key=writer_key(settings.data_dir), stop=stop).run()
        j = report.to_json()
        from archive.cli.dr import audit_volumes
        audit_volumes(catalog, DAEMON, j)
        return Outcome(j, report.ok, report.summary(),
                       f"{j['studies']} studies, {j['bytes']} bytes on {len(j['volumes'])} "
                       f"volumes ({', '.join(v['barcode'] for v in j['volumes']) or 'none'}); "
                       f"{j['pending_studies']} studies pending"
                       + (f"; load volume {j['next_barcode']}" if j["next_barcode"] else ""),
                       dr_alert(j, run_id) if not report.ok or j["next_barcode"] else None)
    return _run_job(settings, "dr-write", trigger, scheduled_for, body, None)


def run_drill_job(settings: Settings, stop: threading.Event, trigger: str = "schedule",
                  scheduled_for: datetime | None = None) -> dict:
    """A restore drill of [drill] tiers (DR needs the identity: not in the daemon)."""
    from archive.bootstrap import open_driller

    def body(catalog: Catalog, run_id: int) -> Outcome:
        report = open_driller(settings, catalog, trigger="schedule", actor=DAEMON
                              ).run(list(settings.drill.tiers), settings.drill.sample)
        j = report.to_json()
        from archive.cli.drill import audit_drill
        audit_drill(catalog, DAEMON, j)
        figures = ", ".join(f"{t}: {f['instances']} instances in {f['time_to_last_s']}s"
                            for t, f in j["figures"].items()) or "nothing to drill"
        return Outcome(j, report.ok, report.summary(),
                       f"drill {j['drill_id']} (seed {j['seed']}): {figures}; "
                       f"{len(j['failures'])} failures",
                       None if report.ok else drill_alert(j))
    return _run_job(settings, "drill", trigger, scheduled_for, body, "job:drill")


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
    return _run_job(settings, "audit-verify", trigger, scheduled_for, body, "job:audit-verify")


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
