"""Alert hooks against real peers on loopback: an HTTP server, a UDP and a unix
syslog receiver, real commands. Nothing about the transport is mocked."""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from archive.alerts import Alert, scrub_alert, send_alert
from archive.config import load_settings
from archive.config.schema import AlertSettings
from archive.errors import ConfigError

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def an_alert(**kw) -> Alert:
    base = dict(source="scrub", severity="critical", run_id=12,
                summary=f"scrub of site-a: 2 damaged (instance {UID})",
                counts={"damaged": 2, "repaired": 0, "unrecoverable": 2},
                details="see `pacsvault scrub --json`")
    return Alert(**{**base, **kw})


class Receiver:
    """A webhook receiver: records each request and answers with ``status``;
    while ``hold`` is clear it does not answer at all (a hung peer)."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.got = status, []
        self.hold = threading.Event()
        self.hold.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((self.path, dict(self.headers), body))
                outer.hold.wait(10)
                self.send_response(outer.status)
                if 300 <= outer.status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- webhook -------------------------------------------------------------------------

def test_webhook_posts_the_json_with_the_token_from_the_environment(receiver, monkeypatch):
    monkeypatch.setenv("PV_TEST_WEBHOOK_TOKEN", "tok-123")
    s = AlertSettings(webhook_url=f"http://127.0.0.1:{receiver.port}/hook?key=q-secret",
                      webhook_token_env="PV_TEST_WEBHOOK_TOKEN")
    assert send_alert(s, an_alert()) == []
    [(path, headers, body)] = receiver.got
    assert path == "/hook?key=q-secret"
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer tok-123"
    j = json.loads(body)
    assert set(j) == {"source", "severity", "summary", "counts", "run_id", "details", "host",
                      "time"}
    assert j["source"] == "scrub" and j["severity"] == "critical" and j["run_id"] == 12
    assert j["counts"] == {"damaged": 2, "repaired": 0, "unrecoverable": 2}
    assert j["time"].endswith("+00:00") and j["host"]
    assert UID not in body.decode() and "<uid>" in j["summary"]   # masked, second fence


def test_webhook_non_2xx_is_a_problem_and_the_url_secret_is_not_logged(caplog, monkeypatch):
    monkeypatch.setenv("PV_TEST_WEBHOOK_TOKEN", "tok-123")
    for status in (500, 404, 302):
        r = Receiver(status)
        try:
            s = AlertSettings(webhook_url=f"http://127.0.0.1:{r.port}/hook?key=q-secret",
                              webhook_token_env="PV_TEST_WEBHOOK_TOKEN")
            problems = send_alert(s, an_alert())
        finally:
            r.close()
        assert problems == [f"webhook http://127.0.0.1:{r.port}: HTTP {status}"]
        assert len(r.got) == 1                    # a redirect is reported, not followed
    assert "q-secret" not in caplog.text and "tok-123" not in caplog.text
    assert "HTTP 500" in caplog.text


def test_webhook_unreachable_port_is_a_problem():
    port = closed_port()
    [problem] = send_alert(AlertSettings(webhook_url=f"http://127.0.0.1:{port}/x"), an_alert())
    assert problem.startswith(f"webhook http://127.0.0.1:{port}:") and "refused" in problem


def test_webhook_that_never_answers_times_out(receiver):
    receiver.hold.clear()
    s = AlertSettings(webhook_url=f"http://127.0.0.1:{receiver.port}/x", webhook_timeout_s=0.5)
    t0 = time.monotonic()
    [problem] = send_alert(s, an_alert())
    assert time.monotonic() - t0 < 3
    assert problem == f"webhook http://127.0.0.1:{receiver.port}: no answer within 0.5 s"


def test_webhook_token_variable_unset_is_a_problem_and_nothing_is_sent(receiver):
    s = AlertSettings(webhook_url=f"http://127.0.0.1:{receiver.port}/x",
                      webhook_token_env="PV_TEST_UNSET_TOKEN")
    [problem] = send_alert(s, an_alert())
    assert "PV_TEST_UNSET_TOKEN is not set" in problem and receiver.got == []


# -- syslog --------------------------------------------------------------------------

def test_syslog_udp_gets_one_rfc3164_line_without_uids():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        s = AlertSettings(syslog=True, syslog_address=f"127.0.0.1:{rx.getsockname()[1]}",
                          syslog_facility="local3")
        assert send_alert(s, an_alert()) == []
        line = rx.recv(4096).decode()
    assert line.startswith(f"<{19 * 8 + 2}>")              # local3, critical
    head, _, msg = line.partition(" pacsvault: ")
    assert len(head.split()) == 4                         # <PRI>Mmm dd hh:mm:ss host
    assert msg.startswith("[critical] scrub run 12: ") and "damaged=2" in msg
    assert UID not in line and "\n" not in line


def test_syslog_unix_socket_and_a_missing_socket(tmp_path):
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(path))
        rx.settimeout(5)
        s = AlertSettings(syslog=True, syslog_address=str(path))
        assert send_alert(s, an_alert(severity="warning")) == []
        assert rx.recv(4096).decode().startswith(f"<{3 * 8 + 4}>")   # daemon, warning
    [problem] = send_alert(AlertSettings(syslog=True, syslog_address=str(tmp_path / "nope")),
                           an_alert())
    assert problem.startswith(f"syslog {tmp_path / 'nope'}: ")


# -- command -------------------------------------------------------------------------

RECORD = ("import json, os, sys\n"
          "d = {'stdin': json.load(sys.stdin), 'env': {k: v for k, v in os.environ.items()"
          " if k.startswith('PACSVAULT_ALERT_')}}\n"
          "open(sys.argv[1], 'w').write(json.dumps(d))\n")


def test_command_gets_the_json_on_stdin_and_the_variables(tmp_path):
    out = tmp_path / "got.json"
    s = AlertSettings(command=(sys.executable, "-c", RECORD, str(out)))
    assert send_alert(s, an_alert()) == []
    got = json.loads(out.read_text())
    assert got["stdin"]["counts"]["unrecoverable"] == 2 and got["stdin"]["run_id"] == 12
    assert got["env"]["PACSVAULT_ALERT_SOURCE"] == "scrub"
    assert got["env"]["PACSVAULT_ALERT_SEVERITY"] == "critical"
    assert got["env"]["PACSVAULT_ALERT_SUMMARY"].startswith("scrub of site-a")
    assert UID not in out.read_text()


def test_failing_missing_and_hanging_commands_are_problems(tmp_path):
    fail = AlertSettings(command=(sys.executable, "-c",
                                  "import sys; sys.stderr.write('pager down\\n'); sys.exit(3)"))
    assert send_alert(fail, an_alert()) == [
        f"command {Path(sys.executable).name}: exit status 3: pager down"]
    [problem] = send_alert(AlertSettings(command=(str(tmp_path / "no-such-pager"),)), an_alert())
    assert problem.startswith("command no-such-pager: cannot run")
    # The grandchild holds the pipe open: the whole process group must be killed.
    hang = AlertSettings(command=("/bin/sh", "-c", "sleep 30 & sleep 30"), command_timeout_s=0.5)
    t0 = time.monotonic()
    assert send_alert(hang, an_alert()) == ["command sh: no exit after 0.5 s (killed)"]
    assert time.monotonic() - t0 < 5


# -- all hooks, severity, no hooks ---------------------------------------------------

def test_one_failing_hook_does_not_stop_the_others(tmp_path, receiver):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        s = AlertSettings(command=(sys.executable, "-c", "raise SystemExit(1)"),
                          webhook_url=f"http://127.0.0.1:{receiver.port}/x",
                          syslog=True, syslog_address=f"127.0.0.1:{rx.getsockname()[1]}")
        problems = send_alert(s, an_alert())
        assert b"pacsvault: " in rx.recv(4096)
    assert len(problems) == 1 and problems[0].startswith("command ")
    assert len(receiver.got) == 1


def test_min_severity_critical_keeps_warnings_in_the_log(receiver, caplog):
    s = AlertSettings(webhook_url=f"http://127.0.0.1:{receiver.port}/x", min_severity="critical")
    assert send_alert(s, an_alert(severity="warning")) == []
    assert receiver.got == [] and "ALERT [warning] scrub run 12" in caplog.text
    assert send_alert(s, an_alert()) == [] and len(receiver.got) == 1


def test_no_hooks_by_default_the_alert_goes_to_the_log(caplog, tmp_path):
    assert AlertSettings() == load_settings_text("", tmp_path).alerts
    assert send_alert(AlertSettings(), an_alert()) == []
    assert "ALERT [critical] scrub run 12" in caplog.text and UID not in caplog.text


def test_scrub_alert_severity_and_counts():
    base = {"run_id": 7, "sites": ["site-a", "site-b"], "ok": False, "objects": 10,
            "bytes": 1000, "damaged": 1, "repaired": 1, "unrecoverable": 0, "orphans": 0,
            "skipped_sites": {}, "findings": [{"sop_uid": UID, "study_uid": UID}]}
    assert scrub_alert({**base, "ok": True}) is None
    a = scrub_alert(base)
    assert a.severity == "warning" and a.run_id == 7 and a.source == "scrub"
    assert a.counts == {"damaged": 1, "repaired": 1, "unrecoverable": 0, "orphans": 0,
                        "objects": 10, "bytes": 1000, "skipped_sites": 0}
    assert UID not in json.dumps(a.to_json()) and "run 7" in a.details
    assert scrub_alert({**base, "unrecoverable": 1}).severity == "critical"
    down = scrub_alert({**base, "damaged": 0, "repaired": 0, "skipped_sites": {"site-b": "down"}})
    assert down.severity == "critical" and down.counts["skipped_sites"] == 1
    assert "site-b" in down.summary


# -- config --------------------------------------------------------------------------

def load_settings_text(text: str, tmp: Path):
    p = tmp / "pacsvault.toml"
    p.write_text(text)
    return load_settings(p)


@pytest.mark.parametrize("text,expect", [
    ('command = "/usr/bin/pager --now"', "alerts.command: Value error, must be a non-empty list"),
    ("command = []", "alerts.command: Value error, must be a non-empty list"),
    ('command = ["pager", 3]', "alerts.command"),
    ('webhook_url = "ftp://example.org/x"', "alerts.webhook_url: Value error, must be an http"),
    ('webhook_url = "https://u:pw@example.org/x"', "credentials in the URL are refused"),
    ('webhook_url = "https://example.org/x"\nwebhook_token = "abc-literal-token"',
     "webhook_token: secrets never go in the config file"),
    ('webhook_url = "https://example.org/x"\nwebhook_token_env = "abc-literal-token"',
     "alerts.webhook_token_env: Value error, must be the NAME of an environment variable"),
    ('webhook_token_env = "PV_TOKEN"', "webhook_token_env is set but webhook_url is not"),
    ('syslog_address = "loghost"', "alerts.syslog_address"),
    ('syslog_address = "loghost:99999"', "alerts.syslog_address"),
    ('syslog_address = "::1:514"', "IPv6 address needs brackets"),
    ('syslog_facility = "local9"', "alerts.syslog_facility"),
    ('min_severity = "info"', "alerts.min_severity"),
    ("webhook = true", "alerts.webhook"),
])
def test_bad_alert_config_is_a_clear_error(tmp_path, text, expect):
    with pytest.raises(ConfigError) as e:
        load_settings_text(f"[alerts]\n{text}\n", tmp_path)
    assert expect in str(e.value)
    assert "abc-literal-token" not in str(e.value)          # the secret is not echoed


def test_good_alert_config_loads(tmp_path):
    s = load_settings_text('[alerts]\nmin_severity = "critical"\n'
                           'command = ["/usr/local/bin/page-oncall", "--team", "pacs"]\n'
                           'webhook_url = "https://hooks.example.org/pacs"\n'
                           'webhook_token_env = "PACSVAULT_WEBHOOK_TOKEN"\n'
                           'syslog = true\nsyslog_address = "[::1]:514"\n'
                           'syslog_facility = "local0"\n', tmp_path).alerts
    assert s.command == ("/usr/local/bin/page-oncall", "--team", "pacs") and s.syslog
