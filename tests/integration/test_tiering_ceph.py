"""Optional compatibility run against Ceph RADOS Gateway (docs/operations/object-tier.md).

Runs only when PACSVAULT_TEST_CEPH_ENDPOINT names a running RGW (for instance the
one ../shared/tools/ceph-single-node.sh starts, keys testing/testingsecret); it
is skipped otherwise, in CI too: a one-node Ceph needs ~500 MiB and root.
RGW ignores x-amz-checksum-sha256, so the tier uses Content-MD5 and verifies
each bundle by reading it back.
"""
from __future__ import annotations

import json
import os
import uuid

import boto3
import pytest

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install, site_state

ENDPOINT = os.environ.get("PACSVAULT_TEST_CEPH_ENDPOINT")
pytestmark = pytest.mark.skipif(not ENDPOINT, reason="PACSVAULT_TEST_CEPH_ENDPOINT not set")
KEYS = {"PV_CEPH_KEY": os.environ.get("PACSVAULT_TEST_CEPH_KEY", "testing"),
        "PV_CEPH_SECRET": os.environ.get("PACSVAULT_TEST_CEPH_SECRET", "testingsecret")}




def test_migrate_and_recall_on_ceph_rgw(tmp_path):
    bucket = f"pv-ceph-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=ENDPOINT, region_name="us-east-1",
                 aws_access_key_id=KEYS["PV_CEPH_KEY"],
                 aws_secret_access_key=KEYS["PV_CEPH_SECRET"]).create_bucket(Bucket=bucket)
    inst = Install.create(tmp_path / "pv")
    text = inst.config.read_text().replace('kind = "directory"', 'kind = "s3"')
    text += (f"\n[objects.s3]\nbucket = '{bucket}'\nendpoint_url = '{ENDPOINT}'\n"
             "access_key_env = 'PV_CEPH_KEY'\nsecret_key_env = 'PV_CEPH_SECRET'\n"
             "checksum = 'md5'\nmultipart_threshold = 6291456\npart_size = 5242880\n")
    inst.config.write_text(text)
    run_cli(inst.config, "init", "--config", str(inst.config), env=KEYS)
    made = make_varied_study(tmp_path / "v", per_kind=1, size=30_000) + \
        make_ct_series(tmp_path / "ct", 14, size=512 * 1024)
    inst.ingest(made)
    before = site_state(inst)
    for study in {m.study_uid for m in made}:
        r = json.loads(run_cli(inst.config, "migrate", "--study", study, "--json", env=KEYS).stdout)
        assert r["ok"] and r["studies"][0]["outcome"] == "migrated"
    assert site_state(inst) == {}
    for study in {m.study_uid for m in made}:
        rc = json.loads(run_cli(inst.config, "recall", study, "--json", env=KEYS).stdout)
        assert rc["ok"]
    assert site_state(inst) == before
