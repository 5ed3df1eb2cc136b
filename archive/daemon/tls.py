"""TLS for the DICOM listener (PS3.15 Annex B) and the HTTP endpoint.

* Contexts are server-side, TLS 1.2 or later, with Python's default cipher list
  (no anonymous or export suites); client certificates are checked against
  ``tls_ca`` when one is given, and required when the config says so.
* The handshake runs in the connection's own thread, never in the accept loop:
  a peer that connects and then says nothing would otherwise stall every other
  TLS connection to that listener.
"""
from __future__ import annotations

import logging
import os
import ssl
import stat
from pathlib import Path

from archive.errors import ConfigError

log = logging.getLogger("pacsvault.tls")

HANDSHAKE_TIMEOUT_S = 30.0


def _why(e: OSError) -> str:
    """A short reason (OpenSSL's, or the OS error); never file contents."""
    return getattr(e, "reason", None) or e.strerror or str(e) or type(e).__name__


def server_context(cert: Path, key: Path, ca: Path | None = None,
                   require_client_cert: bool = False, *, what: str = "tls") -> ssl.SSLContext:
    """An SSLContext for a listener; ConfigError (naming the key, never its contents) if unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{what}_cert/{what}_key: cannot load {cert} with {key}: {_why(e)}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{what}_ca: cannot load {ca}: {_why(e)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def warn_if_key_exposed(key: Path) -> None:
    """Log (once, from the supervisor) a private key that others than its owner may read."""
    try:
        mode = os.stat(key).st_mode
    except OSError:
        return  # server_context reports a missing key
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("private key %s is readable by group or others (mode %o); "
                    "chmod 600 it", key, stat.S_IMODE(mode))


class DeferredHandshake:
    """socketserver mixin: wrap accepted sockets in ``ssl_context`` (if set) and
    do the handshake in the request thread, with a timeout."""

    ssl_context: ssl.SSLContext | None = None

    def get_request(self):  # noqa: ANN201
        sock, addr = self.socket.accept()  # type: ignore[attr-defined]
        if self.ssl_context is None:
            return sock, addr
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        return self.ssl_context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False), addr

    def finish_request(self, request, client_address) -> None:  # noqa: ANN001
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                # A plain client on the TLS port, a bad or missing client certificate, a scan.
                log.warning("TLS handshake from %s failed: %s", client_address[0], _why(e))
                self.shutdown_request(request)  # type: ignore[attr-defined]
                return
        super().finish_request(request, client_address)  # type: ignore[misc]
