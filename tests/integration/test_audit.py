"""The audit trail: every event that touches patient data or the system's protection is
recorded with actor, patient/study, action, outcome, time and source; editing, deleting
or reordering any stored record is found by `audit --verify`, with its position."""
from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest

from tests.integration.test_dr import configure
from tests.support.daemon import PACSVAULT, run_cli, storescu
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install

PW = "Correct-Horse-7-Battery"
ADMIN = {"PACSVAULT_USER": "alice", "PACSVAULT_PASSWORD": PW}


def cli(inst: Install, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(inst.config, *args, env=ADMIN, check=check)


def audit_rows(inst: Install, *args: str) -> list[dict]:
    return json.loads(cli(inst, "audit", *args, "--json").stdout)["records"]


def db(inst: Install, sql: str, *a) -> list:  # noqa: ANN002
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        out = c.execute(sql, a).fetchall()
        c.commit()
        return out


@pytest.fixture
def inst(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "pv"
    subprocess.run([PACSVAULT, "init", str(root), "--admin", "alice"], check=True,
                   capture_output=True, env={**__import__("os").environ, "PACSVAULT_PASSWORD": PW})
    i = Install(root / "pacsvault.toml")
    i.made = make_ct_series(tmp_path / "ct", 4, size=6000)
    i.ingest(i.made)
    i.study = i.made[0].study_uid
    return i


def test_each_event_is_recorded_with_who_what_when_where(inst, tmp_path):
    key = tmp_path / "k.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(key)).stdout.strip())
    cli(inst, "peer", "add", "MODALITY1", "10.0.0.7")
    cli(inst, "migrate", "--study", inst.study)
    cli(inst, "recall", inst.study)
    f = sorted((inst.settings.sites[0].path / "objects").rglob("*.dcm"))[0]
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    assert cli(inst, "scrub", "--all", check=False).returncode == 1
    cli(inst, "dr", "write")
    cli(inst, "dr", "custody", "PV000001", "--to", "in-transit", "--location", "van 3",
        "--by", "J. Smith")
    cli(inst, "restore", "--study", inst.study, "--to", str(tmp_path / "out"))
    cli(inst, "drill", "--tier", "dr", "--sample", "1", "--identity", str(key))
    cli(inst, "dr", "verify", "PV000001", "--identity", str(key))
    run_cli(inst.config, "status", env={"PACSVAULT_USER": "alice", "PACSVAULT_PASSWORD": "nope-Nope-1"},
            check=False)
    inst.config.write_text(inst.config.read_text() + "\n# an operator's edit\n")
    cli(inst, "status")

    rows = audit_rows(inst, "--since", "2000-01-01")
    actions = {r["action"] for r in rows}
    assert {"user-change", "peer-change", "migration", "recall", "scrub-finding",
            "dr-volume-written", "dr-volume-moved", "restore", "drill", "retrieve", "key-use",
            "login-failed", "config-change"} <= actions
    for r in rows:
        assert r["actor"] and r["at"] and r["source"] and r["outcome"] in ("success", "failure")
    about = audit_rows(inst, "--study", inst.study)
    assert {"migration", "recall", "scrub-finding", "restore", "retrieve"} <= {r["action"] for r in about}
    assert all(r["patient_id"] == "TEST-0001" and r["actor"] == "alice" for r in about)
    assert {r["action"] for r in audit_rows(inst, "--patient", "TEST-0001")} >= {"restore"}
    failed = [r for r in rows if r["action"] == "login-failed"]
    assert failed and failed[-1]["outcome"] == "failure" and "nope" not in json.dumps(failed)
    config_changes = [r for r in rows if r["action"] == "config-change"]
    assert len(config_changes) >= 2 and config_changes[-1]["detail"]["sha256"]
    # Who read the trail about a patient is itself recorded.
    assert any(r["action"] == "audit-read" for r in audit_rows(inst, "--user", "alice"))
    # The ordinary log and error output carry no patient data.
    assert "TEST-0001" not in cli(inst, "status").stderr


def test_objects_pushed_by_storescu_are_audited_per_study_and_association(daemon, tmp_path):
    made = make_ct_series(tmp_path / "in", 5, size=4000)
    assert storescu(daemon.dicom_port, tmp_path / "in").returncode == 0
    daemon.stop()
    rows = json.loads(run_cli(daemon.config, "audit", "--study", made[0].study_uid,
                              "--json").stdout)["records"]
    got = [r for r in rows if r["action"] == "object-received"]
    assert len(got) == 1 and got[0]["detail"] == {"stored": 5, "refused": 0}
    assert got[0]["actor"] == "STORESCU" and got[0]["source"].startswith("STORESCU@127.0.0.1")
    assert got[0]["patient_id"] == "TEST-0001"


def _tamper_cases():
    return {
        "edited": ("update audit_log set detail = '{\"stored\":99}' where id = 3", 3, "changed"),
        "deleted": ("delete from audit_log where id = 4", 4, "missing"),
        "reordered": ("update audit_log set id = case id when 2 then 5 when 5 then 2 end "
                      "where id in (2, 5)", 2, "does not follow"),
        "cut off": ("delete from audit_log where id = (select max(id) from audit_log)", None,
                    "cut off"),
    }


@pytest.mark.parametrize("case", list(_tamper_cases()))
def test_any_tampering_is_found_with_its_position(inst, case):
    for n in range(6):
        cli(inst, "peer", "add", f"PEER{n}", f"10.0.0.{n + 1}")
    ok = json.loads(cli(inst, "audit", "--verify", "--json").stdout)
    assert ok["ok"] and ok["records"] >= 8
    sql, pos, why = _tamper_cases()[case]
    if case == "reordered":       # SQLite cannot swap primary keys in one update
        db(inst, "update audit_log set id = 1000 where id = 2")
        db(inst, "update audit_log set id = 2 where id = 5")
        db(inst, "update audit_log set id = 5 where id = 1000")
    else:
        db(inst, sql)
    p = cli(inst, "audit", "--verify", "--json", check=False)
    r = json.loads(p.stdout)
    assert p.returncode == 1 and not r["ok"] and why in r["first_bad"]["why"]
    if pos is not None:
        assert r["first_bad"]["position"] == pos
    assert "BROKEN" in cli(inst, "audit", "--verify", check=False).stderr


def test_a_rewritten_chain_is_caught_by_the_checkpoint_and_the_anchor(inst):
    from archive.audit import keyed_hash

    cp = json.loads(cli(inst, "audit", "--checkpoint", "--json").stdout)
    # Someone who also holds the audit key (so the keyed links alone cannot tell) edits
    # record 1 and recomputes every link after it (a consistent chain).
    key = bytes.fromhex((inst.settings.data_dir / "secrets" / "audit.key").read_text().strip())
    db(inst, "update audit_log set actor = 'mallory' where id = 1")
    rows = db(inst, "select id, at, actor, action, outcome, source, patient_id, study_uid, detail "
                    "from audit_log order by id")
    prev = "0" * 64
    from datetime import datetime
    for r in rows:
        h = keyed_hash(key, r[0], datetime.fromisoformat(r[1]), *r[2:], prev)
        db(inst, "update audit_log set prev_hash = ?, hash = ? where id = ?", prev, h, r[0])
        prev = h
    db(inst, "update audit_head set last_hash = ?", prev)
    p = cli(inst, "audit", "--verify", "--json", check=False)
    assert p.stdout.strip(), p.stderr
    r = json.loads(p.stdout)
    assert not r["ok"] and "checkpoint" in r["first_bad"]["why"]
    db(inst, "delete from audit_checkpoints")                       # ... and the checkpoints
    p = cli(inst, "audit", "--verify", "--anchor", f"{cp['upto_id']}:{cp['hash']}", "--json",
            check=False)
    r = json.loads(p.stdout)
    assert p.returncode == 1 and "anchor" in r["first_bad"]["why"]


def test_audit_needs_the_auditor_role(inst):
    cli(inst, "user", "add", "vic", "--role", "viewer")   # password: PACSVAULT_NEW_PASSWORD
    vic = {"PACSVAULT_USER": "vic", "PACSVAULT_PASSWORD": "Viewer-Pass-9-Long",
           "PACSVAULT_NEW_PASSWORD": "Viewer-Pass-10-Longer"}
    run_cli(inst.config, "user", "passwd", env=vic)
    vic["PACSVAULT_PASSWORD"] = "Viewer-Pass-10-Longer"
    p = run_cli(inst.config, "audit", "--verify", env=vic, check=False)
    assert p.returncode == 13 and "auditor" in p.stderr
    refused = [r for r in audit_rows(inst, "--user", "vic") if r["outcome"] == "failure"]
    assert refused and refused[-1]["detail"]["refused"] == "audit"


@pytest.fixture(autouse=True)
def _new_password(monkeypatch):
    monkeypatch.setenv("PACSVAULT_NEW_PASSWORD", "Viewer-Pass-9-Long")
