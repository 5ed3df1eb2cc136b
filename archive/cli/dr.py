"""`pacsvault dr ...`: DR volumes (keys, writing, reading back, the catalog from media)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from archive import audit, jobs
from archive.app.audit_records import audit_volumes
from archive.app.compose import open_catalog, open_dr_writer
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.cli.progress import progress_bar
from archive.errors import InvalidInput, PacsvaultError
from dr.keys import identity_fingerprints


@click.group()
def dr() -> None:
    """DR volumes: encrypted tape, file and LTFS volumes for offsite custody."""


@dr.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="IDENTITY_FILE", help="Write the new identity (private key) here.")
@config_option
@click.pass_context
def keygen(ctx: click.Context, out: Path, config: str | None) -> None:
    """Make an age key pair for DR volumes; print the public recipient.

    The identity (private key) goes only into IDENTITY_FILE (mode 0600, never
    overwritten, never printed). Put the recipient printed on stdout in
    [dr] recipients; keep the identity offline. The identity file also carries,
    as a comment line, the key that checks this install's volume signatures
    (its secret half, <data_dir>/secrets/dr-signing.key, is made now if it is missing).
    """
    from dr.keys import keygen as make
    from dr.signing import key_path, load_or_create, verify_line

    line = None
    try:
        try:
            settings = settings_from(ctx, config)
        except PacsvaultError:
            settings = None             # no install here: the identity only
        if settings is not None:
            line = verify_line(load_or_create(key_path(settings.data_dir))[0])
        recipient = make(out, line)
    except InvalidInput as e:
        click.echo(f"pacsvault: {e}", err=True)
        sys.exit(e.exit_code)
    click.echo(recipient)
    if line:
        click.echo(f"Volumes are signed; the identity file holds the key that checks them:\n"
                   f"  {line}", err=True)
    else:
        click.echo("No pacsvault config here: the identity file holds no volume verification "
                   "key. On the install, run 'pacsvault dr verify-key >> IDENTITY_FILE'.",
                   err=True)
    click.echo(
        f"Identity written to {out} (mode 0600). It is the only way to read volumes written "
        "to this recipient:\n"
        "  1. copy it to two offline media (e.g. USB keys, or print it) kept in two places,\n"
        "     one of them with your escrow (a sealed envelope in the hospital safe);\n"
        "  2. delete it from this machine: the daemon needs only the recipient;\n"
        "  3. add the recipient above to [dr] recipients, next to your escrow recipient.\n"
        "Give it to 'pacsvault dr verify / rebuild-catalog / restore --identity' only when "
        "reading volumes back.", err=True)


@dr.command("verify-key")
@config_option
@click.pass_context
@handle_errors
def verify_key(ctx: click.Context, config: str | None) -> None:
    """Print the line that checks this install's volume signatures.

    Append it to every DR identity file made elsewhere or before volumes were
    signed: pacsvault dr verify-key >> IDENTITY_FILE (age ignores the comment).
    """
    from dr.signing import key_path, load_or_create, verify_line

    settings = settings_from(ctx, config)
    authorize(settings, "operate", "dr verify-key")
    click.echo(verify_line(load_or_create(key_path(settings.data_dir))[0]))


def _recipients(settings, given: tuple[str, ...]) -> list[str]:  # noqa: ANN001
    from archive.config.schema import DrSettings

    if given:
        from pydantic import ValidationError

        try:
            DrSettings(recipients=tuple(given))       # same checks as the config
        except ValidationError as e:
            msg = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise InvalidInput(f"--recipient: {msg}") from None
        return list(given)
    return list(settings.dr.recipients)


@dr.command()
@click.option("--recipient", "recipients", multiple=True, metavar="R",
              help="age recipient (age1...) to encrypt to, repeatable (default: [dr] recipients).")
@click.option("--device", default=None, metavar="PATH|-",
              help="Tape device, FIFO or file ('{barcode}' in it: one file per volume; "
                   "'-': stdout, the report goes to stderr). Default: [dr] device.")
@click.option("--ltfs", default=None, metavar="DIR",
              help="Write to an LTFS mount instead: each volume is DIR/<barcode>/.")
@click.option("--capacity", type=click.IntRange(min=262_144), default=None, metavar="BYTES",
              help="Volume capacity (default: [dr] capacity).")
@click.option("--barcode", default=None, metavar="CODE",
              help="Barcode of the (first) volume loaded (default: the next of [dr] barcode_prefix).")
@click.option("--study", "studies", multiple=True, metavar="UID",
              help="Only these studies (default: every study not yet on a volume of the pool).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def write(ctx: click.Context, recipients: tuple[str, ...], device: str | None, ltfs: str | None,
          capacity: int | None, barcode: str | None, studies: tuple[str, ...], as_json: bool,
          config: str | None) -> None:
    """Stream studies not yet on a DR volume of the pool onto encrypted volumes.

    Each study is read from a copy that verifies against the catalog, cut into
    segments, compressed with zstd and encrypted with age to the recipients;
    near the end of a volume it is sealed (index and catalog written) and the
    set continues on the next barcode. On a tape, FIFO or stdout the next
    volume needs the operator: the report names its barcode (on a terminal,
    you are asked to load it). Exits 1 if an object had no verified copy.
    """
    from dr.sinks import one_volume_per_run

    settings = settings_from(ctx, config)
    actor = authorize(settings, "operate", "dr write")
    if device and ltfs:
        raise InvalidInput("give --device or --ltfs, not both")
    kind = "ltfs" if ltfs else settings.dr.kind if device is None else "stream"
    dev = ltfs or device or settings.dr.device
    if barcode is not None and not barcode.replace("-", "").isalnum():
        raise InvalidInput("--barcode: letters, digits and '-' only")
    to_stdout = kind == "stream" and dev == "-"
    out = (lambda text: click.echo(text, err=True)) if to_stdout else click.echo

    def ask_next(code: str) -> bool:
        if to_stdout or not sys.stdin.isatty():
            return False
        return click.confirm(f"Volume full. Load the next volume (label it {code}) and confirm",
                             default=True, err=True)

    catalog = open_catalog(settings)
    try:
        w = open_dr_writer(settings, catalog, recipients=_recipients(settings, recipients),
                           device=dev, kind=kind, capacity=capacity, barcode=barcode,
                           next_volume=ask_next)
        with jobs.recorded(catalog, "dr-write", "manual") as rec, \
                progress_bar("writing DR volumes (MB)", None, as_json or to_stdout) as advance:
            w.progress = lambda n: advance(n // 1_000_000 or 0)
            report = w.run(list(studies) or None)
            audit_volumes(catalog, actor.name, report.to_json())
            j = report.to_json()
            rec.outcome = "ok" if report.ok else "findings"
            rec.summary = report.summary()
    finally:
        catalog.close()
    for f in report.findings:
        what = f"instance {f.sop_uid} of study" if f.sop_uid else "study"
        click.echo(f"FINDING {f.kind}: {what} {f.study_uid}: {f.detail}", err=True)
    if as_json:
        out(json.dumps(j, indent=2, sort_keys=True, default=str))
    else:
        for v in j["volumes"]:
            out(f"{v['barcode']}  #{v['sequence']}  {v['segments']} segments  {v['studies']} "
                f"studies  {v['bytes']} bytes  sha256 {v['sha256']}  ({v['where']})")
        out(f"wrote {j['studies']} studies, {j['instances']} instances, {j['bytes']} bytes in "
            f"{j['seconds']}s ({j['mb_per_s']} MB/s)")
    if report.next_barcode:
        click.echo(f"pacsvault: volume full; {j['pending_studies']} studies still to write: load "
                   f"the next volume (label it {report.next_barcode}) and run 'pacsvault dr "
                   f"write' again", err=True)
    elif j["pending_studies"] and one_volume_per_run(kind, dev):
        click.echo(f"pacsvault: {j['pending_studies']} studies still to write", err=True)
    if not report.ok:
        sys.exit(1)


def _where(catalog, volume: str) -> str:  # noqa: ANN001
    """A path as given, or a barcode's device from the catalog."""
    if volume == "-" or Path(volume).exists():
        return volume
    from sqlalchemy import select

    from archive.catalog.models import DrVolume

    with catalog.unit() as uow:
        dev = uow.session.scalar(select(DrVolume.device).where(DrVolume.barcode == volume))
    if not dev:
        raise InvalidInput(f"{volume}: no such file, and no volume with that barcode in the catalog")
    return dev


