"""Run `pacsvault serve` as a real subprocess for integration and fault tests."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
PACSVAULT = str(VENV_BIN / "pacsvault")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(config: Path, *args: str, env: dict | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([PACSVAULT, "--config", str(config), *args], capture_output=True,
                       text=True, env=full_env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"pacsvault {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def init_instance(root: Path, *, toml_extra: str = "", allow_any: bool = False,
                  catalog_url: str | None = None) -> Path:
    """`pacsvault init root`, then apply small config edits (a real operator's edits)."""
    subprocess.run([PACSVAULT, "init", str(root)], check=True, capture_output=True)
    cfg = root / "pacsvault.toml"
    text = cfg.read_text()
    if allow_any:
        text = text.replace("allow_any_peer = false", "allow_any_peer = true")
    if catalog_url:
        text = text.replace('url = "sqlite:///catalog/catalog.db"', f'url = "{catalog_url}"')
    if engine := os.environ.get("PV_TEST_DICOM_ENGINE"):
        # Runs the same tests on either DICOM engine (archive/dicom/net or pynetdicom).
        text = re.sub(r'(?m)^engine = "[a-z]+"', f'engine = "{engine}"', text, count=1)
    text += "\n" + toml_extra
    cfg.write_text(text)
    if catalog_url:  # the new catalog needs its schema
        subprocess.run([PACSVAULT, "init", "--config", str(cfg)], check=True, capture_output=True)
    return cfg


@dataclass
class Daemon:
    config: Path
    dicom_port: int
    http_port: int
    workers: int = 2
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    prefix: tuple[str, ...] = ()    # a command the daemon runs under (strace ...)

    def start(self, timeout: float = 60) -> "Daemon":
        self.log_path = self.config.parent / f"serve-{int(time.time() * 1000)}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*self.prefix, PACSVAULT, "--config", str(self.config), "serve",
             "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port),
             "--workers", str(self.workers)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            if "pacsvault listening" in self.log():
                return self
            time.sleep(0.1)
        raise AssertionError(f"serve did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 90) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError("serve did not exit after SIGTERM")

    def kill9(self) -> None:
        """SIGKILL the whole daemon (supervisor and workers): a power cut."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def status(self) -> dict:
        return json.loads(run_cli(self.config, "status", "--json").stdout)


def dcmtk_env() -> dict:
    # dcmtk leaves Nagle's algorithm on unless told; without this a loopback push crawls.
    return {**os.environ, "TCP_NODELAY": "1"}


# storescu proposes only uncompressed syntaxes unless told; one flag per syntax.
_TS_FLAG = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
}


def _ts_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[0x00020010])
               .file_meta.TransferSyntaxUID)


def storescu(port: int, files: list[Path] | Path, *, aet: str = "STORESCU",
             aec: str = "PACSVAULT", extra: tuple[str, ...] = (),
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Push files (or every file under a directory) with dcmtk storescu.

    Files are grouped by transfer syntax and each group is sent with the flag that
    makes storescu propose that syntax, so compressed objects travel as they are.
    Returns the last failing run, or the last run if all succeeded.
    """
    if isinstance(files, Path):
        files = sorted(p for p in files.rglob("*") if p.is_file()) if files.is_dir() else [files]
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_TS_FLAG.get(_ts_of(f), "-xe"), []).append(str(f))
    result = None
    for flag, paths in groups.items():
        args = ["storescu", "-aet", aet, "-aec", aec, "-nh", flag, *extra]
        r = subprocess.run([*args, "127.0.0.1", str(port), *paths], capture_output=True,
                           text=True, env=dcmtk_env(), timeout=timeout)
        if result is None or result.returncode == 0:
            result = r
    assert result is not None
    return result


def echoscu(port: int, aet: str = "STORESCU", aec: str = "PACSVAULT") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)
