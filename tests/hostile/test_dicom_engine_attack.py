"""Attacks at the socket on `pacsvault serve` (own engine), each while a modality
pushes: PDUs announcing 2 GB and then streamed, PDUs sent half and stalled, sockets
that never associate, a flood of A-ASSOCIATE-RQs from an AE not allowed. The
daemon's processes must stay within +100 MB of resident memory, the modality's push
must finish within the network timeout, and every object acknowledged before must
still be on both sites with its catalog SHA-256.

Attackers connect from 127.0.0.2-4 (a source of their own, as on a real network);
the modality and the objects acknowledged before come from 127.0.0.1."""
from __future__ import annotations

import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest

from archive.dicom.net import pdu as P
from tests.conftest import require_tool, site_paths
from tests.support.daemon import Daemon, free_port, init_instance, run_cli, storescu
from tests.support.dataset import make_ct_series
from tests.support.rss import RssSampler
from tests.support.verify import audit, sqlite_url

pytestmark = pytest.mark.needs_dcmtk

NETWORK_TIMEOUT_S = 5
RSS_BOUND_KB = 100_000
CT, ELE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def pv(tmp_path_factory: pytest.TempPathFactory):
    """A daemon with short timeouts, and a study acknowledged before any attack."""
    require_tool("storescu")
    root = tmp_path_factory.mktemp("attack")
    cfg = init_instance(root / "pv")
    text = cfg.read_text().replace("network_timeout_s = 60",
                                   f"network_timeout_s = {NETWORK_TIMEOUT_S}") \
        .replace("max_pending_per_source = 8", "max_pending_per_source = 4")
    assert 'engine = "pacsvault"' in text and f"network_timeout_s = {NETWORK_TIMEOUT_S}" in text
    cfg.write_text(text)
    for ae, host in (("STORESCU", "127.0.0.1"), ("MODALITY", "127.0.0.1"),
                     ("ATTACKER", "127.0.0.2")):
        run_cli(cfg, "peer", "add", ae, host)
    d = Daemon(cfg, free_port(), free_port(), workers=2).start()
    make_ct_series(root / "before", 5, size=30_000)
    assert storescu(d.dicom_port, root / "before").returncode == 0
    d.acked = 5                         # objects acknowledged so far
    yield d
    d.kill9()


def _cataloged(d: Daemon) -> int:
    with sqlite3.connect(d.config.parent / "catalog" / "catalog.db") as c:
        return c.execute("SELECT count(*) FROM instances").fetchone()[0]


def _connect(d: Daemon, source: str) -> socket.socket:
    s = socket.socket()
    # Closed with a reset, as an attacker would: no TIME_WAIT left on thousands of
    # ports, where a later test's free_port() would find its port "in use".
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.bind((source, 0))
    s.settimeout(NETWORK_TIMEOUT_S * 3)
    s.connect(("127.0.0.1", d.dicom_port))
    return s


def _rq(calling: str) -> bytes:
    return P.encode(P.AssociateRQ("PACSVAULT", calling, (P.PresentationContextRQ(1, CT, (ELE,)),),
                                  P.UserInformation(max_length=16384,
                                                    implementation_class_uid="1.2.3.4")))


def _read_pdu(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        got = s.recv(6 - len(head))
        if not got:
            raise ConnectionError("closed")
        head += got
    kind, _, n = P.HEADER.unpack(head)
    body = b""
    while len(body) < n:
        got = s.recv(n - len(body))
        if not got:
            raise ConnectionError("closed")
        body += got
    return kind, body


def _associated(d: Daemon, source: str, calling: str) -> socket.socket:
    s = _connect(d, source)
    s.sendall(_rq(calling))
    kind, _ = _read_pdu(s)
    assert kind == P.ASSOCIATE_AC, kind
    return s


def _closed_by_peer(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the daemon closes (or aborts) ``s``, None if it did not in time."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while data := s.recv(65536):
            if data[:1] == bytes([P.ABORT]):
                break
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


class Attack:
    """Runs ``body(stop)`` in ``n`` threads until stopped; a thread's exception is
    kept and raised on ``stop()`` (an attack that silently did nothing proves nothing)."""

    def __init__(self, body, n: int) -> None:  # noqa: ANN001
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(body,), daemon=True)
                        for _ in range(n)]

    def _run(self, body) -> None:  # noqa: ANN001
        try:
            body(self._stop)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(e)

    def __enter__(self) -> "Attack":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(NETWORK_TIMEOUT_S * 4)
        if not exc[0] and self.errors:
            raise self.errors[0]


