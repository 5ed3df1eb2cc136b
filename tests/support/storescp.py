"""Run dcmtk ``storescp +xa`` (accept every transfer syntax it knows) on loopback.

It writes each received object to ``outdir`` (no fsync: dcmtk does not offer
one) and forks one child per association, so parallel associations are served in
parallel. ``TCP_NODELAY=1`` is in its environment (dcmtk keeps Nagle's algorithm
on otherwise) unless ``nodelay=False``: a PACS as shipped, to show that our own
SCU does not depend on the peer's setting. Ready when ``echoscu`` gets an answer.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.daemon import dcmtk_env, echoscu, free_port
from tests.support.process import LoggedProcess


def storescp_binary() -> str | None:
    return shutil.which("storescp")


@dataclass
class StoreSCP(LoggedProcess):
    workdir: Path
    aet: str = "STORESCP"
    port: int = 0
    fork: bool = True
    promiscuous: bool = True   # accept unknown (private, retired) SOP classes too
    nodelay: bool = True       # TCP_NODELAY=1 in its environment
    accept_all: bool = True    # +xa; False: storescp's default, uncompressed syntaxes only
    extra_args: tuple[str, ...] = ()   # e.g. ("+B", "--max-pdu", "4096")
    proc: subprocess.Popen | None = None

    @property
    def outdir(self) -> Path:
        return self.workdir / "received"

    def start(self, timeout: float = 30) -> "StoreSCP":
        binary = storescp_binary()
        if binary is None:
            raise FileNotFoundError("dcmtk storescp is not installed")
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [binary, *(["+xa"] if self.accept_all else []), "-aet", self.aet,
                "-od", str(self.outdir), "-dhl"]
        if self.fork:
            args.append("--fork")
        if self.promiscuous:
            args.append("-pm")
        args.extend(self.extra_args)
        args.append(str(self.port))
        self.log_path = self.workdir / "storescp.log"
        log = open(self.log_path, "ab")
        env = dcmtk_env() if self.nodelay else {k: v for k, v in os.environ.items()
                                                 if k != "TCP_NODELAY"}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited {self.proc.returncode}:\n{self.log()}")
            if echoscu(self.port, aec=self.aet).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"storescp did not answer C-ECHO within {timeout}s:\n{self.log()}")


    def received(self) -> list[Path]:
        return sorted(p for p in self.outdir.iterdir() if p.is_file())


def start_storescp(workdir: Path, **kwargs) -> StoreSCP:  # noqa: ANN003
    return StoreSCP(workdir, **kwargs).start()


__all__ = ["StoreSCP", "start_storescp", "storescp_binary", "free_port", "dcmtk_env"]
