"""Resident memory of a daemon and its worker processes, from /proc (no psutil here),
sampled in the background while a test attacks it."""
from __future__ import annotations

import threading
from pathlib import Path


def tree_rss_kb(root_pid: int) -> dict[int, int]:
    """VmRSS in KiB of ``root_pid`` and every process below it."""
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                # The command name may hold spaces and parentheses: ppid follows the last ')'.
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {root_pid}, True
    while grew:
        below = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= below
        grew = bool(below)
    out = {}
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue                            # exited meanwhile
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out[pid] = int(line.split()[1])
    return out


class RssSampler:
    """Samples the summed RSS of a process tree every ``interval`` seconds until
    stopped; ``peak_growth_kb`` is the largest sum seen minus the sum at start."""

    def __init__(self, root_pid: int, interval: float = 0.1) -> None:
        self.root_pid, self.interval = root_pid, interval
        self.baseline_kb = sum(tree_rss_kb(root_pid).values())
        self.peak_kb = self.baseline_kb
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, sum(tree_rss_kb(self.root_pid).values()))
            self.samples += 1

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_growth_kb(self) -> int:
        return self.peak_kb - self.baseline_kb
