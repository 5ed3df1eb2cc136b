"""`pacsvault find`: studies found as C-FIND finds them, each with where it lives
(online on which sites, object tier, DR volumes with custody state), conflicts,
bad criteria refused, every search audited, and a viewer not allowed to search."""
from __future__ import annotations

import json
import subprocess

import pydicom
import pytest

from tests.integration.test_accounts import ADMIN_PW, BOB_PW, cli, env
from tests.integration.test_dr import configure, db
from tests.support.daemon import PACSVAULT, run_cli
from tests.support.dataset import make_conflict, make_ct_series, make_varied_study
from tests.support.tiering import Install


def find(inst: Install, *args: str) -> dict:
    p = run_cli(inst.config, "find", *args, "--json")
    return json.loads(p.stdout)


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.varied = make_varied_study(tmp_path / "v", per_kind=1, size=6_000)
    i.ct = make_ct_series(tmp_path / "ct", 4, size=6_000, patient_id="PID-CT-9")
    i.conflict = make_conflict(tmp_path / "c", patient_id="PID-CONF-3")
    i.ingest(i.varied + i.ct + list(i.conflict))
    return i


def test_each_study_says_where_it_lives(inst, tmp_path):
    run_cli(inst.config, "migrate", "--study", inst.varied[0].study_uid)
    key = tmp_path / "dr-key.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(key)).stdout.strip())
    assert json.loads(run_cli(inst.config, "dr", "write", "--json").stdout)["complete"]
    [barcode] = {r[0] for r in db(inst, "select barcode from dr_volumes")}
    run_cli(inst.config, "dr", "custody", barcode, "--to", "in-transit", "--location",
            "van 3", "--by", "courier")
    # The CT study loses every online copy: the catalog marks them missing.
    db(inst, "update copies set state = 'missing' where instance_fk in (select i.id from "
             "instances i join studies s on s.id = i.study_fk where s.study_uid = ?)",
       inst.ct[0].study_uid)
    got = {s["study_uid"]: s for s in find(inst, "--from-date", "19000101")["studies"]}
    assert set(got) == {inst.varied[0].study_uid, inst.ct[0].study_uid,
                        inst.conflict[0].study_uid}
    migrated = got[inst.varied[0].study_uid]
    assert migrated["where"] == "object tier"
    assert migrated["object_tier"] == len(inst.varied) == migrated["instances"]
    assert migrated["online"] == {"site-a": 0, "site-b": 0}
    ct = got[inst.ct[0].study_uid]
    assert ct["where"] == f"DR volumes only: {barcode}"
    assert ct["dr_volumes"] == [{"barcode": barcode, "state": "in-transit", "location": "van 3",
                                 "instances": 4, "on_site": False}]
    assert ct["damaged"] == {"site-a:missing": 4, "site-b:missing": 4}
    conflict = got[inst.conflict[0].study_uid]
    assert conflict["conflicts"] == 1 and conflict["where"] == "online on site-a, site-b"
    assert conflict["patient_id"] == "PID-CONF-3"


def test_criteria_match_as_c_find_does(inst):
    name = str(pydicom.dcmread(inst.ct[0].path, stop_before_pixels=True).PatientName)
    assert [s["study_uid"] for s in find(inst, "--patient", "PID-CT-9")["studies"]] == \
        [inst.ct[0].study_uid]
    assert len(find(inst, "--patient", "PID-C*")["studies"]) == 2
    assert len(find(inst, "--name", name.lower()[:4] + "*")["studies"]) == 3
    assert [s["study_uid"] for s in find(inst, "--modality", "MG")["studies"]] == \
        [inst.varied[0].study_uid]
    assert find(inst, "--from-date", "20300101")["count"] == 0
    assert [s["study_uid"] for s in find(inst, "--study", inst.ct[0].study_uid)["studies"]] == \
        [inst.ct[0].study_uid]


def test_bad_criteria_and_too_many_matches_are_refused(inst):
    for args, why in ((["--from-date", "2024-01-01"], "not a date"),
                      ([], "say what to find"),
                      (["--study", "1.2.*"], "UID"),
                      (["--patient", "P" * 65], "longer"),
                      (["--from-date", "19000101", "--limit", "2"], "more than 2 matches")):
        p = run_cli(inst.config, "find", *args, check=False)
        assert p.returncode == 4 and why in p.stderr, (args, p.stderr)


def test_every_search_is_audited_and_a_viewer_may_not_search(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "acc"
    p = subprocess.run([PACSVAULT, "init", str(root), "--admin", "alice"], capture_output=True,
                       text=True, env={**__import__("os").environ, "PACSVAULT_PASSWORD": ADMIN_PW})
    assert p.returncode == 0, p.stderr
    inst = Install(root / "pacsvault.toml")
    inst.ingest(make_ct_series(tmp_path / "ct", 2, size=4000, patient_id="PID-AUD-1"))
    admin = dict(user="alice", pw=ADMIN_PW)
    assert cli(inst, "find", "--patient", "PID-AUD-1", **admin).returncode == 0
    assert cli(inst, "user", "add", "bob", "--role", "viewer", new=BOB_PW, **admin).returncode == 0
    new = "Green-Forest-8-River"
    assert cli(inst, "user", "passwd", user="bob", pw=BOB_PW, new=new).returncode == 0
    p = cli(inst, "find", "--patient", "PID-AUD-1", user="bob", pw=new)
    assert p.returncode == 13 and "may not run find" in p.stderr and "PID-AUD-1" not in p.stdout
    out = run_cli(inst.config, "audit", "--patient", "PID-AUD-1", "--json",
                  env=env(**admin)).stdout
    queries = [r for r in json.loads(out)["records"] if r["action"] == "query"]
    assert [q["actor"] for q in queries] == ["alice"]
