"""`pacsvault drill`: a reproducible sample per tier restored, checked, timed and recorded."""
from __future__ import annotations

import json
import threading

import pytest

from tests.integration.test_dr import configure
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    text = i.config.read_text().replace("purge_online = true", "purge_online = false")
    i.config.write_text(text)
    i.studies = [make_varied_study(tmp_path / "v", per_kind=1, size=20_000)] + [
        make_ct_series(tmp_path / f"ct{n}", 4, size=30_000, seed=20 + n) for n in range(4)]
    for s in i.studies:
        i.ingest(s)
    for s in i.studies[:3]:
        run_cli(i.config, "migrate", "--study", s[0].study_uid)      # copy-only: also online
    i.key = tmp_path / "k.txt"
    configure(i, run_cli(i.config, "dr", "keygen", "--out", str(i.key)).stdout.strip())
    run_cli(i.config, "dr", "write")
    return i


def drill(inst: Install, *args: str) -> dict:
    p = run_cli(inst.config, "drill", *args, "--json", check=False)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def test_a_drill_of_every_tier_passes_is_timed_and_recorded(inst):
    r = drill(inst, "--sample", "2", "--identity", str(inst.key))
    assert r["_rc"] == 0 and r["ok"] and set(r["figures"]) == {"online", "objects", "dr"}
    for tier, f in r["figures"].items():
        assert f["studies"] == 2 and f["verified"] == f["instances"] > 0
        assert 0 <= f["time_to_first_s"] <= f["time_to_last_s"] and f["mb_per_s"] > 0
    assert f"seed {r['seed']}" in r["_stderr"]
    again = drill(inst, "--sample", "2", "--identity", str(inst.key), "--seed", str(r["seed"]))
    assert {t: f["sampled"] for t, f in again["figures"].items()} == \
        {t: f["sampled"] for t, f in r["figures"].items()}           # reproducible
    assert not list((inst.settings.ingest.spool_dir / "drill").glob("drill-*"))   # cleaned up
    h = json.loads(run_cli(inst.config, "drill", "--history", "--json").stdout)
    assert [d["id"] for d in h["drills"]] == [again["drill_id"], r["drill_id"]]
    assert h["drills"][0]["ok"] and h["drills"][0]["actor"]
    [month] = h["months"]
    assert month["drills"] == 2 and month["failed"] == 0 and month["tiers"]["dr"]["drills"] == 2
    assert "drills" in run_cli(inst.config, "drill", "--history").stdout


def test_a_drill_that_finds_damage_fails_and_names_it(inst):
    study = inst.studies[4]                            # online only
    victim = study[1].sop_uid
    for s in inst.settings.sites:
        [p] = (s.path / "objects").rglob(f"{victim}.dcm")
        raw = bytearray(p.read_bytes())
        raw[-30] ^= 1
        p.write_bytes(bytes(raw))
    r = drill(inst, "--tier", "online", "--sample", "5")
    assert r["_rc"] == 1 and not r["ok"]
    [f] = r["failures"]
    assert (f["tier"], f["sop_uid"], f["study_uid"]) == ("online", victim, study[0].study_uid)
    assert f"FAILED online: instance {victim}" in r["_stderr"]
    h = json.loads(run_cli(inst.config, "drill", "--history", "--json").stdout)
    assert not h["drills"][0]["ok"] and h["months"][0]["failed"] == 1


def test_dr_needs_the_key_and_the_scheduled_drill_skips_it(inst):
    p = run_cli(inst.config, "drill", "--tier", "dr", check=False)
    assert p.returncode == 4 and "--identity" in p.stderr
    r = drill(inst, "--sample", "1")                   # all: DR skipped and said so
    assert r["_rc"] == 0 and "dr" in r["skipped_tiers"] and "SKIPPED tier dr" in r["_stderr"]
    from archive.app.scheduled import run_drill_job

    j = run_drill_job(inst.settings, threading.Event())
    assert j["ok"] and set(j["figures"]) == {"online", "objects"}
    runs = json.loads(run_cli(inst.config, "jobs", "--json", "--job", "drill").stdout)["runs"]
    assert runs[0]["trigger"] == "schedule" and runs[0]["outcome"] == "ok"
    h = json.loads(run_cli(inst.config, "drill", "--history", "--json").stdout)
    assert h["drills"][0]["trigger"] == "schedule" and h["drills"][0]["actor"] == "pacsvault serve"


def test_status_shows_what_is_not_yet_protected_at_each_level(inst, tmp_path):
    st = json.loads(run_cli(inst.config, "status", "--json").stdout)
    u = st["unprotected"]
    total = sum(len(s) for s in inst.studies)
    tail = sum(len(s) for s in inst.studies[3:])                 # not migrated
    assert u["second_site"]["objects"] == 0
    assert u["object_tier"]["objects"] == tail and u["object_tier"]["oldest_age_s"] >= 0
    assert u["dr"]["objects"] == 0                               # all on sealed volumes
    assert u["offsite"]["objects"] == total                      # none moved offsite yet
    inst.ingest(make_ct_series(tmp_path / "late", 2, size=5000, seed=99))
    u = json.loads(run_cli(inst.config, "status", "--json").stdout)["unprotected"]
    assert u["dr"]["objects"] == 2 and u["object_tier"]["objects"] == tail + 2
    assert "not yet protected" in run_cli(inst.config, "status").stdout
