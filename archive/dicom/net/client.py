"""Our DICOM requestor (SCU): a thin blocking-socket driver around one requestor
``Association``, one operation at a time (asynchronous window 1).

``associate`` connects (TCP_NODELAY; TLS if given a context), proposes the
presentation contexts and returns a ``ScuAssociation`` once the peer accepts;
``echo`` and ``store`` send one request each and wait for its response. A data
set is sent verbatim: bytes, or streamed from a file (a Part 10 file from its
data set offset) in pieces of about 1 MiB, fragmented to the peer's maximum PDU
length, so memory stays bounded whatever the object's size. It serves restore to
a PACS and, later, the C-STORE sub-operations of C-MOVE/C-GET.

Every read and write has a timeout: a peer that stops answering is aborted and a
``PeerTimeout`` raised. Errors carry numbers and our own words only, never a
string the peer sent.
"""
from __future__ import annotations

import io
import socket
import ssl
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from archive.dicom.net import association as A
from archive.dicom.net import dimse
from archive.dicom.net import pdu as P
from archive.dicom.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    dataset_offset,
)

VERIFICATION = "1.2.840.10008.1.1"
MAX_PDU_LENGTH = 262144         # what we accept from the peer (its responses are small)
MAX_CONTEXTS = 128              # odd context IDs 1..255 (PS3.8 9.3.2.2)
PIECE = 1 << 20                 # bytes of a data set read and sent at a time
RECV_SIZE = 64 * 1024
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# A file streamed from its current position to its end, a Part 10 file by path, or bytes.
DataSource = bytes | bytearray | memoryview | Path | BinaryIO

_RJ_REASONS = {   # (source, reason) -> words (PS3.8 Table 9-21)
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized", (1, 7): "called AE title not recognized",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded"}
_RJ_SOURCES = {1: "the service user", 2: "the service provider (ACSE)",
               3: "the service provider (presentation)"}
_ABORT_REASONS = {0: "reason not specified", 1: "unrecognized PDU", 2: "unexpected PDU",
                  4: "unrecognized PDU parameter", 5: "unexpected PDU parameter",
                  6: "invalid PDU parameter value"}


class ScuError(Exception):
    """The association failed or is gone; the message is ours alone (no peer strings)."""


class ConnectFailed(ScuError):
    pass


