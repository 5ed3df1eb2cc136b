"""The HTTP side under slow and oversized requests: a client that dribbles a request's
head a byte at a time (slowloris), or stalls in the middle of a STOW-RS body, is cut
off after [http] request_timeout_s instead of holding a connection for ever, while
other clients are served; an oversized head is refused at once."""
from __future__ import annotations

import socket
import time

import requests

from tests.support.daemon import Daemon, free_port
from tests.support.tiering import Install

TIMEOUT_S = 2


def closed_within(s: socket.socket, seconds: float, dribble: bytes = b"") -> float | None:
    """Seconds until the server closed ``s`` (sending ``dribble`` every 0.3 s to keep it
    busy), or None if it stayed open for ``seconds``."""
    start = time.monotonic()
    s.settimeout(0.3)
    while time.monotonic() - start < seconds:
        try:
            if dribble:
                s.sendall(dribble)
            if s.recv(65536) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def test_slow_heads_and_stalled_bodies_are_cut_off_and_others_served(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.config.write_text(inst.config.read_text().replace(
        "[http]\n", f"[http]\nrequest_timeout_s = {TIMEOUT_S}\n", 1))
    d = Daemon(inst.config, free_port(), free_port(), workers=1).start()
    try:
        base = f"http://127.0.0.1:{d.http_port}"
        slow = []
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", d.http_port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: pv\r\n")
            slow.append(s)
        # while they dribble, a normal client is served
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
        waited = [closed_within(s, TIMEOUT_S * 4, dribble=b"X") for s in slow]
        assert all(w is not None and w < TIMEOUT_S * 3 for w in waited), waited

        # a STOW-RS body that stops half-way
        s = socket.create_connection(("127.0.0.1", d.http_port))
        s.sendall(b"POST /dicomweb/studies HTTP/1.1\r\nHost: pv\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
                  b"\r\n--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\x00" * 2000)
        waited = closed_within(s, TIMEOUT_S * 4)
        assert waited is not None and waited < TIMEOUT_S * 3, waited

        # a head that grows past 16 KiB without ending is refused at once (never buffered
        # further), the connection closed
        s = socket.create_connection(("127.0.0.1", d.http_port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: pv\r\nX-Big: " + b"a" * 40_000)
        s.settimeout(5)
        answer = s.recv(200)
        assert answer.startswith(b"HTTP/1.1 4"), answer
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
        log = d.log()
    finally:
        d.stop()
    assert "no complete request within" in log
    spool = inst.settings.ingest.spool_dir / "http"
    assert not [p for p in spool.rglob("*") if p.is_file()]
