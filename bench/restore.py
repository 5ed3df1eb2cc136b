"""Restore benchmark: throughput and time to first instance per tier, against the
raw read rate of the same medium, in the same run.

    .venv/bin/python -m bench.restore [--quick] [--mb 500] [--repeat 3] [--json FILE]

One embedded install holds one study of 512 KiB CT-like images (the data of
bench/tiering.py) on its two online sites, as a bundle on the object tier
(copy-only migration, a local directory) and on DR volumes (file-backed,
encrypted to a key made for the run). Then, for each tier, after a page-cache
drop each time, alternating:

* ``raw``      -- reading the medium's files front to back and hashing them:
  the site-a files (online), the bundle file (objects), the volume files (dr).
  What any restore from that medium must at least do.
* ``restore``  -- ``Restorer`` in-process with ``--from <tier>`` into a fresh
  directory, exactly what ``pacsvault restore --study UID --to DIR --from TIER``
  does minus process start-up: every instance read, checked against the
  catalog SHA-256 (decompressed from the bundle; decrypted, decompressed and
  joined from the volumes), written and fsync'd to the directory.

Printed per tier: raw MB/s (medium bytes: a bundle and a volume are
compressed), restore MB/s (study bytes), the ratio raw time / restore time (1.0:
the restore costs no more than reading its medium), and the restore's time to
first and to last instance.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.tiering import drop_cache, make_study
from tests.support.tiering import Install


def _raw(files: list[Path]) -> None:
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 MB, 1 round (CI)")
    ap.add_argument("--mb", type=int, default=None, help="study size in MB (default 500)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    mb = args.mb or (30 if args.quick else 500)
    repeat = args.repeat or (1 if args.quick else 3)
    count = max(2, mb * 1000 * 1000 // (512 * 1024))
    work = Path(tempfile.mkdtemp(prefix="pv-bench-restore-", dir=args.workdir))
    try:
        from dr.deliver import DirDelivery
        from dr.keys import keygen, load_identities
        from dr.restore import Restorer, Selection, select_studies

        inst = Install.create(work / "pv")
        key = work / "key.txt"
        recipient = keygen(key)
        text = inst.config.read_text().replace("purge_online = true", "purge_online = false")
        head, _, dr = text.partition("\n[dr]\n")
        dr = dr.replace("recipients = []", f'recipients = ["{recipient}"]', 1)
        inst.config.write_text(f"{head}\n[dr]\n{dr}")
        print(f"making and ingesting {count} x 512 KiB images ...", flush=True)
        made = make_study(work / "in", count, "ct")
        inst.ingest(made)
        shutil.rmtree(work / "in")
        study = made[0].study_uid
        from tests.support.daemon import run_cli
        run_cli(inst.config, "migrate", "--study", study)
        run_cli(inst.config, "dr", "write")
        s = inst.settings
        media = {
            "online": sorted((s.sites[0].path / "objects").rglob("*.dcm")),
            "objects": sorted((s.objects.path / "bundles").rglob("*.pvb")),
            "dr": sorted((inst.config.parent / "dr" / "volumes").glob("*.tar")),
        }
        study_bytes = sum(p.stat().st_size for p in media["online"])
        idents = load_identities([key])
        rounds = []
        for r in range(repeat):
            row = {}
            for tier, files in media.items():
                drop_cache()
                t0 = time.perf_counter()
                _raw(files)
                raw_s = time.perf_counter() - t0
                out = work / f"out-{tier}-{r}"
                catalog = inst.catalog()
                try:
                    chosen = select_studies(catalog, Selection(studies=(study,)))
                    tier_b = inst.tier()
                    drop_cache()
                    t0 = time.perf_counter()
                    rep = Restorer(catalog, inst.sites(), tier_b, DirDelivery(out),
                                   sources=(tier,), identities=idents,
                                   scratch=out / ".pacsvault-restore").run(chosen)
                    restore_s = time.perf_counter() - t0
                finally:
                    catalog.close()
                assert rep.ok and rep.restored == len(made), rep.to_json()["failures"][:3]
                shutil.rmtree(out)
                raw_bytes = sum(p.stat().st_size for p in files)
                row[tier] = {"raw_s": round(raw_s, 3), "restore_s": round(restore_s, 3),
                             "raw_MBps": round(raw_bytes / 1e6 / raw_s, 1),
                             "restore_MBps": round(study_bytes / 1e6 / restore_s, 1),
                             "first_s": rep.first_s and round(rep.first_s, 3),
                             "last_s": round(rep.last_s or 0, 3),
                             "medium_bytes": raw_bytes}
            rounds.append(row)
            print(json.dumps({"round": r + 1, **row}), flush=True)
        med = {t: {k: statistics.median(x[t][k] for x in rounds)
                   for k in ("raw_s", "restore_s", "raw_MBps", "restore_MBps", "first_s", "last_s")}
               for t in media}
        for t in med:
            # How close a restore comes to just reading its medium: raw time / restore time.
            med[t]["ratio"] = round(med[t]["raw_s"] / med[t]["restore_s"], 2)
        summary = {"instances": len(made), "study_bytes": study_bytes, "cpus": os.cpu_count(),
                   "rounds": rounds, "median": med}
        print(f"\n{len(made)} instances, {study_bytes / 1e6:.0f} MB; page cache dropped before "
              "each contender")
        print(f"{'tier':8} {'raw MB/s':>9} {'restore MB/s':>13} {'raw/restore time':>17} "
              f"{'first (s)':>10} {'last (s)':>9}")
        for t, m in med.items():
            print(f"{t:8} {m['raw_MBps']:9.1f} {m['restore_MBps']:13.1f} {m['ratio']:17.2f} "
                  f"{m['first_s']:10.3f} {m['last_s']:9.2f}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
