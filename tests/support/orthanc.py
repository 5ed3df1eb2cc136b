"""Run a real Orthanc (Debian package, 1.10) on loopback for integration tests and benchmarks.

The config is written into a private directory (storage and index there), the
DICOM and HTTP ports are free loopback ports, the REST API is open only on
127.0.0.1 without authentication, and any SCU may C-STORE to it. Orthanc leaves
Nagle's algorithm on in its DICOM connections unless ``TCP_NODELAY=1`` is in its
environment, so that is always set. It loads no plugin unless given ``plugins``
(paths of plugin files; e.g. ``DICOMWEB_PLUGIN``, Debian package orthanc-dicomweb,
whose settings go in ``extra_config["DicomWeb"]``).

Only urllib from the standard library: no new dependencies.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.daemon import free_port
from tests.support.process import LoggedProcess

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"   # orthanc-dicomweb


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None when it is not installed."""
    if os.access(ORTHANC_BIN, os.X_OK):
        return ORTHANC_BIN
    return shutil.which("Orthanc")


class OrthancError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"Orthanc answered HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


@dataclass
class Orthanc(LoggedProcess):
    """One Orthanc process. ``modalities`` maps a symbolic name to (AET, host, port)."""

    stop_timeout = 20  # Orthanc flushes its index on SIGTERM

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    extra_config: dict = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen | None = None
    plugins: list[str] = field(default_factory=list)     # plugin files to load

    # -- lifecycle --------------------------------------------------------------
    def config(self) -> dict:
        cfg = {
            "Name": f"pacsvault-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(p) for p in self.plugins],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,      # REST only from loopback
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            # Accept C-ECHO/C-STORE from any SCU, of any SOP class (benchmarks push
            # with storescu under an AE title Orthanc does not know).
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "DicomModalities": {name: [aet, host, port]
                                for name, (aet, host, port) in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 60,
            "SaveJobs": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpTimeout": 120,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout: float = 60) -> "Orthanc":
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        self.log_path = self.workdir / "orthanc.log"
        log = open(self.log_path, "ab")
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([binary, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.system()
                return self
            except (OSError, OrthancError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer GET /system within {timeout}s:\n{self.log()}")


    # -- REST -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 600,
                raw: bool = False):  # noqa: ANN201
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise OrthancError(e.code, e.read().decode(errors="replace")) from None
        if raw:
            return data
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data

    def get(self, path: str, timeout: float = 60):  # noqa: ANN201
        return self.request("GET", path, timeout=timeout)

    def post_json(self, path: str, payload: object, timeout: float = 600):  # noqa: ANN201
        return self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)

    def system(self) -> dict:
        return self.get("/system", timeout=2)

    def plugin_versions(self) -> dict[str, str]:
        """{plugin ID: version} of the plugins Orthanc loaded."""
        return {pid: str(self.get(f"/plugins/{pid}").get("Version", "?"))
                for pid in self.get("/plugins") if pid != "explorer.js"}   # not a plugin

    def upload(self, path: Path) -> dict:
        """POST /instances with the file's bytes; returns Orthanc's answer (ID, ParentStudy...)."""
        answer = self.request("POST", "/instances", Path(path).read_bytes(),
                              content_type="application/dicom")
        if not isinstance(answer, dict) or answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(200, f"upload of {path} not stored: {answer!r}")
        return answer

    def store_to(self, modality: str, resources: list[str], timeout: float = 1800) -> dict:
        """C-STORE resources (instance/series/study/patient IDs) to a modality, synchronously.

        Raises OrthancError when Orthanc reports the job failed (e.g. association refused).
        """
        return self.post_json(f"/modalities/{modality}/store",
                              {"Resources": resources, "Synchronous": True}, timeout=timeout)

    def echo(self, modality: str) -> bool:
        try:
            self.post_json(f"/modalities/{modality}/echo", {}, timeout=60)
            return True
        except OrthancError:
            return False

    def statistics(self) -> dict:
        return self.get("/statistics")

    def count_instances(self) -> int:
        return int(self.statistics()["CountInstances"])

    def instance_tags(self, orthanc_id: str) -> dict:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_metadata(self, orthanc_id: str, name: str) -> str:
        return self.request("GET", f"/instances/{orthanc_id}/metadata/{name}", raw=True).decode()


def start_orthanc(workdir: Path, **kwargs) -> Orthanc:  # noqa: ANN003
    return Orthanc(workdir, **kwargs).start()
