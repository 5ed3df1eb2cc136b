"""Ingest benchmark: the same client pushes the same data to pacsvault, Orthanc and storescp.

    .venv/bin/python -m bench.ingest [--quick] [--json FILE] [--repeat N]

The client is dcmtk ``storescu`` (``TCP_NODELAY=1``), with 1 association (one
process sending every file) and 4 associations (four processes, each sending a
quarter of the files at the same time). The receivers, all on loopback and on the
same file system:

* ``pacsvault`` -- ``pacsvault init``, ``peer add``, ``serve --workers N`` (embedded
  default: two mirrored site directories, each copy fsync'd and read back, SQLite
  catalog); C-STORE success means two verified copies and a committed row.
* ``orthanc``   -- stock Debian Orthanc (SQLite index, one fsync'd copy:
  SyncStorageArea defaults to true), launched by tests/support/orthanc.py.
* ``storescp``  -- dcmtk ``storescp +xa --fork``, one copy, no fsync: close to the
  cost of the DICOM protocol plus a page-cache write.

Every system and every round gets objects with fresh UIDs: one template set is
generated per dataset, and before each round its UIDs (fixed-length) are replaced
byte-for-byte in a copy, outside the timed region. The page cache is flushed
(``sync``) before each timed push, so one system's write-back is not billed to the
next. Each round is checked afterwards: the receiver must hold exactly N more
objects, otherwise the round is reported as failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.support.daemon import (
    PACSVAULT,
    Daemon,
    dcmtk_env,
    free_port,
    init_instance,
    run_cli,
)
from tests.support.dataset import EXPLICIT_LE, make_instance
from tests.support.orthanc import Orthanc, orthanc_binary
from tests.support.storescp import StoreSCP

SYSTEMS = ("pacsvault", "orthanc", "storescp")
CLIENT_AET = "BENCH"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    label: str
    pixel_bytes: int   # size hint for make_instance (pixel data of a CT image)
    full: int
    quick: int


DATASETS = {
    "ct": DatasetSpec("ct", "CT 0.5 MB", 512 * 1024, 400, 100),
    "small": DatasetSpec("small", "10 KB", 10 * 1024, 2000, 400),
    "large": DatasetSpec("large", "50 MB", 50 * 1024 * 1024, 6, 2),
}
WARMUP = DatasetSpec("warm", "warm-up", 4096, 8, 8)
# The targets for pacsvault: >= Orthanc everywhere; >= half of storescp on these.
STORESCP_TARGET_DATASETS = {"ct", "large"}


# -- fixed-length UIDs, so a copy can get new ones by replacing bytes -----------------
def _uid(rng: random.Random) -> str:
    return "2.25." + str(rng.randrange(10**37, 10**38))  # 43 characters


@dataclass
class Template:
    spec: DatasetSpec
    files: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    total_bytes: int


def make_template(spec: DatasetSpec, count: int, directory: Path, rng: random.Random,
                  pixel_bytes: int | None = None) -> Template:
    directory.mkdir(parents=True, exist_ok=True)
    study, series = _uid(rng), _uid(rng)
    files, sops = [], []
    for i in range(count):
        sop = _uid(rng)
        made = make_instance(directory / f"{spec.name}{i:05d}.dcm", kind="CT", ts=EXPLICIT_LE,
                             size=pixel_bytes or spec.pixel_bytes, study_uid=study,
                             series_uid=series, sop_uid=sop, patient_id="BENCH-0001", rng=rng)
        files.append(made.path)
        sops.append(sop)
    return Template(spec, files, study, series, sops, sum(f.stat().st_size for f in files))


def materialize(t: Template, directory: Path, rng: random.Random) -> list[Path]:
    """Copy the template with fresh study/series/instance UIDs (same lengths, same bytes otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = _uid(rng).encode(), _uid(rng).encode()
    out = []
    for src, sop in zip(t.files, t.sop_uids):
        data = src.read_bytes()
        for old, new in ((t.study_uid.encode(), study), (t.series_uid.encode(), series),
                         (sop.encode(), _uid(rng).encode())):
            assert data.count(old) >= 1 and len(old) == len(new)
            data = data.replace(old, new)
        dst = directory / src.name
        dst.write_bytes(data)
        out.append(dst)
    return out


# -- receivers ---------------------------------------------------------------------------
def _pgid_own_cpu() -> dict[int, dict[int, int]]:
    """pgid -> {pid: own user+system ticks} for every process on the machine."""
    out: dict[int, dict[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state ppid pgrp ... utime(11) stime(12)
        out.setdefault(int(fields[2]), {})[int(entry)] = int(fields[11]) + int(fields[12])
    return out


def _own_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """CPU time (user+system) of a receiver's process group during one round.

    Own times of every process in the group are read at the start and the end.
    A receiver that forks a short-lived child per association (storescp --fork,
    whose children are reaped automatically and take their times with them) is
    also watched every ``interval`` seconds: the root's children are read from
    /proc/PID/task/PID/children, so at most ``interval`` of a child's CPU is lost.
    Own times only, so a parent's cutime is never counted twice.
    """

    def __init__(self, pgid: int, forks_children: bool = False, interval: float = 0.02) -> None:
        self.pgid, self.forks_children, self.interval = pgid, forks_children, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample_group(self) -> None:
        for pid, ticks in _pgid_own_cpu().get(self.pgid, {}).items():
            self._last[pid] = max(ticks, self._last.get(pid, 0))

    def _sample_children(self) -> None:
        try:
            with open(f"/proc/{self.pgid}/task/{self.pgid}/children") as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            return
        for pid in pids:
            ticks = _own_ticks(pid)
            if ticks is not None:
                self._last[pid] = max(ticks, self._last.get(pid, 0))

    def __enter__(self) -> "CpuMeter":
        self._base = dict(_pgid_own_cpu().get(self.pgid, {}))
        self._last = dict(self._base)
        if self.forks_children:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_children()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_group()
        ticks = sum(t - self._base.get(pid, 0) for pid, t in self._last.items())
        self.seconds = ticks / os.sysconf("SC_CLK_TCK")


class Receiver:
    name: str
    aet: str
    port: int
    pgid: int
    forks_children = False

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def count(self) -> int: ...
    def describe(self) -> dict: return {}
    def log_summary(self) -> dict: return {}
    def after_round(self) -> None: ...


class PacsvaultReceiver(Receiver):
    name, aet = "pacsvault", "PACSVAULT"

    def __init__(self, workdir: Path, workers: int, engine: str = "pacsvault") -> None:
        self.workdir, self.workers, self.engine = workdir, workers, engine

    def start(self) -> None:
        cfg = init_instance(self.workdir)
        # [dicom] engine: pacsvault's own DICOM engine or pynetdicom.
        cfg.write_text(re.sub(r'(?m)^engine = "[a-z]+"', f'engine = "{self.engine}"',
                              cfg.read_text(), count=1))
        run_cli(cfg, "peer", "add", CLIENT_AET, "127.0.0.1")
        self.daemon = Daemon(cfg, free_port(), free_port(), workers=self.workers).start()
        self.port, self.pgid = self.daemon.dicom_port, self.daemon.proc.pid
        import sqlite3

        self._db = sqlite3.connect(cfg.parent / "catalog" / "catalog.db")

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM instances").fetchone()[0]

    def status(self) -> dict:
        return self.daemon.status()

    def stop(self) -> None:
        self._db.close()
        rc = self.daemon.stop()
        self.exit_code = rc

    def describe(self) -> dict:
        return {"command": f"pacsvault init DIR; pacsvault peer add {CLIENT_AET} 127.0.0.1; "
                           f"pacsvault serve --workers {self.workers}",
                "copies": 2, "fsync": True, "read_back_verify": True, "catalog": "sqlite (WAL)",
                "dicom_engine": self.engine}

    def log_summary(self) -> dict:
        return _log_lines(self.daemon.log(), ("ERROR", "Traceback", "WARNING", "CRITICAL"))


class OrthancReceiver(Receiver):
    name, aet = "orthanc", "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        self.orthanc = Orthanc(workdir, aet="ORTHANC")

    def start(self) -> None:
        self.orthanc.start()
        self.port, self.pgid = self.orthanc.dicom_port, self.orthanc.proc.pid
        self.version = self.orthanc.system().get("Version", "?")

    def count(self) -> int:
        return self.orthanc.count_instances()

    def stop(self) -> None:
        self.orthanc.stop()

    def describe(self) -> dict:
        cfg = self.orthanc.config()
        return {"version": getattr(self, "version", "?"), "copies": 1,
                "fsync": True, "catalog": "sqlite index",
                "config": {k: cfg[k] for k in ("DicomAlwaysAllowStore", "UnknownSopClassAccepted",
                                               "DicomCheckCalledAet", "RemoteAccessAllowed")},
                "defaults_kept": "SyncStorageArea, StorageCompression, MaximumPduLength, "
                                 "DicomThreadsCount, ConcurrentJobs, IngestTranscoding (none)"}

    def log_summary(self) -> dict:
        lines = [ln for ln in self.orthanc.log().splitlines() if ln[:1] == "E"]
        return {"errors": len(lines), "samples": lines[:5]}


class StorescpReceiver(Receiver):
    name, aet = "storescp", "STORESCP"
    forks_children = True

    def __init__(self, workdir: Path) -> None:
        self.scp = StoreSCP(workdir, aet="STORESCP", fork=True, promiscuous=False)
        self._removed = 0

    def start(self) -> None:
        self.scp.start()
        self.port, self.pgid = self.scp.port, self.scp.proc.pid

    def count(self) -> int:
        return self._removed + sum(1 for _ in self.scp.outdir.iterdir())

    def after_round(self) -> None:  # keep the disk tidy; counted first
        for p in list(self.scp.outdir.iterdir()):
            p.unlink()
            self._removed += 1

    def stop(self) -> None:
        self.scp.stop()

    def describe(self) -> dict:
        return {"command": "storescp +xa --fork -od DIR PORT", "copies": 1, "fsync": False}

    def log_summary(self) -> dict:
        lines = [ln for ln in self.scp.log().splitlines() if ln.startswith(("E:", "F:"))]
        return {"errors": len(lines), "samples": lines[:5]}


def _log_lines(text: str, levels: tuple[str, ...]) -> dict:
    out: dict = {}
    for level in levels:
        hits = [ln for ln in text.splitlines() if level in ln]
        out[level.lower()] = len(hits)
        if hits:
            out[f"{level.lower()}_samples"] = hits[:5]
    return out


# -- the client ----------------------------------------------------------------------------
def push(r: Receiver, files: list[Path], associations: int, logdir: Path) -> tuple[float, list[int]]:
    """storescu x associations, each with its share of the files; wall time of the whole push."""
    groups = [g for g in (files[i::associations] for i in range(associations)) if g]
    procs = []
    logs = []
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        log = open(logdir / f"storescu-{r.name}-{i}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen(
            ["storescu", "-aet", CLIENT_AET, "-aec", r.aet, "-nh", "127.0.0.1", str(r.port),
             *map(str, group)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env()))
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - t0
    for log in logs:
        log.close()
    return elapsed, codes


@dataclass
class Run:
    seconds: float
    objects: int
    bytes: int
    stored: int
    exit_codes: list[int]
    server_cpu_s: float
    client_cpu_s: float
    loadavg_before: float  # 1-minute load average before the round
    machine_busy_s: float = 0.0   # CPU time used by everything on the machine during the round
    steal_s: float = 0.0          # time the hypervisor gave our vCPUs to someone else

    @property
    def other_cpu_s(self) -> float:
        """CPU used during the round by neither the receiver nor storescu (other jobs, the
        kernel's write-back threads, this harness): is the machine quiet?"""
        return max(0.0, self.machine_busy_s - self.server_cpu_s - self.client_cpu_s)

    @property
    def ok(self) -> bool:
        return self.stored == self.objects and not any(self.exit_codes)


@dataclass
class Result:
    system: str
    dataset: str
    associations: int
    objects: int
    bytes: int
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def objects_per_s(self) -> float:
        return self.objects / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def server_cores(self) -> float:
        return statistics.median(r.server_cpu_s / r.seconds for r in self.runs)

    @property
    def other_cores(self) -> float:
        return statistics.median(r.other_cpu_s / r.seconds for r in self.runs)

    @property
    def steal_cores(self) -> float:
        return statistics.median(r.steal_s / r.seconds for r in self.runs)

    @property
    def server_cpu_ms_per_object(self) -> float:
        return statistics.median(1000 * r.server_cpu_s / r.objects for r in self.runs)

    def to_json(self) -> dict:
        return {"system": self.system, "dataset": self.dataset, "associations": self.associations,
                "objects": self.objects, "bytes": self.bytes, "ok": self.ok,
                "seconds_median": self.seconds, "objects_per_s": self.objects_per_s,
                "mb_per_s": self.mb_per_s, "server_cpu_cores": self.server_cores,
                "server_cpu_ms_per_object": self.server_cpu_ms_per_object,
                "other_cpu_cores": self.other_cores, "steal_cores": self.steal_cores,
                "runs": [asdict(r) | {"ok": r.ok, "other_cpu_s": r.other_cpu_s}
                         for r in self.runs]}


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) seconds summed over all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _client_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_round(r: Receiver, t: Template, associations: int, work: Path, rng: random.Random,
              logdir: Path) -> Run:
    round_dir = work / "round"
    shutil.rmtree(round_dir, ignore_errors=True)
    files = materialize(t, round_dir, rng)
    before = r.count()
    os.sync()
    load = os.getloadavg()[0]
    ccpu0, m0 = _client_cpu(), _machine_cpu()
    with CpuMeter(r.pgid, r.forks_children) as meter:
        seconds, codes = push(r, files, associations, logdir)
    ccpu1, m1 = _client_cpu(), _machine_cpu()
    stored = r.count() - before
    r.after_round()
    shutil.rmtree(round_dir, ignore_errors=True)
    return Run(seconds, len(files), t.total_bytes, stored, codes, meter.seconds, ccpu1 - ccpu0,
               load, m1[0] - m0[0], m1[1] - m0[1])


def ratios(results: list[Result]) -> list[dict]:
    by = {(r.system, r.dataset, r.associations): r for r in results}
    out = []
    for (system, dataset, assoc), pv in sorted(by.items()):
        if system != "pacsvault":
            continue
        row: dict = {"dataset": dataset, "associations": assoc}
        for peer in ("orthanc", "storescp"):
            other = by.get((peer, dataset, assoc))
            if other is None or not other.ok or not pv.ok:
                row[f"pacsvault_vs_{peer}"] = None
            else:
                row[f"pacsvault_vs_{peer}"] = pv.objects_per_s / other.objects_per_s
        vo, vs = row.get("pacsvault_vs_orthanc"), row.get("pacsvault_vs_storescp")
        row["target_vs_orthanc_met"] = None if vo is None else vo >= 1.0
        row["target_vs_storescp_met"] = (None if vs is None or dataset not in STORESCP_TARGET_DATASETS
                                         else vs >= 0.5)
        out.append(row)
    return out


def format_table(results: list[Result], rat: list[dict]) -> str:
    rmap = {(x["dataset"], x["associations"]): x for x in rat}
    head = (f"{'system':<10} {'dataset':<10} {'assoc':>5} {'objects':>7} {'objects/s':>10} "
            f"{'MB/s':>8} {'srv CPU':>7} {'ms CPU/obj':>10} {'other':>5} {'steal':>5} "
            f"{'pv/Orthanc':>10} {'pv/storescp':>11}")
    lines = [head, "-" * len(head)]

    def fmt(v: float | None, met: bool | None) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" + ("" if met is None else (" ok" if met else " !"))

    order = {n: i for i, n in enumerate(DATASETS)}
    for res in sorted(results, key=lambda x: (order[x.dataset], x.associations,
                                              SYSTEMS.index(x.system))):
        rr = rmap.get((res.dataset, res.associations), {}) if res.system == "pacsvault" else {}
        ops = f"{res.objects_per_s:.1f}" if res.ok else "FAILED"
        lines.append(
            f"{res.system:<10} {DATASETS[res.dataset].label:<10} {res.associations:>5} "
            f"{res.objects:>7} {ops:>10} {res.mb_per_s:>8.1f} {res.server_cores:>6.2f}c "
            f"{res.server_cpu_ms_per_object:>10.1f} {res.other_cores:>5.2f} {res.steal_cores:>5.2f} "
            f"{fmt(rr.get('pacsvault_vs_orthanc'), rr.get('target_vs_orthanc_met')):>10} "
            f"{fmt(rr.get('pacsvault_vs_storescp'), rr.get('target_vs_storescp_met')):>11}")
    lines.append("srv CPU: receiver CPU time / wall time (cores busy); ms CPU/obj: receiver CPU "
                 "time per object (user+system, all its processes); other: cores used by "
                 "anything else (other jobs, kernel write-back, this harness); steal: cores the "
                 "hypervisor took. Medians of the rounds. "
                 "ok / !: meets / misses the issue's target (>= 1.0 x Orthanc everywhere, "
                 ">= 0.5 x storescp on CT and large).")
    return "\n".join(lines)


def _tool_version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except OSError:
        pass
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "dcmtk": _tool_version(["storescu", "--version"]),
            "orthanc": _tool_version([orthanc_binary() or "Orthanc", "--version"]),
            "pacsvault": _tool_version([PACSVAULT, "--version"]),
            "pacsvault_git": _git_revision()}


def _git_revision() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "archive", "tiers", "replication"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (rev or "?") + (" (daemon code modified)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (CT 100, 10 KB 400, 50 MB 2)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("--repeat", type=int, default=None,
                    help="rounds per measurement, median reported (default 3, --quick 1)")
    ap.add_argument("--associations", default="1,4", help="comma-separated (default 1,4)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="subset of ct,small,large")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="subset of pacsvault,orthanc,storescp")
    ap.add_argument("--ct", type=int, help="override the CT object count")
    ap.add_argument("--small", type=int, help="override the 10 KB object count")
    ap.add_argument("--large", type=int, help="override the 50 MB object count")
    ap.add_argument("--large-mb", type=float, default=None, help="override the large object size")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="pacsvault serve --workers (default: one per core)")
    ap.add_argument("--workdir", type=Path, help="where to put everything (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=20240102)
    ap.add_argument("--engine", choices=("pacsvault", "pynetdicom"), default="pacsvault",
                    help="pacsvault's DICOM engine: its own or pynetdicom ([dicom] engine)")
    a = ap.parse_args(argv)

    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} (dcmtk) is required", file=sys.stderr)
            return 2
    systems = [s for s in a.systems.split(",") if s]
    if "orthanc" in systems and orthanc_binary() is None:
        print("Orthanc is required (Debian package 'orthanc')", file=sys.stderr)
        return 2
    assocs = [int(x) for x in a.associations.split(",") if x]
    names = [d for d in a.datasets.split(",") if d]
    repeat = a.repeat or (1 if a.quick else 3)
    counts = {n: (DATASETS[n].quick if a.quick else DATASETS[n].full) for n in names}
    for n in names:
        if getattr(a, n) is not None:
            counts[n] = getattr(a, n)

    mach = machine()  # before the daemon starts: the code revision it runs
    work = Path(tempfile.mkdtemp(prefix="pacsvault-bench-", dir=a.workdir))
    logdir = work / "logs"
    logdir.mkdir()
    rng = random.Random(a.seed)
    print(f"bench.ingest: work dir {work}", file=sys.stderr)
    t_gen = time.perf_counter()
    templates = {}
    for n in names:
        px = int(a.large_mb * 1024 * 1024) if (n == "large" and a.large_mb) else None
        templates[n] = make_template(DATASETS[n], counts[n], work / "templates" / n, rng, px)
    print(f"generated templates in {time.perf_counter() - t_gen:.1f}s", file=sys.stderr)

    makers = {"pacsvault": lambda: PacsvaultReceiver(work / "pacsvault", a.workers, a.engine),
              "orthanc": lambda: OrthancReceiver(work / "orthanc"),
              "storescp": lambda: StorescpReceiver(work / "storescp")}
    receivers: dict[str, Receiver] = {}
    results: dict[tuple[str, str, int], Result] = {}
    report: dict = {}
    try:
        for s in systems:
            receivers[s] = makers[s]()
            receivers[s].start()
        # Warm-up (not measured): a few objects through each receiver, 1 and N associations.
        warm = make_template(WARMUP, WARMUP.full, work / "templates" / "warm", rng)
        for r in receivers.values():
            for n_assoc in assocs:
                run = run_round(r, warm, n_assoc, work, rng, logdir)
                if not run.ok:
                    raise RuntimeError(f"warm-up push to {r.name} failed: stored {run.stored} of "
                                       f"{run.objects}, storescu exit codes {run.exit_codes}; "
                                       f"logs in {logdir}")
        for rep in range(repeat):
            for n in names:
                t = templates[n]
                for n_assoc in assocs:
                    order = systems[rep % len(systems):] + systems[:rep % len(systems)]
                    for s in order:
                        r = receivers[s]
                        key = (s, n, n_assoc)
                        res = results.setdefault(key, Result(s, n, n_assoc, len(t.files), t.total_bytes))
                        run = run_round(r, t, n_assoc, work, rng, logdir)
                        res.runs.append(run)
                        print(f"  [{rep + 1}/{repeat}] {s:<9} {n:<5} x{n_assoc}: "
                              f"{run.objects / run.seconds:8.1f} objects/s  "
                              f"{run.bytes / run.seconds / 1e6:7.1f} MB/s"
                              + ("" if run.ok else f"  FAILED: stored {run.stored} of "
                                 f"{run.objects}, exit codes {run.exit_codes}"),
                              file=sys.stderr)
        if "pacsvault" in receivers:
            try:
                st = receivers["pacsvault"].status()  # type: ignore[attr-defined]
                report["pacsvault_status"] = {k: st.get(k) for k in (
                    "instances", "studies", "conflicts", "under_replicated", "healthy")}
            except Exception as e:  # noqa: BLE001 - report it, keep the measurements
                report["pacsvault_status"] = {"error": str(e)[:2000]}
    finally:
        for r in receivers.values():
            try:
                r.stop()
            except Exception as e:  # noqa: BLE001
                print(f"stopping {r.name}: {e}", file=sys.stderr)

    res_list = list(results.values())
    rat = ratios(res_list)
    table = format_table(res_list, rat)
    report.update({
        "benchmark": "ingest",
        "command": " ".join([".venv/bin/python -m bench.ingest", *(argv if argv is not None
                                                                     else sys.argv[1:])]),
        "mode": "quick" if a.quick else "full",
        "repeat": repeat,
        "client": "dcmtk storescu, TCP_NODELAY=1; N associations = N storescu processes, "
                  "each sending 1/N of the files",
        "machine": mach,
        "datasets": {n: {"label": DATASETS[n].label, "objects": len(templates[n].files),
                         "bytes": templates[n].total_bytes,
                         "object_bytes": templates[n].total_bytes // max(1, len(templates[n].files))}
                     for n in names},
        "systems": {s: receivers[s].describe() for s in receivers},
        "results": [r.to_json() for r in res_list],
        "ratios": rat,
        "logs": {s: receivers[s].log_summary() for s in receivers},
        "table": table,
    })
    if "pacsvault" in receivers:
        report["systems"]["pacsvault"]["serve_exit_code"] = getattr(receivers["pacsvault"],
                                                                    "exit_code", None)
    print(table)
    for s, summary in report["logs"].items():
        bad = {k: v for k, v in summary.items() if not k.endswith("samples") and v}
        if bad:
            print(f"{s} log: {bad}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2, default=str))
    if a.keep:
        print(f"kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in res_list) else 1


if __name__ == "__main__":
    sys.exit(main())
