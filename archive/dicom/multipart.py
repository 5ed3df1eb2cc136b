"""multipart/related bodies (RFC 2387, RFC 2046 5.1) for DICOMweb: STOW-RS
requests in, WADO-RS responses out.

Sans-I/O, in the style of h11: ``RelatedParser`` is fed bytes as they arrive and
returns events; ``part_head`` and ``closing`` return the bytes to write. No
sockets, threads or framework here, so the same code serves any server and the
tests can cut a body at every byte. Memory stays bounded whatever the body: part
data is passed on as it comes, holding back only the few bytes that may begin a
delimiter; headers, preamble and padding have limits. Errors say what was wrong
with the framing, never quote the body: a part is a DICOM object.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from archive.errors import InvalidInput

MAX_CONTENT_TYPE = 4096
MAX_PREAMBLE = 64 * 1024
MAX_PADDING = 1024          # transport padding after a delimiter (spaces, tabs)
DEFAULT_RELATED_TYPE = "application/dicom"


class MultipartError(InvalidInput):
    """malformed multipart body: {}"""


# ---------------------------------------------------------------- Content-Type

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})[ \t]*")
_PARAM_NAME = re.compile(rf"[ \t]*({_TOKEN})[ \t]*=[ \t]*")
# Unquoted values: tokens, and tolerantly the "/" of type=application/dicom
# that clients send unquoted: printable ASCII but for space, '"', ';' and '\'.
_TOKEN_VALUE = re.compile(r"([\x21\x23-\x3a\x3c-\x5b\x5d-\x7e]+)[ \t]*")
_QUOTED_VALUE = re.compile(r'"((?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*)"[ \t]*')
_SEPARATOR = re.compile(r";[ \t]*")
_ESCAPE = re.compile(r"\\(.)")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"; boundary=abc'`` ->
    ``("multipart/related", {"type": "application/dicom", "boundary": "abc"})``.
    The media type and parameter names come back lower-cased, quoted values
    unquoted; parameter values keep their case (a boundary is case-sensitive)."""
    if len(value) > MAX_CONTENT_TYPE:
        raise MultipartError(f"Content-Type longer than {MAX_CONTENT_TYPE} characters")
    m = _MEDIA_TYPE.match(value)
    if not m:
        raise MultipartError("Content-Type is not a type/subtype media type")
    media_type = f"{m.group(1)}/{m.group(2)}".lower()
    params: dict[str, str] = {}
    pos = m.end()
    while pos < len(value):
        sep = _SEPARATOR.match(value, pos)
        if not sep:
            raise MultipartError("Content-Type has text where a ';' should be")
        pos = sep.end()
        if pos == len(value) or value[pos] == ";":
            continue                    # "a/b;" and "a/b;;c=d": an empty parameter
        name = _PARAM_NAME.match(value, pos)
        if not name:
            raise MultipartError("Content-Type has a parameter that is not name=value")
        pos = name.end()
        quoted = _QUOTED_VALUE.match(value, pos)
        if quoted:
            text = _ESCAPE.sub(r"\1", quoted.group(1))
            pos = quoted.end()
        else:
            token = _TOKEN_VALUE.match(value, pos)
            if not token:
                raise MultipartError("Content-Type has a parameter value that is neither "
                                     "a token nor a quoted string")
            text = token.group(1)
            pos = token.end()
        key = name.group(1).lower()
        if key in params:
            raise MultipartError(f"Content-Type repeats the parameter {key!r}")
        params[key] = text
    return media_type, params


def _check_boundary(boundary: str) -> None:
    if not isinstance(boundary, str) or not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("the boundary must be 1 to 70 of the characters RFC 2046 "
                             "allows, not ending in a space")


def related_boundary(content_type: str) -> tuple[str, str]:
    """The boundary and the ``type`` parameter (``application/dicom`` when absent,
    lower-cased) of a STOW-RS request's Content-Type."""
    media_type, params = parse_content_type(content_type)
    if media_type != "multipart/related":
        raise MultipartError("Content-Type is not multipart/related")
    if "boundary" not in params:
        raise MultipartError("Content-Type has no boundary parameter")
    boundary = params["boundary"]
    _check_boundary(boundary)
    related_type = params.get("type", DEFAULT_RELATED_TYPE).strip().lower()
    if not related_type:
        raise MultipartError("Content-Type has an empty type parameter")
    return boundary, related_type


