"""Alerts: findings reach an operator through configured hooks ([alerts]).

Hooks are a command (argv, no shell), a webhook (HTTP POST of JSON) and syslog.
Each is tried on its own; a failing hook never stops the others and never
raises into the job that found the problem: ``send_alert`` returns the problems.

An alert carries counts, a run id and where to look, never identifiers: no
patient data and no Study/SOP Instance UIDs (those stay in the catalog and the
CLI report). A UID-looking string in the free text is masked as a second fence.
"""
from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import urlsplit

from archive.config.schema import AlertSettings

log = logging.getLogger("pacsvault.alerts")
# The CLI reports hook problems itself; without this, logging's last-resort
# handler would print them to stderr a second time. The daemon's root handler
# still receives every record.
log.addHandler(logging.NullHandler())

Severity = Literal["warning", "critical"]
RANK = {"warning": 0, "critical": 1}
# syslog severities (RFC 5424 table 2): warning 4, critical 2
SYSLOG_SEVERITY = {"warning": 4, "critical": 2}
# Four or more dotted numeric components: a DICOM UID, not a version or an IPv4 address.
UID_LIKE = re.compile(r"\b\d+(?:\.\d+){4,}\b")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _mask(text: str) -> str:
    return UID_LIKE.sub("<uid>", text).replace("\n", " ").replace("\r", " ")


@dataclass(frozen=True)
class Alert:
    source: str                         # scrub | migrate | repair | job | audit | ...
    severity: Severity
    summary: str                        # one line, no identifiers
    counts: dict[str, int] = field(default_factory=dict)
    run_id: int | None = None
    details: str = ""                   # where an operator sees the full report
    host: str = field(default_factory=socket.gethostname)
    time: str = field(default_factory=_utc_now)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"], d["details"] = _mask(self.summary), _mask(self.details)
        d["counts"] = {str(k): int(v) for k, v in self.counts.items()}
        return d

    def line(self) -> str:
        """The one-line form, for syslog and logs."""
        j = self.to_json()
        counts = " ".join(f"{k}={v}" for k, v in j["counts"].items())
        run = f" run {self.run_id}" if self.run_id is not None else ""
        return (f"[{self.severity}] {self.source}{run}: {j['summary']}"
                + (f" ({counts})" if counts else "") + (f"; {j['details']}" if j["details"] else ""))


def scrub_alert(report: dict[str, Any]) -> Alert | None:
    """The alert for a scrub report (``ScrubReport.to_json()``); None when it is ok."""
    if report.get("ok"):
        return None
    skipped = len(report.get("skipped_sites") or {})
    counts = {k: int(report.get(k) or 0)
              for k in ("damaged", "repaired", "unrecoverable", "orphans", "objects", "bytes")}
    counts["skipped_sites"] = skipped
    critical = counts["unrecoverable"] > 0 or skipped > 0
    parts = [f"{counts['damaged']} damaged ({counts['repaired']} repaired, "
             f"{counts['unrecoverable']} unrecoverable)", f"{counts['orphans']} orphans"]
    if skipped:
        parts.append(f"{skipped} site(s) skipped: {', '.join(sorted(report['skipped_sites']))}")
    run_id = report.get("run_id")
    return Alert(
        source="scrub", severity="critical" if critical else "warning",
        summary=f"scrub of {', '.join(report.get('sites') or [])}: " + ", ".join(parts),
        counts=counts, run_id=run_id,
        details=f"findings of run {run_id}: the report of `pacsvault scrub --json` "
                f"and the catalog table scrub_findings")


def migrate_alert(totals: dict[str, Any], findings: int, job_run: int | None) -> Alert:
    """The alert for a migrate run that failed a study or found damage."""
    failed = int(totals.get("failed") or 0)
    return Alert(
        source="migrate", severity="critical" if findings else "warning",
        summary=f"migration to the object tier: {failed} studies failed, {findings} findings "
                f"(online copies of those studies are kept)",
        counts={"studies": int(totals.get("studies") or 0), "failed": failed,
                "findings": findings},
        run_id=job_run,
        details=f"job run {job_run} in `pacsvault jobs`; `pacsvault migrate --json` names the studies")


def dr_alert(report: dict[str, Any], job_run: int | None) -> Alert:
    """A DR write that found an object without a verified copy, or needs the next volume."""
    bad = len(report.get("findings") or [])
    if bad:
        summary = (f"DR write: {bad} objects had no verified copy and were not written; "
                   f"{report.get('pending_studies', 0)} studies pending")
    else:
        summary = (f"DR write: volume full, load volume {report.get('next_barcode')}; "
                   f"{report.get('pending_studies', 0)} studies pending")
    return Alert(source="dr", severity="critical" if bad else "warning", summary=summary,
                 counts={"studies": int(report.get("studies") or 0), "findings": bad,
                         "pending_studies": int(report.get("pending_studies") or 0)},
                 run_id=job_run, details=f"job run {job_run} in `pacsvault jobs`")


def drill_alert(report: dict[str, Any]) -> Alert:
    """A restore drill that failed: counts only; `pacsvault drill --history` has the rest."""
    return Alert(source="drill", severity="critical",
                 summary=f"restore drill {report.get('drill_id')} failed: "
                         f"{len(report.get('failures') or [])} instances not restored intact",
                 counts={"failures": len(report.get("failures") or [])},
                 run_id=report.get("drill_id"),
                 details=f"drill {report.get('drill_id')} (seed {report.get('seed')}) in "
                         "`pacsvault drill --history`")


