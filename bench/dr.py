"""DR benchmark: `dr write` stream throughput vs `tar | zstd -1 -T0 | age` and LTO-9.

    .venv/bin/python -m bench.dr [--quick] [--mb 1000] [--repeat 3] [--json FILE]

One embedded install is filled in-process with 512 KiB CT-like images (one
study, ~1 GB) and an age recipient is made with dr.keys.keygen. Then, over the
same files of site-a, in the same run, each after a page-cache drop:

* ``pipeline`` -- ``tar -cf - -T FILES | zstd -1 -T0 | age -r R > SINK``:
  Debian's tools, zstd on every core, age in its own process, no checks;
* ``dr write`` -- ``DrWriter.run()`` (``pacsvault dr write --device SINK`` minus
  process start-up) writing one volume: every instance read and checked against
  the catalog SHA-256, cut into segments, zstd, age, the stream SHA-256 and the
  catalog rows. It runs in a child process, so its peak RSS is its own;
* ``LTO-9`` -- the drive's native 400 MB/s, a fixed line: a drive fed slower
  than that stops and repositions (shoe-shining), wearing tape and heads.

Two sinks, both contenders alike: ``null`` (/dev/null: what the producer can
feed a drive, which is a device of its own) and ``file`` (a file on the same
disk as the source, fsync'd before the clock stops). The last ``file`` volume
of dr write is read back with ``dr.media.verify``. Throughput is instance bytes
in per second; the order of the contenders alternates between rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LTO9_MBPS = 400.0
SITE = "site-a"


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- the writer, in a child process --------------------------------------------------------
def child(spec: dict) -> None:
    """Run one DrWriter over every pending study; print what it did as JSON."""
    from archive.app.compose import open_catalog, open_sites
    from archive.config.load import load_settings
    from dr.signing import writer_key
    from dr.writer import DrWriter

    s = load_settings(Path(spec["config"]))
    dr = s.dr.model_copy(update={"pool": spec["pool"],
                                 "segment_bytes": spec.get("segment_bytes") or s.dr.segment_bytes})
    catalog = open_catalog(s)
    try:
        sites = [b for b in open_sites(s) if b.name == SITE]   # the files the pipeline reads
        w = DrWriter(catalog, sites, None, dr, recipients=[spec["recipient"]],
                     signing_key=writer_key(s.data_dir), device=spec["device"], kind="stream")
        rss0 = vm_kb("VmRSS")
        t0 = os.times()
        report = w.run()
        t1 = os.times()
    finally:
        catalog.close()
    j = report.to_json()
    print(json.dumps({"ok": j["ok"], "complete": j["complete"], "bytes": j["bytes"],
                      "instances": j["instances"], "stream_bytes": j["stream_bytes"],
                      "seconds": report.seconds, "volumes": j["volumes"],
                      # CPU of the run: the writer's threads and its age processes
                      "cpu_s": sum(t1[:4]) - sum(t0[:4]),
                      "segment_bytes": dr.segment_bytes,
                      "rss_before_kb": rss0, "peak_rss_kb": vm_kb("VmHWM")}))


def run_writer(config: Path, pool: str, recipient: str, device: str,
               segment_bytes: int | None = None) -> dict:
    """DrWriter in a child process (a fresh pool, so every instance is pending)."""
    spec = {"config": str(config), "pool": pool, "recipient": recipient, "device": device,
            "segment_bytes": segment_bytes}
    p = subprocess.run([sys.executable, "-m", "bench.dr", "--child", json.dumps(spec)],
                       capture_output=True, text=True, check=False,
                       cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        raise RuntimeError(f"dr write failed:\n{p.stdout}{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_pipeline(root: Path, listing: Path, recipient: str, target: str) -> float:
    """Seconds for tar | zstd -1 -T0 | age into ``target`` (fsync'd unless /dev/null)."""
    sync = ' && sync "$4"' if target != "/dev/null" else ""
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", 'set -o pipefail; tar -cf - -C "$1" -T "$2" '
                    '| zstd -1 -T0 -q | age -r "$3" > "$4"' + sync,
                    "pipeline", str(root), str(listing), recipient, target], check=True)
    return time.perf_counter() - t0


