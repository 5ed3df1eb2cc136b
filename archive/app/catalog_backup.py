"""Catalog backups: the records that make the images usable (patients to instances
and copies, the audit trail, accounts' password hashes, the custody log, peers,
jobs) written where the images go, so that losing the catalog's disk loses at
most what happened since the newest backup.

A backup is a consistent snapshot, compressed with zstd: SQLite's online backup
API (a copy of the whole database as of one moment, taken while the daemon
writes) or a PostgreSQL custom-format dump (``pg_dump``). It is written under
``catalog-backups/`` on each online site (a verified copy, as an image is) and
on the object tier, encrypted there with age to the DR recipients (the tier may
be a third party's storage; without recipients it is not written there). A
small JSON manifest (no patient data: counts, sizes, hashes, the schema
revision) goes beside each. The newest ``[catalog] backup_keep`` of each place
are kept. docs/formats/site-layout.md specifies the names.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyrage
import zstandard
from sqlalchemy import func, select, text

from archive.catalog import snapshot
from archive.catalog.models import AuditRecord, Instance, Study
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.config.schema import Settings
from archive.errors import CatalogError, ConfigError, InvalidInput
from dr.keys import parse_recipient
from tiers.backend import Backend, FilePayload

log = logging.getLogger("pacsvault.catalog_backup")

PREFIX = "catalog-backups/"
CHUNK = 1 << 20


@dataclass
class BackupReport:
    name: str                              # catalog-<UTC time>.<kind>.zst
    kind: str                              # sqlite | pgdump
    bytes: int
    sha256: str
    manifest: dict[str, Any]
    places: dict[str, str] = field(default_factory=dict)   # place -> written | skipped: | failed:
    removed: int = 0                       # older backups past backup_keep

    @property
    def ok(self) -> bool:
        return any(v == "written" for v in self.places.values()) and not any(
            v.startswith("failed") for v in self.places.values())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "name": self.name, "kind": self.kind, "bytes": self.bytes,
                "sha256": self.sha256, "places": self.places, "removed": self.removed,
                "instances": self.manifest["instances"],
                "audit_records": self.manifest["audit_records"]}


def _manifest(catalog: Catalog, name: str, kind: str, size: int, sha256: str,
              now: datetime) -> dict[str, Any]:
    with catalog.unit() as uow:
        s = uow.session
        revision = s.execute(text("select version_num from alembic_version")).scalar()
        counts = {"instances": s.scalar(select(func.count()).select_from(Instance)) or 0,
                  "studies": s.scalar(select(func.count()).select_from(Study)) or 0,
                  "audit_records": s.scalar(select(func.count()).select_from(AuditRecord)) or 0}
    return {"format": "pacsvault-catalog-backup", "version": 1, "name": name, "kind": kind,
            "created_at": now.isoformat(), "host": os.uname().nodename[:64],
            "schema_revision": revision, "bytes": size, "sha256": sha256, **counts}


def backup(settings: Settings, catalog: Catalog, sites: list[Backend], tier: Backend | None,
           *, clock: Clock = utcnow) -> BackupReport:
    """Take a snapshot and write it to every place; never raises for one place failing
    (the report says which), only when no snapshot can be taken."""
    now = clock()
    kind = snapshot.kind_of(catalog)
    scratch = settings.ingest.spool_dir / "catalog-backup"
    scratch.mkdir(parents=True, exist_ok=True)
    _sweep(scratch)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        packed, size, sha = snapshot.take_compressed(catalog, Path(tmp), now)
        name = packed.name
        manifest = _manifest(catalog, name, kind, size, sha, now)
        report = BackupReport(name, kind, size, sha, manifest)
        meta = Path(tmp) / (name + ".json")
        meta.write_text(json.dumps(manifest, indent=1) + "\n")
        payloads = [(PREFIX + name, _payload(packed)), (PREFIX + name + ".json", _payload(meta))]
        for site in sites:
            report.places[site.name] = _put(site, payloads)
        if tier is not None:
            recipients = list(settings.dr.recipients)
            if not recipients:
                report.places[tier.name] = ("skipped: no [dr] recipients to encrypt to "
                                            "(the object tier gets catalog backups encrypted only)")
            else:
                sealed = Path(tmp) / (name + ".age")
                pyrage.encrypt_file(str(packed), str(sealed),
                                    [parse_recipient(r) for r in recipients])
                report.places[tier.name] = _put(tier, [
                    (PREFIX + name + ".age", _payload(sealed)),
                    (PREFIX + name + ".json", _payload(meta))])
        for place in [*sites, *([tier] if tier is not None else [])]:
            if report.places.get(place.name) == "written":
                report.removed += _prune(place, settings.catalog.backup_keep)
    log.info("catalog backup %s (%d bytes): %s", name, size,
             ", ".join(f"{k} {v}" for k, v in report.places.items()))
    return report


def _sweep(scratch: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove what a crashed backup left in our scratch (a whole catalog: patient
    data); a run still going (hours old at most) is left alone."""
    import time
    for entry in scratch.iterdir():
        if entry.name.startswith("tmp") and entry.is_dir() and not entry.is_symlink() \
                and time.time() - entry.stat().st_mtime > older_than_s:
            shutil.rmtree(entry, ignore_errors=True)


def _payload(path: Path) -> FilePayload:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return FilePayload(path, path.stat().st_size, h.hexdigest())


def _put(place: Backend, payloads: list[tuple[str, FilePayload]]) -> str:
    try:
        for key, payload in payloads:
            place.put(key, payload)
        return "written"
    except Exception as e:  # noqa: BLE001 - one place down: the others still get it
        log.error("catalog backup not written to %s: %s", place.name, e)
        return f"failed: {e}"


