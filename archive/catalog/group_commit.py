"""Group commit: the catalog rows of concurrent C-STOREs share one transaction.

Each C-STORE may be acknowledged only after its row is committed, and every
commit costs a disk flush (SQLite WAL with synchronous=FULL, PostgreSQL with
synchronous_commit=on). When several associations store at once, one thread
commits whatever rows are waiting in a single transaction, so N objects cost
one flush instead of N, and each caller still returns only after the commit
that holds its row. A failing batch is retried one row at a time, so one bad
row never fails the others.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from archive.catalog.fastpath import RawTx
from archive.catalog.uow import Catalog

Work = Callable[[RawTx], Any]
log = logging.getLogger("pacsvault.catalog")


class _Item:
    __slots__ = ("work", "result", "error", "done", "detached")

    def __init__(self, work: Work, detached: bool = False) -> None:
        self.work = work
        self.detached = detached
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class GroupCommitter:
    def __init__(self, catalog: Catalog, max_batch: int = 64, defer_s: float = 0.1) -> None:
        self.catalog = catalog
        self.max_batch = max_batch
        self.defer_s = defer_s
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._deferred: list[_Item] = []
        self._deferred_since = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def run(self, work: Work) -> Any:
        """Run ``work(tx)`` in a committed transaction; returns its result or raises."""
        item = _Item(work)
        self._queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def submit(self, work: Work) -> None:
        """Run ``work(tx)`` with the next batch, or within ``defer_s`` if none comes,
        without waiting for it: it shares that batch's flush instead of costing one
        of its own. A failure is logged; the caller must not depend on it."""
        with self._lock:
            if not self._deferred:
                self._deferred_since = time.monotonic()
            self._deferred.append(_Item(work, detached=True))

    def drain(self) -> None:
        """Return once everything submitted before has been committed (or failed)."""
        self.run(lambda tx: None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _take_deferred(self) -> list[_Item]:
        with self._lock:
            taken, self._deferred = self._deferred, []
        return taken

    def _next(self) -> _Item | None | bool:
        """The next queued item; False when deferred work has waited long enough."""
        while True:
            with self._lock:
                due = self._deferred_since + self.defer_s if self._deferred else None
            try:
                if due is None:
                    return self._queue.get(timeout=self.defer_s)
                return self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                if due is not None:
                    return False

    def _run(self) -> None:
        while True:
            first = self._next()
            if first is False:
                self._commit(self._take_deferred())
                continue
            if first is None:
                if rest := self._take_deferred():
                    self._commit(rest)
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            self._commit(self._take_deferred() + batch)

    def _commit(self, batch: list[_Item]) -> None:
        try:
            raw = self.catalog.engine.raw_connection()  # pooled DBAPI connection
            try:
                tx = RawTx(raw.driver_connection, self.catalog.engine.dialect.name)
                tx.begin()
                results = [it.work(tx) for it in batch]
                tx.commit()
            except BaseException:
                raw.rollback()
                raise
            finally:
                raw.close()  # back to the pool
            for it, r in zip(batch, results):
                it.result = r
        except BaseException as e:  # noqa: BLE001 - handed to the caller, never swallowed
            if len(batch) == 1:
                batch[0].error = e
                if batch[0].detached:
                    log.warning("a deferred catalog update failed (%s); the repair loop "
                                "settles it later", type(e).__name__)
            else:
                for it in batch:
                    self._commit([it])
                return
        finally:
            # By now every item has its result or error (a failed batch was retried
            # item by item above), so every caller can be released.
            for it in batch:
                it.done.set()
