"""The Backend contract (tiers/backend.py), one test body for every backend: the
filesystem site, S3 on moto, and S3 on a real SeaweedFS (marker ``needs_s3``).

Durable and verified puts, nothing visible after a failed one (restic's
TestSaveWrongHash), never clobbering without ``replace``, a missing key is
ObjectNotFound, unsafe keys refused before anything is touched, exact ranged
reads. What only one kind of backend has is tested beside it:
tests/conformance/test_s3_backend.py (multipart, Object Lock, retries, upload
sweep) and tests/unit/test_fs_backend.py (disk full, marker, temp sweep).
"""
# ruff: noqa: F811  (a test naming a fixture it imports is how pytest finds it)
from __future__ import annotations

import hashlib

import pytest

from tests.support.s3fixtures import (
    BIG,
    KEY,
    MULTIPART,
    Bytes,
    nothing_left,
    rand,
    seaweed,  # noqa: F401  (a fixture)
    store,  # noqa: F401  (a fixture)
)
from tiers.backend import (
    BackendError,
    CopyCorrupt,
    ObjectExists,
    ObjectNotFound,
    RangedReader,
)


def test_put_open_stat_list_delete(store):
    be = store.make()
    info = be.put(KEY, Bytes(b"hello"))
    assert info.size == 5 and info.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert info.key == KEY
    with be.open(KEY) as f:
        assert f.read() == b"hello"
    assert be.stat(KEY).size == 5
    assert [o.key for o in be.list()] == [KEY]
    assert [o.size for o in be.list("objects/aa")] == [5]
    be.delete(KEY)
    be.delete(KEY)  # idempotent
    with pytest.raises(ObjectNotFound):
        be.open(KEY)
    with pytest.raises(ObjectNotFound):
        be.stat(KEY)
    assert list(be.list()) == []
    nothing_left(store)
    assert be.health().ok


def test_empty_object(store):
    be = store.make()
    be.put(KEY, Bytes(b""))
    assert be.open(KEY).read() == b"" and be.stat(KEY).size == 0


def test_same_content_is_idempotent_different_content_never_replaces(store):
    be = store.make()
    be.put(KEY, Bytes(b"first"))
    be.put(KEY, Bytes(b"first"))
    with pytest.raises(ObjectExists):
        be.put(KEY, Bytes(b"second"))
    assert be.open(KEY).read() == b"first"
    be.put(KEY, Bytes(b"second"), replace=True)  # the repair path only
    assert be.open(KEY).read() == b"second"
    be.put(KEY, Bytes(b"second"), replace=True)  # replacing with the same bytes
    assert be.open(KEY).read() == b"second"
    assert [o.key for o in be.list()] == [KEY]
    assert store.open_uploads() == []


@pytest.mark.parametrize("size", [7, BIG], ids=["single", "multipart"])
def test_wrong_hash_leaves_nothing_visible(store, size):
    be = store.make(**MULTIPART)
    with pytest.raises(CopyCorrupt):
        be.put(KEY, Bytes(rand(size), sha256="0" * 64))
    with pytest.raises(ObjectNotFound):
        be.stat(KEY)
    nothing_left(store)


def test_wrong_hash_with_replace_does_not_publish_the_bad_bytes(store):
    """Bytes that do not match their SHA-256 are refused before they replace anything."""
    be = store.make()
    be.put(KEY, Bytes(b"old"))
    with pytest.raises(CopyCorrupt):
        be.put(KEY, Bytes(b"new bytes", sha256="0" * 64), replace=True)
    assert be.open(KEY).read() == b"old"
    assert store.open_uploads() == []


@pytest.mark.parametrize("size", [10, BIG], ids=["single", "multipart"])
def test_short_or_long_source_is_an_error(store, size):
    be = store.make(**MULTIPART)
    data = rand(size)

    class Lying(Bytes):
        claimed = 0

        @property
        def size(self):
            return self.claimed

    for claimed in (size + 100, size - 3):
        p = Lying(data)
        p.claimed = claimed
        with pytest.raises(BackendError):
            be.put(KEY, p)
    nothing_left(store)


HOSTILE = ["../escape.dcm", "/etc/passwd", "objects/../../x", "a\x00b"]
# Names a filesystem would quietly normalise and S3 would keep as they are: the
# same key could then mean two objects, or two keys one.
MANGLED = ["objects//x", "objects/./x", "objects/x/", "a\nb", "", "x" * 1000]


