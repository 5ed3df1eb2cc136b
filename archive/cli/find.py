"""`pacsvault find`: which studies match, and where each one lives, without SQL."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from archive import audit
from archive.app.compose import open_catalog
from archive.app.locate import find_studies, locate
from archive.catalog.query import QueryError
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.errors import InvalidInput


@click.command()
@click.option("--patient", default=None, metavar="ID", help="Patient ID (wildcards * and ?).")
@click.option("--name", default=None, metavar="PATTERN",
              help="Patient name, e.g. 'DOE^J*' (case does not matter).")
@click.option("--accession", default=None, metavar="N", help="Accession number.")
@click.option("--from-date", default=None, metavar="YYYYMMDD", help="Studies dated on or after.")
@click.option("--to-date", default=None, metavar="YYYYMMDD", help="Studies dated on or before.")
@click.option("--modality", default=None, metavar="M", help="Studies with a series of this modality.")
@click.option("--study", "studies", multiple=True, metavar="UID", help="Study Instance UID (repeatable).")
@click.option("--limit", default=500, show_default=True, type=click.IntRange(1, 100_000),
              help="More matches than this is an error: narrow the search.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def find(ctx: click.Context, patient: str | None, name: str | None, accession: str | None,
         from_date: str | None, to_date: str | None, modality: str | None,
         studies: tuple[str, ...], limit: int, as_json: bool, config: str | None) -> None:
    """Studies matching all the given criteria, each with where it lives: online on
    which sites, on the object tier, on which DR volumes (and their custody state),
    and how many of its instances were received again with different content.
    Matching is C-FIND's (docs/query.md). Every search is an audit record."""
    keys = {"PatientID": patient, "PatientName": name, "AccessionNumber": accession,
            "ModalitiesInStudy": modality, "StudyInstanceUID": "\\".join(studies)}
    if from_date or to_date:
        keys["StudyDate"] = f"{from_date or ''}-{to_date or ''}"
    if not any(keys.values()):
        raise InvalidInput("say what to find: --patient, --name, --accession, --from-date/"
                           "--to-date, --modality or --study")
    settings = settings_from(ctx, config)
    actor = authorize(settings, "find", "find")
    catalog = open_catalog(settings)
    try:
        try:
            matches = find_studies(catalog, {k: v for k, v in keys.items() if v}, limit=limit)
        except QueryError as e:
            raise InvalidInput(str(e)) from None
        found = locate(catalog, matches, sites=[s.name for s in settings.sites],
                       tier=settings.objects.name)
        audit.record_quietly(catalog, audit.Event(
            "query", actor=actor.name, source=audit.host(),
            patient_id=patient if patient and not any(c in patient for c in "*?") else None,
            study_uid=studies[0] if len(studies) == 1 else None,
            detail={"via": "pacsvault find", "keys": sorted(k for k, v in keys.items() if v),
                    "matches": len(found)}))
    finally:
        catalog.close()
    if as_json:
        emit_json({"studies": found, "count": len(found)})
        return
    if not found:
        click.echo("no study matches")
        return
    table = Table(title=f"{len(found)} studies")
    for col in ("patient", "date", "accession", "modalities", "instances", "where",
                "DR volumes", "conflicts"):
        table.add_column(col)
    for s in found:
        table.add_row(f"{s['patient_id']} {s['patient_name']}", s["study_date"], s["accession"],
                      s["modalities"], str(s["instances"]), s["where"],
                      ", ".join(f"{v['barcode']} ({v['state']}"
                                + (f" at {v['location']}" if v["location"] else "") + ")"
                                for v in s["dr_volumes"]) or "-",
                      str(s["conflicts"]) if s["conflicts"] else "")
    Console().print(table)
    for s in found:
        click.echo(f"{s['study_uid']}  {s['where']}")
