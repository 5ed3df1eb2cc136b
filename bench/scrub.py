"""Scrub benchmark: pacsvault scrub vs sha256sum vs a bare read-and-hash loop.

    .venv/bin/python -m bench.scrub [--quick] [--mb 1000] [--json FILE]

One embedded install is filled in-process with 512 KiB CT-like images; then,
over the same files of site-a, each after a page-cache drop, in the same run:

* ``sha256sum``  -- Debian coreutils over every file (``xargs sha256sum``);
* ``bare loop``  -- Python: open, read 1 MiB chunks, hashlib SHA-256, one core:
  the limit a scrub can approach per core;
* ``scrub x1`` / ``scrub x2`` -- ``Scrubber.run(["site-a"])`` (what ``pacsvault
  scrub --site site-a`` does: catalog batches, device reads, compare, record)
  with 1 and 2 threads and no rate cap.

Printed: MB/s of each and the scrub's ratio to the bare loop and to sha256sum.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.tiering import drop_cache, make_study
from replication.scrub import Scrubber
from tests.support.tiering import Install


def bare_loop(files: list[Path]) -> None:
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
        h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 MB, 1 round (CI)")
    ap.add_argument("--mb", type=int, default=None, help="data per site in MB (default 1000)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    mb = args.mb or (60 if args.quick else 1000)
    repeat = args.repeat or (1 if args.quick else 3)
    count = max(1, mb * 1000 * 1000 // (512 * 1024))
    work = Path(tempfile.mkdtemp(prefix="pv-bench-scrub-", dir=args.workdir))
    try:
        inst = Install.create(work / "pv")
        print(f"making and ingesting {count} x 512 KiB images ...", flush=True)
        inst.ingest(make_study(work / "in", count, "ct"))
        shutil.rmtree(work / "in")
        site_a = inst.settings.sites[0].path / "objects"
        files = sorted(site_a.rglob("*.dcm"))
        total = sum(f.stat().st_size for f in files)
        listing = work / "files.txt"
        listing.write_text("\n".join(str(f) for f in files) + "\n")

        def timed(fn) -> float:  # noqa: ANN001
            drop_cache()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def sha256sum() -> None:
            subprocess.run(f"xargs -a {listing} -d '\\n' sha256sum > /dev/null", shell=True,
                           check=True)

        def scrub(threads: int):  # noqa: ANN202
            def go() -> None:
                catalog = inst.catalog()
                try:
                    r = Scrubber(catalog, inst.sites(), None, scratch=work / "scratch",
                                 max_mb_per_s=0, threads=threads).run(["site-a"])
                    assert r.ok and r.objects == len(files), r.to_json()
                finally:
                    catalog.close()
            return go

        contenders = {"sha256sum": sha256sum, "bare loop": lambda: bare_loop(files),
                      "scrub x1": scrub(1), "scrub x2": scrub(2)}
        rounds = []
        for r in range(repeat):
            row = {name: round(total / 1e6 / timed(fn), 1) for name, fn in contenders.items()}
            rounds.append(row)
            print(json.dumps({"round": r + 1, "MBps": row}), flush=True)
        med = {name: statistics.median(x[name] for x in rounds) for name in contenders}
        summary = {"files": len(files), "bytes": total, "cpus": os.cpu_count(), "rounds": rounds,
                   "median_MBps": med,
                   "ratios": {"scrub_x1_vs_bare": round(med["scrub x1"] / med["bare loop"], 2),
                              "scrub_x2_vs_bare": round(med["scrub x2"] / med["bare loop"], 2),
                              "scrub_x1_vs_sha256sum": round(med["scrub x1"] / med["sha256sum"], 2)},
                   "targets": {"scrub_x1_vs_bare": 0.9, "scrub_x2_vs_bare": 1.6}}
        print(f"\n{len(files)} files, {total / 1e6:.0f} MB on site-a (page cache dropped each time)")
        for name in contenders:
            print(f"{name:10} {med[name]:8.1f} MB/s")
        rt = summary["ratios"]
        print(f"scrub x1 / bare loop {rt['scrub_x1_vs_bare']:.2f}x (target 0.9x); "
              f"scrub x2 / bare loop {rt['scrub_x2_vs_bare']:.2f}x (target 1.6x); "
              f"scrub x1 / sha256sum {rt['scrub_x1_vs_sha256sum']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