@pytest.mark.parametrize("key", HOSTILE + MANGLED)
def test_unsafe_keys_refused(store, key):
    be = store.make()
    with pytest.raises(BackendError):
        be.put(key, Bytes(b"x"))
    for op in (be.open, be.stat, be.delete):
        with pytest.raises(BackendError):
            op(key)
    with pytest.raises(BackendError):
        be.delete_many([key])
    with pytest.raises(BackendError):
        be.verify(key, hashlib.sha256(b"x").hexdigest(), 1)
    with pytest.raises(BackendError):
        be.open_range(key, 0, 1)
    with pytest.raises(BackendError):
        list(be.list("../"))
    nothing_left(store)


def test_large_object(store):
    be = store.make(**MULTIPART)
    data = rand(BIG)
    info = be.put(KEY, Bytes(data))
    assert info.size == BIG
    assert be.stat(KEY).size == BIG
    assert hashlib.sha256(be.open(KEY).read()).hexdigest() == info.sha256
    assert [o.key for o in be.list()] == [KEY]
    be.put(KEY, Bytes(data))  # idempotent
    assert store.open_uploads() == []


def test_list_prefix_names_a_directory(store):
    be = store.make()
    be.put("objects/aa/x.dcm", Bytes(b"1"))
    be.put("objects/aab/y.dcm", Bytes(b"2"))
    assert sorted(o.key for o in be.list("objects/aa")) == ["objects/aa/x.dcm"]
    assert sorted(o.key for o in be.list("objects/aa/")) == ["objects/aa/x.dcm"]
    assert sorted(o.key for o in be.list()) == ["objects/aa/x.dcm", "objects/aab/y.dcm"]
    assert list(be.list("objects/zz")) == []


def test_delete_many_is_idempotent(store):
    be = store.make()
    keys = [f"objects/aa/{i}.dcm" for i in range(3)]
    for i, k in enumerate(keys):
        be.put(k, Bytes(b"%d" % i))
    be.delete_many([keys[0], keys[2], "objects/aa/never.dcm"])
    assert [o.key for o in be.list()] == [keys[1]]
    be.delete_many([keys[0], keys[2]])  # already gone
    be.delete_many([])
    assert be.open(keys[1]).read() == b"1"
    be.delete_many([keys[1]])
    assert list(be.list()) == []
    nothing_left(store)


def test_verify_reads_what_is_stored(store):
    be = store.make()
    data = b"verified bytes"
    good = hashlib.sha256(data).hexdigest()
    info = be.put(KEY, Bytes(data))
    assert be.verify(KEY, good, len(data), checksum=info.checksum, version_id=info.version_id)
    assert be.verify(KEY, good, len(data))
    assert not be.verify(KEY, hashlib.sha256(b"other").hexdigest(), len(data))
    assert not be.verify(KEY, good, len(data) + 1)
    store.tamper(be, KEY, data[:-1] + b"X")  # bit rot behind the backend's back
    assert not be.verify(KEY, good, len(data))
    with pytest.raises(ObjectNotFound):
        be.verify("objects/aa/never.dcm", good, len(data))


def test_health_says_ok_when_initialized(store):
    h = store.make().health()
    assert h.ok and h.reason == "ok"


def test_missing_keys_are_object_not_found(store):
    be = store.make()
    missing = "objects/aa/never.dcm"
    for op in (be.open, be.stat):
        with pytest.raises(ObjectNotFound):
            op(missing)
    with pytest.raises(ObjectNotFound):
        be.open_range(missing, 0, 1)
    be.delete(missing)  # idempotent: nothing to do is success
    be.delete_many([missing])


def test_ranged_reads_are_exact_or_an_error(store):
    be = store.make(**MULTIPART)
    assert isinstance(be, RangedReader)
    data = rand(BIG)
    be.put(KEY, Bytes(data))
    for off, n in [(0, 10), (5 * 1024 * 1024 - 3, 6), (BIG - 7, 7), (0, BIG), (123, 1)]:
        with be.open_range(KEY, off, n) as f:
            assert f.read() == data[off:off + n]
    with pytest.raises(BackendError):
        be.open_range(KEY, BIG - 5, 10)  # S3 would answer 5 bytes: a short read
    with pytest.raises(BackendError):
        be.open_range(KEY, BIG + 10, 1)
    with pytest.raises(ObjectNotFound):
        be.open_range("objects/none.dcm", 0, 1)
    # Never a short or shifted read: an error (S3 raises ValueError before asking).
    for off, n in ((BIG - 2, 5), (-1, 2), (BIG + 1, 0)):
        with pytest.raises((BackendError, ValueError)):
            be.open_range(KEY, off, n)
