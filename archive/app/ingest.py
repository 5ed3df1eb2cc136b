"""Ingest: one received object in, a verified mirrored copy and a catalog row out.

Ordering (docs/formats/site-layout.md, "Write ordering"):
1. validate the command and the data set (UIDs, SOP class/instance agreement)
2. look up earlier versions: identical bytes not in flight are acknowledged
   without a new copy
3. write and verify on every healthy site (replication.mirror) and, at the same
   time, commit instance + copies with the instance marked in flight
4. fewer verified copies than ingest.min_copies (1 or 2; never zero): undo the
   row and refuse (out of resources)
5. settle: a failed site's copy becomes 'missing' (the repair queue) before the
   answer; the in-flight mark is removed with the next batch
6. only then report success to the DICOM layer: both the copies and the row were
   durable before it
"""
from __future__ import annotations

import enum
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from archive import failpoints, phi
from archive.catalog.fastpath import DATABASE_ERRORS, INTEGRITY_ERRORS, RawTx
from archive.catalog.group_commit import GroupCommitter
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.dicom.attributes import (
    CATALOG_TAGS,
    ReceivedAttributes,
    attributes_from_raw,
    read_attributes,
)
from archive.dicom.part10 import (
    MAX_META_BYTES,
    InMemoryObject,
    SpooledObject,
    dataset_offset,
    file_meta,
    read_sent_meta,
)
from archive.dicom.walk import check_complete
from archive.errors import InvalidInput
from archive.uids import validate_uid
from replication.mirror import MirrorWriter
from tiers.layout import instance_key

log = logging.getLogger("pacsvault.ingest")


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"            # identical bytes already stored
    INVALID = "invalid"                # cannot understand the object
    MISMATCH = "mismatch"              # data set does not match the command's SOP class/instance
    NO_COPY = "no_copy"                # no site could take a verified copy
    CATALOG_DOWN = "catalog_down"      # copies written but the row could not be committed


@dataclass
class StoreResult:
    outcome: Outcome
    reason: str = ""
    instance_id: int | None = None
    conflict: bool = False
    missing_sites: list[str] = field(default_factory=list)
    study_uid: str | None = None       # for the audit trail (set when the object was understood)
    patient_id: str | None = None

    @property
    def acknowledged(self) -> bool:
        return self.outcome in (Outcome.STORED, Outcome.DUPLICATE)


@dataclass(frozen=True)
class StoreRequest:
    spool: Path | None        # the received Part 10 image in a spool file, or
    sop_class: str            # from the C-STORE command
    sop_instance: str
    transfer_syntax: str      # negotiated for the presentation context
    calling_ae: str
    data: bytes | None = None  # ... in memory (a small data set: no file at all)

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else open(self.spool, "rb")


