"""Studies that break the rules, pushed by dcmtk storescu to a real daemon: a Series
Instance UID reused in a second study, two different objects under one SOP Instance
UID (a conflict), and a study whose catalog rows are damaged. Each is stored, kept
where it was sent, and goes through migrate, recall, scrub, DR and restore; a bad
study becomes a named finding and a non-zero exit, never the end of the run."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.integration.test_dr import configure
from tests.support.daemon import Daemon, run_cli, storescu
from tests.support.dataset import Made, make_ct_series, make_instance
from tests.support.tiering import Install, site_state

SHARED_SERIES = "1.2.826.0.1.3680043.8.498.77.1"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli(config: Path, *args: str) -> dict:
    p = run_cli(config, *args, "--json", check=False, timeout=300)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    assert "Traceback" not in p.stderr, p.stderr
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def push(daemon: Daemon, made: list[Made]) -> None:
    r = storescu(daemon.dicom_port, [m.path for m in made])
    assert r.returncode == 0, r.stderr


def sql(config: Path, statement: str, *args) -> list[tuple]:  # noqa: ANN002
    with sqlite3.connect(config.parent / "catalog" / "catalog.db") as c:
        return c.execute(statement, args).fetchall()


def stored(config: Path) -> dict[tuple[str, int], str]:
    """(SOP UID, version) -> the SHA-256 the catalog holds for the acknowledged bytes."""
    return {(sop, v): h for sop, v, h in sql(config, "SELECT sop_uid, version, sha256 "
                                                     "FROM instances")}


def filed(config: Path) -> list[tuple]:
    """(SOP UID, study UID of its series row, series UID, uid_reused) of every instance."""
    return sorted(sql(config, "SELECT i.sop_uid, st.study_uid, se.series_uid, se.uid_reused "
                              "FROM instances i JOIN series se ON se.id = i.series_fk "
                              "JOIN studies st ON st.id = se.study_fk"))


def restored(out: Path) -> dict[str, str]:
    """'<study>/<series>/<file>' -> SHA-256 of every file a restore wrote."""
    return {str(p.relative_to(out)): sha(p) for p in sorted(out.rglob("*.dcm"))}


def with_dr_key(config: Path, tmp_path: Path) -> Path:
    key = tmp_path / "dr-key.txt"
    recipient = run_cli(config, "dr", "keygen", "--out", str(key)).stdout.strip()
    configure(Install(config), recipient)
    return key


@pytest.fixture
def shared_series(daemon: Daemon, tmp_path: Path):
    """Study A (two objects) and study B (one object, another patient) share one
    Series Instance UID; a third, ordinary study is pushed after them."""
    d = tmp_path / "in"
    a1 = make_instance(d / "a1.dcm", series_uid=SHARED_SERIES, patient_id="PAT-A")
    a2 = make_instance(d / "a2.dcm", series_uid=SHARED_SERIES, patient_id="PAT-A",
                       study_uid=a1.study_uid)
    b1 = make_instance(d / "b1.dcm", series_uid=SHARED_SERIES, patient_id="PAT-B")
    later = make_ct_series(tmp_path / "later", 3, size=6000, seed=31)
    push(daemon, [a1, a2, b1, *later])
    daemon.stop()
    return daemon.config, {"a": [a1, a2], "b": [b1], "later": later}


def test_a_series_uid_reused_by_another_study_is_kept_there_and_protected(shared_series,
                                                                          tmp_path: Path):
    config, made = shared_series
    b = made["b"][0]
    st = cli(config, "status")
    assert st["instances"] == 6 and st["studies"] == 3 and st["series_uid_reused"] == 1

    # DR: every study is written, the later ones included.
    key = with_dr_key(config, tmp_path)
    w = cli(config, "dr", "write")
    assert w["_rc"] == 0 and w["ok"] and w["complete"] and w["studies"] == 3, w
    assert w["instances"] == 6
    # A catalog rebuilt from the volumes alone files and flags them the same way.
    fresh = Install.create(tmp_path / "fresh")
    vols = sorted((config.parent / "dr" / "volumes").glob("*.tar"))
    rb = cli(fresh.config, "dr", "rebuild-catalog", "--identity", str(key), *map(str, vols))
    assert rb["_rc"] == 0 and rb["studies_complete"] == 3, rb
    assert cli(fresh.config, "status")["series_uid_reused"] == 1
    assert filed(fresh.config) == filed(config)

    # Restore from DR: B's object is under B's study, in its own series directory.
    out = tmp_path / "out-dr"
    r = cli(config, "restore", "--study", b.study_uid, "--to", str(out), "--from", "dr",
            "--identity", str(key))
    assert r["_rc"] == 0 and r["restored"] == 1, r
    sums = stored(config)
    assert restored(out) == {f"{b.study_uid}/{SHARED_SERIES}/{b.sop_uid}.dcm": sums[b.sop_uid, 1]}

    # Migrate and recall B alone: its bytes come back where they were.
    before = site_state(Install(config))
    m = cli(config, "migrate", "--study", b.study_uid)
    assert m["_rc"] == 0 and m["studies"][0]["outcome"] == "migrated", m
    assert m["studies"][0]["bundled"] == 1
    out = tmp_path / "out-objects"
    r = cli(config, "restore", "--study", b.study_uid, "--to", str(out), "--from", "objects")
    assert r["_rc"] == 0 and restored(out) == {
        f"{b.study_uid}/{SHARED_SERIES}/{b.sop_uid}.dcm": sums[b.sop_uid, 1]}
    rc = cli(config, "recall", b.study_uid)
    assert rc["_rc"] == 0 and rc["recalled"] == 1, rc
    assert site_state(Install(config)) == before

    a = made["a"]
    out = tmp_path / "out-a"
    r = cli(config, "restore", "--study", a[0].study_uid, "--to", str(out))
    assert restored(out) == {f"{m.study_uid}/{SHARED_SERIES}/{m.sop_uid}.dcm": sums[m.sop_uid, 1]
                             for m in a}
    d = cli(config, "drill", "--tier", "all", "--sample", "10", "--identity", str(key))
    assert d["_rc"] == 0 and d["ok"], d
    assert cli(config, "scrub", "--all")["ok"]


@pytest.fixture
def conflict(daemon: Daemon, tmp_path: Path):
    """One study holding two different objects under one SOP Instance UID."""
    d = tmp_path / "in"
    v1 = make_instance(d / "v1.dcm", size=9000, patient_id="PAT-C")
    v2 = make_instance(d / "v2.dcm", size=7000, patient_id="PAT-C", study_uid=v1.study_uid,
                       series_uid=v1.series_uid, sop_uid=v1.sop_uid)
    other = make_instance(d / "o.dcm", size=5000, patient_id="PAT-C", study_uid=v1.study_uid,
                          series_uid=v1.series_uid)
    push(daemon, [v1])
    push(daemon, [v2, other])
    daemon.stop()
    return daemon.config, (v1, v2, other)


def test_every_version_of_a_conflict_migrates_recalls_scrubs_and_restores(conflict,
                                                                          tmp_path: Path):
    config, (v1, v2, other) = conflict
    assert cli(config, "status")["conflicts"] == 1
    study, series = v1.study_uid, v1.series_uid
    sums = stored(config)
    assert sums[v1.sop_uid, 1] != sums[v1.sop_uid, 2]
    want = {f"{study}/{series}/{v1.sop_uid}.dcm": sums[v1.sop_uid, 1],
            f"{study}/{series}/{v1.sop_uid}.v2.dcm": sums[v1.sop_uid, 2],
            f"{study}/{series}/{other.sop_uid}.dcm": sums[other.sop_uid, 1]}
    before = site_state(Install(config))
    assert len(before) == 6

    m = cli(config, "migrate", "--study", study)
    assert m["_rc"] == 0 and m["ok"], m
    s = m["studies"][0]
    assert s["outcome"] == "migrated" and s["bundled"] == 3 and s["purged"] == 6
    assert site_state(Install(config)) == {}
    sc = cli(config, "scrub", "--all", "--tier", "all")
    assert sc["_rc"] == 0 and sc["ok"], sc

    out = tmp_path / "out-objects"
    r = cli(config, "restore", "--study", study, "--to", str(out), "--from", "objects")
    assert r["_rc"] == 0 and restored(out) == want, r

    rc = cli(config, "recall", study)
    assert rc["_rc"] == 0 and rc["recalled"] == 3, rc
    assert site_state(Install(config)) == before

    key = with_dr_key(config, tmp_path)
    w = cli(config, "dr", "write")
    assert w["_rc"] == 0 and w["complete"] and w["instances"] == 3, w
    out = tmp_path / "out-dr"
    r = cli(config, "restore", "--study", study, "--to", str(out), "--from", "dr",
            "--identity", str(key))
    assert r["_rc"] == 0 and restored(out) == want, r
    d = cli(config, "drill", "--tier", "all", "--identity", str(key))
    assert d["_rc"] == 0 and d["ok"], d


@pytest.fixture
def one_bad_study(daemon: Daemon, tmp_path: Path):
    """Five studies; the catalog row of one object of the second points at a series
    row that is gone (a damaged catalog): loading that study fails."""
    studies = [make_ct_series(tmp_path / f"s{n}", 2, size=5000, seed=40 + n) for n in range(5)]
    for s in studies:
        push(daemon, s)
    daemon.stop()
    config = daemon.config
    bad = sorted(studies, key=lambda s: s[0].study_uid)[1]
    sql(config, "UPDATE instances SET series_fk = 999999 WHERE sop_uid = ?", bad[0].sop_uid)
    return config, studies, bad


def test_one_bad_study_is_a_finding_and_every_run_goes_on(one_bad_study, tmp_path: Path):
    config, studies, bad = one_bad_study
    good = [s for s in studies if s is not bad]
    key = with_dr_key(config, tmp_path)

    w = cli(config, "dr", "write")
    assert w["_rc"] != 0 and not w["ok"] and not w["complete"]
    assert [(f["kind"], f["study_uid"]) for f in w["findings"]] == [
        ("study-failed", bad[0].study_uid)]
    assert w["studies"] == 4 and w["instances"] == 8          # every other study written
    assert "PAT-" not in json.dumps(w) + w["_stderr"]

    m = cli(config, "migrate", *[a for s in studies for a in ("--study", s[0].study_uid)])
    assert m["_rc"] != 0 and not m["ok"]
    outcome = {s["study_uid"]: s["outcome"] for s in m["studies"]}
    assert outcome.pop(bad[0].study_uid) == "failed"
    assert set(outcome.values()) == {"migrated"} and len(outcome) == 4
    assert [(f["kind"], f["study_uid"]) for f in m["findings"]] == [
        ("study-failed", bad[0].study_uid)]

    out = tmp_path / "out"
    r = cli(config, "restore", *[a for s in studies for a in ("--study", s[0].study_uid)],
            "--to", str(out))
    assert r["_rc"] != 0 and r["restored"] == 8
    assert [f["study_uid"] for f in r["failures"]] == [bad[0].study_uid]
    assert {p.split("/")[0] for p in restored(out)} == {s[0].study_uid for s in good}

    d = cli(config, "drill", "--tier", "all", "--sample", "5", "--identity", str(key))
    assert d["_rc"] != 0 and not d["ok"]
    assert {f.get("study_uid") for f in d["failures"]} == {bad[0].study_uid}
    assert d["figures"]["objects"]["verified"] == 8


def test_one_object_that_cannot_be_handled_does_not_stop_the_scrub(daemon: Daemon,
                                                                   tmp_path: Path):
    studies = [make_ct_series(tmp_path / f"s{n}", 2, size=5000, seed=60 + n) for n in range(3)]
    for s in studies:
        push(daemon, s)
    daemon.stop()
    config = daemon.config
    site_a = config.parent / "sites" / "a"
    keys = dict(sql(config, "SELECT i.sop_uid, c.key FROM instances i JOIN copies c "
                            "ON c.instance_fk = i.id WHERE c.location = 'site-a'"))
    broken, damaged = studies[0][0], studies[2][1]
    # A damaged file whose catalog row points at a study that is gone, then an
    # ordinary damaged file in another study: the second is still found and repaired.
    sql(config, "UPDATE instances SET study_fk = 999999 WHERE sop_uid = ?", broken.sop_uid)
    sums = stored(config)
    for m in (broken, damaged):
        (site_a / keys[m.sop_uid]).write_bytes(b"not the acknowledged bytes")
    sc = cli(config, "scrub", "--all")
    assert sc["_rc"] != 0 and not sc["ok"]
    kinds = {f["key"]: f["kind"] for f in sc["findings"]}
    assert kinds == {keys[broken.sop_uid]: "failed", keys[damaged.sop_uid]: "corrupt"}
    assert sha(site_a / keys[damaged.sop_uid]) == sums[damaged.sop_uid, 1]
    assert sc["objects"] == 12
