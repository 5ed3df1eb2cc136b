"""DICOM Upper Layer PDUs (PS3.8 section 9.3), sans-I/O.

Encoding and decoding only: bytes in, typed PDUs out, and back. Every length a
peer announces is checked against an explicit limit before anything is
allocated for it, so a header announcing 2 GB costs six bytes of buffer and a
``ProtocolError`` (which the caller answers with an A-ABORT).

Strings a peer sends (AE titles, UIDs, version names) are decoded as ASCII with
anything else replaced, so nothing raw reaches a log; whether a value is valid
(PS3.5) is the association's decision, not the codec's.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

# PDU types (PS3.8 Table 9-11 ff.)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07

# Item types
APPLICATION_CONTEXT = 0x10
PRESENTATION_CONTEXT_RQ, PRESENTATION_CONTEXT_AC = 0x20, 0x21
ABSTRACT_SYNTAX, TRANSFER_SYNTAX = 0x30, 0x40
USER_INFORMATION = 0x50
MAX_LENGTH, IMPLEMENTATION_CLASS_UID, ASYNC_OPS_WINDOW = 0x51, 0x52, 0x53
ROLE_SELECTION, IMPLEMENTATION_VERSION_NAME = 0x54, 0x55
SOP_EXTENDED_NEGOTIATION, SOP_COMMON_EXTENDED_NEGOTIATION = 0x56, 0x57
USER_IDENTITY_RQ, USER_IDENTITY_AC = 0x58, 0x59

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PROTOCOL_VERSION = 0x0001

# A-ABORT source and reason (PS3.8 Table 9-26)
ABORT_SOURCE_USER, ABORT_SOURCE_PROVIDER = 0, 2
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0, 1, 2
UNRECOGNIZED_PDU_PARAMETER, UNEXPECTED_PDU_PARAMETER, INVALID_PDU_PARAMETER_VALUE = 4, 5, 6

# Presentation context results (PS3.8 Table 9-18)
ACCEPTANCE, USER_REJECTION, NO_REASON = 0, 1, 2
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 3, 4

HEADER = struct.Struct(">BBI")            # type, reserved, length
MAX_ASSOCIATE_LENGTH = 64 * 1024          # no honest A-ASSOCIATE-RQ comes near it


class ProtocolError(Exception):
    """The peer broke PS3.8: answer with A-ABORT(source 2, ``reason``)."""

    def __init__(self, why: str, reason: int = INVALID_PDU_PARAMETER_VALUE) -> None:
        super().__init__(why)
        self.reason = reason


# -- the PDUs --------------------------------------------------------------------------
@dataclass(frozen=True)
class PresentationContextRQ:
    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class PresentationContextAC:
    id: int
    result: int
    transfer_syntax: str          # empty unless accepted


@dataclass(frozen=True)
class RoleSelection:
    sop_class: str
    scu: bool
    scp: bool


@dataclass(frozen=True)
class UserIdentityRQ:
    kind: int                     # 1 username, 2 +passcode, 3 Kerberos, 4 SAML, 5 JWT
    response_requested: bool
    primary: bytes
    secondary: bytes = b""


@dataclass(frozen=True)
class UserInformation:
    max_length: int | None = None                     # None: the item was absent
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    async_ops: tuple[int, int] | None = None          # (invoked, performed)
    roles: tuple[RoleSelection, ...] = ()
    extended: tuple[tuple[str, bytes], ...] = ()      # (SOP class, service class app info)
    common_extended: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    user_identity: UserIdentityRQ | None = None
    user_identity_response: bytes | None = None       # A-ASSOCIATE-AC only


@dataclass(frozen=True)
class AssociateRQ:
    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextRQ, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = DICOM_APPLICATION_CONTEXT
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class AssociateAC:
    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextAC, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = DICOM_APPLICATION_CONTEXT
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class AssociateRJ:
    result: int                   # 1 permanent, 2 transient
    source: int                   # 1 user, 2 provider (ACSE), 3 provider (presentation)
    reason: int


@dataclass(frozen=True)
class PDV:
    context_id: int
    is_command: bool
    is_last: bool
    data: bytes


@dataclass(frozen=True)
class PData:
    pdvs: tuple[PDV, ...]


@dataclass(frozen=True)
class ReleaseRQ:
    pass


@dataclass(frozen=True)
class ReleaseRP:
    pass


@dataclass(frozen=True)
class Abort:
    source: int
    reason: int


Pdu = Union[AssociateRQ, AssociateAC, AssociateRJ, PData, ReleaseRQ, ReleaseRP, Abort]


# -- encoding ----------------------------------------------------------------------------
def _text(value: str, what: str) -> bytes:
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be ASCII") from None


def _item(kind: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF:
        raise ValueError(f"item 0x{kind:02x} is longer than 65535 bytes")
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _ae(value: str) -> bytes:
    # An A-ASSOCIATE-AC echoes the request's titles, which may hold what the peer sent.
    raw = value.encode("ascii", "replace")
    if len(raw) > 16:
        raise ValueError("an AE title is at most 16 characters")
    return raw.ljust(16, b" ")


def _u16_prefixed(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def _user_items(u: UserInformation) -> bytes:
    out = []
    if u.max_length is not None:
        out.append(_item(MAX_LENGTH, struct.pack(">I", u.max_length)))
    if u.implementation_class_uid:
        out.append(_item(IMPLEMENTATION_CLASS_UID, _text(u.implementation_class_uid, "a UID")))
    if u.async_ops is not None:
        out.append(_item(ASYNC_OPS_WINDOW, struct.pack(">HH", *u.async_ops)))
    for r in u.roles:
        out.append(_item(ROLE_SELECTION, _u16_prefixed(_text(r.sop_class, "a UID"))
                         + bytes([int(r.scu), int(r.scp)])))
    if u.implementation_version_name:
        out.append(_item(IMPLEMENTATION_VERSION_NAME,
                         _text(u.implementation_version_name, "a version name")))
    for uid, info in u.extended:
        out.append(_item(SOP_EXTENDED_NEGOTIATION, _u16_prefixed(_text(uid, "a UID")) + info))
    for sop, service, related in u.common_extended:
        rel = b"".join(_u16_prefixed(_text(r, "a UID")) for r in related)
        out.append(_item(SOP_COMMON_EXTENDED_NEGOTIATION,
                         _u16_prefixed(_text(sop, "a UID")) + _u16_prefixed(_text(service, "a UID"))
                         + _u16_prefixed(rel)))
    if u.user_identity is not None:
        i = u.user_identity
        out.append(_item(USER_IDENTITY_RQ, bytes([i.kind, int(i.response_requested)])
                         + _u16_prefixed(i.primary) + _u16_prefixed(i.secondary)))
    if u.user_identity_response is not None:
        out.append(_item(USER_IDENTITY_AC, _u16_prefixed(u.user_identity_response)))
    return _item(USER_INFORMATION, b"".join(out))


def _pdu(kind: int, body: bytes) -> bytes:
    return HEADER.pack(kind, 0, len(body)) + body


def encode(pdu: Pdu) -> bytes:
    """The PDU's bytes on the wire."""
    if isinstance(pdu, (AssociateRQ, AssociateAC)):
        head = struct.pack(">HH", pdu.protocol_version, 0) + _ae(pdu.called_ae) \
            + _ae(pdu.calling_ae) + b"\x00" * 32
        items = [_item(APPLICATION_CONTEXT, _text(pdu.application_context, "a UID"))]
        for c in pdu.contexts:
            if isinstance(c, PresentationContextRQ):
                sub = _item(ABSTRACT_SYNTAX, _text(c.abstract_syntax, "a UID")) + b"".join(
                    _item(TRANSFER_SYNTAX, _text(t, "a UID")) for t in c.transfer_syntaxes)
                items.append(_item(PRESENTATION_CONTEXT_RQ, bytes([c.id, 0, 0, 0]) + sub))
            else:
                sub = _item(TRANSFER_SYNTAX, _text(c.transfer_syntax, "a UID"))
                items.append(_item(PRESENTATION_CONTEXT_AC, bytes([c.id, 0, c.result, 0]) + sub))
        items.append(_user_items(pdu.user))
        return _pdu(ASSOCIATE_RQ if isinstance(pdu, AssociateRQ) else ASSOCIATE_AC,
                    head + b"".join(items))
    if isinstance(pdu, AssociateRJ):
        return _pdu(ASSOCIATE_RJ, bytes([0, pdu.result, pdu.source, pdu.reason]))
    if isinstance(pdu, PData):
        return _pdu(P_DATA_TF, b"".join(encode_pdv(v) for v in pdu.pdvs))
    if isinstance(pdu, ReleaseRQ):
        return _pdu(RELEASE_RQ, b"\x00" * 4)
    if isinstance(pdu, ReleaseRP):
        return _pdu(RELEASE_RP, b"\x00" * 4)
    if isinstance(pdu, Abort):
        return _pdu(ABORT, bytes([0, 0, pdu.source, pdu.reason]))
    raise TypeError(f"not a PDU: {type(pdu).__name__}")


