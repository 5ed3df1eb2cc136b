"""`pacsvault replicate`: catch-up replication now, or rebuild a whole site."""
from __future__ import annotations

import sys
from contextlib import ExitStack

import click

from archive import jobs
from archive.app.compose import open_catalog, open_scrubber, open_sites
from archive.catalog import lease
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.cli.progress import progress_bar
from archive.errors import InvalidInput


@click.command()
@click.option("--rebuild", "rebuild_site", metavar="SITE", default=None,
              help="Refill this site from its mirror and the object tier, then verify it.")
@click.option("--initialize", is_flag=True,
              help="With --rebuild: the site's disk is new; write its marker file first.")
@click.option("--threads", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Parallel copies during a rebuild.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def replicate(ctx: click.Context, rebuild_site: str | None, initialize: bool, threads: int,
              as_json: bool, config: str | None) -> None:
    """Copy what a site is missing from a verified copy elsewhere.

    Without --rebuild: run the repair queue now (copies a site missed while it
    was down, oldest first; the daemon also does this on its own).

    With --rebuild SITE: refill an empty or replaced site. Every copy the catalog
    expects there is copied from the mirror (or from the study's bundle on the
    object tier when no online copy verifies), then the whole site is scrubbed:
    the report gives the number of copies verified against the catalog. A disk
    without the site's marker file is only written with --initialize (an
    unmounted mount point looks the same). Exits 1 unless every expected copy
    verified.
    """
    settings = settings_from(ctx, config)
    authorize(settings, "operate", "replicate")
    catalog = open_catalog(settings)
    try:
        if rebuild_site is None:
            if initialize:
                raise InvalidInput("--initialize needs --rebuild SITE")
            report = _catch_up(settings, catalog)
        else:
            report = _rebuild(settings, catalog, rebuild_site, initialize, threads, as_json)
    finally:
        catalog.close()
    if as_json:
        emit_json(report)
    if not report["ok"]:
        sys.exit(1)


def _catch_up(settings, catalog) -> dict:  # noqa: ANN001
    from replication.repair import repair_missing

    r = repair_missing(catalog, open_sites(settings), settings.ingest.spool_dir / "repair",
                       batch=1_000_000)
    out = {"repaired": r.repaired, "failed": r.failed, "no_source": r.no_source,
           "sites": r.sites, "ok": r.failed == 0 and r.no_source == 0}
    click.echo(f"repaired {r.repaired} copies; {r.failed} failed; {r.no_source} without a "
               "verified source", err=True)
    return out


def _rebuild(settings, catalog, name: str, initialize: bool, threads: int,  # noqa: ANN001
             quiet: bool) -> dict:
    from replication.rebuild import SiteRebuilder

    sites = {s.name: s for s in open_sites(settings)}
    if name not in sites:
        raise InvalidInput(f"no site named {name!r} (sites: {', '.join(sites)})")
    scrubber = open_scrubber(settings, catalog)
    scrubber.limit.rate = 0            # an operator's rebuild runs at full speed
    rebuilder = SiteRebuilder(catalog, scrubber, sites[name], threads=threads)
    with jobs.recorded(catalog, "rebuild", "manual") as rec, \
            lease.lease(catalog, "job:scrub", what="scrubs and rebuilds", ttl_s=120), \
            ExitStack() as bars:
        def phase(label: str, total: int):  # noqa: ANN202
            click.echo(f"{label}: {total} copies", err=True)
            return bars.enter_context(progress_bar(label, total, quiet))
        report = rebuilder.run(initialize=initialize, phase=phase)
        j = report.to_json()
        rec.outcome = "ok" if report.ok else "findings"
        rec.summary = {k: j[k] for k in ("expected", "already_present", "restored_total",
                                         "verified", "verification_scrub_run")} | {
            "site": name, "unrecoverable": len(report.unrecoverable)}
    for u in report.unrecoverable:
        click.echo(f"UNRECOVERABLE on {name}: instance {u['sop_uid']} of study "
                   f"{u['study_uid']}: no verified copy anywhere", err=True)
    click.echo(f"{name}: {j['verified']} of {j['expected']} copies verified; "
               f"{j['already_present']} were present, {j['restored_total']} restored "
               f"({', '.join(f'{v} from {k}' for k, v in j['restored'].items()) or 'none'}) "
               f"in {j['seconds']}s; {len(report.unrecoverable)} unrecoverable", err=True)
    return j

