"""The DICOM peer allow-list: AE title + source address (+ the peer's own port).

Rows live in the catalog (``pacsvault peer add``); the daemon re-reads them
every few seconds so a change needs no restart. Host names are resolved when
the list is loaded. The port is the peer's listening port (where results are
sent back); an SCU's source port is ephemeral, so it is not compared.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from archive.catalog import repo
from archive.catalog.models import Peer
from archive.catalog.uow import Catalog
from archive.errors import InvalidInput
from archive.uids import validate_ae_title

log = logging.getLogger("pacsvault.peers")


@dataclass(frozen=True)
class PeerEntry:
    ae_title: str
    host: str
    port: int | None


def normalize_ip(addr: str) -> str:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def resolve(host: str) -> set[str]:
    try:
        return {normalize_ip(host)} if ipaddress.ip_address(host) else set()
    except ValueError:
        pass
    try:
        return {normalize_ip(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, ValueError):  # ValueError: IDNA UnicodeError, embedded NUL
        return set()


def validate_host(host: str) -> str:
    host = host.strip()
    if (not host or len(host) > 253
            or any(c.isspace() or not c.isprintable() or c in "/\\@" for c in host)
            or any(not 0 < len(p) <= 63 for p in host.rstrip(".").split("."))):
        raise InvalidInput("host must be an IP address or a host name")
    return host


def add_peer(catalog: Catalog, ae_title: str, host: str, port: int | None, now: datetime) -> None:
    ae = validate_ae_title(ae_title)
    host = validate_host(host)
    if port is not None and not 1 <= port <= 65535:
        raise InvalidInput("port must be 1-65535")
    # write=True: the write lock from the start; a read that later writes fails at once
    # (SQLite's busy snapshot) when another process commits in between.
    with catalog.unit(write=True) as uow:
        existing = uow.session.scalar(select(Peer).where(Peer.ae_title == ae, Peer.host == host))
        if existing is not None:
            existing.port = port
        else:
            uow.session.add(Peer(ae_title=ae, host=host, port=port, created_at=now))
        uow.commit()


def remove_peer(catalog: Catalog, ae_title: str, host: str | None) -> int:
    ae = validate_ae_title(ae_title)
    with catalog.unit() as uow:
        q = delete(Peer).where(Peer.ae_title == ae)
        if host is not None:
            q = q.where(Peer.host == validate_host(host))
        n = uow.session.execute(q).rowcount
        uow.commit()
    return n


def list_peers(catalog: Catalog) -> list[PeerEntry]:
    with catalog.unit() as uow:
        return [PeerEntry(p.ae_title, p.host, p.port) for p in repo.peers(uow.session)]


class PeerRegistry:
    """Answers 'may this AE at this address associate?' from a cached allow-list."""

    def __init__(self, catalog: Catalog, allow_any: bool, ttl_s: float = 5.0) -> None:
        self.catalog = catalog
        self.allow_any = allow_any
        self.ttl_s = ttl_s
        self._allowed: dict[str, set[str]] = {}
        self._loaded_at = -1e9
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        allowed: dict[str, set[str]] = {}
        for p in list_peers(self.catalog):
            allowed.setdefault(p.ae_title, set()).update(resolve(p.host))
        self._allowed = allowed
        self._loaded_at = time.monotonic()

    def check(self, calling_ae: str, address: str) -> tuple[bool, str]:
        """(allowed, reason). The reason names the AE and address, never data."""
        if self.allow_any:
            return True, "allow_any_peer is on"
        with self._lock:
            if time.monotonic() - self._loaded_at > self.ttl_s:
                try:
                    self._refresh()
                except Exception as e:  # catalog briefly unreachable: keep the last list
                    log.warning("cannot reload the peer list (%s); keeping the previous one",
                                type(e).__name__)
                    if self._loaded_at < 0:
                        return False, "peer list unavailable"
            allowed = self._allowed
        ae = calling_ae.strip()
        ips = allowed.get(ae)
        if ips is None:
            return False, f"calling AE {ae!r} is not a known peer"
        if normalize_ip(address) not in ips:
            return False, f"calling AE {ae!r} is not allowed from {address}"
        return True, "known peer"
