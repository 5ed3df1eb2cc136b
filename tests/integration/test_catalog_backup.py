"""Catalog backups: `catalog backup` writes a consistent snapshot to both sites and,
encrypted to the DR recipients, to the object tier; `status` shows each place's newest;
after the catalog file is lost, `catalog restore` from either place brings back every
row (the audit trail verifies), and refuses a backup that is cut short, altered,
under the wrong key, or a daemon that is running."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from archive.dicom.part10 import dataset_offset
from tests.integration.test_dr import configure
from tests.support.daemon import Daemon, free_port, run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install


def cli_json(inst: Install, *args: str, check: bool = True) -> tuple[int, dict, str]:
    p = run_cli(inst.config, *args, "--json", check=check)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {}), p.stderr


def catalog_file(inst: Install) -> Path:
    return Path(inst.settings.catalog.url.split("///", 1)[1])


def count(inst: Install, table: str) -> int:
    with sqlite3.connect(catalog_file(inst)) as c:
        return c.execute(f"select count(*) from {table}").fetchone()[0]


def data_set(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(dataset_offset(f))
        return f.read()


def lose_catalog(inst: Install) -> None:
    db = catalog_file(inst)
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)


@pytest.fixture
def inst(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.key = tmp_path / "dr-key.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(inst.key)).stdout.strip())
    inst.made = make_varied_study(tmp_path / "v", per_kind=1, size=8000) + \
        make_ct_series(tmp_path / "ct", 5, size=8000)
    inst.ingest(inst.made)
    run_cli(inst.config, "restore", "--study", inst.made[-1].study_uid, "--to",
            str(tmp_path / "out"))                    # leaves restore records in the trail
    return inst


def test_backup_everywhere_then_restore_after_the_catalog_is_lost(inst, tmp_path):
    rc, rep, _ = cli_json(inst, "catalog", "backup")
    assert rc == 0 and rep["ok"], rep
    sites = inst.settings.sites
    assert rep["places"] == {sites[0].name: "written", sites[1].name: "written",
                             inst.settings.objects.name: "written"}
    assert rep["instances"] == len(inst.made) and rep["audit_records"] > 0
    on_a = sites[0].path / "catalog-backups" / rep["name"]
    assert on_a.is_file() and (sites[1].path / "catalog-backups" / rep["name"]).is_file()
    tier_root = Path(inst.settings.objects.path)
    sealed = tier_root / "catalog-backups" / (rep["name"] + ".age")
    assert sealed.is_file() and b"SQLite format" not in sealed.read_bytes()   # encrypted

    st = json.loads(run_cli(inst.config, "status", "--json").stdout)
    assert set(st["catalog_backups"]) == {sites[0].name, sites[1].name,
                                          inst.settings.objects.name}
    assert all(v["age_s"] < 600 for v in st["catalog_backups"].values())

    instances, trail = count(inst, "instances"), count(inst, "audit_log")
    lose_catalog(inst)
    assert run_cli(inst.config, "status", check=False).returncode != 0   # no catalog now
    rc, out, _ = cli_json(inst, "catalog", "restore", str(on_a))
    assert rc == 0 and out["instances"] == instances
    assert count(inst, "instances") == instances and count(inst, "audit_log") >= trail
    verify = json.loads(run_cli(inst.config, "audit", "--verify", "--json").stdout)
    assert verify["ok"], verify
    # every image back, bit for bit, from the restored catalog's knowledge
    out_dir = tmp_path / "again"
    run_cli(inst.config, "restore", "--study", inst.made[0].study_uid, "--to", str(out_dir))
    for m in [m for m in inst.made if m.study_uid == inst.made[0].study_uid]:
        [got] = list(out_dir.rglob(f"{m.sop_uid}.dcm"))
        assert data_set(got) == data_set(m.path)

    # the object tier's copy, with the DR key; the catalog that was there is kept aside
    rc, out, _ = cli_json(inst, "catalog", "restore", str(sealed), "--identity", str(inst.key))
    assert rc == 0 and out["replaced"] and Path(out["replaced"]).is_file()
    assert count(inst, "instances") == instances


def test_bad_backups_and_a_running_daemon_are_refused_and_change_nothing(inst, tmp_path):
    rc, rep, _ = cli_json(inst, "catalog", "backup")
    assert rc == 0
    src = inst.settings.sites[0].path / "catalog-backups" / rep["name"]
    instances = count(inst, "instances")

    work = tmp_path / "bad"
    work.mkdir()
    cut = work / rep["name"]
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])       # no manifest beside
    rc, _, err = cli_json(inst, "catalog", "restore", str(cut), check=False)
    assert rc != 0 and ("cut short" in err or "not a sound" in err), err

    shutil.copy(src.with_name(src.name + ".json"), work)                # manifest beside it
    altered = bytearray(src.read_bytes())
    altered[len(altered) // 2] ^= 0x40
    cut.write_bytes(bytes(altered))
    rc, _, err = cli_json(inst, "catalog", "restore", str(cut), check=False)
    assert rc != 0 and "SHA-256" in err, err

    other_key = tmp_path / "other.txt"
    run_cli(inst.config, "dr", "keygen", "--out", str(other_key))
    sealed = Path(inst.settings.objects.path) / "catalog-backups" / (rep["name"] + ".age")
    rc, _, err = cli_json(inst, "catalog", "restore", str(sealed), "--identity",
                          str(other_key), check=False)
    assert rc != 0 and "wrong key" in err, err
    rc, _, err = cli_json(inst, "catalog", "restore", str(sealed), check=False)
    assert rc != 0 and "--identity" in err

    stray = work / "notes.txt"
    stray.write_text("hello")
    rc, _, err = cli_json(inst, "catalog", "restore", str(stray), check=False)
    assert rc != 0 and "not a catalog backup" in err

    d = Daemon(inst.config, free_port(), 0, workers=1).start()
    try:
        rc, _, err = cli_json(inst, "catalog", "restore", str(src), check=False)
        assert rc != 0 and "running" in err.lower(), err
    finally:
        d.stop()
    assert count(inst, "instances") == instances           # untouched throughout
    assert not list(catalog_file(inst).parent.glob("*.replaced-*"))


def test_old_backups_beyond_the_kept_number_are_pruned(inst):
    text = inst.config.read_text().replace("backup_keep = 14", "backup_keep = 2")
    assert "backup_keep = 2" in text
    inst.config.write_text(text)
    names = [cli_json(inst, "catalog", "backup")[1]["name"] for _ in range(4)]
    for place in [s.path for s in inst.settings.sites] + [Path(inst.settings.objects.path)]:
        held = sorted(p.name.split(".")[0] for p in (place / "catalog-backups").iterdir()
                      if not p.name.endswith(".json"))
        assert held == sorted(n.split(".")[0] for n in names[-2:]), place


@pytest.mark.needs_pg
def test_postgres_catalog_backup_and_restore_after_its_tables_are_dropped(pg_server, tmp_path):
    from sqlalchemy import create_engine, text

    from tests.support.daemon import init_instance

    url = pg_server.create_database()
    try:
        inst = Install(init_instance(tmp_path / "pv", catalog_url=url))
        made = make_ct_series(tmp_path / "ct", 4, size=6000)
        inst.ingest(made)
        run_cli(inst.config, "restore", "--study", made[0].study_uid, "--to", str(tmp_path / "o"))
        rc, rep, err = cli_json(inst, "catalog", "backup")
        assert rc == 0 and rep["kind"] == "pgdump" and rep["instances"] == 4, err
        dump = inst.settings.sites[1].path / "catalog-backups" / rep["name"]

        engine = create_engine(url)
        with engine.begin() as c:
            trail = c.execute(text("select count(*) from audit_log")).scalar()
            c.execute(text("drop schema public cascade"))
            c.execute(text("create schema public"))
        assert run_cli(inst.config, "status", check=False).returncode != 0
        rc, out, err = cli_json(inst, "catalog", "restore", str(dump))
        assert rc == 0 and out["instances"] == 4, err
        with engine.begin() as c:
            assert c.execute(text("select count(*) from audit_log")).scalar() >= trail
        engine.dispose()
        assert json.loads(run_cli(inst.config, "audit", "--verify", "--json").stdout)["ok"]
        st = json.loads(run_cli(inst.config, "status", "--json").stdout)
        assert st["instances"] == 4
    finally:
        pg_server.drop_database(url)


def test_the_scheduled_job_records_its_runs_and_says_when_a_place_failed(inst):
    import threading

    from archive import jobs
    from archive.app.compose import open_catalog
    from archive.app.scheduled import configured_jobs, run_catalog_backup_job

    assert "catalog-backup" in [name for name, _, _ in configured_jobs(inst.settings)]
    ok = run_catalog_backup_job(inst.settings, threading.Event())
    assert ok["ok"]
    b = inst.settings.sites[1].path
    gone = b.with_name(b.name + ".gone")
    b.rename(gone)                                         # site B unmounted
    try:
        bad = run_catalog_backup_job(inst.settings, threading.Event())
    finally:
        gone.rename(b)
    assert not bad["ok"] and bad["places"][inst.settings.sites[1].name].startswith("failed")
    assert bad["places"][inst.settings.sites[0].name] == "written"
    cat = open_catalog(inst.settings)
    try:
        runs = jobs.history(cat, "catalog-backup")
    finally:
        cat.close()
    assert [r["outcome"] for r in runs][:2] == ["findings", "ok"]
    assert runs[0]["summary"]["failed"] == 1 and runs[0]["summary"]["written"] == 2


def site_sums(inst: Install) -> dict[str, str]:
    import hashlib
    return {p.name[:-4]: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (inst.settings.sites[0].path / "objects").rglob("*.dcm")}


def test_rebuild_from_the_sites_puts_back_the_newest_backup_and_catalogs_what_came_since(
        inst, tmp_path):
    assert cli_json(inst, "catalog", "backup")[0] == 0
    later = make_ct_series(tmp_path / "later", 4, size=9000, seed=5)   # after the backup
    inst.ingest(later)
    acked = site_sums(inst)
    records = count(inst, "audit_log")
    lose_catalog(inst)
    junk = inst.settings.sites[0].path / "objects" / "zz" / "zz" / "junk.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a DICOM file at all")
    rc, r, _ = cli_json(inst, "catalog", "rebuild", "--from", "sites", check=False)
    assert rc == 1 and not r["ok"]                               # the junk is named, not hidden
    assert [u["key"] for u in r["unreadable"]] == ["objects/zz/zz/junk.dcm"]
    assert r["catalog_backup"]["applied"] and r["catalog_backup"]["taken_at"]
    assert r["catalog_backup"]["absent"] == {}                   # the sites are whole
    assert r["adopted"] == len(later) and r["instances"] == len(acked)
    # The trail as it was at the backup (the restore of the fixture included), plus the
    # rebuild's own record, verifies under the install's key.
    assert count(inst, "audit_log") >= records - 1
    trail = cli_json(inst, "audit", "--study", inst.made[-1].study_uid)[1]["records"]
    assert "restore" in [t["action"] for t in trail]
    assert cli_json(inst, "audit", "--verify")[1]["ok"]
    junk.unlink()
    out = tmp_path / "back"
    rc, r, _ = cli_json(inst, "restore", "--patient", "TEST-0001", "--to", str(out))
    assert rc == 0 and r["restored"] == len(acked)
    assert {p.name[:-4]: __import__("hashlib").sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*.dcm")} == acked                 # every one, bit-identical
    assert cli_json(inst, "scrub", "--all")[1]["ok"]
    # A catalog that holds studies is never replaced by a rebuild.
    rc, _, err = cli_json(inst, "catalog", "rebuild", "--from", "sites", check=False)
    assert rc != 0 and "holds studies" in err


def test_rebuild_from_the_sites_alone_without_any_backup(inst, tmp_path):
    acked = site_sums(inst)
    lose_catalog(inst)
    rc, r, _ = cli_json(inst, "catalog", "rebuild", "--from", "sites")
    assert r["ok"] and r["catalog_backup"]["applied"] is None
    assert r["adopted"] == r["instances"] == len(acked) and r["unreadable"] == []
    out = tmp_path / "back"
    rc, r, _ = cli_json(inst, "restore", "--patient", "TEST-0001", "--to", str(out))
    assert r["restored"] == len(acked) and len(list(out.rglob("*.dcm"))) == len(acked)
    assert cli_json(inst, "scrub", "--all")[1]["ok"]
