"""Operator accounts: init --admin, PACSVAULT_USER/PASSWORD, user add with
PACSVAULT_NEW_PASSWORD, the password policy, forced change, lockout, roles, sessions."""
from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest

from tests.support.daemon import PACSVAULT, run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install

ADMIN_PW = "Correct-Horse-7-Battery"
BOB_PW = "Blue-Whale-42-Ocean"


def env(user: str | None = None, pw: str | None = None, new: str | None = None, **more) -> dict:
    e = {}
    if user:
        e["PACSVAULT_USER"] = user
    if pw is not None:
        e["PACSVAULT_PASSWORD"] = pw
    if new is not None:
        e["PACSVAULT_NEW_PASSWORD"] = new
    return {**e, **more}


@pytest.fixture
def inst(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))          # sessions live in $HOME
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    root = tmp_path / "pv"
    p = subprocess.run([PACSVAULT, "init", str(root), "--admin", "alice"], capture_output=True,
                       text=True, env={**__import__("os").environ, "PACSVAULT_PASSWORD": ADMIN_PW})
    assert p.returncode == 0, p.stderr
    assert ADMIN_PW not in p.stdout + p.stderr
    i = Install(root / "pacsvault.toml")
    i.ingest(make_ct_series(tmp_path / "ct", 2, size=4000))
    return i


