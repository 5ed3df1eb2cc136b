"""DIMSE messages (PS3.7 section 9 and annex E), sans-I/O.

A command set is group 0000 in Implicit VR Little Endian. ``decode_command``
reads one within a size limit into a ``Command`` (the fields every DIMSE
service uses, C-ECHO to C-GET); ``encode_command`` writes one back. A
``MessageAssembler`` takes the PDVs of P-DATA-TF PDUs and hands out a whole
command, then the data set's fragments as they arrive, so the caller decides
where a large data set goes (memory, spool) and nothing here buffers it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Union

from archive.dicom.net.pdu import PDV, ProtocolError

# Command Field values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF

NO_DATA_SET = 0x0101            # Command Data Set Type: no data set follows
DATA_SET_PRESENT = 0x0000       # any other value says one follows; we send this one

MAX_COMMAND_LENGTH = 64 * 1024  # a command set is a few hundred bytes


@dataclass(frozen=True)
class Command:
    """One DIMSE command set. Absent elements are None."""
    command_field: int
    message_id: int | None = None
    message_id_responded_to: int | None = None
    affected_sop_class: str | None = None
    requested_sop_class: str | None = None
    affected_sop_instance: str | None = None
    requested_sop_instance: str | None = None
    priority: int | None = None
    data_set_type: int = NO_DATA_SET
    status: int | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    move_destination: str | None = None
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None

    @property
    def has_data_set(self) -> bool:
        return self.data_set_type != NO_DATA_SET

    @property
    def is_request(self) -> bool:
        return not self.command_field & 0x8000


# tag -> (field, VR) in ascending tag order, as a command set must be written
_ELEMENTS: dict[int, tuple[str, str]] = {
    0x00000002: ("affected_sop_class", "UI"),
    0x00000003: ("requested_sop_class", "UI"),
    0x00000100: ("command_field", "US"),
    0x00000110: ("message_id", "US"),
    0x00000120: ("message_id_responded_to", "US"),
    0x00000600: ("move_destination", "AE"),
    0x00000700: ("priority", "US"),
    0x00000800: ("data_set_type", "US"),
    0x00000900: ("status", "US"),
    0x00000901: ("offending_element", "AT"),
    0x00000902: ("error_comment", "LO"),
    0x00000903: ("error_id", "US"),
    0x00001000: ("affected_sop_instance", "UI"),
    0x00001001: ("requested_sop_instance", "UI"),
    0x00001020: ("remaining", "US"),
    0x00001021: ("completed", "US"),
    0x00001022: ("failed", "US"),
    0x00001023: ("warning", "US"),
    0x00001030: ("move_originator_ae", "AE"),
    0x00001031: ("move_originator_message_id", "US"),
}
_ELEMENT = struct.Struct("<HHI")


def _value(vr: str, value: object) -> bytes:
    if vr == "US":
        return struct.pack("<H", value)
    if vr == "AT":
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in value)  # type: ignore[union-attr]
    raw = str(value).encode("ascii")
    pad = b"\x00" if vr == "UI" else b" "
    return raw + pad if len(raw) % 2 else raw


def encode_command(cmd: Command) -> bytes:
    """The command set's bytes, group length first."""
    body = []
    for tag, (name, vr) in _ELEMENTS.items():
        value = getattr(cmd, name)
        if value is None:
            continue
        raw = _value(vr, value)
        body.append(_ELEMENT.pack(0, tag & 0xFFFF, len(raw)) + raw)
    rest = b"".join(body)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(rest)) + rest


