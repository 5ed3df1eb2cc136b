"""`pacsvault serve` on its own DICOM engine against independent implementations:
dcmtk storescu in every transfer syntax it can propose, at PDU sizes from 4096 up
each way; pynetdicom negotiating what docs/conformance.md 2.3 describes (asynchronous
operations window, role selection, user identity, odd PDU sizes); and data sets the
frame check must refuse over the socket (50,000 nested sequences, a deflate bomb)
while the daemon goes on serving. One daemon serves the module (start-up is seconds);
every count is checked as a difference."""
from __future__ import annotations

import socket
import sqlite3
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pydicom
import pytest

from archive.daemon.dimse_status import CANNOT_UNDERSTAND
from archive.dicom import walk
from archive.dicom.part10 import dataset_offset
from tests.conftest import require_tool, site_paths
from tests.hostile.test_dicom_input import crafted, minimal
from tests.support.daemon import Daemon, dcmtk_env, free_port, init_instance, run_cli
from tests.support.dataset import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_2000,
    JPEG_BASELINE,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    RLE,
    make_instance,
)
from tests.support.rss import RssSampler
from tests.support.scu import send_files
from tests.support.verify import audit, sqlite_url

pytestmark = pytest.mark.needs_dcmtk

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
JPEG_EXTENDED, JPEG_LOSSLESS_14 = "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57"
JPEG_LS_NEAR, JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90"

# Every transfer syntax storescu 3.6.7 proposes for a file it is given, with the flag
# that makes it propose it (without one it converts, and fails for compressed data).
STORESCU_TS = {
    IMPLICIT_LE: "-xi", EXPLICIT_LE: "-xe", EXPLICIT_BE: "-xb", DEFLATED_LE: "-xd",
    JPEG_BASELINE: "-xy", JPEG_EXTENDED: "-xx", JPEG_LOSSLESS_SV1: "-xs",
    JPEG_LS_LOSSLESS: "-xt", JPEG_LS_NEAR: "-xu", JPEG_2000_LOSSLESS: "-xv",
    JPEG_2000: "-xw", RLE: "-xr",
}


@pytest.fixture(scope="module")
def pv(tmp_path_factory: pytest.TempPathFactory):
    require_tool("storescu")
    root = tmp_path_factory.mktemp("conformance")
    cfg = init_instance(root / "pv")
    text = cfg.read_text()
    assert 'engine = "pacsvault"' in text       # this module is about our own engine
    cfg.write_text(text.replace("network_timeout_s = 60", "network_timeout_s = 10"))
    for ae in ("STORESCU", "PYNET"):
        run_cli(cfg, "peer", "add", ae, "127.0.0.1")
    d = Daemon(cfg, free_port(), free_port(), workers=2).start()
    yield d
    d.kill9()


def _instances(d: Daemon) -> int:
    return d.status()["instances"]


def _cataloged(d: Daemon) -> int:
    """The catalog's count without the CLI's start-up (for the pynetdicom tests)."""
    with sqlite3.connect(d.config.parent / "catalog" / "catalog.db") as c:
        return c.execute("SELECT count(*) FROM instances").fetchone()[0]


def _data_set(path: Path) -> bytes:
    with open(path, "rb") as f:
        return path.read_bytes()[dataset_offset(f):]


def _assert_stored_as_sent(d: Daemon, sent: dict[str, Path]) -> None:
    """Each object is on both sites, its data set byte for byte the sender's, and every
    copy matches its catalog SHA-256."""
    sites = site_paths(d.config)
    for sop, path in sent.items():
        want = _data_set(path)
        for name, root in sites.items():
            [stored] = root.rglob(sop + ".dcm")
            assert _data_set(stored) == want, (name, path.name)
    a = audit(sqlite_url(d.config.parent), sites)
    assert not a.bad and not a.temp_files and a.missing_copies == 0
    assert set(sent) <= a.sop_uids


