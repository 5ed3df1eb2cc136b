"""The one storage contract every site and tier implements.

A Backend stores immutable objects under keys made by tiers.layout from
validated UIDs. Its obligations:

* ``put`` is durable on return: data and directory entry are on stable storage,
  and the stored bytes were read back and matched the expected SHA-256. On any
  failure nothing is visible under the key (temp names are never listed).
* ``open``/``stat`` raise ObjectNotFound for a missing key; a short read is an error.
* ``health`` never raises: it says whether the backend can take writes now.

This module imports nothing from the catalog or the DICOM stack: a reader of a
site must never need the catalog (the media describe themselves).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Protocol, runtime_checkable

from archive.errors import PacsvaultError


class BackendError(PacsvaultError):
    """{} failed on {}: {}"""

    retryable = False
    exit_code = 21


class Unavailable(BackendError):
    """{} failed on {}: unavailable: {}"""

    retryable = True


class StorageFull(BackendError):
    """{} failed on {}: storage full: {}"""


class ObjectNotFound(BackendError):
    """{} failed on {}: not found: {}"""


class ObjectExists(BackendError):
    """{} failed on {}: a different object already exists under {}"""


class ObjectLocked(BackendError):
    """{} failed on {}: object is under Object Lock retention: {}"""


class CopyCorrupt(BackendError):
    """{} failed on {}: read-back does not match the expected SHA-256: {}"""

    exit_code = 90


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # known when the backend just verified it
    version_id: str | None = None   # S3 versioned buckets: the version written
    checksum: str | None = None     # the server's own checksum of what it stored


@dataclass(frozen=True)
class SiteHealth:
    ok: bool
    reason: str
    free_bytes: int | None = None


class Payload(Protocol):
    """Bytes to store, openable once per destination (sites are written in parallel)."""

    size: int
    sha256: str

    def open(self) -> BinaryIO: ...


@runtime_checkable
class StreamingPayload(Protocol):
    """Optional ability of a Payload: ``streaming`` true means its size and SHA-256
    are known only once it was read to the end (tiers.growing)."""

    streaming: bool


@dataclass(frozen=True)
class FilePayload:
    """A Payload held in a local file (a spooled copy, a bundle, a decoded instance)."""

    path: Path
    size: int
    sha256: str

    def open(self) -> BinaryIO:
        return open(self.path, "rb")


class LimitedReader:
    """Reads at most ``n`` bytes of ``src``: one range of a file, one frame of a
    bundle read front to back. ``short_is_error``: a source that ends early raises."""

    def __init__(self, src: BinaryIO, n: int, *, short_is_error: bool = False) -> None:
        self.src, self.left, self.short_is_error = src, n, short_is_error

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        want = self.left if size is None or size < 0 else min(size, self.left)
        data = self.src.read(want)
        if not data and self.short_is_error:
            raise BackendError("read", "range", "source ends before the range does")
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> "LimitedReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(Protocol):
    name: str

    def put(self, key: str, payload: Payload, *, replace: bool = False) -> ObjectInfo: ...

    def open(self, key: str) -> BinaryIO: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: list[str]) -> None:
        """Delete several keys at once (idempotent); raises on the first failure."""
        ...

    def health(self) -> SiteHealth: ...

    def verify(self, key: str, sha256: str, size: int, *, checksum: str | None = None,
               version_id: str | None = None) -> bool:
        """Does the stored object hold exactly these bytes? Reads it back, or
        compares the server-computed ``checksum`` recorded at upload (S3).
        Raises ObjectNotFound when it is gone."""
        ...


@runtime_checkable
class RangedReader(Protocol):
    """Optional ability: read part of an object (a study bundle's one instance)."""

    def open_range(self, key: str, offset: int, length: int) -> BinaryIO:
        """Exactly ``length`` bytes from ``offset``; a range not wholly inside the
        object is an error (never a short read)."""
        ...


# Optional abilities: a caller tests them with isinstance. Each Protocol names one
# method only, so the check never touches anything else of the object.
@runtime_checkable
class TempSweeper(Protocol):
    """Optional ability: remove the temp files a crashed writer left (a directory site)."""

    def sweep_temp(self) -> int:
        """Removes them; returns how many."""
        ...


@runtime_checkable
class UploadSweeper(Protocol):
    """Optional ability: abort the multipart uploads a crash left (an object store)."""

    def sweep_uploads(self, older_than: timedelta = ...) -> int:
        """Aborts those started before ``older_than`` ago; returns how many."""
        ...


@runtime_checkable
class BulkHasher(Protocol):
    """Optional ability: (bytes read, SHA-256) of many objects in turn, faster than
    ``stat`` and ``sha256`` one by one (a directory site reads ahead)."""

    def hash_each(self, keys: Iterable[str], *, ahead: int = 2
                  ) -> Iterator[tuple[int, str] | None | BackendError]:
        """In the order of ``keys``: None where it is gone, the BackendError (yielded,
        not raised) where it cannot be read."""
        ...


@runtime_checkable
class LocalFile(Protocol):
    """What ``open`` returned may be a local file: its cached pages can be dropped,
    so a read-back comes from the device (an object store's stream raises on fileno)."""

    def fileno(self) -> int: ...