def decode_command(data: bytes | memoryview, *, limit: int = MAX_COMMAND_LENGTH) -> Command:
    """A Command from a whole command set; anything else is a ``ProtocolError``.
    Elements we do not know are skipped (PS3.7 lets later editions add some)."""
    if len(data) > limit:
        raise ProtocolError(f"a command set of {len(data)} bytes is longer than {limit}")
    data = memoryview(data)
    values: dict[str, object] = {}
    i, last = 0, -1
    while i < len(data):
        if len(data) - i < 8:
            raise ProtocolError("command set: a truncated element header")
        group, elem, n = _ELEMENT.unpack_from(data, i)
        tag = (group << 16) | elem
        if group != 0:
            raise ProtocolError("command set: an element outside group 0000")
        if tag <= last:
            raise ProtocolError("command set: elements out of order or repeated")
        last = tag
        if i + 8 + n > len(data):
            raise ProtocolError("command set: an element runs past its end")
        raw = data[i + 8:i + 8 + n]
        i += 8 + n
        if tag not in _ELEMENTS:
            continue
        name, vr = _ELEMENTS[tag]
        if vr == "US":
            if n != 2:
                raise ProtocolError("command set: a US element is not 2 bytes")
            values[name] = struct.unpack("<H", raw)[0]
        elif vr == "AT":
            if n % 4:
                raise ProtocolError("command set: an AT element is not a multiple of 4 bytes")
            values[name] = tuple((g << 16) | e for g, e in struct.iter_unpack("<HH", raw))
        else:
            values[name] = bytes(raw).decode("ascii", "replace").rstrip("\x00 ").lstrip(" ") \
                if vr != "LO" else bytes(raw).decode("ascii", "replace").strip(" \x00")
    if "command_field" not in values:
        raise ProtocolError("command set without a Command Field")
    if "data_set_type" not in values:
        raise ProtocolError("command set without a Command Data Set Type")
    return Command(**values)  # type: ignore[arg-type]


# -- assembling messages from PDVs -------------------------------------------------------
@dataclass(frozen=True)
class CommandReceived:
    context_id: int
    command: Command


@dataclass(frozen=True)
class DataFragment:
    context_id: int
    data: bytes
    is_last: bool


Event = Union[CommandReceived, DataFragment]


class MessageAssembler:
    """PDVs in, DIMSE events out: ``CommandReceived`` once a command set is whole,
    then ``DataFragment``s of its data set, if it has one. Enforces PS3.8 annex E:
    a message's fragments share one presentation context, the command comes
    first and whole, and no data arrives for a command without a data set."""

    def __init__(self, *, max_command_length: int = MAX_COMMAND_LENGTH) -> None:
        self.max_command_length = max_command_length
        self._command = bytearray()
        self._context: int | None = None
        self._data_expected = False

    @property
    def idle(self) -> bool:
        """Between messages (nothing half-received)."""
        return self._context is None

    def feed(self, pdvs: tuple[PDV, ...] | list[PDV]) -> Iterator[Event]:
        for v in pdvs:
            if self._context is not None and v.context_id != self._context:
                raise ProtocolError("a message's fragments arrived on two presentation contexts")
            if v.is_command:
                if self._data_expected:
                    raise ProtocolError("a command fragment arrived inside a data set")
                self._context = v.context_id
                self._command += v.data
                if len(self._command) > self.max_command_length:
                    raise ProtocolError("a command set longer than the limit")
                if v.is_last:
                    cmd = decode_command(bytes(self._command), limit=self.max_command_length)
                    self._command.clear()
                    self._data_expected = cmd.has_data_set
                    if not self._data_expected:
                        self._context = None
                    yield CommandReceived(v.context_id, cmd)
            else:
                if not self._data_expected:
                    raise ProtocolError("data set fragment without a command that announced it")
                if v.is_last:
                    self._data_expected = False
                    self._context = None
                yield DataFragment(v.context_id, v.data, v.is_last)


def fragments(context_id: int, data: bytes | memoryview, *, is_command: bool,
              max_pdu_length: int) -> Iterator[PDV]:
    """``data`` as PDVs that each fit one P-DATA-TF of at most ``max_pdu_length``
    bytes (the peer's maximum; 0 means no limit). One PDV per PDU, as dcmtk does."""
    room = (max_pdu_length - 6) if max_pdu_length else len(data) or 1
    if room < 1:
        raise ValueError("a maximum PDU length below 7 bytes cannot carry data")
    view = memoryview(data)
    if not len(view):
        yield PDV(context_id, is_command, True, b"")
        return
    for i in range(0, len(view), room):
        chunk = view[i:i + room]
        yield PDV(context_id, is_command, i + room >= len(view), bytes(chunk))