# ---------------------------------------------------------------- parsing


@dataclass
class PartStart:
    headers: dict[str, str]         # names lower-cased; a repeated header joined by ", "


@dataclass
class PartData:
    data: bytes


@dataclass
class PartEnd:
    pass


@dataclass
class BodyEnd:
    pass


Event = PartStart | PartData | PartEnd | BodyEnd

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _DATA, _EPILOGUE, _BROKEN = range(6)
_HEADER_NAME = re.compile(_TOKEN)


class RelatedParser:
    """Incremental parser of one multipart/related body.

    ``feed`` takes the next chunk, of any size, and returns the events it
    completes: per part a ``PartStart``, ``PartData`` as bytes arrive (never a
    whole part held), a ``PartEnd``; a ``BodyEnd`` after the closing delimiter,
    after which input is ignored. ``close`` says the body is over and raises if
    the closing delimiter never came. After a ``MultipartError`` the parser stays
    broken: every later call raises again.
    """

    def __init__(self, boundary: str, *, max_header_bytes: int = 16384,
                 max_parts: int = 100_000) -> None:
        _check_boundary(boundary)
        self._dash_boundary = b"--" + boundary.encode("ascii")
        self._delimiter = b"\r\n" + self._dash_boundary
        self._max_header_bytes = max_header_bytes
        self._max_parts = max_parts
        self._state = _PREAMBLE
        self._buf = b""             # held back: a possible delimiter start, or a header block
        self._at_start = True       # nothing seen yet: "--boundary" may open the body bare
        self._preamble = 0          # preamble bytes seen and dropped
        self._padding = 0           # transport padding after the current delimiter
        self._searched = 0          # how far _buf was searched for the end of the headers
        self._parts = 0
        self._error: MultipartError | None = None

    @property
    def parts(self) -> int:
        """Parts started so far."""
        return self._parts

    def feed(self, chunk: bytes) -> list[Event]:
        if self._error is not None:
            raise MultipartError("the parser failed earlier on this body")
        events: list[Event] = []
        data = self._buf + bytes(chunk) if self._buf else bytes(chunk)
        self._buf = b""
        try:
            while data and self._state != _EPILOGUE:
                data = self._step(data, events)
        except MultipartError as e:
            self._error = e
            self._state = _BROKEN
            raise
        return events

    def close(self) -> None:
        if self._state != _EPILOGUE:
            self._error = MultipartError("the body ended before the closing delimiter")
            self._state = _BROKEN
            raise self._error

    # Each step consumes from ``data`` and returns what is left; it returns b""
    # after keeping in ``self._buf`` whatever it cannot decide on yet.

    def _step(self, data: bytes, events: list[Event]) -> bytes:
        if self._state == _DATA:
            return self._data(data, events)
        if self._state == _HEADERS:
            return self._headers(data, events)
        if self._state == _AFTER_DELIMITER:
            return self._after_delimiter(data, events)
        return self._preamble_(data)

    def _hold_possible_delimiter(self, data: bytes) -> int:
        """Where the held-back tail of ``data`` starts: the delimiter's only CR is
        its first byte, so only a tail from the last CR can be its beginning."""
        cr = data.rfind(b"\r", max(0, len(data) - len(self._delimiter) + 1))
        if cr >= 0 and self._delimiter.startswith(data[cr:]):
            return cr
        return len(data)

    def _preamble_(self, data: bytes) -> bytes:
        if self._at_start:
            head = data[:len(self._dash_boundary)]
            if head == self._dash_boundary:
                self._at_start = False
                self._state = _AFTER_DELIMITER
                return data[len(self._dash_boundary):]
            if self._dash_boundary.startswith(head):
                self._buf = data        # too short to tell yet
                return b""
            self._at_start = False
        i = data.find(self._delimiter)
        if i >= 0:
            self._count_preamble(i)
            self._state = _AFTER_DELIMITER
            return data[i + len(self._delimiter):]
        keep = self._hold_possible_delimiter(data)
        self._count_preamble(keep)
        self._buf = data[keep:]
        return b""

    def _count_preamble(self, n: int) -> None:
        self._preamble += n
        if self._preamble > MAX_PREAMBLE:
            raise MultipartError(f"no delimiter in the first {MAX_PREAMBLE} bytes")

    def _after_delimiter(self, data: bytes, events: list[Event]) -> bytes:
        """What follows a delimiter: "--" closes the body; otherwise transport
        padding (spaces, tabs), then CRLF and a part's headers."""
        if self._padding == 0:
            if data[:2] == b"--":
                events.append(BodyEnd())
                self._state = _EPILOGUE
                return b""
            if data == b"-":
                self._buf = data
                return b""
        stripped = data.lstrip(b" \t")
        self._padding += len(data) - len(stripped)
        if self._padding > MAX_PADDING:
            raise MultipartError(f"more than {MAX_PADDING} bytes of padding after a delimiter")
        if not stripped:
            return b""
        if stripped == b"\r":
            self._buf = stripped
            return b""
        if stripped[:2] != b"\r\n":
            raise MultipartError("a delimiter line has more than the boundary on it")
        self._parts += 1
        if self._parts > self._max_parts:
            raise MultipartError(f"more than {self._max_parts} parts")
        self._padding = 0
        self._searched = 0
        self._state = _HEADERS
        return stripped[2:]

    def _headers(self, data: bytes, events: list[Event]) -> bytes:
        if data[:2] == b"\r\n":             # no headers at all: the blank line
            end, rest = 0, 2
        else:
            end = data.find(b"\r\n\r\n", max(0, self._searched - 3))
            rest = end + 4
        if end < 0:
            if len(data) >= self._max_header_bytes:
                raise MultipartError(f"part headers longer than {self._max_header_bytes} bytes")
            self._searched = len(data)
            self._buf = data
            return b""
        if rest > self._max_header_bytes:
            raise MultipartError(f"part headers longer than {self._max_header_bytes} bytes")
        events.append(PartStart(_parse_headers(data[:end])))
        self._state = _DATA
        return data[rest:]

    def _data(self, data: bytes, events: list[Event]) -> bytes:
        i = data.find(self._delimiter)
        if i >= 0:
            if i:
                events.append(PartData(data[:i]))
            events.append(PartEnd())
            self._state = _AFTER_DELIMITER
            return data[i + len(self._delimiter):]
        keep = self._hold_possible_delimiter(data)
        if keep:
            events.append(PartData(data[:keep]))
        self._buf = data[keep:]
        return b""


