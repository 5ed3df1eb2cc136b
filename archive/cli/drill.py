"""`pacsvault drill`: restore a random sample per tier to scratch, check it, record it."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from archive import audit, jobs
from archive.app.audit_records import audit_drill
from archive.app.compose import open_catalog, open_driller
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.errors import InvalidInput
from dr.keys import identity_fingerprints


@click.command()
@click.option("--sample", type=click.IntRange(1, 10_000), default=None, metavar="N",
              help="Studies per tier (default: [drill] sample).")
@click.option("--tier", type=click.Choice(["online", "objects", "dr", "all"]), default="all",
              show_default=True, help="Which tier to drill; all: every tier it can read.")
@click.option("--identity", "identities", multiple=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="age identity, to drill DR volumes (repeatable).")
@click.option("--volume", "volume_paths", multiple=True, metavar="PATH",
              help="A DR volume to read if not where it was written (repeatable).")
@click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=None,
              help="Repeat a drill's sample exactly (its seed is printed).")
@click.option("--history", "show_history", is_flag=True,
              help="Print past drills and monthly trends instead.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def drill(ctx: click.Context, sample: int | None, tier: str, identities: tuple[Path, ...],
          volume_paths: tuple[str, ...], seed: int | None, show_history: bool, as_json: bool,
          config: str | None) -> None:
    """Restore a random, reproducible sample of studies from each tier and prove it.

    Each sampled study is restored from that tier alone into a scratch area;
    every file must match its catalog SHA-256 and parse as DICOM with the
    catalog's UIDs. Time to first and last instance and throughput are
    measured, the scratch area removed, and the drill recorded (who, when,
    seed, result, figures). Exits 1 if anything failed. --history shows every
    drill and monthly trends, for auditors.
    """
    from dr.drill import history
    from dr.keys import load_identities

    settings = settings_from(ctx, config)
    actor = authorize(settings, "read" if show_history else "restore", "drill")
    catalog = open_catalog(settings)
    try:
        if show_history:
            h = history(catalog)
            if as_json:
                emit_json(h)
            else:
                for m in h["months"]:
                    tiers = "; ".join(f"{t}: {v['drills']} drills, median {v['median_time_to_last_s']}s "
                                      f"to last, {v['median_mb_per_s']} MB/s"
                                      for t, v in m["tiers"].items())
                    click.echo(f"{m['month']}: {m['drills']} drills, {m['failed']} failed; {tiers}")
                for d in h["drills"]:
                    click.echo(f"drill {d['id']} {d['started_at']} by {d['actor']} ({d['trigger']}) "
                               f"tiers {','.join(d['tiers'])} seed {d['seed']}: "
                               f"{'ok' if d['ok'] else 'FAILED'}")
            return
        if tier == "dr" and not identities:
            raise InvalidInput("--tier dr needs --identity: the volumes are encrypted")
        tiers = ["online", "objects", "dr"] if tier == "all" else [tier]
        idents = load_identities(list(identities)) if identities else []
        d = open_driller(settings, catalog, identities=idents, volume_paths=list(volume_paths),
                         actor=actor.name)
        n = sample or settings.drill.sample
        with jobs.recorded(catalog, "drill", "manual") as rec:
            report = d.run(tiers, n, seed)
            j = report.to_json()
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = report.summary()
        audit_drill(catalog, actor.name, j)
        if "dr" in j["figures"]:
            audit.record_key_use(catalog, actor.name, identity_fingerprints(idents), "drill")
    finally:
        catalog.close()
    click.echo(f"drill {j['drill_id']}: seed {j['seed']} (repeat with --seed {j['seed']})", err=True)
    for t, why in j["skipped_tiers"].items():
        click.echo(f"SKIPPED tier {t}: {why}", err=True)
    for f in j["failures"]:
        what = (f"instance {f['sop_uid']} of study {f['study_uid']}" if "sop_uid" in f else
                f"study {f['study_uid']}" if "study_uid" in f else "the tier")
        click.echo(f"FAILED {f['tier']}: {what}: {f['reason']}", err=True)
    if as_json:
        emit_json(j)
    else:
        for t, f in j["figures"].items():
            click.echo(f"{t:8} {f['studies']} studies, {f['verified']} of {f['instances']} instances "
                       f"verified, {f['bytes']} bytes; first after {f['time_to_first_s']}s, last after "
                       f"{f['time_to_last_s']}s, {f['mb_per_s']} MB/s")
        click.echo("drill passed" if j["ok"] else "drill FAILED")
    if not report.ok:
        sys.exit(1)


