"""Forged DR volumes. The age recipient is public (it is in the config), so anyone can
build a volume our reader decrypts: these are built here with the recipient only,
as an attacker would, with UIDs that climb out of the restore target, absolute
paths, a symlink inside a segment, sizes x1000, wrong hashes, no signature and a
signature by another key. Each is refused or contained; nothing is ever written
outside the restore target; the operator is told why in one line."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dr import crypt, segment, signing
from dr.format import SIGNATURE
from dr.keys import fingerprint
from tests.integration.test_dr import cli_json, configure, db, volumes_of
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install

CT = "1.2.840.10008.5.1.4.1.1.2"
GOOD_STUDY, GOOD_SERIES, GOOD_SOP = "1.2.826.0.1.3680043.10.7.1", "1.2.826.0.1.3680043.10.7.2", \
    "1.2.826.0.1.3680043.10.7.3"


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o640
    tar.addfile(info, io.BytesIO(data))


def forge(path: Path, recipient: str, *, study: str = GOOD_STUDY, series: str = GOOD_SERIES,
          sop: str = GOOD_SOP, data: bytes = b"DICM-not-really" * 100, size: int | None = None,
          sha: str | None = None, catalog_size: int | None = None, symlink: str | None = None,
          sign_with: Ed25519PrivateKey | None = None, version: int = 2) -> Path:
    """A volume as docs/formats/dr-volume.md describes it, made without any secret:
    one segment of one instance, its index and catalog, a signature if ``sign_with``."""
    barcode, volume_set = "PV000001", str(uuid.uuid4())
    stem = f"{barcode}-000001"
    member = f"seg/{stem}.tar.zst.age"
    entry = {"sop_uid": sop, "version": 1, "series_uid": series, "sop_class": CT,
             "transfer_syntax": "1.2.840.10008.1.2.1", "size": size or len(data),
             "sha256": sha or hashlib.sha256(data).hexdigest(),
             "received_at": "2026-01-01T00:00:00+00:00", "calling_ae": "FORGER",
             "conflict": False}
    doc = {"study_uid": study, "study_date": "20260101", "study_time": "", "accession": "",
           "description": "", "calling_ae": "FORGER",
           "first_received_at": "2026-01-01T00:00:00+00:00",
           "last_received_at": "2026-01-01T00:00:00+00:00",
           "patient": {"patient_id": "FORGED-1", "issuer": "", "name": "", "birth_date": "",
                       "sex": ""},
           "series": [{"series_uid": series, "modality": "CT", "series_number": "1"}]}
    head = {"volume_set": volume_set, "barcode": barcode, "member": member, "study_uid": study,
            "study_segment": 1, "last_of_study": True, "study_instances": 1, "study": doc}
    inner = f"{study}/{series}/{sop}.dcm"
    plain, _, _ = segment.build(stem, head, [segment.Piece(1, entry, inner, data)])
    if symlink is not None:          # first, a symlink member named like the study directory
        src = tarfile.open(fileobj=io.BytesIO(plain))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            link = tarfile.TarInfo(study)
            link.type, link.linkname = tarfile.SYMTYPE, symlink
            t.addfile(link)
            for m in src:
                t.addfile(m, src.extractfile(m))
        plain = buf.getvalue()
    seg = crypt.encrypt(zstandard.ZstdCompressor().compress(plain), [recipient])
    index = {"format": "pacsvault-dr-index", "version": version, "volume_set": volume_set,
             "barcode": barcode, "sequence": 1, "pool": "offsite", "continues": False,
             "segments": [{"member": member, "offset": 512 * 3, "size": len(seg),
                           "sha256": hashlib.sha256(seg).hexdigest(), "study_uid": study,
                           "study_segment": 1, "last_of_study": True, "instances": 1,
                           "bytes": len(data)}]}
    listed = {**entry, "size": catalog_size or entry["size"]}
    catalog = {"format": "pacsvault-dr-catalog", "version": version, "volume_set": volume_set,
               "barcode": barcode, "studies": [{"study": doc, "instances": [listed]}]}
    label = {"format": "pacsvault-dr-volume", "version": version, "barcode": barcode,
             "pool": "offsite", "volume_set": volume_set, "sequence": 1,
             "created_at": "2026-01-01T00:00:00+00:00", "block_size": 10240,
             "capacity": 10 ** 9, "kind": "stream", "recipients": [fingerprint(recipient)],
             "segment_cipher": "age-encryption.org/v1 (X25519)", "segment_compression": "zstd"}
    members = [("PACSVAULT-LABEL.json", json.dumps(label).encode()), (member, seg)]
    for name, body in (("INDEX.json.zst.age", index), ("CATALOG.json.zst.age", catalog)):
        members.append((name, crypt.encrypt(zstandard.ZstdCompressor().compress(
            json.dumps(body).encode()), [recipient])))
    if sign_with is not None:
        listed_members = [(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in members]
        members.append((SIGNATURE, signing.sign(
            sign_with, {"barcode": barcode, "volume_set": volume_set, "sequence": 1},
            listed_members)))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in members:
            _tar_add(tar, name, body)
    return path


@pytest.fixture
def victim(tmp_path):
    """An install with a DR key (the identity carries the verification key), an empty
    catalog, and a directory next to the restore target that must stay untouched."""
    inst = Install.create(tmp_path / "pv")
    inst.key = tmp_path / "dr-key.txt"
    p = run_cli(inst.config, "dr", "keygen", "--out", str(inst.key))
    inst.recipient = p.stdout.strip()
    inst.out = tmp_path / "a" / "b" / "c" / "out"         # ../../.. of it is tmp_path/a
    inst.out.mkdir(parents=True)
    inst.outside = tmp_path / "outside"
    inst.outside.mkdir()
    return inst


def files_under(root: Path) -> set[str]:
    """Every path under root but the install's own directory (its catalog changes)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.relative_to(root).parts[0] != "pv"}


