"""A backend on an S3-compatible bucket: the long-term object tier.

It keeps the contract of tiers.backend (the one FilesystemBackend keeps), with
S3 means instead of fsync and rename:

* Every key lives under ``settings.prefix``; keys are fenced like file paths
  (no ``..``, no leading ``/``, no control characters), so a configured prefix
  can never be escaped.
* ``put`` hashes the payload while streaming it and never makes known-bad bytes
  visible: a single PUT (below ``multipart_threshold``) is hashed before it is
  sent; a multipart upload is hashed part by part and completed only when the
  whole-object SHA-256 matches. The server is asked to check what arrived
  (``x-amz-checksum-sha256`` per object or per part, or Content-MD5 for servers
  such as Ceph RGW that ignore SHA-256 headers). After the upload the object is
  verified: ``verify="checksum"`` trusts the SHA-256 the server computed
  (HEAD with ChecksumMode=ENABLED; for multipart the composite
  ``sha256(part digests)-N`` computed locally), and falls back to reading the
  object back when the server returns no checksum; ``verify="readback"``
  always reads it back. A mismatch raises CopyCorrupt after deleting the
  version just written (Object Lock retention may forbid that: then the
  message says it was left in place).
* A failed multipart upload is aborted, so no parts linger; ``sweep_uploads``
  removes what a crash left behind (parts may hold patient data).
* Without ``replace``, an existing key is never overwritten: identical SHA-256
  is success (idempotent), different content raises ObjectExists. The check is
  a HEAD first (no re-upload of an intact copy) and ``If-None-Match: *`` on the
  write itself, which closes the race between two writers.
* Object metadata holds only ``sha256`` and ``size``: never patient data.
* Every botocore error is classified in one place (``_errors``): retryable
  (connection, 5xx, throttling) -> Unavailable, 404 -> ObjectNotFound,
  412 -> ObjectExists, BadDigest -> CopyCorrupt, AccessDenied on a versioned
  delete -> ObjectLocked, anything else -> BackendError. botocore itself
  retries with backoff (mode "standard", ``max_attempts``) before we see it.

Memory is bounded by ``multipart_threshold`` for a single PUT and by
``(max_concurrency + 1) * part_size`` for a multipart upload.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
)

from archive import failpoints
from archive.clock import Clock, utcnow
from archive.config.schema import S3Settings
from archive.errors import ConfigError
from archive.object_names import is_safe_key
from tiers.backend import (
    BackendError,
    CopyCorrupt,
    ObjectExists,
    ObjectInfo,
    ObjectLocked,
    ObjectNotFound,
    Payload,
    SiteHealth,
    StreamingPayload,
    Unavailable,
)
from tiers.layout import LAYOUT_VERSION

log = logging.getLogger("pacsvault.tiers.s3")

MiB = 1024 * 1024
MARKER = "PACSVAULT-SITE.json"
MIN_PART = 5 * MiB          # S3's smallest part (except the last)
MAX_PARTS = 10_000          # S3's largest part count
READ_CHUNK = MiB

_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
              "TooManyRequests", "RequestTimeout", "ServiceUnavailable", "InternalError"}
_BAD_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}


# Settings: one model, the config's [objects.s3] (archive/config/schema.py: S3Settings).


def make_client(settings: S3Settings, environ: dict[str, str] | None = None):
    """A boto3 S3 client for these settings (thread-safe; shared by parts)."""
    env = os.environ if environ is None else environ
    creds: dict[str, str] = {}
    if settings.access_key_env or settings.secret_key_env:
        ak, sk = env.get(settings.access_key_env), env.get(settings.secret_key_env)
        if not ak or not sk:
            raise ConfigError(f"s3: set {settings.access_key_env} and "
                              f"{settings.secret_key_env} in the environment")
        creds = {"aws_access_key_id": ak, "aws_secret_access_key": sk}
    config = Config(
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=max(10, settings.max_concurrency + 2),
        # We send the checksums we choose. botocore's automatic CRC32 (and its
        # aws-chunked trailers) breaks older Ceph/MinIO and checks nothing we need.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # UNSIGNED-PAYLOAD even on http: botocore would otherwise hash every byte
        # once more to sign it, while x-amz-checksum-sha256 (or Content-MD5) on
        # each request already makes the server check the bytes it received.
        s3={"addressing_style": "path" if settings.path_style else "auto",
            "payload_signing_enabled": settings.checksum == "none"},
    )
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                        config=config, **creds)


def _version_of(response: dict) -> str | None:
    # An unversioned bucket may answer "null"; moto then refuses it as a VersionId.
    v = response.get("VersionId")
    return v if v and v != "null" else None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _streaming(payload: Payload) -> bool:
    return isinstance(payload, StreamingPayload) and payload.streaming


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Up to n bytes; fewer only at end of stream (read() may return short)."""
    chunks, got = [], 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Body(io.RawIOBase):
    """A GET response body whose read errors are classified like every other call."""

    def __init__(self, backend: "S3Backend", key: str, stream: Any) -> None:
        self._backend, self._key, self._stream = backend, key, stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        with self._backend._errors("read", self._key):
            data = self._stream.read(len(b))  # botocore raises on a short body
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


