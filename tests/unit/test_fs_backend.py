"""The filesystem site: durable, verified, never clobbering, never visible half-done."""
import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tiers.backend import (
    CopyCorrupt,
    ObjectExists,
    ObjectNotFound,
    StorageFull,
    Unavailable,
)
from tiers.fs import MARKER, FilesystemBackend


@dataclass
class Bytes:
    data: bytes
    sha256: str = ""

    def __post_init__(self):
        self.sha256 = self.sha256 or hashlib.sha256(self.data).hexdigest()

    @property
    def size(self):
        return len(self.data)

    def open(self):
        import io
        return io.BytesIO(self.data)


@pytest.fixture
def site(tmp_path: Path) -> FilesystemBackend:
    s = FilesystemBackend("site-a", tmp_path / "a")
    s.initialize()
    return s


KEY = "objects/aa/bb/1.2/3/1.2.3.dcm"


def test_put_open_stat_list_delete(site):
    info = site.put(KEY, Bytes(b"hello"))
    assert info.size == 5 and info.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert site.open(KEY).read() == b"hello"
    assert site.stat(KEY).size == 5
    assert [o.key for o in site.list()] == [KEY]
    site.delete(KEY)
    site.delete(KEY)  # idempotent
    with pytest.raises(ObjectNotFound):
        site.open(KEY)
    assert list((site.root / "tmp").iterdir()) == []


def test_same_content_is_idempotent_different_content_never_replaces(site):
    site.put(KEY, Bytes(b"first"))
    site.put(KEY, Bytes(b"first"))
    with pytest.raises(ObjectExists):
        site.put(KEY, Bytes(b"second"))
    assert site.open(KEY).read() == b"first"
    site.put(KEY, Bytes(b"second"), replace=True)  # repair path only
    assert site.open(KEY).read() == b"second"


def test_wrong_checksum_leaves_nothing_visible(site):
    with pytest.raises(CopyCorrupt):
        site.put(KEY, Bytes(b"payload", sha256="0" * 64))
    assert not (site.root / KEY).exists()
    assert list((site.root / "tmp").iterdir()) == []


def test_short_source_is_an_error(site):
    class Short(Bytes):
        @property
        def size(self):
            return 100
    with pytest.raises(Exception):
        site.put(KEY, Short(b"only ten b"))
    assert not (site.root / KEY).exists()


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


@pytest.mark.parametrize("key", ["../escape.dcm", "/etc/passwd", "objects/../../x", "a\x00b"])
def test_hostile_keys_refused(site, key):
    with pytest.raises(Exception):
        site.put(key, Bytes(b"x"))


def test_sweep_removes_crash_leftovers(site):
    (site.root / "tmp" / "0123456789abcdef01234567.tmp").write_bytes(b"patient data")
    (site.root / "tmp" / "abc.tmp").write_bytes(b"not ours")      # not put()'s naming
    assert site.sweep_temp() == 1
    assert [p.name for p in (site.root / "tmp").iterdir()] == ["abc.tmp"]


def test_ranged_read_is_exact_or_an_error(site):
    site.put(KEY, Bytes(b"0123456789"))
    assert site.open_range(KEY, 2, 5).read() == b"23456"
    assert site.open_range(KEY, 0, 10).read() == b"0123456789"
    for off, n in ((8, 5), (-1, 2), (11, 0)):
        with pytest.raises(Exception):
            site.open_range(KEY, off, n)
