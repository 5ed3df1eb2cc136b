"""A file being written while others read it: compress and upload at once.

A migration writes a study bundle to a local file and uploads it. Done one after
the other, the upload waits for the compression. ``GrowingFile`` lets the
upload (and the local frame check) read the bundle while it is being written:

* the writer calls ``publish(end, entry)`` after each finished instance frame:
  readers may read up to ``end``; a frame is published only once its source
  matched the catalog (the bundle writer may cut back an unpublished frame);
* the writer calls ``finish(size, sha256)`` after the manifest and trailer, or
  ``fail(exc)``; readers then see the end of the file, or the error;
* ``size`` and ``sha256`` block until ``finish``. A backend reads its payload to
  the end before it looks at them, so it gets them in time; an S3 multipart
  upload cannot be completed before the whole file was read and hashed, hence
  never before ``finish``.

It is a tiers.backend Payload (``size``, ``sha256``, ``open()``) with
``streaming = True``, which tells a backend that the size is not known up front.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator


class WriterFailed(RuntimeError):
    """The bundle writer failed; the partial file must not be stored."""


class GrowingFile:
    streaming = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._visible = 0
        self._entries: list[dict] = []
        self._final: tuple[int, str] | None = None
        self._error: BaseException | None = None

    # -- writer side ------------------------------------------------------------
    def publish(self, end: int, entry: dict | None = None) -> None:
        with self._cond:
            self._visible = end
            if entry is not None:
                self._entries.append(entry)
            self._cond.notify_all()

    def finish(self, size: int, sha256: str) -> None:
        with self._cond:
            self._visible = size
            self._final = (size, sha256)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    # -- reader side ------------------------------------------------------------
    def _wait(self, pred) -> None:  # noqa: ANN001
        with self._cond:
            while not pred():
                if self._error is not None:
                    raise WriterFailed(f"bundle writer failed: {self._error}")
                self._cond.wait()
            if self._error is not None:
                raise WriterFailed(f"bundle writer failed: {self._error}")

    @property
    def size(self) -> int:
        self._wait(lambda: self._final is not None)
        return self._final[0]  # type: ignore[index]

    @property
    def sha256(self) -> str:
        self._wait(lambda: self._final is not None)
        return self._final[1]  # type: ignore[index]

    def entries(self) -> Iterator[dict]:
        """Each published frame's manifest entry, in order, as they come."""
        i = 0
        while True:
            self._wait(lambda: len(self._entries) > i or self._final is not None)
            with self._cond:
                if i >= len(self._entries):
                    return
                entry = self._entries[i]
            yield entry
            i += 1

    def open(self) -> "_Reader":
        return _Reader(self)


class _Reader:
    """Reads what is published; blocks at the published end until more comes."""

    def __init__(self, g: GrowingFile) -> None:
        self._g = g
        self._fd = os.open(g.path, os.O_RDONLY)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        g = self._g
        g._wait(lambda: g._visible > self._pos or g._final is not None)
        with g._cond:
            end = g._visible
        if self._pos >= end:
            return b""
        want = end - self._pos if n is None or n < 0 else min(n, end - self._pos)
        data = os.pread(self._fd, want, self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