def encode_pdv(v: PDV) -> bytes:
    header = (1 if v.is_command else 0) | (2 if v.is_last else 0)
    return struct.pack(">IBB", len(v.data) + 2, v.context_id, header) + v.data


def p_data_header(pdv_lengths: list[int]) -> bytes:
    """The PDU header of a P-DATA-TF whose PDVs carry these many data bytes each
    (so a sender can write a large fragment without copying it into the PDU)."""
    return HEADER.pack(P_DATA_TF, 0, sum(n + 6 for n in pdv_lengths))


# -- decoding ----------------------------------------------------------------------------
def _ascii(raw: bytes | memoryview) -> str:
    return bytes(raw).decode("ascii", "replace")


def _uid(raw: bytes | memoryview) -> str:
    # PS3.8 says UIDs in items are not padded; some peers pad with NUL or space anyway.
    return _ascii(raw).rstrip("\x00 ")


def _items(body: memoryview, where: str) -> list[tuple[int, memoryview]]:
    out, i = [], 0
    while i < len(body):
        if len(body) - i < 4:
            raise ProtocolError(f"{where}: a truncated item header")
        kind, _, n = struct.unpack_from(">BBH", body, i)
        if i + 4 + n > len(body):
            raise ProtocolError(f"{where}: item 0x{kind:02x} runs past its PDU")
        out.append((kind, body[i + 4:i + 4 + n]))
        i += 4 + n
    return out


