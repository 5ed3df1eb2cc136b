"""Fixtures for the storage conformance suite: one test body, every backend.

A test module imports the fixtures it uses (pytest finds fixtures in a test
module's namespace; a ``conftest_s3.py`` would not be loaded):

* ``store``    parametrized: ``fs`` (FilesystemBackend in tmp_path), ``moto``
  (S3Backend on moto's in-process S3) and ``seaweed`` (S3Backend on a real
  SeaweedFS on loopback, marker ``needs_s3``).
* ``s3store``  the two S3 kinds only (ranged reads, metadata, uploads).
* ``weed``     the seaweed kind only (checksums, Object Lock, versioning, faults).

``Store.make(**overrides)`` builds an initialized backend; for the S3 kinds the
overrides are S3Settings fields (the FS kind ignores them). The payload and
helpers both suites use (``Bytes``, ``rand``, ``flip``, ``nothing_left``) are here. Every S3 backend
uses the prefix ``pv/`` in a bucket of its own, and reads its credentials from
environment variables named in its settings, as production does.

moto echoes whatever checksum it is sent without checking it, so the moto kind
verifies by reading back (``verify="readback"``); SeaweedFS checks SHA-256, so
the seaweed kind trusts the server's checksum (the production default).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support import seaweed as sw
from tiers.fs import MARKER as FS_MARKER
from tiers.fs import FilesystemBackend
from tiers.s3 import S3Backend, S3Settings

PREFIX = "pv/"
KEY_ENV, SECRET_ENV = "PV_TEST_S3_KEY", "PV_TEST_S3_SECRET"
_names = itertools.count()

MiB = 1024 * 1024
KEY = "objects/aa/bb/1.2/3/1.2.3.dcm"
MULTIPART = dict(multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=2)
BIG = 12 * MiB + 123  # three parts: 5 + 5 + 2 MiB


@dataclass
class Bytes:
    """A payload; ``read_size`` caps each read() so readers must loop."""

    data: bytes
    sha256: str = ""
    read_size: int = 100_000

    def __post_init__(self):
        self.sha256 = self.sha256 or hashlib.sha256(self.data).hexdigest()

    @property
    def size(self):
        return len(self.data)

    def open(self):
        src, cap = io.BytesIO(self.data), self.read_size

        class Capped(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                chunk = src.read(min(len(b), cap))
                b[: len(chunk)] = chunk
                return len(chunk)

        return Capped()


def flip(data: bytes, pos: int = 0) -> bytes:
    """Never a no-op (borg's lesson: a fixed overwrite is one 1 time in 256)."""
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]


def rand(n: int) -> bytes:
    return os.urandom(n)


def nothing_left(store: "Store") -> None:
    assert store.raw_keys() == []
    assert store.open_uploads() == []


@dataclass
class Store:
    kind: str                          # fs | moto | seaweed
    make: Callable[..., Any]           # make(**s3_settings_overrides) -> initialized backend
    raw: Any = None                    # boto3 client straight to the server (S3 kinds)
    bucket: str | None = None
    root: Path | None = None           # FS kind
    server: sw.SeaweedServer | None = None
    settings: dict = field(default_factory=dict)

    @property
    def is_s3(self) -> bool:
        return self.kind != "fs"

    def raw_keys(self) -> list[str]:
        """Everything stored, as the server or the directory holds it (markers excluded)."""
        if not self.is_s3:
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                          if p.is_file() and p.name != FS_MARKER)
        keys = []
        for page in self.raw.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys += [o["Key"] for o in page.get("Contents", [])
                     if not o["Key"].endswith(FS_MARKER)]
        return sorted(keys)

    def tamper(self, be: Any, key: str, data: bytes) -> None:
        """Replace what is stored under ``key`` behind the backend's back (bit rot)."""
        if not self.is_s3:
            (be.root / key).write_bytes(data)
        else:
            self.raw.put_object(Bucket=self.bucket, Key=PREFIX + key, Body=data)

    def open_uploads(self) -> list:
        """Half-done writes: multipart uploads (S3) or temp files (FS)."""
        if not self.is_s3:
            return sorted(self.root.glob("*/tmp/*"))
        return self.raw.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])


def _s3_store(kind: str, raw: Any, bucket: str, endpoint: str | None, access: str,
              secret: str, monkeypatch: pytest.MonkeyPatch, defaults: dict,
              server: sw.SeaweedServer | None = None) -> Store:
    monkeypatch.setenv(KEY_ENV, access)
    monkeypatch.setenv(SECRET_ENV, secret)
    default_name = f"objects-{next(_names)}"  # one store: its backends share the marker

    def make(name: str | None = None, *, wrap: Callable | None = None,
             clock: Callable | None = None, **overrides: Any) -> S3Backend:
        """An initialized backend; ``wrap`` wraps its client afterwards (faults)."""
        fields = dict(bucket=bucket, endpoint_url=endpoint, prefix=PREFIX,
                      access_key_env=KEY_ENV, secret_key_env=SECRET_ENV, max_attempts=3)
        fields.update(defaults)
        fields.update(overrides)
        be = S3Backend(name or default_name, S3Settings(**fields),
                       **({"clock": clock} if clock else {}))
        be.initialize()
        if wrap is not None:
            be.client = wrap(be.client)
        return be

    return Store(kind, make, raw=raw, bucket=bucket, server=server, settings=defaults)


def _fs_store(tmp_path: Path) -> Store:
    def make(name: str | None = None, *, wrap: Any = None, clock: Any = None,
             **_ignored: Any) -> FilesystemBackend:
        # verify_read="device", the default: what production runs, fadvise and all.
        be = FilesystemBackend(name or f"site-{next(_names)}", tmp_path / f"fs{next(_names)}")
        be.initialize()
        return be

    return Store("fs", make, root=tmp_path)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[sw.SeaweedServer]:
    sw.require_weed()
    server = sw.shared_server()
    yield server
    sw.stop_shared()


def _build(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    if kind == "fs":
        yield _fs_store(tmp_path)
    elif kind == "moto":
        import boto3
        from moto import mock_aws

        with mock_aws():
            raw = boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing",
                               aws_secret_access_key="testing")
            raw.create_bucket(Bucket="pv-moto")
            yield _s3_store("moto", raw, "pv-moto", None, "testing", "testing", monkeypatch,
                            {"verify": "readback"})
    else:
        server: sw.SeaweedServer = request.getfixturevalue("seaweed")
        bucket = server.create_bucket()
        yield _s3_store("seaweed", server.client(), bucket, server.endpoint, server.access_key,
                        server.secret_key, monkeypatch, {}, server=server)


WEED = pytest.param("seaweed", marks=pytest.mark.needs_s3)


@pytest.fixture(params=["fs", "moto", WEED])
def store(request, tmp_path, monkeypatch) -> Iterator[Store]:
    yield from _build(request.param, request, tmp_path, monkeypatch)


@pytest.fixture(params=["moto", WEED])
def s3store(request, tmp_path, monkeypatch) -> Iterator[Store]:
    yield from _build(request.param, request, tmp_path, monkeypatch)


@pytest.fixture(params=[WEED])
def weed(request, tmp_path, monkeypatch) -> Iterator[Store]:
    yield from _build(request.param, request, tmp_path, monkeypatch)
