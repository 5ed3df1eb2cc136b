"""The DICOMweb use cases (PS3.18): QIDO-RS search, WADO-RS retrieve and
metadata, STOW-RS store, on the services the DICOM listener uses.

* QIDO-RS matches as C-FIND does (archive/catalog/query.py, Study Root, the
  same matching rules and cap), relationally: ``/series`` and ``/instances``
  search every study, as PS3.18 allows.
* WADO-RS plans a retrieve as C-GET does (MoveService.plan_keys) and streams
  what the restore machinery hands over: online copies checked against their
  SHA-256 first, spread over the sites, a bad copy skipped and queued for
  repair, then the object tier (a transparent recall). Instances only on DR
  volumes are refused before anything is sent, with the barcodes to load.
* STOW-RS hands each Part 10 file to IngestService.store, the C-STORE path: the
  same checks, the same two verified copies and catalog commit before a part is
  reported stored.

Every search and retrieve is an audit record, as on the DICOM side; stored
objects are audited per study, as an association's are. The HTTP side
(archive/daemon/web.py) only moves bytes.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from archive import audit
from archive.app import retrieve as R
from archive.app.ingest import IngestService, Outcome, StoreRequest, StoreResult
from archive.catalog import query as Q
from archive.catalog.uow import Catalog
from archive.dicom import dicom_json as dj
from archive.dicom.part10 import SentMeta
from archive.errors import InvalidInput
from archive.uids import validate_uid
from dr.deliver import DeliveryRefused

log = logging.getLogger("pacsvault.dicomweb")

LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
STORE_AE = "STOW-RS"       # the calling AE recorded for objects that came over HTTP

# What a search returns without includefield (PS3.18 Tables 10.6.3-3 to -5),
# as far as the catalog holds it.
DEFAULT_RETURN = {
    "STUDY": ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
              "InstanceAvailability"],
    "SERIES": ["Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
               "NumberOfSeriesRelatedInstances", "InstanceAvailability"],
    "IMAGE": ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "InstanceAvailability"],
}
_ORDER = ["STUDY", "SERIES", "IMAGE"]


class WebRefused(Exception):
    """A request answered with an HTTP error: the status and a message without values."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Who:
    user: str            # the account, or "-" on an install without accounts
    source: str          # the client address


@dataclass
class SearchAnswer:
    matches: list[dict]                   # DICOM JSON objects
    total: int                            # before limit and offset
    warnings: list[str] = field(default_factory=list)


