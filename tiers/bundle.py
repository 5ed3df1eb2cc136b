"""Study bundles: many instances in one object, each readable with one ranged GET.

Format ``pacsvault-bundle`` version 1 (docs/formats/study-bundle.md):

    frame 1 .. n   one zstd frame per instance: its Part 10 file, compressed alone
    manifest       one zstd frame: UTF-8 JSON naming every instance and its frame
    trailer        one zstd *skippable* frame (64 bytes): where the manifest is

The whole bundle is a valid zstd stream (``zstd -d`` skips the trailer), every
instance is an independent frame (a flipped byte damages one instance, and one
instance costs one ranged read), and the index sits at the end so the writer
never seeks back. Nothing here knows about the catalog or S3: a bundle is read
with only its bytes.
"""
from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import BinaryIO, Callable, Iterable

import zstandard

from archive.errors import InvalidInput
from archive.uids import validate_uid
from tiers.backend import LimitedReader

FORMAT = "pacsvault-bundle"
VERSION = 1
TRAILER_SIZE = 64
_SKIPPABLE_MAGIC = 0x184D2A5B          # zstd skippable frame, nibble B
_TRAILER_MAGIC = b"PVBUNDL1"
_CHUNK = 1024 * 1024
BUFFERED_MAX = 32 * 1024 * 1024   # members up to this size may be compressed ahead in memory


class BundleError(ValueError):
    """The bytes are not a readable bundle (truncated, tampered, other format)."""


@dataclass(frozen=True)
class Member:
    """One instance to put in a bundle; ``open`` yields its Part 10 bytes."""

    sop_uid: str
    series_uid: str
    sop_class: str
    transfer_syntax: str
    size: int
    sha256: str
    open: Callable[[], BinaryIO]
    version: int = 1
    # Further sources of the same bytes (the mirror copy), tried in order when
    # one is unreadable or does not match ``sha256``; needs a seekable output.
    alternatives: tuple[Callable[[], BinaryIO], ...] = ()
    # More catalog facts for the manifest entry (received_at, calling_ae, ...).
    extra: dict = field(default_factory=dict)


@dataclass
class Written:
    size: int = 0
    sha256: str = ""
    manifest: dict = field(default_factory=dict)
    # (sop_uid, version, source index, reason) for every source that failed and was
    # skipped: the version tells apart two objects received under one SOP UID.
    bad_sources: list = field(default_factory=list)


