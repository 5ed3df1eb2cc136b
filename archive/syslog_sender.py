"""Audit messages to a syslog collector: RFC 5424 messages over UDP (RFC 5426)
or TLS (RFC 5425), as IHE ATNA (ITI-20) asks.

``submit`` never blocks and never raises: it formats the message and puts it on
a bounded queue that one background thread sends. The thread keeps one TLS
connection open, reconnects with a growing pause when the collector is away,
and retries the message at the head of the queue until it goes or the sender
is closed, so a collector restart loses nothing that fits in the queue. A full
queue drops new messages (counted in ``stats``): the catalog keeps every record
and remains the authority; the collector is a copy and an anchor.

Failures are logged by the collector's address and the error alone: a message
(it holds patient IDs) never reaches the application log.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
from datetime import datetime, timezone
from pathlib import Path

from archive.config.syslog_url import parse_url

log = logging.getLogger("pacsvault.syslog")

FACILITY = 10                     # security/authorization messages (authpriv), as ATNA uses
MSGID = "IHE+RFC-3881"            # the IHE MSGID for DICOM/RFC 3881 audit messages
APP_NAME = "pacsvault"
BOM = b"\xef\xbb\xbf"             # RFC 5424 MSG-UTF8: a UTF-8 MSG starts with the BOM
MAX_DATAGRAM = 65507              # the largest UDP payload over IPv4 (RFC 5426 3.2)
MAX_PAUSE_S = 30.0




def _header_field(value: str, limit: int) -> str:
    """RFC 5424 header fields are printable US-ASCII without spaces; '-' when empty."""
    v = "".join(c if 33 <= ord(c) <= 126 else "-" for c in value)[:limit]
    return v or "-"


def frame(msg: bytes, *, severity: int, hostname: str, procid: str, app_name: str = APP_NAME,
          msgid: str = MSGID, at: datetime | None = None) -> bytes:
    """One RFC 5424 message: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG."""
    ts = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stamp = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    head = (f"<{FACILITY * 8 + severity}>1 {stamp} {_header_field(hostname, 255)} "
            f"{_header_field(app_name, 48)} {_header_field(procid, 128)} "
            f"{_header_field(msgid, 32)} - ")
    return head.encode("ascii") + BOM + msg


class SyslogSender:
    def __init__(self, url: str, *, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, timeout_s: float = 5.0, queue_size: int = 10_000,
                 hostname: str | None = None) -> None:
        self.scheme, self.host, self.port = parse_url(url)
        self.where = f"{self.scheme}://{self.host}:{self.port}"
        self.ca, self.cert, self.key = ca, cert, key
        self.timeout_s = timeout_s
        self.queue_size = queue_size
        self.hostname = hostname or socket.gethostname()
        self.sent = self.failed = self.dropped = 0
        self._pid = -1
        self._start()

    # -- the caller's side ---------------------------------------------------------------
    def submit(self, msg: bytes, severity: int = 5) -> bool:
        """Queue one message (an AuditMessage's XML); False if it was dropped."""
        if self._pid != os.getpid():      # forked: the thread stayed behind in the parent
            self._start()
        data = frame(msg, severity=severity, hostname=self.hostname, procid=str(self._pid))
        if self.scheme == "udp" and len(data) > MAX_DATAGRAM:
            self._drop("larger than one UDP datagram")
            return False
        with self._idle:
            if self._closing.is_set() or self._pending >= self.queue_size:
                self._drop("the queue is full" if not self._closing.is_set() else "closed")
                return False
            self._pending += 1
        self._q.put(data)
        return True

    def deliver(self, msg: bytes, severity: int = 5) -> None:
        """Send one message now, from the caller's thread (the ATNA forwarder, which
        keeps its own order and cursor); raises OSError if it could not be written.
        A stale connection is replaced once before giving up."""
        data = frame(msg, severity=severity, hostname=self.hostname, procid=str(os.getpid()))
        if self.scheme == "udp" and len(data) > MAX_DATAGRAM:
            raise OSError("message larger than one UDP datagram")
        try:
            self._send(data)
        except (OSError, ValueError):
            self._disconnect()
            try:
                self._send(data)
            except ValueError as e:
                raise OSError(str(e)) from None
        self.sent += 1

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message went out (or the timeout); True if all did."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Give queued messages ``timeout`` seconds, then stop (the rest is dropped)."""
        if self._pid != os.getpid():
            return
        self.flush(timeout)
        self._closing.set()
        self._q.put(None)
        self._thread.join(timeout=self.timeout_s + 1)
        self._disconnect()

    def stats(self) -> dict[str, int | str | bool]:
        return {"collector": self.where, "sent": self.sent, "failed_attempts": self.failed,
                "dropped": self.dropped, "queued": self._pending, "failing": self._failing}

    def _drop(self, why: str) -> None:
        with self._idle:                # both threads count (the Condition's lock is an RLock)
            self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("audit collector %s: message not sent (%s); %d dropped so far",
                      self.where, why, self.dropped)

    # -- the sending thread --------------------------------------------------------------
    def _start(self) -> None:
        self._pid = os.getpid()
        self._q: queue.Queue[bytes | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._closing = threading.Event()
        self._failing = False
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="pacsvault-atna", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._q.get()
            if data is None:
                return
            self._deliver(data)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _deliver(self, data: bytes) -> None:
        if self._closing.is_set() and self._failing:
            self._drop("closed while the collector was unreachable")
            return
        pause = 0.25
        while True:
            try:
                self._send(data)
            except (OSError, ValueError) as e:       # ssl.SSLError is an OSError
                self.failed += 1
                self._disconnect()
                if not self._failing:
                    log.warning("audit collector %s unreachable (%s: %s); audit messages "
                                "wait in a queue and are retried", self.where,
                                type(e).__name__, e)
                self._failing = True
                if self._closing.wait(pause):
                    self._drop("closed while the collector was unreachable")
                    return
                pause = min(pause * 2, MAX_PAUSE_S)
                continue
            self.sent += 1
            if self._failing:
                log.warning("audit collector %s reachable again", self.where)
                self._failing = False
            return

    def _send(self, data: bytes) -> None:
        if self.scheme == "udp":
            if self._sock is None:
                family, kind, proto, _, addr = socket.getaddrinfo(
                    self.host, self.port, type=socket.SOCK_DGRAM)[0]
                self._sock = socket.socket(family, kind, proto)
                self._sock.settimeout(self.timeout_s)
                self._sock.connect(addr)    # connected: a refused port is reported
            self._sock.send(data)           # RFC 5426: one message per datagram
            return
        if self._sock is not None and self._stale(self._sock):
            self._disconnect()
        if self._sock is None:
            self._sock = self._connect_tls()
        self._sock.sendall(str(len(data)).encode("ascii") + b" " + data)   # RFC 5425 octet counting

    def _connect_tls(self) -> socket.socket:
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:                       # mutual TLS, as ATNA secure nodes use
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        try:
            return ctx.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def _stale(self, sock: socket.socket) -> bool:
        """Did the collector close the connection? A write to a closed one would vanish
        into the kernel buffer without an error. A collector never sends data, but a
        TLS 1.3 server sends session tickets, so a readable socket is read, not trusted."""
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            sock.setblocking(False)
            try:
                return sock.recv(4096) == b""    # end of stream; anything else is ignored
            finally:
                sock.settimeout(self.timeout_s)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False                         # only TLS records, no data: still open
        except (OSError, ValueError):
            return True

    def _disconnect(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass
