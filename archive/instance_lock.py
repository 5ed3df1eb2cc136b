"""One `pacsvault serve` per instance.

The daemon holds an exclusive flock(2) on ``serve.lock`` in the instance's data
directory for its whole life. The kernel drops it when the process dies, kill -9
included, so there is never a stale lock to clean up. The file holds the pid of
the holder, for the message a second daemon gives before it exits.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from archive.errors import ConfigError, PacsvaultError

LOCK_NAME = "serve.lock"


class DaemonRunning(PacsvaultError):
    """another pacsvault serve runs for this instance: {}"""

    exit_code = 75  # EX_TEMPFAIL: busy in another process


def hold_instance_lock(data_dir: Path) -> int:
    """Take the instance lock, or raise DaemonRunning naming the holder's pid.
    Returns the descriptor: keep it open for as long as the daemon runs."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise ConfigError(f"data_dir {data_dir}: cannot create {LOCK_NAME} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DaemonRunning(f"pid {holder} holds {path}; stop it first (one daemon per "
                            "instance: a second one would split the DICOM port with it)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