class _LRU:
    """A small thread-safe LRU map (association threads share one ingest service)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, k):  # noqa: ANN001, ANN201
        with self._lock:
            return self._d.get(k)

    def put(self, k, v) -> None:  # noqa: ANN001
        with self._lock:
            self._d[k] = v
            self._d.move_to_end(k)
            if len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


class IngestService:
    def __init__(self, catalog: Catalog, mirror: MirrorWriter, clock: Clock = utcnow, *,
                 min_copies: int = 1) -> None:
        self.catalog = catalog
        self.mirror = mirror
        self.min_copies = min_copies    # verified copies an acknowledgement needs
        self.clock = clock
        self.committer = GroupCommitter(catalog)
        # study_uid -> study id, (study id, series_uid) -> series id: rows are never deleted,
        # so a cached id stays valid; saves three SELECTs per object of a study.
        self._studies: _LRU = _LRU(4096)
        self._series: _LRU = _LRU(8192)

    # -- validation ------------------------------------------------------------
    def _validate(self, req: StoreRequest
                  ) -> tuple[ReceivedAttributes, SpooledObject | InMemoryObject]:
        sop_class = validate_uid(req.sop_class, "Affected SOP Class")
        sop_uid = validate_uid(req.sop_instance, "Affected SOP Instance")
        ts = validate_uid(req.transfer_syntax, "Transfer Syntax")
        with req.open() as f:  # one open: frame-check, read attributes, hash
            offset = dataset_offset(f)
            f.seek(0, 2)
            length = f.tell() - offset
            if length <= 0:
                raise InvalidInput("empty data set")
            raw = check_complete(f, offset, length, ts, CATALOG_TAGS)
            attrs = attributes_from_raw(raw) if raw is not None else read_attributes(f)
            if attrs.sop_uid != sop_uid:
                raise _Mismatch("SOP Instance UID in the data set differs from the command")
            if attrs.sop_class != sop_class:
                raise _Mismatch("SOP Class UID in the data set differs from the command")
            meta = file_meta(sop_class, sop_uid, ts)
            obj: SpooledObject | InMemoryObject = (
                InMemoryObject(meta, memoryview(req.data)[offset:]) if req.data is not None
                else SpooledObject(req.spool, offset, length, meta))
            obj.compute_sha256(f)
        return attrs, obj

    def _versions_of(self, sop_uid: str) -> list[tuple[int, str, int, bool]]:
        # The hot path's one read before the copies, on a bare pooled DBAPI connection
        # (catalog/fastpath.py): through SQLAlchemy Core it cost 0.5-1 ms per object.
        raw = self.catalog.engine.raw_connection()
        try:
            return RawTx(raw.driver_connection,
                         self.catalog.engine.dialect.name).versions_settled(sop_uid)
        finally:
            raw.close()

    # -- the use case ------------------------------------------------------------
    def store(self, req: StoreRequest) -> StoreResult:
        failpoints.hit("ingest.received")
        tok = phi.token(req.sop_instance if isinstance(req.sop_instance, str) else None)
        try:
            attrs, obj = self._validate(req)
        except _Mismatch as e:
            log.warning("C-STORE from %s refused (object %s): %s", req.calling_ae, tok, e)
            return StoreResult(Outcome.MISMATCH, str(e))
        except InvalidInput as e:
            log.warning("C-STORE from %s refused (object %s): %s", req.calling_ae, tok, e)
            return StoreResult(Outcome.INVALID, str(e))

        versions = self._versions_of(attrs.sop_uid)
        same = [(instance_id, settled) for _, sha, instance_id, settled in versions
                if sha == obj.sha256]
        if any(settled for _, settled in same):
            log.info("duplicate of stored object %s from %s acknowledged", tok, req.calling_ae)
            return self._described(StoreResult(Outcome.DUPLICATE), attrs)

        if self.mirror.writable_sites() < self.min_copies:
            # Known short of sites (a failed site is skipped for a while): refuse before
            # writing, so no copy is left behind that the catalog will never name.
            log.error("C-STORE from %s refused (object %s): no verified copy possible: "
                      "ingest.min_copies = %d and %d sites are writable", req.calling_ae, tok,
                      self.min_copies,
                      self.mirror.writable_sites())
            return self._described(StoreResult(Outcome.NO_COPY, "too few writable sites"), attrs)
        if same:
            # These bytes have a row whose copies are not confirmed yet (being written by
            # another association, or left by a crash): confirm them by writing again.
            return self._store_again(req, attrs, obj, tok, same[0][0])
        conflict = bool(versions)
        key = instance_key(attrs.study_uid, attrs.sop_uid, obj.sha256 if conflict else None)
        return self._store_new(req, attrs, obj, tok, key, conflict)

    def _store_new(self, req: StoreRequest, attrs: ReceivedAttributes,
                   obj: SpooledObject | InMemoryObject, tok: str, key: str,
                   conflict: bool, content_addressed: bool = False) -> StoreResult:
        """Copies and catalog row at the same time, both finished before the answer.

        The row is committed while the copies are still being written, marked in
        flight (ingest_in_flight); once every copy has its outcome the mark goes
        (and a failed copy becomes 'missing'), or the row is undone if too few were
        verified. A crash in between leaves the mark, and replication/in_flight.py
        resolves it by checking the sites."""
        pending = self.mirror.start(key, obj)
        failpoints.hit("ingest.before_commit")
        now = self.clock()
        copies = [(site, "ok", now) if site in pending.attempted else (site, "missing", None)
                  for site in (s.name for s in self.mirror.sites)]
        try:
            result: StoreResult | None = self._commit(req, attrs, obj, key, copies,
                                                      in_flight=True)
        except DATABASE_ERRORS as e:
            result = None
            failure = type(e).__name__
        failpoints.hit("ingest.after_row")
        outcomes = pending.wait()
        if result is None:
            log.error("C-STORE from %s refused (object %s): catalog commit failed: %s",
                      req.calling_ae, tok, failure)
            return self._described(StoreResult(Outcome.CATALOG_DOWN, "catalog commit failed"),
                                   attrs)
        verified = [o.site for o in outcomes if o.ok]
        if result.outcome is Outcome.DUPLICATE:
            # Another association committed these very bytes first: ours confirm them.
            return self._confirmed(req, attrs, tok, result.instance_id, verified)
        if any(o.exists_different for o in outcomes) and not (conflict or content_addressed):
            # Another file sits at the first-version key (a crash before commit, or a
            # concurrent different object): never replace it; use a content-addressed key.
            self._undo(result.instance_id)
            return self._store_new(req, attrs, obj, tok,
                                   instance_key(attrs.study_uid, attrs.sop_uid, obj.sha256),
                                   conflict, content_addressed=True)
        if len(verified) < self.min_copies:
            self._undo(result.instance_id)
            reasons = "; ".join(f"{o.site}: {o.error}" for o in outcomes if not o.ok)
            log.error("C-STORE from %s refused (object %s): %s (%s)", req.calling_ae, tok,
                      f"{len(verified)} verified copies, ingest.min_copies = {self.min_copies}"
                      if verified else "no verified copy", reasons)
            # Described: the refusal is audited under its study (and the watch alerts).
            return self._described(StoreResult(Outcome.NO_COPY, reasons), attrs)
        failed = [o.site for o in outcomes if not o.ok and o.site in pending.attempted]
        instance_id = result.instance_id

        def settle(tx) -> None:  # noqa: ANN001 - inside the group commit
            tx.settle(instance_id, verified=[], failed=failed, now=now)

        if failed:
            # Exact at the answer: the missing copy is in the repair queue before it.
            self._settle(settle)
        else:
            # The rows already say what is true; only the in-flight mark is left to
            # remove, and that rides the next batch's flush.
            self.committer.submit(settle)
        failpoints.hit("ingest.after_commit")
        result.missing_sites = [o.site for o in outcomes if not o.ok]
        if result.missing_sites:
            log.warning("object %s stored under-replicated: missing on %s",
                        tok, ",".join(result.missing_sites))
        if result.conflict:
            log.warning("object %s received again with different content from %s: "
                        "kept both versions (conflict flagged)", tok, req.calling_ae)
        return self._described(result, attrs)

    def _store_again(self, req: StoreRequest, attrs: ReceivedAttributes,
                     obj: SpooledObject | InMemoryObject, tok: str,
                     instance_id: int) -> StoreResult:
        """The same bytes as an unsettled row: write them where that row says (a site
        that already holds them verifies and keeps its file) and confirm the row."""
        raw = self.catalog.engine.raw_connection()
        try:
            key = RawTx(raw.driver_connection, self.catalog.engine.dialect.name).copy_key(
                instance_id)
        finally:
            raw.close()
        if key is None:
            key = instance_key(attrs.study_uid, attrs.sop_uid, obj.sha256)
        outcomes = self.mirror.write(key, obj)
        return self._confirmed(req, attrs, tok, instance_id, [o.site for o in outcomes if o.ok])

    def _confirmed(self, req: StoreRequest, attrs: ReceivedAttributes, tok: str,
                   instance_id: int | None, verified: list[str]) -> StoreResult:
        if instance_id is None or len(verified) < self.min_copies:
            log.error("C-STORE from %s refused (object %s): %d verified copies of a re-sent "
                      "object, ingest.min_copies = %d", req.calling_ae, tok, len(verified),
                      self.min_copies)
            return self._described(StoreResult(Outcome.NO_COPY, "too few verified copies"),
                                   attrs)
        now = self.clock()
        self._settle(lambda tx: tx.settle(instance_id, verified=verified, failed=[], now=now))
        log.info("duplicate of stored object %s from %s acknowledged", tok, req.calling_ae)
        return self._described(StoreResult(Outcome.DUPLICATE, instance_id=instance_id), attrs)

    def _settle(self, work) -> None:  # noqa: ANN001
        try:
            self.committer.run(work)
        except DATABASE_ERRORS as e:
            # The copies are verified; their rows are settled later by the repair loop.
            log.warning("settling copies failed (%s); the repair loop will", type(e).__name__)

    def _undo(self, instance_id: int | None) -> None:
        if instance_id is None:
            return
        try:
            self.committer.run(lambda tx: tx.delete_instance(instance_id))
        except DATABASE_ERRORS as e:
            # Left unsettled: replication/in_flight.py removes it (no copy exists).
            log.warning("undoing a refused object's row failed (%s)", type(e).__name__)

    @staticmethod
    def _described(result: StoreResult, attrs: ReceivedAttributes) -> StoreResult:
        result.study_uid, result.patient_id = attrs.study_uid, attrs.patient_id
        return result

    def _commit(self, req: StoreRequest, attrs: ReceivedAttributes,
                obj: SpooledObject | InMemoryObject, key: str,
                copies: list[tuple[str, str, datetime | None]], *,
                in_flight: bool = False) -> StoreResult:
        """Insert the instance and its copies ((site, state, verified_at) each),
        marked in flight when its copies are still being written."""
        now = self.clock()
        ts = validate_uid(req.transfer_syntax, "Transfer Syntax")

        def work(tx) -> tuple[StoreResult, list]:  # noqa: ANN001 - inside the group commit
            versions = tx.versions_of(attrs.sop_uid)
            if any(sha == obj.sha256 for _, sha in versions):
                return StoreResult(Outcome.DUPLICATE,
                                   instance_id=tx.instance_id(attrs.sop_uid, obj.sha256)), []
            learned: list = []
            study_fk, series_fk = self._ensure_parents(tx, attrs, req.calling_ae, now, learned)
            instance_id = tx.insert_instance(
                sop_uid=attrs.sop_uid, version=max((v for v, _ in versions), default=0) + 1,
                series_fk=series_fk, study_fk=study_fk, sop_class=attrs.sop_class,
                transfer_syntax=ts, size=obj.size, sha256=obj.sha256, received_at=now,
                calling_ae=req.calling_ae[:16], conflict=bool(versions),
                instance_number=attrs.instance_number)
            tx.insert_copies([(instance_id, site, key, state, at) for site, state, at in copies])
            if in_flight:
                tx.mark_in_flight(instance_id, now)
            return StoreResult(Outcome.STORED, instance_id=instance_id,
                               conflict=bool(versions)), learned

        for attempt in range(3):
            try:
                result, learned = self.committer.run(work)
            except INTEGRITY_ERRORS:
                # A concurrent worker committed a version of the same SOP Instance UID,
                # or a cached parent id is stale: retry with fresh lookups.
                self._studies.clear()
                self._series.clear()
                if attempt == 2:
                    raise
                continue
            # Only ids from a committed transaction may be cached: SQLite reuses the
            # rowid of a rolled-back row, and a stale id would file an object under
            # another patient's study.
            for cache, uid, fk in learned:
                cache.put(uid, fk)
            return result
        raise AssertionError("unreachable")

    def _ensure_parents(self, tx, attrs: ReceivedAttributes, calling_ae: str, now,  # noqa: ANN001
                        learned: list) -> tuple[int, int]:
        study_fk = self._studies.get(attrs.study_uid)
        if study_fk is None:
            patient_fk = tx.ensure_patient(attrs.patient_id, attrs.issuer, attrs.patient_name,
                                           attrs.birth_date, attrs.sex, attrs.patient_name_fold)
            study_fk = tx.ensure_study(
                attrs.study_uid, patient_fk, now, attrs.study_date, attrs.study_time,
                attrs.accession, attrs.study_description, calling_ae[:16],
                study_id=attrs.study_id, referring_physician=attrs.referring_physician,
                referring_physician_fold=attrs.referring_physician_fold)
            learned.append((self._studies, attrs.study_uid, study_fk))
        # Keyed by study too: a series UID reused by another study is another row.
        series_fk = self._series.get((study_fk, attrs.series_uid))
        if series_fk is None:
            series_fk, reused = tx.ensure_series(
                attrs.series_uid, study_fk, attrs.modality, attrs.series_number,
                description=attrs.series_description, series_date=attrs.series_date,
                series_time=attrs.series_time)
            if reused:
                # UIDs stay out of logs (they identify a patient's study): tokens instead.
                log.warning("series %s is also used by another study: filed under study %s "
                            "as sent, flagged (uid_reused)", phi.token(attrs.series_uid),
                            phi.token(attrs.study_uid))
            learned.append((self._series, (study_fk, attrs.series_uid), series_fk))
            tx.touch_study(study_fk, now)
        return study_fk, series_fk

    # -- a catalog rebuilt from the sites' files ------------------------------------
    def adopt(self, path: Path, key: str, sites: list[str], *, size: int, sha256: str,
              calling_ae: str = "REBUILD") -> StoreResult:
        """Catalog rows for a file that is already stored under ``key`` on ``sites``
        (each holding these bytes: the caller hashed them). Nothing is written to a
        site; the object is parsed and checked as a received one is. The received
        time is unknown: now is recorded."""
        try:
            with open(path, "rb") as f:
                meta = read_sent_meta(f.read(MAX_META_BYTES + 256), final=True)
            if meta is None:
                raise InvalidInput("file meta cut short")
            req = StoreRequest(spool=path, sop_class=meta.sop_class,
                               sop_instance=meta.sop_instance,
                               transfer_syntax=meta.transfer_syntax, calling_ae=calling_ae)
            attrs, _ = self._validate(req)
        except InvalidInput as e:
            return StoreResult(Outcome.INVALID, str(e))
        now = self.clock()
        stored = _Stored(size, sha256)
        try:
            result = self._commit(req, attrs, stored, key,  # type: ignore[arg-type]
                                  [(site, "ok", now) for site in sites])
        except DATABASE_ERRORS as e:
            return StoreResult(Outcome.CATALOG_DOWN, type(e).__name__)
        return self._described(result, attrs)

    def close(self) -> None:
        self.committer.close()


@dataclass(frozen=True)
class _Stored:
    """What the catalog commit needs of a file already on the sites."""
    size: int
    sha256: str


class _Mismatch(InvalidInput):
    """{}"""
