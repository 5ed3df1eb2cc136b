"""What every test-launched server process shares: stop, log, context manager."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


class LoggedProcess:
    """A server started with ``start_new_session=True`` that logs to ``log_path``.

    Subclasses set ``proc`` and ``log_path`` in ``start()`` and return ``self``.
    """

    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    stop_timeout: float = 10

    def start(self) -> "LoggedProcess":
        raise NotImplementedError  # each launcher knows how it starts and when it is ready

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the process group (the server and any children), then SIGKILL."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

    def log(self) -> str:
        path = self.log_path
        return path.read_text(errors="replace") if path and path.exists() else ""

    def __enter__(self):  # noqa: ANN204
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