# -- measuring ---------------------------------------------------------------------------------
def busy() -> tuple[float, float]:
    """(CPU seconds of this process and its children, of the whole machine)."""
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return ours, (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measured(fn, nbytes: int) -> dict:  # noqa: ANN001
    """Run ``fn`` after a page-cache drop: MB/s, the cores it kept busy, and the cores
    everything else on the machine used meanwhile (a noisy round shows there).
    ``fn`` returns (seconds it timed itself, extra facts); a ``cpu_s`` among the
    facts is the CPU of the timed part (the writer's own, without its start-up)."""
    from bench.tiering import drop_cache

    drop_cache()
    ours0, all0 = busy()
    t0 = time.perf_counter()
    got = fn()
    wall = time.perf_counter() - t0
    ours1, all1 = busy()
    seconds, extra = got
    cpu = extra.pop("cpu_s", ours1 - ours0)
    return {"MBps": round(nbytes / 1e6 / seconds, 1), "seconds": round(seconds, 3),
            "cpu_s": round(cpu, 2), "cores": round(cpu / seconds, 2),
            "others": round(max(0.0, (all1 - all0 - (ours1 - ours0)) / wall), 2), **extra}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 MB, 1 round (CI)")
    ap.add_argument("--mb", type=int, default=None, help="study size in MB (default 1000)")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 3)")
    ap.add_argument("--sinks", default="null,file", help="null, file or both (default)")
    ap.add_argument("--segment-mb", type=int, default=None,
                    help="[dr] segment_bytes in MiB (default: the config's)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    from bench.tiering import IMAGE, make_study
    from dr.keys import keygen, load_identities
    from dr.media import verify
    from dr.signing import writer_key
    from tests.support.tiering import Install

    mb = args.mb or (60 if args.quick else 1000)
    repeat = args.repeat or (1 if args.quick else 3)
    sinks = [s for s in args.sinks.split(",") if s]
    assert set(sinks) <= {"null", "file"} and sinks, args.sinks
    count = max(1, mb * 1000 * 1000 // IMAGE)
    work = Path(tempfile.mkdtemp(prefix="pv-bench-dr-", dir=args.workdir))
    try:
        inst = Install.create(work / "pv")
        print(f"making and ingesting {count} x 512 KiB images ...", flush=True)
        inst.ingest(make_study(work / "in", count, "ct"))
        shutil.rmtree(work / "in")
        recipient = keygen(work / "dr-key.txt")
        site = inst.settings.sites[0]
        assert site.name == SITE
        root = site.path
        files = sorted(p.relative_to(root) for p in (root / "objects").rglob("*.dcm"))
        total = sum((root / f).stat().st_size for f in files)
        listing = work / "files.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        out = work / "out"
        out.mkdir()
        runs = 0

        def sink_path(sink: str, name: str) -> str:
            return "/dev/null" if sink == "null" else str(out / name)

        def pipeline(sink: str):  # noqa: ANN202
            def go() -> tuple[float, dict]:
                target = sink_path(sink, "pipeline.tar.zst.age")
                seconds = run_pipeline(root, listing, recipient, target)
                if sink == "null":
                    return seconds, {}
                size = os.path.getsize(target)
                os.unlink(target)
                return seconds, {"stream_bytes": size}
            return go

        def dr_write(sink: str, keep: bool = False):  # noqa: ANN202
            def go() -> tuple[float, dict]:
                nonlocal runs
                runs += 1
                device = sink_path(sink, f"dr-{runs}.tar")
                r = run_writer(inst.config, f"bench-{runs}", recipient, device,
                               args.segment_mb and args.segment_mb * 1024 * 1024)
                assert r["ok"] and r["complete"] and r["instances"] == len(files), r
                assert r["bytes"] == total, (r["bytes"], total)
                facts = {"stream_bytes": r["stream_bytes"], "cpu_s": r["cpu_s"],
                         "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 1),
                         "rss_before_mb": round(r["rss_before_kb"] / 1024, 1),
                         "segment_bytes": r["segment_bytes"]}
                if sink == "file":
                    facts["volume"] = device
                    if not keep:
                        os.unlink(device)
                return r["seconds"], facts
            return go

        rounds = []
        for n in range(repeat):
            last = n == repeat - 1
            contenders = []
            for sink in sinks:
                pair = [(f"pipeline {sink}", pipeline(sink)),
                        (f"dr write {sink}", dr_write(sink, keep=last and sink == "file"))]
                contenders += pair if n % 2 == 0 else pair[::-1]
            row = {name: measured(fn, total) for name, fn in contenders}
            rounds.append(row)
            same_run = {sink: round(row[f"dr write {sink}"]["MBps"]
                                    / row[f"pipeline {sink}"]["MBps"], 2) for sink in sinks}
            print(json.dumps({"round": n + 1, "MBps": {k: v["MBps"] for k, v in row.items()},
                              "dr_vs_pipeline": same_run}), flush=True)

        names = [name for name in rounds[0]]
        med = {name: statistics.median(r[name]["MBps"] for r in rounds) for name in names}
        ratios = {}
        for sink in sinks:
            ratios[f"dr_vs_pipeline_{sink}"] = round(med[f"dr write {sink}"]
                                                    / med[f"pipeline {sink}"], 2)
            ratios[f"dr_vs_lto9_{sink}"] = round(med[f"dr write {sink}"] / LTO9_MBPS, 2)
            ratios[f"pipeline_vs_lto9_{sink}"] = round(med[f"pipeline {sink}"] / LTO9_MBPS, 2)
        dr_runs = [r[name] for r in rounds for name in names if name.startswith("dr write")]
        peak = max(d["peak_rss_mb"] for d in dr_runs)

        checked = None
        if "file" in sinks:
            vol = rounds[-1]["dr write file"]["volume"]
            catalog = inst.catalog()
            try:
                v = verify(catalog, vol, load_identities([work / "dr-key.txt"]),
                           [writer_key(inst.settings.data_dir).public_key()])
            finally:
                catalog.close()
            checked = {"ok": v["ok"], "complete": v["complete"], "files_verified":
                        v["files_verified"], "segments": v["segments"],
                        "segments_ok": v["segments_ok"], "stream_bytes": v["stream_bytes"],
                        "sha256_as_recorded": v["stream_sha256"] == v["recorded_sha256"]}
            os.unlink(vol)

        summary = {
            "files": len(files), "bytes": total, "rounds": rounds, "median_MBps": med,
            "round_ratios": [{sink: round(r[f"dr write {sink}"]["MBps"]
                                          / r[f"pipeline {sink}"]["MBps"], 2) for sink in sinks}
                             for r in rounds],
            "lto9_MBps": LTO9_MBPS, "ratios": ratios,
            "targets": {"dr_vs_pipeline": 1.0, "dr_vs_lto9": 1.0},
            "peak_rss_mb": peak, "segment_bytes": dr_runs[0]["segment_bytes"],
            "verify": checked,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "revision": _revision()},
        }
        print(f"\n{len(files)} files, {total / 1e6:.0f} MB on {SITE}, one study "
              f"(page cache dropped each time); segments of "
              f"{summary['segment_bytes'] / 2**20:.0f} MiB")
        print(f"{'':18} {'MB/s':>8}   cores  others   (medians; cores: CPU of the timed part"
              " / its time; others: cores other jobs used meanwhile)")
        for name in names:
            cores = statistics.median(r[name]["cores"] for r in rounds)
            others = statistics.median(r[name]["others"] for r in rounds)
            print(f"{name:18} {med[name]:8.1f}   {cores:5.2f}  {others:6.2f}")
        print(f"{'LTO-9 native':18} {LTO9_MBPS:8.1f}")
        for sink in sinks:
            print(f"sink {sink}: dr write / pipeline {ratios[f'dr_vs_pipeline_{sink}']:.2f}x "
                  f"(target 1.0x); dr write / LTO-9 {ratios[f'dr_vs_lto9_{sink}']:.2f}x "
                  f"(target 1.0x); pipeline / LTO-9 {ratios[f'pipeline_vs_lto9_{sink}']:.2f}x")
        print(f"dr write peak RSS {peak:.0f} MB (the writer's process; "
              f"{min(d['rss_before_mb'] for d in dr_runs):.0f} MB before it started)")
        if checked:
            print(f"verify of the last file volume: {'ok' if checked['ok'] else 'FAILED'}, "
                  f"{checked['files_verified']} files in {checked['segments']} segments")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0 if checked is None or checked["ok"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _revision() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
