"""A backend on a mounted directory: an online site (local disk, NAS, SAN, NFS).

Write ordering for ``put`` (the reason for each step is the comment beside it):

1. create ``tmp/<random>.tmp`` exclusively and write the payload
2. fsync the file                           data on stable storage
3. drop its pages from the cache and re-read it, comparing SHA-256
                                             proves the device holds the right bytes
4. make parent directories, fsync each new one's parent
5. rename into place                         atomic: readers see all or nothing
6. fsync the destination directory           the name itself is durable

A crash before 5 leaves only a file in ``tmp/``, which ``sweep_temp`` removes at
start-up (it may hold patient data, so it must not linger). A site is usable
only while its ``PACSVAULT-SITE.json`` marker is present: an unmounted NAS
leaves an empty mount point, and writing into it would fill the root disk with
copies nobody will find.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
import uuid
from collections import deque
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from archive import failpoints
from archive.object_names import is_safe_key
from tiers.backend import (
    BackendError,
    CopyCorrupt,
    LimitedReader,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Payload,
    SiteHealth,
    StorageFull,
    Unavailable,
)
from tiers.layout import LAYOUT_VERSION

MARKER = "PACSVAULT-SITE.json"
CHUNK = 1024 * 1024
# hash_each asks the kernel for at most this much of a file ahead of its read: enough
# for a whole image, and a huge file cannot pull gigabytes into the cache at once.
READ_AHEAD = 8 * CHUNK
# Our temp files: put() names them so; a sweep removes nothing else.
TEMP_NAME = re.compile(r"^[0-9a-f]{24}\.tmp$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some NFS servers refuse fsync on directories
            raise
    finally:
        os.close(fd)


class FilesystemBackend:
    def __init__(self, name: str, root: Path, *, min_free_bytes: int = 0,
                 verify_read: str = "device") -> None:
        self.name = name
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.drop_cache = verify_read == "device"
        self._known_dirs: set[Path] = set()
        self._dir_lock = threading.Lock()

    # -- set-up ------------------------------------------------------------
    def initialize(self) -> None:
        """Create the site (idempotent). Refuses a marker naming another site."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if marker.exists():
            found = json.loads(marker.read_text())
            if found.get("site") != self.name:
                raise BackendError("initialize", self.name,
                                   f"{marker} belongs to site {found.get('site')!r}")
            return
        for sub in ("objects", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        doc = {
            "format": "pacsvault-site",
            "version": LAYOUT_VERSION,
            "site": self.name,
            "site_id": str(uuid.uuid4()),
            "layout": "objects/<sha256(study)[0:2]>/<sha256(study)[2:4]>/<study-uid>/"
                      "<sha256(sop)[0]>/<sop-uid>[.<sha256(file)[0:16]>].dcm",
        }
        tmp = self.root / (MARKER + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, marker)
        _fsync_dir(self.root)

    def sweep_temp(self) -> int:
        """Remove files a crash left in tmp/ (never visible objects). Returns the count.
        Only files named as put() names them, and only those no live writer holds:
        put() keeps an exclusive flock on its temp file until it is done, and the
        kernel drops it when the writer dies, so another process may sweep at any time."""
        removed = 0
        tmpdir = self.root / "tmp"
        marker = self.root / MARKER
        # Only in a site that is ours, and only in its own tmp/ (a symlink leads elsewhere).
        if not marker.is_file() or marker.is_symlink() or tmpdir.is_symlink() \
                or not tmpdir.is_dir():
            return 0
        for entry in os.scandir(tmpdir):
            if not TEMP_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry.path)
                removed += 1
            except OSError:             # held by a live writer, or already gone
                pass
            finally:
                os.close(fd)
        return removed

    # -- health --------------------------------------------------------------
    def health(self) -> SiteHealth:
        try:
            if not (self.root / MARKER).is_file():
                return SiteHealth(False, f"{MARKER} missing (unmounted or not initialized)")
            st = os.statvfs(self.root)
            free = st.f_bavail * st.f_frsize
            if not os.access(self.root / "tmp", os.W_OK):
                return SiteHealth(False, "not writable", free)
            if free < self.min_free_bytes:
                return SiteHealth(False, f"full ({free} bytes free)", free)
            return SiteHealth(True, "ok", free)
        except OSError as e:
            return SiteHealth(False, f"I/O error: {e.strerror}")

    # -- objects -------------------------------------------------------------
    def _path(self, key: str) -> Path:
        # Keys come from tiers.layout; this is a second fence, not the first. The
        # same fence as S3's: a path would quietly normalise "a//b", "a/./b", "a/".
        if not key or not is_safe_key(key):
            raise BackendError("resolve", self.name, "key is not a safe object name")
        return self.root / key

    def local_path(self, key: str) -> Path:
        """Where the object under ``key`` is (to read it in place, never to write)."""
        return self._path(key)

    def _ensure_dir(self, d: Path) -> None:
        if d in self._known_dirs:
            return
        with self._dir_lock:
            missing = []
            p = d
            while not p.exists():
                missing.append(p)
                p = p.parent
            for m in reversed(missing):
                try:
                    m.mkdir()
                except FileExistsError:
                    pass
                _fsync_dir(m.parent)  # the new directory entry must survive a crash
            self._known_dirs.add(d)

    def _classify(self, op: str, e: OSError) -> BackendError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFull(op, self.name, e.strerror)
        return Unavailable(op, self.name, e.strerror or str(e))

    def put(self, key: str, payload: Payload, *, replace: bool = False) -> ObjectInfo:
        """Store durably and verified. Without ``replace`` an existing file under
        ``key`` is never overwritten: identical content is success (idempotent),
        different content raises ObjectExists."""
        final = self._path(key)
        if not (self.root / MARKER).is_file():
            raise Unavailable("put", self.name, f"{MARKER} missing")
        tmp = self.root / "tmp" / f"{secrets.token_hex(12)}.tmp"
        fd = -1
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)  # RDWR: verified by re-reading
            fcntl.flock(fd, fcntl.LOCK_EX)    # a sweep by another process leaves it alone
            written = 0
            with payload.open() as src:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        written += n
            if written != payload.size:
                raise BackendError("put", self.name, f"wrote {written} of {payload.size} bytes")
            os.fsync(fd)
            failpoints.hit("mirror.after_temp_write")
            actual = self._hash_fd(fd)
            if actual != payload.sha256:
                raise CopyCorrupt("put", self.name, key)
            # fd stays open (its flock held) until the temp name is gone: a sweep
            # must not take the file between here and the link.
            self._ensure_dir(final.parent)
            if replace:
                os.rename(tmp, final)
            else:
                try:
                    # link() fails if the name exists, unlike rename(): two writers
                    # racing on one key can never replace each other's copy.
                    os.link(tmp, final)
                except FileExistsError:
                    if self.sha256(key) != payload.sha256:
                        raise ObjectExists("put", self.name, key) from None
            _fsync_dir(final.parent)
            return ObjectInfo(key, written, actual)
        except OSError as e:
            raise self._classify("put", e) from None
        finally:
            if tmp.exists():
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if fd >= 0:
                os.close(fd)

    def _hash_fd(self, fd: int) -> str:
        if self.drop_cache:
            # Written pages are clean after fsync, so DONTNEED evicts them and the
            # read below comes from the device, not from what we just wrote to memory.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        offset = 0
        while True:
            chunk = os.pread(fd, CHUNK, offset)
            if not chunk:
                break
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()

    def verify(self, key: str, sha256: str, size: int, *, checksum: str | None = None,
               version_id: str | None = None) -> bool:
        """Read the file back (from the device with verify_read='device')."""
        return self.stat(key).size == size and self.sha256(key) == sha256

    def open(self, key: str, *, version_id: str | None = None) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound("open", self.name, key) from None
        except OSError as e:
            raise self._classify("open", e) from None

    def open_range(self, key: str, offset: int, length: int, *,
                   version_id: str | None = None) -> BinaryIO:
        """Exactly ``length`` bytes from ``offset`` (tiers.backend.RangedReader),
        streamed from the file: a range not wholly inside it is an error."""
        size = self.stat(key).size
        if offset < 0 or length < 0 or offset + length > size:
            raise BackendError("read", self.name, f"range {offset}+{length} outside {size} bytes")
        f = self.open(key)
        f.seek(offset)
        return LimitedReader(f, length, short_is_error=True)  # type: ignore[return-value]

    def sha256(self, key: str) -> str:
        """Hash a stored object (read from the device when verify_read='device')."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFound("read", self.name, key) from None
        except OSError as e:
            raise self._classify("read", e) from None
        try:
            return self._hash_fd(fd)
        finally:
            os.close(fd)

    def hash_each(self, keys: Iterable[str], *, ahead: int = 2
                  ) -> Iterator[tuple[int, str] | None | BackendError]:
        """(bytes read, SHA-256) of each object in turn; None where the file is gone,
        the BackendError where it cannot be read (yielded, not raised, so one bad
        file does not stop the rest). For the scrub: one open per file, no stat.

        Before a file is hashed, the reads of the next ``ahead`` files are started
        (posix_fadvise WILLNEED), so one thread keeps the disk and a core busy at
        once. With verify_read='device' each file's cached pages are dropped just
        before its read-ahead is started, so every byte hashed still comes from
        the device."""
        queued: deque[int | BackendError | None] = deque()
        todo = iter(keys)

        def start(key: str) -> int | BackendError | None:
            try:
                fd = os.open(self._path(key), os.O_RDONLY)
            except FileNotFoundError:
                return None
            except OSError as e:
                return self._classify("read", e)
            except BackendError as e:
                return e
            try:
                if self.drop_cache:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.posix_fadvise(fd, 0, READ_AHEAD, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass    # only a hint (some NFS clients refuse it); the read below decides
            return fd

        try:
            while True:
                while len(queued) <= ahead:
                    key = next(todo, None)
                    if key is None:
                        break
                    queued.append(start(key))
                if not queued:
                    return
                fd = queued.popleft()
                if not isinstance(fd, int):
                    yield fd
                    continue
                try:
                    h = hashlib.sha256()
                    offset = 0
                    # hashlib drops the GIL for large updates: other threads hash meanwhile.
                    while chunk := os.pread(fd, CHUNK, offset):
                        h.update(chunk)
                        offset += len(chunk)
                    got: tuple[int, str] | BackendError = (offset, h.hexdigest())
                except OSError as e:
                    got = self._classify("read", e)
                finally:
                    os.close(fd)
                yield got
        finally:
            for fd in queued:   # the caller stopped early: close what was opened ahead
                if isinstance(fd, int):
                    os.close(fd)

    def stat(self, key: str) -> ObjectInfo:
        try:
            return ObjectInfo(key, os.stat(self._path(key)).st_size)
        except FileNotFoundError:
            raise ObjectNotFound("stat", self.name, key) from None
        except OSError as e:
            raise self._classify("stat", e) from None

    def list(self, prefix: str = "objects/") -> Iterator[ObjectInfo]:
        base = str(self.root)
        start = self._path(prefix.rstrip("/")) if prefix else self.root
        if not start.exists():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            # Plain strings, not Path objects: a scrub lists every file of the site.
            rel = os.path.relpath(dirpath, base)
            rel = "" if rel == "." else rel + "/"
            for fn in sorted(filenames):
                if fn.endswith(".tmp"):
                    continue
                yield ObjectInfo(rel + fn, os.stat(os.path.join(dirpath, fn)).st_size)

    def delete_many(self, keys: list[str]) -> None:
        """Delete several objects, fsyncing each directory once (a study's files
        share a few directories); idempotent; raises on the first failure."""
        dirs: set[Path] = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._classify("delete", e) from None
            dirs.add(path.parent)
        try:
            for d in dirs:
                _fsync_dir(d)
        except OSError as e:
            raise self._classify("delete", e) from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
            _fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._classify("delete", e) from None

