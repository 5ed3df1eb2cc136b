"""The object tier on a real S3 server (SeaweedFS on loopback): server-side
SHA-256 verification, multipart bundles, Object Lock (WORM), a tampered
object, and an endpoint that drops connections mid-upload."""
from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.dropproxy import DropProxy
from tests.support.s3fixtures import seaweed  # noqa: F401 - session fixture
from tests.support.tiering import Install, site_state

pytestmark = pytest.mark.needs_s3
KEY_ENV, SECRET_ENV = "PV_TIER_KEY", "PV_TIER_SECRET"


def s3_install(root: Path, server, *, object_lock: bool = False, endpoint: str | None = None,
               extra: str = "") -> tuple[Install, str, dict]:
    """An install whose object tier is a fresh bucket on ``server`` (credentials by
    environment variable, as in production)."""
    bucket = server.create_bucket(object_lock=object_lock)
    inst = Install.create(root)
    text = inst.config.read_text().replace('kind = "directory"', 'kind = "s3"')
    text += (f"\n[objects.s3]\nbucket = '{bucket}'\nendpoint_url = '{endpoint or server.endpoint}'\n"
             f"prefix = 'pacsvault'\naccess_key_env = '{KEY_ENV}'\nsecret_key_env = '{SECRET_ENV}'\n"
             f"multipart_threshold = 6291456\npart_size = 5242880\n{extra}")
    inst.config.write_text(text)
    env = {KEY_ENV: server.access_key, SECRET_ENV: server.secret_key}
    run_cli(inst.config, "init", "--config", str(inst.config), env=env)   # writes the bucket marker
    return inst, bucket, env


def cli(inst: Install, env: dict, *args: str, check: bool = True, extra_env: dict | None = None) -> dict:
    p = run_cli(inst.config, *args, "--json", env={**env, **(extra_env or {})}, check=check)
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}




def bundles_in(server, bucket: str) -> list[dict]:
    c = server.client()
    return [o for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])
            if o["Key"].endswith(".pvb")]


def catalog_rows(inst: Install, sql: str) -> list[tuple]:
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        return c.execute(sql).fetchall()


@pytest.fixture
def big_study(tmp_path):
    # ~19 MB: streamed while compressed (tiers/growing.py), 5 MiB parts: 4 of them
    return make_ct_series(tmp_path / "ct", 36, size=512 * 1024)


