"""Is a listening port free? Asked before the daemon starts its workers.

The DICOM workers share their port with SO_REUSEPORT, which would also let them
join any other socket bound there with that option (another daemon, another
program of the same user) and split associations with it, silently. A probe
bound WITHOUT SO_REUSEPORT fails if anything at all holds the port, so a busy
port is refused at start-up, named by its config key.
"""
from __future__ import annotations

import errno
import socket
import time

from archive.errors import ConfigError


def check_free(key: str, host: str, port: int, wait_s: float = 2.0) -> None:
    """Raise ConfigError naming ``key`` if ``host:port`` cannot be listened on.
    A port still busy is asked again for ``wait_s``: the workers of a daemon that
    was just killed (a restart after a crash) may take a moment to be gone."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _probe(key, host, port)
        except _InUse:
            if time.monotonic() >= deadline:
                raise ConfigError(f"{key} {port} on {host} is in use by another program "
                                  "(another pacsvault instance?): free it or choose another "
                                  "port") from None
            time.sleep(0.1)


class _InUse(Exception):
    pass


def _probe(key: str, host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"{key}: cannot resolve bind address {host!r} ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        # As the real listeners do: TIME_WAIT connections of a previous run do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        probe.listen(1)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise _InUse() from None
        raise ConfigError(f"{key} {port} on {host}: cannot listen ({e.strerror})") from None
    finally:
        probe.close()
