"""Migrate and recall in-process against moto's S3 (fast; the real-server tests
are in tests/integration/test_tiering_s3.py). moto does not check checksums,
so the tier verifies by reading back."""
from __future__ import annotations

import hashlib

import boto3
import pytest
from moto import mock_aws

from archive.config.schema import S3TierSettings
from tests.support.dataset import make_varied_study
from tests.support.tiering import Install
from tiers.migrate import Migrator
from tiers.recall import Recaller
from tiers.s3 import S3Backend


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="pv-unit")
        inst = Install.create(tmp_path / "pv")
        made = make_varied_study(tmp_path / "in", per_kind=1, size=10_000)
        inst.ingest(made)
        s = inst.settings
        cfg = S3TierSettings(bucket="pv-unit", prefix="t", verify="readback")
        tier = S3Backend("objects", cfg)
        tier.initialize()
        settings = s.model_copy(update={"objects": s.objects.model_copy(
            update={"kind": "s3", "s3": cfg})})
        yield inst, made, settings, tier


def files(inst):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in inst.site_files()}


def test_migrate_then_recall_round_trip(env):
    inst, made, settings, tier = env
    before = files(inst)
    catalog = inst.catalog()
    try:
        report = Migrator(catalog, inst.sites(), tier, settings).run([made[0].study_uid])
        assert report.ok and report.studies[0].bundled == len(made)
        assert files(inst) == {}
        keys = [o.key for o in tier.list("bundles")]
        assert len(keys) == 1 and keys[0].endswith(".pvb")
        r = Recaller(catalog, inst.sites(), tier).recall(made[0].study_uid)
        assert r.ok and r.recalled == len(made) and files(inst) == before
        # recalled then migrated again: verified, not uploaded again
        again = Migrator(catalog, inst.sites(), tier, settings).run([made[0].study_uid])
        assert again.studies[0].outcome == "verified" and again.studies[0].stored_bytes == 0
    finally:
        catalog.close()


def test_dry_run_changes_nothing(env):
    inst, made, settings, tier = env
    before = files(inst)
    catalog = inst.catalog()
    try:
        report = Migrator(catalog, inst.sites(), tier, settings).run([made[0].study_uid],
                                                                     dry_run=True)
        assert report.dry_run and report.studies[0].outcome == "planned"
        assert report.studies[0].instances == len(made) and report.studies[0].bytes > 0
        assert files(inst) == before and list(tier.list("bundles")) == []
    finally:
        catalog.close()


def test_sse_kms_headers_reach_the_store(env):
    inst, made, settings, _ = env
    cfg = S3TierSettings(bucket="pv-unit", prefix="kms", verify="readback", sse="aws:kms",
                         kms_key_id="alias/pacsvault", storage_class="STANDARD_IA")
    tier = S3Backend("objects", cfg)
    tier.initialize()
    catalog = inst.catalog()
    try:
        assert Migrator(catalog, inst.sites(), tier, settings).run([made[0].study_uid]).ok
    finally:
        catalog.close()
    [key] = [o.key for o in tier.list("bundles")]
    head = boto3.client("s3", region_name="us-east-1").head_object(Bucket="pv-unit", Key="kms/" + key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"].endswith("alias/pacsvault") and head["StorageClass"] == "STANDARD_IA"


def test_a_run_aborts_multipart_uploads_left_by_a_crash(env):
    """moto dates every upload 2010, so it counts as stale; the 24 h threshold
    itself is tested on SeaweedFS (tests/conformance/test_s3_backend.py)."""
    inst, made, settings, tier = env
    raw = boto3.client("s3", region_name="us-east-1")
    raw.create_multipart_upload(Bucket="pv-unit", Key="t/bundles/aa/bb/1.2/x.pvb")
    catalog = inst.catalog()
    try:
        assert Migrator(catalog, inst.sites(), tier, settings).run([made[0].study_uid]).ok
    finally:
        catalog.close()
    assert raw.list_multipart_uploads(Bucket="pv-unit").get("Uploads", []) == []
