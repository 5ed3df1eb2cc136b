"""Who may use the HTTP side, and the status as Prometheus metrics (the routes
are in archive/daemon/web.py).

Once the install has operator accounts (looked up on every request, so the first
account made on a running daemon closes the endpoint at once) every path but
/healthz wants HTTP Basic credentials of an account whose role allows what is
asked. Wrong ones are throttled per source (429 with Retry-After) and never
count towards the account's lock.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import math
import threading
import time
from datetime import datetime
from typing import Any, Callable

from prometheus_client.core import GaugeMetricFamily

from archive import auth
from archive.catalog.uow import Catalog
from archive.config.schema import AccountSettings
from archive.daemon.throttle import SourceThrottle

log = logging.getLogger("pacsvault.http")


class _StatusCollector:
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self):  # noqa: ANN201
        st = self.status()
        yield GaugeMetricFamily("pacsvault_instances", "Instances in the catalog",
                                value=st["instances"])
        yield GaugeMetricFamily("pacsvault_under_replicated",
                                "Copies missing on a site (repair queue length)",
                                value=st["under_replicated"])
        age = GaugeMetricFamily("pacsvault_under_replicated_oldest_age_seconds",
                                "Age of the oldest under-replicated object")
        age.add_metric([], st["oldest_under_replicated_age_s"] or 0.0)
        yield age
        healthy = GaugeMetricFamily("pacsvault_site_healthy", "1 if the site takes writes",
                                    labels=["site"])
        objects = GaugeMetricFamily("pacsvault_site_objects", "Verified copies on the site",
                                    labels=["site"])
        for s in st["sites"]:
            healthy.add_metric([s["name"]], 1.0 if s["healthy"] else 0.0)
            objects.add_metric([s["name"]], s["objects"])
        yield healthy
        yield objects
        o = st.get("object_tier")
        if o:
            for metric, help_, value in (
                    ("pacsvault_object_tier_healthy", "1 if the object tier answers", float(o["healthy"])),
                    ("pacsvault_object_tier_instances", "Instances with a verified object copy", o["objects"]),
                    ("pacsvault_object_tier_stored_bytes", "Bytes of verified study bundles", o["stored_bytes"]),
                    ("pacsvault_object_tier_corrupt", "Object copies found damaged", o["corrupt"]),
                    ("pacsvault_purges_pending", "Online copies whose deletion is unfinished",
                     o["purges_pending"])):
                yield GaugeMetricFamily(metric, help_, value=value)
        yield from _scrub_and_jobs(st)


def _iso_ts(text: str | None) -> float:
    return datetime.fromisoformat(text).timestamp() if text else 0.0


def _scrub_and_jobs(st: dict[str, Any]):  # noqa: ANN202
    sc = st.get("last_scrub")
    for metric, help_, key in (
            ("pacsvault_scrub_last_findings", "Findings of the last finished scrub", "findings"),
            ("pacsvault_scrub_last_repaired", "Copies the last finished scrub repaired", "repaired"),
            ("pacsvault_scrub_last_unrecoverable",
             "Damaged copies with no good copy anywhere, found by the last scrub", "unrecoverable"),
            ("pacsvault_scrub_last_objects", "Copies the last finished scrub checked", "objects")):
        yield GaugeMetricFamily(metric, help_, value=sc[key] if sc else 0)
    yield GaugeMetricFamily("pacsvault_scrub_last_finished_timestamp_seconds",
                            "When the last scrub finished (0: never)",
                            value=_iso_ts(sc["finished_at"]) if sc else 0.0)
    ok = GaugeMetricFamily("pacsvault_job_last_run_ok",
                           "1 if the job's newest run ended ok, 0 if not (findings, failed, ...)",
                           labels=["job"])
    last_ok = GaugeMetricFamily("pacsvault_job_last_ok_timestamp_seconds",
                                "When the job last finished ok (0: never)", labels=["job"])
    for name, j in sorted(st.get("jobs", {}).items()):
        run = j.get("last_run")
        if run is not None:
            ok.add_metric([name], 1.0 if run["outcome"] == "ok" else 0.0)
        last_ok.add_metric([name], _iso_ts(j.get("last_ok_at")))
    yield ok
    yield last_ok
    n = GaugeMetricFamily("pacsvault_unprotected_objects",
                          "Acknowledged instances not yet protected at this level", labels=["level"])
    b = GaugeMetricFamily("pacsvault_unprotected_bytes",
                          "Bytes of those instances", labels=["level"])
    age = GaugeMetricFamily("pacsvault_unprotected_oldest_age_seconds",
                            "Age of the oldest of them (0: none)", labels=["level"])
    for level, e in st.get("unprotected", {}).items():
        n.add_metric([level], e["objects"])
        b.add_metric([level], e["bytes"])
        age.add_metric([level], e["oldest_age_s"] or 0.0)
    yield n
    yield b
    yield age
    w = GaugeMetricFamily("pacsvault_watch_condition",
                          "1 for each condition the daemon's watch sees now (archive/app/watch.py)",
                          labels=["condition", "place"])
    for key in st.get("watch", []):
        kind, _, place = key.partition(":")
        w.add_metric([kind, place], 1.0)
    yield w
    if st.get("atna"):
        yield GaugeMetricFamily("pacsvault_atna_records_waiting",
                                "Audit records the ATNA collector has not taken yet",
                                value=st["atna"]["waiting"])


class AccountGate:
    """Who may read /status and /metrics: anyone while the install has no accounts;
    then an account allowed to read (a Prometheus scraper gets a viewer account).
    ``decide`` answers (HTTP status, seconds to wait): 200, 401, or 429 for a source
    that failed too often. A right answer is remembered for a minute: argon2 is
    slow on purpose."""

    ACCOUNTS_RECHECK_S = 0.5          # how soon an account made elsewhere takes effect

    def __init__(self, catalog: Catalog, policy: AccountSettings,
                 throttle: SourceThrottle | None = None) -> None:
        self.catalog, self.policy = catalog, policy
        self.throttle = throttle or SourceThrottle()
        self._good: dict[str, tuple[float, str, str]] = {}   # header hash -> (until, name, role)
        self._accounts = False        # accounts are disabled, never removed: once on, on
        self._checked_at = -math.inf
        self._lock = threading.Lock()

    def _has_accounts(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if not self._accounts and now - self._checked_at >= self.ACCOUNTS_RECHECK_S:
                self._accounts = auth.has_accounts(self.catalog)
                self._checked_at = now
            return self._accounts

    def decide(self, header: str | None, source: str) -> tuple[int, float]:
        code, wait, _ = self.authorize(header, source, "read")
        return (401 if code == 403 else code), wait

    def authorize(self, header: str | None, source: str, permission: str
                  ) -> tuple[int, float, str]:
        """(200, 0, account name) or (401 | 403 | 429, seconds to wait, ""); on an
        install without accounts everyone is "-" and may do anything."""
        if not self._has_accounts():
            return 200, 0.0, "-"
        wait = self.throttle.retry_after(source)
        if wait > 0:
            return 429, wait, ""
        if not header or not header.startswith("Basic "):
            return 401, 0.0, ""              # no credentials yet: not a guess
        key = hashlib.sha256(header.encode()).hexdigest()
        known = self._good.get(key)
        if known is None or known[0] <= time.monotonic():
            try:
                name, _, pw = base64.b64decode(header[6:], validate=True).decode().partition(":")
                u = auth.check_password(self.catalog, name, pw, self.policy,
                                        source=f"http {source}", count_failures=False)
            except (ValueError, UnicodeDecodeError, auth.AuthError):
                self.throttle.failed(source)
                return 401, 0.0, ""
            if u.must_change:
                return 401, 0.0, ""
            if len(self._good) > 1024:      # bounded: forget the remembered answers
                self._good.clear()
            known = self._good[key] = (time.monotonic() + 60, u.name, u.role)
        _, name, role = known
        if permission not in auth.ROLES.get(role, ()):
            return 403, 0.0, name
        return 200, 0.0, name
