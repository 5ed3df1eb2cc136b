"""Leases: named locks with an expiry, kept in the catalog.

Two processes (a scheduled job in ``serve`` and an operator's CLI run, or two
daemons sharing one PostgreSQL catalog) must never migrate or recall the same
study at once. A lease row names its holder and an expiry; a holder that dies
stops renewing and the lease lapses. Taking a lease is one conditional UPDATE
(or INSERT), which both SQLite and PostgreSQL apply atomically.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

from sqlalchemy import delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from archive.catalog.models import Lease
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.errors import PacsvaultError

log = logging.getLogger("pacsvault.lease")


class LeaseHeld(PacsvaultError):
    """{} is busy: another process holds it ({}); try again later"""

    exit_code = 75  # EX_TEMPFAIL


def new_holder() -> str:
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_dead_here(holder: str) -> bool:
    """True when ``holder`` names a process on this host that no longer exists
    (it was killed): its lease need not be waited out. PID reuse can only make
    us wait for the expiry, never take a live holder's lease."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname()[:64] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def try_acquire(catalog: Catalog, name: str, holder: str, ttl_s: float,
                clock: Clock = utcnow) -> bool:
    now = clock()
    until = now + timedelta(seconds=ttl_s)
    with catalog.unit(write=True) as uow:
        s = uow.session
        current = s.scalar(select(Lease.holder).where(Lease.name == name))
        stale = [current] if current is not None and holder_is_dead_here(current) else []
        r = s.execute(update(Lease)
                      .where(Lease.name == name,
                             or_(Lease.holder == holder, Lease.expires_at < now,
                                 Lease.holder.in_(stale)))
                      .values(holder=holder, expires_at=until))
        if r.rowcount == 1:
            uow.commit()
            return True
        mod = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
        r = s.execute(mod.insert(Lease).values(name=name, holder=holder, expires_at=until)
                      .on_conflict_do_nothing())
        uow.commit()
        return r.rowcount == 1


def release(catalog: Catalog, name: str, holder: str) -> None:
    with catalog.unit(write=True) as uow:
        uow.session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))
        uow.commit()


def holder_of(catalog: Catalog, name: str) -> str | None:
    with catalog.unit() as uow:
        row = uow.session.get(Lease, name)
        return row.holder if row is not None else None


class HeldLease:
    """A lease renewed in the background until released. ``lost`` turns true if
    a renewal fails (the catalog was unreachable past the expiry): the holder
    must stop before its next irreversible step."""

    def __init__(self, catalog: Catalog, name: str, holder: str, ttl_s: float,
                 clock: Clock) -> None:
        self.catalog, self.name, self.holder = catalog, name, holder
        self.ttl_s, self.clock = ttl_s, clock
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{name[:20]}",
                                        daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not try_acquire(self.catalog, self.name, self.holder, self.ttl_s, self.clock):
                    self.lost = True
            except Exception as e:  # keep trying until the expiry makes it moot
                log.warning("could not renew lease %s: %s", self.name, type(e).__name__)
                self.lost = True
            if self.lost:
                log.error("lease %s lost; the work holding it stops", self.name)
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            release(self.catalog, self.name, self.holder)
        except Exception as e:  # it expires on its own
            log.warning("could not release lease %s: %s", self.name, type(e).__name__)


@contextmanager
def lease(catalog: Catalog, name: str, *, what: str, ttl_s: float = 120, wait_s: float = 0,
          holder: str | None = None, clock: Clock = utcnow) -> Iterator[HeldLease]:
    """Hold ``name`` for the block, or raise LeaseHeld after waiting ``wait_s``."""
    holder = holder or new_holder()
    deadline = time.monotonic() + wait_s
    while not try_acquire(catalog, name, holder, ttl_s, clock):
        if time.monotonic() >= deadline:
            raise LeaseHeld(what, holder_of(catalog, name) or "unknown")
        time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
    held = HeldLease(catalog, name, holder, ttl_s, clock)
    try:
        yield held
    finally:
        held.release()
