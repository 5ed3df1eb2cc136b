"""Restore to a PACS by C-STORE against dcmtk storescu sending the same files to the
same PACS, in the same run.

    .venv/bin/python -m bench.restore_ae [--quick] [--count 340] [--repeat 3] [--json FILE]

One embedded install holds one study of ``--count`` small CT images (10 KB, the
size at which per-object latency, not bandwidth, decides). A dcmtk storescp plays
the PACS, once as shipped (Nagle's algorithm on: no TCP_NODELAY in its
environment) and once at its best (TCP_NODELAY=1). For each, alternating the order
every round:

* ``pacsvault`` -- ``pacsvault restore --study UID --to-ae STORESCP@127.0.0.1:PORT``
  as an operator runs it: process start, catalog, every instance read from the
  online site, checked against its SHA-256, sent verbatim in one association.
* ``storescu``  -- ``storescu`` with TCP_NODELAY=1 sending the same files from the
  disk in one association: the peer at its best, with no checking at all.

Printed per PACS setting: the medians of the whole command, the restore's own
time to its last instance, and the ratio storescu / pacsvault (1.0: as fast as
dcmtk's own sender).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.storescp import StoreSCP
from tests.support.tiering import Install


def _clear(scp: StoreSCP) -> None:
    for f in scp.received():
        f.unlink()


def _round(inst: Install, study: str, files: list[Path], scp: StoreSCP, who: str) -> dict:
    _clear(scp)
    t = time.monotonic()
    if who == "pacsvault":
        p = run_cli(inst.config, "restore", "--study", study, "--to-ae",
                    f"{scp.aet}@127.0.0.1:{scp.port}", "--json", check=False)
        wall = time.monotonic() - t
        out = json.loads(p.stdout)
        if p.returncode != 0 or out["restored"] != len(files):
            raise SystemExit(f"restore failed: {p.stderr}")
        sending = out["time_to_last_s"]
    else:
        subprocess.run(["storescu", "-aet", "PACSVAULT", "-aec", scp.aet, "127.0.0.1",
                        str(scp.port), *map(str, files)], check=True,
                       env={**os.environ, "TCP_NODELAY": "1"})
        wall = sending = time.monotonic() - t
    got = len(scp.received())
    if got != len(files):
        raise SystemExit(f"{who}: the PACS received {got} of {len(files)}")
    return {"wall_s": wall, "sending_s": sending}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 instances, 1 round (CI)")
    ap.add_argument("--count", type=int, default=None, help="instances (default 340)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    count = args.count or (60 if args.quick else 340)
    repeat = args.repeat or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="pv-bench-ae-", dir=args.workdir))
    inst = Install.create(work / "pv")
    made = make_ct_series(work / "ct", count, size=10_000)
    inst.ingest(made)
    study, files = made[0].study_uid, [m.path for m in made]
    result: dict = {"instances": count, "repeat": repeat, "pacs": {}}
    for setting, nodelay in (("as shipped", False), ("TCP_NODELAY=1", True)):
        scp = StoreSCP(work / f"scp-{int(nodelay)}", nodelay=nodelay).start()
        runs: dict[str, list[dict]] = {"pacsvault": [], "storescu": []}
        try:
            for r in range(repeat):
                order = ("pacsvault", "storescu") if r % 2 == 0 else ("storescu", "pacsvault")
                for who in order:
                    runs[who].append(_round(inst, study, files, scp, who))
        finally:
            scp.stop()
        med = {who: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "sending_s")}
               for who, rs in runs.items()}
        ratio = med["storescu"]["wall_s"] / med["pacsvault"]["wall_s"]
        ratio_sending = med["storescu"]["sending_s"] / med["pacsvault"]["sending_s"]
        result["pacs"][setting] = {"runs": runs, "median": med, "ratio_wall": ratio,
                                   "ratio_sending": ratio_sending}
        print(f"PACS {setting:14s} storescu {med['storescu']['wall_s']:6.2f} s   "
              f"pacsvault restore {med['pacsvault']['wall_s']:6.2f} s "
              f"(sending {med['pacsvault']['sending_s']:5.2f} s)   "
              f"storescu/pacsvault {ratio:4.2f} (sending {ratio_sending:4.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