def _modality_pushes(d: Daemon, tmp_path: Path, name: str) -> float:
    """A modality (another allowed AE) pushes 3 objects: its duration in seconds."""
    made = make_ct_series(tmp_path / name, 3, size=30_000, seed=hash(name) & 0xFFFF)
    t0 = time.monotonic()
    r = storescu(d.dicom_port, [m.path for m in made], aet="MODALITY", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    d.acked += 3
    return took


def _all_acknowledged_are_intact(d: Daemon) -> None:
    a = audit(sqlite_url(d.config.parent), site_paths(d.config))
    assert a.instances == d.acked == _cataloged(d)
    assert a.ok_copies == 2 * d.acked and a.missing_copies == 0 and not a.bad
    assert d.proc.poll() is None and "Traceback" not in d.log()


def test_pdus_announcing_2_gb_then_streamed_cost_no_memory(pv, tmp_path):
    # Each attacker announces a 2 GB PDU (an A-ASSOCIATE-RQ before associating, a
    # P-DATA-TF after) and streams up to 48 MB into it, holding the connection. The
    # header alone is refused with an A-ABORT; a daemon that buffered what follows
    # would hold hundreds of MB here.
    junk = b"\xee" * (256 * 1024)
    aborted = []

    def stream(stop: threading.Event, after_associating: bool) -> None:
        while not stop.is_set():
            if after_associating:
                s = _associated(pv, "127.0.0.2", "ATTACKER")
                head = struct.pack(">BBI", P.P_DATA_TF, 0, 2_000_000_000)
            else:
                s = _connect(pv, "127.0.0.3")
                head = struct.pack(">BBI", P.ASSOCIATE_RQ, 0, 2_000_000_000)
            sent = 0
            try:
                s.sendall(head)
                while sent < 48 << 20 and not stop.is_set():
                    s.sendall(junk)
                    sent += len(junk)
            except OSError:
                pass
            aborted.append(_closed_by_peer(s, NETWORK_TIMEOUT_S * 2) is not None)
            s.close()

    attacks = [Attack(lambda stop: stream(stop, True), 3),
               Attack(lambda stop: stream(stop, False), 3)]
    with RssSampler(pv.proc.pid) as rss, attacks[0], attacks[1]:
        time.sleep(1)
        took = _modality_pushes(pv, tmp_path, "during-2gb")
        time.sleep(max(0.0, 3 - took))
    assert rss.samples > 10 and rss.peak_growth_kb < RSS_BOUND_KB, rss.peak_growth_kb
    assert took < NETWORK_TIMEOUT_S
    assert len(aborted) >= 12 and all(aborted), aborted     # each aborted at its header
    _all_acknowledged_are_intact(pv)


def test_half_pdus_that_stall_and_sockets_that_never_associate_are_cut_off(pv, tmp_path):
    # 8 allowed associations each send half of a 200 KB P-DATA-TF and stall; 30 sockets
    # from another source connect and send nothing or half a request. The modality gets through while they
    # hang, and the daemon closes every one of them within the network timeout (ARTIM
    # for those that never associated), not when the attacker gives up.
    stalled = []
    for _ in range(8):
        s = _associated(pv, "127.0.0.2", "ATTACKER")
        s.sendall(struct.pack(">BBI", P.P_DATA_TF, 0, 200_000) + b"\x00" * 100_000)
        stalled.append(s)
    idle = [_connect(pv, "127.0.0.3") for _ in range(30)]
    for s in idle[::2]:                 # half of them send half an A-ASSOCIATE-RQ
        try:
            s.sendall(_rq("ATTACKER")[:40])
        except OSError:
            pass                        # closed at once: over max_pending_per_source
    t0 = time.monotonic()
    with RssSampler(pv.proc.pid) as rss:
        took = _modality_pushes(pv, tmp_path, "during-stall")
        closed = [_closed_by_peer(s, NETWORK_TIMEOUT_S * 2 - (time.monotonic() - t0))
                  for s in stalled + idle]
    for s in stalled + idle:
        s.close()
    assert took < NETWORK_TIMEOUT_S
    assert None not in closed, closed                     # every one cut off...
    assert time.monotonic() - t0 < NETWORK_TIMEOUT_S * 2  # ...within the timeout and a margin
    assert rss.peak_growth_kb < RSS_BOUND_KB, rss.peak_growth_kb
    _all_acknowledged_are_intact(pv)


def test_a_flood_of_requests_from_an_ae_not_allowed_is_refused_while_a_modality_pushes(
        pv, tmp_path):
    refused: list[tuple[int, int, int]] = []

    def flood(stop: threading.Event) -> None:
        while not stop.is_set():
            s = _connect(pv, "127.0.0.4")
            try:
                s.sendall(_rq("EVIL"))
                kind, body = _read_pdu(s)
                assert kind == P.ASSOCIATE_RJ, kind
                refused.append((body[1], body[2], body[3]))
            finally:
                s.close()

    with RssSampler(pv.proc.pid) as rss, Attack(flood, 4):
        time.sleep(1)
        took = _modality_pushes(pv, tmp_path, "during-flood")
        time.sleep(max(0.0, 2 - took))
    assert len(refused) > 50
    assert set(refused) == {(1, 1, 3)}     # permanent, service user, calling AE not recognized
    assert took < NETWORK_TIMEOUT_S
    assert rss.peak_growth_kb < RSS_BOUND_KB, rss.peak_growth_kb
    _all_acknowledged_are_intact(pv)


def test_a_flood_of_refused_requests_does_not_flood_the_log(pv):
    refused = []

    def flood(stop: threading.Event) -> None:
        while not stop.is_set():
            s = _connect(pv, "127.0.0.4")
            try:
                s.sendall(_rq("EVIL"))
                refused.append(_read_pdu(s)[0] == P.ASSOCIATE_RJ)
            finally:
                s.close()

    lines = pv.log().count("association refused")
    with Attack(flood, 2):
        time.sleep(1)
    assert len(refused) > 200 and all(refused)
    assert pv.log().count("association refused") - lines < 20
