"""`pacsvault scrub --tier objects`: every study bundle read back and every instance in it
checked against the catalog; damage repaired from the online copies or named."""
from __future__ import annotations

import json
import sqlite3

import pytest

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.s3fixtures import seaweed  # noqa: F401 - session fixture
from tests.support.tiering import Install, site_state


def scrub(inst: Install, *args: str, env: dict | None = None) -> dict:
    p = run_cli(inst.config, "scrub", *args, "--json", check=False, env=env)
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def rows(inst: Install, sql: str, *args) -> list[tuple]:  # noqa: ANN002
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        return c.execute(sql, args).fetchall()


def frame_of(inst: Install, sop_uid: str) -> tuple[str, int, int]:
    """(bundle key, frame offset, frame length) of an instance on the object tier."""
    [(key, off, length)] = rows(inst, """
        select b.key, c.frame_offset, c.frame_length from copies c
        join bundles b on b.id = c.bundle_fk join instances i on i.id = c.instance_fk
        where i.sop_uid = ? and c.location = 'objects' and c.state = 'ok'""", sop_uid)
    return key, off, length


def flip_at(path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture
def migrated(tmp_path):
    """Two studies on the object tier only (purged online)."""
    inst = Install.create(tmp_path / "pv")
    inst.a = make_varied_study(tmp_path / "a", per_kind=1, size=30_000)
    inst.b = make_ct_series(tmp_path / "b", 5, size=20_000)
    inst.ingest(inst.a + inst.b)
    for study in (inst.a[0].study_uid, inst.b[0].study_uid):
        run_cli(inst.config, "migrate", "--study", study)
    assert inst.site_files() == []
    return inst


def test_a_clean_tier_scrub_reads_every_bundle(migrated):
    r = scrub(migrated, "--tier", "objects")
    assert r["_rc"] == 0 and r["ok"] and r["objects"] == 2 and r["sites"] == ["objects"]
    assert r["bytes"] == sum(p.stat().st_size for p in migrated.tier_files())
    assert rows(migrated, "select count(*) from bundles where verified_at is not null") == [(2,)]
    jobs = json.loads(run_cli(migrated.config, "jobs", "--json").stdout)["runs"]
    assert (jobs[0]["job"], jobs[0]["outcome"]) == ("scrub-objects", "ok")


def test_a_damaged_frame_of_a_purged_study_is_unrecoverable_and_named(migrated):
    victim = migrated.a[2]
    key, off, length = frame_of(migrated, victim.sop_uid)
    flip_at(migrated.settings.objects.path / key, off + length // 2)
    r = scrub(migrated, "--tier", "objects")
    assert r["_rc"] == 1 and not r["ok"] and r["unrecoverable"] == 1
    [f] = r["findings"]
    assert (f["kind"], f["site"], f["sop_uid"], f["study_uid"]) == \
        ("unrecoverable", "objects", victim.sop_uid, victim.study_uid)
    assert f"FINDING unrecoverable on objects: instance {victim.sop_uid}" in r["_stderr"]
    st = json.loads(run_cli(migrated.config, "status", "--json").stdout)
    assert st["object_tier"]["corrupt"] == 1 and not st["healthy"]
    # The other instances of that bundle stay recallable.
    p = run_cli(migrated.config, "recall", victim.study_uid, "--json", check=False)
    assert p.returncode == 1
    assert len(migrated.site_files()) == 2 * (len(migrated.a) - 1)


def test_damage_with_online_copies_is_rebundled_and_nothing_purged(tmp_path):
    inst = Install.create(tmp_path / "pv")
    text = inst.config.read_text().replace("purge_online = true", "purge_online = false")
    inst.config.write_text(text)
    made = make_varied_study(tmp_path / "a", per_kind=1, size=30_000)
    inst.ingest(made)
    run_cli(inst.config, "migrate", "--study", made[0].study_uid)
    before = site_state(inst)
    [old] = inst.tier_files()
    key, off, length = frame_of(inst, made[1].sop_uid)
    flip_at(inst.settings.objects.path / key, off + 3)
    r = scrub(inst, "--tier", "objects")
    assert r["_rc"] == 1 and r["repaired"] == 1 and r["unrecoverable"] == 0
    assert r["findings"][0]["repaired_from"] == "online"
    assert site_state(inst) == before                      # copy-only: online copies kept
    [new] = inst.tier_files()
    assert new != old                                      # the damaged bundle was retired
    assert scrub(inst, "--tier", "objects")["ok"]
    assert rows(inst, "select state, count(*) from bundles group by 1 order by 1") == \
        [("corrupt", 1), ("ok", 1)]


def test_a_damaged_manifest_is_reported_though_every_frame_verifies(migrated):
    [(key, size)] = rows(migrated, """select b.key, b.size from bundles b join studies s
        on s.id = b.study_fk where s.study_uid = ?""", migrated.b[0].study_uid)
    flip_at(migrated.settings.objects.path / key, size - 100)      # in the manifest frame
    r = scrub(migrated, "--tier", "objects")
    assert r["_rc"] == 1 and r["unrecoverable"] == 0
    [f] = r["findings"]
    assert f["kind"] == "corrupt" and f["sop_uid"] is None and "every instance frame" in f["detail"]
    run_cli(migrated.config, "recall", migrated.b[0].study_uid)     # the data is intact


def test_truncated_and_deleted_bundles(migrated):
    [(ka, sa)] = rows(migrated, """select b.key, b.size from bundles b join studies s
        on s.id = b.study_fk where s.study_uid = ?""", migrated.a[0].study_uid)
    pa = migrated.settings.objects.path / ka
    with open(pa, "r+b") as f:
        f.truncate(sa // 2)
    [(kb,)] = rows(migrated, """select b.key from bundles b join studies s
        on s.id = b.study_fk where s.study_uid = ?""", migrated.b[0].study_uid)
    (migrated.settings.objects.path / kb).unlink()
    r = scrub(migrated, "--tier", "objects")
    assert r["_rc"] == 1
    lost = {f["sop_uid"] for f in r["findings"] if f["kind"] == "unrecoverable"}
    assert {m.sop_uid for m in migrated.b} <= lost           # the deleted bundle: all of it
    assert lost & {m.sop_uid for m in migrated.a}             # the truncated one: its tail
    assert not lost >= {m.sop_uid for m in migrated.a}        # ... but not its head


def test_tier_all_and_bad_arguments(migrated):
    r = scrub(migrated, "--all", "--tier", "all")
    assert r["_rc"] == 0 and r["sites"] == ["site-a", "site-b", "objects"]
    assert len(r["run_ids"]) == 2 and r["objects"] == 2
    p = run_cli(migrated.config, "scrub", "--site", "site-a", "--tier", "objects", check=False)
    assert p.returncode == 4 and "--tier objects" in p.stderr
    p = run_cli(migrated.config, "scrub", "--tier", "tape", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr


@pytest.mark.needs_s3
def test_tier_scrub_on_a_real_s3_server_finds_a_tampered_object(tmp_path, seaweed):
    from tests.integration.test_tiering_s3 import bundles_in, s3_install

    made = make_ct_series(tmp_path / "in", 6, size=30_000)
    inst, bucket, env = s3_install(tmp_path / "pv", seaweed)
    inst.ingest(made)
    run_cli(inst.config, "migrate", "--study", made[0].study_uid, env=env)
    assert scrub(inst, "--tier", "objects", env=env)["ok"]
    [obj] = bundles_in(seaweed, bucket)
    c = seaweed.client()
    body = bytearray(c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    key, off, length = frame_of(inst, made[3].sop_uid)
    body[off + length // 2] ^= 0x10
    c.put_object(Bucket=bucket, Key=obj["Key"], Body=bytes(body))
    r = scrub(inst, "--tier", "objects", env=env)
    assert r["_rc"] == 1
    assert [(f["kind"], f["sop_uid"]) for f in r["findings"]] == \
        [("unrecoverable", made[3].sop_uid)]
