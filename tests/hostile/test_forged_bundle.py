"""A study bundle read back from the object tier is input too: a manifest rewritten
with a consistent trailer (anyone who can write to the bucket can do it) but UIDs
that are paths, or numbers that are not numbers, is refused before anything keys
on it."""
from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import pytest
import zstandard

from tests.support.dataset import make_ct_series
from tiers.bundle import (
    TRAILER_SIZE,
    BundleError,
    BundleReader,
    Member,
    parse_trailer,
    write_bundle,
)


def forged(tmp_path: Path, change) -> bytes:  # noqa: ANN001
    """A real bundle whose manifest ``change`` edits; trailer and its hash made to match."""
    made = make_ct_series(tmp_path / "in", 2, size=3000)
    out = io.BytesIO()
    members = []
    for m in made:
        data = m.path.read_bytes()
        members.append(Member(m.sop_uid, m.series_uid, m.sop_class, m.transfer_syntax,
                              len(data), hashlib.sha256(data).hexdigest(),
                              lambda d=data: io.BytesIO(d)))
    write_bundle(out, {"study_uid": made[0].study_uid}, members)
    raw = out.getvalue()
    off, length, _ = parse_trailer(raw[-TRAILER_SIZE:], len(raw))
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(raw[off:off + length]))
    change(manifest)
    frame = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    trailer = raw[-TRAILER_SIZE:]
    trailer = trailer[:16] + struct.pack("<QQ", off, len(frame)) + hashlib.sha256(frame).digest()
    return raw[:off] + frame + trailer


@pytest.mark.parametrize("key,value", [("sop_uid", "../../../etc/x"), ("series_uid", "/abs"),
                                       ("sop_uid", ".."), ("size", "3000"), ("version", -1)])
def test_a_forged_manifest_is_refused(tmp_path, key, value):
    def change(m: dict) -> None:
        m["instances"][1][key] = value
    data = forged(tmp_path, change)
    with pytest.raises(BundleError) as e:
        BundleReader(lambda off, n: data[off:off + n], len(data))
    assert "manifest" in str(e.value)


def test_the_unchanged_bundle_reads(tmp_path):
    data = forged(tmp_path, lambda m: None)
    r = BundleReader(lambda off, n: data[off:off + n], len(data))
    assert len(r.manifest["instances"]) == 2
