"""`pacsvault audit`: verify the hash-chained trail; who touched which patient's data."""
from __future__ import annotations

import sys
from datetime import datetime, timezone

import click

from archive import audit as trail
from archive.app.compose import open_catalog
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.errors import InvalidInput


def _day(text: str | None, end: bool = False) -> datetime | None:
    if text is None:
        return None
    try:
        d = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise InvalidInput("--since/--until want YYYY-MM-DD") from None
    return d.replace(hour=23, minute=59, second=59) if end else d


@click.command()
@click.option("--verify", "do_verify", is_flag=True, help="Check the whole chain of records.")
@click.option("--anchor", default=None, metavar="ID:HASH",
              help="With --verify: a record's hash kept outside the catalog (from the collector).")
@click.option("--checkpoint", "do_checkpoint", is_flag=True,
              help="Record (and print) a signed checkpoint of the chain's end now.")
@click.option("--patient", default=None, metavar="ID", help="Records about this Patient ID.")
@click.option("--study", default=None, metavar="UID", help="Records about this study.")
@click.option("--user", "actor", default=None, metavar="NAME", help="Records of this operator.")
@click.option("--since", default=None, metavar="YYYY-MM-DD")
@click.option("--until", default=None, metavar="YYYY-MM-DD")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def audit(ctx: click.Context, do_verify: bool, anchor: str | None, do_checkpoint: bool,
          patient: str | None, study: str | None, actor: str | None, since: str | None,
          until: str | None, as_json: bool, config: str | None) -> None:
    """The audit trail: --verify finds an edited, deleted, reordered or re-chained
    record (and says where; it fails if the audit key is missing); --patient / --study / --user / --since / --until answer who
    touched what, when, from where. Exit 1 if verification fails."""
    settings = settings_from(ctx, config)
    who = authorize(settings, "audit", "audit")
    key = trail.key_path(settings.data_dir)
    catalog = open_catalog(settings)
    try:
        if do_checkpoint:
            cp = trail.checkpoint(catalog, key)
            emit_json(cp) if as_json else click.echo(
                f"checkpoint at record {cp['upto_id']}: {cp['hash']} (keep it: --anchor "
                f"{cp['upto_id']}:{cp['hash']})")
            return
        if do_verify:
            pin = None
            if anchor:
                at, _, h = anchor.partition(":")
                if not at.isdigit() or len(h) != 64:
                    raise InvalidInput("--anchor wants ID:SHA256")
                pin = (int(at), h)
            r = trail.verify(catalog, key, pin)
            if as_json:
                emit_json(r)
            elif r["ok"]:
                keyed = (f"keyed from record {r['keyed_from']}" if r["keyed_from"]
                         else "no keyed records yet")
                click.echo(f"audit trail intact: {r['records']} records ({keyed}), "
                           f"{r['checkpoints']} checkpoints; head {r['head']['id']}:{r['head']['hash']}")
            elif r["first_bad"]["position"] is None:
                click.echo(f"audit trail cannot be verified: {r['first_bad']['why']}", err=True)
            else:
                click.echo(f"audit trail BROKEN at record {r['first_bad']['position']}: "
                           f"{r['first_bad']['why']}", err=True)
            if not r["ok"]:
                sys.exit(1)
            return
        if not any((patient, study, actor, since, until)):
            raise InvalidInput("say what to look for: --verify, --patient, --study, --user, "
                               "--since/--until")
        rows = trail.query(catalog, patient_id=patient, study_uid=study, actor=actor,
                           since=_day(since), until=_day(until, end=True))
        # Reading the trail about a patient is itself an access to be audited.
        trail.record_quietly(catalog, trail.Event(
            "audit-read", actor=who.name, source=trail.host(), patient_id=patient,
            study_uid=study, detail={"user": actor, "since": since, "until": until,
                                     "records": len(rows)}))
    finally:
        catalog.close()
    if as_json:
        emit_json({"records": rows})
        return
    for r in rows:
        click.echo(f"{r['at']} #{r['id']} {r['actor']:16} {r['action']:18} {r['outcome']:8} "
                   f"{r['source']:20} patient {r['patient_id'] or '-'} study {r['study_uid'] or '-'}")