identity_option = click.option(
    "--identity", "identities", multiple=True, required=True, metavar="IDENTITY_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="age identity file (repeatable: old and new keys, escrow key).")
trust_option = click.option(
    "--trust-unsigned", is_flag=True,
    help="Read volumes that are not signed by a key of the identity files (written before "
         "volumes were signed, or cut short). Their contents are still checked.")


@dr.command()
@click.argument("volumes", nargs=-1, required=True, metavar="VOLUME...")
@identity_option
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def verify(ctx: click.Context, volumes: tuple[str, ...], identities: tuple[Path, ...],
           trust_unsigned: bool, as_json: bool, config: str | None) -> None:
    """Read whole volumes back and check every checksum and the stream hash.

    VOLUME is a file, device, LTFS volume directory, '-' (stdin) or a barcode
    whose device the catalog knows. Exits 1 if any volume is damaged, or not
    signed by a key of the identity files (unless --trust-unsigned); the
    report names the members and studies affected.
    """
    from dr.keys import load_identities
    from dr.media import verify as check
    from dr.signing import load_verify_keys

    settings = settings_from(ctx, config)
    actor = authorize(settings, "keys", "dr verify")
    idents = load_identities(list(identities))
    keys = load_verify_keys(list(identities))
    catalog = open_catalog(settings)
    try:
        audit.record_key_use(catalog, actor.name, identity_fingerprints(idents), "dr verify")
        reports = [check(catalog, _where(catalog, v), idents, keys, trust_unsigned)
                   for v in volumes]
    finally:
        catalog.close()
    for r in reports:
        for d in r["damaged"]:
            click.echo(f"DAMAGED {r['barcode']}: {d['member']} (study {d['study_uid'] or 'unknown'})"
                       f": {d['error']}", err=True)
        for p in r["problems"]:
            click.echo(f"PROBLEM {r['barcode'] or r['where']}: {p}", err=True)
    ok = all(r["ok"] for r in reports)
    if as_json:
        emit_json({"ok": ok, "volumes": reports} if len(reports) > 1 else reports[0])
    else:
        for r in reports:
            click.echo(f"{r['barcode']}: {'ok' if r['ok'] else 'DAMAGED'}; {r['segments_ok']} of "
                       f"{r['segments']} segments, {r['files_verified']} files verified; "
                       f"{r['stream_bytes']} bytes, sha256 {r['stream_sha256']}")
    if not ok:
        sys.exit(1)


@dr.command("rebuild-catalog")
@identity_option
@click.argument("volumes", nargs=-1, required=True, metavar="VOLUME...")
@trust_option
@click.option("--no-catalog-backup", "no_backup", is_flag=True,
              help="Import only the volumes' own rows, even into an empty catalog.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def rebuild_catalog(ctx: click.Context, identities: tuple[Path, ...], volumes: tuple[str, ...],
                    trust_unsigned: bool, no_backup: bool, as_json: bool,
                    config: str | None) -> None:
    """Restore the catalog from DR volumes (any order, any subset).

    Into an empty catalog (a new install after a total loss), the newest
    catalog backup found on the volumes is put back first: the audit trail,
    accounts, peers, custody log and jobs as they were when it was taken, with
    the audit key written beside it. Copies it names on sites or the object
    tier that are no longer there become missing. Then every volume's own rows
    are imported on top: patients, studies, series and instances with their
    SHA-256, and the volumes and what each holds, so that 'pacsvault restore
    --from dr' can find everything. The report says when the backup was taken
    (what happened after it is on no volume is lost), lists per volume set the
    volumes missing, and the studies of which only part was found. Exits 1 if
    anything is missing or damaged. A volume not signed by a key of the
    identity files is refused (unless --trust-unsigned), and so is one whose
    contents contradict themselves or the DICOM UID grammar.
    """
    import os
    import tempfile

    from archive.app import catalog_rebuild as CR
    from archive.app.compose import open_object_tier_or_none, open_sites
    from archive.instance_lock import hold_instance_lock
    from dr.keys import load_identities
    from dr.media import read_volumes
    from dr.media import rebuild_catalog as rebuild
    from dr.signing import load_verify_keys

    settings = settings_from(ctx, config)
    actor = authorize(settings, "keys", "dr rebuild-catalog")
    idents = load_identities(list(identities))
    keys = load_verify_keys(list(identities))
    scratch = settings.ingest.spool_dir / "dr"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="tmp") as tmp:
        reads = read_volumes(list(volumes), idents, keys,
                             keep_backups=None if no_backup else Path(tmp))
        merged: dict = {"applied": None}
        catalog = open_catalog(settings)
        try:
            found = None if no_backup else CR.newest_backup(reads, trust_unsigned)
            if no_backup:
                merged["reason"] = "--no-catalog-backup"
            elif found is None:
                merged["reason"] = ("no catalog backup on a volume signed by our key among "
                                    "those read (written before volumes carried one, cut "
                                    "off, or not signed)")
            elif not CR.is_empty(catalog):
                merged["reason"] = ("the catalog already holds studies: the backup on the "
                                    "volumes was not put back (only an empty catalog is "
                                    "replaced; 'catalog restore' does it by hand)")
            else:
                catalog.close()
                lock = hold_instance_lock(settings.data_dir)   # never under a running daemon
                try:
                    merged = CR.put_back(settings, *found, idents)
                finally:
                    os.close(lock)
                catalog = open_catalog(settings, migrate=True)  # an older backup: schema up
                tier = open_object_tier_or_none(settings)
                merged.update(CR.mark_absent_copies(catalog, open_sites(settings),
                                                    tier if tier.health().ok else None))
                audit.record_quietly(catalog, audit.Event(
                    "catalog-restore", "success", actor.name, audit.host(),
                    detail={"from": merged["applied"], "volume": merged["volume"]}))
            audit.record_key_use(catalog, actor.name, identity_fingerprints(idents),
                                 "dr rebuild-catalog")
            r = rebuild(catalog, reads, settings.dr.retain_days, trust_unsigned)
        finally:
            catalog.close()
    if merged["applied"]:
        merged["added_from_volumes"] = sum((v.get("imported") or {}).get("instances", 0)
                                           for v in r["volumes"])
        merged["not_in_it"] = (f"what happened after {merged['taken_at']} and is on no volume "
                               "read: audit records, custody moves, account and peer "
                               "changes, and images not written to these volumes")
    r["catalog_backup"] = merged
    for v in r["volumes"]:
        if v.get("imported") and "refused" in v["imported"]:
            click.echo(f"REFUSED {v['barcode'] or v['where']}: {v['imported']['refused']}",
                       err=True)
    for vs, st in r["sets"].items():
        if st["missing"]:
            click.echo(f"MISSING from set {vs}: volume(s) #{', #'.join(map(str, st['missing']))}",
                       err=True)
        if st["more_after_last"]:
            click.echo(f"MISSING from set {vs}: the volume(s) after #{st['found'][-1]}", err=True)
    for s in r["incomplete_studies"]:
        click.echo(f"INCOMPLETE study {s['study_uid']}: {s['instances_found']} of "
                   f"{s['instances_expected']} instances found", err=True)
    if as_json:
        emit_json(r)
    else:
        if merged["applied"]:
            click.echo(f"catalog backup {merged['applied']} from volume {merged['volume']} put "
                       f"back (taken {merged['taken_at']}); {merged['added_from_volumes']} "
                       f"instances added from the volumes since; copies no longer there: "
                       f"{merged['absent'] or 'none'}; lost: {merged['not_in_it']}")
        else:
            click.echo(f"no catalog backup put back: {merged['reason']}")
        click.echo(f"{len(r['volumes'])} volumes read; {r['studies']} studies, "
                   f"{r['studies_complete']} complete")
    if not r["ok"]:
        sys.exit(1)


