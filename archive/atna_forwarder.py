"""ATNA delivery from the audit trail itself: in order, after restarts and outages.

The catalog's ``audit_log`` is the queue. For each collector a cursor
(``atna_cursors``) says the position of the last record it took; a forwarder
sends the records after it, one by one in the trail's order, and moves the
cursor past each as soon as it was written to the collector. Nothing is held in
memory that a restart could lose: a collector away for a day gets the whole day
when it returns, and a process that stops mid-way leaves the rest to the next.

Every process that writes audit records runs a forwarder (the daemon, its DICOM
workers, a CLI command), woken by each new record; one at a time sends, the one
holding the collector's lease. A CLI command that exits while the collector is
away leaves its records to the daemon. The cursor starts at the first record
written after a process first had the collector configured.

A process killed between writing a message and moving the cursor sends that
message again: delivery is at least once, exactly once across clean stops.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from archive.audit import Event
from archive.catalog import lease
from archive.catalog.models import AtnaCursor, AuditRecord, Lease
from archive.catalog.uow import Catalog
from archive.clock import utcnow

log = logging.getLogger("pacsvault.atna")

BATCH = 100
LEASE_TTL_S = 60.0
MAX_PAUSE_S = 10.0

Render = Callable[[Event, int, str, datetime], tuple[bytes, int]]   # -> (message, severity)
Send = Callable[[bytes, int], None]                                # raises OSError


COLUMNS = (AuditRecord.id, AuditRecord.at, AuditRecord.hash, AuditRecord.action,
           AuditRecord.outcome, AuditRecord.actor, AuditRecord.source, AuditRecord.patient_id,
           AuditRecord.study_uid, AuditRecord.detail)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def event_of(r) -> Event:  # noqa: ANN001 - a row of COLUMNS
    try:
        detail = json.loads(r.detail or "{}")
    except ValueError:
        detail = {}
    return Event(r.action, r.outcome, r.actor, r.source, r.patient_id, r.study_uid,
                 detail if isinstance(detail, dict) else {})


class Forwarder:
    def __init__(self, open_catalog: Callable[[], Catalog], collector: str, render: Render,
                 send: Send, *, alert: Callable[[int, float], None] | None = None,
                 held_alert_s: float = 300.0) -> None:
        self._open_catalog = open_catalog
        self.collector = collector
        self.render, self.send = render, send
        self.holder = lease.new_holder()
        self.lease_name = f"atna:{collector}"[:128]
        self._catalog: Catalog | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()          # one pump at a time in this process
        self._failing = False
        self._failing_since = 0.0
        self._alerted = False
        # Called once per outage that lasts held_alert_s: (records waiting, seconds).
        self.alert, self.held_alert_s = alert, held_alert_s
        self._started = False
        self.sent = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="pacsvault-atna-forward",
                                        daemon=True)
        self._thread.start()

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:               # opened on first use (init makes the catalog)
            self._catalog = self._open_catalog()
        return self._catalog

    # -- called after each audit record this process wrote ---------------------------------
    def wake(self, record_id: int) -> None:
        self._start_at(record_id)
        self._wake.set()

    def _start_at(self, record_id: int) -> None:
        """The first record written with this collector configured starts its cursor."""
        if self._started:
            return
        with self.catalog.unit(write=True) as uow:
            s = uow.session
            if s.get(AtnaCursor, self.collector) is not None:
                return
            mod = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
            s.execute(mod.insert(AtnaCursor).values(
                collector=self.collector, last_id=record_id - 1, updated_at=utcnow())
                .on_conflict_do_nothing())
            uow.commit()
        self._started = True

    # -- sending ---------------------------------------------------------------------------------
    def behind(self) -> tuple[int, int]:
        """(records not yet sent, cursor); (0, -1) before the cursor exists."""
        with self.catalog.unit() as uow:
            s = uow.session
            cur = s.scalar(select(AtnaCursor.last_id).where(AtnaCursor.collector == self.collector))
            if cur is None:
                return 0, -1
            return s.scalar(select(func.count()).select_from(AuditRecord)
                            .where(AuditRecord.id > cur)) or 0, cur

    def pump(self) -> int:
        """Send what is behind, if this process gets the lease; how many were sent.
        Raises OSError when the collector could not take a message (it is retried)."""
        with self._lock:
            n, _ = self.behind()
            if n == 0 or self._held_elsewhere() or not lease.try_acquire(
                    self.catalog, self.lease_name, self.holder, LEASE_TTL_S):
                return 0
            sent = 0
            done = False
            try:
                while not self._stop.is_set() or sent < n:
                    with self.catalog.unit() as uow:
                        cur = uow.session.scalar(select(AtnaCursor.last_id).where(
                            AtnaCursor.collector == self.collector))
                        rows = uow.session.execute(
                            select(*COLUMNS).where(AuditRecord.id > cur)
                            .order_by(AuditRecord.id).limit(BATCH)).all()
                    if not rows:
                        break
                    for r in rows:
                        msg, severity = self.render(event_of(r), r.id, r.hash, r.at)
                        try:
                            self.send(msg, severity)
                        except OSError:
                            self.failed += 1
                            raise
                        self.sent += 1
                        with self.catalog.unit(write=True) as uow:
                            uow.session.execute(update(AtnaCursor).where(
                                AtnaCursor.collector == self.collector).values(
                                last_id=r.id, updated_at=utcnow()))
                            uow.commit()
                        sent += 1
                    lease.try_acquire(self.catalog, self.lease_name, self.holder, LEASE_TTL_S)
                done = True
            finally:
                # Caught up: let another process send next. Failing: keep the lease while
                # retrying, so the others only read (it expires if this process dies).
                if done:
                    lease.release(self.catalog, self.lease_name, self.holder)
            return sent

    def _held_elsewhere(self) -> bool:
        """Another live process holds the lease: a read, no write lock taken."""
        with self.catalog.unit() as uow:
            row = uow.session.execute(select(Lease.holder, Lease.expires_at).where(
                Lease.name == self.lease_name)).first()
        return row is not None and row.holder != self.holder and \
            _aware(row.expires_at) > utcnow() and not lease.holder_is_dead_here(row.holder)

    def _run(self) -> None:
        pause = 0.25
        while not self._stop.is_set():
            self._wake.wait(1.0 if not self._failing else pause)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.pump()
            except OSError as e:                 # the collector: retried, growing pause
                if not self._failing:
                    log.warning("audit collector %s unreachable (%s); audit messages wait in "
                                "the audit trail and are sent in order when it returns",
                                self.collector, type(e).__name__)
                    self._failing_since = time.monotonic()
                self._failing = True
                self._held_too_long()
                pause = min(pause * 2, MAX_PAUSE_S)
                continue
            except Exception as e:  # noqa: BLE001 - the catalog away: tried again
                log.warning("ATNA forwarding paused: %s", type(e).__name__)
                pause = min(pause * 2, MAX_PAUSE_S)
                self._failing = True
                continue
            if self._failing:
                log.warning("audit collector %s reachable again", self.collector)
            self._failing, self._alerted, pause = False, False, 0.25

    def _held_too_long(self) -> None:
        held_s = time.monotonic() - self._failing_since
        if self.alert is None or self._alerted or held_s < self.held_alert_s:
            return
        self._alerted = True
        try:
            self.alert(self.behind()[0], held_s)
        except Exception:  # noqa: BLE001 - an alert hook failing never stops forwarding
            log.exception("ATNA held-back alert failed")

    def flush(self, timeout: float) -> bool:
        """Wait until the collector has every record (or the timeout); True if it has."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.behind()[0] == 0:
                    return True
            except Exception:  # noqa: BLE001 - the catalog away: not flushed
                pass
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            time.sleep(0.05)

    def stats(self) -> dict[str, int | str | bool]:
        try:
            behind = self.behind()[0]
        except Exception:  # noqa: BLE001
            behind = -1
        return {"collector": self.collector, "sent": self.sent, "failed_attempts": self.failed,
                "behind": behind, "failing": self._failing, "dropped": 0}

    def close(self, timeout: float = 5.0) -> None:
        """Send what is behind for up to ``timeout`` seconds (the rest waits in the trail
        for the next process), then stop."""
        deadline = time.monotonic() + timeout
        while self._catalog is not None and time.monotonic() < deadline:
            try:
                if self.behind()[0] == 0 or self.pump() == 0:
                    break
            except Exception:  # noqa: BLE001 - away: left for the next process
                break
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2)
        if self._catalog is not None:
            try:
                with self._lock:        # the next process takes over at once, not at expiry
                    lease.release(self._catalog, self.lease_name, self.holder)
            except Exception:  # noqa: BLE001 - it expires on its own
                pass
            self._catalog.close()
