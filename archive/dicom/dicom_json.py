"""The DICOM JSON model (PS3.18 F.2) for QIDO-RS and WADO-RS answers, and the
QIDO-RS query parameters (PS3.18 10.6.1) read into C-FIND terms.

Sans-I/O: functions from catalog matches, pydicom data sets and already split
query parameters to plain dicts and dataclasses, so the HTTP edge only moves
bytes and the tests need no server. A query becomes the same keyword -> text
keys a C-FIND identifier gives, so both edges share one catalog query. Errors
name the attribute or parameter, never its value: values are patient data.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.filewriter import correct_ambiguous_vr_element

from archive.errors import InvalidInput

MAX_PARAMETERS = 64
MAX_VALUE_CHARS = 1024

# Keywords older pydicom dictionaries lack: keyword -> (tag, VR).
_EXTRA_KEYWORDS = {"RetrieveURL": (0x00081190, "UR")}
_STRING_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI",
               "UR", "UT"}
_SINGLE_VALUED_VRS = {"LT", "ST", "UT", "UR"}      # a backslash is text, not a separator
_INT_VRS = {"IS", "US", "UL", "SS", "SL", "SV", "UV"}
_FLOAT_VRS = {"DS", "FL", "FD"}
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PIXEL_DATA = 0x7FE00010
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")


class QueryParamError(InvalidInput):
    """bad query parameter: {}"""


def _lookup(keyword: str) -> tuple[int, str] | None:
    """(tag, VR) of a keyword; None when pydicom does not know it."""
    if not _KEYWORD.fullmatch(keyword):
        return None                     # pydicom would take "00100010" or "" as well
    tag = tag_for_keyword(keyword)
    if tag is None:
        return _EXTRA_KEYWORDS.get(keyword)
    return tag, dictionary_VR(tag)


# ---------------------------------------------------------------- catalog match -> JSON


def match_to_json(match: Mapping[str, str]) -> dict:
    """One QIDO-RS result object from a catalog match (keyword -> text as in a
    data set: values joined by ``\\``, person names with ``^`` and ``=``).
    Keywords pydicom does not know, and sequence or binary attributes (which
    have no text form), are left out."""
    out: dict[int, dict] = {}
    for keyword, text in match.items():
        found = _lookup(keyword)
        if found is None:
            continue
        tag, vr = found
        element = _element(keyword, vr, text or "")
        if element is not None:
            out[tag] = element
    return {f"{tag:08X}": out[tag] for tag in sorted(out)}


def _element(keyword: str, vr: str, text: str) -> dict | None:
    if vr == "US or SS":
        values = _values(keyword, "SS", text)
        vr = "SS" if any(v is not None and v < 0 for v in values) else "US"
    elif vr in _STRING_VRS or vr in _INT_VRS or vr in _FLOAT_VRS or vr == "PN":
        values = _values(keyword, vr, text)
    else:
        return None                     # SQ, AT, binary: no text form to give
    if not values:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _values(keyword: str, vr: str, text: str) -> list:
    if text == "":
        return []
    parts = [text] if vr in _SINGLE_VALUED_VRS else text.split("\\")
    if len(parts) > 1 and all(p == "" for p in parts):
        return []
    return [_value(keyword, vr, p) for p in parts]


def _value(keyword: str, vr: str, text: str) -> Any:
    if vr == "PN":
        if text.count("=") > 2:
            raise InvalidInput(f"{keyword} has a person name with more than three groups")
        groups = {name: g for name, g in zip(_PN_GROUPS, text.split("=")) if g}
        return groups or None
    if vr in _INT_VRS:
        stripped = text.strip()
        if stripped == "":
            return None
        try:
            return int(stripped)
        except ValueError:
            raise InvalidInput(f"{keyword} has a value that is not an integer ({vr})") from None
    if vr in _FLOAT_VRS:
        stripped = text.strip()
        if stripped == "":
            return None
        try:
            number = float(stripped)
        except ValueError:
            raise InvalidInput(f"{keyword} has a value that is not a number ({vr})") from None
        if not math.isfinite(number):
            raise InvalidInput(f"{keyword} has a value JSON cannot carry (not finite)")
        return int(number) if vr == "DS" and number.is_integer() else number
    return None if text == "" else text


# ---------------------------------------------------------------- data set -> JSON


def dataset_to_json(ds: pydicom.Dataset, bulk_data_uri: Callable[[str], str] | None = None,
                    threshold: int = 1024) -> dict:
    """A data set in the DICOM JSON model, for WADO-RS metadata. Bulk data (an
    OB, OD, OF, OL, OV, OW or UN value, or Pixel Data in any VR, longer than
    ``threshold`` bytes) is never inlined: it is given as a ``BulkDataURI`` made
    by ``bulk_data_uri`` when there is one, otherwise left out. The callable gets
    the element's tag as 8 upper-case hex digits; for an element inside a
    sequence, the path to it: ``"SSSSSSSS/<item index>/TTTTTTTT"``.

    Elements go through pydicom's ``DataElement.to_json_dict``; the walk is ours
    because ``Dataset.to_json_dict`` inlines bulk data when no handler is given,
    measures its threshold in base64 characters and hands its handler no path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about odd values quote them
        return _dataset(ds, bulk_data_uri, threshold, "", [])


