"""Retrieve benchmark: the same studies moved by C-MOVE from pacsvault and from Orthanc
to the same dcmtk storescp, retrieved whole over WADO-RS from both, and the C-FIND
latency of both, in one run.

    .venv/bin/python -m bench.retrieve [--quick] [--json FILE] [--repeat N]

Both systems are started once and given the same files by the same client (dcmtk
``storescu``, TCP_NODELAY=1): one CT study of ~0.5 MB images, one study of ~10 KB
images (both of the query patient) and filler patients of two one-image studies
each, so the index holds more than the studies asked for.

* **C-MOVE**: dcmtk ``movescu`` (TCP_NODELAY=1) asks for a whole study
  (Study Root, STUDY level) to go to ``DEST``, a dcmtk ``storescp`` (TCP_NODELAY=1,
  ``--fork``, writing every object to a directory, no fsync) both systems know:
  pacsvault as a peer with ``--port``, Orthanc as a DicomModalities entry. The
  clock runs from starting movescu to its exit (after the final response, which
  both send only when every sub-operation has its answer). Before each timed move
  the page cache is dropped (``/proc/sys/vm/drop_caches``, or failing that
  ``posix_fadvise(DONTNEED)`` over both systems' stored files), so each reads its
  study from the disk. The order of the systems alternates between rounds; the
  median round is reported. Each round is checked: final status Success and the
  destination holding exactly the study's objects.
* **WADO-RS**: the same studies retrieved whole (``GET .../studies/{uid}``) over
  HTTP from pacsvault (``serve --http-port``, ``/dicomweb/``) and from Orthanc's
  DICOMweb plugin (Debian package orthanc-dicomweb, loaded only here, its
  defaults; ``/dicom-web/``). One client for both: ``http.client`` in this
  process, a new connection per retrieval, ``Accept: multipart/related;
  type="application/dicom"; transfer-syntax=*`` (every instance as stored, so
  Orthanc does not transcode) and no Accept-Encoding (so Orthanc does not gzip).
  The clock runs from connecting to the last body byte read; the body is checked
  after it stops: HTTP 200, a whole multipart/related (closing delimiter
  included) of exactly the study's instance count, each part application/dicom
  with the DICM prefix. One warm-up retrieval from each (the small study), then
  rounds as for C-MOVE: the page cache dropped before each, the order
  alternating, the median reported; MB/s counts the body's bytes. Dropping the
  page cache does not empty Orthanc's own in-memory storage cache
  (MaximumStorageCacheSize, 128 MB by default, kept: the peer at its best), so a
  study smaller than it, read or written recently, may come from its memory.
  Without the plugin file the leg is skipped with a printed message.
* **C-FIND**: a study-level query by PatientID (Study Root) and a patient-level
  query by PatientID (Patient Root), with the keys a PACS asks for priors. The
  client is pacsvault's own SCU (archive/dicom/net/client.py) in this process, one
  association per system opened before the clock starts, so a query's time is
  from sending the request to the final response and holds no process start-up.
  Queries alternate between the systems one by one (after a warm-up) so that
  noise lands on both; the page cache is warm, as for a PACS asking again and
  again. Both systems must return the same studies.

Printed: objects/s and MB/s of each move and each WADO-RS retrieval, the CPU the
server and the destination (for WADO-RS, this process reading the body) used, the
cores anything else used (a noisy round shows there), p50/p99 query latency, and
the ratios pacsvault/Orthanc. ``--json FILE`` writes everything.
"""
from __future__ import annotations

import argparse
import email.message
import http.client
import io
import json
import os
import random
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from archive.dicom.net import client as scu_client
from archive.dicom.net import dimse
from bench.ingest import CpuMeter, _log_lines, _machine_cpu, machine
from tests.support.daemon import Daemon, dcmtk_env, free_port, init_instance, run_cli
from tests.support.dataset import make_ct_series, make_instance
from tests.support.orthanc import DICOMWEB_PLUGIN, Orthanc, orthanc_binary
from tests.support.storescp import StoreSCP

SYSTEMS = ("pacsvault", "orthanc")
SCU_AET = "BENCHSCU"            # storescu, movescu and the C-FIND client call as this
DEST_AET = "DEST"
QUERY_PATIENT = "BENCH-0001"
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PENDING = (0xFF00, 0xFF01)
# WADO-RS: every instance as stored ("transfer-syntax=*": Orthanc must not transcode);
# no Accept-Encoding, so Orthanc (HttpCompressionEnabled) does not gzip the body either.
WADO_HEADERS = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
                "Accept-Encoding": "identity"}
WADO_READ = 1024 * 1024


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    label: str
    size: int       # make_ct_series size hint (pixel bytes)
    full: int
    quick: int


