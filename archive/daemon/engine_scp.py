"""The DICOM listener on pacsvault's own engine (archive/dicom/net): C-ECHO,
C-STORE for every storage SOP class, C-FIND and C-MOVE (Patient and Study Root),
one thread per association.

* The calling AE and source address are checked on the A-ASSOCIATE-RQ, before
  anything else is read; the request itself is bounded (64 KiB).
* Every storage abstract syntax is accepted, in the first transfer syntax the
  peer proposes that is a known one; the bytes are stored as received.
* A data set up to ``in_memory_max_bytes`` is kept in memory; a larger one goes
  to a spool file fragment by fragment as it arrives (memory per association is
  that threshold plus one PDU). Then the ingest use case; the response is sent
  only after it returns, so an acknowledgement means what it always meant.
* Connections over ``max_associations`` are answered with A-ASSOCIATE-RJ
  (transient, local limit exceeded); a source address with
  ``max_pending_per_source`` connections that have not associated yet has
  further connections closed at once. ARTIM closes connections that never send a request, and a PDU must
  arrive whole within the network timeout of its first byte.
* A C-FIND or C-MOVE identifier is kept in memory up to MAX_IDENTIFIER_BYTES (a
  larger one is refused, 0xC000). A C-FIND's matches are sent one pending response
  per driver step; a C-MOVE's sub-operations run in a thread of their own while
  the association's thread sends their counts; either way a C-CANCEL that arrives
  meanwhile stops them (0xFE00).
* Peer strings are made printable before they reach a log or the ingest path.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from pydicom.uid import AllTransferSyntaxes

from archive.app import find as F
from archive.app import retrieve as R
from archive.app.ingest import IngestService, StoreRequest
from archive.config.schema import DicomSettings
from archive.daemon.dimse_status import DATASET_MISMATCH, OUT_OF_RESOURCES, store_status
from archive.daemon.received import Received
from archive.daemon.tls import HANDSHAKE_TIMEOUT_S
from archive.dicom.identifier import COMMAND_TRANSFER_SYNTAXES, MAX_IDENTIFIER_BYTES
from archive.dicom.identifier import encode as ident_encode
from archive.dicom.net import association as A
from archive.dicom.net import dimse, driver
from archive.dicom.net import pdu as P
from archive.dicom.net.negotiation import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    LOCAL_LIMIT_EXCEEDED,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOURCE_PRESENTATION,
    SOURCE_USER,
    Offer,
    answer,
)
from archive.dicom.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    PREAMBLE,
    dataset_offset,
    file_meta,
)
from archive.peers import PeerRegistry
from archive.spool import RECEIVE_PREFIX
from dr.deliver import DeliveryRefused

log = logging.getLogger("pacsvault.dicom")

VERIFICATION = "1.2.840.10008.1.1"
WARNINGS_PER_SOURCE = 20          # refusal lines a minute per kind and source address
UNRECOGNIZED_OPERATION = 0x0211
SEND_CHUNK = 1 << 20              # a C-GET sends a stored object in pieces of this size
# The query/retrieve requests and the models each is offered for.
_QR_MODELS = {dimse.C_FIND_RQ: F.MODELS, dimse.C_MOVE_RQ: R.MOVE_MODELS,
              dimse.C_GET_RQ: R.GET_MODELS}
# For a command whose UIDs cannot go into a meta group (the ingest path refuses it
# anyway): a Part 10 header with an empty meta group.
_EMPTY_META = PREAMBLE + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"


def _spool_head(command: dimse.Command, transfer_syntax: str) -> bytes:
    """The spool file is Part 10, as the ingest path reads it: a deflated data set
    can only be read with its transfer syntax in the meta."""
    try:
        return file_meta(command.affected_sop_class or "", command.affected_sop_instance or "",
                         transfer_syntax)
    except (UnicodeEncodeError, ValueError, struct.error):
        return _EMPTY_META


def printable(text: str) -> str:
    """A peer string safe for a log line: control characters shown as '?'."""
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text).strip()


class _Store:
    """One C-STORE in flight: its command and its data set so far, in memory up to
    ``in_memory_max`` bytes, in a spool file beyond (written as it arrives)."""

    def __init__(self, context_id: int, command: dimse.Command, transfer_syntax: str,
                 spool_dir: Path, in_memory_max: int) -> None:
        self.context_id, self.command = context_id, command
        self.spool_dir, self.in_memory_max = spool_dir, in_memory_max
        self.buffer: bytearray | None = bytearray(_spool_head(command, transfer_syntax))
        self.path: Path | None = None
        self.file = None

    def write(self, data: bytes | memoryview) -> None:
        if self.buffer is not None and len(self.buffer) + len(data) <= self.in_memory_max:
            self.buffer += data
            return
        if self.file is None:       # over the threshold: everything so far to the spool
            fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix=RECEIVE_PREFIX)
            self.path = Path(name)
            self.file = os.fdopen(fd, "wb", buffering=0)
            self.file.write(self.buffer)
            self.buffer = None
        self.file.write(data)

    def finish(self) -> tuple[Path | None, bytes | None]:
        """(spool path, None) or (None, the Part 10 image in memory)."""
        if self.file is not None:
            self.file.close()
            return self.path, None
        data, self.buffer = bytes(self.buffer or b""), None
        return None, data

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.buffer = None


class _Session:
    """The archive's side of one association (driver.Handler)."""

    def __init__(self, listener: "EngineListener", address: str, over_limit: bool) -> None:
        self.listener = listener
        self.address = address
        self.over_limit = over_limit
        self.calling = ""
        self.contexts: dict[int, str] = {}          # accepted context id -> transfer syntax
        self.store: _Store | None = None
        self.conn: socket.socket | None = None
        self.associating = False        # its A-ASSOCIATE-RQ has arrived
        self.abstract: dict[int, str] = {}          # context id -> abstract syntax
        # A request refused before its data set arrived: (context, command, status),
        # answered once the data set is in (and dropped).
        self.refused: tuple[int, dimse.Command, int] | None = None
        self.query: tuple[int, dimse.Command, bytearray] | None = None   # identifier arriving
        self.running: dimse.Command | None = None     # the C-FIND/MOVE/GET being answered
        self.cancelled = False
        self.awaiting: int | None = None        # a C-GET's C-STORE waiting for its answer
        self.store_answer: dimse.Command | None = None
        self.message_ids = 0
        # Storage classes the requestor accepted to receive (SCP role): C-GET sends those.
        self.receives: set[str] = set()
        self.find_options: dict[str, tuple[bool, bool]] = {}   # C-FIND extended negotiation

    def on_request(self, rq: P.AssociateRQ) -> P.AssociateAC | P.AssociateRJ:
        self.associating = True
        self.calling = printable(rq.calling_ae)
        s = self.listener.settings
        if self.over_limit:
            self.listener.warn_once_a_minute(
                ("limit", self.address), "association from %s refused: %d associations open "
                "(dicom.max_associations)", self.address, s.max_associations)
            return P.AssociateRJ(REJECTED_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
        try:
            ok, reason = self.listener.peers.check(rq.calling_ae, self.address)
        except Exception:  # fail closed: a broken check never lets a peer in
            log.exception("peer check failed; refusing association")
            ok, reason = False, "peer check failed"
        if not ok:
            self.listener.warn_once_a_minute(("peer", self.address, printable(reason)),
                                             "association refused: %s", printable(reason))
            return P.AssociateRJ(REJECTED_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNIZED)
        if s.check_called_ae and rq.called_ae.strip() != s.ae_title:
            self.listener.warn_once_a_minute(
                ("called", self.address, self.calling), "association from %s refused: called AE "
                "title is not ours", self.calling)
            return P.AssociateRJ(REJECTED_PERMANENT, SOURCE_USER, CALLED_AE_NOT_RECOGNIZED)
        ac = answer(rq, self.listener.offer)
        if isinstance(ac, P.AssociateAC):
            self.contexts = {c.id: c.transfer_syntax for c in ac.contexts if c.result == P.ACCEPTANCE}
            self.abstract = {c.id: c.abstract_syntax for c in rq.contexts}
            self.receives = {r.sop_class for r in ac.user.roles if r.scp}
            # C-FIND extended negotiation as agreed: (relational, combined date-time)
            self.find_options = {sop: (info[:1] == b"\x01", info[1:2] == b"\x01")
                                 for sop, info in ac.user.extended}
        return ac

    def on_event(self, assoc: A.Association, event: dimse.CommandReceived | dimse.DataFragment
                 ) -> None:
        if isinstance(event, dimse.CommandReceived):
            cmd = event.command
            if event.context_id not in self.contexts:
                assoc.abort(P.UNEXPECTED_PDU_PARAMETER, source=P.ABORT_SOURCE_PROVIDER)
            elif cmd.command_field == dimse.C_ECHO_RQ:
                assoc.send_message(event.context_id, dimse.Command(
                    dimse.C_ECHO_RSP, message_id_responded_to=cmd.message_id,
                    affected_sop_class=VERIFICATION, status=0))
            elif cmd.command_field == dimse.C_STORE_RQ and cmd.has_data_set and \
                    cmd.affected_sop_class != self.abstract.get(event.context_id):
                # The SOP class must be the one the context was negotiated for (the ingest
                # path then checks the data set's against it).
                log.warning("C-STORE from %s refused: SOP class differs from its presentation "
                            "context", self.calling)
                self.refused = (event.context_id, cmd, DATASET_MISMATCH)
            elif cmd.command_field == dimse.C_STORE_RQ and cmd.has_data_set:
                self.store = _Store(event.context_id, cmd, self.contexts[event.context_id],
                                    self.listener.spool_dir,
                                    self.listener.settings.in_memory_max_bytes)
            elif cmd.command_field in _QR_MODELS and cmd.has_data_set:
                self._qr_request(event.context_id, cmd)
            elif cmd.command_field == dimse.C_STORE_RSP and self.awaiting is not None and \
                    cmd.message_id_responded_to == self.awaiting:
                self.store_answer = cmd          # a C-GET sub-operation's answer
            elif cmd.command_field == dimse.C_CANCEL_RQ:
                if self.running is not None and \
                        cmd.message_id_responded_to == self.running.message_id:
                    self.cancelled = True       # seen by the running job at its next step
            elif not cmd.is_request:
                assoc.abort(P.UNEXPECTED_PDU_PARAMETER, source=P.ABORT_SOURCE_PROVIDER)
            elif cmd.has_data_set:
                self.refused = (event.context_id, cmd, UNRECOGNIZED_OPERATION)
            else:
                self._answer(assoc, event.context_id, cmd, UNRECOGNIZED_OPERATION)
            return
        if self.query is not None:
            return self._query_fragment(assoc, event)
        st = self.store
        if st is None:
            # The data set of a refused request: dropped, then answered.
            if event.is_last and self.refused is not None:
                self._answer(assoc, *self.refused)
                self.refused = None
            return
        st.write(event.data)
        if event.is_last:
            self.store = None
            path, data = st.finish()
            try:
                status = self._ingest(st, path, data)
            finally:
                st.discard()
            cmd = st.command
            assoc.send_message(st.context_id, dimse.Command(
                dimse.C_STORE_RSP, message_id_responded_to=cmd.message_id,
                affected_sop_class=cmd.affected_sop_class,
                affected_sop_instance=cmd.affected_sop_instance, status=status))

    def _qr_request(self, context_id: int, cmd: dimse.Command) -> None:
        """A C-FIND, C-MOVE or C-GET: its identifier is collected, or it is refused
        once its data set has arrived."""
        service = self.listener.finder if cmd.command_field == dimse.C_FIND_RQ \
            else self.listener.mover
        abstract = self.abstract.get(context_id)
        if service is None or abstract not in _QR_MODELS[cmd.command_field]:
            self.refused = (context_id, cmd, UNRECOGNIZED_OPERATION)
        elif cmd.affected_sop_class != abstract:
            self.refused = (context_id, cmd, F.IDENTIFIER_DOES_NOT_MATCH)
        else:
            self.query = (context_id, cmd, bytearray())

    def _query_fragment(self, assoc: A.Association, event: dimse.DataFragment
                        ) -> Iterator[None] | None:
        context_id, cmd, data = self.query  # type: ignore[misc]
        if len(data) <= MAX_IDENTIFIER_BYTES:
            data += event.data[:MAX_IDENTIFIER_BYTES + 1 - len(data)]   # the rest is dropped
        if not event.is_last:
            return None
        self.query = None
        if len(data) > MAX_IDENTIFIER_BYTES:
            self._answer(assoc, context_id, cmd, F.UNABLE_TO_PROCESS,
                         f"identifier longer than {MAX_IDENTIFIER_BYTES} bytes")
            return None
        if cmd.command_field == dimse.C_MOVE_RQ:
            return self._move(assoc, context_id, cmd, bytes(data))
        if cmd.command_field == dimse.C_GET_RQ:
            return self._get(assoc, context_id, cmd, bytes(data))
        return self._find(assoc, context_id, cmd, bytes(data))

    def _find(self, assoc: A.Association, context_id: int, cmd: dimse.Command, data: bytes
              ) -> Iterator[None]:
        """The C-FIND as a driver job: one pending response per step."""
        self.running, self.cancelled = cmd, False
        answer, status = None, F.SUCCESS
        try:
            relational, combined = self.find_options.get(self.abstract.get(context_id, ""),
                                                         (False, False))
            answer = self.listener.finder.find(  # type: ignore[union-attr]
                cmd.affected_sop_class or "", self.contexts[context_id], data,
                calling_ae=self.calling, source=f"{self.calling}@{self.address}",
                combined_datetime=combined, relational=relational)
            status, comment = answer.status, answer.comment
            pending = dimse.Command(dimse.C_FIND_RSP, message_id_responded_to=cmd.message_id,
                                    affected_sop_class=cmd.affected_sop_class,
                                    data_set_type=dimse.DATA_SET_PRESENT, status=F.PENDING)
            try:
                for encoded in answer.matches:
                    if self.cancelled:
                        status, comment = F.CANCELLED, ""
                        break
                    assoc.send_message(context_id, pending, encoded)
                    yield
                if self.cancelled:
                    status, comment = F.CANCELLED, ""
            except Exception:
                log.exception("C-FIND from %s failed while answering", self.calling)
                status, comment = F.UNABLE_TO_PROCESS, "the matches could not be read"
            if not assoc.closed:
                self._answer(assoc, context_id, cmd, status, comment)
                yield                           # sent: the audit record does not delay it
        finally:
            self.running, self.cancelled = None, False
            if answer is not None:
                answer.status = status if answer.status == F.SUCCESS else answer.status
                answer.record()

    def _move(self, assoc: A.Association, context_id: int, cmd: dimse.Command, data: bytes
              ) -> Iterator[None]:
        """The C-MOVE as a driver job: the sub-operations in a thread, their counts sent
        as pending responses while they change, a C-CANCEL passed on to them."""
        mover: R.MoveService = self.listener.mover  # type: ignore[assignment]
        destination = printable(cmd.move_destination or "")
        self.running, self.cancelled = cmd, False
        plan = progress = None
        status, comment = R.UNABLE_TO_PROCESS, ""
        try:
            plan, status, comment = self._plan(mover, context_id, cmd, data, destination)
            if plan is not None:
                progress = R.MoveProgress(total=len(plan.send))
                stop = threading.Event()
                worker = threading.Thread(target=mover.run, args=(plan, progress, stop),
                                          kwargs={"originator": (self.calling, cmd.message_id)},
                                          daemon=True, name="c-move")
                worker.start()
                sent = None
                while not progress.done.is_set():
                    # A pending response per sub-operation (at most one per wait), so the
                    # requestor sees progress and its C-CANCEL lands between two of them.
                    progress.changed.wait(timeout=0.2)
                    progress.changed.clear()
                    if self.cancelled:
                        stop.set()
                    counts = progress.counts()
                    if not progress.done.is_set() and counts != sent and not self.cancelled:
                        remaining, completed, failed, warning = counts
                        assoc.send_message(context_id, dimse.Command(
                            dimse.C_MOVE_RSP, message_id_responded_to=cmd.message_id,
                            affected_sop_class=cmd.affected_sop_class, status=R.PENDING,
                            remaining=remaining, completed=completed, failed=failed,
                            warning=warning))
                        sent = counts
                    yield
                worker.join()
                status, comment = R.final_status(progress, self.cancelled), progress.comment
            if not assoc.closed:
                self._move_final(assoc, context_id, cmd, status, comment, progress)
        finally:
            self.running, self.cancelled = None, False
            mover.audit(plan, status, progress, calling_ae=self.calling,
                        source=f"{self.calling}@{self.address}",
                        sop_class=cmd.affected_sop_class or "", destination=destination,
                        comment=comment)

    def _get(self, assoc: A.Association, context_id: int, cmd: dimse.Command, data: bytes
             ) -> Iterator[float | None]:
        """The C-GET as a driver job: the restore thread verifies each instance and
        hands it over; this thread sends it as a C-STORE on the requestor's own
        association, waits for its answer, and sends the counts as pending responses."""
        mover: R.MoveService = self.listener.mover  # type: ignore[assignment]
        self.running, self.cancelled = cmd, False
        plan = progress = None
        status, comment = R.UNABLE_TO_PROCESS, ""
        handoff = R.HandOff()
        try:
            plan, status, comment = self._plan(mover, context_id, cmd, data, None)
            if plan is not None:
                progress = R.MoveProgress(total=len(plan.send))
                stop = threading.Event()
                worker = threading.Thread(target=mover.run, args=(plan, progress, stop),
                                          kwargs={"delivery": handoff}, daemon=True,
                                          name="c-get")
                worker.start()
                while not progress.done.is_set() and not assoc.closed:
                    if self.cancelled:
                        stop.set()
                    job = handoff.next(timeout=0.2)
                    if job is None:
                        if handoff.finished:
                            progress.done.wait(timeout=0.2)   # the counts, a moment later
                        yield None
                        continue
                    item, path = job
                    error = yield from self._send_one(assoc, item, path)
                    handoff.answer(error)
                    yield None
                    remaining, completed, failed, warning = progress.counts()
                    if not self.cancelled and remaining:
                        assoc.send_message(context_id, dimse.Command(
                            dimse.C_GET_RSP, message_id_responded_to=cmd.message_id,
                            affected_sop_class=cmd.affected_sop_class, status=R.PENDING,
                            remaining=remaining, completed=completed, failed=failed,
                            warning=warning))
                worker.join(timeout=0 if assoc.closed else None)
                status, comment = R.final_status(progress, self.cancelled), progress.comment
            if not assoc.closed:
                self._move_final(assoc, context_id, cmd, status, comment, progress)
        finally:
            handoff.shut(DeliveryRefused("the association ended"))
            self.running, self.cancelled, self.awaiting = None, False, None
            mover.audit(plan, status, progress, calling_ae=self.calling,
                        source=f"{self.calling}@{self.address}",
                        sop_class=cmd.affected_sop_class or "", destination=None,
                        comment=comment)

    def _plan(self, mover: R.MoveService, context_id: int, cmd: dimse.Command, data: bytes,
              destination: str | None) -> tuple["R.MovePlan | None", int, str]:
        """(the plan, or None with the status and comment to refuse with)."""
        try:
            plan = mover.plan(cmd.affected_sop_class or "", self.contexts[context_id], data,
                              destination)
            plan.requested_by = self.calling
            return plan, R.UNABLE_TO_PROCESS, ""
        except R.MoveRefused as e:
            return None, e.status, e.comment
        except Exception:
            log.exception("a retrieve from %s could not be planned", self.calling)
            return None, R.UNABLE_TO_PROCESS, "the catalog cannot be read now"

    def _send_one(self, assoc: A.Association, item, path: Path  # noqa: ANN001
                  ) -> Iterator[float | None]:
        """One C-GET sub-operation; returns None when stored, else why not."""
        inst = item.inst
        ctx = next((i for i, a in self.abstract.items() if a == inst.sop_class
                    and self.contexts.get(i) == inst.transfer_syntax), None)
        if ctx is None or inst.sop_class not in self.receives:
            return DeliveryRefused("no presentation context with the SCP role for its SOP "
                                   "class and transfer syntax (sent as stored, never converted)")
        self.message_ids = self.message_ids % 0xFFFF + 1
        self.awaiting, self.store_answer = self.message_ids, None
        assoc.send_message(ctx, dimse.Command(
            dimse.C_STORE_RQ, message_id=self.awaiting, affected_sop_class=inst.sop_class,
            affected_sop_instance=inst.sop_uid, priority=0,
            data_set_type=dimse.DATA_SET_PRESENT))
        with open(path, "rb") as f:
            left = f.seek(0, os.SEEK_END) - f.seek(dataset_offset(f))
            while True:
                chunk = f.read(min(left, SEND_CHUNK))
                left -= len(chunk)
                assoc.send_data(ctx, chunk, last=left <= 0)
                yield None
                if left <= 0 or assoc.closed:
                    break
        deadline = time.monotonic() + self.listener.settings.network_timeout_s
        while self.store_answer is None and not assoc.closed and time.monotonic() < deadline:
            yield 0.2
        answer, self.awaiting = self.store_answer, None
        if answer is None:
            return DeliveryRefused("no answer to the C-STORE")
        if answer.status not in (0x0000, 0xB000, 0xB006, 0xB007):
            return DeliveryRefused(f"the requestor answered 0x{answer.status or 0:04X}")
        return None

    def _move_final(self, assoc: A.Association, context_id: int, cmd: dimse.Command,
                    status: int, comment: str, progress: "R.MoveProgress | None") -> None:
        remaining, completed, failed, warning = progress.counts() if progress else (0, 0, 0, 0)
        failed_list = None
        # The Failed SOP Instance UID List goes with a C-MOVE's final response only:
        # dcmtk's getscu leaves a C-GET's unread and then fails its release on it.
        if progress is not None and progress.failed_uids and cmd.command_field == dimse.C_MOVE_RQ:
            failed_list = ident_encode({"FailedSOPInstanceUIDList":
                                        "\\".join(progress.failed_uids)}, "",
                                       self.contexts[context_id])
        assoc.send_message(context_id, dimse.Command(
            cmd.command_field | 0x8000, message_id_responded_to=cmd.message_id,
            affected_sop_class=cmd.affected_sop_class, status=status,
            remaining=remaining if status == R.CANCELLED else None,
            completed=completed if progress else None, failed=failed if progress else None,
            warning=warning if progress else None,
            data_set_type=dimse.DATA_SET_PRESENT if failed_list else dimse.NO_DATA_SET,
            error_comment=printable(comment).replace("\\", "/")[:64] or None
            if status not in (R.SUCCESS, R.CANCELLED) else None), failed_list)

    @staticmethod
    def _answer(assoc: A.Association, context_id: int, cmd: dimse.Command, status: int,
                comment: str = "") -> None:
        """A final response without a data set: a service this listener does not offer
        (C-MOVE, C-GET here: 0x0211, unrecognized operation), a refused C-STORE, the
        end of a C-FIND. The comment (LO) never carries a value from the request."""
        assoc.send_message(context_id, dimse.Command(
            cmd.command_field | 0x8000, message_id_responded_to=cmd.message_id,
            affected_sop_class=cmd.affected_sop_class,
            affected_sop_instance=cmd.affected_sop_instance, status=status,
            error_comment=printable(comment).replace("\\", "/")[:64] or None))

    def _ingest(self, st: _Store, path: Path | None, data: bytes | None) -> int:
        cmd = st.command
        try:
            result = self.listener.ingest.store(StoreRequest(
                spool=path, data=data, sop_class=cmd.affected_sop_class or "",
                sop_instance=cmd.affected_sop_instance or "",
                transfer_syntax=self.contexts[st.context_id], calling_ae=self.calling))
        except Exception:
            log.exception("ingest failed; the object is not acknowledged")
            return OUT_OF_RESOURCES
        self.listener.received.count(id(self), (self.calling, f"{self.calling}@{self.address}"),
                                     result)
        return store_status(result.outcome)

    def on_close(self, assoc: A.Association, how: A.Event | None) -> None:
        if self.store is not None:
            self.store.discard()        # an aborted transfer: never acknowledged, nothing kept
            self.store = None
        if isinstance(how, A.Aborted) and how.by_us and how.why:
            log.warning("association from %s aborted: %s", self.address, how.why)
        self.listener.received.flush(id(self), self.listener.ingest.catalog)
        self.listener.ended(self)


class EngineListener:
    """One listening socket (plain or TLS), one thread per association."""

    def __init__(self, settings: DicomSettings, port: int, ingest: IngestService,
                 peers: PeerRegistry, spool_dir: Path,
                 ssl_context: ssl.SSLContext | None = None,
                 finder: F.FindService | None = None,
                 mover: R.MoveService | None = None) -> None:
        self.settings, self.ingest, self.peers = settings, ingest, peers
        self.spool_dir, self.ssl_context, self.finder = spool_dir, ssl_context, finder
        self.mover = mover
        self.offer = Offer(settings.ae_title, None, tuple(AllTransferSyntaxes),
                           settings.max_pdu or 262144, IMPLEMENTATION_CLASS_UID,
                           IMPLEMENTATION_VERSION, query_classes=frozenset(F.MODELS) | frozenset(R.MOVE_MODELS)
                           | frozenset(R.GET_MODELS), scu_role_classes=None,
                           query_transfer_syntaxes=COMMAND_TRANSFER_SYNTAXES,
                           find_classes=frozenset(F.MODELS))
        self.timeouts = driver.Timeouts(artim_s=min(30.0, settings.network_timeout_s),
                                        idle_s=settings.network_timeout_s)
        self.received = Received()
        self.sessions: set[_Session] = set()
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET6 if ":" in settings.bind else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((settings.bind, port))
        self.sock.listen(128)
        self._stop = threading.Event()
        self._warned: dict[tuple, tuple[float, int]] = {}   # key -> (last logged, since)
        self._per_source: dict[tuple, tuple[float, int]] = {}   # (kind, address) -> lines
        self.thread = threading.Thread(target=self._accept_loop, daemon=True,
                                       name="dicom-tls-listener" if ssl_context else "dicom-listener")
        self.thread.start()

    @property
    def active(self) -> int:
        with self.lock:
            return len(self.sessions)

    def shutdown(self) -> None:
        """Stop accepting; open associations carry on."""
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the accept() now, not at its timeout
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)

    def abort_open(self) -> None:
        """After the shutdown grace period: abort what is still open."""
        with self.lock:
            sessions = list(self.sessions)
        for s in sessions:
            if s.conn is not None:
                try:
                    s.conn.shutdown(socket.SHUT_RDWR)   # its driver sees the close and ends
                except OSError:
                    pass

    def ended(self, session: _Session) -> None:
        with self.lock:
            self.sessions.discard(session)

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                pending = sum(1 for x in self.sessions
                              if x.address == addr[0] and not x.associating)
                if pending >= self.settings.max_pending_per_source:
                    session = None
                else:
                    session = _Session(self, addr[0], over_limit=len(self.sessions)
                                       >= self.settings.max_associations)
                    self.sessions.add(session)
            if session is None:
                # Closed before anything is read: one source cannot hold every slot.
                self._refused_source(addr[0])
                conn.close()
                continue
            threading.Thread(target=self._run, args=(conn, session), daemon=True,
                             name="dicom-association").start()

    def _refused_source(self, address: str) -> None:
        self.warn_once_a_minute(("pending", address), "connections from %s refused: %d from "
                                "there have not associated (dicom.max_pending_per_source)",
                                address, self.settings.max_pending_per_source)

    def warn_once_a_minute(self, key: tuple, message: str, *args: object) -> None:
        """A refusal logged at most once a minute per key ((kind, source address, what
        was refused)), with how many were not logged since, and at most
        ``WARNINGS_PER_SOURCE`` lines a minute per kind and source: a flood from outside
        (varying its AE titles or not) must not fill the disk."""
        now = time.monotonic()
        with self.lock:
            last, since = self._warned.get(key, (-1e9, 0))
            start, lines = self._per_source.get(key[:2], (now, 0))
            if now - start >= 60:
                start, lines = now, 0
            if now - last < 60 or lines >= WARNINGS_PER_SOURCE:
                self._warned[key] = (last, since + 1)
                return
            self._per_source[key[:2]] = (start, lines + 1)
            self._warned[key] = (now, 0)
            if len(self._per_source) > 10_000:
                self._per_source.clear()
            if len(self._warned) > 10_000:      # many sources: forget the oldest half
                for k in sorted(self._warned, key=lambda k: self._warned[k][0])[:5_000]:
                    del self._warned[k]
        log.warning(message + (f" ({since} more like it in the last minute)" if since else ""),
                    *args)

    def _run(self, conn: socket.socket, session: _Session) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    log.warning("TLS handshake from %s failed: %s", session.address,
                                type(e).__name__)
                    conn.close()
                    self.ended(session)
                    return
            session.conn = conn
            assoc = A.Association(requestor=False, max_pdu_length=self.offer.max_pdu_length)
            driver.serve(conn, assoc, session, self.timeouts)
        except Exception:
            log.exception("association from %s failed", session.address)
            self.ended(session)
