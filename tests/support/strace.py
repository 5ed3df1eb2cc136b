"""Read an ``strace -f -tt -yy`` log of the daemon: syscalls in the order strace saw
them, with each fd's path, and the C-STORE responses sent on DICOM sockets.

strace sees every syscall entry and exit of every traced thread one at a time, so a
line's position in the log is a causal order: an fsync that completed on one line
finished before a send that starts on a later line began. With -f a syscall
interrupted by another thread's is split into ``name(args <unfinished ...>`` and
``<... name resumed>rest) = ret``; the two halves are joined by thread id, the
call starts at the first and completes at the second.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(\d+) +(\d\d:\d\d:\d\d\.\d+) (.*)$")
_START = re.compile(r"^(\w+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"^(.*)\) += (-?\d+|\?|0x[0-9a-f]+)(?:<(.*)>)?(?: .*)?$", re.S)
_CSTRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD_ARG = re.compile(r"^(\d+)<(.*?)>(?:, |$)")
_DIRFD = re.compile(r"(?:AT_FDCWD|\d+)<([^>]*)>, \"")
_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "\\": 92, '"': 34}


@dataclass(frozen=True)
class Call:
    pid: int
    name: str
    args: str        # the text between the parentheses
    result: str      # "0", "-1", "?" ...
    fd_path: str     # strace -yy's annotation of the returned fd (openat) or ""
    start: int       # log line where the call began
    end: int         # log line where it completed

    @property
    def ok(self) -> bool:
        return self.result not in ("?",) and not self.result.startswith("-")

    def fd_arg(self) -> str | None:
        """The path strace printed for the first argument when it is an fd."""
        m = _FD_ARG.match(self.args)
        return m.group(2) if m else None

    def paths(self) -> list[str]:
        """The path arguments (link, rename, openat, mkdir), made absolute with the
        directory fd strace printed before a relative one."""
        out = []
        for m in _CSTRING.finditer(self.args):
            p = decode(m.group(1)).decode("utf-8", "replace")
            if not p.startswith("/"):
                before = self.args[:m.start()]
                d = _DIRFD.findall(before + '"')
                p = str(Path(d[-1]) / p) if d else p
            out.append(p)
        return out

    def buffer(self) -> bytes:
        """The data of a write/sendto (as much as strace -s printed)."""
        m = _CSTRING.search(self.args)
        return decode(m.group(1)) if m else b""


def decode(s: str) -> bytes:
    """Undo strace's C-style escaping of a buffer."""
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        n = s[i + 1]
        if n == "x":
            out.append(int(s[i + 2:i + 4], 16))
            i += 4
        elif n.isdigit():
            j = i + 1
            while j < len(s) and j < i + 4 and s[j] in "01234567":
                j += 1
            out.append(int(s[i + 1:j], 8))
            i = j
        else:
            out.append(_ESCAPES.get(n, ord(n)))
            i += 2
    return bytes(out)


def parse(log: str) -> list[Call]:
    """Every completed syscall of the log, in order of completion."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    for index, line in enumerate(log.splitlines()):
        m = _LINE.match(line)
        if not m:
            continue
        pid, body = int(m.group(1)), m.group(3)
        if body.startswith(("+++", "---")):
            pending.pop(pid, None)          # exited or a signal: no call is in flight
            continue
        r = _RESUMED.match(body)
        if r:
            if pid not in pending:
                continue                     # its start was before the trace attached
            name, head, start = pending.pop(pid)
            text = head + r.group(2)
        else:
            s = _START.match(body)
            if not s:
                continue
            name, text, start = s.group(1), s.group(2), index
            if text.endswith(" <unfinished ...>"):
                pending[pid] = (name, text[:-len(" <unfinished ...>")], index)
                continue
        res = _RESULT.match(text)
        if not res:
            continue
        calls.append(Call(pid, name, res.group(1), res.group(2), res.group(3) or "",
                          start, index))
    return calls


@dataclass(frozen=True)
class StoreResponse:
    sop_uid: str
    status: int
    start: int       # log line where the send of the response began


def store_responses(calls: list[Call], dicom_port: int) -> list[StoreResponse]:
    """C-STORE-RSPs written to sockets whose local port is ``dicom_port``."""
    local = re.compile(rf"^TCP(?:v6)?:\[[^\]]*?:{dicom_port}->")
    out = []
    for c in calls:
        if c.name not in ("write", "sendto", "sendmsg") or not c.ok:
            continue
        fd = c.fd_arg()
        if fd is None or not local.match(fd):
            continue
        for sop, status in _c_store_rsps(c.buffer()):
            out.append(StoreResponse(sop, status, c.start))
    return out


def _c_store_rsps(pdu: bytes) -> list[tuple[str, int]]:
    """(Affected SOP Instance UID, Status) of each C-STORE-RSP command in P-DATA-TF PDUs."""
    found = []
    while len(pdu) >= 6:
        kind, length = pdu[0], struct.unpack(">I", pdu[2:6])[0]
        body, pdu = pdu[6:6 + length], pdu[6 + length:]
        if kind != 0x04:
            continue
        while len(body) >= 6:
            n = struct.unpack(">I", body[:4])[0]
            control, data, body = body[5], body[6:4 + n], body[4 + n:]
            if not control & 0x01:           # a data set fragment, not a command
                continue
            cmd = _command(data)
            if cmd.get(0x0100) == struct.pack("<H", 0x8001):
                found.append((cmd.get(0x1000, b"").rstrip(b"\x00 ").decode("ascii"),
                              struct.unpack("<H", cmd.get(0x0900, b"\xff\xff"))[0]))
    return found


def _command(data: bytes) -> dict[int, bytes]:
    """A command set (implicit VR little endian, group 0000): element -> value."""
    out = {}
    while len(data) >= 8:
        group, elem, n = struct.unpack("<HHI", data[:8])
        if group == 0:
            out[elem] = data[8:8 + n]
        data = data[8 + n:]
    return out
