"""Validation of DICOM identifiers received from the network.

Everything that later names a file or a database row passes through here first.
The rules follow PS3.5 (6.2 Value Representations, 9.1 UID encoding):

* UI: 1-64 characters, digits and '.', components separated by single dots.
  Trailing NUL/space padding is stripped. Leading zeros inside a component are
  forbidden by the standard but occur in real legacy archives; they are harmless
  for path safety, so they are accepted (``strict=False``) and only the
  character set, length and component structure are enforced.
* AE: 1-16 characters of the default repertoire, no backslash or control
  characters, not all spaces; leading/trailing spaces are not significant.
"""
from __future__ import annotations

import re

from archive.errors import InvalidInput

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_STRICT_COMPONENT = re.compile(r"^(0|[1-9][0-9]*)$")
_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


class InvalidUID(InvalidInput):
    """invalid {} UID: {}"""


class InvalidAETitle(InvalidInput):
    """invalid AE title: {}"""


def _describe(raw: object) -> str:
    """A safe description of a rejected value: its length and shape, never the value.

    UIDs are not PHI, but a hostile value could carry anything (a path, a name),
    so error messages only say what was wrong with it.
    """
    text = raw if isinstance(raw, str) else repr(type(raw).__name__)
    if not isinstance(raw, str):
        return f"not a string ({text})"
    return f"{len(raw)} characters"


def validate_uid(raw: object, what: str = "SOP Instance", strict: bool = False) -> str:
    """Return the UID without padding, or raise InvalidUID explaining why."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidUID(what, "not ASCII") from None
    if raw is None:
        raise InvalidUID(what, "missing")
    if not isinstance(raw, str):
        raise InvalidUID(what, _describe(raw))
    uid = raw.rstrip("\x00 ")
    if not uid:
        raise InvalidUID(what, "empty")
    if len(uid) > 64:
        raise InvalidUID(what, f"longer than 64 characters ({len(uid)})")
    if not _UID_RE.fullmatch(uid):
        raise InvalidUID(what, f"not digits separated by single dots ({_describe(uid)})")
    if strict and not all(_STRICT_COMPONENT.fullmatch(c) for c in uid.split(".")):
        raise InvalidUID(what, "component with a leading zero")
    return uid


def validate_ae_title(raw: object) -> str:
    """Return the AE title with insignificant spaces removed, or raise InvalidAETitle."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidAETitle("not ASCII") from None
    if not isinstance(raw, str):
        raise InvalidAETitle(_describe(raw))
    if not _AE_RE.fullmatch(raw) or "\\" in raw:
        raise InvalidAETitle("must be 1-16 printable ASCII characters without backslash")
    ae = raw.strip(" ")
    if not ae:
        raise InvalidAETitle("all spaces")
    return ae
