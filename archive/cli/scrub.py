"""`pacsvault scrub`: re-read every online copy, compare with the catalog, repair."""
from __future__ import annotations

import sys

import click

from archive import jobs
from archive.alerts import scrub_alert, send_alert
from archive.app.audit_records import audit_findings
from archive.app.compose import open_catalog, open_object_scrubber, open_scrubber
from archive.app.scheduled import scrub_summary
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
@click.option("--site", "site_names", metavar="NAME", multiple=True,
              help="Scrub this site (repeatable).")
@click.option("--all", "all_sites", is_flag=True, help="Scrub every online site.")
@click.option("--tier", type=click.Choice(["sites", "objects", "all"]), default="sites",
              show_default=True,
              help="What to scrub: the online sites, the object tier's study bundles, or both.")
@click.option("--sample", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0,
              show_default=True, help="Check this fraction of the copies, chosen at random.")
@click.option("--seed", type=int, default=None, help="Seed for --sample (default: the run id).")
@click.option("--delete-orphans", is_flag=True,
              help="Delete files the catalog does not know (reported either way).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def scrub(ctx: click.Context, site_names: tuple[str, ...], all_sites: bool, tier: str,
          sample: float, seed: int | None, delete_orphans: bool, as_json: bool,
          config: str | None) -> None:
    """Re-read copies and check each SHA-256 against the catalog.

    Sites: a missing or damaged copy is replaced from a copy that verifies now
    (the mirror, else the object tier) and read back again. A copy with no good
    twin anywhere is reported as unrecoverable, with its study; the catalog
    checksum is never changed. Files the catalog does not know are reported as
    orphans.

    --tier objects: every study bundle is read back whole and each instance in
    it checked; a damaged bundle is rebuilt from the online copies when they
    exist, else its damaged instances are reported as unrecoverable.

    An interrupted scrub resumes where it stopped. Exits 1 whenever damage was
    found, even if it was repaired; the report names every damaged object.
    """
    settings = settings_from(ctx, config)
    actor = authorize(settings, "operate", "scrub")
    known = [s.name for s in settings.sites]
    if site_names and tier == "objects":
        raise InvalidInput("--site names an online site; --tier objects scrubs the object tier")
    if all_sites or not site_names:
        chosen = known
    else:
        unknown = [n for n in site_names if n not in known]
        if unknown:
            raise InvalidInput(f"no site named {unknown[0]!r} (sites: {', '.join(known)})")
        chosen = [n for n in known if n in site_names]
    catalog = open_catalog(settings)
    reports = []
    try:
        todo = []
        if tier in ("sites", "all"):
            todo.append(("scrub", open_scrubber(settings, catalog), chosen, "scrubbing copies"))
        if tier in ("objects", "all"):
            todo.append(("scrub-objects", open_object_scrubber(settings, catalog), None,
                         "scrubbing bundles"))
        with lease.lease(catalog, "job:scrub", what="the scrub job", ttl_s=120):
            for job, scrubber, names, label in todo:
                with jobs.recorded(catalog, job, "manual") as rec, \
                        progress_bar(label, None, as_json) as advance:
                    scrubber.progress = advance
                    report = scrubber.run(names, sample=sample, seed=seed,
                                          delete_orphans=delete_orphans)
                    rec.outcome = "ok" if report.ok else "findings"
                    rec.summary = scrub_summary(report.to_json())
                reports.append(report)
                audit_findings(catalog, actor.name, report.to_json())
    finally:
        catalog.close()
    for report in reports:
        for f in report.findings:
            where = f"instance {f.sop_uid} of study {f.study_uid}" if f.sop_uid else f.key
            fix = f"repaired from {f.repaired_from}" if f.repaired_from else "NOT repaired"
            click.echo(f"FINDING {f.kind} on {f.site}: {where}: {f.detail}"
                       + ("" if f.kind == "orphan" else f"; {fix}"), err=True)
        for name, why in report.skipped_sites.items():
            what = "site" if name in known else "object tier"
            click.echo(f"SKIPPED {what} {name}: {why}", err=True)
    j = combined([r.to_json() for r in reports])
    if as_json:
        emit_json(j)
    else:
        click.echo(f"scrub run {j['run_id']}{' (resumed)' if j['resumed'] else ''}: "
                   f"{j['objects']} copies, {j['bytes']} bytes in {j['seconds']}s "
                   f"({j['mb_per_s']} MB/s); {j['damaged']} damaged, {j['repaired']} repaired, "
                   f"{j['unrecoverable']} unrecoverable, {j['orphans']} orphans")
    if not j["ok"]:
        # Counts and the run id only: the UIDs above stay on this terminal.
        alert = scrub_alert(j)
        if alert is not None:
            for problem in send_alert(settings.alerts, alert):
                click.echo(f"ALERT not delivered: {problem}", err=True)
        sys.exit(1)


def combined(parts: list[dict]) -> dict:
    """One report for a sites + object-tier scrub (one part: unchanged)."""
    if len(parts) == 1:
        return parts[0]
    out = dict(parts[0])
    out["run_ids"] = [p["run_id"] for p in parts]
    out["sites"] = [s for p in parts for s in p["sites"]]
    out["ok"] = all(p["ok"] for p in parts)
    out["resumed"] = any(p["resumed"] for p in parts)
    for k in ("objects", "bytes", "seconds", "damaged", "repaired", "unrecoverable", "orphans"):
        out[k] = sum(p[k] for p in parts)
    out["seconds"] = round(out["seconds"], 3)
    out["mb_per_s"] = round(out["bytes"] / 1e6 / out["seconds"], 1) if out["seconds"] else None
    out["skipped_sites"] = {k: v for p in parts for k, v in p["skipped_sites"].items()}
    out["findings"] = [f for p in parts for f in p["findings"]]
    return out