def test_multipart_bundle_verified_by_server_checksum_then_recalled(tmp_path, seaweed, big_study):
    inst, bucket, env = s3_install(tmp_path / "pv", seaweed)
    inst.ingest(big_study)
    before = site_state(inst)
    study = big_study[0].study_uid
    r = cli(inst, env, "migrate", "--study", study)
    assert r["ok"] and r["studies"][0]["outcome"] == "migrated" and site_state(inst) == {}
    [obj] = bundles_in(seaweed, bucket)
    assert obj["Key"].startswith("pacsvault/bundles/") and "-" in obj["ETag"]   # multipart
    head = seaweed.client().head_object(Bucket=bucket, Key=obj["Key"], ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-4")
    assert set(head["Metadata"]) <= {"sha256", "size"}                  # no patient data
    [(server_checksum, state)] = catalog_rows(inst, "select server_checksum, state from bundles")
    assert server_checksum == head["ChecksumSHA256"].split("-")[0] + "-4" and state == "ok"

    rc = cli(inst, env, "recall", study)
    assert rc["ok"] and rc["recalled"] == len(big_study) and site_state(inst) == before
    # aged again: the intact bundle is verified by a HEAD, not uploaded again
    r2 = cli(inst, env, "migrate", "--study", study)
    assert r2["studies"][0]["outcome"] == "verified" and r2["studies"][0]["stored_bytes"] == 0
    [again] = bundles_in(seaweed, bucket)
    assert again["LastModified"] == obj["LastModified"]


def test_worm_bundle_survives_a_thief_with_our_credentials(tmp_path, seaweed):
    made = make_varied_study(tmp_path / "in", per_kind=1, size=40_000)
    inst, bucket, env = s3_install(tmp_path / "pv", seaweed, object_lock=True,
                                   extra="object_lock_mode = 'COMPLIANCE'\nretain_days = 1\n")
    inst.ingest(made)
    before = site_state(inst)
    study = made[0].study_uid
    assert cli(inst, env, "migrate", "--study", study)["ok"]
    [obj] = bundles_in(seaweed, bucket)
    c = seaweed.client()
    head = c.head_object(Bucket=bucket, Key=obj["Key"])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert timedelta(hours=23) < until - datetime.now(timezone.utc) <= timedelta(days=1)
    [(version_id, retain_until)] = catalog_rows(inst, "select version_id, retain_until from bundles")
    assert version_id == head["VersionId"] and retain_until

    # The thief: delete the version (refused), then overwrite the key with junk.
    import os

    from tiers.backend import ObjectLocked
    os.environ.update(env)
    try:
        tier = inst.tier()
        key = obj["Key"][len("pacsvault/"):]
        with pytest.raises(ObjectLocked):
            tier.delete(key, version_id=version_id)
        c.put_object(Bucket=bucket, Key=obj["Key"], Body=b"ransom note")
    finally:
        for k in env:
            os.environ.pop(k, None)
    # Our version is intact and is what recall reads: the study comes back whole.
    rc = cli(inst, env, "recall", study)
    assert rc["ok"] and site_state(inst) == before
    r = cli(inst, env, "migrate", "--study", study)
    assert r["ok"] and r["studies"][0]["outcome"] == "verified"


def test_tampered_object_is_detected_and_online_copies_kept(tmp_path, seaweed):
    made = make_varied_study(tmp_path / "in", per_kind=1, size=40_000)
    inst, bucket, env = s3_install(tmp_path / "pv", seaweed)
    inst.ingest(made)
    study = made[0].study_uid
    cli(inst, env, "migrate", "--study", study)
    cli(inst, env, "recall", study)
    before = site_state(inst)
    [obj] = bundles_in(seaweed, bucket)
    c = seaweed.client()
    body = bytearray(c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    body[100] ^= 0x10
    c.put_object(Bucket=bucket, Key=obj["Key"], Body=bytes(body))   # damaged in the bucket
    r = cli(inst, env, "migrate", "--study", study, check=False)
    assert r["_rc"] == 1 and [f["kind"] for f in r["findings"]] == ["corrupt-bundle"]
    assert "FINDING corrupt-bundle" in r["_stderr"]
    assert site_state(inst) == before                               # nothing deleted
    assert catalog_rows(inst, "select state, count(*) from bundles group by 1 order by 1") == \
        [("corrupt", 1), ("ok", 1)]


def test_endpoint_dropping_mid_upload_keeps_online_copies_and_retry_succeeds(tmp_path, seaweed,
                                                                            big_study):
    with DropProxy(seaweed.s3_port) as proxy:
        inst, bucket, env = s3_install(tmp_path / "pv", seaweed, endpoint=proxy.endpoint,
                                       extra="max_attempts = 2\n")
        inst.ingest(big_study)
        before = site_state(inst)
        study = big_study[0].study_uid
        proxy.budget = 1024 * 1024                 # every part upload is cut after 1 MiB
        r = cli(inst, env, "migrate", "--study", study, check=False)
        assert r["_rc"] == 1 and r["studies"][0]["outcome"] == "failed"
        assert "unavailable" in r["studies"][0]["reason"] and proxy.drops >= 2
        assert site_state(inst) == before                          # online copies kept
        assert catalog_rows(inst, "select count(*) from copies where location = 'objects'") == [(0,)]
        assert bundles_in(seaweed, bucket) == []
        assert seaweed.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

        proxy.heal()
        r2 = cli(inst, env, "migrate", "--study", study)
        assert r2["ok"] and site_state(inst) == {}
        assert len(bundles_in(seaweed, bucket)) == 1
        assert catalog_rows(inst, "select state, count(*) from bundles group by 1 order by 1") == \
            [("abandoned", 1), ("ok", 1)]
        assert cli(inst, env, "recall", study)["recalled"] == len(big_study)
        assert site_state(inst) == before


def test_object_tier_unreachable_fails_fast_and_says_so(tmp_path, seaweed):
    made = make_ct_series(tmp_path / "ct", 2, size=5000)
    proxy = DropProxy(seaweed.s3_port)
    inst, bucket, env = s3_install(tmp_path / "pv", seaweed, endpoint=proxy.endpoint,
                                   extra="max_attempts = 1\nconnect_timeout = 1\n")
    inst.ingest(made)
    proxy.close()
    r = cli(inst, env, "migrate", "--study", made[0].study_uid, check=False)
    assert r["_rc"] == 1 and "object tier unavailable" in r["studies"][0]["reason"]
    assert len(site_state(inst)) == 4
    p = run_cli(inst.config, "migrate", "--study", made[0].study_uid, check=False)   # no creds
    assert p.returncode == 3 and KEY_ENV in p.stderr and "Traceback" not in p.stderr
    st = json.loads(run_cli(inst.config, "status", "--json").stdout)    # status still answers
    assert not st["object_tier"]["healthy"] and KEY_ENV in st["object_tier"]["health"]
    assert st["healthy"] is False


def test_writer_failing_mid_stream_leaves_nothing_on_the_tier(tmp_path, seaweed, big_study):
    """Both online copies of one instance are bad: the streamed upload is aborted,
    nothing is left in the bucket (no object, no parts), and the operator is told."""
    inst, bucket, env = s3_install(tmp_path / "pv", seaweed)
    inst.ingest(big_study)
    victim = big_study[20].sop_uid
    for s in inst.settings.sites:
        [f] = [p for p in (s.path / "objects").rglob("*.dcm") if victim in p.name]
        raw = bytearray(f.read_bytes())
        raw[-5] ^= 0x01
        f.write_bytes(bytes(raw))
    r = cli(inst, env, "migrate", "--study", big_study[0].study_uid, check=False)
    assert r["_rc"] == 1 and r["studies"][0]["outcome"] == "failed"
    assert "no source matches" in r["studies"][0]["reason"]
    assert bundles_in(seaweed, bucket) == []
    assert seaweed.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert len(site_state(inst)) == 2 * len(big_study)
    assert list((inst.settings.ingest.spool_dir / "migrate").glob("*")) == []


def test_sse_s3_bundles_are_encrypted_at_rest(tmp_path):
    """SSE-S3 (sse = 'AES256') on a SeaweedFS started with an SSE key: the
    bundle's bytes are not in the server's files in the clear, and recall works."""
    import base64
    import os
    import secrets

    from tests.support import seaweed as sw

    sw.require_weed()
    server = sw.SeaweedServer.start(env={"WEED_S3_SSE_KEY":
                                         base64.b64encode(secrets.token_bytes(32)).decode()})
    try:
        made = make_ct_series(tmp_path / "ct", 3, size=100_000)
        inst, bucket, env = s3_install(tmp_path / "pv", server, extra="sse = 'AES256'\n")
        inst.ingest(made)
        before = site_state(inst)
        marker = made[1].path.read_bytes()[-4096:-4064]     # 32 bytes of noise pixels
        assert cli(inst, env, "migrate", "--study", made[0].study_uid)["ok"]
        [obj] = bundles_in(server, bucket)
        head = server.client().head_object(Bucket=bucket, Key=obj["Key"])
        assert head["ServerSideEncryption"] == "AES256"

        def on_disk(needle: bytes) -> bool:
            for root, _, files in os.walk(server.root / "data"):
                for f in files:
                    try:
                        if needle in (Path(root) / f).read_bytes():
                            return True
                    except OSError:
                        pass
            return False

        control = secrets.token_bytes(32)   # the search works: a plain object is found
        server.client().put_object(Bucket=bucket, Key="control", Body=control * 4)
        assert on_disk(control) and not on_disk(marker)
        assert cli(inst, env, "recall", made[0].study_uid)["ok"] and site_state(inst) == before
    finally:
        server.stop()
