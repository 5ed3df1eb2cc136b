"""`dr write`: stream every study not yet on a DR volume of the pool onto volumes.

Per run, under the pool's lease:

1. a volume left 'writing' by a writer that died is marked 'failed' (its
   segments stop counting, so its studies are written again);
2. the studies whose instances are not all on a good volume of the pool are
   read, oldest first, from a copy that verifies against the catalog SHA-256
   (an online site, else the instance's frame in a bundle on the object tier);
3. a reader thread cuts them into segments (dr/segment.py) while three fetchers
   read and hash the instances into the segment's buffer; two workers stream
   each segment's tar through zstd (which releases the GIL) into Debian's age
   (a process of its own, on the other core), whose output a thread hashes as
   it comes; the main thread writes the members in order to the volume and
   records each segment in the catalog;
4. when the next member would not leave room for the volume's tail, the volume
   is finished (encrypted index and catalog members, end of archive) and sealed,
   and the set continues on the next barcode: at once for a '{barcode}' path
   or an LTFS mount, after the operator loads it for a tape/FIFO/stdout.

Memory is bounded by the segment size times the pipeline depth, whatever the
size of a study: DEPTH + 2 reading buffers and DEPTH + 1 sealed-member buffers
of about one segment each, reused from segment to segment (~290 MB peak RSS
with 32 MiB segments). Nothing is sealed until its last byte is written and
flushed. Throughput and where the CPU goes: docs/performance.md, "DR volumes".
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, insert, select, update

from archive import failpoints, phi
from archive.audit import mark_path as audit_mark_path
from archive.catalog import lease, snapshot
from archive.catalog.lease import holder_is_dead_here, new_holder
from archive.catalog.models import (
    Bundle,
    DrInstance,
    DrSegment,
    DrVolume,
    Instance,
    Study,
)
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.config.schema import DrSettings
from archive.errors import InvalidInput, describe_failure
from dr import crypt, segment, signing
from dr.format import (
    AUDIT_KEY,
    CATALOG,
    CATALOG_FORMAT,
    FAILED,
    GOOD_STATES,
    INDEX,
    INDEX_FORMAT,
    LABEL,
    SEALED,
    SIGNATURE,
    VERSION,
    VOLUME_FORMAT,
    WRITING,
    catalog_backup_member,
    segment_member,
    segment_stem,
)
from dr.keys import fingerprint
from dr.sinks import Volume, one_volume_per_run, open_volume
from tiers import study_state
from tiers.backend import Backend, BackendError, FilePayload, ObjectNotFound
from tiers.bundle import BundleError
from tiers.verified_copy import copy_verified, frame_verified

log = logging.getLogger("pacsvault.dr")

DEPTH = 2      # segments compressed/encrypted ahead of the one being written
FETCHERS = 3   # instances read and hashed at once: keeps the disk and both cores busy
SEALERS = 2    # segments compressed and encrypted at once


@dataclass
class Finding:
    kind: str                     # no-source
    study_uid: str
    sop_uid: str
    detail: str


@dataclass
class VolumeReport:
    barcode: str
    sequence: int
    where: str
    bytes: int = 0
    segments: int = 0
    studies: int = 0
    sha256: str | None = None
    continues: bool = False


@dataclass
class WriteReport:
    pool: str
    volume_set: str | None = None
    volumes: list[VolumeReport] = field(default_factory=list)
    studies: int = 0              # studies whose pending instances were all written
    instances: int = 0
    bytes: int = 0                # instance bytes (before compression)
    seconds: float = 0.0
    pending_studies: int = 0      # left for a next volume / run
    next_barcode: str | None = None
    failed_volumes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> dict[str, Any]:
        """Counts and barcodes, for job_runs (no UIDs)."""
        j = self.to_json()
        return {k: j[k] for k in ("studies", "instances", "bytes", "stream_bytes",
                                  "pending_studies")} | {"volumes": [v.barcode for v in self.volumes]}

    def to_json(self) -> dict[str, Any]:
        stream = sum(v.bytes for v in self.volumes)
        return {
            "pool": self.pool, "volume_set": self.volume_set, "ok": self.ok,
            "volumes": [v.__dict__ for v in self.volumes],
            "studies": self.studies, "instances": self.instances, "bytes": self.bytes,
            "stream_bytes": stream, "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.bytes / 1e6 / self.seconds, 1) if self.seconds else None,
            "pending_studies": self.pending_studies, "next_barcode": self.next_barcode,
            "complete": self.pending_studies == 0,
            "failed_volumes": self.failed_volumes,
            "findings": [f.__dict__ for f in self.findings],
        }


@dataclass
class _Raw:
    """A segment built by the reader thread, waiting to be compressed and encrypted."""
    study_fk: int
    study_uid: str
    study_segment: int
    last: bool
    pieces: list[segment.Piece]
    study_doc: dict[str, Any]
    study_instances: int
    bytes: int
    done_study: bool             # every pending instance of the study is in this or earlier
    digests: list[str] = field(default_factory=list)   # SHA-256 of each piece's data
    slab: bytearray | None = None  # the buffer most pieces' data are views of


@dataclass
class _Sealed:
    """A segment compressed and encrypted, ready to be written as one member."""
    name: str
    chunks: list[bytes | memoryview]   # the age file: a view of ``buf``, then any overflow
    size: int
    manifest: dict[str, Any]
    sha256: str
    buf: bytearray | None        # the pooled buffer ``chunks`` is (mostly) a view of


class _End:
    pass


class _Buffers:
    """Buffers reused from segment to segment: the reader's slabs (instances are
    read into them) and the sealed members (age's output is read into them).
    Reused, their pages are faulted in once rather than on every read (a fresh
    bytes object per instance cost as much CPU as hashing it); their number
    bounds the writer's memory whatever the size of a study."""

    def __init__(self, count: int, size: int, halt: threading.Event) -> None:
        self.size, self.halt = size, halt
        self.free: queue.Queue[bytearray] = queue.Queue()
        self.unmade = count          # made on first need: a small write stays small
        self.lock = threading.Lock()

    def get(self) -> bytearray | None:
        """A free buffer (waiting for one), or None once the writer stops."""
        with self.lock:
            if self.unmade and self.free.empty():
                self.unmade -= 1
                return bytearray(self.size)
        while not self.halt.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def put(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.free.put(buf)

    def replace_lost(self) -> None:
        with self.lock:
            self.unmade += 1


def pending_studies(session, pool: str, study_fks: list[int] | None = None) -> list[tuple[int, int]]:  # noqa: ANN001
    """(study id, instances to write) for studies not wholly on good volumes of ``pool``."""
    covered = (select(DrInstance.instance_fk)
               .join(DrSegment, DrSegment.id == DrInstance.segment_fk)
               .join(DrVolume, DrVolume.id == DrSegment.volume_fk)
               .where(DrVolume.pool == pool, DrVolume.state.in_(GOOD_STATES),
                      DrInstance.part == DrInstance.parts - 1))
    q = (select(Instance.study_fk, func.count())
         .where(Instance.id.not_in(covered)).group_by(Instance.study_fk)
         .order_by(Instance.study_fk))
    if study_fks:
        q = q.where(Instance.study_fk.in_(study_fks))
    return [(fk, n) for fk, n in session.execute(q)]


class DrWriter:
    def __init__(self, catalog: Catalog, sites: list[Backend], tier: Backend | None,
                 settings: DrSettings, *, recipients: list[str],
                 signing_key: Ed25519PrivateKey, device: str | None = None,
                 kind: str | None = None, capacity: int | None = None,
                 barcode: str | None = None, clock: Clock = utcnow,
                 progress: Callable[[int], None] | None = None,
                 next_volume: Callable[[str], bool] | None = None,
                 stop: threading.Event | None = None, scratch: Path | None = None,
                 audit_key: Path | None = None) -> None:
        if not recipients:
            raise InvalidInput("no DR recipients: set [dr] recipients (age1...) or give "
                               "--recipient; make a key with 'pacsvault dr keygen'")
        self.catalog = catalog
        self.sites = {s.name: s for s in sites}
        self.tier = tier
        self.s = settings
        self.recipients = list(dict.fromkeys(recipients))
        self.signing_key = signing_key
        self.kind = kind or settings.kind
        self.device = device if device is not None else settings.device
        self.capacity = capacity or settings.capacity
        if self.capacity < 4 * settings.segment_bytes:
            raise InvalidInput(f"capacity {self.capacity} is below 4 x segment_bytes "
                               f"({settings.segment_bytes}): lower [dr] segment_bytes")
        self.first_barcode = barcode
        self.clock = clock
        self.progress = progress or (lambda n: None)
        self.next_volume = next_volume
        self.stop = stop or threading.Event()
        # Where an instance larger than a segment, or read from a bundle, is copied
        # and verified before any of it is written.
        self.scratch = scratch or Path(tempfile.gettempdir())
        # The audit trail's key (archive/audit.py) goes on every volume with the
        # catalog, so that the trail restored from a volume still verifies.
        self.audit_key = audit_key
        self.holder = new_holder()
        self._local = threading.local()

    # -- the run ---------------------------------------------------------------------
    def run(self, study_uids: list[str] | None = None) -> WriteReport:
        t0 = time.monotonic()
        report = WriteReport(self.s.pool)
        with lease.lease(self.catalog, f"job:dr-write:{self.s.pool}", what="DR writing for "
                         f"pool {self.s.pool}", ttl_s=300):
            report.failed_volumes = self._settle_dead_writers()
            todo = self._todo(study_uids)
            report.pending_studies = len(todo)
            if todo:
                self._write(todo, report)
        report.seconds = time.monotonic() - t0
        return report

    def _settle_dead_writers(self) -> list[str]:
        failed = []
        with self.catalog.unit(write=True) as uow:
            for v in uow.session.scalars(select(DrVolume).where(DrVolume.state == WRITING)):
                # We hold the pool's lease, so a 'writing' volume's writer is gone.
                if v.pool == self.s.pool or holder_is_dead_here(v.writer):
                    v.state = FAILED
                    failed.append(v.barcode)
                    log.error("DR volume %s was left unfinished by a writer that stopped; "
                              "marked failed, its studies are written again", v.barcode)
            uow.commit()
        return failed

    def _todo(self, study_uids: list[str] | None) -> list[tuple[int, int]]:
        with self.catalog.unit() as uow:
            fks = None
            if study_uids:
                fks = []
                for uid in study_uids:
                    fk = study_state.study_fk_of(uow.session, uid)
                    if fk is None:
                        raise InvalidInput(f"no study {uid} in the catalog")
                    fks.append(fk)
            return pending_studies(uow.session, self.s.pool, fks)

    # -- volumes -----------------------------------------------------------------------
    def _set_and_sequence(self) -> tuple[str, int]:
        """Continue the pool's set if its last volume said it goes on, else a new set."""
        with self.catalog.unit() as uow:
            last = uow.session.scalars(select(DrVolume).where(
                DrVolume.pool == self.s.pool, DrVolume.state.in_(GOOD_STATES))
                .order_by(DrVolume.id.desc()).limit(1)).first()
            if last is not None and last.continues:
                return last.volume_set, last.sequence + 1
        return str(uuid.uuid4()), 1

    def _next_barcode(self) -> str:
        with self.catalog.unit() as uow:
            codes = uow.session.scalars(select(DrVolume.barcode).where(
                DrVolume.barcode.like(f"{self.s.barcode_prefix}%")))
            nums = [int(c[len(self.s.barcode_prefix):]) for c in codes
                    if c[len(self.s.barcode_prefix):].isdigit()]
        return f"{self.s.barcode_prefix}{max(nums, default=0) + 1:06d}"

    def _open(self, volume_set: str, seq: int, barcode: str) -> tuple[Volume, int, str]:
        with self.catalog.unit() as uow:
            if uow.session.scalar(select(DrVolume.id).where(DrVolume.barcode == barcode)):
                raise InvalidInput(f"barcode {barcode} is already in the catalog")
        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.scratch, prefix="tmp") as tmp:
            # Taken before this volume's row exists: a catalog restored from it never
            # holds a volume 'writing' (the volume's own rows are in its CATALOG member).
            backup = self._catalog_backup(Path(tmp))
            vol, where = open_volume(self.kind, self.device, barcode, self.s.block_size)
            head = sum(vol.cost(name, path.stat().st_size) for name, path in backup)
            self._head_signed = [(LABEL, 0, "")] + [(name, 0, "") for name, _ in backup]
            room = self.capacity - vol.cost(LABEL, 4096) - head - self._tail_cost(
                vol, self._new_tail(volume_set, barcode, seq))
            if room < vol.cost(segment_member(segment_stem(barcode, 1)),
                               self.s.segment_bytes * 65 // 64 + (64 << 10)):
                vol.abort()
                raise InvalidInput(f"the catalog backup ({head} bytes) leaves no room for a "
                                   f"segment on a volume of {self.capacity} bytes: raise "
                                   "[dr] capacity (or lower [dr] segment_bytes)")
            now = self.clock()
            label = {
                "format": VOLUME_FORMAT, "version": VERSION, "barcode": barcode,
                "pool": self.s.pool, "volume_set": volume_set, "sequence": seq,
                "created_at": now.isoformat(), "block_size": self.s.block_size,
                "capacity": self.capacity, "kind": self.kind,
                "recipients": [fingerprint(r) for r in self.recipients],
                "segment_cipher": "age-encryption.org/v1 (X25519)",
                "segment_compression": "zstd",
            }
            with self.catalog.unit(write=True) as uow:
                row = DrVolume(barcode=barcode, pool=self.s.pool, volume_set=volume_set,
                               sequence=seq, capacity=self.capacity,
                               block_size=self.s.block_size, bytes=0, segments=0, studies=0,
                               state=WRITING, location="", device=where, kind=self.kind,
                               recipients=json.dumps(label["recipients"]), continues=False,
                               writer=self.holder, created_at=now)
                uow.session.add(row)
                uow.commit()
                vol_id = row.id
            text = json.dumps(label, indent=1, sort_keys=True).encode() + b"\n"
            vol.member(LABEL, text)
            self._head_signed = [(LABEL, len(text), hashlib.sha256(text).hexdigest())]
            for name, path in backup:
                self._head_signed.append(_file_member(vol, name, path))
        log.info("DR volume %s (set %s, #%d) opened on %s", barcode, volume_set[:8], seq, where)
        return vol, vol_id, where

    def _catalog_backup(self, tmp: Path) -> list[tuple[str, Path]]:
        """The audit key and a snapshot of the whole catalog, each encrypted to the
        recipients, as (member name, file) in writing order."""
        out = []
        if self.audit_key is not None and self.audit_key.is_file():
            mark = audit_mark_path(self.audit_key)
            doc = {"format": "pacsvault-audit-key", "version": 1,
                   "key_file": self.audit_key.read_text(),
                   "chain_file": mark.read_text() if mark.is_file() else None}
            plain = tmp / "audit-key.json"
            fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            sealed = tmp / "audit-key.json.age"
            crypt.encrypt_file(str(plain), str(sealed), self.recipients)
            plain.unlink()
            out.append((AUDIT_KEY, sealed))
        packed, _, _ = snapshot.take_compressed(self.catalog, tmp, self.clock())
        sealed = tmp / (packed.name + ".age")
        crypt.encrypt_file(str(packed), str(sealed), self.recipients)
        packed.unlink()
        out.append((catalog_backup_member(packed.name), sealed))
        return out

    # -- the pipeline ------------------------------------------------------------------------
    def _write(self, todo: list[tuple[int, int]], report: WriteReport) -> None:
        volume_set, seq = self._set_and_sequence()
        report.volume_set = volume_set
        # Segments in flight: DEPTH being sealed or written, one queued, one being read.
        raw_q: queue.Queue = queue.Queue(maxsize=1)
        halt = threading.Event()
        slabs = _Buffers(DEPTH + 2, self.s.segment_bytes, halt)
        # Sealed members: DEPTH being sealed or waiting, one being written. Room for
        # zstd's worst case and age's 16 bytes per 64 KiB; a longer one spills over.
        self._sealed = _Buffers(DEPTH + 1, self.s.segment_bytes * 65 // 64 + (1 << 20), halt)
        fetch = ThreadPoolExecutor(FETCHERS, thread_name_prefix="dr-fetch")
        reader = threading.Thread(target=self._read_segments,
                                  args=(todo, raw_q, halt, report, slabs, fetch),
                                  name="dr-reader", daemon=True)
        reader.start()
        pool = ThreadPoolExecutor(SEALERS, thread_name_prefix="dr-seal")
        ahead: deque[tuple[_Raw, Future]] = deque()
        barcode = self.first_barcode or self._next_barcode()
        vol = vol_id = None
        tail: dict[str, Any] = {}
        written_studies: set[int] = set()
        try:
            vol, vol_id, where = self._open(volume_set, seq, barcode)
            vrep = VolumeReport(barcode, seq, where)
            tail = self._new_tail(volume_set, barcode, seq)
            member_no = 0
            end = False
            while True:
                while not end and len(ahead) < DEPTH:
                    item = raw_q.get()
                    if isinstance(item, _End):
                        end = True
                        break
                    ahead.append((item, pool.submit(self._seal, item, barcode, member_no
                                                    + len(ahead) + 1, volume_set)))
                if not ahead:
                    break
                raw, fut = ahead.popleft()
                member_no += 1
                sealed = fut.result()
                if vol.used + vol.cost(sealed.name, sealed.size) + self._tail_cost(vol, tail) \
                        > self.capacity:
                    # End of medium: close this volume cleanly, continue on the next.
                    self._seal_volume(vol, vol_id, vrep, tail, continues=True)
                    report.volumes.append(vrep)
                    seq += 1
                    barcode = self._next_barcode()
                    if one_volume_per_run(self.kind, self.device) and not (
                            self.next_volume and self.next_volume(barcode)):
                        report.next_barcode = barcode
                        vol = None
                        break
                    vol, vol_id, where = self._open(volume_set, seq, barcode)
                    vrep = VolumeReport(barcode, seq, where)
                    tail = self._new_tail(volume_set, barcode, seq)
                    # Segments are named for their volume: seal this one again for it.
                    member_no = 1
                    self._sealed.put(sealed.buf)
                    sealed = self._seal(raw, barcode, member_no, volume_set)
                    for i, (r2, old) in enumerate(list(ahead)):
                        old.add_done_callback(self._drop)
                        ahead[i] = (r2, pool.submit(self._seal, r2, barcode, member_no + i + 1,
                                                    volume_set))
                offset = vol.member(sealed.name, sealed.chunks)
                failpoints.hit("dr.after_member")
                self._record_segment(vol_id, raw, sealed.name, offset, sealed.size, sealed.sha256,
                                     sealed.manifest, tail)
                slabs.put(raw.slab)
                self._sealed.put(sealed.buf)
                vrep.segments += 1
                report.instances += len({p.instance_fk for p in raw.pieces if p.part == p.parts - 1})
                report.bytes += raw.bytes
                self.progress(raw.bytes)
                if raw.done_study:
                    written_studies.add(raw.study_fk)
                    report.studies += 1
                if self.stop.is_set():
                    break
            if vol is not None:
                self._seal_volume(vol, vol_id, vrep, tail, continues=False)
                report.volumes.append(vrep)
                vol = None
        finally:
            halt.set()
            while reader.is_alive():                 # unblock a reader waiting on the queue
                try:
                    raw_q.get_nowait()
                except queue.Empty:
                    reader.join(0.05)
            pool.shutdown(wait=True, cancel_futures=True)
            fetch.shutdown(wait=True, cancel_futures=True)
            if vol is not None:                      # an error mid-volume: it stays 'writing'
                vol.abort()                          # until the next run marks it failed
        with self.catalog.unit() as uow:
            report.pending_studies = len(pending_studies(uow.session, self.s.pool))

    def _seal(self, raw: _Raw, barcode: str, member_no: int, volume_set: str) -> _Sealed:
        """Build, compress, encrypt and hash one segment (runs in a worker thread).
        The tar is never assembled: its pieces stream through zstd (which drops the
        GIL) into age (another process, on the other core), whose output is hashed
        by a thread as it arrives."""
        stem = segment_stem(barcode, member_no)
        name = segment_member(stem)
        head = {"volume_set": volume_set, "barcode": barcode, "member": name,
                "study_uid": raw.study_uid, "study_segment": raw.study_segment,
                "last_of_study": raw.last, "study_instances": raw.study_instances,
                "study": raw.study_doc}
        front, files, manifest = segment.tar_pieces(stem, head, raw.pieces, raw.digests)
        cctx = self._compressor()
        buf = self._sealed.get()
        enc = crypt.Encryptor(self.recipients, out=buf)
        try:
            # Two zstd frames (zstd -d reads them as one stream): the manifest's frame
            # stays readable when a later part of the member is damaged.
            enc.write(cctx.compress(front))
            z = cctx.compressobj(size=sum(len(b) for b in files))
            for piece in files:
                enc.write(z.compress(piece))
            enc.write(z.flush())
            chunks, size, sha = enc.finish()
        finally:
            enc.abort()
        return _Sealed(name, chunks, size, manifest, sha, buf)

    def _compressor(self) -> zstandard.ZstdCompressor:
        """This worker thread's compressor, kept: its tables are allocated once."""
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.s.zstd_level)
        return cctx

    def _drop(self, fut: Future) -> None:
        """A seal made for a volume that was closed meanwhile: its buffer is free."""
        if not fut.cancelled() and fut.exception() is None:
            self._sealed.put(fut.result().buf)

    # -- tail: index and catalog -----------------------------------------------------------------
    def _new_tail(self, volume_set: str, barcode: str, seq: int) -> dict[str, Any]:
        return {"index": {"format": INDEX_FORMAT, "version": VERSION,
                          "volume_set": volume_set, "barcode": barcode, "sequence": seq,
                          "pool": self.s.pool, "segments": [], "continues": False},
                "catalog": {"format": CATALOG_FORMAT, "version": VERSION,
                            "volume_set": volume_set, "barcode": barcode, "studies": {}},
                "raw": 2048, "signed": list(self._head_signed)}

    def _tail_cost(self, vol: Volume, tail: dict[str, Any]) -> int:
        """An upper bound of what the index, the catalog and the archive's end take:
        JSON never grows under zstd by more than a little, age adds a header and
        16 bytes per 64 KiB."""
        est = int(tail["raw"] * 1.02) + 4096 + 512 * len(self.recipients)
        est += est // 65536 * 16
        signature = 1024 + 160 * (len(tail["signed"]) + 3)    # every member, the next included
        return 2 * vol.cost(INDEX, est) + vol.cost(SIGNATURE, signature) + 1024 \
            + self.s.block_size

    def _record_segment(self, vol_id: int, raw: _Raw, name: str, offset: int, size: int,
                        sha: str, manifest: dict[str, Any], tail: dict[str, Any]) -> None:
        entry = {"member": name, "offset": offset, "size": size, "sha256": sha,
                 "study_uid": raw.study_uid, "study_segment": raw.study_segment,
                 "last_of_study": raw.last, "instances": len(raw.pieces), "bytes": raw.bytes}
        tail["index"]["segments"].append(entry)
        tail["signed"].append((name, size, sha))
        cat = tail["catalog"]["studies"].setdefault(
            raw.study_uid, {"study": raw.study_doc, "instances": {}})
        for f in manifest["files"]:
            keep = {k: v for k, v in f.items() if k not in ("file", "part", "part_size",
                                                             "part_sha256", "path")}
            cat["instances"][f"{f['sop_uid']}/{f.get('version', 1)}"] = keep
        tail["raw"] += len(json.dumps(entry)) + sum(len(json.dumps(f)) for f in manifest["files"])
        tail["raw"] += len(json.dumps(raw.study_doc)) if raw.study_segment == 1 else 0
        with self.catalog.unit(write=True) as uow:
            seg = DrSegment(volume_fk=vol_id, study_fk=raw.study_fk, member=name,
                            study_segment=raw.study_segment, last_of_study=raw.last,
                            offset=offset, size=size, sha256=sha,
                            instances=len(raw.pieces), bytes=raw.bytes)
            uow.session.add(seg)
            uow.session.flush()
            # One executemany, not an ORM object per instance (the writing thread's time).
            uow.session.execute(insert(DrInstance), [
                {"instance_fk": p.instance_fk, "segment_fk": seg.id, "path": p.file,
                 "part": p.part, "parts": p.parts} for p in raw.pieces])
            uow.commit()

    def _seal_volume(self, vol: Volume, vol_id: int, vrep: VolumeReport, tail: dict[str, Any],
                     continues: bool) -> None:
        tail["index"]["continues"] = continues
        tail["catalog"]["studies"] = [
            {"study": v["study"], "instances": list(v["instances"].values())}
            for v in tail["catalog"]["studies"].values()]
        for name, doc in ((INDEX, tail["index"]), (CATALOG, tail["catalog"])):
            body = zstandard.ZstdCompressor(level=3).compress(
                json.dumps(doc, sort_keys=True, ensure_ascii=False).encode())
            data = crypt.encrypt(body, self.recipients)
            vol.member(name, data)
            tail["signed"].append((name, len(data), hashlib.sha256(data).hexdigest()))
        # Last: the signature over every member written (the writer never seeks back).
        head = {k: tail["index"][k] for k in ("barcode", "volume_set", "sequence")}
        vol.member(SIGNATURE, signing.sign(self.signing_key, head, tail["signed"]))
        size, sha = vol.finish()
        now = self.clock()
        studies = len({s["study_uid"] for s in tail["index"]["segments"]})
        with self.catalog.unit(write=True) as uow:
            uow.session.execute(update(DrVolume).where(DrVolume.id == vol_id).values(
                state=SEALED, sealed_at=now, bytes=size, stream_sha256=sha,
                segments=len(tail["index"]["segments"]), studies=studies, continues=continues,
                writer="", retain_until=now + timedelta(days=self.s.retain_days)))
            uow.commit()
        vrep.bytes, vrep.sha256, vrep.studies, vrep.continues = size, sha, studies, continues
        log.info("DR volume %s sealed: %d segments, %d studies, %d bytes%s", vrep.barcode,
                 vrep.segments, studies, size, "; the set continues" if continues else "")

    # -- reading the studies (reader thread) ----------------------------------------------------
    def _read_segments(self, todo: list[tuple[int, int]], out: queue.Queue,
                       halt: threading.Event, report: WriteReport, slabs: _Buffers,
                       fetch: ThreadPoolExecutor) -> None:
        try:
            for study_fk, _ in todo:
                if halt.is_set() or self.stop.is_set():
                    break
                try:
                    for raw in self._study_segments(study_fk, report, slabs, fetch):
                        while not halt.is_set():
                            try:
                                out.put(raw, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if halt.is_set():
                            return
                except Exception as e:  # noqa: BLE001 - one bad study never stops the others
                    # The failed study may have taken a slab it never handed on: let one
                    # more be made rather than let the pool run dry.
                    slabs.replace_lost()
                    uid = self._study_uid(study_fk)
                    why = describe_failure(e)
                    report.findings.append(Finding("study-failed", uid, "", f"not written: {why}"))
                    log.error("DR write: study %s not written (%s); going on with the others",
                              uid, why)
        except Exception:
            log.exception("DR reader failed")
        finally:
            while not halt.is_set():
                try:
                    out.put(_End(), timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _study_uid(self, study_fk: int) -> str:
        with self.catalog.unit() as uow:
            return uow.session.scalar(select(Study.study_uid).where(Study.id == study_fk)) or \
                f"(study row {study_fk})"

    def _study_segments(self, study_fk: int, report: WriteReport, slabs: _Buffers,
                        fetch: ThreadPoolExecutor) -> Iterator[_Raw]:
        with self.catalog.unit() as uow:
            state = study_state.load(uow.session, study_fk)
            covered = set(uow.session.scalars(
                select(DrInstance.instance_fk)
                .join(DrSegment, DrSegment.id == DrInstance.segment_fk)
                .join(DrVolume, DrVolume.id == DrSegment.volume_fk)
                .where(DrSegment.study_fk == study_fk, DrVolume.pool == self.s.pool,
                       DrVolume.state.in_(GOOD_STATES), DrInstance.part == DrInstance.parts - 1)))
        uid = state.study.study_uid
        doc = state.manifest_study()
        todo = [i for i in state.instances if i.id not in covered]
        cap = self.s.segment_bytes
        pieces: list[segment.Piece] = []
        digests: list[str] = []
        fetching: list[tuple[Any, dict[str, Any], str, Future]] = []
        size = used = n = 0          # size: of the segment, fetches included; used: of the slab
        slab: bytearray | None = None
        # A segment that was cut is yielded once a later piece of the study is known
        # to be read: if none is (no copy verifies), it is the study's last after all.
        held: _Raw | None = None

        def settle() -> None:
            """The instances being fetched join the segment, in order."""
            nonlocal size, used
            for inst, entry, path, fut in fetching:
                try:
                    data, digest = fut.result()
                except _NoSource as e:
                    report.findings.append(Finding("no-source", uid, inst.sop_uid, str(e)))
                    log.error("DR write: object %s has no copy that verifies; not written",
                              phi.token(inst.sop_uid))
                    continue
                pieces.append(segment.Piece(inst.id, entry, path, data, 0, 1))
                digests.append(digest)
            fetching.clear()
            size = sum(len(p.data) for p in pieces)
            if not pieces:
                used = 0

        def cut(last: bool) -> _Raw:
            nonlocal pieces, digests, size, used, n, slab
            n += 1
            raw = _Raw(study_fk, uid, n, last, pieces, doc, len(state.instances), size, last,
                       digests, slab)
            pieces, digests, size, used, slab = [], [], 0, 0, None
            return raw

        for inst in todo:
            entry = {"sop_uid": inst.sop_uid, "version": inst.version,
                     "series_uid": inst.series_uid, "sop_class": inst.sop_class,
                     "transfer_syntax": inst.transfer_syntax, "size": inst.size,
                     "sha256": inst.sha256, "received_at": inst.received_at.isoformat(),
                     "calling_ae": inst.calling_ae, "conflict": inst.conflict}
            path = segment.instance_path(uid, entry)
            if inst.size <= cap:
                # A whole instance: read and hashed by a fetcher straight into its
                # place in the segment's slab, while the next ones are started.
                full = size + inst.size > cap or used + inst.size > cap
                if full and fetching:
                    settle()
                    full = size + inst.size > cap or used + inst.size > cap
                if full and pieces:
                    held = cut(False)
                if slab is None:
                    slab = slabs.get()
                    if slab is None:
                        return                    # the writer stopped
                into = memoryview(slab)[used:used + inst.size]
                used += inst.size
                size += inst.size
                fut = fetch.submit(self._whole, inst, cap, into)
                fetching.append((inst, entry, path, fut))
                if held is not None and fut.exception() is None:
                    yield held
                    held = None
                continue
            # A large instance, in parts read here in turn (each part fills a segment).
            settle()
            nparts = -(-inst.size // cap)
            try:
                for k, (data, digest) in enumerate(self._parts(inst, cap, None)):
                    if pieces and size + len(data) > cap:
                        held = cut(False)
                    if held is not None:
                        yield held
                        held = None
                    pieces.append(segment.Piece(inst.id, entry, path, data, k, nparts))
                    digests.append(digest)
                    size += len(data)
            except _NoSource as e:
                report.findings.append(Finding("no-source", uid, inst.sop_uid, str(e)))
                log.error("DR write: object %s has no copy that verifies; not written",
                          phi.token(inst.sop_uid))
        settle()
        if pieces:
            yield cut(True)
        else:
            slabs.put(slab)
            if held is not None:
                held.last = held.done_study = True
                yield held

    def _whole(self, inst, cap: int, into: memoryview  # noqa: ANN001
               ) -> tuple[bytes | memoryview, str]:
        """An instance of at most ``cap`` bytes (a fetcher's job)."""
        return next(self._parts(inst, cap, into))

    def _parts(self, inst, cap: int, into: memoryview | None  # noqa: ANN001
               ) -> Iterator[tuple[bytes | memoryview, str]]:
        """The instance's bytes in parts of at most ``cap``, each with its SHA-256,
        from a copy that verifies against the catalog: an online site's, else its
        frame in a bundle on the object tier. An online instance of at most ``cap``
        bytes is read into memory (into ``into``, exactly its size, when given) and
        checked; anything else is copied to a scratch file and checked whole first,
        then read back part by part: no part of a copy that does not verify is ever
        written, and memory stays bounded by ``cap`` whatever the instance's size."""
        for loc, c in inst.copies.items():
            if loc not in self.sites or c.state != "ok":
                continue
            site = self.sites[loc]
            try:
                if inst.size <= cap:
                    data = self._small(site, c.key, inst, into)
                    if data is not None:
                        yield data, inst.sha256
                        return
                    continue
                copy = copy_verified(partial(site.open, c.key), inst.sha256, self.scratch,
                                     size=inst.size, suffix=".dr.tmp")
            except (ObjectNotFound, BackendError, OSError) as e:
                log.warning("DR source %s unreadable: %s", loc, e)
                continue
            if copy is not None:
                yield from _file_parts(copy, cap, into)
                return
        if self.tier is not None:
            c = inst.copies.get(self.tier.name)
            if c is not None and c.state == "ok" and c.bundle_fk is not None:
                copy = self._from_bundle(c, inst)
                if copy is not None:
                    yield from _file_parts(copy, cap, into)
                    return
        raise _NoSource("no online copy or bundle frame matches the catalog SHA-256")

    @staticmethod
    def _small(site: Backend, key: str, inst, into: memoryview | None  # noqa: ANN001
               ) -> bytes | memoryview | None:
        """A small instance read whole (into ``into`` when given), or None if it does
        not match the catalog."""
        with site.open(key) as f:
            if into is None:
                data: bytes | memoryview = f.read()
                whole = len(data) == inst.size
            else:
                data = into
                whole = f.readinto(into) == inst.size and not f.read(1)
        return data if whole and hashlib.sha256(data).hexdigest() == inst.sha256 else None

    def _from_bundle(self, c, inst) -> FilePayload | None:  # noqa: ANN001
        """The instance's frame in its bundle, decompressed into a scratch file and
        checked against the catalog as it streams (tiers.bundle.extract_to), so
        memory stays bounded whatever its size; None when it does not verify."""
        with self.catalog.unit() as uow:
            b = uow.session.get(Bundle, c.bundle_fk)
            if b is None or b.state != "ok":
                return None
            key, version = b.key, b.version_id
        try:
            path = frame_verified(lambda: self.tier.open_range(  # type: ignore[union-attr]
                key, c.frame_offset, c.frame_length, version_id=version), c.frame_length,
                inst.size, inst.sha256, self.scratch, suffix=".dr.tmp").path
        except (BundleError, BackendError, OSError) as e:
            log.warning("DR source bundle unreadable: %s", e)
            return None
        return FilePayload(path, inst.size, inst.sha256)


def _file_member(vol: Volume, name: str, path: Path) -> tuple[str, int, str]:
    """A member from a file, mapped rather than read (a catalog snapshot can be GBs):
    (name, size, SHA-256) for the signature."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size == 0:
            vol.member(name, b"")
            return name, 0, hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as view:
                vol.member(name, view)
                return name, size, hashlib.sha256(view).hexdigest()


def _file_parts(copy: FilePayload, cap: int, into: memoryview | None
                ) -> Iterator[tuple[bytes | memoryview, str]]:
    """A verified scratch copy in parts of at most ``cap`` (a small one into ``into``
    when given), each with its SHA-256; the file is removed once read. It is hashed
    whole again as it is read: a copy that changed on the scratch disk is never
    passed on as the one that verified."""
    try:
        with open(copy.path, "rb") as f:
            if copy.size <= cap and into is not None:
                if f.readinto(into) != copy.size or hashlib.sha256(into).hexdigest() != copy.sha256:
                    raise RuntimeError("a scratch copy changed while it was written to a DR volume")
                yield into, copy.sha256
                return
            h = hashlib.sha256()
            while chunk := f.read(cap):
                h.update(chunk)
                yield chunk, hashlib.sha256(chunk).hexdigest()
        if h.hexdigest() != copy.sha256:
            raise RuntimeError("a scratch copy changed while it was written to a DR volume")
    finally:
        copy.path.unlink(missing_ok=True)


class _NoSource(Exception):
    pass
