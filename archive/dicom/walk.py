"""Check that a received data set is structurally complete.

pydicom reads only the attributes the catalog needs and stops before the pixel
data, so a data set cut short inside the pixel data (or any later element)
would parse fine and be acknowledged as a broken image forever. ``check_complete``
walks every element header (skipping values by their length, never loading
them) and requires that the elements tile the data set exactly: the last value
ends at the last byte. Sequences and encapsulated pixel data of undefined
length are followed item by item. Bounded: recursion depth and element counts
are limited so hostile nesting cannot exhaust the stack.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

from archive.errors import InvalidInput

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 32


class Truncated(InvalidInput):
    """data set is incomplete or malformed: {}"""


class _Walker:
    def __init__(self, f: BinaryIO, end: int, wanted: frozenset[int]) -> None:
        self.f = f
        self.end = end
        self.wanted = wanted
        self.found: dict[int, bytes] = {}

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise Truncated(f"ends inside an element header at offset {self.f.tell()}")
        return b

    def skip(self, n: int) -> None:
        pos = self.f.tell() + n
        if pos > self.end:
            raise Truncated(f"a value of {n} bytes runs past the end of the data set")
        self.f.seek(pos)

    def header(self, explicit: bool, little: bool) -> tuple[int, bytes | None, int]:
        e = "<" if little else ">"
        group, elem = struct.unpack(e + "HH", self.read(4))
        tag = (group << 16) | elem
        if group == 0xFFFE:  # item/delimiter tags never carry a VR
            return tag, None, struct.unpack(e + "I", self.read(4))[0]
        if not explicit:
            return tag, None, struct.unpack(e + "I", self.read(4))[0]
        vr = self.read(2)
        if vr in _LONG_VRS:
            self.read(2)
            return tag, vr, struct.unpack(e + "I", self.read(4))[0]
        return tag, vr, struct.unpack(e + "H", self.read(2))[0]

    def elements(self, explicit: bool, little: bool, depth: int, until_item_end: bool) -> None:
        if depth > _MAX_DEPTH:
            raise Truncated("sequences nested too deeply")
        while self.f.tell() < self.end:
            tag, vr, length = self.header(explicit, little)
            if tag == _ITEM_END:
                if until_item_end:
                    return
                raise Truncated("unexpected item delimiter")
            if length != _UNDEFINED:
                if depth == 0 and tag in self.wanted and length <= 1024:
                    # Top-level attributes the catalog needs are read on the way past.
                    if self.f.tell() + length > self.end:
                        raise Truncated("a value runs past the end of the data set")
                    self.found[tag] = self.read(length)
                else:
                    self.skip(length)
                continue
            if vr == b"UN":  # undefined-length UN holds implicit little endian (PS3.5 6.2.2)
                self.items(False, True, depth + 1)
            elif tag == 0x7FE00010 or vr in (b"OB", b"OW"):
                self.fragments(little)
            else:
                self.items(explicit, little, depth + 1)
        if until_item_end:
            raise Truncated("item of undefined length never ends")

    def items(self, explicit: bool, little: bool, depth: int) -> None:
        while True:
            tag, _, length = self.header(False, little)
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise Truncated("sequence holds something other than items")
            if length == _UNDEFINED:
                self.elements(explicit, little, depth, until_item_end=True)
            else:
                self.skip(length)

    def fragments(self, little: bool) -> None:
        while True:
            tag, _, length = self.header(False, little)
            if tag == _SEQ_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise Truncated("encapsulated pixel data is malformed")
            self.skip(length)


def check_complete(f: BinaryIO, offset: int, length: int, transfer_syntax: str,
                   wanted: frozenset[int] = frozenset()) -> dict[int, bytes] | None:
    """Raise Truncated unless the data set at ``offset`` is whole and well framed.

    Returns the raw values of the ``wanted`` top-level tags met on the way (tag as
    ``group << 16 | element``), or None for deflated syntaxes, which are not walked.
    """
    if transfer_syntax in DEFLATED:
        return None  # framing is checked by inflating when the attributes are read
    explicit = transfer_syntax != IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    try:
        return _walk(f, offset, length, explicit, little, wanted)
    except Truncated:
        if not explicit:
            raise
        # Some senders encode implicit VR under an explicit transfer syntax; pydicom
        # and the archive's readers tolerate it, so accept a data set that tiles
        # exactly as implicit VR. Truncation still fails both ways.
        return _walk(f, offset, length, False, little, wanted)


def _walk(f: BinaryIO, offset: int, length: int, explicit: bool, little: bool,
          wanted: frozenset[int]) -> dict[int, bytes]:
    f.seek(offset)
    w = _Walker(f, offset + length, wanted)
    w.elements(explicit, little, 0, until_item_end=False)
    if f.tell() != offset + length:
        raise Truncated("trailing bytes after the last element")
    return w.found
