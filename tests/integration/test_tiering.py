"""The object tier on the embedded default (a local directory), driven by the CLI
exactly as operators and the acceptance checks spell it."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.support.daemon import run_cli, storescu
from tests.support.dataset import (
    make_conflict,
    make_ct_series,
    make_instance,
    make_varied_study,
)
from tests.support.tiering import Install, site_state


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()




def db(inst: Install) -> sqlite3.Connection:
    return sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1])


def copy_states(inst: Install) -> dict[tuple[str, str], int]:
    with db(inst) as c:
        return {(loc, st): n for loc, st, n in
                c.execute("select location, state, count(*) from copies group by 1, 2")}


def migrate(inst: Install, *args: str, check: bool = True) -> dict:
    p = run_cli(inst.config, "migrate", *args, "--json", check=check)
    return {**json.loads(p.stdout), "_rc": p.returncode, "_stderr": p.stderr}


def recall(inst: Install, uid: str, check: bool = True) -> dict:
    p = run_cli(inst.config, "recall", uid, "--json", check=check)
    return {**json.loads(p.stdout), "_rc": p.returncode, "_stderr": p.stderr}


@pytest.fixture
def varied(tmp_path: Path):
    inst = Install.create(tmp_path / "pv")
    made = make_varied_study(tmp_path / "in", per_kind=2, size=30_000)
    inst.ingest(made)
    return inst, made


def test_migrate_study_then_recall_is_bit_identical(varied):
    inst, made = varied
    study = made[0].study_uid
    before = site_state(inst)
    assert len(before) == 2 * len(made)

    r = migrate(inst, "--study", study)
    s = r["studies"][0]
    assert r["ok"] and s["outcome"] == "migrated" and s["bundled"] == len(made)
    assert s["purged"] == 2 * len(made) and s["bytes"] == r["totals"]["bytes"] > 0
    assert site_state(inst) == {}                       # online copies freed
    assert len(inst.tier_files()) == 1                  # one bundle for the study
    assert copy_states(inst) == {("objects", "ok"): len(made), ("site-a", "purged"): len(made),
                                 ("site-b", "purged"): len(made)}
    # the bundle key carries no patient data: only the study UID and a random id
    key = s["bundles"][0]
    assert study in key and "TEST-0001" not in key
    st = json.loads(run_cli(inst.config, "status", "--json").stdout)
    o = st["object_tier"]
    assert o["healthy"] and o["objects"] == len(made) and o["bundles"] == 1 and o["studies"] == 1
    assert o["stored_bytes"] == inst.tier_files()[0].stat().st_size and st["healthy"]
    assert all(site["objects"] == 0 for site in st["sites"])

    rc = recall(inst, study)
    assert rc["ok"] and rc["recalled"] == len(made) and rc["already_online"] == 0
    assert site_state(inst) == before                   # same paths, same bytes
    assert copy_states(inst)[("site-a", "ok")] == len(made)

    # Aged again: migrated without a new upload (the bundle still verifies).
    r2 = migrate(inst, "--study", study)
    assert r2["studies"][0]["outcome"] == "verified" and r2["studies"][0]["bundled"] == 0
    assert len(inst.tier_files()) == 1 and site_state(inst) == {}


def test_status_and_dry_run_follow_the_policy(tmp_path):
    extra = ("[lifecycle]\nmin_online_days = 0\n"
             "[[lifecycle.rules]]\nname = 'old-ct'\nolder_than_days = 365\nmodalities = ['CT']\n")
    inst = Install.create(tmp_path / "pv")
    cfg = inst.config
    text = cfg.read_text()
    # replace the default [lifecycle] and rule with the test's (as an operator edits it)
    cfg.write_text(text[:text.index("[lifecycle]")] + extra)
    old_ct = make_ct_series(tmp_path / "old", 3, size=20_000)            # StudyDate 2024-01-02
    young = [make_instance(tmp_path / "young.dcm", kind="CT", size=5000)]
    mr = [make_instance(tmp_path / "mr.dcm", kind="MR", size=5000)]
    inst.ingest(old_ct + mr)
    # a study dated today: too young for the rule
    from datetime import date

    import pydicom
    ds = pydicom.dcmread(young[0].path)
    ds.StudyDate = date.today().strftime("%Y%m%d")
    ds.save_as(young[0].path)
    inst.ingest(young)
    before = site_state(inst)

    dry = migrate(inst, "--dry-run")
    assert dry["dry_run"] and [s["study_uid"] for s in dry["studies"]] == [old_ct[0].study_uid]
    assert dry["studies"][0]["reason"] == "old-ct"
    assert dry["totals"]["bytes"] == sum(len(p.read_bytes()) for p in
                                         (inst.settings.sites[0].path / "objects").rglob("*.dcm")
                                         if old_ct[0].study_uid in str(p))
    assert site_state(inst) == before and inst.tier_files() == []     # nothing changed

    r = migrate(inst)
    assert r["ok"] and [s["study_uid"] for s in r["studies"]] == [old_ct[0].study_uid]
    assert len(site_state(inst)) == 2 * 2                              # young CT + MR stay
    assert migrate(inst)["studies"] == []                              # nothing left to do


def test_never_migrate_and_keep_recalled(tmp_path):
    inst = Install.create(tmp_path / "pv")
    a = make_ct_series(tmp_path / "a", 2, size=5000, seed=5)
    b = make_ct_series(tmp_path / "b", 2, size=5000, seed=6)
    inst.ingest(a + b)
    text = inst.config.read_text().replace("min_online_days = 30", "min_online_days = 0")
    text = text.replace("never_migrate_studies = []", f"never_migrate_studies = ['{a[0].study_uid}']")
    inst.config.write_text(text)
    r = migrate(inst)
    assert [s["study_uid"] for s in r["studies"]] == [b[0].study_uid]
    recall(inst, b[0].study_uid)
    assert migrate(inst, "--dry-run")["studies"] == []    # recalled: kept online 7 days
    # --study forces a move whatever the policy says
    assert migrate(inst, "--study", a[0].study_uid)["studies"][0]["outcome"] == "migrated"


def test_late_arrival_gets_its_own_bundle_and_recall_brings_all(tmp_path):
    inst = Install.create(tmp_path / "pv")
    first = make_ct_series(tmp_path / "s", 3, size=8000)
    inst.ingest(first)
    study = first[0].study_uid
    migrate(inst, "--study", study)
    late = [make_instance(tmp_path / "late.dcm", kind="SR", study_uid=study)]
    inst.ingest(late)
    r = migrate(inst, "--study", study)
    s = r["studies"][0]
    assert s["bundled"] == 1 and s["instances"] == 1 and len(inst.tier_files()) == 2
    rc = recall(inst, study)
    assert rc["recalled"] == 4 and len(site_state(inst)) == 8


def test_bad_input_is_refused_cleanly(varied):
    inst, made = varied
    for args, code, words in [
        (("migrate", "--study", "1.2.3/../../etc"), 4, "Study Instance UID"),
        (("migrate", "--study", "1.2.999999"), 4, "not in the catalog"),
        (("recall", "1.2.999999"), 4, "not in the catalog"),
        (("recall", "x" * 100), 4, "Study Instance UID"),
    ]:
        p = run_cli(inst.config, *args, check=False)
        assert p.returncode == code and words in p.stderr and "Traceback" not in p.stderr, p.stderr
    # a study that was never migrated: recall has nothing to do, and says so
    rc = recall(inst, made[0].study_uid)
    assert rc["ok"] and rc["recalled"] == 0 and rc["already_online"] == len(made)


@pytest.mark.parametrize("damage", ["bit-rot", "truncated", "deleted"])
def test_damaged_bundle_is_reported_and_online_copies_kept(varied, damage):
    inst, made = varied
    study = made[0].study_uid
    migrate(inst, "--study", study)
    recall(inst, study)
    before = site_state(inst)
    bundle = inst.tier_files()[0]
    raw = bytearray(bundle.read_bytes())
    if damage == "bit-rot":
        raw[len(raw) // 3] ^= 0x40
        bundle.write_bytes(bytes(raw))
    elif damage == "truncated":
        bundle.write_bytes(bytes(raw[: len(raw) - 100]))
    else:
        bundle.unlink()

    r = migrate(inst, "--study", study, check=False)
    assert r["_rc"] == 1 and not r["ok"]
    assert [f["kind"] for f in r["findings"]] == ["corrupt-bundle"]
    assert "FINDING corrupt-bundle" in r["_stderr"]      # told even when scripted
    assert site_state(inst) == before               # online copies kept
    # a fresh, verified bundle replaced it; the next clean run purges
    assert r["studies"][0]["bundled"] == len(made)
    r2 = migrate(inst, "--study", study)
    assert r2["ok"] and r2["studies"][0]["outcome"] == "verified" and site_state(inst) == {}
    assert recall(inst, study)["recalled"] == len(made) and site_state(inst) == before


def test_recall_from_a_damaged_frame_names_the_instance(varied):
    inst, made = varied
    study = made[0].study_uid
    before = site_state(inst)
    migrate(inst, "--study", study)
    bundle = inst.tier_files()[0]
    with db(inst) as c:
        sop, off, length = c.execute(
            "select i.sop_uid, c.frame_offset, c.frame_length from copies c join instances i "
            "on i.id = c.instance_fk where c.location = 'objects' order by c.frame_offset "
            "limit 1 offset 2").fetchone()
    raw = bytearray(bundle.read_bytes())
    raw[off + length // 2] ^= 0x01
    bundle.write_bytes(bytes(raw))
    rc = recall(inst, study, check=False)
    assert rc["_rc"] == 1 and [f["sop_uid"] for f in rc["failures"]] == [sop]
    assert rc["recalled"] == len(made) - 1
    assert len(site_state(inst)) == len(before) - 2      # every other instance is back
    assert copy_states(inst)[("objects", "corrupt")] == 1


def test_a_corrupt_online_copy_is_bundled_from_its_mirror(varied):
    inst, made = varied
    study = made[0].study_uid
    a_files = sorted((inst.settings.sites[0].path / "objects").rglob("*.dcm"))
    raw = bytearray(a_files[0].read_bytes())
    raw[-10] ^= 0xFF
    a_files[0].write_bytes(bytes(raw))
    r = migrate(inst, "--study", study, check=False)
    assert r["_rc"] == 1
    assert [(f["kind"], f["location"]) for f in r["findings"]] == [("corrupt-online-copy", "site-a")]
    assert r["studies"][0]["bundled"] == len(made)
    assert site_state(inst) != {}                   # damage found: kept for inspection
    r2 = migrate(inst, "--study", study)
    assert r2["ok"] and site_state(inst) == {}
    rc = recall(inst, study)
    assert rc["recalled"] == len(made)
    # the damaged copy came back whole, from the verified bundle
    b_files = sorted((inst.settings.sites[1].path / "objects").rglob("*.dcm"))
    assert sha(sorted((inst.settings.sites[0].path / "objects").rglob("*.dcm"))[0]) == \
        sha(b_files[0])


@pytest.mark.needs_dcmtk
def test_pushed_by_storescu_migrated_and_recalled_while_serving(daemon, tmp_path):
    """The acceptance path: storescu pushes varied data to a running daemon; the
    operator migrates and recalls with the CLI while the daemon keeps serving."""
    made = make_varied_study(tmp_path / "push", per_kind=2, size=50_000)
    assert storescu(daemon.dicom_port, tmp_path / "push").returncode == 0
    inst = Install(daemon.config)
    before = site_state(inst)
    assert len(before) == 2 * len(made)
    study = made[0].study_uid
    r = migrate(inst, "--study", study)
    assert r["ok"] and r["studies"][0]["bundled"] == len(made) and site_state(inst) == {}
    more = make_ct_series(tmp_path / "more", 4, size=20_000)      # ingest goes on meanwhile
    assert storescu(daemon.dicom_port, tmp_path / "more").returncode == 0
    rc = recall(inst, study)
    assert rc["recalled"] == len(made)
    after = site_state(inst)
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(after) == len(before) + 2 * len(more)
    st = json.loads(run_cli(daemon.config, "status", "--json").stdout)
    assert st["instances"] == len(made) + len(more)


def test_large_instance_round_trip_in_bounded_memory(tmp_path):
    """An instance above the in-memory limit is decoded through a scratch file,
    which is gone afterwards."""
    from tiers.recall import IN_MEMORY_MAX

    inst = Install.create(tmp_path / "pv")
    big = make_instance(tmp_path / "big.dcm", kind="XA", size=IN_MEMORY_MAX + 3_000_000)
    small = make_instance(tmp_path / "small.dcm", kind="SR", study_uid=big.study_uid)
    inst.ingest([big, small])
    before = site_state(inst)
    assert migrate(inst, "--study", big.study_uid)["ok"]
    assert recall(inst, big.study_uid)["recalled"] == 2 and site_state(inst) == before
    assert list((inst.settings.ingest.spool_dir / "recall").glob("*")) == []


def test_tier_alone_recovers_everything_after_catalog_and_sites_are_lost(varied, tmp_path):
    """The media describe themselves: with only the object tier's directory, every
    migrated instance comes back bit-identical, with its study and patient facts."""
    import shutil

    from tiers.bundle import BundleReader

    inst, made = varied
    study = made[0].study_uid
    before = {Path(k).name: v for k, v in site_state(inst).items() if k.startswith("site-a/")}
    migrate(inst, "--study", study)
    tier_root = inst.settings.objects.path
    for d in ("catalog", "sites"):
        shutil.rmtree(inst.config.parent / d)

    recovered = {}
    for bundle in sorted((tier_root / "bundles").rglob("*.pvb")):
        data = bundle.read_bytes()
        reader = BundleReader(lambda o, n: data[o:o + n], len(data))
        m = reader.manifest
        assert m["study"]["study_uid"] == study and m["study"]["patient"]["patient_id"] == "TEST-0001"
        assert {s["modality"] for s in m["study"]["series"]} >= {"CT", "MR", "SR"}
        for entry in m["instances"]:
            body = reader.read(entry)
            recovered[f"{entry['sop_uid']}.dcm"] = hashlib.sha256(body).hexdigest()
            assert entry["calling_ae"] == "STORESCU" and entry["received_at"]
    assert recovered == before


def test_copy_only_mode_keeps_online_copies_and_does_not_repeat(tmp_path):
    inst = Install.create(tmp_path / "pv")
    a = make_ct_series(tmp_path / "a", 3, size=5000)
    inst.ingest(a)
    text = inst.config.read_text().replace("min_online_days = 30", "min_online_days = 0")
    inst.config.write_text(text.replace("purge_online = true", "purge_online = false"))
    before = site_state(inst)
    r = migrate(inst)
    assert r["ok"] and r["studies"][0]["bundled"] == 3 and r["studies"][0]["purged"] == 0
    assert site_state(inst) == before and len(inst.tier_files()) == 1
    assert migrate(inst)["studies"] == []            # protected already: not picked again
    late = [make_instance(tmp_path / "late.dcm", kind="SR", study_uid=a[0].study_uid)]
    inst.ingest(late)
    assert [s["bundled"] for s in migrate(inst)["studies"]] == [1]


def test_every_version_of_a_conflict_migrates_and_comes_back(tmp_path):
    """Two objects under one SOP Instance UID are two instances: both are bundled,
    both online copies freed, both recalled to where they were."""
    inst = Install.create(tmp_path / "pv")
    v1, v2 = make_conflict(tmp_path / "in")
    other = make_instance(tmp_path / "in" / "o.dcm", size=5000, study_uid=v1.study_uid)
    inst.ingest([v1, v2, other])
    before = site_state(inst)
    assert len(before) == 6
    r = migrate(inst, "--study", v1.study_uid)
    s = r["studies"][0]
    assert r["ok"] and s["outcome"] == "migrated" and s["bundled"] == 3 and s["purged"] == 6, r
    assert site_state(inst) == {}
    assert migrate(inst)["studies"] == []           # nothing left for the nightly job
    rc = recall(inst, v1.study_uid)
    assert rc["ok"] and rc["recalled"] == 3 and site_state(inst) == before
