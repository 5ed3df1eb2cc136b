"""`pacsvault scrub --all --json` on the embedded default, with damage made by hand."""
from __future__ import annotations

import json
import sqlite3

import pytest

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install, site_state


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.made = make_varied_study(tmp_path / "v", per_kind=1, size=20_000)
    i.ingest(i.made)
    return i


def scrub(inst: Install, *args: str) -> dict:
    p = run_cli(inst.config, "scrub", *args, "--json", check=False)
    return {**json.loads(p.stdout), "_rc": p.returncode, "_stderr": p.stderr}


def files(inst: Install, site: int):
    return sorted((inst.settings.sites[site].path / "objects").rglob("*.dcm"))


def flip(path, at: int = -100) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x20
    path.write_bytes(bytes(raw))


def test_clean_scrub_checks_every_copy_and_exits_0(inst):
    r = scrub(inst, "--all")
    assert r["_rc"] == 0 and r["ok"] and r["objects"] == 2 * len(inst.made)
    assert r["bytes"] == sum(p.stat().st_size for s in (0, 1) for p in files(inst, s))
    assert r["findings"] == []


def test_bit_rot_on_a_and_a_deleted_file_on_b_are_repaired_and_reported(inst):
    before = site_state(inst)
    a, b = files(inst, 0), files(inst, 1)
    flip(a[3])
    b[5].unlink()
    r = scrub(inst, "--all")
    assert r["_rc"] == 1 and not r["ok"]                  # damage found, even though repaired
    kinds = sorted((f["kind"], f["site"], f["repaired_from"]) for f in r["findings"])
    assert kinds == [("corrupt", "site-a", "site-b"), ("missing", "site-b", "site-a")]
    assert all(f["sop_uid"] and f["study_uid"] == inst.made[0].study_uid for f in r["findings"])
    assert site_state(inst) == before                     # bit-identical again
    assert "FINDING corrupt on site-a" in r["_stderr"]
    assert scrub(inst, "--all")["ok"]                     # and a second scrub is clean


def test_both_copies_bad_repaired_from_the_object_tier(inst):
    before = site_state(inst)
    study = inst.made[0].study_uid
    run_cli(inst.config, "migrate", "--study", study)
    run_cli(inst.config, "recall", study)
    flip(files(inst, 0)[2])
    flip(files(inst, 1)[2])
    r = scrub(inst, "--all")
    assert r["_rc"] == 1 and r["repaired"] == 2 and r["unrecoverable"] == 0
    # site-a from the tier; site-b then from the now verified site-a (or the tier)
    assert r["findings"][0]["repaired_from"] == "objects"
    assert r["findings"][1]["repaired_from"] in ("objects", "site-a")
    assert site_state(inst) == before


def test_both_copies_bad_and_no_tier_copy_is_unrecoverable_and_named(inst):
    victim_a = files(inst, 0)[4]
    name = victim_a.name
    flip(victim_a)
    [victim_b] = [p for p in files(inst, 1) if p.name == name]
    flip(victim_b, at=-200)
    r = scrub(inst, "--all")
    assert r["_rc"] == 1 and r["unrecoverable"] == 2 and r["repaired"] == 0
    f = r["findings"][0]
    assert f["sop_uid"] == name[:-4] and f["study_uid"] == inst.made[0].study_uid
    db = inst.settings.catalog.url.split("///", 1)[1]
    with sqlite3.connect(db) as c:         # marked, and the catalog checksum untouched
        assert c.execute("select count(*) from copies where state = 'corrupt'").fetchone() == (2,)
    st = json.loads(run_cli(inst.config, "status", "--json").stdout)
    assert all(s["corrupt"] == 1 for s in st["sites"]) and not st["healthy"]


