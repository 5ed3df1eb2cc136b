"""`pacsvault status [--json]`."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from archive.app.compose import open_catalog, open_object_tier_or_none, open_sites
from archive.app.status import collect
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool, config: str | None) -> None:
    """Objects, studies and bytes per site, site health, under-replicated copies."""
    settings = settings_from(ctx, config)
    authorize(settings, "read", "status")
    catalog = open_catalog(settings)
    try:
        st = collect(settings, catalog, open_sites(settings),
                     tier=open_object_tier_or_none(settings))
    finally:
        catalog.close()
    if as_json:
        emit_json(st)
        return
    console = Console()
    table = Table(title=f"pacsvault {st['ae_title']}: {st['instances']} instances, "
                        f"{st['studies']} studies, {st['bytes']} bytes")
    for col in ("site", "health", "objects", "studies", "bytes", "missing", "corrupt"):
        table.add_column(col)
    for s in st["sites"]:
        table.add_row(s["name"], s["health"], str(s["objects"]), str(s["studies"]),
                      str(s["bytes"]), str(s["missing"]), str(s["corrupt"]))
    console.print(table)
    o = st["object_tier"]
    console.print(f"object tier {o['name']} ({o['kind']}): {o['health']}; {o['objects']} instances "
                  f"of {o['studies']} studies in {o['bundles']} bundles, {o['stored_bytes']} bytes"
                  + (f"; [red]{o['corrupt']} damaged copies[/]" if o["corrupt"] else "")
                  + (f"; {o['purges_pending']} online deletions pending" if o["purges_pending"] else ""))
    if st["under_replicated"]:
        console.print(f"[yellow]{st['under_replicated']} copies under-replicated; oldest "
                      f"{st['oldest_under_replicated_age_s']:.0f}s; repaired when the site returns[/]")
    if st["conflicts"]:
        console.print(f"[yellow]{st['conflicts']} instances received again with different "
                      f"content (both versions kept)[/]")
    if st.get("series_uid_reused"):
        console.print(f"[yellow]{st['series_uid_reused']} series UIDs were sent in more than one "
                      f"study (each study keeps its own objects)[/]")
    sc = st["last_scrub"]
    if sc:
        console.print(f"last scrub (run {sc['run_id']}, {', '.join(sc['sites'])}) finished "
                      f"{sc['finished_at']}: {sc['objects']} checked, {sc['findings']} findings, "
                      f"{sc['repaired']} repaired"
                      + (f", [red]{sc['unrecoverable']} unrecoverable[/]" if sc["unrecoverable"] else ""))
    for name, j in st["jobs"].items():
        run = j["last_run"]
        last = f"last {run['outcome']} ({run['trigger']}) at {run['started_at']}" if run else "never run"
        console.print(f"job {name}: {last}; next {j['next_run'] or 'not scheduled'}")
    parts = []
    for level, e in st["unprotected"].items():
        if e["objects"]:
            parts.append(f"{level.replace('_', ' ')}: {e['objects']} objects, {e['bytes']} bytes, "
                         f"oldest {e['oldest_age_s']:.0f}s")
    console.print("not yet protected: " + ("; ".join(parts) if parts else "nothing"))
    cb = st.get("catalog_backups") or {}
    console.print("newest catalog backup: " + ("; ".join(
        f"{place} {b['name']} ({b['age_s'] / 3600:.1f} h old)" if b and b.get("age_s") is not None
        else f"{place} none" for place, b in cb.items()) or "none anywhere"))
    em = st.get("emergency") or {}
    if em.get("state") == "open":
        console.print(f"[red]EMERGENCY ACCESS OPEN until {em['until']} ({em['reason']}): "
                      "review 'pacsvault audit --user break-glass'[/]")
    elif em.get("state") == "broken":
        console.print("[yellow]the emergency seal was used: an admin makes a new one "
                      "('pacsvault emergency seal')[/]")
    atna = st.get("atna")
    if atna and atna["waiting"]:
        console.print(f"[yellow]{atna['waiting']} audit records not yet taken by the ATNA "
                      f"collector {atna['collector']} (oldest {atna['oldest_age_s']:.0f}s); "
                      "they wait in the audit trail[/]")
    rq = st.get("restore_queue") or {}
    if rq.get("studies"):
        console.print(f"[yellow]{rq['studies']} studies a retrieve needed are queued to come "
                      f"back from DR volumes {', '.join(rq['volumes'][:8])}: load them and run "
                      "'pacsvault restore --queued'[/]")
    for risk in st.get("risks", []):
        console.print(f"[yellow]risk: {risk}[/]")