def _prefixed(body: memoryview, i: int, where: str) -> tuple[memoryview, int]:
    if i + 2 > len(body):
        raise ProtocolError(f"{where}: truncated")
    (n,) = struct.unpack_from(">H", body, i)
    if i + 2 + n > len(body):
        raise ProtocolError(f"{where}: a length runs past its item")
    return body[i + 2:i + 2 + n], i + 2 + n


def _user(body: memoryview) -> UserInformation:
    fields: dict = {"roles": [], "extended": [], "common_extended": []}
    for kind, v in _items(body, "user information"):
        if kind == MAX_LENGTH:
            if len(v) != 4:
                raise ProtocolError("maximum length item is not 4 bytes")
            fields["max_length"] = struct.unpack(">I", v)[0]
        elif kind == IMPLEMENTATION_CLASS_UID:
            fields["implementation_class_uid"] = _uid(v)
        elif kind == IMPLEMENTATION_VERSION_NAME:
            fields["implementation_version_name"] = _ascii(v).rstrip("\x00 ")
        elif kind == ASYNC_OPS_WINDOW:
            if len(v) != 4:
                raise ProtocolError("asynchronous operations window item is not 4 bytes")
            fields["async_ops"] = struct.unpack(">HH", v)
        elif kind == ROLE_SELECTION:
            uid, i = _prefixed(v, 0, "role selection")
            if len(v) != i + 2:
                raise ProtocolError("role selection item has the wrong length")
            fields["roles"].append(RoleSelection(_uid(uid), bool(v[i]), bool(v[i + 1])))
        elif kind == SOP_EXTENDED_NEGOTIATION:
            uid, i = _prefixed(v, 0, "extended negotiation")
            fields["extended"].append((_uid(uid), bytes(v[i:])))
        elif kind == SOP_COMMON_EXTENDED_NEGOTIATION:
            sop, i = _prefixed(v, 0, "common extended negotiation")
            service, i = _prefixed(v, i, "common extended negotiation")
            rel, i = _prefixed(v, i, "common extended negotiation")
            related, j = [], 0
            while j < len(rel):
                r, j = _prefixed(rel, j, "related general SOP classes")
                related.append(_uid(r))
            fields["common_extended"].append((_uid(sop), _uid(service), tuple(related)))
        elif kind == USER_IDENTITY_RQ:
            if len(v) < 2:
                raise ProtocolError("user identity item is truncated")
            primary, i = _prefixed(v, 2, "user identity")
            secondary, i = _prefixed(v, i, "user identity")
            fields["user_identity"] = UserIdentityRQ(v[0], bool(v[1]), bytes(primary),
                                                     bytes(secondary))
        elif kind == USER_IDENTITY_AC:
            resp, _ = _prefixed(v, 0, "user identity response")
            fields["user_identity_response"] = bytes(resp)
        # Other sub-items are skipped, as PS3.8 D.3.3 lets an acceptor do.
    for k in ("roles", "extended", "common_extended"):
        fields[k] = tuple(fields[k])
    return UserInformation(**fields)


