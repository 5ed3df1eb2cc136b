"""The thin blocking-socket loop around one ``Association`` (one thread each).

It owns the clock: ARTIM while a connection has not associated (or after a
release, until the peer closes), and an idle timeout for the rest, where a PDU
that started arriving must finish within the timeout of its first byte, so a
peer dripping a byte at a time cannot hold a connection open.

A handler may answer a request with a job: an iterator that sends one response
(or a few) per step. Between steps the driver sends what is queued and reads
whatever the peer has sent meanwhile, so a C-CANCEL, an abort or a closed
connection reaches the handler while a long C-FIND, C-MOVE or C-GET runs. A step
that yields a number of seconds waits up to that long for the peer (a C-GET
waiting for the response to its C-STORE); one that yields None does not wait.
"""
from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from archive.dicom.net import association as A
from archive.dicom.net import dimse
from archive.dicom.net import pdu as P

RECV_SIZE = 256 * 1024


@dataclass(frozen=True)
class Timeouts:
    artim_s: float = 30.0     # to send an A-ASSOCIATE-RQ, and to close after release
    idle_s: float = 60.0      # between messages, and for any one PDU to arrive whole


class Handler(Protocol):
    """The archive's side: plain functions on decoded messages."""

    def on_request(self, rq: P.AssociateRQ) -> P.AssociateAC | P.AssociateRJ: ...

    def on_event(self, assoc: A.Association, event: dimse.CommandReceived | dimse.DataFragment
                 ) -> Iterator[float | None] | None: ...

    def on_close(self, assoc: A.Association, how: A.Event | None) -> None: ...


def serve(sock: socket.socket, assoc: A.Association, handler: Handler, timeouts: Timeouts, *,
          clock: Callable[[], float] = time.monotonic) -> None:
    """Run one association to its end; the socket is closed on return."""
    last = clock()
    pdu_started: float | None = None
    ending: A.Event | None = None
    try:
        while not assoc.closed:
            limit = timeouts.artim_s if assoc.wants_artim else timeouts.idle_s
            start = pdu_started if pdu_started is not None else last
            remaining = start + limit - clock()
            if remaining <= 0:
                if assoc.wants_artim:
                    assoc.artim_expired()
                else:
                    assoc.abort(P.REASON_NOT_SPECIFIED, source=P.ABORT_SOURCE_PROVIDER)
                    ending = A.Aborted(P.ABORT_SOURCE_PROVIDER, 0, by_us=True, why="idle timeout")
                    _flush(sock, assoc, timeouts)
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(RECV_SIZE)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            last = clock()
            assoc.receive_data(data)
            pdu_started = (pdu_started or last) if assoc.mid_pdu else None
            for event in assoc.events():
                job = _dispatch(assoc, handler, event)
                if isinstance(event, (A.ReleaseRequested, A.Aborted)):
                    ending = event
                if job is not None:
                    ending = _run_job(sock, assoc, handler, job, timeouts) or ending
                    last = clock()
            _flush(sock, assoc, timeouts)
    finally:
        try:
            sock.close()
        finally:
            handler.on_close(assoc, ending)


def _dispatch(assoc: A.Association, handler: Handler, event: A.Event
              ) -> Iterator[float | None] | None:
    if isinstance(event, A.AssociationRequested):
        answer = handler.on_request(event.request)
        if isinstance(answer, P.AssociateAC):
            assoc.accept(answer)
        else:
            assoc.reject(answer)
    elif isinstance(event, (dimse.CommandReceived, dimse.DataFragment)):
        return handler.on_event(assoc, event)
    elif isinstance(event, A.ReleaseRequested):
        assoc.release()
    return None


def _run_job(sock: socket.socket, assoc: A.Association, handler: Handler,
             job: Iterator[float | None], timeouts: Timeouts) -> A.Event | None:
    """Step ``job`` to its end, sending after each step and handing the handler
    what the peer sent meanwhile (a C-CANCEL). A request that arrives once the job
    has sent its final response (the job may still be finishing, e.g. writing its
    audit record) runs next; a further one while that waits is the peer's protocol
    error (we negotiate one operation at a time) and aborts. Returns how the
    association ended, if it did; every job is closed then."""
    ending: A.Event | None = None
    queue = [job]
    try:
        while queue and not assoc.closed and ending is None:
            for wait in queue[0]:
                _flush(sock, assoc, timeouts)
                timeout = wait or 0.0
                while not assoc.closed and _readable(sock, timeout):
                    timeout = 0.0
                    try:
                        data = sock.recv(RECV_SIZE)
                    except OSError:
                        data = b""
                    assoc.receive_data(data)
                    for event in assoc.events():
                        if isinstance(event, (A.ReleaseRequested, A.Aborted)):
                            ending = event
                        nxt = _dispatch(assoc, handler, event)
                        if nxt is not None and len(queue) == 1:
                            queue.append(nxt)
                        elif nxt is not None:
                            nxt.close()
                            assoc.abort(P.UNEXPECTED_PDU_PARAMETER,
                                        source=P.ABORT_SOURCE_PROVIDER)
                    if not data:
                        break
                if assoc.closed or ending is not None:
                    break
            queue.pop(0).close()
            _flush(sock, assoc, timeouts)
    finally:
        for j in queue:
            j.close()
    return ending


def _readable(sock: socket.socket, timeout: float) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], timeout)[0])


def _flush(sock: socket.socket, assoc: A.Association, timeouts: Timeouts) -> None:
    out = assoc.data_to_send()
    if out:
        sock.settimeout(timeouts.idle_s)       # a peer that stops reading is cut off too
        try:
            sock.sendall(out)
        except OSError:
            assoc.receive_data(b"")
