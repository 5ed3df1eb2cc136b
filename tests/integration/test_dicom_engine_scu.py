"""Our SCU (archive/dicom/net/client.py) against real peers on loopback: dcmtk
storescp (bit-preserving, small and large maximum PDU lengths) and Orthanc; a
rejection, an abort and a peer that stops answering; a large object sent with
bounded memory."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from archive.dicom.net import client as C
from archive.dicom.net import dimse
from archive.dicom.net import pdu as P
from archive.dicom.part10 import dataset_offset
from tests.support.daemon import dcmtk_env, free_port
from tests.support.dataset import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_BASELINE,
    RLE,
    make_instance,
)
from tests.support.needs import missing
from tests.support.storescp import StoreSCP, storescp_binary

SYNTAXES = [("CT", EXPLICIT_LE), ("CT", IMPLICIT_LE), ("MR", EXPLICIT_BE), ("CR", DEFLATED_LE),
            ("US", JPEG_BASELINE), ("US", RLE)]
FAST = C.Timeouts(connect_s=5, network_s=10, dimse_s=10)


def data_set(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(dataset_offset(f))
        return f.read()


def contexts_for(made) -> list[tuple[str, list[str]]]:  # noqa: ANN001
    """Verification, then one context per (SOP class, transfer syntax) pair."""
    return [(C.VERIFICATION, [IMPLICIT_LE])] + [
        (c, [t]) for c, t in sorted({(m.sop_class, m.transfer_syntax) for m in made})]


def need_storescp() -> None:
    if storescp_binary() is None:
        missing("dcmtk storescp is not installed")


@pytest.fixture
def made(tmp_path):
    # One PDU at 4 KiB; many at 4 KiB and one at 128 KiB; several at 128 KiB.
    return [make_instance(tmp_path / "in" / f"{kind}-{ts}.dcm", kind=kind, ts=ts,
                          size=[3_000, 70_000, 300_000][i % 3])
            for i, (kind, ts) in enumerate(SYNTAXES)]


@pytest.mark.needs_dcmtk
@pytest.mark.parametrize("max_pdu", [4096, 131072])
def test_storescp_receives_every_data_set_byte_identical(tmp_path, made, max_pdu):
    need_storescp()
    scp = StoreSCP(tmp_path / "scp", extra_args=("+B", "--max-pdu", str(max_pdu))).start()
    try:
        with C.associate("127.0.0.1", scp.port, called_ae=scp.aet, calling_ae="PACSVAULT",
                         contexts=contexts_for(made), timeouts=FAST) as a:
            assert a.peer_max_pdu_length == max_pdu
            assert a.echo() == 0
            statuses = [a.store(m.sop_class, m.sop_uid, m.path,
                                transfer_syntax=m.transfer_syntax).status for m in made]
            # The same data set as bytes (not a file) on the context found by its ID.
            ctx = a.context_for(made[0].sop_class, made[0].transfer_syntax)
            again = a.store(made[0].sop_class, made[0].sop_uid, data_set(made[0].path),
                            context_id=ctx.id)
            ids = a._message_id
        assert statuses == [0] * len(made) and again.status == 0
        assert ids == len(made) + 2                 # the echo, the stores, the second one
        got = {p.name.split(".", 1)[1]: p for p in scp.received()}
        assert set(got) == {m.sop_uid for m in made}
        for m in made:
            assert data_set(got[m.sop_uid]) == data_set(m.path), m.transfer_syntax
    finally:
        scp.stop()


@pytest.mark.needs_dcmtk
def test_a_context_the_peer_did_not_accept_is_refused_before_sending(tmp_path, made):
    need_storescp()
    scp = StoreSCP(tmp_path / "scp", accept_all=False).start()   # uncompressed only
    try:
        with C.associate("127.0.0.1", scp.port, called_ae=scp.aet, calling_ae="PACSVAULT",
                         contexts=contexts_for(made), timeouts=FAST) as a:
            jpeg = next(m for m in made if m.transfer_syntax == JPEG_BASELINE)
            assert a.context_for(jpeg.sop_class, JPEG_BASELINE) is None
            with pytest.raises(C.ScuError, match="no accepted presentation context"):
                a.store(jpeg.sop_class, jpeg.sop_uid, jpeg.path, transfer_syntax=JPEG_BASELINE)
            ct = next(m for m in made if m.transfer_syntax == EXPLICIT_LE)
            assert a.store(ct.sop_class, ct.sop_uid, ct.path, transfer_syntax=EXPLICIT_LE
                           ).status == 0                # the association is still good
    finally:
        scp.stop()


@pytest.mark.needs_dcmtk
def test_a_rejected_association_says_why(tmp_path):
    need_storescp()
    port = free_port()
    log = open(tmp_path / "refuse.log", "wb")
    proc = subprocess.Popen([storescp_binary(), "--refuse", "-aet", "STORESCP", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "storescp --refuse did not listen"
                time.sleep(0.1)
        with pytest.raises(C.AssociationRejected) as e:
            C.associate("127.0.0.1", port, called_ae="STORESCP", calling_ae="PACSVAULT",
                        contexts=[(C.VERIFICATION, [IMPLICIT_LE])], timeouts=FAST)
        assert (e.value.result, e.value.source, e.value.reason) == (1, 1, 1)
        assert str(e.value) == ("association rejected (permanent, by the service user: "
                                "no reason given)")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_a_refused_connection_is_a_clear_error():
    with pytest.raises(C.ConnectFailed, match="cannot connect: connection refused"):
        C.associate("127.0.0.1", free_port(), called_ae="X", calling_ae="PACSVAULT",
                    contexts=[(C.VERIFICATION, [IMPLICIT_LE])], timeouts=FAST)


@pytest.mark.needs_dcmtk
def test_a_peer_abort_during_a_store_is_a_clear_error(tmp_path, made):
    need_storescp()
    scp = StoreSCP(tmp_path / "scp", extra_args=("--abort-during",)).start()
    try:
        a = C.associate("127.0.0.1", scp.port, called_ae=scp.aet, calling_ae="PACSVAULT",
                        contexts=contexts_for(made), timeouts=FAST)
        m = made[1]
        with pytest.raises(C.AssociationAborted, match="aborted by the peer"):
            a.store(m.sop_class, m.sop_uid, m.path, transfer_syntax=m.transfer_syntax)
        assert not a.is_established
        with pytest.raises(C.ScuError, match="no longer established"):
            a.store(m.sop_class, m.sop_uid, m.path, transfer_syntax=m.transfer_syntax)
    finally:
        scp.stop()


class SilentPeer:
    """A raw socket server: accepts the association (or not), reads what comes, never
    answers a request; records whether an A-ABORT arrived."""

    def __init__(self, *, accept: bool) -> None:
        self.accept = accept
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[P.Pdu] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        d = P.PduDecoder(max_pdu_length=1 << 20)
        with conn:
            while data := conn.recv(65536):
                d.receive(data)
                while (pdu := d.next_pdu()) is not None:
                    self.received.append(pdu)
                    if isinstance(pdu, P.AssociateRQ) and self.accept:
                        conn.sendall(P.encode(P.AssociateAC(pdu.called_ae, pdu.calling_ae, tuple(
                            P.PresentationContextAC(c.id, P.ACCEPTANCE, c.transfer_syntaxes[0])
                            for c in pdu.contexts), P.UserInformation(max_length=16384))))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("accept", [True, False])
def test_a_peer_that_stops_answering_times_out_and_is_aborted(tmp_path, accept):
    peer = SilentPeer(accept=accept)
    m = make_instance(tmp_path / "ct.dcm", size=50_000)
    timeouts = C.Timeouts(connect_s=2, network_s=1, dimse_s=2)
    t = time.monotonic()
    try:
        with pytest.raises(C.PeerTimeout) as e:
            with C.associate("127.0.0.1", peer.port, called_ae="SILENT", calling_ae="PACSVAULT",
                             contexts=[(m.sop_class, [EXPLICIT_LE])], timeouts=timeouts) as a:
                a.store(m.sop_class, m.sop_uid, m.path, transfer_syntax=EXPLICIT_LE)
        took = time.monotonic() - t
        peer.thread.join(5)
    finally:
        peer.close()
    what = "a response" if accept else "an answer to the association request"
    assert str(e.value) == f"no {what} from the peer within 1 s; association aborted"
    assert 0.9 < took < 4, took
    assert isinstance(peer.received[-1], P.Abort)
    if accept:       # the whole C-STORE arrived before we gave up waiting
        pdvs = [v for p in peer.received if isinstance(p, P.PData) for v in p.pdvs]
        assert b"".join(v.data for v in pdvs if not v.is_command) == data_set(m.path)
        [cmd] = [e.command for e in dimse.MessageAssembler().feed(pdvs)
                 if isinstance(e, dimse.CommandReceived)]
        assert cmd.message_id == 1 and cmd.affected_sop_instance == m.sop_uid


@pytest.mark.needs_dcmtk
def test_a_large_object_is_streamed_with_bounded_memory(tmp_path):
    need_storescp()
    big = make_instance(tmp_path / "big.dcm", size=40_000_000)
    scp = StoreSCP(tmp_path / "scp", extra_args=("+B", "--max-pdu", "131072")).start()
    try:
        with C.associate("127.0.0.1", scp.port, called_ae=scp.aet, calling_ae="PACSVAULT",
                         contexts=[(big.sop_class, [EXPLICIT_LE])], timeouts=FAST) as a:
            tracemalloc.start()
            try:
                status = a.store(big.sop_class, big.sop_uid, big.path,
                                 transfer_syntax=EXPLICIT_LE).status
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert status == 0
        assert peak < 8 * 1024 * 1024, peak             # the object is 40 MB
        [got] = scp.received()
        assert data_set(got) == data_set(big.path)
    finally:
        scp.stop()


@pytest.mark.needs_orthanc
def test_orthanc_receives_every_instance(tmp_path, made):
    from tests.support.orthanc import ORTHANC_BIN, Orthanc, orthanc_binary

    if orthanc_binary() is None:
        missing(f"{ORTHANC_BIN} not installed")
    orthanc = Orthanc(tmp_path / "orthanc", extra_config={"DicomCheckCalledAet": True}).start()
    try:
        # Orthanc checks the called AE title: a wrong one is rejected, and says so.
        with pytest.raises(C.AssociationRejected) as e:
            C.associate("127.0.0.1", orthanc.dicom_port, called_ae="NOT-ORTHANC",
                        calling_ae="PACSVAULT", contexts=contexts_for(made), timeouts=FAST)
        assert "called AE title not recognized" in str(e.value)
        with C.associate("127.0.0.1", orthanc.dicom_port, called_ae="ORTHANC",
                         calling_ae="PACSVAULT", contexts=contexts_for(made), timeouts=FAST) as a:
            assert a.echo() == 0
            statuses = [a.store(m.sop_class, m.sop_uid, m.path,
                                transfer_syntax=m.transfer_syntax).status for m in made]
        assert statuses == [0] * len(made)
        ids = orthanc.get("/instances")
        held = {orthanc.instance_tags(i)["SOPInstanceUID"]:
                orthanc.instance_metadata(i, "TransferSyntax") for i in ids}
        assert held == {m.sop_uid: m.transfer_syntax for m in made}
    finally:
        orthanc.stop()


def test_errors_are_worded_from_the_numbers_alone():
    rj = C.AssociationRejected(2, 3, 2)
    assert str(rj) == ("association rejected (transient, by the service provider "
                       "(presentation): local limit exceeded)")
    assert str(C.AssociationAborted(0, 0, by_us=False)) == (
        "association aborted by the peer (reason not specified)")
