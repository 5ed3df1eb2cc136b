"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class.

* Every storage abstract syntax is accepted (pynetdicom's unrestricted storage
  service), so retired and private classes that legacy archives hold are kept,
  in whatever transfer syntax the peer proposes first; the bytes are stored as
  received, never re-encoded.
* Received data sets are spooled to our own directory in chunks (never held in
  memory whole, a 2 GiB object included); a crash leaves the spool to be swept.
* Peers not on the allow-list are refused at association (A-ASSOCIATE-RJ,
  "calling AE title not recognized") before any data is exchanged.
* The listening socket sets SO_REUSEPORT, so several worker processes share the
  port and the kernel spreads associations over them (one GIL each).
* A TLS listener (archive/daemon/tls.py) is the same server with an SSL context:
  same handlers, so the same allow-list.
"""
from __future__ import annotations

import logging
import socket
import ssl
import tempfile
import time
import warnings
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from archive.app.ingest import IngestService, StoreRequest
from archive.config.schema import DicomSettings
from archive.daemon.dimse_status import CANNOT_UNDERSTAND, store_status
from archive.daemon.received import Received
from archive.daemon.tls import DeferredHandshake
from archive.peers import PeerRegistry
from archive.spool import RECEIVE_PREFIX

log = logging.getLogger("pacsvault.dicom")

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, with a diagnostic.
_REJECT_PERMANENT, _SERVICE_USER = 0x01, 0x01
_CALLING_AE_NOT_RECOGNIZED = 0x03


class _ReactorClock:
    """Stands in for the ``time`` module inside pynetdicom.association.

    pynetdicom's acceptor reactor sleeps a fixed 1 ms before looking for each
    decoded message, and its DUL thread sleeps 1 ms whenever it is idle: two
    such sleeps sit on the path of every C-STORE. Shortening them (measured in
    docs/performance.md) is the cheapest receive-path gain there is; every
    other sleep passes through unchanged.
    """

    def __init__(self, reactor_sleep_s: float) -> None:
        self.reactor_sleep_s = reactor_sleep_s

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.reactor_sleep_s if seconds == 0.001 else seconds)


def _decode_any_ae_title(value: str) -> tuple[bool, str]:
    return True, ""


def configure_pynetdicom(spool_dir: Path, reactor_sleep_s: float = 0.001) -> None:
    """Process-wide pynetdicom settings; called once by the serving process."""
    import pynetdicom.association

    if reactor_sleep_s != 0.001:
        pynetdicom.association.time = _ReactorClock(reactor_sleep_s)  # type: ignore[assignment]
    spool_dir.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # pynetdicom validates AE titles while decoding an A-ASSOCIATE-RQ: a calling
    # title with a backslash or a control character made it abort the association
    # and log a traceback quoting the raw title. Decode any title; the peer check
    # then refuses it with an A-ASSOCIATE-RJ (the allow-list holds only valid
    # titles, and our own outgoing titles are validated by the config).
    _config.VALIDATORS["AE"] = _decode_any_ae_title
    # pynetdicom spools with NamedTemporaryFile in the process temp dir; keep those
    # files (patient data) under our spool, which is swept at start-up.
    tempfile.tempdir = str(spool_dir)
    # ... named as ours, so that the start-up sweep (archive/spool.py) knows them
    # (pynetdicom passes no prefix, so tempfile uses this module default).
    tempfile.template = RECEIVE_PREFIX
    # pynetdicom's INFO/DEBUG lines can carry identifiers: keep them out of our log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom warns (and logs) with the offending value quoted, which may be a
    # patient's name: keep its chatter out of the daemon's output entirely.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class _ReusePortServer(DeferredHandshake, ThreadedAssociationServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def make_handlers(ingest: IngestService, peers: PeerRegistry, reactor_sleep_s: float = 0.001) -> list:
    def on_requested(event) -> None:  # noqa: ANN001
        assoc = event.assoc
        assoc.dul._run_loop_delay = reactor_sleep_s  # see _ReactorClock
        try:
            # At EVT_REQUESTED only the raw A-ASSOCIATE-RQ primitive is filled in.
            calling = str(assoc.requestor.primitive.calling_ae_title or "")
            address = assoc.requestor.address
            ok, reason = peers.check(calling, address)
        except Exception:  # fail closed: a broken check never lets a peer in
            log.exception("peer check failed; refusing association")
            ok, reason = False, "peer check failed"
        if not ok:
            log.warning("association refused: %s", reason)
            assoc.acse.send_reject(_REJECT_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNIZED)
            assoc.is_rejected = True  # tells pynetdicom not to negotiate after us
            assoc.kill()

    def on_c_store(event) -> int:  # noqa: ANN001
        req = event.request
        try:
            path = Path(event.dataset_path)
        except AttributeError:
            return CANNOT_UNDERSTAND
        result = ingest.store(StoreRequest(
            spool=path,
            sop_class=str(req.AffectedSOPClassUID or ""),
            sop_instance=str(req.AffectedSOPInstanceUID or ""),
            transfer_syntax=str(event.context.transfer_syntax),
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
        ))
        received.count(id(event.assoc), _who(event.assoc), result)
        return store_status(result.outcome)

    def on_ended(event) -> None:  # noqa: ANN001
        received.flush(id(event.assoc), ingest.catalog)

    received = Received()
    return [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_c_store),
            (evt.EVT_RELEASED, on_ended), (evt.EVT_ABORTED, on_ended),
            (evt.EVT_CONN_CLOSE, on_ended)]


def _who(assoc) -> tuple[str, str]:  # noqa: ANN001
    ae = str(assoc.requestor.ae_title).strip()
    return ae, f"{ae}@{assoc.requestor.address}"


def make_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = min(30, settings.network_timeout_s)
    ae.dimse_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.require_called_aet = settings.check_called_ae
    return ae


def start_listener(settings: DicomSettings, port: int, ingest: IngestService,
                   peers: PeerRegistry, ssl_context: ssl.SSLContext | None = None,
                   ) -> tuple[AE, ThreadedAssociationServer]:
    """Bind and serve in a background thread (TLS if ssl_context). Returns (ae, server)."""
    import threading

    ae = make_ae(settings)
    server = ae.make_server(
        (settings.bind, port),
        evt_handlers=make_handlers(ingest, peers, settings.reactor_sleep_s),
        server_class=_ReusePortServer,
        ssl_context=ssl_context,
    )
    ae._servers.append(server)  # as ae.start_server does; server.shutdown() expects it
    thread = threading.Thread(target=server.serve_forever, daemon=True,
                              name="dicom-tls-listener" if ssl_context else "dicom-listener")
    thread.start()
    return ae, server