def audit_alert(result: dict[str, Any], job_run: int | None) -> Alert:
    """The audit trail failed verification (``audit.verify``): where, and why (fixed text,
    no record contents)."""
    bad = result.get("first_bad") or {}
    pos = bad.get("position")
    where = f"broken at record {pos}" if pos is not None else "cannot be verified"
    return Alert(source="audit", severity="critical",
                 summary=f"audit trail {where}: {bad.get('why', '')}",
                 counts={"records": int(result.get("records") or 0),
                         **({"position": int(pos)} if pos is not None else {})},
                 run_id=job_run,
                 details=f"job run {job_run} in `pacsvault jobs`; `pacsvault audit --verify` "
                         "says the same; docs/security.md (the audit trail) says what to do")


def send_alert(settings: AlertSettings, alert: Alert) -> list[str]:
    """Deliver ``alert`` to every configured hook. Never raises; returns the problems."""
    level = logging.ERROR if alert.severity == "critical" else logging.WARNING
    log.log(level, "ALERT %s", alert.line())
    if RANK[alert.severity] < RANK[settings.min_severity]:
        return []
    hooks = []
    if settings.command:
        hooks.append(("command", _send_command))
    if settings.webhook_url:
        hooks.append(("webhook", _send_webhook))
    if settings.syslog:
        hooks.append(("syslog", _send_syslog))
    problems = []
    for name, send in hooks:
        try:
            problem = send(settings, alert)
        except Exception as e:  # a hook's bug must not cost the other hooks
            problem = f"{name}: {type(e).__name__}"
        if problem:
            log.error("alert hook failed: %s", problem)
            problems.append(problem)
    return problems


def _payload(alert: Alert) -> bytes:
    return json.dumps(alert.to_json(), sort_keys=True).encode()


def _send_command(settings: AlertSettings, alert: Alert) -> str | None:
    argv = list(settings.command or ())
    name = os.path.basename(argv[0])
    j = alert.to_json()
    env = {**os.environ, "PACSVAULT_ALERT_SOURCE": alert.source,
           "PACSVAULT_ALERT_SEVERITY": alert.severity, "PACSVAULT_ALERT_SUMMARY": j["summary"],
           "PACSVAULT_ALERT_RUN_ID": "" if alert.run_id is None else str(alert.run_id)}
    try:
        # Own session, so a timeout kills what the command started too (a
        # grandchild holding the pipe open would otherwise block us).
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as e:
        return f"command {name}: cannot run: {e.strerror or type(e).__name__}"
    try:
        _, err = p.communicate(_payload(alert), timeout=settings.command_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return f"command {name}: no exit after {settings.command_timeout_s:g} s (killed)"
    if p.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return f"command {name}: exit status {p.returncode}" + (f": {tail[0][:200]}" if tail[0] else "")
    return None


def _where(url: str) -> str:
    """scheme://host[:port] — the path or query of a webhook URL may carry a token."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}" + (f":{u.port}" if u.port else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would turn the POST into a GET (or resend the body elsewhere):
    # report the 3xx instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _send_webhook(settings: AlertSettings, alert: Alert) -> str | None:
    url = settings.webhook_url or ""
    where = f"webhook {_where(url)}"
    headers = {"Content-Type": "application/json", "User-Agent": "pacsvault-alerts"}
    if settings.webhook_token_env:
        token = os.environ.get(settings.webhook_token_env)
        if not token:
            return f"{where}: {settings.webhook_token_env} is not set in the environment"
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=_payload(alert), headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=settings.webhook_timeout_s) as r:
            r.read(65536)
            status = r.status
    except urllib.error.HTTPError as e:
        return f"{where}: HTTP {e.code}"
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            return f"{where}: no answer within {settings.webhook_timeout_s:g} s"
        return f"{where}: {e.reason}"
    except (TimeoutError, socket.timeout):
        return f"{where}: no answer within {settings.webhook_timeout_s:g} s"
    except OSError as e:
        return f"{where}: {e.strerror or type(e).__name__}"
    return None if 200 <= status < 300 else f"{where}: HTTP {status}"


def syslog_line(settings: AlertSettings, alert: Alert) -> bytes:
    """An RFC 3164 line: <PRI>Mmm dd hh:mm:ss host pacsvault: message."""
    facility = logging.handlers.SysLogHandler.facility_names[settings.syslog_facility]
    pri = facility * 8 + SYSLOG_SEVERITY[alert.severity]
    now = time.localtime()  # RFC 3164 timestamps are local time
    stamp = f"{time.strftime('%b', now)} {now.tm_mday:2d} {time.strftime('%H:%M:%S', now)}"
    text = alert.line().encode("ascii", "replace")
    return f"<{pri}>{stamp} {alert.host} pacsvault: ".encode() + text[:900]


def _send_syslog(settings: AlertSettings, alert: Alert) -> str | None:
    addr = settings.syslog_address
    msg = syslog_line(settings, alert)
    try:
        if addr.startswith("/"):
            _send_unix(addr, msg)
        else:
            host, _, port = addr.rpartition(":")
            family, kind, _, _, sockaddr = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, kind) as s:
                s.sendto(msg, sockaddr)
    except OSError as e:
        return f"syslog {addr}: {e.strerror or e}"
    return None


def _send_unix(path: str, msg: bytes) -> None:
    # /dev/log is a datagram socket on most systems, a stream socket on some.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.send(msg)
    except OSError as e:
        if e.errno != errno.EPROTOTYPE:
            raise
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(msg + b"\n")
