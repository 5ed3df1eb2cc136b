"""An object larger than 1 GiB is streamed: spooled in chunks, hashed and copied
in chunks, never held in memory (let alone twice)."""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from archive.dicom.part10 import file_meta
from tests.conftest import site_paths
from tests.support.scu import send_files
from tests.support.verify import audit, sqlite_url

SIZE = 1100 * 1024 * 1024  # pixel data bytes: > 1 GiB


def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def write_huge(path: Path) -> str:
    sop = "1.2.826.0.1.3680043.10.999.1.1"
    ds = (el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
          + el(0x0008, 0x0018, b"UI", sop.encode())
          + el(0x0008, 0x0060, b"CS", b"CT")
          + el(0x0010, 0x0020, b"LO", b"HUGE-1")
          + el(0x0020, 0x000D, b"UI", b"1.2.826.0.1.3680043.10.999.1")
          + el(0x0020, 0x000E, b"UI", b"1.2.826.0.1.3680043.10.999.1.0")
          + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, SIZE))
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(file_meta("1.2.840.10008.5.1.4.1.1.2", sop, "1.2.840.10008.1.2.1") + ds)
        for _ in range(SIZE >> 20):
            f.write(block)
    return sop


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_object_over_1gib_is_streamed(daemon, tmp_path: Path):
    path = tmp_path / "huge.dcm"
    sop = write_huge(path)
    assert send_files(daemon.dicom_port, [path], timeout=600) == [0]
    a = audit(sqlite_url(daemon.config.parent), site_paths(daemon.config))
    assert a.instances == 1 and a.ok_copies == 2 and not a.bad
    assert sop in a.sop_uids
    workers = subprocess.run(["pgrep", "-P", str(daemon.proc.pid)], capture_output=True,
                             text=True).stdout.split()
    peaks = [peak_rss_kib(int(w)) for w in workers]
    # Every worker stayed far below the object's size: it was never held in memory.
    assert peaks and max(peaks) < 400 * 1024, peaks
