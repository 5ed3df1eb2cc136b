"""Write one object to every online site in parallel and verify each copy.

``MirrorWriter.write`` never raises because one site failed: it returns one
CopyOutcome per site and the caller decides (zero verified copies means the
object must not be acknowledged). A site that fails is skipped for
``retry_after_s`` seconds, so a dead mount costs one timeout, not one per object.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from archive import failpoints
from tiers.backend import Backend, BackendError, ObjectExists, Payload

log = logging.getLogger("pacsvault.mirror")


@dataclass(frozen=True)
class CopyOutcome:
    site: str
    ok: bool
    error: str = ""
    exists_different: bool = False  # the key holds other bytes (a conflicting version)


class SiteBreaker:
    """Remembers which sites failed recently, so writes skip them for a while."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self._down_until: dict[str, float] = {}
        self._reason: dict[str, str] = {}
        self._lock = threading.Lock()

    def is_open(self, site: str) -> bool:
        with self._lock:
            return time.monotonic() < self._down_until.get(site, 0.0)

    def trip(self, site: str, reason: str) -> None:
        with self._lock:
            first = site not in self._down_until or time.monotonic() >= self._down_until[site]
            self._down_until[site] = time.monotonic() + self.retry_after_s
            self._reason[site] = reason
        if first:
            log.error("site %s failed, writing without it for %.0fs: %s",
                      site, self.retry_after_s, reason)

    def reset(self, site: str) -> None:
        with self._lock:
            if self._down_until.pop(site, None) is not None:
                log.warning("site %s is writable again", site)
            self._reason.pop(site, None)

    def reason(self, site: str) -> str:
        with self._lock:
            return self._reason.get(site, "")


class MirrorWriter:
    def __init__(self, sites: list[Backend], *, timeout_s: float, retry_after_s: float) -> None:
        self.sites = sites
        self.timeout_s = timeout_s
        self.breaker = SiteBreaker(retry_after_s)
        # Generous: a hung NFS write keeps its thread; others must not queue behind it.
        self._pool = ThreadPoolExecutor(max_workers=16 * len(sites),
                                        thread_name_prefix="mirror")

    def _put(self, site: Backend, key: str, payload: Payload) -> CopyOutcome:
        try:
            site.put(key, payload)
        except ObjectExists as e:
            return CopyOutcome(site.name, False, str(e), exists_different=True)
        except BackendError as e:
            self.breaker.trip(site.name, str(e))
            return CopyOutcome(site.name, False, str(e))
        except Exception as e:  # a bug or an unexpected OS error: the copy is not verified
            log.exception("unexpected error writing to site %s", site.name)
            self.breaker.trip(site.name, type(e).__name__)
            return CopyOutcome(site.name, False, type(e).__name__)
        self.breaker.reset(site.name)
        return CopyOutcome(site.name, True)

    def writable_sites(self) -> int:
        """Sites not skipped after a recent failure (a write may still fail on one)."""
        return sum(not self.breaker.is_open(s.name) for s in self.sites)

    def write(self, key: str, payload: Payload) -> list[CopyOutcome]:
        return self.start(key, payload).wait()

    def start(self, key: str, payload: Payload) -> "PendingWrite":
        """Begin writing to every site not skipped; ``wait()`` gives the outcomes.
        The caller may do other work meanwhile (ingest commits the catalog row)."""
        skipped: dict[str, CopyOutcome] = {}
        futures: dict[Future, str] = {}
        for site in self.sites:
            if self.breaker.is_open(site.name):
                skipped[site.name] = CopyOutcome(site.name, False,
                                                 "skipped: " + self.breaker.reason(site.name))
            else:
                futures[self._pool.submit(self._put, site, key, payload)] = site.name
        return PendingWrite(self, skipped, futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


class PendingWrite:
    """Copies being written: which sites were attempted, and their outcomes."""

    def __init__(self, mirror: MirrorWriter, skipped: dict[str, CopyOutcome],
                 futures: dict[Future, str]) -> None:
        self.mirror, self.skipped, self.futures = mirror, skipped, futures
        self.deadline = time.monotonic() + mirror.timeout_s

    @property
    def attempted(self) -> list[str]:
        return list(self.futures.values())

    def wait(self) -> list[CopyOutcome]:
        outcomes = dict(self.skipped)
        pending = set(self.futures)
        first = True
        while pending:
            done, pending = wait(pending, timeout=max(0.0, self.deadline - time.monotonic()),
                                 return_when=FIRST_COMPLETED)
            if not done:
                break
            for fut in done:
                outcomes[self.futures[fut]] = fut.result()
            if first and pending:
                failpoints.hit("mirror.after_first_site")
                first = False
        for fut in pending:  # timed out: counted as failed; the thread finishes on its own
            name = self.futures[fut]
            self.mirror.breaker.trip(name, f"write took longer than {self.mirror.timeout_s:.0f}s")
            outcomes[name] = CopyOutcome(name, False, "timeout")
        return [outcomes[s.name] for s in self.mirror.sites]
