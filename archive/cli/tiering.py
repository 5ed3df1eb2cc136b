"""`pacsvault migrate` and `pacsvault recall`: the object tier by hand."""
from __future__ import annotations

import sys

import click

from archive import audit, jobs
from archive.app.audit_records import audit_migration
from archive.app.compose import open_catalog, open_migrator, open_recaller
from archive.catalog import lease
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.cli.progress import progress_bar
from tiers.migrate import Migrator

EXIT_INCOMPLETE = 1   # something failed or was damaged: the report says what


@click.command()
@click.option("--study", "studies", metavar="UID", multiple=True,
              help="Migrate this study now, whatever the policy says (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print what would move and how many bytes, and "
              "which rule keeps each other study online; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def migrate(ctx: click.Context, studies: tuple[str, ...], dry_run: bool, as_json: bool,
            config: str | None) -> None:
    """Move aging studies to the object tier, verified, then free their online copies.

    Without --study the [lifecycle] rules of the config pick the studies. Each
    study becomes one bundle on the object tier; its online copies are deleted
    only after the bundle has been verified on the tier and every instance in it
    matches the catalog SHA-256. A run that was interrupted is resumed by the
    next one. Exits 1 if any study failed or damage was found (see the report).
    """
    settings = settings_from(ctx, config)
    actor = authorize(settings, "operate", "migrate")
    catalog = open_catalog(settings)
    try:
        migrator = open_migrator(settings, catalog)
        if studies or dry_run:
            report = _run(migrator, list(studies) or None, dry_run, as_json)
        else:
            # A policy run is a job: one at a time across processes and daemons,
            # and recorded with the scheduled runs.
            with jobs.recorded(catalog, "migrate", "manual") as rec, \
                    lease.lease(catalog, "job:migrate", what="the migrate job", ttl_s=120):
                report = _run(migrator, None, False, as_json)
                rec.outcome = "ok" if report.ok else "findings"
                rec.summary = {**report.to_json()["totals"], "findings": len(report.findings)}
        if not dry_run:
            audit_migration(catalog, actor.name, report)
    finally:
        catalog.close()
    if as_json:
        emit_json(report.to_json())
    else:
        _print(report)
    _tell(report)
    if not report.ok and not dry_run:
        sys.exit(EXIT_INCOMPLETE)


def _run(migrator: Migrator, studies: list[str] | None, dry_run: bool, quiet: bool):  # noqa: ANN202
    if dry_run:
        return migrator.run(studies, dry_run=True)
    planned = len(studies) if studies else None
    with progress_bar("migrating studies", planned, quiet) as advance:
        migrator.progress = advance
        return migrator.run(studies)


def _print(report) -> None:  # noqa: ANN001
    t = report.to_json()["totals"]
    verb = "would move" if report.dry_run else "moved"
    for s in report.studies:
        click.echo(f"{s.outcome:9} {s.study_uid}  {s.instances} instances  {s.bytes} bytes"
                   f"  ({s.reason})")
    for k in report.kept:     # a dry run: what kept each other study online
        click.echo(f"{'kept':9} {k.study_uid}  {k.instances} instances  {k.bytes} bytes"
                   f"  ({k.reason}: {k.detail})")
    click.echo(f"{verb} {t['studies']} studies, {t['instances']} instances, {t['bytes']} bytes "
               f"to {report.tier}" + ("" if report.dry_run else
                                       f"; {t['purged_copies']} online copies freed"
                                       f" in {t['seconds']}s"))


def _tell(report) -> None:  # noqa: ANN001
    """Findings and failures go to stderr in every mode: a cron job's mail shows them."""
    for f in report.findings:
        click.echo(f"FINDING {f.kind}: study {f.study_uid}"
                   + (f" instance {f.sop_uid}" if f.sop_uid else "") + f": {f.detail}", err=True)
    for s in report.studies:
        if s.outcome == "failed":
            click.echo(f"FAILED study {s.study_uid}: {s.reason}", err=True)
    if report.failed:
        click.echo(f"{report.failed} studies failed; run again once the cause is fixed", err=True)


@click.command()
@click.argument("study_uid")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def recall(ctx: click.Context, study_uid: str, as_json: bool, config: str | None) -> None:
    """Bring a migrated study back onto the online sites, verified.

    Every instance is read from its study bundle, checked against the catalog
    SHA-256 and written to each healthy site. The object copy is kept, so when
    the study ages again it is migrated without re-uploading. Exits 1 if any
    instance could not be recalled.
    """
    settings = settings_from(ctx, config)
    actor = authorize(settings, "operate", "recall")
    catalog = open_catalog(settings)
    try:
        recaller = open_recaller(settings, catalog)
        with progress_bar("recalling instances", None, as_json) as advance:
            recaller.progress = advance
            report = recaller.recall(study_uid)
        audit.record_studies(catalog, "recall", actor.name, {report.study_uid: {
            "instances": report.recalled, "failed": len(report.failures)}},
            outcome_of=lambda d: "failure" if d["failed"] else "success")
    finally:
        catalog.close()
    for f in report.failures:
        click.echo(f"FAILED instance {f['sop_uid']}: {f['reason']}", err=True)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(f"recalled {report.recalled} of {report.instances} instances "
                   f"({report.already_online} already online, {report.bytes} bytes) "
                   f"to {', '.join(report.sites)} in {report.seconds}s")
    if not report.ok:
        sys.exit(EXIT_INCOMPLETE)