def _prune(place: Backend, keep: int) -> int:
    try:
        names = sorted({i.key.split("/", 1)[1].split(".", 1)[0]
                        for i in place.list(PREFIX) if i.key.split("/", 1)[1].startswith(
                            "catalog-")})
        old = set(names[:-keep]) if len(names) > keep else set()
        doomed = [i.key for i in place.list(PREFIX)
                  if i.key.split("/", 1)[1].split(".", 1)[0] in old]
        place.delete_many(doomed)
        return len(old)
    except Exception as e:  # noqa: BLE001 - pruning is housekeeping: say so, go on
        log.warning("old catalog backups not pruned on %s: %s", place.name, e)
        return 0


# -- what each place holds ---------------------------------------------------------------------
def newest(place: Backend, clock: Clock = utcnow) -> dict[str, Any] | None:
    """The newest backup a place holds: its name and age; None if it holds none."""
    try:
        names = sorted(i.key.split("/", 1)[1] for i in place.list(PREFIX)
                       if i.key.endswith((".zst", ".zst.age")))
    except Exception:  # noqa: BLE001 - a place down: status shows the site itself as down
        return None
    if not names:
        return None
    stamp = names[-1].split(".", 1)[0].removeprefix("catalog-")
    try:
        at = datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=clock().tzinfo)
    except ValueError:
        return {"name": names[-1], "age_s": None}
    return {"name": names[-1], "age_s": max(0.0, (clock() - at).total_seconds())}


# -- reading one back ----------------------------------------------------------------------------
def unpack(path: Path, out: Path, *, identities: list | None = None) -> tuple[str, Path]:
    """The snapshot inside a backup file (``.zst``, or ``.zst.age`` with the DR
    identities) written to ``out``: (kind, path). InvalidInput for a file that is not
    a whole backup (cut short, altered, the wrong key)."""
    name = path.name
    if not name.startswith("catalog-") or not (name.endswith(".zst") or
                                               name.endswith(".zst.age")):
        raise InvalidInput(f"{name}: not a catalog backup (catalog-<time>.<kind>.zst[.age])")
    kind = name.split(".")[1]
    if kind not in ("sqlite", "pgdump"):
        raise InvalidInput(f"{name}: unknown catalog backup kind")
    src = path
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        if name.endswith(".age"):
            if not identities:
                raise InvalidInput("an encrypted catalog backup needs --identity (the DR key)")
            src = Path(tmp) / "plain.zst"
            try:
                pyrage.decrypt_file(str(path), str(src), identities)
            except Exception:  # noqa: BLE001 - pyrage's errors: wrong key or altered file
                raise InvalidInput(f"{name}: cannot be decrypted with the identities given "
                                   "(wrong key, or the file was altered)") from None
        try:
            with open(src, "rb") as fin, open(out, "wb") as fout:
                reader = zstandard.ZstdDecompressor().stream_reader(fin, read_across_frames=True)
                while chunk := reader.read(CHUNK):
                    fout.write(chunk)
        except zstandard.ZstdError:
            out.unlink(missing_ok=True)
            raise InvalidInput(f"{name}: cut short or altered (zstd cannot read it)") from None
    if kind == "sqlite":
        try:
            with sqlite3.connect(f"file:{out}?mode=ro", uri=True) as c:
                if c.execute("pragma integrity_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("integrity check failed")
                c.execute("select version_num from alembic_version").fetchone()
        except sqlite3.DatabaseError:
            out.unlink(missing_ok=True)
            raise InvalidInput(f"{name}: the snapshot inside is not a sound pacsvault "
                               "catalog") from None
    return kind, out


def put_back(settings: Settings, backup_file: Path, identities: list) -> Path | None:
    """Replace the catalog with the snapshot in ``backup_file`` (the caller holds the
    instance lock: no daemon runs). An SQLite catalog that is there is kept beside it
    as ``catalog.db.replaced-<time>`` (returned); PostgreSQL is restored into the
    configured database with ``pg_restore --clean``. The schema is not migrated here."""
    from archive.catalog.engine import make_engine

    engine = make_engine(settings.catalog.url)
    dialect, url = engine.dialect.name, engine.url
    engine.dispose()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if dialect != "sqlite":
        with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
            kind, snap = unpack(backup_file, Path(tmp) / "restored.pgdump",
                                identities=identities)
            if kind != "pgdump":
                raise InvalidInput("this is an SQLite backup; the catalog is PostgreSQL")
            _pg_restore(snap, url.set(drivername="postgresql").render_as_string(
                hide_password=False))
        return None
    target = Path(url.database)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        kind, snap = unpack(backup_file, Path(tmp) / "restored.db", identities=identities)
        if kind != "sqlite":
            raise InvalidInput("this is a PostgreSQL backup; the catalog is SQLite")
        kept = None
        if target.exists():
            kept = target.with_name(f"{target.name}.replaced-{stamp}")
            target.rename(kept)
            for side in ("-wal", "-shm"):
                extra = target.with_name(target.name + side)
                if extra.exists():
                    extra.rename(kept.with_name(kept.name + side))
        shutil.move(str(snap), target)
    return kept


def _pg_restore(dump: Path, url: str) -> None:
    tool = shutil.which("pg_restore")
    if tool is None:
        raise ConfigError("pg_restore not found: install the PostgreSQL client")
    p = subprocess.run([tool, "--clean", "--if-exists", "--no-owner", f"--dbname={url}",
                        str(dump)], capture_output=True, text=True, timeout=6 * 3600)
    if p.returncode != 0:
        raise CatalogError(f"pg_restore failed: {p.stderr.strip()[:300]}")