def _dataset(ds: pydicom.Dataset, uri: Callable[[str], str] | None, threshold: int,
             path: str, ancestors: list[pydicom.Dataset]) -> dict:
    ancestors = [ds, *ancestors]
    out: dict[str, dict] = {}
    for tag in sorted(ds.keys()):
        key = f"{tag:08X}"
        try:
            elem = ds[tag]
            if " or " in elem.VR:
                elem = _resolved(elem, ds, ancestors)
            if elem.VR == "SQ":
                items = [_dataset(item, uri, threshold, f"{path}{key}/{i}/", ancestors)
                         for i, item in enumerate(elem.value or ())]
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            elif (elem.VR in _BULK_VRS or tag == _PIXEL_DATA) and _length(elem) > threshold:
                if uri is not None:
                    out[key] = {"vr": _bulk_vr(elem.VR), "BulkDataURI": uri(path + key)}
            else:
                out[key] = elem.to_json_dict(None, threshold)
        except InvalidInput:
            raise
        except Exception as e:  # noqa: BLE001 - pydicom's messages may quote the value
            raise InvalidInput(f"element {path}{key} cannot be given in DICOM JSON "
                               f"({type(e).__name__})") from None
    return out


def _resolved(elem: Any, ds: pydicom.Dataset, ancestors: list[pydicom.Dataset]) -> Any:
    """The element with its VR settled ("US or SS" by Pixel Representation, "OB
    or OW" by encoding), on a copy: the caller's data set is left as it was."""
    copy = pydicom.DataElement(elem.tag, elem.VR, elem.value,
                               is_undefined_length=elem.is_undefined_length)
    try:
        return correct_ambiguous_vr_element(copy, ds, True, ancestors)
    except Exception:  # noqa: BLE001 - what it needs (BitsAllocated...) is missing
        if elem.VR == "US or SS":
            raise
        copy.VR = "OW"                  # the binary reading of the others
        return copy


def _length(elem: Any) -> int:
    value = elem.value
    return len(value) if isinstance(value, (bytes, bytearray, memoryview, str)) else 0


def _bulk_vr(vr: str) -> str:
    return vr if vr in _BULK_VRS else "OW" if " or " in vr else vr


# ---------------------------------------------------------------- QIDO-RS parameters


@dataclass
class QidoQuery:
    keys: dict[str, str] = field(default_factory=dict)   # keyword -> C-FIND matching text
    include: list[str] = field(default_factory=list)     # keywords asked back (includefield)
    include_all: bool = False                            # includefield=all
    fuzzy: bool = False                                  # fuzzymatching=true
    limit: int | None = None
    offset: int = 0


_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_DIGITS = re.compile(r"[0-9]+")
_MATCHABLE_VRS = _STRING_VRS | _INT_VRS | _FLOAT_VRS | {"PN", "US or SS"}


def _named(name: str) -> str:
    """A parameter name fit for an error message: a name, never a value."""
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


def _attribute(name: str, parameter: str) -> tuple[str, str]:
    """(keyword, VR) of an attribute given by keyword or as 8 hex digits."""
    if "." in name:
        raise QueryParamError(f"{_named(parameter)}: matching inside a sequence is not supported")
    if _TAG.fullmatch(name):
        tag = int(name, 16)
        keyword = keyword_for_tag(tag) if tag != 0x00081190 else "RetrieveURL"
        found = _lookup(keyword) if keyword else None
        if found is None or found[0] != tag:     # a repeating group's keyword is another tag
            raise QueryParamError(f"{_named(parameter)}: not a tag of the DICOM dictionary")
        return keyword, found[1]
    found = _lookup(name)
    if found is None:
        raise QueryParamError(f"{_named(parameter)}: not a DICOM keyword or tag")
    return name, found[1]


def _non_negative(name: str, value: str) -> int:
    if not _DIGITS.fullmatch(value):
        raise QueryParamError(f"{name} is not a non-negative integer")
    return int(value)


def parse_qido(params: Sequence[tuple[str, str]], *, max_limit: int = 1000) -> QidoQuery:
    """A QIDO-RS query string, already split into (name, value) pairs and
    percent-decoded, read into C-FIND terms: matching keys as the text a C-FIND
    identifier carries (a UID list ``1.2,1.3`` becomes ``1.2\\1.3``)."""
    if len(params) > MAX_PARAMETERS:
        raise QueryParamError(f"more than {MAX_PARAMETERS} parameters")
    query = QidoQuery()
    seen: set[str] = set()
    for name, value in params:
        if len(value) > MAX_VALUE_CHARS:
            raise QueryParamError(f"{_named(name)} has a value longer than {MAX_VALUE_CHARS} "
                                  "characters")
        if name == "includefield":
            _include(query, value)
            continue
        if name in ("fuzzymatching", "limit", "offset"):
            if name in seen:
                raise QueryParamError(f"{name} is given more than once")
            seen.add(name)
            if name == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise QueryParamError("fuzzymatching is neither true nor false")
                query.fuzzy = value.lower() == "true"
            elif name == "limit":
                query.limit = min(_non_negative(name, value), max_limit)
            else:
                query.offset = _non_negative(name, value)
            continue
        keyword, vr = _attribute(name, name)
        if vr == "SQ":
            raise QueryParamError(f"{_named(name)} is a sequence: matching inside a sequence "
                                  "is not supported")
        if vr not in _MATCHABLE_VRS:
            raise QueryParamError(f"{_named(name)} has a binary value that cannot be matched")
        if keyword in query.keys:
            raise QueryParamError(f"{_named(name)}: the attribute is given more than once")
        if vr == "UI" and "," in value:
            value = "\\".join(uid.strip() for uid in value.split(","))
        query.keys[keyword] = value
    return query


def _include(query: QidoQuery, value: str) -> None:
    for item in value.split(","):
        item = item.strip()
        if item == "all":
            query.include_all = True
            continue
        keyword, _ = _attribute(item, "includefield")
        if keyword not in query.include:
            query.include.append(keyword)
