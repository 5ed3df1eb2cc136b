"""Study bundles: round trip, ranged reads, damage confined to one instance, and the
standard-tools recipe from docs/formats/study-bundle.md."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.dataset import VARIED, make_varied_study
from tiers.bundle import TRAILER_SIZE, BundleError, BundleReader, Member, write_bundle


def member(made) -> Member:  # noqa: ANN001
    data = made.path.read_bytes()
    return Member(made.sop_uid, made.series_uid, made.sop_class, made.transfer_syntax,
                  len(data), hashlib.sha256(data).hexdigest(), lambda d=data: io.BytesIO(d))


@pytest.fixture
def bundle(tmp_path: Path):
    made = make_varied_study(tmp_path / "in", size=20000)
    path = tmp_path / "study.pvb"
    with open(path, "wb") as out:
        written = write_bundle(out, {"study_uid": made[0].study_uid}, [member(m) for m in made])
    return path, made, written


def reader_for(path: Path) -> BundleReader:
    data = path.read_bytes()
    return BundleReader(lambda off, n: data[off:off + n], len(data))


def test_round_trip_every_kind(bundle):
    path, made, written = bundle
    assert written.size == path.stat().st_size
    assert written.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    r = reader_for(path)
    assert len(r.manifest["instances"]) == len(VARIED)
    for m in made:
        assert r.read(r.by_sop[(m.sop_uid, 1)]) == m.path.read_bytes()


def test_one_instance_costs_one_ranged_read(bundle):
    path, made, _ = bundle
    data = path.read_bytes()
    reads = []

    def read_range(off, n):
        reads.append((off, n))
        return data[off:off + n]
    r = BundleReader(read_range, len(data))
    assert len(reads) == 2  # trailer, manifest
    r.read(r.by_sop[(made[5].sop_uid, 1)])
    assert len(reads) == 3


def test_flipped_byte_damages_only_its_instance(bundle):
    path, made, _ = bundle
    r = reader_for(path)
    victim = r.by_sop[(made[3].sop_uid, 1)]
    data = bytearray(path.read_bytes())
    data[victim["offset"] + victim["length"] // 2] ^= 0xFF
    damaged = BundleReader(lambda off, n: bytes(data[off:off + n]), len(data))
    with pytest.raises(BundleError):
        damaged.read(victim)
    for m in made:
        if m is not made[3]:
            assert damaged.read(damaged.by_sop[(m.sop_uid, 1)]) == m.path.read_bytes()


@pytest.mark.parametrize("cut", [1, TRAILER_SIZE, 1000])
def test_truncated_bundle_is_refused(bundle, cut):
    path, _, _ = bundle
    data = path.read_bytes()[:-cut]
    with pytest.raises(BundleError):
        BundleReader(lambda off, n: data[off:off + n], len(data))


def test_tampered_manifest_is_refused(bundle):
    path, _, _ = bundle
    data = bytearray(path.read_bytes())
    data[-TRAILER_SIZE - 10] ^= 0x01
    with pytest.raises(BundleError):
        BundleReader(lambda off, n: bytes(data[off:off + n]), len(data))


def test_member_that_changed_is_refused_before_the_manifest(tmp_path):
    made = make_varied_study(tmp_path / "in", size=2000)
    bad = member(made[0])
    bad = Member(bad.sop_uid, bad.series_uid, bad.sop_class, bad.transfer_syntax, bad.size,
                 "0" * 64, bad.open)
    out = io.BytesIO()
    with pytest.raises(BundleError):
        write_bundle(out, {}, [bad])


def test_standard_tools_recipe(bundle, tmp_path):
    """docs/formats/study-bundle.md section 6, with dd, zstd and sha256sum only."""
    if shutil.which("zstd") is None:
        pytest.fail("zstd is required (deploy/install.sh --test installs it)")
    path, made, _ = bundle
    size = path.stat().st_size
    tail = subprocess.run(["tail", "-c", "64", str(path)], capture_output=True, check=True).stdout
    import struct

    moff, mlen = struct.unpack_from("<QQ", tail, 16)
    sh = (f"dd if={path} bs=1M iflag=skip_bytes,count_bytes skip={moff} count={mlen} "
          f"status=none | zstd -d -q")
    manifest = json.loads(subprocess.run(["sh", "-c", sh], capture_output=True, check=True).stdout)
    for e in manifest["instances"]:
        out = tmp_path / f"{e['sop_uid']}.dcm"
        sh = (f"dd if={path} bs=1M iflag=skip_bytes,count_bytes skip={e['offset']} "
              f"count={e['length']} status=none | zstd -d -q > {out}")
        subprocess.run(["sh", "-c", sh], check=True)
        got = subprocess.run(["sha256sum", str(out)], capture_output=True, text=True, check=True)
        assert got.stdout.split()[0] == e["sha256"]
    # The whole bundle is one zstd stream: every instance, then the manifest.
    whole = subprocess.run(["zstd", "-d", "-q", "-c", str(path)], capture_output=True, check=True).stdout
    assert whole.startswith(made[0].path.read_bytes())
    assert size > moff


def test_bad_first_source_falls_back_to_the_mirror(tmp_path):
    import io

    good = b"A" * 5000
    bad = b"A" * 4999 + b"B"
    members = [
        Member("1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1", len(good),
               hashlib.sha256(good).hexdigest(), open=lambda: io.BytesIO(bad),
               alternatives=(lambda: io.BytesIO(good),)),
        Member("1.2.4", "1.2", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1", 3,
               hashlib.sha256(b"xyz").hexdigest(), open=lambda: io.BytesIO(b"xyz")),
    ]
    with open(tmp_path / "b.pvb", "w+b") as f:
        w = write_bundle(f, {"study_uid": "1.2"}, members)
    data = (tmp_path / "b.pvb").read_bytes()
    assert w.size == len(data) and w.sha256 == hashlib.sha256(data).hexdigest()
    assert w.bad_sources == [("1.2.3", 1, 0, "SHA-256 differs")]
    r = BundleReader(lambda o, n: data[o:o + n], len(data))
    assert [r.read(e) for e in r.manifest["instances"]] == [good, b"xyz"]


def test_no_matching_source_or_unseekable_output_refuses(tmp_path):
    import io

    good = b"C" * 100
    m = Member("1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1", 100,
               hashlib.sha256(good).hexdigest(), open=lambda: io.BytesIO(b"C" * 99),
               alternatives=(lambda: io.BytesIO(b"D" * 100),))
    with open(tmp_path / "b.pvb", "w+b") as f, pytest.raises(BundleError, match="no source"):
        write_bundle(f, {}, [m])

    class Pipe(io.RawIOBase):  # a stream that cannot seek, like a pipe
        def writable(self):
            return True

        def write(self, b):
            return len(b)

    good_second = Member(**{**m.__dict__, "alternatives": (lambda: io.BytesIO(good),)})
    with pytest.raises(BundleError):
        write_bundle(Pipe(), {}, [good_second])
