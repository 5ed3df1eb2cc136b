"""`pacsvault jobs`: what the scheduler (and operators) ran, and how it ended."""
from __future__ import annotations

import click

from archive import jobs as job_runs
from archive.app.compose import open_catalog
from archive.app.scheduled import schedule_of
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)


@click.command()
@click.option("--job", default=None, metavar="NAME", help="Only this job (migrate, scrub, ...).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many runs, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def jobs(ctx: click.Context, job: str | None, limit: int, as_json: bool,
         config: str | None) -> None:
    """The schedule, and the newest job runs with their outcome.

    Every run is listed: scheduled ones, ones made up after the daemon was down
    ("catch-up") and ones started by hand ("manual"). Outcomes: ok, findings
    (the run found damage or failures; see its report), failed, skipped (another
    run held the job), interrupted (its process died), running.
    """
    settings = settings_from(ctx, config)
    authorize(settings, "read", "jobs")
    catalog = open_catalog(settings)
    try:
        job_runs.settle_interrupted(catalog)
        runs = job_runs.history(catalog, job, limit)
    finally:
        catalog.close()
    sched = schedule_of(settings)
    if as_json:
        emit_json({"schedule": sched, "runs": runs})
        return
    for s in sched:
        click.echo(f"{s['job']:8} schedule \"{s['schedule']}\" next {s['next_run']}")
    if not runs:
        click.echo("no runs recorded yet")
    for r in runs:
        counts = ", ".join(f"{k} {v}" for k, v in r["summary"].items())
        click.echo(f"{r['started_at']}  {r['job']:8} {r['trigger']:9} {r['outcome']:11} {counts}")
