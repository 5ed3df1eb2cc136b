"""Job runs: every run of a job is a row in ``job_runs`` with its outcome.

A run is recorded whether the scheduler in ``pacsvault serve`` started it, it
was made up after downtime ("catch-up"), or an operator ran the verb by hand
("manual"), so `pacsvault jobs` and `pacsvault status` show what actually ran.
A process killed mid-run leaves its row 'running'; it is shown as 'interrupted'
once its holder is gone (see ``settle_interrupted``).

Catch-up after downtime: APScheduler keeps its schedule in memory, so a daemon
that was down at 03:00 would not know it missed the 03:00 scrub. The catalog
does: ``missed_fire_time`` compares the cron's latest due time (within a grace
period) with the job's latest recorded run, and ``serve`` runs a missed job
once at start-up, however many times it was missed (coalesced).
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterator

from sqlalchemy import func, select, update

from archive.catalog.lease import LeaseHeld, holder_is_dead_here, new_holder
from archive.catalog.models import JobRun
from archive.catalog.uow import Catalog
from archive.clock import Clock, iso, utcnow

log = logging.getLogger("pacsvault.jobs")

OUTCOMES = ("running", "ok", "findings", "failed", "skipped", "interrupted")


@dataclass
class RunRecord:
    """What the body of ``recorded`` sets: the outcome and the counts to keep."""
    id: int
    outcome: str = "ok"
    summary: dict[str, Any] = field(default_factory=dict)


def _summary_text(summary: dict[str, Any]) -> str:
    text = json.dumps(summary, sort_keys=True, default=str)
    return text if len(text) <= 2000 else json.dumps({"truncated": True})


@contextmanager
def recorded(catalog: Catalog, job: str, trigger: str, *,
             scheduled_for: datetime | None = None, clock: Clock = utcnow) -> Iterator[RunRecord]:
    """Record one run of ``job``: a 'running' row now, the outcome at the end.
    LeaseHeld records 'skipped'; another exception records 'failed' (with the
    error's type only: messages may name a study). Both propagate."""
    with catalog.unit(write=True) as uow:
        row = JobRun(job=job, trigger=trigger, host=new_holder(), scheduled_for=scheduled_for,
                     started_at=clock(), outcome="running", summary="{}")
        uow.session.add(row)
        uow.commit()
        rec = RunRecord(row.id)
    try:
        yield rec
    except LeaseHeld:
        _finish(catalog, rec.id, "skipped", {"reason": "lease held by another run"}, clock)
        raise
    except BaseException as e:
        _finish(catalog, rec.id, "failed", {"error": type(e).__name__}, clock)
        raise
    _finish(catalog, rec.id, rec.outcome, rec.summary, clock)


def _finish(catalog: Catalog, run_id: int, outcome: str, summary: dict, clock: Clock) -> None:
    assert outcome in OUTCOMES, outcome
    with catalog.unit(write=True) as uow:
        uow.session.execute(update(JobRun).where(JobRun.id == run_id).values(
            outcome=outcome, summary=_summary_text(summary), finished_at=clock()))
        uow.commit()


def settle_interrupted(catalog: Catalog, clock: Clock = utcnow) -> int:
    """Mark 'running' rows whose process on this host is gone as 'interrupted'."""
    with catalog.unit(write=True) as uow:
        rows = uow.session.execute(select(JobRun.id, JobRun.host)
                                   .where(JobRun.outcome == "running")).all()
        dead = [r.id for r in rows if holder_is_dead_here(r.host)]
        if dead:
            uow.session.execute(update(JobRun).where(JobRun.id.in_(dead)).values(
                outcome="interrupted", finished_at=clock()))
            uow.commit()
    return len(dead)


def history(catalog: Catalog, job: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs first, as plain dicts (times in ISO 8601)."""
    q = select(JobRun).order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(limit)
    if job:
        q = q.where(JobRun.job == job)
    with catalog.unit() as uow:
        return [_as_dict(r) for r in uow.session.scalars(q)]


def latest(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """Each job's newest run, and when it last finished without trouble."""
    out: dict[str, dict[str, Any]] = {}
    with catalog.unit() as uow:
        s = uow.session
        newest = select(JobRun.job, func.max(JobRun.id).label("id")).group_by(JobRun.job).subquery()
        for r in s.scalars(select(JobRun).join(newest, newest.c.id == JobRun.id)):
            out[r.job] = {"last_run": _as_dict(r), "last_ok_at": None}
        for job, at in s.execute(select(JobRun.job, func.max(JobRun.finished_at))
                                 .where(JobRun.outcome == "ok").group_by(JobRun.job)):
            if job in out:
                out[job]["last_ok_at"] = iso(at)
    return out


def _as_dict(r: JobRun) -> dict[str, Any]:
    return {"id": r.id, "job": r.job, "trigger": r.trigger, "outcome": r.outcome,
            "scheduled_for": iso(r.scheduled_for), "started_at": iso(r.started_at),
            "finished_at": iso(r.finished_at), "summary": json.loads(r.summary or "{}")}


# -- catch-up after downtime -------------------------------------------------------
def last_fire_time(trigger, now: datetime, grace: timedelta) -> datetime | None:  # noqa: ANN001
    """The latest time in (now - grace, now] at which the cron trigger was due."""
    t = trigger.get_next_fire_time(None, now - grace)
    last = None
    while t is not None and t <= now:
        last = t
        t = trigger.get_next_fire_time(t, t + timedelta(seconds=1))
    return last


def missed_fire_time(catalog: Catalog, job: str, trigger, now: datetime,  # noqa: ANN001
                     grace: timedelta) -> datetime | None:
    """The due time of a run of ``job`` that nobody made (the daemon was down),
    or None. A job that never ran on this catalog has nothing to make up."""
    due = last_fire_time(trigger, now, grace)
    if due is None:
        return None
    with catalog.unit() as uow:
        started = uow.session.scalar(select(func.max(JobRun.started_at))
                                     .where(JobRun.job == job))
    if started is None:
        return None
    if started.tzinfo is None:
        started = started.replace(tzinfo=due.tzinfo)
    return due if started < due else None