def cli(inst: Install, *args: str, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    return run_cli(inst.config, *args, env=env(**kw) if kw else None, check=False)


def test_an_install_with_accounts_needs_credentials(inst):
    p = cli(inst, "status")
    assert p.returncode == 13 and "PACSVAULT_USER" in p.stderr
    assert cli(inst, "status", user="alice", pw=ADMIN_PW).returncode == 0
    p = cli(inst, "status", user="alice", pw="wrong-Password-1")
    assert p.returncode == 13 and "wrong password" in p.stderr and "wrong-Password-1" not in p.stderr
    p = cli(inst, "status", user="mallory", pw=ADMIN_PW)
    assert p.returncode == 13 and "unknown user or wrong password" in p.stderr
    # init without --admin on another install: no accounts, nothing asked.
    assert run_cli(Install.create(inst.config.parent.parent / "open").config, "status").returncode == 0


def test_weak_passwords_are_refused_with_the_reason(inst):
    admin = dict(user="alice", pw=ADMIN_PW)
    for pw, why in (("Sh0rt!", "shorter than 12"), ("alllowercaseletters", "character classes"),
                    ("Password123", "commonly used"), ("bob-Is-Great-99", "contains the user name")):
        p = cli(inst, "user", "add", "bob", "--role", "viewer", new=pw, **admin)
        assert p.returncode == 13 and why in p.stderr, (pw, p.stderr)
        assert pw not in p.stderr
    p = cli(inst, "user", "add", "bob", "--role", "viewer", **admin)
    assert p.returncode == 13 and "PACSVAULT_NEW_PASSWORD" in p.stderr      # not on a terminal


def test_first_log_in_forces_a_change_then_roles_apply(inst, tmp_path):
    admin = dict(user="alice", pw=ADMIN_PW)
    assert cli(inst, "user", "add", "bob", "--role", "viewer", new=BOB_PW, **admin).returncode == 0
    p = cli(inst, "status", user="bob", pw=BOB_PW)
    assert p.returncode == 13 and "must be changed" in p.stderr
    assert cli(inst, "user", "passwd", user="bob", pw=BOB_PW, new=BOB_PW).returncode == 13  # reuse
    new = "Green-Forest-8-River"
    assert cli(inst, "user", "passwd", user="bob", pw=BOB_PW, new=new).returncode == 0
    assert cli(inst, "status", user="bob", pw=new).returncode == 0
    # A viewer cannot restore, scrub or manage users; an operator can scrub but not restore.
    p = cli(inst, "restore", "--patient", "TEST-0001", "--to", str(tmp_path / "o"), user="bob", pw=new)
    assert p.returncode == 13 and "may not run restore" in p.stderr
    assert not (tmp_path / "o").exists()
    assert cli(inst, "scrub", "--all", user="bob", pw=new).returncode == 13
    assert cli(inst, "user", "add", "eve", "--role", "admin", new=new + "x", user="bob",
               pw=new).returncode == 13
    assert cli(inst, "user", "role", "bob", "operator", **admin).returncode == 0
    assert cli(inst, "scrub", "--all", user="bob", pw=new).returncode == 0
    assert cli(inst, "restore", "--patient", "TEST-0001", "--to", str(tmp_path / "o"),
               user="bob", pw=new).returncode == 13
    # An admin reset must be changed again at the next log-in.
    assert cli(inst, "user", "passwd", "bob", new="Grey-Mountain-3-Lake", **admin).returncode == 0
    p = cli(inst, "status", user="bob", pw="Grey-Mountain-3-Lake")
    assert p.returncode == 13 and "set by an administrator" in p.stderr
    listed = json.loads(cli(inst, "user", "list", "--json", **admin).stdout)["users"]
    assert [(u["name"], u["role"], u["must_change"]) for u in listed] == [
        ("alice", "admin", False), ("bob", "operator", True)]
    assert "password_hash" not in json.dumps(listed)


def test_lockout_after_failures_with_back_off(inst):
    admin = dict(user="alice", pw=ADMIN_PW)
    assert cli(inst, "user", "add", "carol", "--role", "auditor", new=BOB_PW, **admin).returncode == 0
    for _ in range(5):
        assert cli(inst, "status", user="carol", pw="Not-Her-Pass-1").returncode == 13
    p = cli(inst, "status", user="carol", pw=BOB_PW)                  # right, but locked now
    assert p.returncode == 13 and "locked" in p.stderr
    db = inst.settings.catalog.url.split("///", 1)[1]
    with sqlite3.connect(db) as c:
        (failed, until), = c.execute("select failed_logins, locked_until from users "
                                     "where name = 'carol'").fetchall()
    assert failed == 5 and until
    assert cli(inst, "user", "enable", "carol", **admin).returncode == 0   # an admin unlocks
    p = cli(inst, "status", user="carol", pw=BOB_PW)
    assert p.returncode == 13 and "must be changed" in p.stderr          # still a first log-in
    assert cli(inst, "user", "disable", "carol", **admin).returncode == 0
    assert "disabled" in cli(inst, "status", user="carol", pw=BOB_PW).stderr
    assert cli(inst, "user", "disable", "alice", **admin).returncode == 13   # not oneself


def test_an_expired_password_must_be_changed(inst):
    db = inst.settings.catalog.url.split("///", 1)[1]
    with sqlite3.connect(db) as c:
        c.execute("update users set password_set_at = '2020-01-01 00:00:00.000000' "
                  "where name = 'alice'")
    p = cli(inst, "status", user="alice", pw=ADMIN_PW)
    assert p.returncode == 13 and "expired" in p.stderr
    assert cli(inst, "user", "passwd", user="alice", pw=ADMIN_PW,
               new="Brand-New-Secret-77").returncode == 0
    assert cli(inst, "status", user="alice", pw="Brand-New-Secret-77").returncode == 0


def test_a_person_logs_in_once_for_a_session(inst, tmp_path):
    p = cli(inst, "login", user="alice", pw=ADMIN_PW)
    assert p.returncode == 0 and "logged in as alice" in p.stdout
    assert run_cli(inst.config, "status", check=False).returncode == 0      # no env credentials
    session = list((tmp_path / "home" / ".config" / "pacsvault").glob("session-*"))
    assert len(session) == 1 and oct(session[0].stat().st_mode)[-3:] == "600"
    db = inst.settings.catalog.url.split("///", 1)[1]
    token = session[0].read_text().split()[1]
    with sqlite3.connect(db) as c:
        stored = [r[0] for r in c.execute("select token_sha256 from sessions")]
    assert token not in stored and len(stored) == 1                     # only its hash is kept
    assert run_cli(inst.config, "logout", check=False).returncode == 0
    assert run_cli(inst.config, "status", check=False).returncode == 13


def test_the_http_endpoint_asks_for_an_account_allowed_to_read(inst):
    import base64
    import urllib.error
    import urllib.request

    from tests.support.daemon import Daemon, free_port

    d = Daemon(inst.config, free_port(), free_port(), workers=1).start()
    try:
        url = f"http://127.0.0.1:{d.http_port}"
        assert urllib.request.urlopen(url + "/healthz", timeout=10).read() == b"ok\n"
        for path in ("/status", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path, timeout=10)
            assert e.value.code == 401 and "Basic" in e.value.headers["WWW-Authenticate"]

        def get(path: str, user: str, pw: str) -> int:
            req = urllib.request.Request(url + path, headers={"Authorization": "Basic " + base64
                                         .b64encode(f"{user}:{pw}".encode()).decode()})
            try:
                return urllib.request.urlopen(req, timeout=10).status
            except urllib.error.HTTPError as err:
                return err.code
        assert get("/status", "alice", ADMIN_PW) == 200
        assert get("/metrics", "alice", ADMIN_PW) == 200
        assert get("/status", "alice", "wrong") == 401
    finally:
        assert d.stop() == 0