def test_orphans_reported_then_deleted_only_when_asked(inst):
    stray = inst.settings.sites[0].path / "objects" / "ab" / "cd" / "stray.dcm"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"not ours")
    r = scrub(inst, "--site", "site-a")
    assert r["_rc"] == 1 and [f["kind"] for f in r["findings"]] == ["orphan"]
    assert stray.exists()
    r = scrub(inst, "--site", "site-a", "--delete-orphans")
    assert r["findings"][0]["detail"].endswith("deleted (--delete-orphans)") and not stray.exists()
    assert scrub(inst, "--all")["ok"]


def test_sample_and_bad_arguments(inst):
    r = scrub(inst, "--all", "--sample", "0.5", "--seed", "7")
    assert r["ok"] and 0 < r["objects"] <= 2 * len(inst.made)
    p = run_cli(inst.config, "scrub", "--site", "../etc", check=False)
    assert p.returncode == 4 and "no site named" in p.stderr
    p = run_cli(inst.config, "scrub", "--sample", "1.5", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_killed_scrub_resumes_where_it_stopped(tmp_path):
    inst = Install.create(tmp_path / "pv")
    made = make_ct_series(tmp_path / "ct", 700, size=2000)
    inst.ingest(made)
    flip(files(inst, 1)[-1])                       # damage near the end of site-b
    text = inst.config.read_text().replace("max_mb_per_s = 200", "max_mb_per_s = 0.5")
    inst.config.write_text(text)                   # slow: ~6 s for the whole scrub
    import subprocess
    import time

    from tests.support.daemon import PACSVAULT
    p = subprocess.Popen([PACSVAULT, "--config", str(inst.config), "scrub", "--all", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = inst.settings.catalog.url.split("///", 1)[1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:             # kill once the first batch is saved
        with sqlite3.connect(db) as c:
            row = c.execute("select cursor_copy_id from scrub_runs").fetchone()
        if row and row[0] > 0:
            break
        time.sleep(0.1)
    p.kill()
    p.wait()
    inst.config.write_text(text.replace("max_mb_per_s = 0.5", "max_mb_per_s = 0"))
    r = scrub(inst, "--all")
    assert r["resumed"] and r["objects"] == 2 * len(made)
    assert [(f["kind"], f["site"]) for f in r["findings"]] == [("corrupt", "site-b")]
    with sqlite3.connect(db) as c:
        assert c.execute("select state from scrub_runs").fetchall() == [("done",)]


def test_site_unmounted_mid_scrub_is_reported_then_resumed(tmp_path):
    import subprocess
    import time

    from tests.support.daemon import PACSVAULT

    inst = Install.create(tmp_path / "pv")
    made = make_ct_series(tmp_path / "ct", 700, size=2000)
    inst.ingest(made)
    text = inst.config.read_text()
    inst.config.write_text(text.replace("max_mb_per_s = 200", "max_mb_per_s = 0.5"))
    marker = inst.settings.sites[1].path / "PACSVAULT-SITE.json"
    p = subprocess.Popen([PACSVAULT, "--config", str(inst.config), "scrub", "--site", "site-b",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = inst.settings.catalog.url.split("///", 1)[1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as c:
            row = c.execute("select cursor_copy_id from scrub_runs").fetchone()
        if row and row[0] > 0:
            break
        time.sleep(0.1)
    marker.rename(marker.with_suffix(".away"))        # the NAS mount goes away
    out, err = p.communicate(timeout=60)
    r = json.loads(out)
    assert p.returncode == 1 and "site-b" in r["skipped_sites"] and "SKIPPED site site-b" in err
    assert r["objects"] < len(made) and r["findings"] == []   # no false damage reported
    with sqlite3.connect(db) as c:
        assert c.execute("select state from scrub_runs").fetchall() == [("interrupted",)]
    marker.with_suffix(".away").rename(marker)        # back
    inst.config.write_text(text.replace("max_mb_per_s = 200", "max_mb_per_s = 0"))
    r2 = scrub(inst, "--site", "site-b")
    assert r2["_rc"] == 0 and r2["resumed"] and r2["objects"] == len(made)
