"""DICOM Part 10 files as pacsvault stores them.

A stored instance is: 128 zero bytes, ``DICM``, a File Meta Information group
that pacsvault writes itself, then the data set bytes exactly as received on
the network (never decoded and re-encoded). The meta group is deterministic -
it depends only on the SOP Class, SOP Instance and Transfer Syntax UIDs - so
the same object received twice, from any peer, hashes the same, and the
SHA-256 of the whole file identifies its content.
"""
from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from archive.errors import InvalidInput

# pacsvault's implementation class UID (2.25 + a fixed random UUID, PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.255430151412869380232305916870357924631"
# Tied to the site layout version, not the software version, so that upgrading
# pacsvault does not make a re-sent object look different.
IMPLEMENTATION_VERSION = "PACSVAULT_1"
PREAMBLE = b"\x00" * 128 + b"DICM"


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _short(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, DICM and the File Meta group (explicit VR little endian)."""
    version = IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = (
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
        + _short(0x0002, b"UI", _ui(sop_class))
        + _short(0x0003, b"UI", _ui(sop_instance))
        + _short(0x0010, b"UI", _ui(transfer_syntax))
        + _short(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
        + _short(0x0013, b"SH", version)
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return PREAMBLE + group_length + body


MAX_META_BYTES = 16 * 1024
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


@dataclass(frozen=True)
class SentMeta:
    """What a Part 10 file sent by a client (STOW-RS) says about itself."""
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset_offset: int


def read_sent_meta(head: bytes, final: bool = False) -> SentMeta | None:
    """Read the File Meta group at the start of ``head`` (explicit VR little endian,
    with or without a group length: clients differ). None: more bytes are needed
    (``final``: there are none, so the file is cut short). Raises InvalidInput for
    anything else; the message names the element, never a value."""
    if len(head) < 132:
        if final:
            raise InvalidInput("not a DICOM Part 10 file (too short)")
        return None
    if head[128:132] != b"DICM":
        raise InvalidInput("not a DICOM Part 10 file (no DICM prefix)")
    pos, values = 132, {}
    while True:
        if pos > MAX_META_BYTES:
            raise InvalidInput(f"file meta longer than {MAX_META_BYTES} bytes")
        if len(head) < pos + 8:
            if final and len(head) > pos:
                raise InvalidInput("file meta cut short")
            if final:
                break
            return None
        group, elem, vr = struct.unpack_from("<HH2s", head, pos)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return None if not final else _cut()
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if length > MAX_META_BYTES:
            raise InvalidInput(f"file meta element (0002,{elem:04X}) too long")
        if len(head) < start + length:
            return None if not final else _cut()
        if elem in (0x0002, 0x0003, 0x0010):
            try:
                values[elem] = head[start:start + length].rstrip(b"\x00 ").decode("ascii")
            except UnicodeDecodeError:
                raise InvalidInput(f"file meta element (0002,{elem:04X}) is not text") from None
        pos = start + length
    missing = [name for e, name in ((0x0002, "MediaStorageSOPClassUID"),
                                     (0x0003, "MediaStorageSOPInstanceUID"),
                                     (0x0010, "TransferSyntaxUID")) if not values.get(e)]
    if missing:
        raise InvalidInput("file meta lacks " + ", ".join(missing))
    return SentMeta(values[0x0002], values[0x0003], values[0x0010], pos)


def _cut() -> None:
    raise InvalidInput("file meta cut short")


def dataset_offset(f: BinaryIO) -> int:
    """Offset of the data set in a Part 10 file whose meta carries a group length."""
    f.seek(0)
    head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM":
        raise InvalidInput("not a DICOM Part 10 file")
    group, elem, vr, _length, value = struct.unpack("<HH2sHI", head[132:144])
    if (group, elem, vr) != (0x0002, 0x0000, b"UL"):
        raise InvalidInput("file meta lacks a group length")
    return 144 + value


@dataclass
class SpooledObject:
    """A received data set in a spool file plus the meta pacsvault will store with it.

    ``open()`` gives a fresh reader of the full Part 10 bytes, once per site.
    """

    spool: Path
    offset: int
    length: int
    meta: bytes
    sha256: str = ""

    @property
    def size(self) -> int:
        return len(self.meta) + self.length

    def compute_sha256(self, f: BinaryIO | None = None) -> str:
        """Hash meta + data set; ``f`` is an already open handle on the spool file."""
        h = hashlib.sha256(self.meta)
        own = f is None
        f = open(self.spool, "rb") if f is None else f
        try:
            f.seek(self.offset)
            remaining = self.length
            while remaining:
                chunk = f.read(min(remaining, 4 * 1024 * 1024))
                if not chunk:
                    raise InvalidInput("spool file shrank while hashing")
                h.update(chunk)
                remaining -= len(chunk)
        finally:
            if own:
                f.close()
        self.sha256 = h.hexdigest()
        return self.sha256

    def open(self) -> BinaryIO:
        return _MetaThenRegion(self.meta, self.spool, self.offset, self.length)


class InMemoryObject:
    """A small received data set held in memory (no spool file) plus the meta
    pacsvault will store with it: the same interface as SpooledObject."""

    def __init__(self, meta: bytes, dataset: bytes | memoryview) -> None:
        self.meta = meta
        self.length = len(dataset)
        # Built once: every site's reader shares it (BytesIO over bytes does not copy).
        self.image = meta + dataset
        self.sha256 = ""

    @property
    def size(self) -> int:
        return len(self.image)

    def compute_sha256(self, f: BinaryIO | None = None) -> str:
        self.sha256 = hashlib.sha256(self.image).hexdigest()
        return self.sha256

    def open(self) -> BinaryIO:
        return io.BytesIO(self.image)


class _MetaThenRegion(io.RawIOBase):
    """Reads ``meta`` and then ``length`` bytes of ``path`` from ``offset``."""

    def __init__(self, meta: bytes, path: Path, offset: int, length: int) -> None:
        self._meta = memoryview(meta)
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = length

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = len(self._meta) + self._left
        if self._meta:
            out = bytes(self._meta[:n])
            self._meta = self._meta[len(out):]
            if len(out) < n and self._left:
                more = self._f.read(min(n - len(out), self._left))
                self._left -= len(more)
                out += more
            return out
        if not self._left:
            return b""
        data = self._f.read(min(n, self._left))
        if not data:
            raise InvalidInput("spool file shorter than announced")
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()
