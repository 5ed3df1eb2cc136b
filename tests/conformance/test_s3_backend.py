"""What only an object store has, on S3 over moto and over a real SeaweedFS
(marker ``needs_s3``); the Backend contract every backend keeps, this one
included, is tests/conformance/test_backend.py.

The S3-only tests cover ranged reads past the end, metadata, prefixes,
multipart uploads, lost races and the upload sweep. The SeaweedFS-only tests
cover what moto does not model: server-side checksum checks, Object Lock,
versioning and a connection cut mid-upload.
"""
# ruff: noqa: F811  (a test naming a fixture it imports is how pytest finds it)
from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

from tests.support.dropproxy import DropProxy
from tests.support.s3fixtures import (
    BIG,
    KEY,
    MULTIPART,
    PREFIX,
    Bytes,
    MiB,
    flip,
    nothing_left,
    rand,
    s3store,  # noqa: F401  (a fixture)
    seaweed,  # noqa: F401  (a fixture)
    weed,  # noqa: F401  (a fixture)
)
from tiers.backend import (
    BackendError,
    CopyCorrupt,
    ObjectExists,
    ObjectNotFound,
    Unavailable,
)
from tiers.s3 import MARKER, ObjectLocked, S3Backend, S3Settings


class Faulty:
    """A boto3 client wrapper that injects one kind of fault; ``fired`` counts
    them, so a test proves its fault happened (kopia's VerifyAllFaultsExercised)."""

    def __init__(self, inner, *, flip_upload=False, flip_download=False, lie_checksum=False,
                 hide_once=False):
        self._inner = inner
        self.flip_upload, self.flip_download = flip_upload, flip_download
        self.lie_checksum, self.hide_once = lie_checksum, hide_once
        self.fired: Counter = Counter()
        self.calls: Counter = Counter()
        self.last: dict = {}  # op -> kwargs of its latest call

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _upload(self, op, kw):
        self.calls[op] += 1
        self.last[op] = dict(kw)
        if self.flip_upload:  # after our hashing: bytes changed on the way
            kw["Body"] = flip(kw["Body"], len(kw["Body"]) // 2)
            self.fired[op] += 1
        return getattr(self._inner, op)(**kw)

    def put_object(self, **kw):
        return self._upload("put_object", kw)

    def upload_part(self, **kw):
        return self._upload("upload_part", kw)

    def get_object(self, **kw):
        self.calls["get_object"] += 1
        r = self._inner.get_object(**kw)
        if self.flip_download:  # bit rot seen on read-back
            r["Body"] = io.BytesIO(flip(r["Body"].read()))
            self.fired["get_object"] += 1
        return r

    def head_object(self, **kw):
        if self.hide_once:  # a writer racing us: HEAD says absent, then it exists
            self.hide_once = False
            self.fired["head_object"] += 1
            raise ClientError({"Error": {"Code": "404", "Message": "Not Found"},
                               "ResponseMetadata": {"HTTPStatusCode": 404}}, "HeadObject")
        r = self._inner.head_object(**kw)
        if self.lie_checksum and r.get("ChecksumSHA256"):
            v = base64.b64decode(r["ChecksumSHA256"].split("-")[0])
            r["ChecksumSHA256"] = base64.b64encode(flip(v)).decode()
            self.fired["head_object"] += 1
        return r


# == S3 on moto and SeaweedFS =========================================================
def test_multipart_is_verified_and_idempotent_without_reupload(s3store):
    be = s3store.make(**MULTIPART)
    data = rand(BIG)
    be.put(KEY, Bytes(data))
    head = s3store.raw.head_object(Bucket=s3store.bucket, Key=PREFIX + KEY, ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")
    if s3store.kind == "seaweed":  # moto drops the "-N"; AWS and SeaweedFS keep it
        digests = b"".join(hashlib.sha256(data[i:i + 5 * MiB]).digest()
                           for i in range(0, BIG, 5 * MiB))
        want = base64.b64encode(hashlib.sha256(digests).digest()).decode() + "-3"
        assert head["ChecksumSHA256"] == want
    counting = Faulty(be.client)
    be.client = counting
    be.put(KEY, Bytes(data))
    assert counting.calls["upload_part"] == 0 and counting.calls["put_object"] == 0


def test_multipart_memory_is_bounded(s3store):
    """The payload is never read more than (max_concurrency + 1) parts ahead of
    the parts already uploaded: a 500 MB study never sits in memory."""
    part, conc = 5 * MiB, 2
    payload = Bytes(rand(8 * part + 1))
    read = {"bytes": 0}
    real_open = payload.open

    def counting_open():
        inner = real_open()

        class Counting(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                n = inner.readinto(b)
                read["bytes"] += n
                return n
        return Counting()
    payload.open = counting_open

    class Watch:
        def __init__(self, inner):
            self.inner, self.done, self.ahead, self.parts = inner, 0, 0, 0
            self.lock = threading.Lock()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def upload_part(self, **kw):
            with self.lock:
                self.parts += 1
                self.ahead = max(self.ahead, read["bytes"] - self.done * part)
            r = self.inner.upload_part(**kw)
            with self.lock:
                self.done += 1
            return r
    watch = None

    def wrap(c):
        nonlocal watch
        watch = Watch(c)
        return watch
    be = s3store.make(wrap=wrap, multipart_threshold=part, part_size=part, max_concurrency=conc)
    be.put(KEY, payload)
    assert watch.parts == 9
    assert part <= watch.ahead <= (conc + 1) * part


def test_ranged_read_past_the_end_is_caught_and_empty_ranges_refused(s3store):
    """S3 answers a range past the end short (the contract's generic cases are in
    test_backend.py); HTTP cannot ask for zero bytes."""
    be = s3store.make()
    be.put(KEY, Bytes(b"0123456789"))
    with pytest.raises(BackendError, match="past the end"):
        be.open_range(KEY, 5, 10)  # S3 would answer 5 bytes: a short read
    with pytest.raises(ValueError):
        be.open_range(KEY, 0, 0)


def test_keys_stay_under_the_prefix_and_metadata_holds_no_phi(s3store):
    be = s3store.make()
    be.put(KEY, Bytes(b"payload"))
    keys = [o["Key"] for o in s3store.raw.list_objects_v2(Bucket=s3store.bucket)["Contents"]]
    assert sorted(keys) == sorted([PREFIX + MARKER, PREFIX + KEY])
    head = s3store.raw.head_object(Bucket=s3store.bucket, Key=PREFIX + KEY)
    assert head["Metadata"] == {"sha256": hashlib.sha256(b"payload").hexdigest(), "size": "7"}


@pytest.mark.parametrize("size", [1000, BIG], ids=["single", "multipart"])
def test_bytes_changed_in_transit_are_never_kept(s3store, size):
    """SeaweedFS refuses the body (BadDigest); moto keeps it and read-back catches it."""
    fault = None

    def wrap(c):
        nonlocal fault
        fault = Faulty(c, flip_upload=True)
        return fault
    be = s3store.make(wrap=wrap, **MULTIPART)
    with pytest.raises(CopyCorrupt):
        be.put(KEY, Bytes(rand(size)))
    assert sum(fault.fired.values()) >= 1
    nothing_left(s3store)


def test_failed_verification_deletes_the_copy(s3store):
    fault = None

    def wrap(c):
        nonlocal fault
        fault = Faulty(c, flip_download=True, lie_checksum=True)
        return fault
    be = s3store.make(wrap=wrap)
    with pytest.raises(CopyCorrupt):
        be.put(KEY, Bytes(b"good bytes, badly read back"))
    assert sum(fault.fired.values()) >= 1
    nothing_left(s3store)


@pytest.mark.parametrize("size", [1000, BIG], ids=["single", "multipart"])
def test_lost_race_is_settled_by_content(s3store, size):
    """HEAD says absent, then If-None-Match finds the other writer's object."""
    be = s3store.make(**MULTIPART)
    theirs = rand(size)
    be.put(KEY, Bytes(theirs))
    be.client = Faulty(be.client, hide_once=True)
    with pytest.raises(ObjectExists):
        be.put(KEY, Bytes(rand(size)))
    be.client.hide_once = True
    be.put(KEY, Bytes(theirs))  # identical: success
    assert be.client.fired["head_object"] == 2
    assert hashlib.sha256(be.open(KEY).read()).digest() == hashlib.sha256(theirs).digest()
    assert s3store.open_uploads() == []


def test_health_marker_and_settings(s3store):
    be = s3store.make(name="tier-a")
    assert be.health().ok
    with pytest.raises(BackendError, match="belongs to"):
        S3Backend("tier-b", be.settings).initialize()
    elsewhere = S3Backend("tier-c", S3Settings(**{**be.settings.__dict__, "prefix": "other/"}))
    h = elsewhere.health()
    assert not h.ok and MARKER in h.reason


def test_missing_credentials_and_bad_settings_are_config_errors(monkeypatch):
    from archive.errors import ConfigError

    monkeypatch.delenv("PV_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="PV_NO_SUCH_KEY"):
        S3Backend("x", S3Settings(bucket="b", access_key_env="PV_NO_SUCH_KEY",
                                  secret_key_env="PV_NO_SUCH_KEY"))
    for bad in [dict(sse="rot13"), dict(object_lock_mode="COMPLIANCE"),
                dict(object_lock_mode="COMPLIANCE", retain_days=1, checksum="none"),
                dict(part_size=MiB), dict(prefix="../up"), dict(checksum="crc32")]:
        with pytest.raises((ConfigError, ValueError)):   # ValueError: pydantic's, from the config model
            S3Settings(bucket="b", **bad)


def test_sweep_aborts_stale_uploads_under_the_prefix_only(s3store):
    raw, bucket = s3store.raw, s3store.bucket
    mine = raw.create_multipart_upload(Bucket=bucket, Key=PREFIX + "objects/x")["UploadId"]
    other = raw.create_multipart_upload(Bucket=bucket, Key="someone-else/y")["UploadId"]
    later = s3store.make(clock=lambda: datetime.now(timezone.utc) + timedelta(days=2))
    assert later.sweep_uploads() == 1
    left = raw.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other] and mine != other
    raw.abort_multipart_upload(Bucket=bucket, Key="someone-else/y", UploadId=other)


# == SeaweedFS only: what moto does not model ========================================
def test_server_refuses_a_wrong_sha256(weed):
    raw, bucket = weed.raw, weed.bucket
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with pytest.raises(ClientError) as e:
        raw.put_object(Bucket=bucket, Key="k", Body=b"payload", ChecksumAlgorithm="SHA256",
                       ChecksumSHA256=wrong)
    assert e.value.response["Error"]["Code"] == "BadDigest"
    mp = raw.create_multipart_upload(Bucket=bucket, Key="m", ChecksumAlgorithm="SHA256")
    with pytest.raises(ClientError) as e:
        raw.upload_part(Bucket=bucket, Key="m", UploadId=mp["UploadId"], PartNumber=1,
                        Body=b"part", ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong)
    assert e.value.response["Error"]["Code"] == "BadDigest"
    raw.abort_multipart_upload(Bucket=bucket, Key="m", UploadId=mp["UploadId"])
    nothing_left(weed)
    ok = base64.b64encode(hashlib.sha256(b"payload").digest()).decode()
    raw.put_object(Bucket=bucket, Key="k", Body=b"payload", ChecksumAlgorithm="SHA256",
                   ChecksumSHA256=ok)
    assert raw.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")["ChecksumSHA256"] == ok


def test_md5_mode_and_readback_mode(weed):
    """checksum='md5' is what Ceph RGW checks; then only a read-back verifies."""
    fault = None

    def wrap(c):
        nonlocal fault
        fault = Faulty(c)
        return fault
    be = weed.make(checksum="md5", wrap=wrap)
    be.put(KEY, Bytes(b"ceph style"))
    sent = fault.last["put_object"]
    assert "ContentMD5" in sent and "ChecksumSHA256" not in sent
    assert fault.calls["get_object"] == 1  # no server SHA-256 to trust: read back
    assert be.open(KEY).read() == b"ceph style"
    be2 = weed.make(verify="readback", wrap=wrap, **MULTIPART)
    be2.put("objects/big.dcm", Bytes(rand(BIG)))
    assert fault.calls["get_object"] == 1 and fault.calls["upload_part"] == 3
    assert weed.open_uploads() == []


def test_sse_s3(weed):
    be = weed.make(sse="AES256")
    be.put(KEY, Bytes(b"encrypted at rest"))
    head = weed.raw.head_object(Bucket=weed.bucket, Key=PREFIX + KEY)
    assert head.get("ServerSideEncryption") == "AES256"
    assert be.open(KEY).read() == b"encrypted at rest"


def _version(weed, key=KEY) -> str:
    return weed.raw.head_object(Bucket=weed.bucket, Key=PREFIX + key)["VersionId"]


def test_versioned_delete_leaves_a_delete_marker(weed):
    bucket = weed.server.create_bucket(versioning=True)
    weed.bucket = bucket
    be = weed.make(bucket=bucket)
    be.put(KEY, Bytes(b"v1"))
    v1 = _version(weed)
    be.delete(KEY)
    with pytest.raises(ObjectNotFound):
        be.open(KEY)
    assert list(be.list()) == []
    versions = weed.raw.list_object_versions(Bucket=bucket, Prefix=PREFIX + KEY)
    assert [v["VersionId"] for v in versions["Versions"]] == [v1]
    assert len(versions["DeleteMarkers"]) == 1
    got = weed.raw.get_object(Bucket=bucket, Key=PREFIX + KEY, VersionId=v1)["Body"].read()
    assert got == b"v1"  # still there, as a noncurrent version
    be.delete(KEY, version_id=v1)  # not locked: really gone
    be.put(KEY, Bytes(b"v2"))  # the key is free again
    assert be.open(KEY).read() == b"v2"


@pytest.mark.parametrize("mode", ["COMPLIANCE", "GOVERNANCE"])
def test_object_lock_keeps_the_version(weed, mode):
    bucket = weed.server.create_bucket(object_lock=True)
    weed.bucket = bucket
    t0 = datetime.now(timezone.utc)
    be = weed.make(bucket=bucket, object_lock_mode=mode, retain_days=1)
    be.put(KEY, Bytes(b"worm"))
    head = weed.raw.head_object(Bucket=bucket, Key=PREFIX + KEY)
    assert head["ObjectLockMode"] == mode
    until = head["ObjectLockRetainUntilDate"]
    assert timedelta(hours=23) < until - t0 < timedelta(hours=25)
    v = head["VersionId"]
    with pytest.raises(ObjectLocked):
        be.delete(KEY, version_id=v)
    with pytest.raises(ClientError):  # nor can the retention be shortened
        weed.raw.put_object_retention(Bucket=bucket, Key=PREFIX + KEY, VersionId=v,
                                      Retention={"Mode": mode, "RetainUntilDate": t0})
    be.delete(KEY)  # allowed: only a delete marker
    with pytest.raises(ObjectNotFound):
        be.open(KEY)
    assert weed.raw.get_object(Bucket=bucket, Key=PREFIX + KEY,
                               VersionId=v)["Body"].read() == b"worm"
    bypass = dict(Bucket=bucket, Key=PREFIX + KEY, VersionId=v, BypassGovernanceRetention=True)
    if mode == "COMPLIANCE":
        with pytest.raises(ClientError):
            weed.raw.delete_object(**bypass)
    else:  # GOVERNANCE yields to anyone allowed to bypass: our own credentials here
        weed.raw.delete_object(**bypass)


def test_bad_copy_under_object_lock_is_reported_and_left(weed):
    bucket = weed.server.create_bucket(object_lock=True)
    weed.bucket = bucket
    be = weed.make(bucket=bucket, object_lock_mode="COMPLIANCE", retain_days=1,
                   wrap=lambda c: Faulty(c, lie_checksum=True))
    with pytest.raises(CopyCorrupt, match="Object Lock"):
        be.put(KEY, Bytes(b"cannot be removed"))
    assert weed.raw.head_object(Bucket=bucket, Key=PREFIX + KEY)["ObjectLockMode"] == "COMPLIANCE"


@pytest.mark.parametrize("size", [2 * MiB, BIG], ids=["single", "multipart"])
def test_connection_cut_mid_upload(weed, size):
    """Every connection is reset after 256 KiB upstream: uploads fail however
    often botocore retries them, small requests (the abort) get through."""
    with DropProxy(weed.server.s3_port) as proxy:
        be = weed.make(endpoint_url=proxy.endpoint, max_attempts=2, **MULTIPART)
        proxy.budget = 256 * 1024
        data = rand(size)
        with pytest.raises(Unavailable):
            be.put(KEY, Bytes(data))
        assert proxy.drops >= 2  # the first try and botocore's retry both cut
        nothing_left(weed)
        proxy.heal()
        be.put(KEY, Bytes(data))
        assert hashlib.sha256(be.open(KEY).read()).hexdigest() == hashlib.sha256(data).hexdigest()
        assert weed.open_uploads() == []


def test_endpoint_down(weed):
    proxy = DropProxy(weed.server.s3_port)
    be = weed.make(endpoint_url=proxy.endpoint, max_attempts=2, connect_timeout=1)
    proxy.close()
    with pytest.raises(Unavailable):
        be.put(KEY, Bytes(b"x"))
    with pytest.raises(Unavailable):
        be.open(KEY)
    h = be.health()
    assert not h.ok and "unavailable" in h.reason
