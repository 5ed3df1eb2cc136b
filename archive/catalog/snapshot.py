"""A consistent copy of the whole catalog, compressed: what a catalog backup holds.

SQLite: the online backup API (every page as of one moment, taken while the
daemon writes). PostgreSQL: a custom-format ``pg_dump``. Both are compressed
with zstd. The app's scheduled backups (archive/app/catalog_backup.py) and the
DR writer (every volume carries one) take them the same way, so one reader
(``catalog restore``, ``dr rebuild-catalog``) reads both.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path

import zstandard

from archive.catalog.uow import Catalog
from archive.errors import CatalogError

CHUNK = 1 << 20


def kind_of(catalog: Catalog) -> str:
    return "sqlite" if catalog.engine.dialect.name == "sqlite" else "pgdump"


def file_name(kind: str, at: datetime) -> str:
    """``catalog-<UTC time>.<kind>.zst``: sorts by time; the kind says how to restore it."""
    return f"catalog-{at.strftime('%Y%m%dT%H%M%S%fZ')}.{kind}.zst"


def take(catalog: Catalog, out: Path) -> Path:
    """A consistent copy of the whole catalog in ``out`` (a new file)."""
    if catalog.engine.dialect.name == "sqlite":
        src = sqlite3.connect(catalog.engine.url.database, timeout=60)
        dst = sqlite3.connect(out)
        try:
            src.backup(dst)               # pages copied under SQLite's locks: one moment
        finally:
            dst.close()
            src.close()
        return out
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise CatalogError("pg_dump not found: install the PostgreSQL client "
                           "(Debian: postgresql-client)")
    url = catalog.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    p = subprocess.run([pg_dump, "--format=custom", "--no-owner", f"--file={out}",
                        f"--dbname={url}"], capture_output=True, text=True, timeout=6 * 3600)
    if p.returncode != 0:
        # pg_dump's message names tables and the server, never rows.
        raise CatalogError(f"pg_dump failed: {p.stderr.strip()[:300]}")
    return out


def compress(src: Path, dst: Path) -> tuple[int, str]:
    """zstd ``src`` into ``dst`` (fsync'd); its size and SHA-256."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        writer = zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(fout, closefd=False)
        while chunk := fin.read(CHUNK):
            writer.write(chunk)
        writer.close()
        fout.flush()
        os.fsync(fout.fileno())
    with open(dst, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return dst.stat().st_size, h.hexdigest()


def take_compressed(catalog: Catalog, directory: Path, at: datetime) -> tuple[Path, int, str]:
    """A snapshot, compressed, as ``directory/<file_name>``: (path, size, SHA-256).
    The uncompressed copy is removed."""
    kind = kind_of(catalog)
    raw = take(catalog, directory / f"catalog.{kind}")
    packed = directory / file_name(kind, at)
    try:
        size, sha = compress(raw, packed)
    finally:
        raw.unlink(missing_ok=True)
    return packed, size, sha
