"""`pacsvault serve` on pacsvault's own DICOM engine (the default), where pynetdicom
failed: a 2 GB PDU header costs the worker nothing, and sockets that never
associate do not lock a modality out for longer than ARTIM. (Every other daemon
test runs on this engine too; test_pynetdicom_fallback.py keeps the old one tested.)"""
from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from tests.support.daemon import echoscu, init_instance, run_cli, storescu
from tests.support.dataset import make_ct_series

pytestmark = pytest.mark.needs_dcmtk


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    cfg = init_instance(tmp_path / "pv")
    # Short timeouts and a small association limit, so the hostile cases below run fast.
    text = cfg.read_text().replace("network_timeout_s = 60", "network_timeout_s = 5") \
        .replace("max_associations = 32", "max_associations = 8") \
        .replace("max_pending_per_source = 8", "max_pending_per_source = 3")
    assert 'engine = "pacsvault"' in text and "network_timeout_s = 5" in text
    assert "max_pending_per_source = 3" in text
    cfg.write_text(text)
    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    return cfg


def _worker_rss_kb(daemon) -> int:  # noqa: ANN001
    """The largest resident set among the daemon's processes (the DICOM workers)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text().split()
            status = (p / "status").read_text()
        except OSError:
            continue
        if int(stat[3]) == daemon.proc.pid or int(p.name) == daemon.proc.pid:
            out += [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")]
    return max(out)


def test_the_engine_is_the_one_listening(daemon):
    assert "pacsvault engine" in daemon.log()


def test_pdu_headers_announcing_2_gb_cost_nothing_and_the_daemon_serves_on(daemon, tmp_path):
    before = _worker_rss_kb(daemon)
    socks = []
    for kind in (0x01, 0x04, 0x01):
        # From a source of its own: the aborted sockets stay open (the peer should close
        # them and does not) and count against 127.0.0.2's pending limit until ARTIM, which
        # must not touch the modality on 127.0.0.1 pushing meanwhile.
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", daemon.dicom_port))
        s.sendall(struct.pack(">BBI", kind, 0, 2_000_000_000) + b"\x00" * 64)
        socks.append(s)
    for s in socks:
        s.settimeout(10)
        got = s.recv(16)
        assert got[:1] == b"\x07", got            # A-ABORT, not a 2 GB allocation
    assert _worker_rss_kb(daemon) < before + 50_000
    make_ct_series(tmp_path / "ct", 3, size=20_000)
    assert storescu(daemon.dicom_port, tmp_path / "ct").returncode == 0
    assert daemon.status()["instances"] == 3
    assert "Traceback" not in daemon.log()


def test_sockets_that_never_associate_are_closed_and_a_modality_gets_in(daemon):
    # pynetdicom kept such sockets open for as long as they stayed: with them open, every
    # legitimate association was refused "Local Limit Exceeded". ARTIM closes them.
    idle = [socket.create_connection(("127.0.0.1", daemon.dicom_port)) for _ in range(40)]
    for s in idle:
        s.sendall(b"\x01\x00")                     # the start of a header, then nothing
    time.sleep(0.5)
    assert echoscu(daemon.dicom_port).returncode != 0   # 3 pending from here per worker: full
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and echoscu(daemon.dicom_port).returncode != 0:
        time.sleep(1)
    assert echoscu(daemon.dicom_port).returncode == 0
    assert time.monotonic() < deadline - 45          # within ARTIM (5 s) and a margin
    for s in idle:
        s.close()


def test_one_source_holding_idle_sockets_does_not_starve_another(daemon):
    # An attacker on 127.0.0.2 opens 40 sockets and sends nothing. Beyond 3 per worker
    # (max_pending_per_source) they are closed at once, and the modality on 127.0.0.1
    # is served at once, not after ARTIM.
    idle = []
    for _ in range(40):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", daemon.dicom_port))
        idle.append(s)
    time.sleep(0.5)
    t0 = time.monotonic()
    assert echoscu(daemon.dicom_port).returncode == 0
    assert time.monotonic() - t0 < 3
    closed = 0
    for s in idle:
        s.settimeout(0.2)
        try:
            closed += s.recv(1) == b""
        except socket.timeout:
            pass
        s.close()
    assert 40 - 2 * 3 <= closed < 40            # the over-limit ones, not the others
    assert "connections from 127.0.0.2 refused" in daemon.log()


def test_a_service_not_offered_is_answered_unrecognized_and_the_association_goes_on(daemon):
    # Storage Commitment's N-ACTION carries a data set: it is read, dropped and
    # answered 0x0211 (unrecognized operation), and the association carries on.
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    commitment = "1.2.840.10008.1.20.1"             # Storage Commitment Push Model
    ae.add_requested_context(commitment)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="PACSVAULT")
    assert assoc.is_established
    request = Dataset()
    request.TransactionUID = "1.2.3.4.5"
    status, _ = assoc.send_n_action(request, 1, commitment, "1.2.840.10008.1.20.1.1")
    assert status.Status == 0x0211
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def _associate(port: int, abstract: str, ts: str):  # noqa: ANN202
    """A raw association as a hostile peer drives it (our codec as the client)."""
    from archive.dicom.net import association as A
    from archive.dicom.net import pdu as P

    s = socket.create_connection(("127.0.0.1", port))
    a = A.Association(requestor=True, max_pdu_length=65536)
    a.request_association(P.AssociateRQ("PACSVAULT", "STORESCU", (P.PresentationContextRQ(1, abstract, (ts,)),),
                                        P.UserInformation(max_length=65536, implementation_class_uid="1.2.3")))
    s.sendall(a.data_to_send())
    s.settimeout(10)
    while not isinstance(ev := a.next_event(), A.Accepted):
        assert ev is None, ev
        a.receive_data(s.recv(65536))
    return s, a


def _response(s, a):  # noqa: ANN001, ANN202
    from archive.dicom.net import dimse

    while True:
        ev = a.next_event()
        if isinstance(ev, dimse.CommandReceived):
            return ev.command
        if ev is None:
            a.receive_data(s.recv(65536))


def test_a_c_store_whose_sop_class_is_not_its_contexts_is_refused(daemon, tmp_path):
    from archive.dicom.net import dimse
    from tests.hostile.test_dicom_input import minimal

    mr, ct = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2"
    s, a = _associate(daemon.dicom_port, mr, "1.2.840.10008.1.2.1")
    # Command and data set agree (CT), the context was negotiated for MR.
    a.send_message(1, dimse.Command(dimse.C_STORE_RQ, message_id=1, affected_sop_class=ct,
                                    affected_sop_instance="1.2.3.4.5", priority=0,
                                    data_set_type=dimse.DATA_SET_PRESENT),
                   minimal(b"1.2.3.4.5", sop_class=ct.encode()))
    s.sendall(a.data_to_send())
    rsp = _response(s, a)
    assert rsp.status == 0xA900 and rsp.message_id_responded_to == 1
    a.request_release()
    s.sendall(a.data_to_send())
    s.close()
    assert daemon.status()["instances"] == 0