def rebuild(inst: Install, vol: Path, *flags: str) -> dict:
    return cli_json(inst, "dr", "rebuild-catalog", "--identity", str(inst.key), str(vol), *flags)


def test_the_identity_file_carries_the_verification_key_and_age_still_reads_it(victim):
    text = victim.key.read_text()
    [line] = [ln for ln in text.splitlines() if ln.startswith(signing.VERIFY_PREFIX)]
    key = signing.load_signing_key(signing.key_path(victim.settings.data_dir))
    assert line == signing.verify_line(key)
    assert oct((signing.key_path(victim.settings.data_dir)).stat().st_mode & 0o777) == "0o600"
    assert "PRIVATE" not in text
    # Debian's age ignores the comment line.
    enc = subprocess.run(["age", "-r", victim.recipient], input=b"x", capture_output=True,
                         check=True)
    dec = subprocess.run(["age", "-d", "-i", str(victim.key)], input=enc.stdout,
                         capture_output=True)
    assert dec.returncode == 0 and dec.stdout == b"x"
    # The install prints the same line for identity files made elsewhere.
    assert run_cli(victim.config, "dr", "verify-key").stdout.strip() == line


@pytest.mark.parametrize("where", ["study", "series", "sop"])
@pytest.mark.parametrize("hostile", ["../../..", "/tmp/pv-forged-abs", ".."])
def test_uids_that_are_paths_are_refused_and_nothing_is_written_outside(victim, tmp_path,
                                                                         where, hostile):
    uids = {"study": GOOD_STUDY, "series": GOOD_SERIES, "sop": GOOD_SOP, where: hostile}
    vol = forge(tmp_path / "forged.tar", victim.recipient, **uids)
    before = files_under(tmp_path)
    r = rebuild(victim, vol)
    assert r["_rc"] == 1 and "not signed" in r["_stderr"]
    assert [ln for ln in r["_stderr"].splitlines() if ln.startswith("REFUSED")], r["_stderr"]
    # Even an operator who trusts it gets no row from it: the UIDs fail ingest's grammar.
    r = rebuild(victim, vol, "--trust-unsigned")
    assert r["_rc"] == 1 and "Traceback" not in r["_stderr"]
    assert "invalid" in r["volumes"][0]["imported"]["refused"]
    assert db(victim, "select count(*) from studies") == [(0,)]
    assert db(victim, "select count(*) from dr_volumes") == [(0,)]
    p = run_cli(victim.config, "restore", "--study", uids["study"], "--from", "dr",
                "--identity", str(victim.key), "--volume", str(vol), "--to", str(victim.out),
                check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert files_under(tmp_path) == before
    assert not Path("/tmp/pv-forged-abs").exists()


@pytest.mark.parametrize("lie", ["size_x1000", "wrong_sha", "catalog_size_x1000"])
def test_sizes_and_hashes_must_be_those_of_the_bytes_on_the_volume(victim, tmp_path, lie):
    data = os.urandom(3000)
    kw = {"size_x1000": {"size": 3000 * 1000},
          "wrong_sha": {"sha": hashlib.sha256(b"other").hexdigest()},
          "catalog_size_x1000": {"catalog_size": 3000 * 1000}}[lie]
    vol = forge(tmp_path / "forged.tar", victim.recipient, data=data, **kw)
    r = rebuild(victim, vol, "--trust-unsigned")
    assert r["_rc"] == 1
    assert "refused" in r["volumes"][0]["imported"], r
    assert "REFUSED PV000001" in r["_stderr"]
    assert db(victim, "select count(*) from instances") == [(0,)]


def test_unsigned_and_foreign_signed_volumes_are_refused_unless_trusted(victim, tmp_path):
    data = os.urandom(2000)
    unsigned = forge(tmp_path / "unsigned.tar", victim.recipient, data=data)
    foreign = forge(tmp_path / "foreign.tar", victim.recipient, data=data,
                    sign_with=Ed25519PrivateKey.generate())
    for vol, why in ((unsigned, "not signed"), (foreign, "signed by another key")):
        r = rebuild(victim, vol)
        assert r["_rc"] == 1 and why in r["volumes"][0]["imported"]["refused"]
        refused = [ln for ln in r["_stderr"].splitlines() if ln.startswith("REFUSED")]
        assert len(refused) == 1 and why in refused[0] and "--trust-unsigned" in refused[0]
        assert db(victim, "select count(*) from studies") == [(0,)]
        v = cli_json(victim, "dr", "verify", str(vol), "--identity", str(victim.key))
        assert v["_rc"] == 1 and not v["signed"] and any(why in p for p in v["problems"])
    # The forger signing with a key of their own over a volume of valid UIDs is still
    # refused; an operator who says so reads an unsigned one (an old volume, version 1).
    old = forge(tmp_path / "old.tar", victim.recipient, data=data, version=1)
    assert rebuild(victim, old)["_rc"] == 1
    r = rebuild(victim, old, "--trust-unsigned")
    assert r["_rc"] == 0 and r["volumes"][0]["imported"]["instances"] == 1
    v = cli_json(victim, "dr", "verify", str(old), "--identity", str(victim.key),
                 "--trust-unsigned")
    assert v["_rc"] == 0 and not v["signed"]


def test_a_trusted_volume_restores_only_inside_the_target(victim, tmp_path):
    """A volume let in with --trust-unsigned whose segment also holds a symlink member
    named like the study directory, pointing outside: the restore writes the
    instance under the target from its UIDs, and never through a link."""
    data = os.urandom(5000)
    vol = forge(tmp_path / "forged.tar", victim.recipient, data=data,
                symlink=str(victim.outside))
    assert rebuild(victim, vol, "--trust-unsigned")["_rc"] == 0
    restore = ["restore", "--study", GOOD_STUDY, "--from", "dr", "--identity", str(victim.key),
               "--volume", str(vol), "--json"]
    # The target's study directory is a symlink to outside: not followed, reported.
    (victim.out / GOOD_STUDY).symlink_to(victim.outside, target_is_directory=True)
    p = run_cli(victim.config, *restore, "--to", str(victim.out), check=False)
    assert p.returncode == 1 and "symlink" in p.stderr
    assert list(victim.outside.iterdir()) == []
    (victim.out / GOOD_STUDY).unlink()
    p = run_cli(victim.config, *restore, "--to", str(victim.out), check=False)
    assert p.returncode == 0, p.stderr
    got = victim.out / GOOD_STUDY / GOOD_SERIES / f"{GOOD_SOP}.dcm"
    assert got.read_bytes() == data and not got.is_symlink()
    assert list(victim.outside.iterdir()) == []


def test_our_own_volumes_are_signed_and_an_altered_one_is_refused(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.ingest(make_ct_series(tmp_path / "ct", 3, size=5000))
    inst.key = tmp_path / "dr-key.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(inst.key)).stdout.strip())
    assert cli_json(inst, "dr", "write")["_rc"] == 0
    [vol] = volumes_of(inst)
    v = cli_json(inst, "dr", "verify", str(vol), "--identity", str(inst.key))
    assert v["_rc"] == 0 and v["signed"] and v["label"]["version"] == 3
    assert [b["member"].split("/")[1].split("-")[0] for b in v["catalog_backups"]] == \
        ["audit", "catalog"]
    fresh = Install.create(tmp_path / "fresh")
    r = cli_json(fresh, "dr", "rebuild-catalog", "--identity", str(inst.key), str(vol))
    assert r["_rc"] == 0 and r["volumes"][0]["signed"]
    # The plaintext label changed (same length, so the tar still parses): refused.
    raw = vol.read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(raw.replace(b'"pool": "offsite"', b'"pool": "offsitf"', 1))
    again = Install.create(tmp_path / "again")
    r = cli_json(again, "dr", "rebuild-catalog", "--identity", str(inst.key), str(bad))
    assert r["_rc"] == 1 and "differs from what was signed" in r["volumes"][0]["imported"]["refused"]
    assert db(again, "select count(*) from studies") == [(0,)]
    # A byte of the catalog snapshot changed: the whole volume is refused, and no
    # catalog backup (accounts, the audit trail) is put back from it.
    at = raw.index(b"catalog-backup/catalog-") + 512 + 200
    bad.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])
    other = Install.create(tmp_path / "other")
    r = cli_json(other, "dr", "rebuild-catalog", "--identity", str(inst.key), str(bad))
    assert r["_rc"] == 1 and "differs from what was signed" in r["volumes"][0]["imported"]["refused"]
    assert r["catalog_backup"]["applied"] is None
    assert db(other, "select count(*) from studies") == [(0,)]
    # An identity file without the verification line cannot vouch for anything.
    bare = tmp_path / "bare.txt"
    bare.write_text("\n".join(ln for ln in inst.key.read_text().splitlines()
                              if not ln.startswith(signing.VERIFY_PREFIX)) + "\n")
    r = cli_json(again, "dr", "rebuild-catalog", "--identity", str(bare), str(vol))
    assert r["_rc"] == 1 and "dr verify-key" in r["volumes"][0]["imported"]["refused"]


def test_a_volume_swapped_under_a_cataloged_barcode_is_not_read(victim, tmp_path):
    """Once a volume is in the catalog, restore uses a member only if it is exactly
    the one cataloged: a volume made later under the same barcode is not even
    decrypted, whatever it holds."""
    first = forge(tmp_path / "first.tar", victim.recipient, data=os.urandom(3000))
    assert rebuild(victim, first, "--trust-unsigned")["_rc"] == 0
    swapped = forge(tmp_path / "swapped.tar", victim.recipient, data=os.urandom(3000))
    p = run_cli(victim.config, "restore", "--study", GOOD_STUDY, "--from", "dr", "--identity",
                str(victim.key), "--volume", str(swapped), "--to", str(victim.out), "--json",
                check=False)
    assert p.returncode == 1
    [f] = json.loads(p.stdout)["failures"]
    assert "differs from the member the catalog recorded" in f["reason"]
    assert not list(victim.out.rglob("*.dcm"))