DATASETS = {
    "ct": DatasetSpec("ct", "CT 0.5 MB", 512 * 1024, 400, 30),
    "small": DatasetSpec("small", "10 KB", 10 * 1024, 1000, 100),
}
# (name, model, keys): what a PACS asks for a patient's priors, and for the patient.
QUERIES = {
    "study": (STUDY_ROOT_FIND, {
        "QueryRetrieveLevel": "STUDY", "PatientID": QUERY_PATIENT, "PatientName": "",
        "PatientBirthDate": "", "StudyInstanceUID": "", "StudyDate": "", "StudyTime": "",
        "AccessionNumber": "", "StudyDescription": "", "ModalitiesInStudy": "",
        "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}),
    "patient": (PATIENT_ROOT_FIND, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": QUERY_PATIENT, "PatientName": "",
        "PatientBirthDate": "", "PatientSex": "", "NumberOfPatientRelatedStudies": ""}),
}


# -- the data ------------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    label: str
    uid: str
    files: list[Path]
    bytes: int


def make_data(work: Path, counts: dict[str, int], filler_patients: int, seed: int
              ) -> tuple[dict[str, Study], list[Path]]:
    studies = {}
    for i, (name, n) in enumerate(counts.items()):
        spec = DATASETS[name]
        made = make_ct_series(work / "data" / name, n, size=spec.size, seed=seed + i,
                              patient_id=QUERY_PATIENT)
        files = [m.path for m in made]
        studies[name] = Study(name, spec.label, made[0].study_uid, files,
                              sum(f.stat().st_size for f in files))
    rng = random.Random(seed)
    filler = []
    for p in range(filler_patients):
        for s in range(2):
            filler.append(make_instance(work / "data" / "filler" / f"p{p:04d}-{s}.dcm",
                                        size=600, patient_id=f"FILL-{p:04d}", rng=rng).path)
    return studies, filler


def storescu(port: int, aec: str, files: list[Path], logdir: Path) -> None:
    with open(logdir / f"storescu-{aec}.log", "ab") as log:
        p = subprocess.run(["storescu", "-aet", SCU_AET, "-aec", aec, "-nh", "127.0.0.1",
                            str(port), *map(str, files)], stdout=log, stderr=subprocess.STDOUT,
                           env=dcmtk_env(), check=False)
    if p.returncode != 0:
        raise RuntimeError(f"storescu to {aec} exited {p.returncode} (log in {logdir})")


# -- the two systems ----------------------------------------------------------------------
class System:
    name: str
    aet: str
    port: int
    pgid: int
    http_port: int = 0
    wado_root: str | None = None     # None: this system does not serve WADO-RS here

    def count(self) -> int: ...
    def storage(self) -> list[Path]: ...     # where its stored files are (for the cache)
    def stop(self) -> None: ...
    def describe(self) -> dict: return {}
    def log_summary(self) -> dict: return {}


class Pacsvault(System):
    name, aet = "pacsvault", "PACSVAULT"

    def __init__(self, workdir: Path, dest_port: int, workers: int) -> None:
        self.workers = workers
        cfg = init_instance(workdir)
        run_cli(cfg, "peer", "add", SCU_AET, "127.0.0.1")
        run_cli(cfg, "peer", "add", DEST_AET, "127.0.0.1", "--port", str(dest_port))
        self.root = cfg.parent
        self.daemon = Daemon(cfg, free_port(), free_port(), workers=workers).start()
        self.port, self.pgid = self.daemon.dicom_port, self.daemon.proc.pid
        self.http_port, self.wado_root = self.daemon.http_port, "/dicomweb"
        self._db = sqlite3.connect(self.root / "catalog" / "catalog.db")

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM instances").fetchone()[0]

    def storage(self) -> list[Path]:
        return [self.root]

    def stop(self) -> None:
        self._db.close()
        self.exit_code = self.daemon.stop()

    def describe(self) -> dict:
        return {"command": f"pacsvault init DIR; peer add {SCU_AET} 127.0.0.1; peer add "
                           f"{DEST_AET} 127.0.0.1 --port N; serve --dicom-port N "
                           f"--http-port N --workers {self.workers}",
                "reads": "online copies, each checked against its SHA-256 before sending",
                "wado_rs": f"GET {self.wado_root}/studies/UID (no accounts: no credentials)",
                "serve_exit_code": getattr(self, "exit_code", None)}

    def log_summary(self) -> dict:
        return _log_lines(self.daemon.log(), ("ERROR", "Traceback", "WARNING", "CRITICAL"))


class OrthancSystem(System):
    name, aet = "orthanc", "ORTHANC"

    def __init__(self, workdir: Path, dest_port: int, dicomweb: bool) -> None:
        # The SCU is a known modality (Orthanc answers C-FIND/C-MOVE only to those);
        # its port is never called. With ``dicomweb`` the DICOMweb plugin is loaded
        # (its defaults, root spelled out); without it Orthanc runs with no plugin.
        self.orthanc = Orthanc(workdir, aet="ORTHANC", modalities={
            "dest": (DEST_AET, "127.0.0.1", dest_port),
            "benchscu": (SCU_AET, "127.0.0.1", free_port())},
            plugins=[DICOMWEB_PLUGIN] if dicomweb else [],
            extra_config={"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
            if dicomweb else {}).start()
        self.port, self.pgid = self.orthanc.dicom_port, self.orthanc.proc.pid
        self.http_port = self.orthanc.http_port
        try:
            self.version = self.orthanc.system().get("Version", "?")
            self.plugins = self.orthanc.plugin_versions()
            if dicomweb and "dicom-web" not in self.plugins:
                raise RuntimeError(f"Orthanc did not load {DICOMWEB_PLUGIN}: {self.plugins}")
        except BaseException:
            self.orthanc.stop()      # the caller holds no System to stop yet
            raise
        if dicomweb:
            self.wado_root = "/dicom-web"

    def count(self) -> int:
        return self.orthanc.count_instances()

    def storage(self) -> list[Path]:
        return [self.orthanc.workdir / "storage", self.orthanc.workdir / "index"]

    def stop(self) -> None:
        self.orthanc.stop()

    def describe(self) -> dict:
        return {"version": self.version, "plugins": self.plugins,
                "config": "tests/support/orthanc.py defaults "
                "(TCP_NODELAY=1; SynchronousCMove, MaximumPduLength, DicomThreadsCount, "
                "StorageCompression, MaximumStorageCacheSize, HttpThreadsCount, KeepAlive, "
                "TcpNoDelay at Orthanc's defaults) + DicomModalities DEST and "
                f"{SCU_AET}" + (f"; plugin {DICOMWEB_PLUGIN} with DicomWeb.Root "
                                f"{self.wado_root}/" if self.wado_root else "")}

    def log_summary(self) -> dict:
        lines = [ln for ln in self.orthanc.log().splitlines() if ln[:1] == "E"]
        return {"errors": len(lines), "samples": lines[:5]}


# -- the page cache ------------------------------------------------------------------------
def cold_cache(roots: list[Path]) -> str:
    """Flush and drop the page cache; returns how. drop_caches needs root; otherwise
    every stored file of both systems is advised out (DONTNEED drops clean pages)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        pass
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                try:
                    fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return "fadvise"


# -- C-MOVE --------------------------------------------------------------------------------
@dataclass
class MoveRun:
    seconds: float
    status: str
    received: int
    server_cpu_s: float
    dest_cpu_s: float
    client_cpu_s: float
    machine_busy_s: float
    steal_s: float
    cache: str
    tail_s: float       # last pending response to the final one, as movescu printed them

    @property
    def other_cpu_s(self) -> float:
        return max(0.0, self.machine_busy_s - self.server_cpu_s - self.dest_cpu_s
                   - self.client_cpu_s)


@dataclass
class Rounds:
    """One system's timed rounds of one dataset (a move or a WADO-RS retrieval)."""
    system: str
    dataset: str
    objects: int
    bytes: int          # the study's files as pushed
    runs: list = field(default_factory=list)

    def _median(self, f: Callable) -> float:
        return statistics.median(f(r) for r in self.runs)

    @property
    def seconds(self) -> float:
        return self._median(lambda r: r.seconds)

    @property
    def objects_per_s(self) -> float:
        return self.objects / self.seconds

    def cpu_json(self) -> dict:
        """What the rounds cost, per side (medians)."""
        return {"server_cpu_cores": self._median(lambda r: r.server_cpu_s / r.seconds),
                "server_cpu_ms_per_object": self._median(
                    lambda r: 1000 * r.server_cpu_s / self.objects),
                "other_cpu_cores": self._median(lambda r: r.other_cpu_s / r.seconds),
                "steal_cores": self._median(lambda r: r.steal_s / r.seconds),
                "runs": [asdict(r) | {"other_cpu_s": r.other_cpu_s} for r in self.runs]}


@dataclass
class MoveResult(Rounds):
    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.status == "Success" and r.received == self.objects
                                       for r in self.runs)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    def to_json(self) -> dict:
        return {"system": self.system, "dataset": self.dataset, "objects": self.objects,
                "bytes": self.bytes, "ok": self.ok, "seconds_median": self.seconds,
                "objects_per_s": self.objects_per_s, "mb_per_s": self.mb_per_s,
                "dest_cpu_cores": self._median(lambda r: r.dest_cpu_s / r.seconds),
                "tail_ms": self._median(lambda r: 1000 * r.tail_s), **self.cpu_json()}


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def move_round(s: System, study: Study, scp: StoreSCP, roots: list[Path], logdir: Path
               ) -> MoveRun:
    for f in scp.received():
        f.unlink()
    cache = cold_cache(roots)
    args = ["movescu", "-v", "-S", "-aet", SCU_AET, "-aec", s.aet, "-aem", DEST_AET,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.uid}",
            "127.0.0.1", str(s.port)]
    c0, m0 = _children_cpu(), _machine_cpu()
    lines: list[str] = []
    last_pending = final_at = None
    with CpuMeter(s.pgid) as server, CpuMeter(scp.proc.pid, forks_children=True) as dest:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dcmtk_env())
        assert p.stdout is not None
        watchdog = threading.Timer(1800, p.kill)     # a move that never ends fails the round
        watchdog.start()
        for line in p.stdout:       # movescu writes a line per response as it arrives
            if "Received Move Response" in line:
                last_pending = time.perf_counter()
            elif "Received Final Move Response" in line:
                final_at = time.perf_counter()
            lines.append(line)
        code = p.wait()
        seconds = time.perf_counter() - t0
        watchdog.cancel()
    c1, m1 = _children_cpu(), _machine_cpu()
    out = "".join(lines)
    (logdir / f"movescu-{s.name}-{study.name}.log").write_text(out)
    final = re.search(r"Received Final Move Response \(([^)]*)\)", out)
    status = final.group(1) if final and code == 0 else \
        f"no final response (movescu exit {code})"
    tail = final_at - last_pending if final_at and last_pending else 0.0
    return MoveRun(seconds, status, len(scp.received()), server.seconds, dest.seconds, c1 - c0,
                   m1[0] - m0[0], m1[1] - m0[1], cache, tail)


