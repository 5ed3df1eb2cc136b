"""Reading DR volumes back: a tar stream (file, FIFO, tape, '-') or an LTFS directory.

The tar stream is parsed here, header by header, rather than with tarfile's
stream mode, so that a member cut short by a truncated volume still yields the
bytes that are there (age authenticates them chunk by chunk, and the segment's
manifest, its first file, names the study even when the rest is lost).

``read_volume`` returns everything a caller needs: the label, each member's
outcome (with its plaintext segment when it decrypts and verifies), the index
and catalog members, the catalog backup members (kept as files when asked:
never held in memory, a snapshot can be GBs), and the volume hash over every
byte read.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import zstandard

from archive.errors import InvalidInput
from dr import crypt, segment
from dr.format import (
    CATALOG,
    CATALOG_BACKUP_DIR,
    INDEX,
    LABEL,
    READ_VERSIONS,
    SEGMENT_DIR,
    SIGNATURE,
    TAR_BLOCK,
    VOLUME_FORMAT,
    is_catalog_backup,
)
from dr.keys import identity_fingerprints
from dr.signing import check as check_signature

MAX_PLAIN = 2 * 1024 ** 3          # refuse to decompress a member to more than this


@dataclass
class RawMember:
    name: str
    offset: int
    size: int                       # as the header says
    data: bytes                     # what could be read (shorter when truncated)
    # A catalog backup member is never in ``data``: it is streamed to ``path`` (or
    # only hashed), ``got`` bytes of it, with ``sha256`` of those.
    path: Path | None = None
    got: int | None = None
    sha256: str | None = None

    @property
    def truncated(self) -> bool:
        return (len(self.data) if self.got is None else self.got) < self.size


@dataclass
class BackupMember:
    """A member under catalog-backup/: the audit key or a catalog snapshot, still
    encrypted (``path``: a file to read it from; None when not kept)."""
    name: str
    size: int
    sha256: str
    truncated: bool
    path: Path | None


@dataclass
class MemberResult:
    name: str
    offset: int
    size: int
    sha256: str
    ok: bool
    error: str = ""
    study_uid: str | None = None
    manifest: dict[str, Any] | None = None
    files: dict[str, bytes] | None = None


@dataclass
class VolumeRead:
    where: str
    label: dict[str, Any] | None = None
    members: list[MemberResult] = field(default_factory=list)
    index: dict[str, Any] | None = None
    catalog: dict[str, Any] | None = None
    stream_bytes: int = 0
    stream_sha256: str = ""
    errors: list[str] = field(default_factory=list)    # volume-level problems
    complete: bool = False                              # the archive's end was reached
    read: list[tuple[str, int, str]] = field(default_factory=list)  # (name, size, sha256)
    signature: bytes | None = None                      # the SIGNATURE.json member
    catalog_backups: list[BackupMember] = field(default_factory=list)
    signed_members: int = -1                            # members read before it
    # None: signed by a key in the identity files over exactly what was read; else why not
    unauthentic: str | None = "not checked"

    @property
    def barcode(self) -> str | None:
        return (self.label or {}).get("barcode")


class _Hashing:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.n, self.h = f, 0, hashlib.sha256()

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = self.f.read(n - len(out))
            if not b:
                break
            out += b
        self.n += len(out)
        self.h.update(out)
        return bytes(out)


def tar_members(f: BinaryIO, on_end: Callable[[int, str, bool], None],
                keep_backups: Path | None = None) -> Iterator[RawMember]:
    """Members of a tar stream, in order, without seeking. ``on_end(bytes, sha256,
    clean)`` is called once the stream is exhausted (clean: the end-of-archive
    blocks were found). A catalog backup member is streamed into a new file in
    ``keep_backups`` (the caller removes it), or only hashed when that is None."""
    src = _Hashing(f)
    clean = False
    pax: dict[str, str] = {}
    while True:
        at = src.n
        header = src.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK:
            break
        if header == b"\0" * TAR_BLOCK:
            clean = True
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise _Damaged(f"tar header at byte {at} unreadable ({e})", src) from None
        name = pax.get("path", info.name)
        if info.type not in (tarfile.XHDTYPE, tarfile.XGLTYPE) and is_catalog_backup(name):
            pax = {}
            m = _stream_member(src, name, at, info.size, keep_backups)
            src.read((-info.size) % TAR_BLOCK)
            yield m
            if m.truncated:
                break
            continue
        body = src.read(info.size)
        src.read((-info.size) % TAR_BLOCK)
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):    # pax extended header
            pax = _pax(body) if info.type == tarfile.XHDTYPE else pax
            continue
        name = pax.pop("path", info.name)
        size = int(pax.pop("size", info.size))
        pax = {}
        yield RawMember(name, at, size, body)
        if len(body) < info.size:
            break
    while src.read(1 << 20):                                   # padding to the record's end
        pass
    on_end(src.n, src.h.hexdigest(), clean)


def _stream_member(src: _Hashing, name: str, at: int, size: int,
                   keep: Path | None) -> RawMember:
    h = hashlib.sha256()
    got = 0
    out = tempfile.NamedTemporaryFile(dir=keep, prefix="tmp", suffix=".age", delete=False) \
        if keep is not None else None
    try:
        while got < size:
            chunk = src.read(min(1 << 20, size - got))
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return RawMember(name, at, size, b"", path=Path(out.name) if out is not None else None,
                     got=got, sha256=h.hexdigest())


class _Damaged(Exception):
    def __init__(self, msg: str, src: _Hashing) -> None:
        super().__init__(msg)
        self.src = src


def _pax(body: bytes) -> dict[str, str]:
    out = {}
    text = body.decode("utf-8", "replace")
    while text:
        length, _, rest = text.partition(" ")
        if not length.isdigit():
            break
        rec, text = text[:int(length)], text[int(length):]
        key, _, value = rec.partition(" ")[2].rstrip("\n").partition("=")
        out[key] = value
    return out


def ltfs_members(root: Path) -> Iterator[RawMember]:
    """The files of an LTFS volume directory in the order they were written."""
    names = [LABEL] \
        + sorted(str(p.relative_to(root)) for p in (root / CATALOG_BACKUP_DIR).glob("*.age")) \
        + sorted(str(p.relative_to(root)) for p in (root / SEGMENT_DIR).glob("*.age")) \
        + [INDEX, CATALOG, SIGNATURE]
    at = 0
    for name in names:
        p = root / name
        if not p.is_file() or p.is_symlink():
            continue
        if is_catalog_backup(name):         # read in place, never whole into memory
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            size = p.stat().st_size
            yield RawMember(name, at, size, b"", path=p, got=size, sha256=h.hexdigest())
            at += size
            continue
        data = p.read_bytes()
        yield RawMember(name, at, len(data), data)
        at += len(data)


def unpack(data: bytes, identities: list) -> bytes:
    """A member's plaintext: decrypted, then every zstd frame (a segment has two)
    decompressed, refused past MAX_PLAIN (a forged member could expand without end).
    Raises crypt.DecryptFailed or segment.SegmentError. Every reader of DR members
    (verify, import, restore) goes through here."""
    plain = crypt.decrypt(data, identities)
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(plain), read_across_frames=True) as r:
            while chunk := r.read(1 << 20):
                out += chunk
                if len(out) > MAX_PLAIN:
                    raise segment.SegmentError(
                        f"member decompresses to more than {MAX_PLAIN} bytes, the most "
                        "a reader accepts: refused")
    except zstandard.ZstdError as e:
        raise segment.SegmentError(f"zstd: {e}") from None
    return bytes(out)


def read_volume(where: str, identities: list, *, keep_files: bool = False,
                verify_keys: list | None = None, keep_backups: Path | None = None
                ) -> VolumeRead:
    """Read a whole volume and check everything that can be checked without the
    catalog: each segment decrypts (age authenticates it), decompresses and every
    file in it matches its manifest; the index agrees with what was read; the
    signature (``verify_keys``: from the identity files) covers exactly what was read.
    The catalog backup members of a tar stream are copied into ``keep_backups``
    when given (an LTFS volume's are read where they are)."""
    out = VolumeRead(where)
    mine = identity_fingerprints(identities)

    def ended(n: int, sha: str, clean: bool) -> None:
        out.stream_bytes, out.stream_sha256, out.complete = n, sha, clean

    path = Path(where)
    if where != "-" and path.is_dir():
        members: Iterator[RawMember] = ltfs_members(path)
        h = hashlib.sha256()
        total = 0
    else:
        try:
            f = sys.stdin.buffer if where == "-" else open(path, "rb")
        except OSError as e:
            raise InvalidInput(f"cannot open volume {where}: {e.strerror}") from None
        members = tar_members(f, ended, keep_backups)
        h = None
    try:
        for m in members:
            if h is not None:
                if m.path is not None:
                    with open(m.path, "rb") as mf:
                        while chunk := mf.read(1 << 20):
                            h.update(chunk)
                else:
                    h.update(m.data)
                total += m.size if m.path is not None else len(m.data)
            _member(out, m, identities, mine, keep_files)
    except _Damaged as e:
        out.errors.append(str(e))
        while e.src.read(1 << 20):
            pass
        ended(e.src.n, e.src.h.hexdigest(), False)
    finally:
        if h is None and where != "-":
            f.close()
    if h is not None:
        out.stream_bytes, out.stream_sha256 = total, h.hexdigest()
        out.complete = (path / CATALOG).is_file()
    if out.label is None:
        out.errors.insert(0, "no pacsvault label: not a pacsvault DR volume, or its start is lost")
    elif not out.complete:
        out.errors.append("the volume ends early (truncated): members after the damage are lost")
    _check_index(out)
    signed = out.read if out.signed_members == len(out.read) else out.read + [("", -1, "")]
    out.unauthentic = check_signature(out.signature, signed, verify_keys or [], out.label)
    return out


def _member(out: VolumeRead, m: RawMember, identities: list, mine: set[str],
            keep_files: bool) -> None:
    if m.name == SIGNATURE and out.signature is None and not m.truncated:
        out.signature, out.signed_members = m.data, len(out.read)
        return
    if is_catalog_backup(m.name):
        out.read.append((m.name, m.size, m.sha256 or ""))
        out.catalog_backups.append(BackupMember(m.name, m.size, m.sha256 or "", m.truncated,
                                                m.path))
        if m.truncated:
            out.errors.append(f"{m.name}: truncated")
        return
    out.read.append((m.name, m.size, hashlib.sha256(m.data).hexdigest()))
    if m.name == LABEL and not out.members and out.label is None:
        try:
            label = json.loads(m.data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            label = None
        if not isinstance(label, dict) or not isinstance(label.get("recipients", []), list):
            out.errors.append("label unreadable")
            return
        out.label = label
        if out.label.get("format") != VOLUME_FORMAT:
            out.errors.append("label is not a pacsvault DR volume label")
        elif out.label.get("version") not in READ_VERSIONS:
            out.errors.append(f"label version {out.label.get('version')!r} is not one this "
                              "pacsvault reads")
        if identities and not mine & set(out.label.get("recipients", [])):
            raise InvalidInput(
                f"volume {out.label.get('barcode')}: the identity given matches none of its "
                f"recipients (fingerprints {', '.join(out.label.get('recipients', []))}); "
                "give the identity (or escrow identity) it was written for")
        return
    sha = hashlib.sha256(m.data).hexdigest()
    r = MemberResult(m.name, m.offset, m.size, sha, ok=False)
    if m.truncated:
        r.error = f"truncated: {len(m.data)} of {m.size} bytes"
    if m.name in (INDEX, CATALOG):
        if not m.truncated:
            try:
                doc = json.loads(unpack(m.data, identities))
                if not isinstance(doc, dict):
                    raise segment.SegmentError("not a JSON object")
                if m.name == INDEX:
                    out.index = doc
                else:
                    out.catalog = doc
                return
            except (crypt.DecryptFailed, segment.SegmentError, json.JSONDecodeError) as e:
                r.error = f"{m.name} unreadable: {e}"
        out.errors.append(r.error)
        return
    if not m.truncated:
        try:
            manifest, files = segment.read(unpack(m.data, identities))
            r.ok, r.manifest, r.study_uid = True, manifest, manifest.get("study_uid")
            r.files = files if keep_files else None
        except crypt.DecryptFailed as e:
            r.error = f"does not decrypt (altered, or the wrong key): {e}"
        except segment.SegmentError as e:
            r.error = str(e)
    if not r.ok:
        # Name the study from the first chunks that still authenticate.
        plain = crypt.decrypt_prefix(m.data, identities)
        try:
            head = zstandard.ZstdDecompressor().decompressobj().decompress(plain)
        except zstandard.ZstdError:
            head = b""
        doc = segment.manifest_of_prefix(head)
        if doc:
            r.study_uid, r.manifest = doc.get("study_uid"), doc
    out.members.append(r)


def _check_index(out: VolumeRead) -> None:
    """Every segment the index lists was read with the size and SHA-256 it gives."""
    if out.index is None:
        return
    got = {m.name: m for m in out.members}
    segments = out.index.get("segments") if isinstance(out.index, dict) else None
    if not isinstance(segments, list) or not all(
            isinstance(e, dict) and isinstance(e.get("member"), str) for e in segments):
        out.errors.append("the index is malformed")
        out.index = None
        return
    for e in segments:
        m = got.get(e["member"])
        if m is None:
            out.errors.append(f"member {e['member']} listed in the index is missing")
            continue
        if m.study_uid is None:
            m.study_uid = e["study_uid"]
        if m.size != e["size"] or m.sha256 != e["sha256"]:
            m.ok = False
            m.error = m.error or "differs from the index (size or SHA-256)"