class DicomWebService:
    def __init__(self, catalog: Catalog, mover: R.MoveService, ingest: IngestService | None, *,
                 max_matches: int, case_insensitive_pn: bool = True) -> None:
        self.catalog, self.mover, self.ingest = catalog, mover, ingest
        self.max_matches, self.case_insensitive_pn = max_matches, case_insensitive_pn

    # -- QIDO-RS ---------------------------------------------------------------------------
    def search(self, resource: str, params: Sequence[tuple[str, str]], *, base_url: str,
               who: Who, study: str | None = None, series: str | None = None) -> SearchAnswer:
        level = LEVELS[resource]
        keys: dict[str, str] = {}
        outcome, count = "failure", 0
        try:
            q = dj.parse_qido(params, max_limit=self.max_matches)
            wanted = list(DEFAULT_RETURN[level])
            if study is None and level != "STUDY":      # all studies: say which one
                wanted += DEFAULT_RETURN["STUDY"]
            if q.include_all:
                wanted += [k for lv in _ORDER[:_ORDER.index(level) + 1]
                           for k in DEFAULT_RETURN[lv]]
            wanted += q.include
            keys = {k: "" for k in wanted if k in Q.KEYS
                    and _ORDER.index(_level_of(k)) <= _ORDER.index(level)}
            keys.update(q.keys)
            for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
                if v is not None:
                    keys[k] = path_uid(v)
            matches = Q.find(self.catalog, level, Q.STUDY_ROOT, keys,
                             max_matches=self.max_matches,
                             case_insensitive_pn=self.case_insensitive_pn, relational=True)
            found = list(matches)
        except (dj.QueryParamError, Q.IdentifierInvalid, Q.ValueInvalid) as e:
            raise WebRefused(400, str(e)) from None
        except Q.TooManyMatches:
            raise WebRefused(413, f"more than {self.max_matches} matches: narrow the search "
                             "(the cap is [dicom] max_query_matches)") from None
        except InvalidInput as e:
            raise WebRefused(400, str(e)) from None
        else:
            outcome, count = "success", len(found)
        finally:
            self._audit_query(level, keys, outcome, count, who)
        count = len(found)
        page = found[q.offset:] if q.limit is None else found[q.offset:q.offset + q.limit]
        out = [dj.match_to_json({**m, "RetrieveURL": _url(base_url, m, level)}) for m in page]
        warnings = []
        if q.fuzzy:
            warnings.append('299 pacsvault "fuzzymatching is not supported: matched exactly"')
        unsupported = [k for k in wanted + list(q.keys) if k not in Q.KEYS]
        if unsupported:
            warnings.append(f'299 pacsvault "{len(set(unsupported))} attributes are not '
                            'held in the catalog and were left out"')
        return SearchAnswer(out, count, warnings)

    def _audit_query(self, level: str, keys: dict[str, str], outcome: str, count: int,
                     who: Who) -> None:
        audit.record_quietly(self.catalog, audit.Event(
            "query", outcome, who.user, f"http {who.source}",
            patient_id=_single(keys.get("PatientID")),
            study_uid=_single(keys.get("StudyInstanceUID")),
            detail={"service": "QIDO-RS", "sop_class": "1.2.840.10008.5.1.4.1.2.2.1",
                    "level": level, "keys": sorted(keys)[:64], "matches": count}))

    # -- WADO-RS ---------------------------------------------------------------------------
    def retrieve(self, study: str, series: str | None = None, instance: str | None = None,
                 *, who: Who) -> "Retrieval":
        """The instances a WADO-RS path names, ready to stream; WebRefused if there are
        none, or if some are reachable only on DR volumes (nothing is sent then)."""
        keys = {"StudyInstanceUID": path_uid(study)}
        level = "STUDY"
        if series is not None:
            keys["SeriesInstanceUID"], level = path_uid(series), "SERIES"
        if instance is not None:
            keys["SOPInstanceUID"], level = path_uid(instance), "IMAGE"
        try:
            plan = self.mover.plan_keys(Q.STUDY_ROOT, level, keys)
        except R.MoveRefused as e:
            self.mover.audit(None, e.status, None, calling_ae=who.user,
                             source=f"http {who.source}", sop_class="WADO-RS",
                             destination=None, comment=e.comment)
            raise WebRefused(413 if e.status == R.SUBOPERATIONS_FAILED else 400,
                             e.comment) from None
        plan.requested_by = who.user
        if not plan.send:
            raise WebRefused(404, "no such " + {"STUDY": "study", "SERIES": "series",
                                                "IMAGE": "instance"}[level])
        if plan.offline:
            message = self.mover.needs_dr(plan)
            self.mover.audit(plan, R.SUBOPERATIONS_FAILED, None, calling_ae=who.user,
                             source=f"http {who.source}", sop_class="WADO-RS",
                             destination=None, comment=message)
            raise WebRefused(503, message)
        return Retrieval(self.mover, plan, who)


class _Stream:
    """The restore thread's delivery for one WADO-RS response: each verified file is
    queued (a few at most) and the restore goes on reading, so reading the next
    instance overlaps sending this one. ``shut`` ends it from the response's side."""

    name = "a WADO-RS response"
    DEPTH = 8

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self.shut_down = threading.Event()

    def done(self, item: object) -> bool:
        return False

    def deliver(self, item: object, path: Path) -> None:
        self._put((item, path))

    def close(self) -> None:                 # the restore has handed over its last
        self._put(None)

    def _put(self, entry: tuple[object, Path] | None) -> None:
        while not self.shut_down.is_set():
            try:
                self.queue.put(entry, timeout=0.2)
                return
            except queue.Full:
                continue
        if entry is not None:
            entry[1].unlink(missing_ok=True)
            raise DeliveryRefused("the response ended")

    def shut(self) -> None:
        self.shut_down.set()
        while True:
            try:
                entry = self.queue.get_nowait()
            except queue.Empty:
                return
            if entry is not None:
                entry[1].unlink(missing_ok=True)


class Retrieval:
    """One WADO-RS response's instances: a restore thread reads and verifies each
    and queues it; the response streams them in order. Iterate, then ``close``
    (always: it stops the thread and writes the audit record)."""

    def __init__(self, mover: R.MoveService, plan: R.MovePlan, who: Who) -> None:
        self.mover, self.plan, self.who = mover, plan, who
        self.progress = R.MoveProgress(total=len(plan.send))
        self._stream = _Stream()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._items: Iterator[tuple[object, Path]] | None = None
        self._first: tuple[object, Path] | None = None
        self.sent = 0

    @property
    def count(self) -> int:
        return len(self.plan.send)

    def start(self) -> bool:
        """Read the first instance: True when it is ready; False when none could be
        read (``progress.comment`` says why: the DR volumes to load, say), so the
        request can still be answered with an error rather than an empty stream."""
        self._items = self._read()
        self._first = next(self._items, None)
        return self._first is not None

    def __iter__(self) -> Iterator[tuple[object, Path]]:
        """(the instance's catalog row, a verified Part 10 file) for each; the file is
        removed once the next one is asked for."""
        if self._items is None:
            self.start()
        if self._first is None:
            return
        yield self._first
        yield from self._items

    def _read(self) -> Iterator[tuple[object, Path]]:
        self._thread = threading.Thread(target=self.mover.run,
                                        args=(self.plan, self.progress, self._stop),
                                        kwargs={"delivery": self._stream}, daemon=True,
                                        name="wado-rs")
        self._thread.start()
        while True:
            try:
                entry = self._stream.queue.get(timeout=0.2)
            except queue.Empty:
                if self.progress.done.is_set() and self._stream.queue.empty():
                    break                    # the restore stopped without closing (an error)
                continue
            if entry is None:
                break
            item, path = entry
            try:
                yield getattr(item, "inst", item), path
            finally:
                path.unlink(missing_ok=True)
            self.sent += 1
        self.progress.done.wait(timeout=60)  # the final counts, a moment after the last

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._stream.shut()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.progress.lock:            # what reached the response, not what was queued
            self.progress.completed = min(self.progress.completed, self.sent)
        cut = self.sent < self.count and not self.progress.failed
        status = R.CANCELLED if cut or not self.progress.done.is_set() \
            else R.final_status(self.progress, cancelled=False)
        self.mover.audit(self.plan, status, self.progress, calling_ae=self.who.user,
                         source=f"http {self.who.source}", sop_class="WADO-RS",
                         destination=None, comment=self.progress.comment)

    @property
    def complete(self) -> bool:
        _, _, failed, _ = self.progress.counts()
        return self.progress.done.is_set() and not failed and self.sent == self.count