# -- WADO-RS -------------------------------------------------------------------------------
@dataclass
class WadoRun:
    seconds: float
    http_status: int
    parts: int
    body_bytes: int
    problem: str        # '' when the body is a whole multipart/related of DICOM objects
    server_cpu_s: float
    client_cpu_s: float
    machine_busy_s: float
    steal_s: float
    cache: str

    @property
    def other_cpu_s(self) -> float:
        return max(0.0, self.machine_busy_s - self.server_cpu_s - self.client_cpu_s)


@dataclass
class WadoResult(Rounds):
    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.http_status == 200 and not r.problem
                                       and r.parts == self.objects for r in self.runs)

    @property
    def body_bytes(self) -> float:
        return self._median(lambda r: r.body_bytes)

    @property
    def mb_per_s(self) -> float:
        """Body bytes (the DICOM objects and the multipart framing) per second."""
        return self.body_bytes / self.seconds / 1e6

    def to_json(self) -> dict:
        return {"system": self.system, "dataset": self.dataset, "objects": self.objects,
                "bytes": self.bytes, "body_bytes_median": self.body_bytes, "ok": self.ok,
                "seconds_median": self.seconds, "objects_per_s": self.objects_per_s,
                "mb_per_s": self.mb_per_s,
                "client_cpu_cores": self._median(lambda r: r.client_cpu_s / r.seconds),
                **self.cpu_json()}


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def wado_get(port: int, path: str, timeout: float = 1800
             ) -> tuple[float, int, str, list[bytes], str]:
    """One GET on a new connection, the whole body read: (seconds from connecting to
    the last byte, HTTP status, Content-Type, the body's chunks, '' or the error)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    chunks: list[bytes] = []
    status, ctype, error = 0, "", ""
    t0 = time.perf_counter()
    try:
        conn.request("GET", path, headers=WADO_HEADERS)
        resp = conn.getresponse()
        status, ctype = resp.status, resp.getheader("Content-Type", "")
        while chunk := resp.read(WADO_READ):
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        seconds = time.perf_counter() - t0
        conn.close()
    return seconds, status, ctype, chunks, error


def dicom_parts(content_type: str, body: bytes) -> tuple[int, str]:
    """(parts, '' or what is wrong) of a multipart/related body (RFC 2046 5.1) whose
    parts must each be a DICOM file (application/dicom, "DICM" after the preamble).
    Its own few lines on the standard library, not pacsvault's parser, so that the
    check does not share a bug with the server it checks."""
    msg = email.message.Message()
    msg["Content-Type"] = content_type
    if msg.get_content_type() != "multipart/related":
        return 0, f"Content-Type is {msg.get_content_type()}, not multipart/related"
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        return 0, "no boundary in the Content-Type"
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(pieces) < 2:
        return 0, "no delimiter in the body"
    *parts, last = pieces[1:]       # pieces[0] is the preamble
    if not last.startswith(b"--"):
        return len(parts), "no closing delimiter (the body was cut short)"
    for n, part in enumerate(parts):
        part = part.lstrip(b" \t")          # transport padding after the delimiter
        if not part.startswith(b"\r\n"):
            return n, f"part {n + 1}: the delimiter line goes on"
        end = part.find(b"\r\n\r\n")
        if end < 0:
            return n, f"part {n + 1}: no end to its headers"
        head = email.message_from_bytes(part[2:end + 2])
        if head.get_content_type() != "application/dicom":
            return n, f"part {n + 1}: Content-Type {head.get_content_type()}"
        if part[end + 4 + 128:end + 4 + 132] != b"DICM":
            return n, f"part {n + 1}: not a DICOM file (no DICM prefix)"
    return len(parts), ""


def wado_round(s: System, study: Study, roots: list[Path], logdir: Path, cold: bool = True
               ) -> WadoRun:
    """Retrieve the study whole from ``s`` and check the body (after the clock stops)."""
    cache = cold_cache(roots) if cold else "warm"
    path = f"{s.wado_root}/studies/{study.uid}"
    u0, m0 = _self_cpu(), _machine_cpu()
    with CpuMeter(s.pgid) as server:
        seconds, status, ctype, chunks, error = wado_get(s.http_port, path)
    u1, m1 = _self_cpu(), _machine_cpu()
    body = b"".join(chunks)
    del chunks
    if error:
        parts, problem = 0, error
    elif status != 200:
        parts, problem = 0, f"HTTP {status}: {body[:200].decode('latin-1')!r}"
    else:
        parts, problem = dicom_parts(ctype, body)
    if problem:
        with open(logdir / f"wado-{s.name}.log", "a") as log:
            log.write(f"GET {path}: {problem}\n")
    return WadoRun(seconds, status, parts, len(body), problem, server.seconds, u1 - u0,
                   m1[0] - m0[0], m1[1] - m0[1], cache)


def measure_wado(systems: dict[str, System], studies: dict[str, Study], repeat: int,
                 roots: list[Path], logdir: Path) -> dict[tuple[str, str], WadoResult]:
    """One warm-up retrieval (the small study) from each system, then ``repeat``
    cold-cache rounds of each study from each, the order alternating as for C-MOVE."""
    for s in systems.values():
        w = wado_round(s, studies["small"], roots, logdir, cold=False)
        if w.problem or w.parts != len(studies["small"].files):
            raise RuntimeError(f"warm-up WADO-RS from {s.name}: {w.parts} parts, "
                               f"{w.problem or 'not the study'} (logs in {logdir})")
    results: dict[tuple[str, str], WadoResult] = {}
    for rep in range(repeat):
        for name, study in studies.items():
            order = list(SYSTEMS) if (rep + list(studies).index(name)) % 2 == 0 \
                else list(SYSTEMS)[::-1]
            for sname in order:
                res = results.setdefault((sname, name), WadoResult(
                    sname, name, len(study.files), study.bytes))
                run = wado_round(systems[sname], study, roots, logdir)
                res.runs.append(run)
                print(f"  [{rep + 1}/{repeat}] wado {sname:<9} {name:<5}: "
                      f"{len(study.files) / run.seconds:8.1f} objects/s "
                      f"{run.body_bytes / run.seconds / 1e6:7.1f} MB/s  HTTP {run.http_status}, "
                      f"{run.parts}/{len(study.files)} parts"
                      + (f", {run.problem}" if run.problem else ""), file=sys.stderr)
    return results


# -- C-FIND --------------------------------------------------------------------------------
class FindClient:
    """C-FIND over one association of pacsvault's own SCU. Its ScuAssociation offers
    echo and store only, so the request is sent and the answers read through its
    association and socket helpers (a bench-only use of them)."""

    def __init__(self, port: int, aec: str) -> None:
        self.scu = scu_client.associate(
            "127.0.0.1", port, called_ae=aec, calling_ae=SCU_AET,
            contexts=[(PATIENT_ROOT_FIND, [EXPLICIT_LE, IMPLICIT_LE]),
                      (STUDY_ROOT_FIND, [EXPLICIT_LE, IMPLICIT_LE])])

    def find(self, model: str, identifier: Dataset) -> tuple[float, int, list[bytes]]:
        """(seconds from request to final response, final status, each match's bytes)."""
        ctx = self.scu.context_for(model)
        if ctx is None:
            raise RuntimeError("the peer accepted no context for this query model")
        data = encode(identifier, ctx.transfer_syntax == IMPLICIT_LE, True)
        scu = self.scu
        mid = scu._next_id()
        t0 = time.perf_counter()
        scu.assoc.send_message(ctx.id, dimse.Command(
            dimse.C_FIND_RQ, message_id=mid, affected_sop_class=model, priority=0,
            data_set_type=dimse.DATA_SET_PRESENT))
        scu.assoc.send_data(ctx.id, data, last=True)
        scu._flush()
        matches: list[bytes] = []
        part = bytearray()
        while True:
            ev = scu._wait(lambda e: isinstance(e, (dimse.CommandReceived, dimse.DataFragment)),
                           "a C-FIND response", scu.timeouts.dimse_s)
            if isinstance(ev, dimse.DataFragment):
                part += ev.data
                if ev.is_last:
                    matches.append(bytes(part))
                    part.clear()
                continue
            cmd = ev.command
            if cmd.command_field != dimse.C_FIND_RSP or cmd.message_id_responded_to != mid:
                raise RuntimeError("an answer that is not the C-FIND response")
            if cmd.status not in PENDING:
                return time.perf_counter() - t0, int(cmd.status or 0), matches

    def close(self) -> None:
        self.scu.release()


def _identifier(keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _answer(matches: list[bytes], ts_implicit: bool, level: str) -> list[tuple]:
    """What a query returned, comparable between systems."""
    out = []
    for m in matches:
        ds = decode(io.BytesIO(m), ts_implicit, True)
        if level == "STUDY":
            out.append((str(ds.get("StudyInstanceUID", "")),
                        int(ds.get("NumberOfStudyRelatedInstances") or -1)))
        else:
            out.append((str(ds.get("PatientID", "")),
                        int(ds.get("NumberOfPatientRelatedStudies") or -1)))
    return sorted(out)


def measure_finds(systems: dict[str, System], n: int, warmup: int) -> tuple[dict, dict]:
    """{query: {system: [seconds]}}, {query: {system: answer}}; queries alternate one by one."""
    clients = {name: FindClient(s.port, s.aet) for name, s in systems.items()}
    times: dict = {q: {name: [] for name in systems} for q in QUERIES}
    answers: dict = {q: {} for q in QUERIES}
    try:
        for q, (model, keys) in QUERIES.items():
            ident = _identifier(keys)
            names = list(systems)
            for i in range(warmup + n):
                for name in (names if i % 2 == 0 else names[::-1]):
                    c = clients[name]
                    secs, status, matches = c.find(model, ident)
                    if status != 0x0000:
                        raise RuntimeError(f"{name} {q} query ended with status 0x{status:04X}")
                    if i == 0:
                        implicit = c.scu.context_for(model).transfer_syntax == IMPLICIT_LE
                        answers[q][name] = _answer(matches, implicit, keys["QueryRetrieveLevel"])
                    elif i >= warmup:
                        times[q][name].append(secs)
    finally:
        for c in clients.values():
            c.close()
    return times, answers


def _pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 200 is the second slowest)."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))]


def find_summary(times: dict) -> list[dict]:
    rows = []
    for q, by in times.items():
        for name, xs in by.items():
            rows.append({"query": q, "system": name, "queries": len(xs),
                         "p50_ms": 1000 * _pct(xs, 50), "p99_ms": 1000 * _pct(xs, 99),
                         "mean_ms": 1000 * statistics.fmean(xs), "max_ms": 1000 * max(xs)})
    return rows


# -- output --------------------------------------------------------------------------------
def ratios(moves: list[MoveResult], finds: list[dict], wado: Sequence[WadoResult] = ()) -> dict:
    out: dict = {"move": {}, "wado": {}, "find": {}}
    for leg, results in (("move", moves), ("wado", wado)):
        by = {(r.system, r.dataset): r for r in results}
        for ds in DATASETS:
            pv, ot = by.get(("pacsvault", ds)), by.get(("orthanc", ds))
            if pv and ot and pv.ok and ot.ok:
                r = pv.objects_per_s / ot.objects_per_s
                out[leg][ds] = {"pacsvault_vs_orthanc": r, "target_met": r >= 1.0}
    fby = {(f["system"], f["query"]): f for f in finds}
    for q in QUERIES:
        pv, ot = fby.get(("pacsvault", q)), fby.get(("orthanc", q))
        if pv and ot:
            out["find"][q] = {"p50_pacsvault_vs_orthanc": pv["p50_ms"] / ot["p50_ms"],
                              "p99_pacsvault_vs_orthanc": pv["p99_ms"] / ot["p99_ms"]}
    return out


def _order(r: MoveResult | WadoResult) -> tuple[int, int]:
    return list(DATASETS).index(r.dataset), SYSTEMS.index(r.system)


def _ratio_cell(rat: dict, leg: str, r: MoveResult | WadoResult) -> str:
    x = rat[leg].get(r.dataset) if r.system == "pacsvault" else None
    return "-" if x is None else (f"{x['pacsvault_vs_orthanc']:.2f}"
                                  + (" ok" if x["target_met"] else " !"))


def format_table(moves: list[MoveResult], finds: list[dict], rat: dict,
                 wado: Sequence[WadoResult] = (), wado_skipped: str = "") -> str:
    head = (f"{'C-MOVE':<10} {'dataset':<10} {'objects':>7} {'MB':>6} {'objects/s':>10} "
            f"{'MB/s':>7} {'srv CPU':>7} {'ms CPU/obj':>10} {'dest CPU':>8} {'other':>5} "
            f"{'steal':>5} {'tail ms':>7} {'pv/Orthanc':>10}")
    lines = [head, "-" * len(head)]
    for m in sorted(moves, key=_order):
        j = m.to_json()
        ratio = _ratio_cell(rat, "move", m)
        ops = f"{m.objects_per_s:.1f}" if m.ok else "FAILED"
        lines.append(f"{m.system:<10} {DATASETS[m.dataset].label:<10} {m.objects:>7} "
                     f"{m.bytes / 1e6:>6.1f} {ops:>10} {m.mb_per_s:>7.1f} "
                     f"{j['server_cpu_cores']:>6.2f}c {j['server_cpu_ms_per_object']:>10.2f} "
                     f"{j['dest_cpu_cores']:>7.2f}c {j['other_cpu_cores']:>5.2f} "
                     f"{j['steal_cores']:>5.2f} {j['tail_ms']:>7.0f} {ratio:>10}")
    lines.append("")
    head = (f"{'WADO-RS':<10} {'dataset':<10} {'objects':>7} {'MB':>6} {'objects/s':>10} "
            f"{'MB/s':>7} {'srv CPU':>7} {'ms CPU/obj':>10} {'clnt CPU':>8} {'other':>5} "
            f"{'steal':>5} {'':>7} {'pv/Orthanc':>10}")
    lines += [head, "-" * len(head)]
    if wado_skipped:
        lines.append(f"skipped: {wado_skipped}")
    for w in sorted(wado, key=_order):
        j = w.to_json()
        ops = f"{w.objects_per_s:.1f}" if w.ok else "FAILED"
        lines.append(f"{w.system:<10} {DATASETS[w.dataset].label:<10} {w.objects:>7} "
                     f"{w.body_bytes / 1e6:>6.1f} {ops:>10} {w.mb_per_s:>7.1f} "
                     f"{j['server_cpu_cores']:>6.2f}c {j['server_cpu_ms_per_object']:>10.2f} "
                     f"{j['client_cpu_cores']:>7.2f}c {j['other_cpu_cores']:>5.2f} "
                     f"{j['steal_cores']:>5.2f} {'':>7} {_ratio_cell(rat, 'wado', w):>10}")
    lines.append("")
    head = (f"{'C-FIND':<10} {'query':<22} {'queries':>7} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'mean ms':>7} {'pv/Orthanc p50':>14} {'p99':>5}")
    lines += [head, "-" * len(head)]
    label = {"study": "STUDY by PatientID", "patient": "PATIENT by PatientID"}
    for f in sorted(finds, key=lambda f: (list(QUERIES).index(f["query"]),
                                          SYSTEMS.index(f["system"]))):
        r = rat["find"].get(f["query"]) if f["system"] == "pacsvault" else None
        r50 = "-" if r is None else f"{r['p50_pacsvault_vs_orthanc']:.2f}"
        r99 = "-" if r is None else f"{r['p99_pacsvault_vs_orthanc']:.2f}"
        lines.append(f"{f['system']:<10} {label[f['query']]:<22} {f['queries']:>7} "
                     f"{f['p50_ms']:>7.2f} {f['p99_ms']:>7.2f} {f['mean_ms']:>7.2f} "
                     f"{r50:>14} {r99:>5}")
    lines.append("C-MOVE: movescu start to exit, cold page cache, median of the rounds; srv CPU: "
                 "the server's CPU time / wall time; dest CPU: storescp's; other: cores used by "
                 "anything else; tail: from the last pending response to the final one; "
                 "pv/Orthanc in objects/s (ok / !: meets / misses >= 1.0). "
                 "WADO-RS: GET of the whole study on a new connection to the last body byte, "
                 "cold page cache, median of the rounds; MB: the body; clnt CPU: this "
                 "process reading it; pv/Orthanc in objects/s. "
                 "C-FIND: request to final response on an open association; pv/Orthanc of "
                 "latency (below 1: pacsvault answers faster).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.retrieve",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CT 30, 10 KB 100, 10 filler patients, 40 queries, 1 round (CI)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("--repeat", type=int, help="moves per system and study (default 3, quick 1)")
    ap.add_argument("--ct", type=int, help="CT objects (default 400)")
    ap.add_argument("--small", type=int, help="10 KB objects (default 1000)")
    ap.add_argument("--filler", type=int, help="filler patients (default 100)")
    ap.add_argument("--queries", type=int, help="timed queries per kind and system (default 200)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="pacsvault serve --workers (default: one per core)")
    ap.add_argument("--workdir", type=Path, help="where to put everything (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=20240103)
    a = ap.parse_args(argv)

    for tool in ("storescu", "storescp", "echoscu", "movescu"):
        if shutil.which(tool) is None:
            print(f"{tool} (dcmtk) is required", file=sys.stderr)
            return 2
    if orthanc_binary() is None:
        print("Orthanc is required (Debian package 'orthanc')", file=sys.stderr)
        return 2
    repeat = a.repeat or (1 if a.quick else 3)
    mode = "quick" if a.quick else "full"
    counts = {"ct": a.ct or getattr(DATASETS["ct"], mode),
              "small": a.small or getattr(DATASETS["small"], mode)}
    filler = a.filler if a.filler is not None else (10 if a.quick else 100)
    n_queries = a.queries or (40 if a.quick else 200)
    warmup = 5 if a.quick else 20
    wado_skipped = "" if os.path.exists(DICOMWEB_PLUGIN) else (
        f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing (Debian package "
        "orthanc-dicomweb; deploy/install.sh --test installs it)")
    if wado_skipped:
        print(f"WADO-RS leg skipped: {wado_skipped}", file=sys.stderr)

    mach = machine()  # before the daemon starts: the code revision it runs
    work = Path(tempfile.mkdtemp(prefix="pacsvault-bench-retrieve-", dir=a.workdir))
    logdir = work / "logs"
    logdir.mkdir()
    print(f"bench.retrieve: work dir {work}", file=sys.stderr)
    t = time.perf_counter()
    studies, filler_files = make_data(work, counts, filler, a.seed)
    print(f"generated data in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    all_files = [f for s in studies.values() for f in s.files] + filler_files

    scp = StoreSCP(work / "dest", aet=DEST_AET).start()   # TCP_NODELAY=1, --fork, +xa
    systems: dict[str, System] = {}
    moves: dict[tuple[str, str], MoveResult] = {}
    wado: dict[tuple[str, str], WadoResult] = {}
    report: dict = {}
    try:
        systems["pacsvault"] = Pacsvault(work / "pacsvault", scp.port, a.workers)
        systems["orthanc"] = OrthancSystem(work / "orthanc", scp.port,
                                           dicomweb=not wado_skipped)
        for s in systems.values():
            t = time.perf_counter()
            storescu(s.port, s.aet, all_files, logdir)
            if s.count() != len(all_files):
                raise RuntimeError(f"{s.name} holds {s.count()} of {len(all_files)} objects")
            print(f"pushed {len(all_files)} objects to {s.name} in "
                  f"{time.perf_counter() - t:.1f}s", file=sys.stderr)
        roots = [p for s in systems.values() for p in s.storage()]
        # Warm-up (not measured): one small move from each, so no first-use cost is timed.
        for s in systems.values():
            w = move_round(s, Study("warm", "", studies["small"].uid, [], 0), scp, roots, logdir)
            if w.status != "Success":
                raise RuntimeError(f"warm-up move from {s.name}: {w.status} (logs in {logdir})")
        for rep in range(repeat):
            for name, study in studies.items():
                order = list(SYSTEMS) if (rep + list(studies).index(name)) % 2 == 0 \
                    else list(SYSTEMS)[::-1]
                for sname in order:
                    res = moves.setdefault((sname, name), MoveResult(
                        sname, name, len(study.files), study.bytes))
                    run = move_round(systems[sname], study, scp, roots, logdir)
                    res.runs.append(run)
                    print(f"  [{rep + 1}/{repeat}] move {sname:<9} {name:<5}: "
                          f"{len(study.files) / run.seconds:8.1f} objects/s "
                          f"{study.bytes / run.seconds / 1e6:7.1f} MB/s  {run.status}, "
                          f"{run.received}/{len(study.files)} received", file=sys.stderr)
        if not wado_skipped:
            wado = measure_wado(systems, studies, repeat, roots, logdir)
        times, answers = measure_finds(systems, n_queries, warmup)
        for q, by in answers.items():
            if by["pacsvault"] != by["orthanc"]:
                raise RuntimeError(f"the {q} query answered differently: {by}")
        report["find_answers"] = answers
    finally:
        for s in systems.values():
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                print(f"stopping {s.name}: {e}", file=sys.stderr)
        scp.stop()

    move_list, wado_list = list(moves.values()), list(wado.values())
    finds = find_summary(times)
    rat = ratios(move_list, finds, wado_list)
    table = format_table(move_list, finds, rat, wado_list, wado_skipped)
    cache_methods = sorted({r.cache for m in [*move_list, *wado_list] for r in m.runs})
    report.update({
        "benchmark": "retrieve",
        "command": " ".join([".venv/bin/python -m bench.retrieve",
                             *(argv if argv is not None else sys.argv[1:])]),
        "mode": "quick" if a.quick else "full",
        "repeat": repeat,
        "machine": mach,
        "cache": cache_methods,
        "datasets": {n: {"label": s.label, "objects": len(s.files), "bytes": s.bytes}
                     for n, s in studies.items()},
        "filler_patients": filler,
        "catalog_objects": len(all_files),
        "move_client": "dcmtk movescu -S, STUDY level, TCP_NODELAY=1; destination dcmtk "
                       "storescp --fork +xa -pm, TCP_NODELAY=1, writes every object",
        "wado_client": "http.client in this process, a new connection per retrieval, GET "
                       "{root}/studies/{uid} with " + json.dumps(WADO_HEADERS) + ", the whole "
                       f"body read in {WADO_READ}-byte reads, then checked: multipart/related, "
                       "one application/dicom part per object of the study",
        "wado_skipped": wado_skipped or None,
        "find_client": "pacsvault's own SCU in-process, one association per system, queries "
                       f"alternating between systems, {warmup} warm-up queries each",
        "queries": {q: keys for q, (_m, keys) in QUERIES.items()},
        "systems": {n: s.describe() for n, s in systems.items()},
        "moves": [m.to_json() for m in move_list],
        "wado": [w.to_json() for w in wado_list],
        "finds": finds,
        "find_times_s": times,
        "ratios": rat,
        "logs": {n: s.log_summary() for n, s in systems.items()},
        "table": table,
    })
    print(table)
    print(f"page cache before each move and retrieval: {', '.join(cache_methods)}")
    if wado_skipped:
        print(f"WADO-RS leg skipped: {wado_skipped}")
    for n, summary in report["logs"].items():
        bad = {k: v for k, v in summary.items() if not k.endswith("samples") and v}
        if bad:
            print(f"{n} log: {bad}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2, default=str))
    if a.keep:
        print(f"kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if move_list and all(m.ok for m in [*move_list, *wado_list]) else 1


if __name__ == "__main__":
    sys.exit(main())
