"""Named points where tests can kill, fail or slow the daemon.

``hit(name)`` does nothing unless ``PACSVAULT_FAILPOINTS`` was set when the
process started, e.g. ``PACSVAULT_FAILPOINTS="mirror.after_first_site=kill"``
or ``"ingest.before_commit=raise;mirror.write=sleep:0.5"``. Actions:

* ``kill``       SIGKILL this process (a power cut, as far as this process knows)
* ``raise``      raise FailpointError
* ``sleep:SECS`` sleep that long
* ``kill@N``     kill on the Nth hit (1-based); likewise ``raise@N``

Known points (grep for ``failpoints.hit``):
  ingest.received          object spooled, nothing written to a site yet
  mirror.after_temp_write  temp file written and fsync'd on a site, not renamed
  mirror.after_first_site  one site holds a verified copy, the other not yet
  ingest.before_commit     every site verified, catalog row not committed
  ingest.after_commit      catalog committed, C-STORE response not sent
  s3.before_complete       every part uploaded and hashed, multipart not completed
  migrate.after_bundle_row bundle built locally, catalog says 'pending', nothing uploaded
  migrate.after_upload     bundle stored and verified on the tier, catalog still 'pending'
  migrate.after_tier_commit  tier copies committed, online copies not yet touched
  migrate.mid_purge        online copies marked 'purging', one file deleted
  recall.mid_write         some recalled instances written back, others not yet
  dr.after_member          a segment written to a DR volume, not yet in the catalog
  restore.after_deliver    one instance restored, the others not yet
"""
from __future__ import annotations

import os
import signal
import threading
import time


class FailpointError(RuntimeError):
    pass


def _parse(spec: str) -> dict[str, tuple[str, float, int]]:
    points: dict[str, tuple[str, float, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, action = item.partition("=")
        arg = 0.0
        nth = 1
        if "@" in action:
            action, _, n = action.partition("@")
            nth = int(n)
        if action.startswith("sleep:"):
            action, arg = "sleep", float(action.split(":", 1)[1])
        if action not in ("kill", "raise", "sleep"):
            raise ValueError(f"unknown failpoint action in PACSVAULT_FAILPOINTS: {item}")
        points[name.strip()] = (action, arg, nth)
    return points


_POINTS = _parse(os.environ.get("PACSVAULT_FAILPOINTS", ""))
_COUNTS: dict[str, int] = {}
_LOCK = threading.Lock()


def hit(name: str) -> None:
    if not _POINTS:
        return
    point = _POINTS.get(name)
    if point is None:
        return
    action, arg, nth = point
    with _LOCK:
        _COUNTS[name] = _COUNTS.get(name, 0) + 1
        count = _COUNTS[name]
    if action == "sleep":
        time.sleep(arg)
    elif count >= nth:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise FailpointError(name)
