"""Emergency access: with every admin locked out, the sealed passphrase opens a window
of at most four hours, with a mandatory reason and a critical alert (to a real webhook
receiver); everything done in it is audited as 'break-glass' for review; the seal
breaks once, a wrong passphrase or an ended window opens nothing."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest

from tests.support.daemon import PACSVAULT, run_cli
from tests.support.tiering import Install
from tests.unit.test_alerts import Receiver

PW = "Admin-Pass-9-Long"
ADMIN = {"PACSVAULT_USER": "alice", "PACSVAULT_PASSWORD": PW}


@pytest.fixture
def hook():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def inst(tmp_path, monkeypatch, hook):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "pv"
    subprocess.run([PACSVAULT, "init", str(root), "--admin", "alice"], check=True,
                   capture_output=True, env={**os.environ, "PACSVAULT_PASSWORD": PW})
    cfg = root / "pacsvault.toml"
    cfg.write_text(cfg.read_text() + f'\n[alerts]\nwebhook_url = "http://127.0.0.1:{hook.port}/h"\n')
    return Install(cfg)


def db(inst: Install, sql: str, *a) -> list:  # noqa: ANN002
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        out = c.execute(sql, a).fetchall()
        c.commit()
        return out


def test_break_glass_when_every_admin_is_locked_out(inst, hook):
    phrase = run_cli(inst.config, "emergency", "seal", env=ADMIN).stdout.strip()
    assert len(phrase) >= 40
    assert "hash" in (inst.settings.data_dir / "secrets" / "break-glass.json").read_text()
    assert phrase not in (inst.settings.data_dir / "secrets" / "break-glass.json").read_text()
    db(inst, "update users set locked_until = '2999-01-01 00:00:00.000000'")  # all locked out
    assert run_cli(inst.config, "peer", "add", "RESCUE", "10.0.0.9", env=ADMIN,
                   check=False).returncode != 0
    em = {"PACSVAULT_EMERGENCY": phrase}
    # Before the seal is broken the passphrase alone acts for nobody.
    assert run_cli(inst.config, "peer", "add", "RESCUE", "10.0.0.9", env=em,
                   check=False).returncode == 13
    # A reason is mandatory, and the window is bounded.
    for args in (["--reason", "x"], ["--reason", "admins locked out", "--minutes", "600"]):
        p = run_cli(inst.config, "emergency", "open", *args, env=em, check=False)
        assert p.returncode == 13, p.stderr
    wrong = run_cli(inst.config, "emergency", "open", "--reason", "admins locked out",
                    env={"PACSVAULT_EMERGENCY": phrase[:-1] + "x"}, check=False)
    assert wrong.returncode == 13 and "does not match" in wrong.stderr
    opened = json.loads(run_cli(inst.config, "emergency", "open", "--reason",
                                "all admins locked out during night shift", "--minutes", "30",
                                "--json", env=em).stdout)
    assert opened["actor"] == "break-glass" and not opened["alert_problems"]
    [alert] = [json.loads(b) for _, _, b in hook.got]
    assert alert["severity"] == "critical" and "EMERGENCY ACCESS" in alert["summary"]
    # In the window: admin rights, every action under the break-glass name.
    run_cli(inst.config, "peer", "add", "RESCUE", "10.0.0.9", env=em)
    run_cli(inst.config, "user", "enable", "alice", env=em)       # the lockout lifted
    run_cli(inst.config, "peer", "list", env=ADMIN)                # alice is back
    rows = json.loads(run_cli(inst.config, "audit", "--user", "break-glass", "--json",
                              env=em).stdout)["records"]
    actions = [(r["action"], r["outcome"]) for r in rows]
    assert ("login", "success") in actions and ("peer-change", "success") in actions
    assert ("user-change", "success") in actions
    assert ("login-failed", "failure") in actions          # the wrong passphrase, recorded
    login = next(r for r in rows if r["action"] == "login")
    assert login["detail"]["reason"] == "all admins locked out during night shift"
    st = json.loads(run_cli(inst.config, "emergency", "status", "--json", env=em).stdout)
    assert st["state"] == "open" and "hash" not in st
    # Closed: the passphrase opens nothing any more, and the seal cannot be reused.
    run_cli(inst.config, "emergency", "close", env=em)
    assert run_cli(inst.config, "peer", "add", "OTHER", "10.0.0.8", env=em,
                   check=False).returncode == 13
    again = run_cli(inst.config, "emergency", "open", "--reason", "once more, please",
                    env=em, check=False)
    assert again.returncode == 13 and "already broken" in again.stderr
