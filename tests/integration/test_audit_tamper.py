"""The audit chain is keyed: a record's link is an HMAC under the install's audit key
(<data_dir>/secrets/audit.key, outside the catalog), so someone who can write the
catalog but not that key cannot rewrite a record and re-chain the ones after it with
the public formula. `audit --verify` finds it without any checkpoint or anchor, the
scheduled verify job alerts, a missing key fails verification, and records an older
version wrote under the unkeyed formula still verify after an upgrade."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from archive.audit import chain_hash
from tests.support.daemon import PACSVAULT, run_cli
from tests.support.tiering import Install

PW = "Correct-Horse-7-Battery"
ADMIN = {"PACSVAULT_USER": "alice", "PACSVAULT_PASSWORD": PW}
COLUMNS = "id, at, actor, action, outcome, source, patient_id, study_uid, detail"


def cli(inst: Install, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(inst.config, *args, env=ADMIN, check=check)


def db(inst: Install, sql: str, *a) -> list:  # noqa: ANN002
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        out = c.execute(sql, a).fetchall()
        c.commit()
        return out


def rechain_publicly(inst: Install, start: int) -> None:
    """What an attacker with write access to the catalog does after editing a record:
    recompute every link from ``start`` on with the published SHA-256 formula."""
    rows = db(inst, f"select {COLUMNS} from audit_log where id >= ? order by id", start)
    prev = db(inst, "select prev_hash from audit_log where id = ?", start)[0][0]
    for r in rows:
        h = chain_hash(r[0], datetime.fromisoformat(r[1]), *r[2:], prev)
        db(inst, "update audit_log set prev_hash = ?, hash = ? where id = ?", prev, h, r[0])
        prev = h
    db(inst, "update audit_head set last_hash = ?", prev)


def verify(inst: Install) -> tuple[int, dict, str]:
    p = cli(inst, "audit", "--verify", "--json", check=False)
    assert p.stdout.strip(), p.stderr
    return p.returncode, json.loads(p.stdout), p.stderr


@pytest.fixture
def inst(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "pv"
    subprocess.run([PACSVAULT, "init", str(root), "--admin", "alice"], check=True,
                   capture_output=True, env={**os.environ, "PACSVAULT_PASSWORD": PW})
    i = Install(root / "pacsvault.toml")
    for n in range(5):
        cli(i, "peer", "add", f"PEER{n}", f"10.0.0.{n + 1}")
    return i


def test_a_record_rewritten_and_rechained_with_the_public_formula_is_found(inst):
    rc, ok, _ = verify(inst)
    assert rc == 0 and ok["ok"] and ok["records"] >= 6 and ok["checkpoints"] == 0
    db(inst, "update audit_log set detail = '{\"added\":\"MALLORY\"}' where id = 3")
    rechain_publicly(inst, 3)
    rc, r, _ = verify(inst)
    assert rc == 1 and not r["ok"]
    assert r["first_bad"]["position"] == 3 and "audit key" in r["first_bad"]["why"]
    p = cli(inst, "audit", "--verify", check=False)
    assert p.returncode == 1 and "record 3" in p.stderr


def test_verify_fails_and_says_so_when_the_key_is_missing(inst):
    key = inst.settings.data_dir / "secrets" / "audit.key"
    assert key.exists()
    key.rename(key.with_name("audit.key.away"))
    rc, r, _ = verify(inst)
    assert rc == 1 and not r["ok"] and "missing" in r["first_bad"]["why"]
    assert str(key) in r["first_bad"]["why"]
    assert not key.exists()                   # not silently replaced by a new key
    p = cli(inst, "audit", "--verify", check=False)
    assert p.returncode == 1 and "audit key" in p.stderr
    key.with_name("audit.key.away").rename(key)
    assert verify(inst)[0] == 0               # the records written meanwhile were refused


def test_records_of_an_older_version_still_verify_and_are_protected_after_the_upgrade(inst):
    # An install an older version wrote: every link the public SHA-256 formula, no mark.
    secrets = inst.settings.data_dir / "secrets"
    (secrets / "audit.chain").unlink()
    rechain_publicly(inst, 1)
    old = db(inst, "select max(id) from audit_log")[0][0]
    rc, r, _ = verify(inst)
    assert rc == 0 and r["ok"] and r["keyed_from"] is None

    cli(inst, "peer", "add", "NEWPEER", "10.0.1.1")          # the upgraded version writes
    rc, r, _ = verify(inst)
    assert rc == 0 and r["ok"] and r["keyed_from"] == old + 1
    assert (secrets / "audit.chain").read_text().split() == ["keyed-from", str(old + 1)]

    # Rewriting an old record means re-chaining the keyed ones after it: found there.
    db(inst, "update audit_log set actor = 'mallory' where id = 2")
    rechain_publicly(inst, 2)
    rc, r, _ = verify(inst)
    assert rc == 1 and r["first_bad"]["position"] == old + 1


HOOK = """import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(json.load(sys.stdin)) + "\\n")
"""


def test_the_scheduled_verify_job_alerts_on_a_rewrite_and_on_a_missing_key(tmp_path):
    from archive import jobs
    from archive.app.scheduled import configured_jobs, run_audit_verify_job

    hook, got = tmp_path / "hook.py", tmp_path / "alerts.jsonl"
    hook.write_text(HOOK)
    inst = Install.create(tmp_path / "pv", toml_extra=(
        "[alerts]\n" f"command = {json.dumps([sys.executable, str(hook), str(got)])}\n"))
    assert "audit-verify" in [name for name, _, _ in configured_jobs(inst.settings)]
    for n in range(4):
        run_cli(inst.config, "peer", "add", f"PEER{n}", f"10.0.0.{n + 1}")
    settings = inst.settings
    assert run_audit_verify_job(settings, threading.Event())["ok"]
    assert not got.exists()                                 # an intact trail alerts nobody

    db(inst, "update audit_log set source = 'elsewhere' where id = 2")
    rechain_publicly(inst, 2)
    assert not run_audit_verify_job(settings, threading.Event())["ok"]
    [alert] = [json.loads(x) for x in got.read_text().splitlines()]
    assert (alert["source"], alert["severity"]) == ("audit", "critical")
    assert alert["counts"]["position"] == 2 and "record 2" in alert["summary"]
    catalog = inst.catalog()
    try:
        runs = jobs.history(catalog, "audit-verify")
    finally:
        catalog.close()
    assert [r["outcome"] for r in runs] == ["findings", "ok"]

    Path(settings.data_dir / "secrets" / "audit.key").unlink()
    assert not run_audit_verify_job(settings, threading.Event())["ok"]
    alerts = [json.loads(x) for x in got.read_text().splitlines()]
    assert len(alerts) == 2 and "key" in alerts[-1]["summary"]