def _parse_headers(block: bytes) -> dict[str, str]:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError("part headers are not UTF-8") from None
    headers: dict[str, str] = {}
    last: str | None = None
    for line in text.split("\r\n") if text else ():
        if "\r" in line or "\n" in line or "\x00" in line:
            raise MultipartError("part headers have a bare CR, LF or NUL")
        if line[:1] in (" ", "\t"):         # obsolete line folding: continues the last value
            if last is None:
                raise MultipartError("part headers begin with a continuation line")
            headers[last] = f"{headers[last]} {line.strip()}".strip()
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise MultipartError("a part header line has no ':'")
        name = name.rstrip(" \t")
        if not _HEADER_NAME.fullmatch(name):
            raise MultipartError("a part header has a malformed name")
        name = name.lower()
        value = value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
        last = name
    return headers


# ---------------------------------------------------------------- writing

_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


def part_head(boundary: str, content_type: str, extra: dict[str, str] | None = None,
              first: bool = False) -> bytes:
    """The delimiter and headers that open a part (its data follows):
    ``b"\\r\\n--B\\r\\nContent-Type: ...\\r\\n\\r\\n"``, without the leading CRLF
    for the first part. Names and values must be printable ASCII."""
    _check_boundary(boundary)
    lines = [f"--{boundary}", _header_line("Content-Type", content_type)]
    lines += [_header_line(name, value) for name, value in (extra or {}).items()]
    head = "\r\n".join(lines) + "\r\n\r\n"
    return (head if first else "\r\n" + head).encode("ascii")


def _header_line(name: str, value: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError("a part header name must be an RFC 7230 token")
    if not _HEADER_VALUE.fullmatch(value):
        raise ValueError(f"the value of the part header {name} is not printable ASCII")
    return f"{name}: {value}"


def closing(boundary: str) -> bytes:
    """The close delimiter that ends a body after its last part's data."""
    _check_boundary(boundary)
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def new_boundary() -> str:
    """A fresh random boundary (hex digits): 160 random bits will not occur in
    a part's data by chance."""
    return secrets.token_hex(20)