# -- STOW-RS -------------------------------------------------------------------------------
@dataclass
class StoredPart:
    sop_class: str
    sop_instance: str
    result: StoreResult


def store_part(ingest: IngestService, meta: SentMeta, *, data: bytes | None = None,
               spool: Path | None = None) -> StoredPart:
    """One STOW-RS part, as the C-STORE path stores an object. ``data``/``spool`` hold
    the Part 10 bytes with pacsvault's own meta group in front of the data set."""
    result = ingest.store(StoreRequest(spool=spool, data=data, sop_class=meta.sop_class,
                                       sop_instance=meta.sop_instance,
                                       transfer_syntax=meta.transfer_syntax,
                                       calling_ae=STORE_AE))
    return StoredPart(meta.sop_class, meta.sop_instance, result)


# Failure Reason (0008,1197) per outcome, PS3.4 C.4.2.1.5 / PS3.18 Table I.2-1.
FAILURE_REASON = {Outcome.INVALID: 0xC000, Outcome.MISMATCH: 0xA900,
                  Outcome.NO_COPY: 0xA700, Outcome.CATALOG_DOWN: 0xA700}
PROCESSING_FAILURE = 0x0110
NOT_THIS_STUDY = 0xA900    # POST /studies/{study} with an instance of another study


def store_response(parts: list[StoredPart], refused: list[tuple[str, str, int]],
                   retrieve_url: Callable[[StoredPart], str]) -> dict:
    """The STOW-RS response data set in DICOM JSON (PS3.18 10.5.3.2): the stored
    instances with their RetrieveURL, the failed ones with a Failure Reason.
    ``refused``: parts refused before ingest, as (SOP class, SOP instance, reason)."""
    ok = [p for p in parts if p.result.acknowledged]
    failed = [(p.sop_class, p.sop_instance, FAILURE_REASON.get(p.result.outcome,
                                                              PROCESSING_FAILURE))
              for p in parts if not p.result.acknowledged] + refused
    out: dict = {}
    if ok:
        out["00081199"] = {"vr": "SQ", "Value": [{
            "00081150": {"vr": "UI", "Value": [p.sop_class]},
            "00081155": {"vr": "UI", "Value": [p.sop_instance]},
            "00081190": {"vr": "UR", "Value": [retrieve_url(p)]}} for p in ok]}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": [{
            **({"00081150": {"vr": "UI", "Value": [c]}} if c else {}),
            **({"00081155": {"vr": "UI", "Value": [i]}} if i else {}),
            "00081197": {"vr": "US", "Value": [reason]}} for c, i, reason in failed]}
    return out


# -- helpers -------------------------------------------------------------------------------
def path_uid(text: str) -> str:
    """A UID taken from a request path, checked (WebRefused 400 if it is not one)."""
    try:
        return validate_uid(text, "UID in the path")
    except InvalidInput as e:
        raise WebRefused(400, str(e)) from None


def _level_of(keyword: str) -> str:
    return ["PATIENT", "STUDY", "SERIES", "IMAGE"][
        max(1, ["PATIENT", "STUDY", "SERIES", "IMAGE"].index(
            Q.key_level(Q.STUDY_ROOT, keyword)))]


def _url(base: str, m: dict[str, str], level: str) -> str:
    url = f"{base}/studies/{m['StudyInstanceUID']}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{m['SeriesInstanceUID']}"
    if level == "IMAGE":
        url += f"/instances/{m['SOPInstanceUID']}"
    return url


def _single(value: str | None) -> str | None:
    if not value or any(c in value for c in "*?\\,"):
        return None
    return value[:64]