def _file_in(directory: Path, ts: str, size: int) -> tuple[str, Path]:
    """A valid small object in ``ts``. Compressed syntaxes pydicom's writer does not
    list as encapsulated get the fragments of another encapsulated one, re-labelled:
    the archive stores bytes as received, it never decodes them."""
    path = directory / f"{ts}.dcm"
    if ts in (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED_LE, JPEG_BASELINE,
              JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, JPEG_2000, RLE):
        return make_instance(path, ts=ts, size=size).sop_uid, path
    made = make_instance(path, ts=JPEG_BASELINE, size=size)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    return made.sop_uid, path


class PduSniffer:
    """A loopback forwarder that records the length of every P-DATA-TF the client
    sends: proof that the sizes a test asks storescu for are the ones on the wire."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.p_data_lengths: list[int] = []
        self.max_length_announced: int | None = None
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, parse: bool) -> None:
        buf = bytearray()
        try:
            while data := src.recv(1 << 16):
                if parse:
                    buf += data
                    while len(buf) >= 6 and len(buf) >= 6 + struct.unpack_from(">I", buf, 2)[0]:
                        kind, n = buf[0], struct.unpack_from(">I", buf, 2)[0]
                        if kind == 0x04:
                            self.p_data_lengths.append(n)   # PS3.8: the variable field's length
                        elif kind == 0x01:
                            # user information item 0x50 holds sub-item 0x51 (max length)
                            i = buf.find(b"\x51\x00\x00\x04", 6 + 68, 6 + n)
                            self.max_length_announced = struct.unpack_from(">I", buf, i + 4)[0]
                        del buf[:6 + n]
                dst.sendall(data)       # after parsing: a reply means its request is counted
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.lsock.close()


# (storescu --max-pdu: what it receives, --max-send-pdu: what it sends); storescu
# allows 4096..131072 (and rounds an odd --max-pdu down: odd sizes are pynetdicom's below).
PDU_SIZES = [(4096, 4096), (131072, 16384), (16382, 65536), (65534, 131072)]


@pytest.mark.parametrize(("receive", "send"), PDU_SIZES)
def test_storescu_pushes_every_transfer_syntax_at_every_pdu_size(pv, tmp_path, receive, send):
    before = _instances(pv)
    sent: dict[str, Path] = {}
    for ts in STORESCU_TS:
        # Larger than the biggest send size, so every size is really used.
        sop, path = _file_in(tmp_path, ts, size=150_000)
        sent[sop] = path
    sniffer = PduSniffer(pv.dicom_port)
    try:
        for ts, flag in STORESCU_TS.items():
            r = subprocess.run(
                ["storescu", "-aet", "STORESCU", "-aec", "PACSVAULT", "-nh", flag,
                 "--max-pdu", str(receive), "--max-send-pdu", str(send),
                 "127.0.0.1", str(sniffer.port), str(tmp_path / f"{ts}.dcm")],
                capture_output=True, text=True, env=dcmtk_env(), timeout=60)
            # storescu exits 0 even when a store fails on its side: the count below is
            # what proves each object arrived.
            assert r.returncode == 0, (ts, r.stderr)
            assert "E:" not in r.stderr + r.stdout, (ts, r.stderr)
    finally:
        sniffer.close()
    assert sniffer.max_length_announced == receive
    # The sender filled its PDUs to the size asked (dcmtk counts the 6-byte PDU header in).
    assert send - 6 <= max(sniffer.p_data_lengths) <= send
    assert _instances(pv) == before + len(STORESCU_TS)
    _assert_stored_as_sent(pv, sent)
    assert "Traceback" not in pv.log()


# -- pynetdicom as the requestor ------------------------------------------------------------
def _ae():  # noqa: ANN202
    from pynetdicom import AE

    ae = AE(ae_title="PYNET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _ac_items(assoc, kind: type) -> list:  # noqa: ANN001
    """The user information sub-items of this type in the A-ASSOCIATE-AC as received."""
    return [i for i in assoc.acceptor.user_information if isinstance(i, kind)]


def test_pynetdicom_async_window_is_answered_1_1_and_c_stores_work(pv, tmp_path):
    from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    ae = _ae()
    ae.add_requested_context(CT, [EXPLICIT_LE])
    made = [make_instance(tmp_path / f"{i}.dcm", size=20_000) for i in range(3)]
    before = _cataloged(pv)
    assoc = ae.associate("127.0.0.1", pv.dicom_port, ae_title="PACSVAULT", ext_neg=[window])
    assert assoc.is_established
    # The item is in the answer (its absence would read as 1/1 too).
    [item] = _ac_items(assoc, AsynchronousOperationsWindowNegotiation)
    assert (item.maximum_number_operations_invoked,
            item.maximum_number_operations_performed) == (1, 1)
    assert [assoc.send_c_store(m.path).Status for m in made] == [0, 0, 0]
    assoc.release()
    assert _cataloged(pv) == before + 3
    _assert_stored_as_sent(pv, {m.sop_uid: m.path for m in made})


def test_pynetdicom_role_selection_is_answered_as_negotiation_says(pv, tmp_path):
    # negotiation.answer: each role is granted as proposed for a proposed class (the
    # SCP role lets a C-GET send its C-STOREs back on this association); a role item for
    # a class not proposed gets no answer.
    from pynetdicom import build_role
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    ae = _ae()
    ae.add_requested_context(CT, [EXPLICIT_LE])
    ae.add_requested_context(MR, [EXPLICIT_LE])
    roles = [build_role(CT, scu_role=True, scp_role=True), build_role(MR, scp_role=True),
             build_role("1.2.840.10008.5.1.4.1.1.7", scu_role=True, scp_role=True)]
    assoc = ae.associate("127.0.0.1", pv.dicom_port, ae_title="PACSVAULT", ext_neg=roles)
    assert assoc.is_established
    answered = {i.sop_class_uid: (i.scu_role, i.scp_role)
                for i in _ac_items(assoc, SCP_SCU_RoleSelectionNegotiation)}
    assert answered == {CT: (True, True), MR: (False, True)}
    ct = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT)
    assert (ct.as_scu, ct.as_scp) == (True, True)
    m = make_instance(tmp_path / "ct.dcm", size=10_000)
    assert assoc.send_c_store(m.path).Status == 0
    assoc.release()


# (what pynetdicom announces it receives, the PDU size it sends in): odd sizes, and
# 0 = no limit on what it receives. It sends at most what the daemon announced.
ODD_SIZES = [(4097, 12345), (12345, 4097), (0, None)]


@pytest.mark.parametrize(("receive", "send"), ODD_SIZES)
def test_pynetdicom_stores_a_1_mb_object_with_odd_pdu_sizes(pv, tmp_path, receive, send):
    from pynetdicom.pdu_primitives import MaximumLengthNotification

    ae = _ae()
    ae.add_requested_context(CT, [EXPLICIT_LE])
    m = make_instance(tmp_path / "big.dcm", size=1 << 20)
    before = _cataloged(pv)
    sniffer = PduSniffer(pv.dicom_port)
    # (associate's max_pdu is what a requestor announces; AE.maximum_pdu_size is not)
    assoc = ae.associate("127.0.0.1", sniffer.port, ae_title="PACSVAULT", max_pdu=receive)
    assert assoc.is_established
    [announced] = _ac_items(assoc, MaximumLengthNotification)
    assert announced.maximum_length_received == 262144      # [dicom] max_pdu default
    if send is not None:
        # A sender may use PDUs smaller than the peer's maximum: pynetdicom fragments by
        # the value it holds for the acceptor's.
        announced.maximum_length_received = send
    assert assoc.send_c_store(m.path).Status == 0
    assoc.release()
    sniffer.close()
    assert sniffer.max_length_announced == receive
    assert max(sniffer.p_data_lengths) == (send or 262144)    # on the wire, as asked
    assert _cataloged(pv) == before + 1
    _assert_stored_as_sent(pv, {m.sop_uid: m.path})


def test_user_identity_is_read_and_ignored_without_a_response(pv, tmp_path):
    # docs/conformance.md 2.3: not used, no user identity response sent, even when one
    # is asked for; and the passcode never reaches the log.
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    for kind, secondary in ((1, b""), (2, b"s3cret-passcode")):
        identity = UserIdentityNegotiation()
        identity.user_identity_type = kind
        identity.primary_field = b"alice-the-operator"
        if secondary:
            identity.secondary_field = secondary
        identity.positive_response_requested = True
        ae = _ae()
        ae.add_requested_context(CT, [EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", pv.dicom_port, ae_title="PACSVAULT",
                             ext_neg=[identity])
        assert assoc.is_established, kind
        assert _ac_items(assoc, UserIdentityNegotiation) == []
        m = make_instance(tmp_path / f"u{kind}.dcm", size=5_000)
        assert assoc.send_c_store(m.path).Status == 0
        assoc.release()
    assert "s3cret" not in pv.log() and "alice-the-operator" not in pv.log()


# -- data sets the frame check refuses, sent over the socket ----------------------------------
def _nested(depth: int) -> bytes:
    """``depth`` sequences of defined length, each holding one item holding the next:
    20 bytes a level, written outside in (each length counts everything inside it)."""
    return b"".join(struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 8 + 20 * i)
                    + struct.pack("<HHI", 0xFFFE, 0xE000, 20 * i) for i in reversed(range(depth)))


def _serves_on(d: Daemon, tmp_path: Path) -> None:
    good = make_instance(tmp_path / "after.dcm", size=5_000)
    assert send_files(d.dicom_port, [good.path], aet="PYNET") == [0]
    _assert_stored_as_sent(d, {good.sop_uid: good.path})
    assert d.proc.poll() is None and "Traceback" not in d.log()


def test_50000_nested_sequences_are_refused_and_the_daemon_serves_on(pv, tmp_path):
    # The walk stops at depth 32 with "cannot understand"; without that check the
    # recursion fails and the answer is another status, with a traceback in the log.
    sop = "1.2.826.0.1.3680043.9.7.1.50000"
    ds = minimal(sop.encode()) + _nested(50_000)
    assert len(ds) > 1_000_000                         # a megabyte, many PDUs
    f = crafted(tmp_path / "deep.dcm", sop, ds)
    before = _cataloged(pv)
    assert send_files(pv.dicom_port, [f], aet="PYNET") == [CANNOT_UNDERSTAND]
    assert _cataloged(pv) == before
    assert not [p for root in site_paths(pv.config).values() for p in root.rglob(sop + "*")]
    _serves_on(pv, tmp_path)


def test_a_deflate_bomb_is_refused_without_memory_and_the_daemon_serves_on(pv, tmp_path):
    # 1.1 MB deflated, past walk.MAX_INFLATED (1 GiB) inflated. Full flushes make each
    # block of a MiB of zeros the same bytes, so the bomb is built in milliseconds; the
    # daemon inflates to a scratch file, so its memory does not grow with the bomb.
    sop = "1.2.826.0.1.3680043.9.7.1.1099"
    mib = walk.MAX_INFLATED // (1 << 20) + 64
    head = minimal(sop.encode()) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, mib << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"\x00" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    bomb = start + block * mib + c.flush()
    assert len(bomb) < 2 << 20
    f = crafted(tmp_path / "bomb.dcm", sop, bomb, ts=DEFLATED_LE)
    before = _cataloged(pv)
    with RssSampler(pv.proc.pid) as rss:
        assert send_files(pv.dicom_port, [f], aet="PYNET") == [CANNOT_UNDERSTAND]
    assert rss.samples > 5 and rss.peak_growth_kb < 100_000, rss.peak_growth_kb
    assert "inflates to more than" in pv.log()
    assert _cataloged(pv) == before
    _serves_on(pv, tmp_path)