def _associate(kind: int, body: memoryview) -> AssociateRQ | AssociateAC:
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE PDU shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    called, calling = _ascii(body[4:20]).strip(" "), _ascii(body[20:36]).strip(" ")
    app, user = None, None
    rq_contexts: list[PresentationContextRQ] = []
    ac_contexts: list[PresentationContextAC] = []
    for item, v in _items(body[68:], "A-ASSOCIATE"):
        if item == APPLICATION_CONTEXT:
            app = _uid(v)
        elif item == PRESENTATION_CONTEXT_RQ and kind == ASSOCIATE_RQ:
            if len(v) < 4:
                raise ProtocolError("presentation context item is truncated")
            abstract, transfers = None, []
            for sub, s in _items(v[4:], "presentation context"):
                if sub == ABSTRACT_SYNTAX:
                    abstract = _uid(s)
                elif sub == TRANSFER_SYNTAX:
                    transfers.append(_uid(s))
            if abstract is None or not transfers:
                raise ProtocolError("presentation context without abstract or transfer syntax")
            rq_contexts.append(PresentationContextRQ(v[0], abstract, tuple(transfers)))
        elif item == PRESENTATION_CONTEXT_AC and kind == ASSOCIATE_AC:
            if len(v) < 4:
                raise ProtocolError("presentation context item is truncated")
            ts = [_uid(s) for sub, s in _items(v[4:], "presentation context") if sub == TRANSFER_SYNTAX]
            ac_contexts.append(PresentationContextAC(v[0], v[2], ts[0] if ts else ""))
        elif item == USER_INFORMATION:
            user = _user(v)
        else:
            raise ProtocolError(f"unexpected item 0x{item:02x} in A-ASSOCIATE",
                                UNEXPECTED_PDU_PARAMETER)
    if app is None:
        raise ProtocolError("A-ASSOCIATE without an application context")
    if user is None:
        raise ProtocolError("A-ASSOCIATE without user information")
    if kind == ASSOCIATE_RQ:
        return AssociateRQ(called, calling, tuple(rq_contexts), user, app, version)
    return AssociateAC(called, calling, tuple(ac_contexts), user, app, version)


