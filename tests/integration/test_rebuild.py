"""`pacsvault replicate --rebuild SITE`: a lost site refilled from its mirror and the
object tier, proven by a full verification pass; and catch-up replication by hand."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install, site_state


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.made = make_varied_study(tmp_path / "v", per_kind=2, size=30_000)
    i.ingest(i.made)
    return i


def rebuild(inst: Install, *args: str) -> dict:
    p = run_cli(inst.config, "replicate", *args, "--json", check=False)
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def site_dir(inst: Install, i: int):
    return inst.settings.sites[i].path


def lose_site(inst: Install, i: int) -> None:
    """The disk is replaced: a new, empty directory at the same mount point."""
    shutil.rmtree(site_dir(inst, i))
    site_dir(inst, i).mkdir()


def test_a_replaced_site_is_refilled_from_its_mirror_and_verified(inst):
    before = site_state(inst)
    lose_site(inst, 1)
    r = rebuild(inst, "--rebuild", "site-b")            # no marker: maybe just unmounted
    assert r["_rc"] == 4 and "--initialize" in r["_stderr"]
    assert not any(site_dir(inst, 1).iterdir())          # nothing written
    r = rebuild(inst, "--rebuild", "site-b", "--initialize")
    n = len(inst.made)
    assert r["_rc"] == 0 and r["ok"] and r["initialized"]
    assert r["expected"] == n and r["verified"] == n and r["restored"] == {"site-a": n}
    assert r["already_present"] == 0 and r["unrecoverable"] == []
    assert r["bytes_restored"] == r["verified_bytes"] == sum(
        p.stat().st_size for p in (site_dir(inst, 1) / "objects").rglob("*.dcm"))
    assert site_state(inst) == before                    # bit-identical to before the loss
    assert f"{n} of {n} copies verified" in r["_stderr"]
    st = json.loads(run_cli(inst.config, "status", "--json").stdout)
    assert st["healthy"] and st["sites"][1]["objects"] == n
    runs = json.loads(run_cli(inst.config, "jobs", "--json", "--job", "rebuild").stdout)["runs"]
    assert runs[0]["outcome"] == "ok" and runs[0]["summary"]["verified"] == n
    again = rebuild(inst, "--rebuild", "site-b")         # idempotent: all present now
    assert again["_rc"] == 0 and again["already_present"] == n and again["restored"] == {}


def test_what_the_mirror_lost_too_comes_from_the_object_tier(inst):
    text = inst.config.read_text().replace("purge_online = true", "purge_online = false")
    inst.config.write_text(text)                         # copy-only: bundles, sites keep files
    study = inst.made[0].study_uid
    run_cli(inst.config, "migrate", "--study", study)
    before = site_state(inst)
    lose_site(inst, 1)
    victims = sorted((site_dir(inst, 0) / "objects").rglob("*.dcm"))[:3]
    for v in victims:
        v.unlink()                                       # the mirror lost three files as well
    r = rebuild(inst, "--rebuild", "site-b", "--initialize")
    n = len(inst.made)
    assert r["_rc"] == 0 and r["verified"] == n
    assert r["restored"] == {"site-a": n - 3, "objects": 3}
    # site-a still lacks them (it is not the site being rebuilt): a scrub puts them back.
    assert run_cli(inst.config, "scrub", "--all", check=False).returncode == 1
    assert site_state(inst) == before


def test_an_object_with_no_copy_anywhere_is_named_and_the_exit_is_1(inst):
    lose_site(inst, 1)
    victim = sorted((site_dir(inst, 0) / "objects").rglob("*.dcm"))[0]
    victim.unlink()
    r = rebuild(inst, "--rebuild", "site-b", "--initialize")
    n = len(inst.made)
    assert r["_rc"] == 1 and not r["ok"]
    assert r["verified"] == n - 1 and r["expected"] == n
    [u] = r["unrecoverable"]
    assert u["sop_uid"] == victim.name[:-4] and u["study_uid"] == inst.made[0].study_uid
    assert f"UNRECOVERABLE on site-b: instance {u['sop_uid']}" in r["_stderr"]


def test_purged_studies_stay_on_the_object_tier(tmp_path):
    inst = Install.create(tmp_path / "pv")
    old = make_ct_series(tmp_path / "old", 4, size=3000)
    new = make_ct_series(tmp_path / "new", 3, size=3000)
    inst.ingest(old + new)
    run_cli(inst.config, "migrate", "--study", old[0].study_uid)    # purged from both sites
    lose_site(inst, 0)
    r = rebuild(inst, "--rebuild", "site-a", "--initialize")
    assert r["_rc"] == 0 and r["expected"] == 3 and r["verified"] == 3
    assert len(list((site_dir(inst, 0) / "objects").rglob("*.dcm"))) == 3


def test_a_site_added_to_the_config_is_filled(inst):
    text = inst.config.read_text().replace(
        '[ingest]', '[[sites]]\nname = "site-c"\npath = "sites/c"\n\n[ingest]', 1)
    inst.config.write_text(text)
    (inst.config.parent / "sites" / "c").mkdir()
    r = rebuild(inst, "--rebuild", "site-c", "--initialize")
    n = len(inst.made)
    assert r["_rc"] == 0 and r["rows_added"] == n and r["verified"] == n
    assert sum(r["restored"].values()) == n


def test_catch_up_and_bad_arguments(inst):
    import sqlite3

    victim = sorted((site_dir(inst, 1) / "objects").rglob("*.dcm"))[1]
    victim.unlink()
    db = inst.settings.catalog.url.split("///", 1)[1]
    with sqlite3.connect(db) as c:                     # as ingest leaves it while b was down
        c.execute("update copies set state='missing' where location='site-b' and key like ?",
                  (f"%{victim.name}",))
    r = rebuild(inst)
    assert r["_rc"] == 0 and r["repaired"] == 1 and r["sites"] == {"site-b": 1}
    assert victim.exists()
    for args, code, text in ((["--rebuild", "site-z"], 4, "no site named"),
                             (["--initialize"], 4, "needs --rebuild"),
                             (["--rebuild", "../../etc"], 4, "no site named"),
                             (["--threads", "0", "--rebuild", "site-a"], 2, "")):
        p = run_cli(inst.config, "replicate", *args, check=False)
        assert p.returncode == code and text in p.stderr and "Traceback" not in p.stderr


def test_a_rebuild_killed_mid_way_is_finished_by_the_next_one(inst):
    before = site_state(inst)
    lose_site(inst, 1)
    p = run_cli(inst.config, "replicate", "--rebuild", "site-b", "--initialize", "--threads", "1",
                "--json", check=False,
                env={"PACSVAULT_FAILPOINTS": "mirror.after_temp_write=kill@12"})
    assert p.returncode == -9                                # killed with a temp file written
    tmp = site_dir(inst, 1) / "tmp"
    assert list(tmp.iterdir())                               # the torn write, never visible
    n = len(inst.made)
    r = rebuild(inst, "--rebuild", "site-b")                 # marker already written
    assert r["_rc"] == 0 and r["verified"] == n
    assert r["already_present"] == 11 and r["restored"] == {"site-a": n - 11}
    assert not list(tmp.iterdir())                           # swept
    assert site_state(inst) == before
