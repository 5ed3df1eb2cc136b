"""Study segments: the plaintext inside one encrypted volume member.

A segment is a pax tar (before zstd and age) holding part of one study:

    pacsvault/<stem>.manifest.json     what the segment holds, with catalog rows
    pacsvault/<stem>.sha256            sha256sum -c lines for every file below
    pacsvault/<stem>.joined-sha256     (only with the last part of a split instance)
    <study-uid>/<series-uid>/<sop-uid>.dcm             a whole instance, bytes as received
    <study-uid>/<series-uid>/<sop-uid>.dcm.part0000    ... or one part of a larger one

``stem`` is ``<barcode>-<member number>``, unique in a volume set, so every
segment of a study can be extracted into one directory. An instance larger
than a segment is cut into parts (``cat X.dcm.part* > X.dcm`` joins them).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass
from typing import Any

from dr.format import SEGMENT_FORMAT, SEGMENT_RECORD, SEGMENT_VERSION, TAR_BLOCK


@dataclass
class Piece:
    """One file in a segment: a whole instance, or one part of a large one."""
    instance_fk: int
    entry: dict[str, Any]          # catalog facts of the instance (sop_uid, size, sha256, ...)
    path: str                      # of the whole instance inside the segment
    data: bytes
    part: int = 0
    parts: int = 1

    @property
    def file(self) -> str:
        return self.path if self.parts == 1 else f"{self.path}.part{self.part:04d}"


def instance_path(study_uid: str, entry: dict[str, Any]) -> str:
    v = entry.get("version", 1)
    name = entry["sop_uid"] + (f".v{v}" if v != 1 else "")
    return f"{study_uid}/{entry['series_uid']}/{name}.dcm"


def tar_pieces(stem: str, head: dict[str, Any], pieces: list[Piece],
               digests: list[str] | None = None
               ) -> tuple[bytes, list[bytes | memoryview], dict[str, Any]]:
    """The segment's tar, as tarfile writes it, in two parts: the front (manifest and
    checksum files: the writer compresses it as a zstd frame of its own, so the
    manifest can be read from the first bytes of a member damaged further on) and a
    list of buffers for the rest, the instances' bytes not copied; and the manifest.
    ``digests``: the pieces' SHA-256 when the caller has them (the writer's fetchers
    hashed them as they read). ``head``: volume_set, barcode, member, study (catalog
    rows), study_segment, last_of_study, study_instances."""
    if digests is None:
        digests = [hashlib.sha256(p.data).hexdigest() for p in pieces]
    files, sums, joined = [], [], []
    for p, digest in zip(pieces, digests, strict=True):
        files.append({**p.entry, "path": p.path, "file": p.file, "part": p.part,
                      "parts": p.parts, "part_size": len(p.data), "part_sha256": digest})
        sums.append(f"{digest}  {p.file}\n")
        if p.parts > 1 and p.part == p.parts - 1:
            joined.append(f"{p.entry['sha256']}  {p.path}\n")
    manifest = {"format": SEGMENT_FORMAT, "version": SEGMENT_VERSION, "stem": stem, **head,
                "files": files}
    now = int(time.time())
    front_members = [(f"pacsvault/{stem}.manifest.json",
                      json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode()),
                     (f"pacsvault/{stem}.sha256", "".join(sums).encode())]
    if joined:
        front_members.append((f"pacsvault/{stem}.joined-sha256", "".join(joined).encode()))
    front = b"".join(b for name, data in front_members for b in _tar_member(name, data, now))
    rest: list[bytes | memoryview] = []
    for p in pieces:
        rest += _tar_member(p.file, p.data, now)
    size = len(front) + sum(len(b) for b in rest) + 2 * TAR_BLOCK
    # tarfile's end of archive: two zero blocks, then zeros to a whole record.
    rest.append(bytes(2 * TAR_BLOCK + (-size) % SEGMENT_RECORD))
    return front, rest, manifest


def _tar_member(name: str, data: bytes | memoryview, mtime: int) -> list[bytes | memoryview]:
    """What tarfile.addfile writes for a regular file: its header, its data, zeros
    to a whole block."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o640
    out = [info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"), data]
    if len(data) % TAR_BLOCK:
        out.append(bytes(TAR_BLOCK - len(data) % TAR_BLOCK))
    return out


def build(stem: str, head: dict[str, Any], pieces: list[Piece]
          ) -> tuple[bytes, dict[str, Any], int]:
    """The segment's tar bytes whole, its manifest, and where the instance files
    start (see tar_pieces)."""
    front, rest, manifest = tar_pieces(stem, head, pieces)
    return front + b"".join(rest), manifest, len(front)


class SegmentError(ValueError):
    pass


def read(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest, {file: bytes}) of a segment's tar, each file checked against the
    manifest's SHA-256; SegmentError names what does not match."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        contents = {}
        manifest = None
        for m in tar:
            if not m.isfile():
                continue
            body = tar.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith(".manifest.json") and m.name.startswith("pacsvault/"):
                manifest = json.loads(body)
            elif not m.name.startswith("pacsvault/"):
                contents[m.name] = body
    except (tarfile.TarError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SegmentError(f"segment tar unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SEGMENT_FORMAT:
        raise SegmentError("segment has no manifest")
    try:                # a forged manifest must not crash the reader (dr/contents.py checks it)
        for f in manifest["files"]:
            body = contents.get(f["file"])
            if body is None:
                raise SegmentError(f"file {f['file']!r:.80} missing from its segment")
            if len(body) != f["part_size"] or \
                    hashlib.sha256(body).hexdigest() != f["part_sha256"]:
                raise SegmentError(f"file {f['file']!r:.80} does not match its SHA-256")
    except (KeyError, TypeError, AttributeError):
        raise SegmentError("segment manifest is malformed") from None
    return manifest, contents


def manifest_of_prefix(plain: bytes) -> dict[str, Any] | None:
    """The manifest from the first bytes of a segment (it is the tar's first
    member), for naming the study of a member damaged further on."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(plain), mode="r|")
        for m in tar:
            if m.name.endswith(".manifest.json"):
                return json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
            return None
    except Exception:
        return None
    return None
