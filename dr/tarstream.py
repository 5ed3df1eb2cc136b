"""A POSIX (pax) tar stream written in fixed-size records, never seeking back.

Every ``write`` to the sink is exactly ``block_size`` bytes (a tape drive in
fixed-block mode wants that); the last record is padded with zeros, as tar(1)
pads its last record. The SHA-256 and length of everything written are kept:
the stream hash that `dr verify` checks.
"""
from __future__ import annotations

import hashlib
import tarfile
import time
from typing import BinaryIO, Sequence

from dr.format import TAR_BLOCK


def member_header(name: str, size: int, mtime: float | None = None) -> bytes:
    """A pax-format header for a regular file (names here are short ASCII, so it is
    a plain ustar header, which every pax reader accepts)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime if mtime is not None else time.time())
    info.mode = 0o640
    info.type = tarfile.REGTYPE
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def padding(size: int) -> int:
    return (-size) % TAR_BLOCK


Data = bytes | bytearray | memoryview


def pieces(data: Data | Sequence[Data]) -> Sequence[Data]:
    """A member's data given whole or as the list of chunks it was made in."""
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else data


class RecordWriter:
    """Writes ``block_size`` records, hashing them as they go. Whole records are
    written straight from the caller's buffers; only a record that straddles two
    buffers is assembled in ``buf`` (at most one record is ever held)."""

    def __init__(self, sink: BinaryIO, block_size: int) -> None:
        self.sink = sink
        self.block_size = block_size
        self.buf = bytearray()
        self.n = 0                    # bytes accepted (the tar stream's offset)
        self.h = hashlib.sha256()

    def _record(self, rec: Data) -> None:
        self.h.update(rec)
        self.sink.write(rec)

    def write(self, data: Data) -> None:
        with memoryview(data) as view:
            self.n += len(view)
            if self.buf:
                take = self.block_size - len(self.buf)
                self.buf += view[:take]
                view = view[take:]
                if len(self.buf) < self.block_size:
                    return
                self._record(self.buf)
                self.buf.clear()
            whole = len(view) - len(view) % self.block_size
            for i in range(0, whole, self.block_size):
                self._record(view[i:i + self.block_size])
            self.buf += view[whole:]

    def member(self, name: str, data: Data | Sequence[Data], mtime: float | None = None) -> int:
        """Write one member (its data whole or as a list of chunks); returns the
        stream offset of its header."""
        parts = pieces(data)
        size = sum(len(p) for p in parts)
        at = self.n
        self.write(member_header(name, size, mtime))
        for p in parts:
            self.write(p)
        self.write(b"\0" * padding(size))
        return at

    def member_size(self, name: str, size: int) -> int:
        """Bytes a member of ``size`` data bytes takes in the stream."""
        return len(member_header(name, size, 0)) + size + padding(size)

    def close_archive(self) -> None:
        """Two zero blocks end the archive; the record is padded to a whole one."""
        self.write(b"\0" * (2 * TAR_BLOCK))
        tail = (-len(self.buf)) % self.block_size
        self.write(b"\0" * tail)
        assert not self.buf
        if hasattr(self.sink, "flush"):
            self.sink.flush()

    @property
    def sha256(self) -> str:
        return self.h.hexdigest()
