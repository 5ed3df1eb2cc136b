"""kill -9 at every step of a migration, then a re-run: nothing lost, nothing duplicated.

Each case kills `pacsvault migrate` at a failpoint, checks that every instance
still has the online copies or a verified object copy, re-runs the migration,
then checks: exactly one verified bundle per study on the tier (no duplicate
upload), no online file left, no temp file left, and a recall that brings
every instance back bit-identical.
"""
from __future__ import annotations

import json
import sqlite3

import pytest

from tests.integration.test_tiering_s3 import bundles_in, s3_install
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.s3fixtures import seaweed  # noqa: F401
from tests.support.tiering import Install, site_state

POINTS = ["migrate.after_bundle_row", "migrate.after_upload", "migrate.after_tier_commit",
          "migrate.mid_purge"]




def rows(inst: Install, sql: str) -> list[tuple]:
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        return c.execute(sql).fetchall()


def nothing_lost(inst: Install, before: dict[str, str]) -> None:
    """Every instance has its two online copies (as before) or an ok object copy
    in a bundle the catalog calls ok."""
    unprotected = rows(inst, """
        select i.sop_uid from instances i
        where not exists (select 1 from copies c join bundles b on b.id = c.bundle_fk
                          where c.instance_fk = i.id and c.location = 'objects'
                            and c.state = 'ok' and b.state = 'ok')""")
    online = site_state(inst)
    for (sop,) in unprotected:
        files = [k for k in before if sop in k]
        assert len(files) == 2 and all(online.get(k) == before[k] for k in files), sop


def run_case(inst: Install, study: str, point: str, env: dict) -> None:
    before = site_state(inst)
    p = run_cli(inst.config, "migrate", "--study", study, "--json", check=False,
                env={**env, "PACSVAULT_FAILPOINTS": f"{point}=kill"})
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    nothing_lost(inst, before)
    r = json.loads(run_cli(inst.config, "migrate", "--study", study, "--json", env=env).stdout)
    assert r["ok"] and r["studies"][0]["outcome"] in ("migrated", "verified")
    assert site_state(inst) == {}
    assert rows(inst, "select count(*) from bundles where state = 'ok'") == [(1,)]
    assert rows(inst, "select count(*) from copies where state = 'purging'") == [(0,)]
    assert list((inst.settings.ingest.spool_dir / "migrate").glob("*")) == []
    rc = json.loads(run_cli(inst.config, "recall", study, "--json", env=env).stdout)
    assert rc["ok"] and site_state(inst) == before


@pytest.mark.parametrize("point", POINTS)
def test_kill9_directory_tier(tmp_path, point):
    made = make_varied_study(tmp_path / "in", per_kind=2, size=20_000)
    inst = Install.create(tmp_path / "pv")
    inst.ingest(made)
    run_case(inst, made[0].study_uid, point, {})
    assert len(inst.tier_files()) == 1                 # the tier holds one bundle, no twin


@pytest.mark.needs_s3
@pytest.mark.parametrize("point", POINTS + ["s3.before_complete"])
def test_kill9_s3_tier(tmp_path, seaweed, point):
    # ~19 MB: streamed while compressed, a multipart upload of 4 parts
    made = make_varied_study(tmp_path / "in", per_kind=3, size=400_000)
    made += make_ct_series(tmp_path / "ct", 24, size=512 * 1024, study_uid=made[0].study_uid)
    inst, bucket, env = s3_install(tmp_path / "pv", seaweed)
    inst.ingest(made)
    run_case(inst, made[0].study_uid, point, env)
    assert len(bundles_in(seaweed, bucket)) == 1