# -- the backend -----------------------------------------------------------------
class S3Backend:
    def __init__(self, name: str, settings: S3Settings, *, client: Any = None,
                 clock: Clock = utcnow) -> None:
        self.name = name
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.key_prefix
        self.client = client if client is not None else make_client(settings)
        self._clock = clock

    # -- error classification (the one place) ------------------------------------
    @contextmanager
    def _errors(self, op: str, key: str = "", *, locked: bool = False) -> Iterator[None]:
        """Turn whatever boto3 raises into our errors. ``locked``: an AccessDenied
        is Object Lock refusing to delete a version (it says no more than that)."""
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            what = f"{key} ({code or status})" if key else (code or str(status))
            if code == "NoSuchBucket":
                raise BackendError(op, self.name, f"bucket {self.bucket} does not exist") from None
            if status == 404 or code in ("NoSuchKey", "NotFound", "NoSuchVersion"):
                raise ObjectNotFound(op, self.name, key) from None
            if status == 412 or code == "PreconditionFailed":
                raise ObjectExists(op, self.name, key) from None
            if status == 416 or code == "InvalidRange":
                raise BackendError(op, self.name, f"{key}: range starts past the end") from None
            if code in _BAD_DIGEST:  # the server refused bytes that changed on the way
                raise CopyCorrupt(op, self.name, what) from None
            if status >= 500 or status == 429 or code in _THROTTLED:
                raise Unavailable(op, self.name, what) from None
            if locked and code == "AccessDenied":
                raise ObjectLocked(op, self.name, key) from None
            raise BackendError(op, self.name, what) from None
        except (ConnectionError, HTTPClientError, IncompleteReadError, OSError) as e:
            raise Unavailable(op, self.name, f"{type(e).__name__}: {e}") from None
        except BotoCoreError as e:  # credentials, parameters: not worth a retry
            raise BackendError(op, self.name, f"{type(e).__name__}: {e}") from None

    def _full(self, key: str) -> str:
        if not key or not is_safe_key(key):
            raise BackendError("resolve", self.name, "key is not a safe object name")
        return self.prefix + key

    # -- set-up and health -------------------------------------------------------
    def initialize(self) -> None:
        """Write the marker that says this bucket/prefix belongs to this store
        (idempotent). Refuses a marker naming another store."""
        full = self.prefix + MARKER
        try:
            with self._errors("initialize", MARKER):
                found = json.loads(self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read())
            if found.get("site") != self.name:
                raise BackendError("initialize", self.name,
                                   f"{full} belongs to store {found.get('site')!r}")
            return
        except ObjectNotFound:
            pass
        doc = {"format": "pacsvault-site", "version": LAYOUT_VERSION, "site": self.name,
               "site_id": str(uuid.uuid4()), "store": "s3",
               "layout": "keys as on an online site (tiers.layout), under this prefix"}
        body = (json.dumps(doc, indent=2) + "\n").encode()
        try:
            self._put_single(full, MARKER, body, hashlib.sha256(body).hexdigest(), replace=False)
        except ObjectExists:  # another process initialized it meanwhile
            pass

    def health(self) -> SiteHealth:
        """Never raises. Unhealthy when the bucket is unreachable or the marker
        is missing (a wrong bucket or prefix would scatter copies nobody finds)."""
        try:
            with self._errors("health", MARKER):
                self.client.head_object(Bucket=self.bucket, Key=self.prefix + MARKER)
            return SiteHealth(True, "ok")
        except ObjectNotFound:
            return SiteHealth(False, f"{MARKER} missing (wrong bucket/prefix or not initialized)")
        except Exception as e:  # health must never raise
            return SiteHealth(False, str(e))

    # -- put ---------------------------------------------------------------------
    def put(self, key: str, payload: Payload, *, replace: bool = False) -> ObjectInfo:
        """Store verified; see the module docstring for the steps. Without
        ``replace`` an existing object is never overwritten: identical content
        is success, different content raises ObjectExists, and an object whose
        recorded SHA-256 equals ours but whose bytes do not raises CopyCorrupt
        (repair it with ``replace=True``). With ``replace`` in an unversioned
        bucket, a copy that fails verification leaves no object under ``key``:
        the old one was overwritten by then (a versioned bucket restores it)."""
        full = self._full(key)
        if not replace:
            same = self._existing(full, key, payload)
            if same is not None:
                return same
        try:
            if _streaming(payload) or payload.size >= self.settings.multipart_threshold:
                version, composite = self._put_multipart(full, key, payload, replace=replace)
            else:
                version, composite = self._put_small(full, key, payload, replace=replace)
        except ObjectExists:
            same = self._existing(full, key, payload)  # lost a race with another writer
            if same is None:
                raise
            return same
        if not self._matches(full, version, payload.sha256, payload.size, composite=composite):
            self._remove_bad(full, key, version)
        single = _b64(bytes.fromhex(payload.sha256)) if self.settings.checksum == "sha256" else None
        return ObjectInfo(key, payload.size, payload.sha256, version,
                          composite if composite is not None else single)

    def verify(self, key: str, sha256: str, size: int, *, checksum: str | None = None,
               version_id: str | None = None) -> bool:
        """With verify='checksum', compare the server's SHA-256 of the stored
        object (HEAD, no data transfer) with ``sha256``, or for a multipart
        object with the composite ``checksum`` recorded at upload; otherwise,
        or when the server keeps no checksum, read the object back. Naming
        ``version_id`` checks that version: in a versioned (WORM) bucket a
        later overwrite cannot hide the version we wrote."""
        composite = checksum if checksum and "-" in checksum else None
        return self._matches(self._full(key), version_id, sha256, size, composite=composite)

    def _existing(self, full: str, key: str, payload: Payload) -> ObjectInfo | None:
        """None if absent; the info if identical; else ObjectExists / CopyCorrupt."""
        try:
            with self._errors("put", key):
                head = self.client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
        except ObjectNotFound:
            return None
        recorded = head.get("Metadata", {}).get("sha256")
        if recorded is not None and recorded != payload.sha256:
            raise ObjectExists("put", self.name, key)
        if self._matches(full, _version_of(head), payload.sha256, payload.size, head=head):
            return ObjectInfo(key, payload.size, payload.sha256, _version_of(head),
                              head.get("ChecksumSHA256"))
        if recorded == payload.sha256:  # written as ours, but the bytes are not
            raise CopyCorrupt("put", self.name, f"{key} (stored copy damaged; repair with replace)")
        raise ObjectExists("put", self.name, key)

    def _put_kwargs(self, sha256_hex: str | None, size: int | None) -> dict[str, Any]:
        s = self.settings
        # A streamed upload starts before its SHA-256 is known: no metadata then
        # (the server's own checksum and the catalog still hold it).
        kw: dict[str, Any] = ({"Metadata": {"sha256": sha256_hex, "size": str(size)}}
                              if sha256_hex is not None else {})
        if s.storage_class:
            kw["StorageClass"] = s.storage_class
        if s.sse != "none":
            kw["ServerSideEncryption"] = s.sse
            if s.kms_key_id:
                kw["SSEKMSKeyId"] = s.kms_key_id
        if s.object_lock_mode != "none":
            kw["ObjectLockMode"] = s.object_lock_mode
            kw["ObjectLockRetainUntilDate"] = self._clock() + timedelta(days=s.retain_days)
        return kw

    def _digest_kwargs(self, data: bytes, sha256_digest: bytes) -> dict[str, Any]:
        if self.settings.checksum == "sha256":
            # Algorithm and value together: the server checks our value, and moto
            # (like AWS) wants the algorithm header for Object Lock uploads.
            return {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": _b64(sha256_digest)}
        if self.settings.checksum == "md5":
            return {"ContentMD5": _b64(hashlib.md5(data).digest())}
        return {}

    def _conditional(self, replace: bool) -> dict[str, str]:
        return {} if replace or not self.settings.conditional_writes else {"IfNoneMatch": "*"}

    def _put_small(self, full: str, key: str, payload: Payload, *,
                   replace: bool) -> tuple[str | None, None]:
        with payload.open() as src:
            data = _read_exact(src, payload.size + 1)  # one more byte finds a long source
        if len(data) != payload.size:
            raise BackendError("put", self.name, f"read {len(data)} of {payload.size} bytes")
        digest = hashlib.sha256(data).digest()
        if digest.hex() != payload.sha256:  # never upload bytes we know are wrong
            raise CopyCorrupt("put", self.name, key)
        return self._put_single(full, key, data, payload.sha256, replace=replace), None

    def _put_single(self, full: str, key: str, data: bytes, sha256_hex: str, *,
                    replace: bool) -> str | None:
        with self._errors("put", key):
            r = self.client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                       **self._digest_kwargs(data, bytes.fromhex(sha256_hex)),
                                       **self._conditional(replace),
                                       **self._put_kwargs(sha256_hex, len(data)))
        return _version_of(r)

    def _part_size(self, size: int) -> int:
        # Grow parts only for objects past MAX_PARTS * part_size (160 GiB by default).
        need = -(-size // MAX_PARTS)
        return max(self.settings.part_size, -(-need // MiB) * MiB)

    def _put_multipart(self, full: str, key: str, payload: Payload, *,
                       replace: bool) -> tuple[str | None, str | None]:
        s = self.settings
        streaming = _streaming(payload)
        create: dict[str, Any] = (self._put_kwargs(None, None) if streaming
                                  else self._put_kwargs(payload.sha256, payload.size))
        if s.checksum == "sha256":
            create["ChecksumAlgorithm"] = "SHA256"
        with self._errors("put", key):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full,
                                                            **create)["UploadId"]
        try:
            parts, digests = self._upload_parts(full, key, upload_id, payload)
            failpoints.hit("s3.before_complete")
            with self._errors("put", key):
                r = self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, **self._conditional(replace))
        except BaseException:
            self._abort(full, key, upload_id)  # nothing half-done may stay behind
            raise
        composite = _b64(hashlib.sha256(b"".join(digests)).digest()) + f"-{len(digests)}"
        return _version_of(r), composite

    def _upload_parts(self, full: str, key: str, upload_id: str,
                      payload: Payload) -> tuple[list[dict], list[bytes]]:
        # A streamed payload's size is known only at its end (tiers.growing):
        # read until EOF with the configured part size, then check.
        streaming = _streaming(payload)
        part_size = self.settings.part_size if streaming else self._part_size(payload.size)
        whole = hashlib.sha256()
        digests: list[bytes] = []
        parts: list[dict] = []
        pending: deque[Future] = deque()
        total = 0
        pool = ThreadPoolExecutor(max_workers=self.settings.max_concurrency,
                                  thread_name_prefix=f"s3-{self.name}")
        try:
            with payload.open() as src:
                while streaming or total <= payload.size:
                    data = _read_exact(src, part_size)
                    if not data:
                        break
                    if len(digests) >= MAX_PARTS:
                        raise BackendError("put", self.name, f"{key}: more than {MAX_PARTS} "
                                           f"parts of {part_size} bytes; raise part_size")
                    total += len(data)
                    whole.update(data)
                    digest = hashlib.sha256(data).digest()
                    digests.append(digest)
                    # Bounded memory: at most max_concurrency parts in flight plus
                    # the one just read; wait for the oldest before submitting.
                    while len(pending) >= self.settings.max_concurrency:
                        parts.append(pending.popleft().result())
                    pending.append(pool.submit(self._upload_part, full, key, upload_id,
                                               len(digests), data, digest))
            while pending:
                parts.append(pending.popleft().result())
        finally:
            # On error: wait for parts in flight, so none lands after the abort.
            pool.shutdown(wait=True, cancel_futures=True)
        if total != payload.size:
            raise BackendError("put", self.name, f"read {total} of {payload.size} bytes")
        if whole.hexdigest() != payload.sha256:  # completing would publish wrong bytes
            raise CopyCorrupt("put", self.name, key)
        if not parts:  # an empty stream: S3 needs one (empty) part to complete
            parts.append(self._upload_part(full, key, upload_id, 1, b"",
                                           hashlib.sha256(b"").digest()))
            digests.append(hashlib.sha256(b"").digest())
        return parts, digests

    def _upload_part(self, full: str, key: str, upload_id: str, number: int,
                     data: bytes, digest: bytes) -> dict:
        with self._errors("put", key):
            r = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                        PartNumber=number, Body=data,
                                        **self._digest_kwargs(data, digest))
        part = {"PartNumber": number, "ETag": r["ETag"]}
        if self.settings.checksum == "sha256":
            part["ChecksumSHA256"] = _b64(digest)
        return part

    def _abort(self, full: str, key: str, upload_id: str) -> None:
        try:
            with self._errors("abort", key):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except BackendError as e:  # keep the original error; sweep_uploads cleans up later
            log.warning("could not abort multipart upload %s on %s: %s", upload_id, self.name, e)

    # -- verification --------------------------------------------------------------
    def _matches(self, full: str, version: str | None, sha256_hex: str, size: int, *,
                 head: dict | None = None, composite: str | None = None) -> bool:
        """Does the stored object (this version) have these bytes? Trusts the
        server's SHA-256 when allowed and available, else reads it back."""
        vid = {"VersionId": version} if version else {}
        if head is None:
            with self._errors("verify", full):
                head = self.client.head_object(Bucket=self.bucket, Key=full,
                                               ChecksumMode="ENABLED", **vid)
        if head.get("ContentLength") != size:
            return False
        server = head.get("ChecksumSHA256")
        if self.settings.verify == "checksum" and server:
            value, _, nparts = server.partition("-")
            multipart = bool(nparts) or "-" in head.get("ETag", "") \
                or head.get("ChecksumType") == "COMPOSITE"
            if composite is not None:
                # moto drops the "-N" suffix that AWS and SeaweedFS return.
                want, _, want_n = composite.partition("-")
                return value == want and nparts in ("", want_n)
            if not multipart:
                return value == _b64(bytes.fromhex(sha256_hex))
            # A composite we cannot recompute (part sizes unknown): read it back.
        return self._hash_remote(full, version) == sha256_hex

    def _hash_remote(self, full: str, version: str | None) -> str:
        vid = {"VersionId": version} if version else {}
        h = hashlib.sha256()
        with self._errors("verify", full):
            body = self.client.get_object(Bucket=self.bucket, Key=full, **vid)["Body"]
        with io.BufferedReader(_Body(self, full, body), READ_CHUNK) as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def _remove_bad(self, full: str, key: str, version: str | None) -> None:
        try:
            self._delete_full(full, key, version)
        except ObjectLocked:
            raise CopyCorrupt("put", self.name,
                              f"{key} (bad copy left in place: under Object Lock)") from None
        raise CopyCorrupt("put", self.name, key)

    def sha256(self, key: str) -> str:
        """Hash the stored object by reading it (scrubs; never trusts metadata)."""
        return self._hash_remote(self._full(key), None)

    # -- reads -------------------------------------------------------------------
    def open(self, key: str, *, version_id: str | None = None) -> BinaryIO:
        full = self._full(key)
        vid = {"VersionId": version_id} if version_id else {}
        with self._errors("open", key):
            body = self.client.get_object(Bucket=self.bucket, Key=full, **vid)["Body"]
        return io.BufferedReader(_Body(self, key, body), READ_CHUNK)  # type: ignore[return-value]

    def open_range(self, key: str, offset: int, length: int, *,
                   version_id: str | None = None) -> BinaryIO:
        """Exactly ``length`` bytes from ``offset`` (a ranged GET). A range that
        does not lie wholly inside the object is an error, never a short read."""
        if offset < 0 or length < 1:
            raise ValueError("offset must be >= 0 and length >= 1")
        full = self._full(key)
        with self._errors("open_range", key):
            r = self.client.get_object(Bucket=self.bucket, Key=full,
                                       Range=f"bytes={offset}-{offset + length - 1}",
                                       **({"VersionId": version_id} if version_id else {}))
        if r.get("ContentLength") != length:  # servers answer a range past the end short
            r["Body"].close()
            raise BackendError("open_range", self.name,
                               f"{key}: {offset}+{length} past the end ({r.get('ContentRange')})")
        return io.BufferedReader(_Body(self, key, r["Body"]), READ_CHUNK)  # type: ignore[return-value]

    def stat(self, key: str) -> ObjectInfo:
        full = self._full(key)
        with self._errors("stat", key):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        return ObjectInfo(key, head["ContentLength"])

    def list(self, prefix: str = "objects/") -> Iterator[ObjectInfo]:
        """Objects under ``prefix``, which names a directory as on a filesystem
        site ("objects/aa" does not match "objects/aab/..."). Key order."""
        p = prefix.strip("/")
        start = self._full(p) + "/" if p else self.prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start)
        with self._errors("list", prefix):
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"])

    # -- delete ------------------------------------------------------------------
    def delete(self, key: str, *, version_id: str | None = None) -> None:
        """Remove ``key``; idempotent (a missing key is success).

        In a versioned bucket (every Object Lock bucket is one) a plain delete
        only adds a delete marker: the key disappears from open/stat/list, but
        the bytes stay as a noncurrent version until a lifecycle rule expires
        them or ``version_id`` deletes that version. Deleting a version under
        GOVERNANCE or COMPLIANCE retention raises ObjectLocked; that is the
        point of WORM: a thief with our credentials cannot destroy copies.
        """
        self._delete_full(self._full(key), key, version_id)

    def delete_many(self, keys: list[str]) -> None:
        """Delete several keys (current versions), 1,000 per request; idempotent."""
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            objs = [{"Key": self._full(k)} for k in batch]
            with self._errors("delete", batch[0] if batch else ""):
                r = self.client.delete_objects(Bucket=self.bucket,
                                               Delete={"Objects": objs, "Quiet": True})
            errors = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise BackendError("delete", self.name,
                                   f"{len(errors)} keys not deleted ({errors[0].get('Code')})")

    def _delete_full(self, full: str, key: str, version_id: str | None) -> None:
        vid = {"VersionId": version_id} if version_id else {}
        try:
            with self._errors("delete", key, locked=bool(version_id)):
                self.client.delete_object(Bucket=self.bucket, Key=full, **vid)
        except ObjectNotFound:
            pass

    def sweep_uploads(self, older_than: timedelta = timedelta(hours=24)) -> int:
        """Abort multipart uploads under our prefix started before ``older_than``
        ago (a crash between create and complete/abort leaves them; their parts
        may hold patient data). Younger uploads may belong to a live writer.
        With an empty prefix the whole bucket counts as ours."""
        cutoff: datetime = self._clock() - older_than
        aborted = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        with self._errors("sweep"):
            uploads = [u for page in pages for u in page.get("Uploads", [])]
        for u in uploads:
            if u["Initiated"] <= cutoff:
                with self._errors("sweep", u["Key"]):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"],
                                                       UploadId=u["UploadId"])
                aborted += 1
        return aborted


__all__ = ["S3Backend", "S3Settings", "ObjectLocked", "make_client", "MARKER"]
