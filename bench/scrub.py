"""Scrub benchmark: pacsvault scrub vs sha256sum vs a bare read-and-hash loop.

    .venv/bin/python -m bench.scrub [--quick] [--mb 1000] [--rows N] [--repeat 5] [--json FILE]

One embedded install is filled in-process with 512 KiB CT-like images; then,
over the same files of site-a, in the same run, rounds alternating:

* ``sha256sum``  -- Debian coreutils over every file (``xargs sha256sum``);
* ``bare loop``  -- Python: open, read 1 MiB chunks, hashlib SHA-256, one core:
  the limit a scrub can approach per core;
* ``scrub x1`` / ``scrub x2`` -- ``Scrubber.run(["site-a"])`` (what ``pacsvault
  scrub --site site-a`` does after start-up: catalog batches, reads, compare,
  record, orphan pass) with 1 and 2 threads and no rate cap.

Twice: **cold**, the page cache dropped before every contender (all read from
the disk; the scrub as configured, verify_read = "device"), and **warm**, every
file read once before every contender (all read from the page cache; the
scrub's sites opened with verify_read = "cache", since with "device" it drops
each file's cached pages before reading it, by design). The cold table also
has ``bare + read-ahead``: the bare loop asking the kernel for the next two
files while it hashes one, as the scrub does, to tell read-ahead from the rest.

Then the catalog-size check: the same scrub of the same files with the catalog
as ingested and with ``--rows`` (1,000,000) more instances, each with the rows a
study moved to the object tier leaves (copies 'purged' on site-a and site-b and
an 'ok' copy in a bundle on the tier), in copy-id order before site-a's copies.
Both catalogs in alternate rounds, warm; the plans and timings of the scrub's
queries on the large catalog are printed too.

For each measurement also: ``cpu``, the cores this process (and sha256sum)
kept busy, and ``others``, the cores other processes on the machine used at
the time, since a second thread can only help when a second core is free.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from archive.catalog.engine import make_engine
from archive.catalog.models import Copy, Instance
from archive.catalog.uow import Catalog
from bench.tiering import drop_cache, make_study
from replication import scrub as scrub_mod
from replication.scrub import Scrubber
from tests.support.tiering import Install
from tiers.fs import FilesystemBackend

SITE = "site-a"
PER_STUDY = 500      # instances per synthetic tiered study in the large catalog


def bare_loop(files: list[Path]) -> None:
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
        h.hexdigest()


def read_ahead_loop(files: list[Path], ahead: int = 2) -> None:
    """The bare loop, plus posix_fadvise WILLNEED on the next ``ahead`` files."""
    def start(f: Path) -> int:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd

    fds = deque(start(f) for f in files[:ahead])
    for i in range(len(files)):
        if i + ahead < len(files):
            fds.append(start(files[i + ahead]))
        h = hashlib.sha256()
        with open(fds.popleft(), "rb", buffering=0) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
        h.hexdigest()


def warm_up(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as src:
            while src.read(1 << 20):
                pass


def _busy_cores() -> tuple[float, float]:
    """(CPU seconds of this process and its children, of the whole machine)."""
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]   # idle + iowait
    return ours, (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[], None], nbytes: int) -> dict:
    """MB/s of one call, with the cores it and everything else kept busy meanwhile."""
    ours0, all0 = _busy_cores()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    ours1, all1 = _busy_cores()
    ours = (ours1 - ours0) / wall
    return {"MBps": round(nbytes / 1e6 / wall, 1), "cpu": round(ours, 2),
            "others": round(max(0.0, (all1 - all0) / wall - ours), 2)}


# -- the large catalog -----------------------------------------------------------------
def _h(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def renumber_copies(db: Path, above: int) -> None:
    """Move the install's copies to ids above ``above``: in a real archive the older
    studies, by now on the object tier, hold the lower copy ids."""
    c = sqlite3.connect(db, isolation_level=None)
    try:
        c.execute("UPDATE copies SET id = id + ?", (above,))
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # all in the main file: it is copied
    finally:
        c.close()


def add_tiered_rows(db: Path, instances: int) -> float:
    """Insert ``instances`` instances in studies of PER_STUDY, as migrated to the object
    tier: copies 'purged' on site-a and site-b (key kept for a recall) and 'ok' in the
    study's bundle on 'objects'. One transaction; copy ids from 1. Returns seconds."""
    t0 = time.perf_counter()
    c = sqlite3.connect(db, isolation_level=None)
    try:
        c.execute("BEGIN IMMEDIATE")
        now = "2025-01-06 02:00:00.000000"
        patient = c.execute("INSERT INTO patients (patient_id, issuer, name, birth_date, sex) "
                            "VALUES ('BENCH-BULK', '', 'Bulk^Synthetic', '19700101', 'O')"
                            ).lastrowid
        top = {t: c.execute(f"SELECT coalesce(max(id), 0) FROM {t}").fetchone()[0]
               for t in ("studies", "series", "bundles", "instances")}
        studies, series, bundles, insts, copies = [], [], [], [], []
        copy_id, n = 1, 0
        for s in range(-(-instances // PER_STUDY)):
            study_id, series_id, bundle_id = (top["studies"] + s + 1, top["series"] + s + 1,
                                              top["bundles"] + s + 1)
            study_uid = f"2.25.{10**20 + s}"
            sh = _h(study_uid)
            bu = str(uuid.UUID(int=s + 1))
            k = min(PER_STUDY, instances - n)
            studies.append((study_id, study_uid, patient, "20200106", "101500", f"B{s}",
                            "Bulk study", "BENCH", now, now))
            series.append((series_id, f"2.25.{2 * 10**20 + s}", study_id, "CT", "1"))
            bundles.append((bundle_id, bu, study_id, "objects",
                            f"bundles/{sh[:2]}/{sh[2:4]}/{study_uid}/{bu}.pvb", k * 300_000,
                            sh, k, "ok", now, now))
            for j in range(k):
                n += 1
                inst_id, sop = top["instances"] + n, f"2.25.{3 * 10**20 + n}"
                insts.append((inst_id, sop, series_id, study_id, _h(sop)))
                key = f"objects/{sh[:2]}/{sh[2:4]}/{study_uid}/{_h(sop)[0]}/{sop}.dcm"
                copies += [(copy_id, inst_id, "site-a", key, "purged", None, None, None),
                           (copy_id + 1, inst_id, "site-b", key, "purged", None, None, None),
                           (copy_id + 2, inst_id, "objects", key, "ok", bundle_id,
                            j * 300_000, 300_000)]
                copy_id += 3
        c.executemany("INSERT INTO studies (id, study_uid, patient_fk, study_date, study_time, "
                      "accession, description, calling_ae, first_received_at, last_received_at)"
                      " VALUES (?,?,?,?,?,?,?,?,?,?)", studies)
        c.executemany("INSERT INTO series (id, series_uid, study_fk, modality, series_number) "
                      "VALUES (?,?,?,?,?)", series)
        c.executemany("INSERT INTO bundles (id, bundle_uuid, study_fk, location, key, size, "
                      "sha256, instances, state, created_at, verified_at) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?)", bundles)
        c.executemany("INSERT INTO instances (id, sop_uid, version, series_fk, study_fk, "
                      "sop_class, transfer_syntax, size, sha256, received_at, calling_ae, "
                      "conflict) VALUES (?, ?, 1, ?, ?, '1.2.840.10008.5.1.4.1.1.2', "
                      f"'1.2.840.10008.1.2.1', 525194, ?, '{now}', 'BENCH', 0)", insts)
        c.executemany("INSERT INTO copies (id, instance_fk, location, key, state, bundle_fk, "
                      "frame_offset, frame_length) VALUES (?,?,?,?,?,?,?,?)", copies)
        c.execute("COMMIT")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        c.close()
    return time.perf_counter() - t0


def query_report(catalog: Catalog) -> dict:
    """Plans and timings of the scrub's catalog queries (on the large catalog)."""
    engine = catalog.engine
    orphans = select(Copy.key).where(Copy.location == SITE,   # as in Scrubber._orphans
                                     Copy.state.in_(scrub_mod.STATES + ("purging",)))
    in_form = (select(Copy.id, Copy.instance_fk, Copy.key, Copy.state, Instance.size,
                      Instance.sha256)
               .join(Instance, Instance.id == Copy.instance_fk)
               .where(Copy.location == "objects", Copy.state.in_(scrub_mod.STATES),
                      Copy.id > 0).order_by(Copy.id).limit(scrub_mod.BATCH))

    def plan(stmt, params: dict) -> list[str]:  # noqa: ANN001
        sql = str(stmt.params(params).compile(dialect=engine.dialect,
                                              compile_kwargs={"literal_binds": True}))
        with engine.connect() as conn:
            return [r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]

    def ms(fn: Callable[[], object], n: int = 5) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1000, 2)

    with catalog.unit() as uow:
        s = uow.session
        tier_rows = s.execute(select(Copy.id).where(Copy.location == "objects",
                                                    Copy.state == "ok")).all()
        middle = tier_rows[len(tier_rows) // 2].id if tier_rows else 0
        return {
            "batch_plan": plan(scrub_mod._NEXT_COPIES[0], {"site": SITE, "after": 0}),
            "orphan_keys_plan": plan(orphans, {}),
            "ok_copies_on_tier": len(tier_rows),
            # One batch of the scrub's query at a location holding every tiered copy:
            # what it costs per batch on a site with that many online copies.
            "batch_ms_site_a": ms(lambda: scrub_mod._copies_after(s, SITE, 0)),
            "batch_ms_big_location_start": ms(lambda: scrub_mod._copies_after(s, "objects", 0)),
            "batch_ms_big_location_middle": ms(
                lambda: scrub_mod._copies_after(s, "objects", middle)),
            "in_form_batch_ms_big_location": ms(lambda: s.execute(in_form).all(), 3),
            "in_form_plan": plan(in_form, {}),
            "orphan_keys_ms": ms(lambda: set(s.scalars(orphans))),
        }


# -- the run -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 MB, 20,000 rows, 1 round (CI)")
    ap.add_argument("--mb", type=int, default=None, help="data per site in MB (default 1000)")
    ap.add_argument("--rows", type=int, default=None,
                    help="instances added for the catalog-size check (default 1,000,000)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    mb = args.mb or (60 if args.quick else 1000)
    rows = args.rows if args.rows is not None else (20_000 if args.quick else 1_000_000)
    repeat = args.repeat or (1 if args.quick else 5)
    count = max(1, mb * 1000 * 1000 // (512 * 1024))
    work = Path(tempfile.mkdtemp(prefix="pv-bench-scrub-", dir=args.workdir))
    try:
        inst = Install.create(work / "pv")
        print(f"making and ingesting {count} x 512 KiB images ...", flush=True)
        inst.ingest(make_study(work / "in", count, "ct"))
        shutil.rmtree(work / "in")
        settings = inst.settings
        site_a = settings.sites[0].path / "objects"
        files = sorted(site_a.rglob("*.dcm"))
        total = sum(f.stat().st_size for f in files)
        listing = work / "files.txt"
        listing.write_text("\n".join(str(f) for f in files) + "\n")

        small_db = Path(settings.catalog.url.split("///", 1)[1])
        renumber_copies(small_db, 3 * rows + 1)   # the same site-a copy ids in both
        big_db = work / "big" / "catalog.db"
        big_db.parent.mkdir()
        shutil.copy(small_db, big_db)
        print(f"adding {rows:,} tiered instances to a copy of the catalog ...", flush=True)
        insert_s = add_tiered_rows(big_db, rows)
        catalogs = {"few": small_db, "large": big_db}

        def sites(verify_read: str) -> list[FilesystemBackend]:
            return [FilesystemBackend(s.name, s.path, min_free_bytes=settings.ingest.min_free_bytes,
                                      verify_read=verify_read) for s in settings.sites]

        scrubbed: list[int] = []   # objects each scrub verified

        def scrub(threads: int, verify_read: str, db: Path = small_db) -> Callable[[], dict]:
            def contender() -> dict:
                # Timed: Scrubber.run (what the report's own seconds cover), not the set-up.
                catalog = Catalog(make_engine(f"sqlite:///{db}"))
                try:
                    s = Scrubber(catalog, sites(verify_read), None, scratch=work / "scratch",
                                 max_mb_per_s=0, threads=threads)

                    def go() -> None:
                        r = s.run([SITE])
                        assert r.ok and r.objects == len(files), r.to_json()
                        scrubbed.append(r.objects)
                    return measure(go, total)
                finally:
                    catalog.close()
            return contender

        def plain(fn: Callable[[], None]) -> Callable[[], dict]:
            return lambda: measure(fn, total)

        def sha256sum() -> None:
            subprocess.run(f"xargs -a {listing} -d '\\n' sha256sum > /dev/null", shell=True,
                           check=True)

        def run_table(table: str, contenders: dict[str, Callable[[], dict]],
                      before: Callable[[], None]) -> dict:
            """Rounds of every contender, in reverse order every other round (no one
            always goes first); the median of each figure."""
            rounds = []
            for r in range(repeat):
                row = {}
                for name in list(contenders)[::1 if r % 2 == 0 else -1]:
                    before()
                    row[name] = contenders[name]()
                rounds.append({name: row[name] for name in contenders})
                print(json.dumps({"table": table, "round": r + 1,
                                  "MBps": {k: v["MBps"] for k, v in rounds[-1].items()}}),
                      flush=True)
            med = {name: {k: statistics.median(x[name][k] for x in rounds)
                          for k in ("MBps", "cpu", "others")} for name in contenders}
            return {"rounds": rounds, "median": med}

        tables = {
            "cold": run_table("cold", {
                "sha256sum": plain(sha256sum), "bare loop": plain(lambda: bare_loop(files)),
                "bare + read-ahead": plain(lambda: read_ahead_loop(files)),
                "scrub x1": scrub(1, "device"), "scrub x2": scrub(2, "device")}, drop_cache),
            "warm": run_table("warm", {
                "sha256sum": plain(sha256sum), "bare loop": plain(lambda: bare_loop(files)),
                "scrub x1": scrub(1, "cache"), "scrub x2": scrub(2, "cache")},
                lambda: warm_up(files)),
            "catalog": run_table("catalog", {
                f"{t} {size}": scrub(int(t[-1]), "cache", db)
                for t in ("scrub x1", "scrub x2") for size, db in catalogs.items()},
                lambda: warm_up(files)),
        }
        big = Catalog(make_engine(f"sqlite:///{big_db}"))
        try:
            queries = query_report(big)
        finally:
            big.close()

        def mbps(table: str, name: str) -> float:
            return tables[table]["median"][name]["MBps"]

        ratios = {}
        for t in ("cold", "warm"):
            ratios[f"{t}_scrub_x1_vs_bare"] = round(mbps(t, "scrub x1") / mbps(t, "bare loop"), 2)
            ratios[f"{t}_scrub_x2_vs_bare"] = round(mbps(t, "scrub x2") / mbps(t, "bare loop"), 2)
            ratios[f"{t}_scrub_x1_vs_sha256sum"] = round(
                mbps(t, "scrub x1") / mbps(t, "sha256sum"), 2)
        for t in ("scrub x1", "scrub x2"):
            ratios[f"{t.replace(' ', '_')}_large_vs_few_rows"] = round(
                mbps("catalog", f"{t} large") / mbps("catalog", f"{t} few"), 2)
        summary = {
            "files": len(files), "bytes": total, "cpus": os.cpu_count(), "rounds": repeat,
            "catalog_rows": {"few": {"instances": len(files), "copies": 2 * len(files)},
                             "large": {"instances": len(files) + rows,
                                       "copies": 2 * len(files) + 3 * rows},
                             "insert_seconds": round(insert_s, 1)},
            "tables": tables, "ratios": ratios, "queries": queries,
            "scrubs": len(scrubbed), "scrub_objects_min": min(scrubbed),
            "targets": {"scrub_x1_vs_bare": 0.9, "scrub_x2_vs_bare": 1.6,
                        "large_vs_few_rows": 1.0},
        }
        print(f"\n{len(files)} files, {total / 1e6:.0f} MB on {SITE}; median of {repeat} "
              "round(s); cpu = cores this run kept busy, others = cores used by other processes")
        for t, title in (("cold", "page cache dropped before each"),
                         ("warm", "all read from the page cache")):
            print(f"\n{t} ({title})")
            for name, m in tables[t]["median"].items():
                print(f"  {name:18} {m['MBps']:8.1f} MB/s   cpu {m['cpu']:.2f}  "
                      f"others {m['others']:.2f}")
            print(f"  scrub x1 / bare loop {ratios[f'{t}_scrub_x1_vs_bare']:.2f}x (target 0.9x); "
                  f"scrub x2 / bare loop {ratios[f'{t}_scrub_x2_vs_bare']:.2f}x (target 1.6x); "
                  f"scrub x1 / sha256sum {ratios[f'{t}_scrub_x1_vs_sha256sum']:.2f}x")
        print(f"\ncatalog size (warm): {2 * len(files):,} copies vs "
              f"{2 * len(files) + 3 * rows:,} copies ({rows:,} more instances, inserted in "
              f"{insert_s:.0f} s)")
        for name, m in tables["catalog"]["median"].items():
            print(f"  {name:18} {m['MBps']:8.1f} MB/s   cpu {m['cpu']:.2f}  "
                  f"others {m['others']:.2f}")
        print(f"  large / few: scrub x1 {ratios['scrub_x1_large_vs_few_rows']:.2f}x, "
              f"scrub x2 {ratios['scrub_x2_large_vs_few_rows']:.2f}x (target 1.0x)")
        q = queries
        print(f"\nqueries on the large catalog:\n  batch of copies: {q['batch_plan']}\n"
              f"    {q['batch_ms_site_a']} ms at {SITE}; {q['batch_ms_big_location_start']} ms "
              f"(start) / {q['batch_ms_big_location_middle']} ms (middle) at a location with "
              f"{q['ok_copies_on_tier']:,} copies; with state IN (...): "
              f"{q['in_form_batch_ms_big_location']} ms ({q['in_form_plan']})\n"
              f"  orphan pass key set: {q['orphan_keys_plan']}, {q['orphan_keys_ms']} ms")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
