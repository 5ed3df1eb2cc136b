"""`pacsvault restore`: studies back from the fastest tier that holds a verified copy."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import click

from archive import jobs
from archive.app import restore_queue
from archive.app.compose import open_catalog, open_restorer, open_sites
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.cli.progress import progress_bar
from archive.errors import InvalidInput
from dr.keys import identity_fingerprints


@click.command()
@click.option("--study", "studies", multiple=True, metavar="UID", help="Study Instance UID (repeatable).")
@click.option("--patient", default=None, metavar="ID", help="Every study of this Patient ID.")
@click.option("--accession", default=None, metavar="N", help="Studies with this accession number.")
@click.option("--from-date", default=None, metavar="YYYYMMDD", help="Studies dated on or after.")
@click.option("--to-date", default=None, metavar="YYYYMMDD", help="Studies dated on or before.")
@click.option("--to", "to_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              metavar="DIR", help="Write DICOM Part 10 files to DIR/<study>/<series>/<sop>.dcm.")
@click.option("--to-ae", default=None, metavar="AE@HOST:PORT", help="C-STORE to a PACS.")
@click.option("--online", "to_online", is_flag=True, help="Put the instances back on the online sites.")
@click.option("--queued", is_flag=True,
              help="Bring back online every study a retrieve queued because only DR volumes "
                   "held it (load the volumes first; implies --online).")
@click.option("--from", "from_tier", type=click.Choice(["online", "objects", "dr"]), default=None,
              help="Only this tier (default: the fastest that holds a verified copy).")
@click.option("--identity", "identities", multiple=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="age identity for DR volumes (repeatable).")
@click.option("--volume", "volume_paths", multiple=True, metavar="PATH",
              help="A DR volume file or LTFS volume directory to read (repeatable); by default "
                   "where each volume was written.")
@click.option("--deidentify", is_flag=True,
              help="Export de-identified copies (PS3.15 basic profile, new UIDs); "
                   "--to or --to-ae only.")
@click.option("--deid-key", default=None, envvar="PACSVAULT_DEID_KEY", metavar="TEXT",
              help="Key for a mapping that is the same across exports "
                   "(default $PACSVAULT_DEID_KEY, else random per export).")
@click.option("--deid-map", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Write the original -> new UID mapping to FILE (mode 0600).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted restore to a PACS or de-identified export (same "
                   "target and studies): skip what it delivered. Without it a run sends "
                   "everything again.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def restore(ctx: click.Context, studies: tuple[str, ...], patient: str | None,
            accession: str | None, from_date: str | None, to_date: str | None,
            to_dir: Path | None, to_ae: str | None, to_online: bool, queued: bool,
            from_tier: str | None,
            identities: tuple[Path, ...], volume_paths: tuple[str, ...], deidentify: bool,
            deid_key: str | None, deid_map: Path | None, resume: bool, as_json: bool,
            config: str | None) -> None:
    """Restore studies, every instance checked against its catalog SHA-256 first.

    The online mirror is used first, then the object tier, then DR volumes
    (read once each, in order; the report lists the volumes needed and their
    custody state: an offsite volume must be recalled first). A copy that does
    not verify falls through to the next tier. Delivered to a directory, to a
    PACS by C-STORE, or back onto the online sites. A file already in the
    directory with the right SHA-256, or a copy already online, is skipped.
    A PACS cannot be asked what it holds, so a restore there keeps a journal
    for its run only: `--resume` continues an interrupted run, any other run
    sends everything. Exits 1 if any instance could not be restored; the
    report names it and why.
    """
    from dr.deliver import (
        AeDelivery,
        DirDelivery,
        Journaled,
        OnlineDelivery,
        WrappingDelivery,
    )
    from dr.keys import load_identities
    from dr.restore import TIERS, Selection, select_studies

    settings = settings_from(ctx, config)
    actor = authorize(settings, "restore", "restore")
    if queued:
        if studies or patient or accession or from_date or to_date or to_dir or to_ae:
            raise InvalidInput("--queued restores the queued studies online: give no other "
                               "selection or target")
        to_online = True
    if sum(x is not None and x is not False for x in (to_dir, to_ae, to_online or None)) != 1:
        raise InvalidInput("say where to: one of --to DIR, --to-ae AE@HOST:PORT, --online")
    _check_deid(ctx, deidentify, to_online, to_dir, deid_map, deid_key)
    sel = Selection(studies, patient, accession, from_date, to_date)
    idents = load_identities(list(identities)) if identities else []
    catalog = open_catalog(settings)
    try:
        if queued:
            chosen = [(p.study_fk, p.study_uid) for p in restore_queue.pending(catalog)]
            if not chosen:
                if as_json:
                    emit_json({"queued": 0, "restored": 0})
                else:
                    click.echo("no study is queued to come back online")
                return
        else:
            chosen = select_studies(catalog, sel)
        if not chosen:
            raise InvalidInput(f"no study matches {json.dumps(sel.to_json())}")
        sites = open_sites(settings)
        if to_dir is not None:
            delivery = DirDelivery(to_dir)
        elif to_online:
            delivery = OnlineDelivery(catalog, sites)
        else:
            contexts = _contexts(catalog, [fk for fk, _ in chosen])
            key = hashlib.sha1(f"{to_ae}|{sorted(u for _, u in chosen)}".encode()).hexdigest()
            delivery = AeDelivery(to_ae, settings.dicom.ae_title, contexts,
                                  settings.ingest.spool_dir / "restore" / f"{key}.journal",
                                  resume=resume)
        deid = None
        if deidentify:
            from dr.deidentify import DeidentifyingDelivery, journal_path

            deid = delivery = DeidentifyingDelivery(
                delivery, key=deid_key, map_file=deid_map, journal=journal_path(
                    settings.ingest.spool_dir, str(to_dir.resolve()) if to_dir else to_ae,
                    [u for _, u in chosen]), resume=resume)
        wrapped = delivery.inner if isinstance(delivery, WrappingDelivery) else None
        if any(isinstance(d, Journaled) and d.restarted for d in (delivery, wrapped)):
            click.echo(f"an interrupted restore to {delivery.name} was not resumed: sending "
                       "everything again (--resume continues it instead)", err=True)

        def load(barcode: str, device: str) -> bool:
            if as_json or not sys.stdin.isatty():
                return False
            return click.confirm(f"Load DR volume {barcode} into {device} and confirm",
                                 default=True, err=True)

        r = open_restorer(settings, catalog, delivery,
                          sources=(from_tier,) if from_tier else TIERS, identities=idents,
                          volume_paths=list(volume_paths),
                          # De-identifying: originals never sit in the export directory.
                          scratch=(to_dir / ".pacsvault-restore") if to_dir is not None and not deid
                          else None, load_volume=load, sites=sites)
        with jobs.recorded(catalog, "restore", "manual") as rec, \
                progress_bar("restoring instances", None, as_json) as advance:
            r.progress = advance
            report = None
            try:
                report = r.run(chosen)
            finally:
                if deid is not None:        # what left is audited, also after a failure
                    from dr.deidentify import audit_exports

                    audit_exports(catalog, deid, actor=actor.name, target="dir" if to_dir else "ae",
                                  ok=report is not None and report.ok)
            if report.ok and isinstance(delivery, Journaled):
                delivery.expire()           # complete: the next run is a new one
            j = report.to_json()
            if deid is not None:
                j |= {"deidentified": True, "deidentification": deid.summary()}
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = {k: j[k] for k in ("studies", "instances", "restored", "already_there",
                                             "bytes", "by_source")} | {
                "failures": len(j["failures"]), "target": "dir" if to_dir else
                "ae" if to_ae else "online", "deidentified": deid is not None}
        _audit(catalog, actor.name, chosen, j, "dir" if to_dir else to_ae or "online", idents)
        if queued:
            failed = {f["study_uid"] for f in j["failures"]}
            restore_queue.mark_done(catalog, [fk for fk, uid in chosen if uid not in failed])
            j["queued"] = len(chosen)
    finally:
        catalog.close()
    for v in j["volumes_needed"]:
        if v["must_recall"] or not v["read"]:
            click.echo(f"VOLUME {v['barcode']} #{v['sequence']}: {v['state']}"
                       + (f" at {v['location']}" if v["location"] else "")
                       + ("; recall it first" if v["must_recall"] else "")
                       + ("" if v["read"] else "; not read"), err=True)
    for f in j["failures"]:
        what = f"instance {f['sop_uid']} of study" if "sop_uid" in f else "study"
        click.echo(f"FAILED {what} {f['study_uid']}: {f['reason']}", err=True)
    if deid is not None and any(j["deidentification"]["needs_review"].values()):
        click.echo("REVIEW before release: pixel data and document/report content are not "
                   "de-identified; " + ", ".join(f"{k.replace('_', ' ')}: {v} instance(s)" for k, v
                                                 in j["deidentification"]["needs_review"].items()
                                                 if v), err=True)
    if as_json:
        emit_json(j)
    else:
        click.echo(f"restored {j['restored']} of {j['instances']} instances "
                   f"({j['already_there']} already there) to {j['target']} in {j['seconds']}s; "
                   f"from {', '.join(f'{k}: {v}' for k, v in j['by_source'].items()) or 'nowhere'}")
    if not report.ok:
        sys.exit(1)


def _audit(catalog, actor: str, chosen, j: dict, target: str, idents: list) -> None:  # noqa: ANN001
    """One record per study restored (who, which patient, where to, from which tier)."""
    from archive import audit

    per: dict[str, dict] = {uid: {"target": target, "instances": 0, "failed": 0, "sources": {}}
                            for _, uid in chosen}
    for d in j["instances_detail"]:
        s = per[d["study_uid"]]
        s["instances"] += 1
        s["sources"][d["source"]] = s["sources"].get(d["source"], 0) + 1
    for f in j["failures"]:
        per[f["study_uid"]]["failed"] += 1
    audit.record_studies(catalog, "restore", actor, per,
                         outcome_of=lambda d: "failure" if d["failed"] else "success")
    if j["by_source"].get("dr"):
        audit.record_key_use(catalog, actor, identity_fingerprints(idents), "restore")


def _check_deid(ctx: click.Context, deidentify: bool, to_online: bool, to_dir: Path | None,
                deid_map: Path | None, deid_key: str | None) -> None:
    from click.core import ParameterSource

    from dr.deidentify import check_key

    if not deidentify:
        if deid_map is not None or ctx.get_parameter_source("deid_key") == ParameterSource.COMMANDLINE:
            raise InvalidInput("--deid-key and --deid-map go with --deidentify")
        return
    if to_online:
        raise InvalidInput("--deidentify exports copies: use --to DIR or --to-ae; de-identified "
                           "copies must never replace the archive's originals (--online)")
    if deid_map is not None and to_dir is not None and \
            deid_map.resolve().is_relative_to(to_dir.resolve()):
        raise InvalidInput("--deid-map must be outside the export directory (it re-identifies)")
    check_key(deid_key)


def _contexts(catalog, study_fks: list[int]) -> list[tuple[str, str]]:  # noqa: ANN001
    from sqlalchemy import select

    from archive.catalog.models import Instance

    with catalog.unit() as uow:
        return sorted({(c, t) for c, t in uow.session.execute(
            select(Instance.sop_class, Instance.transfer_syntax)
            .where(Instance.study_fk.in_(study_fks)).distinct())})
