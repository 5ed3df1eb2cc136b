"""`pacsvault catalog backup` and `catalog restore`: the catalog's own protection."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.errors import CatalogError, InvalidInput


@click.group()
def catalog() -> None:
    """Back up and restore the catalog (images' records, audit trail, accounts, peers)."""


@catalog.command("backup")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def backup_cmd(ctx: click.Context, as_json: bool, config: str | None) -> None:
    """Write a consistent snapshot of the catalog to both sites and, encrypted to the
    DR recipients, to the object tier (catalog-backups/). Exits 1 if a place could
    not take it."""
    from archive.app import catalog_backup as B
    from archive.app.compose import open_catalog, open_object_tier_or_none, open_sites

    settings = settings_from(ctx, config)
    authorize(settings, "operate", "catalog backup")
    cat = open_catalog(settings)
    try:
        tier = open_object_tier_or_none(settings)
        report = B.backup(settings, cat, open_sites(settings),
                          tier if tier.health().ok else None)
        if not tier.health().ok:
            report.places[settings.objects.name] = f"failed: {tier.health().reason}"
        _audit(cat, "catalog-backup", report.ok, {"name": report.name, "places": report.places})
    finally:
        cat.close()
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(f"catalog backup {report.name} ({report.bytes} bytes, "
                   f"{report.manifest['instances']} instances): "
                   + ", ".join(f"{k}: {v}" for k, v in report.places.items()))
    if not report.ok:
        sys.exit(1)


@catalog.command("restore")
@click.argument("backup_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--identity", "identities", multiple=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="DR identity, for a backup taken from the object tier (.age).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def restore_cmd(ctx: click.Context, backup_file: Path, identities: tuple[Path, ...],
                as_json: bool, config: str | None) -> None:
    """Put the catalog back from BACKUP_FILE (catalog-<time>.<kind>.zst from a site's
    catalog-backups/, or .zst.age from the object tier with --identity). The daemon
    must be stopped. An SQLite catalog that is still there is kept beside it as
    catalog.db.replaced-<time>; PostgreSQL is restored into the configured database
    with pg_restore --clean. The schema is then brought up to this version.
    Everything since the backup was taken is not in it: the report says when that was."""
    from archive.app import catalog_backup as B
    from archive.app.compose import open_catalog
    from archive.instance_lock import hold_instance_lock
    from dr.keys import load_identities

    settings = settings_from(ctx, config)
    lock = hold_instance_lock(settings.data_dir)     # never under a running daemon
    try:
        try:
            authorize(settings, "admin", "catalog restore")
        except CatalogError:
            pass        # no catalog to ask: whoever may read the config, as before any account
        idents = load_identities(list(identities)) if identities else []
        _check_sidecar(backup_file)
        kept = B.put_back(settings, backup_file, idents)
        cat = open_catalog(settings, migrate=True)    # an older backup: bring the schema up
        try:
            st = _counts(cat)
            _audit(cat, "catalog-restore", True, {"from": backup_file.name,
                                                   "replaced": kept.name if kept else None})
        finally:
            cat.close()
    finally:
        import os
        os.close(lock)
    taken = backup_file.name.split(".", 1)[0].removeprefix("catalog-")
    out = {"ok": True, "restored_from": backup_file.name, "taken_at": taken,
           "replaced": str(kept) if kept else None, **st}
    if as_json:
        emit_json(out)
    else:
        click.echo(f"catalog restored from {backup_file.name} (taken {taken}): "
                   f"{st['instances']} instances, {st['studies']} studies, "
                   f"{st['audit_records']} audit records; what happened after it was taken "
                   "is not in it: re-send or rebuild that (docs/operations/restore.md)"
                   + (f"; the previous catalog is kept as {kept}" if kept else ""))


@catalog.command("rebuild")
@click.option("--from", "source", type=click.Choice(["sites"]), required=True,
              help="What is left to rebuild from: the online sites' files.")
@click.option("--no-catalog-backup", "no_backup", is_flag=True,
              help="Rebuild from the files alone, even when a site holds a catalog backup.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@config_option
@click.pass_context
@handle_errors
def rebuild_cmd(ctx: click.Context, source: str, no_backup: bool, as_json: bool,
                config: str | None) -> None:
    """Rebuild a lost catalog from the sites. The daemon must be stopped and the
    catalog hold no study (deleted, or a new one). The newest catalog backup a site
    holds is put back first (audit trail, accounts, peers, custody log); copies it
    names that the sites no longer hold become missing; then every file on the
    sites that it does not name (received after it was taken) is parsed, checked
    and cataloged where it lies. The report says when the backup was taken and
    lists the files that could not be read. Exits 1 if any could not."""
    import os

    from archive import audit
    from archive.app import catalog_rebuild as CR
    from archive.app.compose import open_catalog, open_object_tier_or_none, open_sites
    from archive.app.ingest import IngestService
    from archive.instance_lock import hold_instance_lock
    from replication.mirror import MirrorWriter

    settings = settings_from(ctx, config)
    lock = hold_instance_lock(settings.data_dir)     # never under a running daemon
    try:
        try:
            actor = authorize(settings, "admin", "catalog rebuild")
            who = actor.name
        except CatalogError:
            who = "system"   # no catalog to ask: whoever may read the config
        sites = open_sites(settings)
        cat = open_catalog(settings, migrate=True)
        merged: dict = {"applied": None}
        try:
            if not CR.is_empty(cat):
                raise InvalidInput("the catalog holds studies: rebuild only replaces a lost "
                                   "or empty catalog (move catalog.db aside first, or use "
                                   "'catalog restore')")
            found = None if no_backup else CR.newest_site_backup(sites)
            if found is None:
                merged["reason"] = "--no-catalog-backup" if no_backup else \
                    "no whole catalog backup on any site"
            else:
                site, path = found
                cat.close()
                from archive.app import catalog_backup as B
                kept = B.put_back(settings, path, [])
                cat = open_catalog(settings, migrate=True)
                merged = {"applied": path.name, "site": site.name,
                          "taken_at": CR.taken_at(path.name),
                          "replaced": str(kept) if kept else None}
                tier = open_object_tier_or_none(settings)
                merged.update(CR.mark_absent_copies(cat, sites,
                                                    tier if tier.health().ok else None))
            mirror = MirrorWriter(sites, timeout_s=settings.ingest.site_timeout_s,
                                  retry_after_s=settings.ingest.site_retry_after_s)
            ingest = IngestService(cat, mirror, min_copies=settings.ingest.min_copies)
            try:
                files = CR.adopt_site_files(cat, sites, ingest)
            finally:
                ingest.close()
                mirror.close()
            audit.record_quietly(cat, audit.Event(
                "catalog-restore", "success" if not files["unreadable"] else "failure", who,
                audit.host(), detail={"from": "sites", "backup": merged["applied"],
                                      "adopted": files["adopted"],
                                      "unreadable": len(files["unreadable"])}))
            st = _counts(cat)
        finally:
            cat.close()
    finally:
        os.close(lock)
    if merged["applied"]:
        merged["not_in_it"] = (f"what happened after {merged['taken_at']}: audit records, "
                               "custody moves, account and peer changes; the images received "
                               "since are cataloged from the sites' files (received time and "
                               "calling AE unknown: now and REBUILD)")
    out = {"ok": not files["unreadable"], "from": source, "catalog_backup": merged, **files,
           **st}
    if as_json:
        emit_json(out)
    else:
        click.echo((f"catalog backup {merged['applied']} from {merged['site']} put back "
                    f"(taken {merged['taken_at']}); " if merged["applied"]
                    else f"no catalog backup put back ({merged['reason']}); ")
                   + f"{files['adopted']} files cataloged from the sites; "
                   f"{st['instances']} instances, {st['studies']} studies, "
                   f"{st['audit_records']} audit records")
        for u in files["unreadable"]:
            click.echo(f"UNREADABLE {u['site']}:{u['key']}: {u['reason']}", err=True)
    if files["unreadable"]:
        sys.exit(1)


def _check_sidecar(path: Path) -> None:
    """When the manifest is beside the file, the file must be the one it names."""
    import hashlib
    import json

    name = path.name.removesuffix(".age")
    meta = path.with_name(name + ".json")
    if not meta.is_file():
        return
    try:
        manifest = json.loads(meta.read_text())
    except ValueError:
        raise InvalidInput(f"{meta.name}: not a catalog backup manifest") from None
    if path.name.endswith(".age"):
        return                    # the manifest describes the plaintext .zst
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != manifest.get("sha256"):
        raise InvalidInput(f"{path.name}: does not match the SHA-256 in its manifest "
                           "(cut short or altered); take another copy of it")


def _counts(cat) -> dict:  # noqa: ANN001
    from sqlalchemy import func, select

    from archive.catalog.models import AuditRecord, Instance, Study
    with cat.unit() as uow:
        s = uow.session
        return {"instances": s.scalar(select(func.count()).select_from(Instance)) or 0,
                "studies": s.scalar(select(func.count()).select_from(Study)) or 0,
                "audit_records": s.scalar(select(func.count()).select_from(AuditRecord)) or 0}


def _audit(cat, action: str, ok: bool, detail: dict) -> None:  # noqa: ANN001
    from archive import audit
    from archive.auth import current_actor
    audit.record_quietly(cat, audit.Event(action, "success" if ok else "failure",
                                          current_actor.get() or "system", audit.host(),
                                          detail=detail))
