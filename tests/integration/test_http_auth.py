"""HTTP /status and /metrics with operator accounts: accounts made on a running daemon
take effect at once; wrong passwords are throttled per source (429 + Retry-After) and
never lock the account; a refused log-in reads the same for known and unknown users."""
from __future__ import annotations

import base64
import os
import statistics
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from archive import auth
from tests.support.daemon import PACSVAULT, Daemon, free_port, run_cli
from tests.support.tiering import Install

PW = "Correct-Horse-7-Battery"


def get(url: str, user: str | None = None, pw: str | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:   # header names are case-insensitive
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def make_admin(root) -> None:  # noqa: ANN001
    p = subprocess.run([PACSVAULT, "init", str(root), "--admin", "alice"], capture_output=True,
                       text=True, env={**os.environ, "PACSVAULT_PASSWORD": PW})
    assert p.returncode == 0, p.stderr


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("PACSVAULT_USER", raising=False)
    monkeypatch.delenv("PACSVAULT_PASSWORD", raising=False)


def test_the_first_account_closes_status_and_metrics_on_a_running_daemon(tmp_path, home):
    inst = Install.create(tmp_path / "pv")
    d = Daemon(inst.config, free_port(), free_port(), workers=1).start()
    try:
        url = f"http://127.0.0.1:{d.http_port}"
        assert get(url + "/status")[0] == 200 and get(url + "/metrics")[0] == 200
        make_admin(inst.config.parent)                     # init --admin on this instance
        made = time.monotonic()
        codes = None
        while time.monotonic() - made < 2:
            codes = (get(url + "/status")[0], get(url + "/metrics")[0])
            if codes == (401, 401):
                break
            time.sleep(0.05)
        assert codes == (401, 401), codes
        assert time.monotonic() - made < 2
        assert get(url + "/status", "alice", PW)[0] == 200
        assert get(url + "/healthz")[0] == 200             # the liveness probe stays open
    finally:
        assert d.stop() == 0


@pytest.fixture
def inst(tmp_path, home):
    root = tmp_path / "pv"
    make_admin(root)
    return Install(root / "pacsvault.toml")


def test_wrong_passwords_on_metrics_are_throttled_and_never_lock_the_admin_out(inst):
    d = Daemon(inst.config, free_port(), free_port(), workers=1).start()
    try:
        url = f"http://127.0.0.1:{d.http_port}/metrics"
        replies = [get(url, "alice", f"Guess-{n}-Wrong!") for n in range(25)]
        codes = [c for c, _, _ in replies]
        assert codes[0] == 401 and set(codes) == {401, 429}, codes
        first = codes.index(429)
        assert codes[first:] == [429] * (25 - first)        # throttled from there on
        retry = int(replies[first][1]["retry-after"])
        assert 1 <= retry <= 3600
        # The source is throttled whatever it sends, the right password included ...
        assert get(url, "alice", PW)[0] == 429
        # ... but the account is not locked: the CLI works with the right password.
        p = run_cli(inst.config, "status", env={"PACSVAULT_USER": "alice",
                                               "PACSVAULT_PASSWORD": PW}, check=False)
        assert p.returncode == 0, p.stderr
        time.sleep(retry + 0.2)
        assert get(url, "alice", PW)[0] == 200               # the back-off ends
    finally:
        assert d.stop() == 0


def test_a_refused_log_in_reads_the_same_for_known_and_unknown_users(inst):
    def status(user: str, pw: str) -> subprocess.CompletedProcess:
        return run_cli(inst.config, "status", env={"PACSVAULT_USER": user,
                                                  "PACSVAULT_PASSWORD": pw}, check=False)
    known, unknown = status("alice", "Not-Her-Pass-1"), status("mallory", "Not-Her-Pass-1")
    assert (known.returncode, known.stderr) == (unknown.returncode, unknown.stderr)
    for _ in range(5):
        status("alice", "Not-Her-Pass-1")                  # alice is locked now
    locked, unknown = status("alice", "Not-Her-Pass-1"), status("mallory", "Not-Her-Pass-1")
    right_but_locked = status("alice", PW)
    assert locked.returncode == unknown.returncode == right_but_locked.returncode == 13
    assert locked.stderr == unknown.stderr == right_but_locked.stderr
    assert "alice" not in locked.stderr and "mallory" not in unknown.stderr

    # The same time too: a locked account's reply costs a password check, as an unknown one.
    settings = inst.settings
    catalog = inst.catalog()
    try:
        def took(name: str) -> float:
            t = time.perf_counter()
            with pytest.raises(auth.AuthError):
                auth.check_password(catalog, name, "Not-Her-Pass-1", settings.accounts,
                                    source="test")
            return time.perf_counter() - t
        locked_s = statistics.median(took("alice") for _ in range(5))
        unknown_s = statistics.median(took("mallory") for _ in range(5))
    finally:
        catalog.close()
    assert 0.5 < locked_s / unknown_s < 2, (locked_s, unknown_s)

    # Over HTTP: the same status, headers and body for both.
    d = Daemon(inst.config, free_port(), free_port(), workers=1).start()
    try:
        url = f"http://127.0.0.1:{d.http_port}/status"
        a, b = get(url, "alice", "Not-Her-Pass-1"), get(url, "mallory", "Not-Her-Pass-1")
        strip = lambda h: {k: v for k, v in h.items() if k != "Date"}  # noqa: E731
        assert (a[0], strip(a[1]), a[2]) == (b[0], strip(b[1]), b[2]) and a[0] == 401
    finally:
        assert d.stop() == 0