def _pdvs(body: memoryview) -> PData:
    out, i = [], 0
    while i < len(body):
        if len(body) - i < 6:
            raise ProtocolError("P-DATA-TF: a truncated PDV header")
        (n,) = struct.unpack_from(">I", body, i)
        if n < 2 or i + 4 + n > len(body):
            raise ProtocolError("P-DATA-TF: a PDV length runs past its PDU")
        ctx, header = body[i + 4], body[i + 5]
        if header & 0xFC:
            raise ProtocolError("P-DATA-TF: reserved bits set in a message control header")
        out.append(PDV(ctx, bool(header & 1), bool(header & 2), bytes(body[i + 6:i + 4 + n])))
        i += 4 + n
    if not out:
        raise ProtocolError("P-DATA-TF without a PDV")
    return PData(tuple(out))


def decode(kind: int, body: memoryview | bytes) -> Pdu:
    """One PDU from its type and body (the bytes after the 6-byte header)."""
    body = memoryview(body)
    if kind in (ASSOCIATE_RQ, ASSOCIATE_AC):
        return _associate(kind, body)
    if kind == P_DATA_TF:
        return _pdvs(body)
    if kind in (ASSOCIATE_RJ, RELEASE_RQ, RELEASE_RP, ABORT):
        if len(body) != 4:
            raise ProtocolError(f"PDU type 0x{kind:02x} must be 4 bytes long")
        if kind == ASSOCIATE_RJ:
            return AssociateRJ(body[1], body[2], body[3])
        if kind == ABORT:
            return Abort(body[2], body[3])
        return ReleaseRQ() if kind == RELEASE_RQ else ReleaseRP()
    raise ProtocolError(f"unrecognized PDU type 0x{kind:02x}", UNRECOGNIZED_PDU)


class PduDecoder:
    """Whole PDUs out of a byte stream, as the bytes arrive.

    ``max_pdu_length`` bounds a P-DATA-TF (the maximum length we announced);
    ``max_associate_length`` bounds an A-ASSOCIATE-RQ/AC. A header announcing
    more is refused at once: the buffer never holds more than one bounded PDU.
    """

    def __init__(self, *, max_pdu_length: int,
                 max_associate_length: int = MAX_ASSOCIATE_LENGTH) -> None:
        self.max_pdu_length = max_pdu_length
        self.max_associate_length = max_associate_length
        self._buf = bytearray()
        self._discarding = False

    def receive(self, data: bytes) -> None:
        if not self._discarding:
            self._buf += data

    def discard(self) -> None:
        """Drop what is buffered and whatever arrives from now on: after a PDU we refused,
        the stream has no framing left, and a peer streaming on must not fill memory."""
        self._buf.clear()
        self._discarding = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out (a partial PDU while reading)."""
        return len(self._buf)

    def limit_for(self, kind: int) -> int:
        if kind in (ASSOCIATE_RQ, ASSOCIATE_AC):
            return self.max_associate_length
        if kind == P_DATA_TF:
            return self.max_pdu_length
        if kind in (ASSOCIATE_RJ, RELEASE_RQ, RELEASE_RP, ABORT):
            return 4
        raise ProtocolError(f"unrecognized PDU type 0x{kind:02x}", UNRECOGNIZED_PDU)

    def next_pdu(self) -> Pdu | None:
        """The next whole PDU, or None until more bytes arrive."""
        if len(self._buf) < HEADER.size:
            return None
        kind, _, n = HEADER.unpack_from(self._buf, 0)
        if n > self.limit_for(kind):
            raise ProtocolError(f"PDU type 0x{kind:02x} announces {n} bytes, more than the "
                                f"{self.limit_for(kind)} allowed")
        if len(self._buf) < HEADER.size + n:
            return None
        body = bytes(self._buf[HEADER.size:HEADER.size + n])
        del self._buf[:HEADER.size + n]
        return decode(kind, body)
