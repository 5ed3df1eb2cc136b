"""Seeing trouble: conditions the daemon checks on a schedule, and an alert when one begins.

Each check names the conditions that hold now, each under a key (``site-down:site-b``).
A condition that was not there at the last look raises its alert once; while it lasts
nothing more is sent; a site that comes back sends a note. Alerts go through the
configured hooks ([alerts]: command, webhook, syslog) and are counted in
``/metrics`` (``pacsvault_watch_condition``). They carry counts and names of places,
never a patient, a study or a UID.

What is watched ([alerts] thresholds):
- a site unusable (its marker gone, unmounted, read-only, full), and back;
- objects refused for want of a verified copy (or of the catalog), from the audit trail;
- log-in failures: ``failed_logins`` within ``failed_logins_window_min``; accounts locked;
- the newest catalog backup on a site older than ``catalog_backup_max_age_h``;
- DR volumes sealed ``offsite_after_days`` ago and still on site (overdue for rotation).

ATNA messages held back alert from their forwarder (archive/atna_forwarder.py), the audit
chain failing verification from the audit-verify job.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from sqlalchemy import func, select

from archive.alerts import Alert
from archive.app.catalog_backup import newest
from archive.catalog.models import AuditRecord, DrVolume, User
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.config.schema import Settings
from dr.format import IN_LIBRARY, SEALED
from tiers.backend import Backend

log = logging.getLogger("pacsvault.watch")


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class Watch:
    def __init__(self, settings: Settings, catalog: Catalog, sites: list[Backend],
                 send: Callable[[Alert], Any], clock: Clock = utcnow) -> None:
        self.s, self.catalog, self.sites, self.send, self.clock = \
            settings, catalog, sites, send, clock
        self.active: dict[str, Alert] = {}
        self.started = time.monotonic()
        with catalog.unit() as uow:          # refusals are counted from here on
            self.last_record = uow.session.scalar(select(func.max(AuditRecord.id))) or 0

    def check(self) -> list[Alert]:
        """Look once; send and return the alerts of conditions that began (and sites back)."""
        now: dict[str, Alert] = {}
        for look in (self._sites, self._refused, self._logins, self._locked,
                     self._catalog_backups, self._offsite):
            try:
                now.update(look())
            except Exception:  # noqa: BLE001 - one check failing never stops the others
                log.exception("watch: %s failed", look.__name__)
        began = [a for k, a in now.items() if k not in self.active]
        for key in self.active:
            if key.startswith("site-down:") and key not in now:
                name = key.split(":", 1)[1]
                began.append(Alert("site", "warning", f"site {name} is usable again; its "
                                   "missing copies are being repaired",
                                   details="pacsvault status"))
        # Refusals are events, not states: each batch is new.
        self.active = {k: a for k, a in now.items() if not k.startswith("refused:")}
        for alert in began:
            log.warning("alert: %s", alert.summary)
            self.send(alert)
        return began

    def conditions(self) -> list[str]:
        return sorted(self.active)

    # -- the checks -------------------------------------------------------------------------
    def _sites(self) -> dict[str, Alert]:
        out = {}
        for site in self.sites:
            h = site.health()
            if not h.ok:
                out[f"site-down:{site.name}"] = Alert(
                    "site", "critical", f"site {site.name} is unusable ({h.reason}); objects are "
                    "acknowledged with the other site's copy and repaired when it returns",
                    counts={"sites_down": sum(1 for s in self.sites if not s.health().ok)},
                    details="pacsvault status")
        return out

    def _refused(self) -> dict[str, Alert]:
        with self.catalog.unit() as uow:
            rows = uow.session.execute(select(AuditRecord.id, AuditRecord.detail).where(
                AuditRecord.id > self.last_record, AuditRecord.action == "object-received",
                AuditRecord.outcome == "failure").order_by(AuditRecord.id)).all()
            self.last_record = max([self.last_record, *(r.id for r in rows)])
        refused = 0
        for r in rows:
            try:
                refused += int(json.loads(r.detail).get("no_copy", 0))
            except (ValueError, TypeError, AttributeError):
                continue
        if not refused:
            return {}
        return {f"refused:{self.last_record}": Alert(
            "ingest", "critical", f"{refused} objects refused: no verified copy could be "
            "written (or the catalog was unreachable); their senders were told to retry",
            counts={"refused": refused}, details="pacsvault status; the daemon log")}

    def _logins(self) -> dict[str, Alert]:
        a = self.s.alerts
        since = self.clock() - timedelta(minutes=a.failed_logins_window_min)
        with self.catalog.unit() as uow:
            n = uow.session.scalar(select(func.count()).select_from(AuditRecord).where(
                AuditRecord.action == "login-failed", AuditRecord.at >= since)) or 0
        if n < a.failed_logins:
            return {}
        return {"logins-failing": Alert(
            "security", "warning", f"{n} failed log-ins in the last "
            f"{a.failed_logins_window_min:.0f} minutes", counts={"failed_logins": n},
            details="pacsvault audit --since TODAY (action login-failed: who and from where)")}

    def _locked(self) -> dict[str, Alert]:
        with self.catalog.unit() as uow:
            n = uow.session.scalar(select(func.count()).select_from(User).where(
                User.locked_until > self.clock())) or 0
        if not n:
            return {}
        return {"accounts-locked": Alert(
            "security", "warning", f"{n} accounts locked after repeated failed log-ins",
            counts={"accounts_locked": n}, details="pacsvault user list")}

    def _catalog_backups(self) -> dict[str, Alert]:
        max_s = self.s.alerts.catalog_backup_max_age_h * 3600
        out = {}
        for site in self.sites:
            if not site.health().ok:
                continue                      # its own alert says so
            b = newest(site, self.clock)
            age = None if b is None else b.get("age_s")
            # A new install has none yet: not before it could have made one.
            if (age is None and time.monotonic() - self.started > max_s) or \
                    (age is not None and age > max_s):
                out[f"catalog-backup-old:{site.name}"] = Alert(
                    "catalog", "warning", f"the newest catalog backup on {site.name} is "
                    + (f"{age / 3600:.0f} hours old" if age is not None else "missing"),
                    counts={"age_s": int(age or 0)},
                    details="pacsvault jobs (catalog-backup); pacsvault catalog backup")
        return out

    def _offsite(self) -> dict[str, Alert]:
        days = self.s.alerts.offsite_after_days
        before = self.clock() - timedelta(days=days)
        with self.catalog.unit() as uow:
            n = uow.session.scalar(select(func.count()).select_from(DrVolume).where(
                DrVolume.state.in_((SEALED, IN_LIBRARY)), DrVolume.sealed_at <= before)) or 0
        if not n:
            return {}
        return {"dr-not-offsite": Alert(
            "dr", "warning", f"{n} DR volumes sealed more than {days:g} days ago are still on "
            "site: send them offsite", counts={"volumes": n},
            details="pacsvault dr volumes; pacsvault dr manifest")}
