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

from dr.format import SEGMENT_FORMAT, SEGMENT_VERSION


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


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o640
    tar.addfile(info, io.BytesIO(data))


def build(stem: str, head: dict[str, Any], pieces: list[Piece]
          ) -> tuple[bytes, dict[str, Any], int]:
    """The segment's tar bytes, its manifest, and where the instance files start
    (the writer compresses the head as a zstd frame of its own, so the manifest
    can be read from the first bytes of a member damaged further on).
    ``head``: volume_set, barcode, member, study (catalog rows), study_segment,
    last_of_study, study_instances."""
    files, sums, joined = [], [], []
    for p in pieces:
        digest = hashlib.sha256(p.data).hexdigest()
        files.append({**p.entry, "path": p.path, "file": p.file, "part": p.part,
                      "parts": p.parts, "part_size": len(p.data), "part_sha256": digest})
        sums.append(f"{digest}  {p.file}\n")
        if p.parts > 1 and p.part == p.parts - 1:
            joined.append(f"{p.entry['sha256']}  {p.path}\n")
    manifest = {"format": SEGMENT_FORMAT, "version": SEGMENT_VERSION, "stem": stem, **head, "files": files}
    now = int(time.time())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, f"pacsvault/{stem}.manifest.json",
             json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode(), now)
        _add(tar, f"pacsvault/{stem}.sha256", "".join(sums).encode(), now)
        if joined:
            _add(tar, f"pacsvault/{stem}.joined-sha256", "".join(joined).encode(), now)
        files_at = buf.tell()
        for p in pieces:
            _add(tar, p.file, p.data, now)
    return buf.getvalue(), manifest, files_at


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
