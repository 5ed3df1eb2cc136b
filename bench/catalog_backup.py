"""Catalog backup benchmark: what a catalog snapshot costs, beside the same job done with
standard tools.

Every DR volume and every scheduled catalog backup takes a consistent snapshot of the
whole catalog, compresses it with zstd and (for a volume or the object tier) encrypts
it with age. This fills an SQLite catalog with N instances (bench/catalog.py's loader:
studies of ~100, two copies each), then times, in alternating order with the page
cache dropped before each run (when allowed):

* pacsvault: ``archive/catalog/snapshot.take`` + ``compress`` + ``dr/crypt.encrypt_file``
  (what the DR writer does for each volume);
* the peer: ``sqlite3 DB ".backup OUT" && zstd -3 -T0 && age -r``.

It prints the medians and the ratio (peer seconds / pacsvault seconds: 1.0 is as fast
as the tools). ``--quick``: 20,000 rows, 2 rounds (CI runs this).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyrage

from archive.catalog import snapshot
from archive.catalog.engine import make_engine
from archive.catalog.uow import Catalog
from bench.catalog import sqlite_target
from dr import crypt


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def ours(catalog: Catalog, out: Path, recipient: str) -> float:
    t = time.perf_counter()
    raw = snapshot.take(catalog, out / "raw.db")
    snapshot.compress(raw, out / "c.zst")
    raw.unlink()
    crypt.encrypt_file(str(out / "c.zst"), str(out / "c.zst.age"), [recipient])
    return time.perf_counter() - t


def peer(db: Path, out: Path, recipient: str) -> float:
    t = time.perf_counter()
    subprocess.run(["sqlite3", str(db), f".backup {out / 'raw.db'}"], check=True)
    subprocess.run(["zstd", "-q", "-3", "-T0", "--rm", str(out / "raw.db"), "-o",
                    str(out / "c.zst")], check=True)
    subprocess.run(["age", "-r", recipient, "-o", str(out / "c.zst.age"), str(out / "c.zst")],
                   check=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="instances (default 1,000,000)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of each (default 3)")
    ap.add_argument("--quick", action="store_true", help="20,000 rows, 2 rounds")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = a.rows or (20_000 if a.quick else 1_000_000)
    rounds = a.rounds or (2 if a.quick else 3)
    for tool in ("sqlite3", "zstd", "age"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian packages sqlite3, zstd, age)", file=sys.stderr)
            return 2
    work = a.dir or Path(tempfile.mkdtemp(prefix="pv-bench-backup-"))
    work.mkdir(parents=True, exist_ok=True)
    target = sqlite_target(work, rows)
    db = Path(target.url.split("///", 1)[1])
    catalog = Catalog(make_engine(target.url))
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    times: dict[str, list[float]] = {"pacsvault": [], "tools": []}
    cold = True
    try:
        for r in range(rounds):
            order = ("pacsvault", "tools") if r % 2 == 0 else ("tools", "pacsvault")
            for who in order:
                cold = drop_caches() and cold
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    sec = ours(catalog, Path(tmp), recipient) if who == "pacsvault" \
                        else peer(db, Path(tmp), recipient)
                    packed = (Path(tmp) / "c.zst.age").stat().st_size
                times[who].append(sec)
                print(f"  round {r + 1} {who:9s} {sec:7.2f} s", file=sys.stderr)
    finally:
        catalog.close()
        target.cleanup()
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"rows": rows, "db_bytes": target.db_bytes, "encrypted_bytes": packed,
              "rounds": rounds, "cold_cache": cold, "seconds": med,
              "ratio_tools_over_pacsvault": med["tools"] / med["pacsvault"]}
    print(f"catalog of {rows:,} instances: {target.db_bytes / 1e6:,.0f} MB -> "
          f"{packed / 1e6:,.1f} MB encrypted; snapshot+zstd+age: pacsvault "
          f"{med['pacsvault']:.2f} s, sqlite3 .backup | zstd -3 -T0 | age {med['tools']:.2f} s; "
          f"ratio {result['ratio_tools_over_pacsvault']:.2f} (caches "
          f"{'dropped' if cold else 'warm: could not drop them'})")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
