"""Our own DICOM engine (archive/dicom/net) answering C-ECHO on a real socket to
independent implementations: dcmtk echoscu and pynetdicom (async operations
window, role selection, odd PDU sizes). And the timeouts a hostile peer meets:
ARTIM for a connection that never associates, and a PDU dripped a byte at a
time cut off within the idle timeout of its first byte."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from archive.dicom.net import association as A
from archive.dicom.net import dimse, driver
from archive.dicom.net import pdu as P
from archive.dicom.net.negotiation import Offer, answer
from tests.support.daemon import echoscu

pytestmark = pytest.mark.needs_dcmtk

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
OFFER = Offer("PACSVAULT", frozenset({VERIFICATION, CT}), (EXPLICIT, IMPLICIT), 16384,
              "1.2.3.4", "PV_TEST")


class EchoSCP:
    def __init__(self) -> None:
        self.closed: list[A.Event | None] = []

    def on_request(self, rq: P.AssociateRQ) -> P.AssociateAC | P.AssociateRJ:
        return answer(rq, OFFER)

    def on_event(self, assoc: A.Association, event) -> None:  # noqa: ANN001
        if isinstance(event, dimse.CommandReceived) and event.command.command_field == dimse.C_ECHO_RQ:
            assoc.send_message(event.context_id, dimse.Command(
                dimse.C_ECHO_RSP, message_id_responded_to=event.command.message_id,
                affected_sop_class=VERIFICATION, status=0x0000))

    def on_close(self, assoc: A.Association, how: A.Event | None) -> None:
        self.closed.append(how)


@pytest.fixture
def server():
    handler = EchoSCP()
    lsock = socket.create_server(("127.0.0.1", 0))
    timeouts = driver.Timeouts(artim_s=1.0, idle_s=2.0)
    stop = threading.Event()

    def loop() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except socket.timeout:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=driver.serve, daemon=True, args=(
                conn, A.Association(requestor=False, max_pdu_length=OFFER.max_pdu_length),
                handler, timeouts)).start()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield lsock.getsockname()[1], handler
    stop.set()
    t.join()
    lsock.close()


def test_dcmtk_echoscu_gets_an_answer(server):
    port, handler = server
    r = echoscu(port)
    assert r.returncode == 0, r.stderr
    time.sleep(0.2)
    assert any(isinstance(h, A.ReleaseRequested) for h in handler.closed)


@pytest.mark.parametrize("max_pdu", [0, 4096, 16382, 65536])
def test_pynetdicom_echoes_with_async_window_roles_and_odd_pdu_sizes(server, max_pdu):
    from pynetdicom import AE, build_role

    port, _ = server
    ae = AE(ae_title="PYNET")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT, [IMPLICIT])
    ae.add_requested_context("1.2.3.999.unsupported")
    from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    # As a requestor pynetdicom announces the max_pdu given here (maximum_pdu_size is
    # what it announces as an acceptor).
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSVAULT", max_pdu=max_pdu,
                         ext_neg=[build_role(CT, scp_role=True), window])
    assert assoc.is_established
    accepted = {c.abstract_syntax: c.transfer_syntax[0] for c in assoc.accepted_contexts}
    assert accepted == {VERIFICATION: IMPLICIT, CT: IMPLICIT}
    assert [c.abstract_syntax for c in assoc.rejected_contexts] == ["1.2.3.999.unsupported"]
    for _ in range(3):
        assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert assoc.is_released


def test_a_connection_that_never_associates_is_closed_by_artim(server):
    port, handler = server
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()
    s.settimeout(10)
    assert s.recv(10) == b""                  # closed, nothing sent (AA-2)
    assert 0.8 < time.monotonic() - t0 < 5


def test_a_pdu_dripped_a_byte_at_a_time_is_cut_off_after_the_idle_timeout(server):
    port, _ = server
    rq = P.encode(P.AssociateRQ("PACSVAULT", "DRIP", (P.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),),
                                P.UserInformation(max_length=16384, implementation_class_uid="1.2")))
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(rq)
    s.settimeout(5)
    assert s.recv(6)[0] == P.ASSOCIATE_AC
    s.recv(65536)
    # A P-DATA announcing 1000 bytes, sent a byte every 0.3 s: each byte is within any
    # per-read timeout, but the PDU as a whole must finish within idle_s (2 s).
    t0 = time.monotonic()
    header = struct.pack(">BBI", P.P_DATA_TF, 0, 1000)
    closed = None
    for b in header + b"\x00" * 1000:
        try:
            s.send(bytes([b]))
        except OSError:
            closed = time.monotonic() - t0
            break
        time.sleep(0.3)
        if time.monotonic() - t0 > 8:
            break
    if closed is None:
        s.settimeout(1)
        try:
            data = s.recv(100)
        except OSError:
            data = b""
        assert data[:1] in (b"", bytes([P.ABORT])), data
        closed = time.monotonic() - t0
    assert closed < 6


def test_a_2_gb_pdu_header_is_aborted_without_allocating(server):
    port, _ = server
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack(">BBI", P.ASSOCIATE_RQ, 0, 2_000_000_000))
    s.settimeout(5)
    got = s.recv(100)
    assert got[:1] == bytes([P.ABORT]) and got[-1] == P.INVALID_PDU_PARAMETER_VALUE
