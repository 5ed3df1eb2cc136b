"""A TCP proxy on loopback that cuts connections mid-request: an S3 endpoint
(or the network to it) failing in the middle of an upload.

Every accepted connection is forwarded to ``127.0.0.1:target_port``. While
``budget`` is set, a connection that has carried ``budget`` bytes from client
to server is reset (RST, no FIN: the server sees a truncated request, the
client a ConnectionResetError), so any request larger than the budget fails
however often it is retried, while small ones (an abort, a listing) get
through. ``heal()`` lifts the budget; ``drops`` counts the resets, so a test
can prove its fault really fired.
"""
from __future__ import annotations

import socket
import struct
import threading


def _reset(s: socket.socket) -> None:
    try:
        # Linger 0: close() sends RST and discards unsent data.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class DropProxy:
    def __init__(self, target_port: int, budget: int | None = None) -> None:
        self.target_port = target_port
        self.budget = budget
        self.drops = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._half: set[frozenset] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="dropproxy", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        self.budget = None

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
                self._socks |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    # A clean end in one direction is passed on as a half-close;
                    # the other direction's pump closes the pair when it ends.
                    dst.shutdown(socket.SHUT_WR)
                    self._finish(src, dst)
                    return
                budget = self.budget  # read once: heal() may run meanwhile
                if upstream and budget is not None and sent + len(data) > budget:
                    dst.sendall(data[: budget - sent])
                    with self._lock:
                        self.drops += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        # Cut (or an error): both sides are reset, as a dead link would leave them.
        for s in (src, dst):
            with self._lock:
                self._socks.discard(s)
            _reset(s)

    def _finish(self, a: socket.socket, b: socket.socket) -> bool:
        """Record one direction done; close the pair when both are."""
        key = frozenset((id(a), id(b)))
        with self._lock:
            done = key in self._half
            if done:
                self._half.discard(key)
                self._socks -= {a, b}
            else:
                self._half.add(key)
        if done:
            a.close()
            b.close()
        return done

    def close(self) -> None:
        self._closed = True
        try:
            # shutdown() first: on Linux, close() alone neither wakes a thread
            # blocked in accept() nor stops the socket from accepting.
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            _reset(s)

    def __enter__(self) -> "DropProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
