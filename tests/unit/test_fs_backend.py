"""What only the filesystem site has: disk full, its marker, free space, the temp
sweep. The Backend contract it keeps (durable, verified, never clobbering, never
visible half-done) is tests/conformance/test_backend.py."""
import errno
import os
from pathlib import Path

import pytest

from tests.support.s3fixtures import Bytes
from tiers.backend import (
    StorageFull,
    Unavailable,
)
from tiers.fs import MARKER, FilesystemBackend


@pytest.fixture
def site(tmp_path: Path) -> FilesystemBackend:
    s = FilesystemBackend("site-a", tmp_path / "a")
    s.initialize()
    return s


KEY = "objects/aa/bb/1.2/3/1.2.3.dcm"


def test_disk_full_is_classified(site, monkeypatch):
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageFull):
        site.put(KEY, Bytes(b"x" * 100))
    monkeypatch.setattr(os, "write", real_write)
    assert list((site.root / "tmp").iterdir()) == []


def test_unmounted_site_refuses_writes_and_reports(site):
    (site.root / MARKER).unlink()
    assert not site.health().ok and "missing" in site.health().reason
    with pytest.raises(Unavailable):
        site.put(KEY, Bytes(b"x"))


def test_min_free_makes_site_unhealthy(tmp_path):
    s = FilesystemBackend("b", tmp_path / "b", min_free_bytes=1 << 62)
    s.initialize()
    assert not s.health().ok and "full" in s.health().reason


def test_marker_of_another_site_is_refused(tmp_path):
    FilesystemBackend("site-a", tmp_path / "x").initialize()
    with pytest.raises(Exception, match="belongs to site"):
        FilesystemBackend("site-b", tmp_path / "x").initialize()


def test_sweep_removes_crash_leftovers(site):
    (site.root / "tmp" / "0123456789abcdef01234567.tmp").write_bytes(b"patient data")
    (site.root / "tmp" / "abc.tmp").write_bytes(b"not ours")      # not put()'s naming
    assert site.sweep_temp() == 1
    assert [p.name for p in (site.root / "tmp").iterdir()] == ["abc.tmp"]