@dr.command()
@click.option("--pool", default=None, help="Only this pool.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def volumes(ctx: click.Context, pool: str | None, as_json: bool, config: str | None) -> None:
    """List DR volumes: set, sequence, state, custody location, size, retention."""
    from dr.volumes import list_volumes

    settings = settings_from(ctx, config)
    authorize(settings, "read", "dr volumes")
    catalog = open_catalog(settings)
    try:
        rows = list_volumes(catalog, pool)
    finally:
        catalog.close()
    if as_json:
        emit_json({"volumes": rows})
        return
    for v in rows:
        click.echo(f"{v['barcode']:10} {v['pool']:10} set {v['volume_set'][:8]} #{v['sequence']:<3} "
                   f"{v['state']:10} {v['location'] or '-':16} {v['bytes']:>14} bytes "
                   f"{v['studies']:>6} studies  sealed {v['sealed_at'] or '-'}"
                   + ("  recyclable" if v["recyclable"] else ""))


# -- chain of custody, courier manifest, rotation (dr/custody.py, dr/manifest_html.py) ----------

def _shown(text: str | None) -> str:
    """Catalog text made safe for a terminal: a hand-edited row cannot inject escapes."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text or "") or "-"


@dr.command()
@click.argument("barcode")
@click.option("--to", "to_state", default=None, metavar="STATE",
              help="New state: in-library, in-transit, offsite, recalled, returned, expired, "
                   "destroyed.")
@click.option("--location", default=None, metavar="TEXT", help="Where the volume is now.")
@click.option("--by", "actor", default=None, metavar="NAME", help="Who made the move.")
@click.option("--courier", "courier_ref", default="", metavar="REF",
              help="Courier reference (consignment, seal or bag number).")
@click.option("--note", default="", metavar="TEXT", help="Free text (no patient data).")
@click.option("--history", "show_history", is_flag=True,
              help="Print the volume's chain of custody instead, and check it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
@click.pass_context
@handle_errors
def custody(ctx: click.Context, barcode: str, to_state: str | None, location: str | None,
            actor: str | None, courier_ref: str, note: str, show_history: bool, as_json: bool,
            config: str | None) -> None:
    """Record a move of volume BARCODE (who, where, when), or print its chain.

    Moves are appended to the custody log and never changed. Only legal moves
    are accepted (docs/operations/dr.md); 'expired' only once the volume's
    retention has ended, 'destroyed' only from expired (or a failed write).
    With --history, exits 1 if the chain is not continuous.
    """
    from dr.custody import check_chain, history, move

    if show_history == (to_state is not None):
        raise InvalidInput("give --to STATE (with --location and --by) or --history")
    if show_history and (location or actor or courier_ref or note):
        raise InvalidInput("--history takes no --location, --by, --courier or --note")
    settings = settings_from(ctx, config)
    operator = authorize(settings, "read" if show_history else "operate", "dr custody")
    catalog = open_catalog(settings)
    try:
        if show_history:
            events, chain = history(catalog, barcode), check_chain(catalog, barcode)
        else:
            event = move(catalog, barcode, to_state, location or "", actor or "", courier_ref,
                         note)
            audit.record_quietly(catalog, audit.Event(
                "dr-volume-moved", actor=operator.name, source=audit.host(),
                detail={k: event[k] for k in ("barcode", "from_state", "to_state", "location",
                                              "actor", "courier_ref")}))
    finally:
        catalog.close()
    if not show_history:
        if as_json:
            emit_json(event)
        else:
            click.echo(f"{event['barcode']}: {event['from_state']} -> {event['to_state']} at "
                       f"{_shown(event['location'])} by {_shown(event['actor'])} ({event['at']})")
        return
    if as_json:
        emit_json({"barcode": barcode, "events": events, "chain": chain})
    else:
        for ev in events:
            click.echo(f"{ev['at'] or '-':32} {ev['from_state'] or '':10} -> {ev['to_state']:10} "
                       f"{_shown(ev['location']):20} by {_shown(ev['actor'])}"
                       + (f"  courier {_shown(ev['courier_ref'])}" if ev["courier_ref"] else "")
                       + (f"  ({_shown(ev['note'])})" if ev["note"] and not ev["implicit"] else ""))
        click.echo(f"chain: {'ok' if chain['ok'] else 'BROKEN'}, {chain['moves']} moves")
    for p in chain["problems"]:
        click.echo(f"CHAIN {_shown(barcode)}: {_shown(p)}", err=True)
    if not chain["ok"]:
        sys.exit(1)


@dr.command()
@click.argument("barcodes", nargs=-1, required=True, metavar="BARCODE...")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.html", help="Write the manifest here.")
@click.option("--courier", "courier_ref", default="", metavar="REF",
              help="Courier reference printed on the manifest.")
@config_option
@click.pass_context
@handle_errors
def manifest(ctx: click.Context, barcodes: tuple[str, ...], out: Path, courier_ref: str,
             config: str | None) -> None:
    """Write a printable HTML manifest of volumes for the courier.

    One self-contained page: each volume's barcode (Code 39), pool, set,
    sequence, size, number of studies, seal date, SHA-256, state and location,
    and signature lines. It names no patient, study or UID.
    """
    from dr.manifest_html import write_manifest

    settings = settings_from(ctx, config)
    authorize(settings, "operate", "dr manifest")
    catalog = open_catalog(settings)
    try:
        r = write_manifest(catalog, list(barcodes), out, courier_ref)
    finally:
        catalog.close()
    click.echo(f"manifest of {len(r['volumes'])} volumes written to {out}")


@dr.command()
@click.option("--days", type=click.IntRange(min=0, max=3650), default=30, show_default=True,
              help="Also list volumes whose retention ends within this many days.")
@click.option("--pool", default=None, help="Only this pool.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def rotation(ctx: click.Context, days: int, pool: str | None, as_json: bool,
             config: str | None) -> None:
    """Volumes that may be recycled now, and those whose retention ends soon.

    Recyclable: retention ended and the volume is in-library, offsite, returned
    or expired. Record 'expired' and then 'destroyed' (erased, overwritten or
    shredded) before the cartridge is used again under a new barcode.
    """
    from dr.volumes import rotation as plan

    settings = settings_from(ctx, config)
    authorize(settings, "read", "dr rotation")
    catalog = open_catalog(settings)
    try:
        r = plan(catalog, days, pool)
    finally:
        catalog.close()
    if as_json:
        emit_json(r)
        return
    for title, rows in (("recyclable now", r["recyclable"]),
                        (f"retention ends within {days} days", r["upcoming"])):
        click.echo(f"{title}: {len(rows)}")
        for v in rows:
            click.echo(f"  {_shown(v['barcode']):10} {v['pool']:10} set {v['volume_set'][:8]} "
                       f"#{v['sequence']:<3} {v['state']:10} {_shown(v['location']):16} "
                       f"retained until {(v['retain_until'] or '-')[:10]}")
