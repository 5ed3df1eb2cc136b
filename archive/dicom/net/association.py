"""One DICOM association as a PS3.8 state machine (section 9.2), sans-I/O.

Bytes from the peer go in (``receive_data``); typed events come out
(``next_event``); what to send goes out as bytes (``data_to_send``). The
caller's decisions (accept, reject, answer, release, abort) are method calls.
Nothing here reads a clock or a socket: the driver runs ARTIM and the idle
timeout from ``wants_artim`` and its own clock.

Both roles: the acceptor (our SCP: C-ECHO, C-STORE, and the query/retrieve
services) and the requestor (our SCU: restore to a PACS, C-MOVE/C-GET
sub-operations). A PDU that the state does not allow is answered with an
A-ABORT (source: service provider, reason: unexpected PDU), as the state
table's action AA-8 says; a malformed one with the reason the codec gives.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator, Union

from archive.dicom.net import dimse
from archive.dicom.net import pdu as P

# The PDU size we send to a peer that announced no maximum (0): big enough that the
# per-PDU cost vanishes, small enough that a sender's pieces stay bounded.
UNLIMITED_PDU_FRAGMENT = 1 << 20
MIN_PEER_PDU_LENGTH = 7                # a PDV header (6 bytes) and one byte of data


class State(enum.Enum):
    IDLE = "Sta1"                      # no transport
    AWAITING_RQ = "Sta2"               # acceptor: transport open, ARTIM running
    AWAITING_LOCAL_RESPONSE = "Sta3"   # acceptor: A-ASSOCIATE-RQ handed to the user
    AWAITING_AC = "Sta5"               # requestor: A-ASSOCIATE-RQ sent
    ESTABLISHED = "Sta6"
    AWAITING_RELEASE_RP = "Sta7"       # we sent A-RELEASE-RQ
    AWAITING_LOCAL_RELEASE = "Sta8"    # the peer sent A-RELEASE-RQ
    AWAITING_CLOSE = "Sta13"           # after reject, abort or release: ARTIM until close


@dataclass(frozen=True)
class AssociationRequested:
    request: P.AssociateRQ


@dataclass(frozen=True)
class Accepted:
    accept: P.AssociateAC


@dataclass(frozen=True)
class Rejected:
    reject: P.AssociateRJ


@dataclass(frozen=True)
class ReleaseRequested:
    pass


@dataclass(frozen=True)
class Released:
    pass


@dataclass(frozen=True)
class Aborted:
    source: int
    reason: int
    by_us: bool                        # we aborted (a protocol error) rather than the peer
    why: str = ""


Event = Union[AssociationRequested, Accepted, Rejected, dimse.CommandReceived,
              dimse.DataFragment, ReleaseRequested, Released, Aborted]


class Association:
    """PS3.8's state machine for one association, either role."""

    def __init__(self, *, requestor: bool, max_pdu_length: int,
                 max_associate_length: int = P.MAX_ASSOCIATE_LENGTH) -> None:
        self.requestor = requestor
        self.state = State.IDLE if requestor else State.AWAITING_RQ
        self._decoder = P.PduDecoder(max_pdu_length=max_pdu_length,
                                     max_associate_length=max_associate_length)
        self._messages = dimse.MessageAssembler()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self.peer_max_pdu_length = 0   # 0: the peer set no limit
        self.request: P.AssociateRQ | None = None
        self._data_pending: int | None = None   # the context of a data set still being sent

    # -- what the driver needs ------------------------------------------------------------
    @property
    def wants_artim(self) -> bool:
        """ARTIM runs: a peer that never associates, or never closes, is cut off."""
        return self.state in (State.AWAITING_RQ, State.AWAITING_CLOSE)

    @property
    def closed(self) -> bool:
        return self.state is State.IDLE

    @property
    def mid_pdu(self) -> bool:
        """A partial PDU is buffered (for the idle timeout: it counts as idle)."""
        return self._decoder.buffered > 0

    def data_to_send(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means the peer closed the connection."""
        if not data:
            if self.state not in (State.IDLE, State.AWAITING_CLOSE):
                self._events.append(Aborted(P.ABORT_SOURCE_PROVIDER, P.REASON_NOT_SPECIFIED,
                                            by_us=False, why="connection closed by the peer"))
            self.state = State.IDLE
            return
        if self.state is State.IDLE:
            return
        self._decoder.receive(data)
        try:
            while self.state is not State.IDLE and (pdu := self._decoder.next_pdu()) is not None:
                self._handle(pdu)
        except P.ProtocolError as e:
            self._abort_for(str(e), e.reason)

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def events(self) -> Iterator[Event]:
        while (e := self.next_event()) is not None:
            yield e

    # -- the user's decisions -----------------------------------------------------------------
    def request_association(self, rq: P.AssociateRQ) -> None:
        self._need(State.IDLE, "request an association")
        self.request = rq
        self._send(rq)
        self.state = State.AWAITING_AC

    def accept(self, ac: P.AssociateAC) -> None:
        self._need(State.AWAITING_LOCAL_RESPONSE, "accept")
        self._send(ac)
        self.state = State.ESTABLISHED

    def reject(self, rj: P.AssociateRJ) -> None:
        self._need(State.AWAITING_LOCAL_RESPONSE, "reject")
        self._send(rj)
        self.state = State.AWAITING_CLOSE

    def send_message(self, context_id: int, command: dimse.Command,
                     data_set: bytes | memoryview | None = None) -> None:
        """One DIMSE message, fragmented to the peer's maximum PDU length. A command
        that announces a data set but comes without one is followed by ``send_data``."""
        if self.state not in (State.ESTABLISHED, State.AWAITING_LOCAL_RELEASE):
            raise RuntimeError(f"cannot send a message in state {self.state.value}")
        if self._data_pending is not None:
            raise RuntimeError("cannot send a message before the last one's data set is sent")
        for v in dimse.fragments(context_id, dimse.encode_command(command), is_command=True,
                                 max_pdu_length=self.peer_max_pdu_length):
            self._send(P.PData((v,)))
        if data_set is not None:
            for v in dimse.fragments(context_id, data_set, is_command=False,
                                     max_pdu_length=self.peer_max_pdu_length):
                self._send(P.PData((v,)))
        elif command.has_data_set:
            self._data_pending = context_id

    def send_data(self, context_id: int, data: bytes | memoryview, *, last: bool) -> None:
        """The next piece of the data set the last command announced (a sender streams
        a large one in bounded pieces), fragmented to the peer's maximum PDU length;
        a peer without a limit gets PDUs of ``UNLIMITED_PDU_FRAGMENT``."""
        if self.state not in (State.ESTABLISHED, State.AWAITING_LOCAL_RELEASE):
            raise RuntimeError(f"cannot send data in state {self.state.value}")
        if self._data_pending != context_id:
            raise RuntimeError("no data set announced on this presentation context")
        if not len(data) and not last:
            return
        for v in dimse.fragments(context_id, data, is_command=False,
                                 max_pdu_length=self.peer_max_pdu_length or UNLIMITED_PDU_FRAGMENT):
            if v.is_last and not last:          # only the last piece ends the data set
                v = P.PDV(context_id, False, False, v.data)
            self._send(P.PData((v,)))
        if last:
            self._data_pending = None

    def request_release(self) -> None:
        self._need(State.ESTABLISHED, "request a release")
        if self._data_pending is not None:
            raise RuntimeError("cannot request a release in the middle of a data set")
        self._send(P.ReleaseRQ())
        self.state = State.AWAITING_RELEASE_RP

    def release(self) -> None:
        """Answer the peer's A-RELEASE-RQ."""
        self._need(State.AWAITING_LOCAL_RELEASE, "answer a release")
        self._send(P.ReleaseRP())
        self.state = State.AWAITING_CLOSE

    def abort(self, reason: int = P.REASON_NOT_SPECIFIED, *, source: int = P.ABORT_SOURCE_USER) -> None:
        if self.state not in (State.IDLE, State.AWAITING_CLOSE):
            self._send(P.Abort(source, reason))
        self.state = State.AWAITING_CLOSE if self.state is not State.IDLE else State.IDLE

    def artim_expired(self) -> None:
        """ARTIM ran out: the driver closes the transport (AA-2)."""
        if self.state is State.AWAITING_RQ:
            self._events.append(Aborted(P.ABORT_SOURCE_PROVIDER, P.REASON_NOT_SPECIFIED,
                                        by_us=True, why="no A-ASSOCIATE-RQ in time"))
        self.state = State.IDLE

    # -- internals ------------------------------------------------------------------------------
    def _need(self, state: State, what: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"cannot {what} in state {self.state.value}")

    def _send(self, pdu: P.Pdu) -> None:
        self._out.append(P.encode(pdu))

    def _abort_for(self, why: str, reason: int) -> None:
        self._decoder.discard()        # Sta13 ignores what follows (AA-6): never buffer it
        self._send(P.Abort(P.ABORT_SOURCE_PROVIDER, reason))
        self._events.append(Aborted(P.ABORT_SOURCE_PROVIDER, reason, by_us=True, why=why))
        self.state = State.AWAITING_CLOSE

    def _handle(self, pdu: P.Pdu) -> None:
        s = self.state
        if isinstance(pdu, P.Abort):                       # AA-2 / AA-3: close, whatever the state
            if s is not State.AWAITING_CLOSE:
                self._events.append(Aborted(pdu.source, pdu.reason, by_us=False))
            self.state = State.IDLE
            return
        if s is State.AWAITING_CLOSE:
            # AA-6: ignore what arrives while waiting for the close (AA-7 for a new request).
            if isinstance(pdu, P.AssociateRQ):
                self._send(P.Abort(P.ABORT_SOURCE_PROVIDER, P.UNEXPECTED_PDU))
            return
        if s is State.AWAITING_RQ and isinstance(pdu, P.AssociateRQ):
            if 0 < (pdu.user.max_length or 0) < MIN_PEER_PDU_LENGTH:
                # Every answer we send after the AC would need a PDV it cannot take.
                raise P.ProtocolError("the requestor's maximum PDU length cannot carry a PDV")
            self.request = pdu
            self.peer_max_pdu_length = pdu.user.max_length or 0
            self.state = State.AWAITING_LOCAL_RESPONSE
            self._events.append(AssociationRequested(pdu))
        elif s is State.AWAITING_AC and isinstance(pdu, P.AssociateAC):
            if 0 < (pdu.user.max_length or 0) < MIN_PEER_PDU_LENGTH:
                raise P.ProtocolError("the acceptor's maximum PDU length cannot carry a PDV")
            self.peer_max_pdu_length = pdu.user.max_length or 0
            self.state = State.ESTABLISHED
            self._events.append(Accepted(pdu))
        elif s is State.AWAITING_AC and isinstance(pdu, P.AssociateRJ):
            self.state = State.IDLE
            self._events.append(Rejected(pdu))
        elif s in (State.ESTABLISHED, State.AWAITING_RELEASE_RP) and isinstance(pdu, P.PData):
            self._events.extend(self._messages.feed(pdu.pdvs))
        elif s is State.ESTABLISHED and isinstance(pdu, P.ReleaseRQ):
            if not self._messages.idle:
                raise P.ProtocolError("A-RELEASE-RQ in the middle of a message", P.UNEXPECTED_PDU)
            self.state = State.AWAITING_LOCAL_RELEASE
            self._events.append(ReleaseRequested())
        elif s is State.AWAITING_RELEASE_RP and isinstance(pdu, P.ReleaseRP):
            self.state = State.IDLE                        # AR-3: the requestor closes
            self._events.append(Released())
        elif s is State.AWAITING_RELEASE_RP and isinstance(pdu, P.ReleaseRQ):
            # A release collision (PS3.8 9.2.3, Sta9-12): the requestor answers first.
            self._send(P.ReleaseRP())
        else:
            raise P.ProtocolError(f"{type(pdu).__name__} not expected in state {s.value}",
                                  P.UNEXPECTED_PDU)
