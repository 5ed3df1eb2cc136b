"""C-FIND identifiers (PS3.4 C.4.1.1.3): the request's data set to plain text keys,
and each match back to a data set, in the presentation context's transfer syntax.

An identifier is small (a few hundred bytes); one over ``MAX_IDENTIFIER_BYTES``,
one that does not parse, or one whose deflated form inflates past that limit is
refused as a whole (``IdentifierUnreadable``). Values come out as the text PS3.4
matches on: several values joined by ``\\``, person names with their ``^`` and
``=``, decoded with the request's Specific Character Set. Errors never carry a
value: identifiers hold patient data.
"""
from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue

from archive.dicom.walk import Truncated, check_complete
from archive.errors import InvalidInput

MAX_IDENTIFIER_BYTES = 64 * 1024
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
# The transfer syntaxes a query or retrieve context is accepted in: an identifier
# has no pixel data, so an encapsulated syntax would only mean explicit VR LE.
COMMAND_TRANSFER_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE, EXPLICIT_BE)
UTF8 = "ISO_IR 192"
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
             "UC", "UI", "UR", "UT"}


class IdentifierUnreadable(InvalidInput):
    """identifier cannot be read: {}"""


@dataclass
class Identifier:
    level: str                                  # QueryRetrieveLevel as sent ("" if absent)
    keys: dict[str, str] = field(default_factory=dict)   # keyword -> text ("" = return it)
    ignored: list[str] = field(default_factory=list)     # sequences, binary, private tags
    character_set: tuple[str, ...] = ()         # the request's Specific Character Set


def _encoding(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian)."""
    if transfer_syntax == IMPLICIT_LE:
        return True, True
    if transfer_syntax == EXPLICIT_BE:
        return False, False
    return False, True


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_IDENTIFIER_BYTES + 1)
    except zlib.error:
        raise IdentifierUnreadable("the deflated data set is corrupt") from None
    if len(out) > MAX_IDENTIFIER_BYTES or d.unconsumed_tail:
        raise IdentifierUnreadable(f"it inflates past {MAX_IDENTIFIER_BYTES} bytes")
    return out


def decode(data: bytes, transfer_syntax: str) -> Identifier:
    """The identifier of a C-FIND (or C-MOVE, C-GET) request."""
    if len(data) > MAX_IDENTIFIER_BYTES:
        raise IdentifierUnreadable(f"longer than {MAX_IDENTIFIER_BYTES} bytes")
    if transfer_syntax == DEFLATED_LE:
        data = _inflate(data)
    # Whole and well framed first (pydicom would quietly read a truncated one), with
    # nesting bounded: the same walk a C-STORE's data set gets.
    try:
        # Orthanc puts (0002,0002/0003) beside SOP Class/Instance UID keys: set aside below.
        check_complete(io.BytesIO(data), 0, len(data),
                       EXPLICIT_LE if transfer_syntax == DEFLATED_LE else transfer_syntax,
                       meta_allowed=True)
    except Truncated as e:
        raise IdentifierUnreadable(e.args[0] if e.args else "malformed") from None
    implicit, little = _encoding(transfer_syntax)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # pydicom warns about odd values; we check
            ds = read_dataset(io.BytesIO(data), implicit, little)
            charset = ds.get("SpecificCharacterSet", "")
            ds.decode()
            out = Identifier(level=str(ds.get("QueryRetrieveLevel", "") or "").strip())
            for elem in ds:
                _take(out, elem)
    except IdentifierUnreadable:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of peer bytes is the peer's
        raise IdentifierUnreadable(type(e).__name__) from None
    if isinstance(charset, (list, MultiValue)):
        out.character_set = tuple(str(c) for c in charset)
    elif charset:
        out.character_set = (str(charset),)
    return out


def _take(out: Identifier, elem) -> None:  # noqa: ANN001 - a pydicom DataElement
    if elem.tag.is_private or elem.tag.group in (0x0000, 0x0002) or elem.tag.element == 0:
        return
    keyword = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
    if keyword in ("SpecificCharacterSet", "QueryRetrieveLevel"):
        return
    if elem.VR not in _TEXT_VRS or not elem.keyword:
        out.ignored.append(keyword)         # sequences, binary values, unknown tags
        return
    out.keys[keyword] = _text(elem.value)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


def encode(keys: dict[str, str], level: str, transfer_syntax: str, *,
           character_set: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> bytes:
    """One C-FIND response identifier. Text goes out in the request's character set
    when it can carry it, otherwise as UTF-8 (ISO_IR 192), which is then declared."""
    values = dict(keys)
    values.update(extra or {})
    ascii_only = all(v.isascii() for v in values.values())
    if ascii_only:
        charsets: tuple[str, ...] = character_set
    elif character_set and _encodable(values, character_set):
        charsets = character_set
    else:
        charsets = (UTF8,)
    ds = Dataset()
    if charsets:
        ds.SpecificCharacterSet = list(charsets) if len(charsets) > 1 else charsets[0]
    if level:
        ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        ds.add_new(tag, vr, _typed(vr, value))
    implicit, little = _encoding(transfer_syntax)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, little
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(buf, ds)
    raw = buf.getvalue()
    if transfer_syntax == DEFLATED_LE:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
        raw += b"\x00" * (len(raw) % 2)
    return raw


def _typed(vr: str, value: str) -> object:
    if not value:
        return None
    if "\\" in value and vr not in ("LT", "ST", "UT"):
        return value.split("\\")
    return value


def _encodable(values: dict[str, str], character_set: tuple[str, ...]) -> bool:
    from pydicom.charset import convert_encodings, encode_string
    try:
        encodings = convert_encodings(list(character_set))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for v in values.values():
                encode_string(v, encodings)
    except Exception:  # noqa: BLE001 - not representable: answer in UTF-8
        return False
    return True