class AssociationRejected(ScuError):
    """A-ASSOCIATE-RJ: ``result`` 1 permanent, 2 transient; ``source`` and ``reason``
    as PS3.8 Table 9-21 numbers them."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        self.result, self.source, self.reason = result, source, reason
        self.why = (f"{'transient' if result == 2 else 'permanent'}, by "
                    f"{_RJ_SOURCES.get(source, f'source {source}')}: "
                    f"{_RJ_REASONS.get((source, reason), f'reason {reason}')}")
        super().__init__(f"association rejected ({self.why})")


class AssociationAborted(ScuError):
    def __init__(self, source: int, reason: int, *, by_us: bool, why: str = "") -> None:
        self.source, self.reason, self.by_us = source, reason, by_us
        if by_us:
            text = f"association aborted by us: {why or _ABORT_REASONS.get(reason, reason)}"
        elif why:
            text = f"association lost: {why}"
        else:
            who = "the peer" if source == P.ABORT_SOURCE_USER else "the peer's service provider"
            text = (f"association aborted by {who} "
                    f"({_ABORT_REASONS.get(reason, f'reason {reason}')})")
        super().__init__(text)


class PeerTimeout(ScuError):
    pass


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 30.0     # TCP connect and TLS handshake
    network_s: float = 60.0     # any one read or write; an A-ASSOCIATE-AC or A-RELEASE-RP
    dimse_s: float = 60.0       # a whole response, from the end of its request


@dataclass(frozen=True)
class Context:
    """An accepted presentation context."""
    id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class Response:
    status: int
    command: dimse.Command


def associate(host: str, port: int, *, called_ae: str, calling_ae: str,
              contexts: Sequence[tuple[str, Sequence[str]]],
              timeouts: Timeouts = Timeouts(), max_pdu_length: int = MAX_PDU_LENGTH,
              ssl_context: ssl.SSLContext | None = None,
              server_hostname: str | None = None) -> ScuAssociation:
    """An established association proposing ``contexts`` ((abstract syntax,
    [transfer syntaxes]) each), or ``ConnectFailed``, ``AssociationRejected``,
    ``AssociationAborted``, ``PeerTimeout``."""
    if not contexts:
        raise ValueError("an association needs at least one presentation context")
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts: at most {MAX_CONTEXTS}")
    rq = P.AssociateRQ(called_ae, calling_ae, tuple(
        P.PresentationContextRQ(2 * i + 1, abstract, tuple(ts))
        for i, (abstract, ts) in enumerate(contexts)),
        P.UserInformation(max_length=max_pdu_length,
                          implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                          implementation_version_name=IMPLEMENTATION_VERSION))
    try:
        sock = socket.create_connection((host, port), timeout=timeouts.connect_s)
    except TimeoutError:
        raise ConnectFailed(f"cannot connect: no answer within {timeouts.connect_s:g} s") from None
    except OSError as e:
        raise ConnectFailed(f"cannot connect: {(e.strerror or type(e).__name__).lower()}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock.settimeout(timeouts.connect_s)
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
            except (ssl.SSLError, OSError) as e:
                raise ConnectFailed(f"TLS handshake failed ({type(e).__name__})") from None
        scu = ScuAssociation(sock, A.Association(requestor=True, max_pdu_length=max_pdu_length),
                             timeouts)
        scu._establish(rq)
        return scu
    except BaseException:
        sock.close()
        raise


class ScuAssociation:
    """One established association, requestor side. Use ``release`` (or ``with``)
    when done; after any error it is aborted and closed."""

    def __init__(self, sock: socket.socket, assoc: A.Association, timeouts: Timeouts) -> None:
        self.sock, self.assoc, self.timeouts = sock, assoc, timeouts
        self.accepted: tuple[Context, ...] = ()
        self._message_id = 0

    # -- what was negotiated --------------------------------------------------------------
    @property
    def is_established(self) -> bool:
        return self.assoc.state is A.State.ESTABLISHED

    @property
    def peer_max_pdu_length(self) -> int:
        return self.assoc.peer_max_pdu_length

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None
                    ) -> Context | None:
        return next((c for c in self.accepted if c.abstract_syntax == abstract_syntax and
                     transfer_syntax in (None, c.transfer_syntax)), None)

    # -- operations ---------------------------------------------------------------------------
    def echo(self) -> int:
        """C-ECHO; the response's status."""
        ctx = self.context_for(VERIFICATION)
        if ctx is None:
            raise ScuError("the peer accepted no Verification presentation context")
        mid = self._next_id()
        rsp = self._request(ctx.id, dimse.Command(dimse.C_ECHO_RQ, message_id=mid,
                                                  affected_sop_class=VERIFICATION), None)
        return self._check(rsp, dimse.C_ECHO_RSP, mid).status

    def store(self, sop_class: str, sop_instance: str, data: DataSource, *,
              transfer_syntax: str | None = None, context_id: int | None = None,
              priority: int = 0, move_originator: tuple[str, int] | None = None) -> Response:
        """C-STORE of ``data`` (the data set's bytes, sent as they are) on the accepted
        context for (``sop_class``, ``transfer_syntax``), or on ``context_id``."""
        ctx = (next((c for c in self.accepted if c.id == context_id), None)
               if context_id is not None else self.context_for(sop_class, transfer_syntax))
        if ctx is None or ctx.abstract_syntax != sop_class:
            raise ScuError("no accepted presentation context for this SOP class and "
                           "transfer syntax")
        mid = self._next_id()
        cmd = dimse.Command(dimse.C_STORE_RQ, message_id=mid, affected_sop_class=sop_class,
                            affected_sop_instance=sop_instance, priority=priority,
                            data_set_type=dimse.DATA_SET_PRESENT,
                            move_originator_ae=move_originator[0] if move_originator else None,
                            move_originator_message_id=move_originator[1] if move_originator
                            else None)
        return self._check(self._request(ctx.id, cmd, data), dimse.C_STORE_RSP, mid)

    def release(self) -> bool:
        """A-RELEASE; False if the peer did not answer properly (then it is aborted).
        The connection is closed either way."""
        try:
            if not self.is_established:
                return False
            self.assoc.request_release()
            self._flush()
            self._wait(lambda e: isinstance(e, A.Released), "an answer to the release request",
                       self.timeouts.network_s)
            return True
        except ScuError:
            return False
        finally:
            self._close()

    def abort(self) -> None:
        try:
            if not self.assoc.closed:
                self.assoc.abort()
                self._flush()
        except ScuError:
            pass
        finally:
            self._close()

    def __enter__(self) -> ScuAssociation:
        return self

    def __exit__(self, kind, *_: object) -> None:
        if kind is None:
            self.release()
        else:
            self.abort()

    # -- internals ------------------------------------------------------------------------------
    def _establish(self, rq: P.AssociateRQ) -> None:
        self.assoc.request_association(rq)
        self._flush()
        ev = self._wait(lambda e: isinstance(e, (A.Accepted, A.Rejected)),
                        "an answer to the association request", self.timeouts.network_s)
        if isinstance(ev, A.Rejected):
            self._close()
            raise AssociationRejected(ev.reject.result, ev.reject.source, ev.reject.reason)
        proposed = {c.id: c for c in rq.contexts}
        # Only what we proposed, in a transfer syntax we proposed for it, can be used.
        self.accepted = tuple(
            Context(c.id, proposed[c.id].abstract_syntax, c.transfer_syntax)
            for c in ev.accept.contexts if c.result == P.ACCEPTANCE and c.id in proposed
            and c.transfer_syntax in proposed[c.id].transfer_syntaxes)

    def _next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _request(self, context_id: int, cmd: dimse.Command, data: DataSource | None
                 ) -> dimse.Command:
        if not self.is_established:
            raise ScuError("the association is no longer established")
        pieces = self._pieces(data)
        first = next(pieces, None)      # a source that cannot be read fails before we send
        try:
            self.assoc.send_message(context_id, cmd)
            if first is not None:
                self.assoc.send_data(context_id, first[0], last=first[1])
                self._flush()           # the command and the first piece in one write
                for piece, last in pieces:
                    self.assoc.send_data(context_id, piece, last=last)
                    self._flush()
            else:
                self._flush()
        except ScuError:
            raise
        except BaseException:
            self.abort()            # a message cut short cannot be finished: end it
            raise
        finally:
            pieces.close()              # the file, if one was opened
        ev = self._wait(lambda e: isinstance(e, dimse.CommandReceived), "a response",
                        self.timeouts.dimse_s)
        assert isinstance(ev, dimse.CommandReceived)
        if ev.context_id != context_id or ev.command.is_request or ev.command.has_data_set:
            self._protocol_abort("a response that is not the one to our request")
        return ev.command

    def _check(self, rsp: dimse.Command, field: int, mid: int) -> Response:
        if rsp.command_field != field or rsp.message_id_responded_to != mid \
                or rsp.status is None:
            self._protocol_abort("a response that is not the one to our request")
        return Response(rsp.status, rsp)  # type: ignore[arg-type]

    def _pieces(self, data: DataSource | None) -> Generator[tuple[memoryview | bytes, bool],
                                                             None, None]:
        """The data set in pieces of whole fragments (the last flagged)."""
        if data is None:
            return
        room = (self.assoc.peer_max_pdu_length or A.UNLIMITED_PDU_FRAGMENT) - 6
        size = room * max(1, PIECE // room)
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data)
            for i in range(0, len(view), size):
                yield view[i:i + size], i + size >= len(view)
            if not len(view):
                yield b"", True
            return
        if isinstance(data, Path):
            with open(data, "rb") as f:
                f.seek(dataset_offset(f))
                yield from _read_ahead(f, size)
            return
        yield from _read_ahead(data, size)

    def _flush(self) -> None:
        out = self.assoc.data_to_send()
        if not out:
            return
        self.sock.settimeout(self.timeouts.network_s)
        try:
            self.sock.sendall(out)
        except TimeoutError:
            self._lost(PeerTimeout(f"the peer took nothing for {self.timeouts.network_s:g} s"))
        except OSError as e:
            self._lost_while_sending(e)

    def _wait(self, wanted: Callable[[A.Event], bool], what: str, within_s: float) -> A.Event:
        """Read until an event ``wanted`` says is the one, within ``within_s`` and with
        no read waiting longer than the network timeout; other events end the
        association with the error they mean."""
        deadline = time.monotonic() + within_s
        while True:
            for ev in self.assoc.events():
                if wanted(ev):
                    return ev
                self._unexpected(ev)
            remaining = deadline - time.monotonic()
            wait = min(remaining, self.timeouts.network_s)
            if remaining <= 0:
                self._timed_out(what, within_s)
            self.sock.settimeout(wait)
            try:
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                self._timed_out(what, wait if remaining > wait else within_s)
            except OSError:
                data = b""
            if data and _QUICKACK is not None:
                try:        # Linux resets it: a peer's held-back segment is acked at once
                    self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:
                    pass
            self.assoc.receive_data(data)
            self._flush()           # e.g. our A-ABORT for a malformed PDU

    def _unexpected(self, ev: A.Event) -> None:
        if isinstance(ev, A.Aborted):
            self._close()
            raise AssociationAborted(ev.source, ev.reason, by_us=ev.by_us, why=ev.why)
        if isinstance(ev, A.Rejected):
            self._close()
            raise AssociationRejected(ev.reject.result, ev.reject.source, ev.reject.reason)
        if isinstance(ev, A.ReleaseRequested):
            self.assoc.release()
            try:
                self._flush()
            finally:
                self._close()
            raise ScuError("the peer released the association before answering")
        self._protocol_abort(f"an unexpected {type(ev).__name__}")

    def _protocol_abort(self, why: str) -> None:
        self.assoc.abort(P.UNEXPECTED_PDU, source=P.ABORT_SOURCE_PROVIDER)
        try:
            self._flush()
        finally:
            self._close()
        raise AssociationAborted(P.ABORT_SOURCE_PROVIDER, P.UNEXPECTED_PDU, by_us=True,
                                 why=f"the peer sent {why}")

    def _timed_out(self, what: str, seconds: float) -> None:
        self._lost(PeerTimeout(f"no {what} from the peer within {seconds:g} s; "
                               "association aborted"), abort=True)

    def _lost(self, error: ScuError, *, abort: bool = False) -> None:
        if abort and not self.assoc.closed:
            self.assoc.abort()
            out = self.assoc.data_to_send()
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(out)
            except OSError:
                pass
        self._close()
        raise error

    def _lost_while_sending(self, e: OSError) -> None:
        """The peer closed while we sent: if it said why (an A-ABORT), say that."""
        try:
            self.sock.settimeout(1.0)
            self.assoc.receive_data(self.sock.recv(RECV_SIZE))
        except OSError:
            pass
        for ev in self.assoc.events():
            if isinstance(ev, (A.Aborted, A.ReleaseRequested)):
                self._unexpected(ev)
        self._close()
        raise AssociationAborted(P.ABORT_SOURCE_PROVIDER, 0, by_us=False,
                                 why=f"the connection broke while sending "
                                     f"({type(e).__name__})")

    def _close(self) -> None:
        if not self.assoc.closed:
            self.assoc.receive_data(b"")        # the state machine learns the transport is gone
            list(self.assoc.events())
        try:
            self.sock.close()
        except OSError:
            pass


def _read_ahead(f: BinaryIO | io.RawIOBase, size: int) -> Iterator[tuple[bytes, bool]]:
    """``f`` to its end in pieces of ``size`` bytes, each flagged whether it is the last
    (one piece read ahead, so the last is known without the file's length)."""
    cur = _read_full(f, size)
    while True:
        nxt = _read_full(f, size) if len(cur) == size else b""
        yield cur, not nxt
        if not nxt:
            return
        cur = nxt


def _read_full(f: BinaryIO | io.RawIOBase, size: int) -> bytes:
    """Up to ``size`` bytes, short only at the end (a raw file may read less)."""
    out = f.read(size) or b""
    if len(out) == size or not out:
        return out
    parts = [out]
    got = len(out)
    while got < size and (more := f.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)