class _HashingWriter:
    """Counts and hashes everything written to the bundle (its object checksum).
    ``mark`` saves the hash state at a frame's start, so ``rewind`` can drop a
    frame whose source turned out bad without re-reading what came before."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.h = hashlib.sha256()
        self.n = 0
        self._mark = (0, self.h.copy())

    def write(self, b: bytes) -> int:
        self.out.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)

    def mark(self) -> None:
        self._mark = (self.n, self.h.copy())

    def rewind(self, offset: int) -> None:
        if offset != self._mark[0]:
            raise BundleError("can only rewind to the last mark")
        self.out.seek(offset)
        self.out.truncate(offset)
        self.n, self.h = offset, self._mark[1].copy()

    def finish(self) -> str:
        return self.h.hexdigest()


def write_bundle(out: BinaryIO, study: dict, members: Iterable[Member], *, level: int = 1,
                 now: datetime | None = None, bundle_id: str | None = None,
                 on_frame: Callable[[int, dict], None] | None = None,
                 workers: int = 1) -> Written:
    """Stream a bundle to ``out``. Each member's SHA-256 and size are re-checked
    while compressing; when a source does not match (or cannot be read) the
    member's next source is tried. When no source matches, BundleError is raised
    before the manifest is written, so an incomplete bundle has no trailer and is
    never mistaken for one. ``on_frame(end, entry)`` is called once each instance
    frame is final and flushed (tiers.growing).

    With ``workers`` > 1, members up to BUFFERED_MAX bytes are read, checked and
    compressed by that many threads ahead of the writer (hashlib and zstd release
    the GIL) and written in order; larger members are streamed through the
    writer, which needs a seekable ``out`` to cut back a frame whose source turns
    out bad. A non-seekable ``out`` is never seeked."""
    w = _HashingWriter(out)
    seekable = hasattr(out, "seekable") and out.seekable()
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    entries = []
    bad: list = []
    pool = ThreadPoolExecutor(workers, thread_name_prefix="bundle") if workers > 1 else None
    ahead: deque = deque()
    todo = iter(members)

    def refill() -> None:
        while len(ahead) < 2 * workers:
            m = next(todo, None)
            if m is None:
                return
            fut = (pool.submit(_compress_buffered, level, m)
                   if pool is not None and m.size <= BUFFERED_MAX else None)
            ahead.append((m, fut))

    try:
        refill()
        while ahead:
            m, fut = ahead.popleft()
            refill()
            offset = w.n
            if fut is not None:
                frame, why_list = fut.result()
                bad.extend((m.sop_uid, m.version, i, why) for i, why in why_list)
                if frame is None:
                    raise BundleError(f"member {len(entries)}: no source matches its "
                                      f"size/SHA-256 ({why_list[-1][1]})")
                w.write(frame)
            else:
                _stream_member(cctx, w, m, seekable, bad, len(entries))
            entry = {
                "sop_uid": m.sop_uid, "series_uid": m.series_uid, "sop_class": m.sop_class,
                "transfer_syntax": m.transfer_syntax, "version": m.version,
                "size": m.size, "sha256": m.sha256, "offset": offset, "length": w.n - offset,
            }
            entry.update({k: v for k, v in m.extra.items() if k not in entry})
            entries.append(entry)
            if on_frame is not None:
                if hasattr(out, "flush"):
                    out.flush()
                on_frame(w.n, entry)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    manifest = {
        "format": FORMAT, "version": VERSION, "bundle_id": bundle_id or str(uuid.uuid4()),
        "created_at": (now or datetime.now(timezone.utc)).isoformat(),
        "study": study, "instances": entries,
    }
    frame = cctx.compress(json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode())
    manifest_offset = w.n
    w.write(frame)
    payload = (_TRAILER_MAGIC + struct.pack("<QQ", manifest_offset, len(frame))
               + hashlib.sha256(frame).digest())
    w.write(struct.pack("<II", _SKIPPABLE_MAGIC, len(payload)) + payload)
    return Written(w.n, w.finish(), manifest, bad)


def _stream_member(cctx: zstandard.ZstdCompressor, w: "_HashingWriter", m: Member,
                   seekable: bool, bad: list, index_in_bundle: int) -> None:
    """Compress a member straight into the output, trying its sources in turn."""
    offset = w.n
    if seekable:
        w.mark()
    sources = (m.open, *m.alternatives)
    for index, source in enumerate(sources):
        why = _compress_member(cctx, w, m, source)
        if why is None:
            return
        bad.append((m.sop_uid, m.version, index, why))
        if not seekable or index == len(sources) - 1:
            raise BundleError(f"member {index_in_bundle}: no source matches its "
                              f"size/SHA-256 ({why})")
        w.rewind(offset)


def _compress_buffered(level: int, m: Member) -> tuple[bytes | None, list[tuple[int, str]]]:
    """Read a (small) member whole from its first matching source and compress it:
    (frame, [(source index, why) for each source that did not match])."""
    bad = []
    for index, source in enumerate((m.open, *m.alternatives)):
        try:
            with source() as src:
                data = src.read(m.size + 1)
                while len(data) <= m.size and (more := src.read(m.size + 1 - len(data))):
                    data += more
        except OSError as e:
            bad.append((index, f"unreadable: {type(e).__name__}"))
            continue
        except Exception as e:  # noqa: BLE001 - a backend error from source()
            if not hasattr(e, "exit_code"):
                raise
            bad.append((index, f"unreadable: {e}"))
            continue
        if len(data) != m.size:
            bad.append((index, "size differs"))
        elif hashlib.sha256(data).hexdigest() != m.sha256:
            bad.append((index, "SHA-256 differs"))
        else:
            cctx = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                            write_content_size=True)
            return cctx.compress(data), bad
    return None, bad


def _compress_member(cctx: zstandard.ZstdCompressor, w: "_HashingWriter", m: Member,
                     source: Callable[[], BinaryIO]) -> str | None:
    """Compress one source as one frame; None if it matched, else why not."""
    h = hashlib.sha256()
    size = 0
    try:
        with source() as src, cctx.stream_writer(w, size=m.size, closefd=False) as z:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                if size > m.size:
                    break
                z.write(chunk)
    except zstandard.ZstdError:  # the source's size differs from the frame header's
        return "size differs"
    except OSError as e:         # includes unreadable sources (BackendError is not one)
        return f"unreadable: {type(e).__name__}"
    except Exception as e:       # noqa: BLE001 - a backend error from source()
        if not hasattr(e, "exit_code"):
            raise
        return f"unreadable: {e}"
    if size != m.size:
        return "size differs"
    if h.hexdigest() != m.sha256:
        return "SHA-256 differs"
    return None


def parse_trailer(last: bytes, bundle_size: int) -> tuple[int, int, bytes]:
    """(manifest offset, manifest length, manifest frame SHA-256) from the last 64 bytes."""
    if len(last) != TRAILER_SIZE:
        raise BundleError("bundle shorter than its trailer")
    magic, n = struct.unpack_from("<II", last, 0)
    if magic != _SKIPPABLE_MAGIC or n != TRAILER_SIZE - 8 or last[8:16] != _TRAILER_MAGIC:
        raise BundleError("no bundle trailer (truncated, or not a pacsvault bundle)")
    offset, length = struct.unpack_from("<QQ", last, 16)
    if offset + length + TRAILER_SIZE != bundle_size:
        raise BundleError("trailer does not match the bundle's size")
    return offset, length, last[32:64]


def parse_manifest(frame: bytes, sha256: bytes) -> dict:
    if hashlib.sha256(frame).digest() != sha256:
        raise BundleError("manifest does not match the SHA-256 in the trailer")
    try:
        manifest = json.loads(zstandard.ZstdDecompressor().decompress(frame))
    except (zstandard.ZstdError, ValueError) as e:
        raise BundleError(f"manifest unreadable: {type(e).__name__}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION:
        raise BundleError("unsupported bundle format or version")
    _check_entries(manifest)
    return manifest


def _check_entries(manifest: dict) -> None:
    """A bundle is read back from storage others can write to: its UIDs pass the
    grammar ingest uses and its numbers are numbers before anything keys on them."""
    entries = manifest.get("instances")
    if not isinstance(entries, list):
        raise BundleError("manifest has no instance list")
    try:
        study = manifest.get("study")
        if isinstance(study, dict) and "study_uid" in study:
            validate_uid(study["study_uid"], "Study Instance")
        for e in entries:
            if not isinstance(e, dict):
                raise BundleError("manifest instance entry is not an object")
            validate_uid(e.get("sop_uid"), "SOP Instance")
            validate_uid(e.get("series_uid"), "Series Instance")
            for k in ("size", "offset", "length", "version"):
                v = e.get(k, 1)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise BundleError(f"manifest instance {k} is not a count")
            if not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
                raise BundleError("manifest instance sha256 is not a SHA-256")
    except InvalidInput as err:
        raise BundleError(f"manifest: {err}") from None


def extract(frame: bytes, entry: dict) -> bytes:
    """Decompress one instance's frame and check it against the manifest's SHA-256."""
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=entry["size"])
    except zstandard.ZstdError as e:
        raise BundleError(f"instance frame unreadable: {e}") from None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError("instance does not match its SHA-256")
    return data


def extract_to(src: BinaryIO, length: int, entry: dict, sink: BinaryIO | None = None) -> None:
    """Decompress one instance frame of ``length`` bytes read from ``src`` (positioned
    at the frame) into ``sink``, in bounded memory, checking its size and SHA-256
    against ``entry``. The frame is consumed whole, so ``src`` ends up at the next one."""
    limited = LimitedReader(src, length)
    h = hashlib.sha256()
    n = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(limited, read_size=_CHUNK,
                                                        closefd=False) as r:
            while chunk := r.read(_CHUNK):
                n += len(chunk)
                if n > entry["size"]:
                    raise BundleError("instance frame longer than its size")
                h.update(chunk)
                if sink is not None:
                    sink.write(chunk)
    except zstandard.ZstdError as e:
        raise BundleError(f"instance frame unreadable: {e}") from None
    while limited.read(_CHUNK):  # bytes past the frame's end (should be none)
        raise BundleError("instance frame shorter than its length")
    if n != entry["size"] or h.hexdigest() != entry["sha256"]:
        raise BundleError("instance does not match its SHA-256")


def skip_to(src: BinaryIO, pos: int, target: int) -> int:
    """Read forward from ``pos`` to ``target`` (streams cannot seek); returns ``target``."""
    while pos < target:
        chunk = src.read(min(target - pos, _CHUNK))
        if not chunk:
            raise BundleError("bundle ends before a frame the manifest names")
        pos += len(chunk)
    if pos > target:
        raise BundleError("manifest frames overlap")
    return pos


def check_frames(src: BinaryIO, entries: list[dict]) -> None:
    """Read a bundle front to back (a file or one GET) and check every listed
    instance frame against its entry's size and SHA-256, in bounded memory."""
    pos = 0
    for entry in sorted(entries, key=lambda e: e["offset"]):
        pos = skip_to(src, pos, entry["offset"])
        extract_to(src, entry["length"], entry)
        pos += entry["length"]


class BundleReader:
    """Reads a bundle through ``read_range(offset, length) -> bytes`` (a file, a
    ranged S3 GET): one read for the trailer, one for the manifest, one per instance."""

    def __init__(self, read_range: Callable[[int, int], bytes], size: int) -> None:
        self.read_range = read_range
        self.size = size
        if size < TRAILER_SIZE:
            raise BundleError("bundle shorter than its trailer")
        off, length, sha = parse_trailer(read_range(size - TRAILER_SIZE, TRAILER_SIZE), size)
        self.manifest = parse_manifest(read_range(off, length), sha)
        self.by_sop = {(e["sop_uid"], e.get("version", 1)): e for e in self.manifest["instances"]}

    def read(self, entry: dict) -> bytes:
        return extract(self.read_range(entry["offset"], entry["length"]), entry)
