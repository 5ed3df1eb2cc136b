"""Recount the catalog against every copy: the check every fault test ends with."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from archive.checksum import sha256_file  # noqa: F401 - tests import it from here


@dataclass
class Audit:
    instances: int = 0
    ok_copies: int = 0
    missing_copies: int = 0
    bad: list[str] = field(default_factory=list)        # ok copy absent or wrong SHA-256
    temp_files: list[str] = field(default_factory=list)
    sop_uids: set[str] = field(default_factory=set)


def audit(catalog_url: str, sites: dict[str, Path]) -> Audit:
    """Every 'ok' copy must exist with the catalog SHA-256; no temp file may linger."""
    a = Audit()
    engine = create_engine(catalog_url)
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT i.sop_uid, i.sha256, i.size, c.location, c.key, c.state "
            "FROM instances i JOIN copies c ON c.instance_fk = i.id")).all()
        a.instances = c.execute(text("SELECT count(*) FROM instances")).scalar()
    engine.dispose()
    for sop, sha, size, loc, key, state in rows:
        a.sop_uids.add(sop)
        if state == "ok":
            a.ok_copies += 1
            p = sites[loc] / key
            if not p.is_file():
                a.bad.append(f"{loc}:{key} missing")
            elif p.stat().st_size != size or sha256_file(p) != sha:
                a.bad.append(f"{loc}:{key} wrong content")
        elif state == "missing":
            a.missing_copies += 1
    for name, root in sites.items():
        tmp = root / "tmp"
        if tmp.is_dir():
            a.temp_files += [f"{name}:{p.name}" for p in tmp.iterdir()]
    return a


def sqlite_url(config_dir: Path) -> str:
    return f"sqlite:///{config_dir / 'catalog' / 'catalog.db'}"


def acked_sops_in_catalog(db: Path) -> set[str]:
    with sqlite3.connect(db) as c:
        return {r[0] for r in c.execute("SELECT sop_uid FROM instances")}
