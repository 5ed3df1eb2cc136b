"""The C-MOVE and C-GET use case: send what an identifier names to a known AE
(C-MOVE) or back to the requestor on its own association (C-GET), from whichever
tier holds it.

``plan`` reads the identifier (unique keys only: single values or lists of
UIDs, PS3.4 C.4.2.2.1), finds the instances (the latest version of each, as
C-FIND shows them) and the destination in the peer table (``peer add AE HOST
--port N``). ``run`` sends them with the restore machinery (dr/restore.py):
online copies first, spread over the sites, each checked against its SHA-256
before it is sent (one that does not match is skipped, queued for repair and
the instance sent from its twin), then the object tier, read straight out of
the study's bundle (a transparent recall, nothing staged online). An instance
that only DR volumes hold fails with the barcodes to load in the comment and
the log. Every move is an audit record and an ATNA message.
"""
from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

from archive import audit, peers
from archive.alerts import Alert
from archive.app import restore_queue
from archive.catalog import query as Q
from archive.catalog.models import DrInstance, DrSegment, DrVolume, Instance, Study
from archive.catalog.uow import Catalog
from archive.dicom import identifier as ident
from dr.deliver import AeDelivery
from dr.restore import Restorer
from tiers import study_state
from tiers.backend import Backend

log = logging.getLogger("pacsvault.retrieve")

PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
MOVE_MODELS = {PATIENT_ROOT_MOVE: Q.PATIENT_ROOT, STUDY_ROOT_MOVE: Q.STUDY_ROOT}
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
GET_MODELS = {PATIENT_ROOT_GET: Q.PATIENT_ROOT, STUDY_ROOT_GET: Q.STUDY_ROOT}

# C-MOVE statuses (PS3.4 C.4.2.1.5)
SUCCESS, PENDING, CANCELLED = 0x0000, 0xFF00, 0xFE00
SUBOPERATIONS_FAILED = 0xA702          # refused: unable to perform sub-operations
DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
SOME_FAILED = 0xB000                   # warning: complete, one or more failures

_UNIQUE = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class MoveRefused(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


@dataclass
class MovePlan:
    destination: peers.PeerEntry | None        # None: C-GET, back on the association
    studies: list[tuple[int, str]]
    send: set[int]                         # instance ids
    contexts: list[tuple[str, str]]        # (SOP class, transfer syntax) to propose
    level: str
    patient_id: str | None
    study_uid: str | None
    offline: set[int] = field(default_factory=set)   # no verified copy online or in the object tier
    requested_by: str = "retrieve"         # the calling AE or account, for the restore queue


@dataclass
class MoveProgress:
    """Sub-operation counts, updated by ``run`` as it goes (read by the listener)."""
    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    comment: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Event = field(default_factory=threading.Event)   # a count moved
    done: threading.Event = field(default_factory=threading.Event)      # counts are final

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.completed - self.failed - self.warning)

    def counts(self) -> tuple[int, int, int, int]:
        with self.lock:
            return self.remaining, self.completed, self.failed, self.warning


class MoveService:
    def __init__(self, catalog: Catalog, sites: list[Backend], tier: Backend | None, *,
                 ae_title: str, scratch: Path, max_instances: int = 100_000,
                 alert: Callable[[Alert], object] | None = None) -> None:
        self.catalog, self.sites, self.tier = catalog, sites, tier
        self.ae_title, self.scratch, self.max_instances = ae_title, scratch, max_instances
        self.alert = alert or (lambda a: None)      # the [alerts] hooks, in the daemon

    # -- what to send, where ----------------------------------------------------------------
    def plan(self, sop_class: str, transfer_syntax: str, data: bytes,
             destination: str | None) -> MovePlan:
        """Raises MoveRefused with the status to answer. ``destination`` None: a C-GET."""
        model = (MOVE_MODELS if destination is not None else GET_MODELS).get(sop_class)
        if model is None:
            raise MoveRefused(IDENTIFIER_DOES_NOT_MATCH, "not a retrieve model we offer")
        dest = self._destination(destination) if destination is not None else None
        try:
            request = ident.decode(data, transfer_syntax)
        except ident.IdentifierUnreadable as e:
            raise MoveRefused(UNABLE_TO_PROCESS, str(e)) from None
        return self.plan_keys(model, request.level, request.keys, dest)

    def plan_keys(self, model: str, level: str, unique: dict[str, str],
                  dest: peers.PeerEntry | None = None) -> MovePlan:
        """The plan for unique keys already read (a C-MOVE's identifier, a WADO-RS path)."""
        keys = {k: v for k, v in unique.items() if k in _UNIQUE}
        for k, v in keys.items():
            if any(c in v for c in "*?") or ("\\" in v and k == "PatientID"):
                raise MoveRefused(IDENTIFIER_DOES_NOT_MATCH,
                                  f"{k}: a retrieve takes single values or UID lists")
        # The entities at the level, found as C-FIND finds them (same checks, same
        # latest-version rule), with the UIDs below asked back.
        lower = {"PATIENT": ["StudyInstanceUID"], "STUDY": [], "SERIES": [],
                 "IMAGE": []}.get(level, [])
        try:
            if level == "PATIENT":
                if not keys.get("PatientID"):
                    raise Q.IdentifierInvalid("PatientID is required at the PATIENT level")
                matches = Q.find(self.catalog, "STUDY", model,
                                 {"PatientID": keys["PatientID"], **{k: "" for k in lower}},
                                 max_matches=self.max_instances)
            else:
                wanted_key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                              "IMAGE": "SOPInstanceUID"}.get(level)
                if wanted_key is not None and not keys.get(wanted_key):
                    raise Q.IdentifierInvalid(f"{wanted_key} is required at the {level} level")
                matches = Q.find(self.catalog, level, model, keys,
                                 max_matches=self.max_instances)
            found = list(matches)
        except Q.TooManyMatches as e:
            raise MoveRefused(SUBOPERATIONS_FAILED, str(e)) from None
        except Q.IdentifierInvalid as e:
            raise MoveRefused(IDENTIFIER_DOES_NOT_MATCH, str(e)) from None
        except Q.QueryError as e:
            raise MoveRefused(UNABLE_TO_PROCESS, str(e)) from None
        return self._resolve(dest, level, found, keys)

    def _destination(self, ae: str) -> peers.PeerEntry:
        ae = ae.strip()
        for p in peers.list_peers(self.catalog):
            if p.ae_title == ae and p.port:
                return p
        raise MoveRefused(DESTINATION_UNKNOWN, "move destination unknown: add it with "
                          "'pacsvault peer add AE HOST --port N'")

    def _resolve(self, dest: peers.PeerEntry | None, level: str, found: list[dict[str, str]],
                 keys: dict[str, str]) -> MovePlan:
        study_uids = sorted({m["StudyInstanceUID"] for m in found})
        series = {m["SeriesInstanceUID"] for m in found} if level == "SERIES" else None
        sops = {m["SOPInstanceUID"] for m in found} if level == "IMAGE" else None
        with self.catalog.unit() as uow:
            studies = [(fk, uid) for fk, uid in uow.session.execute(
                select(Study.id, Study.study_uid).where(Study.study_uid.in_(study_uids))
                .order_by(Study.study_uid))]
            send: set[int] = set()
            offline: set[int] = set()
            contexts: set[tuple[str, str]] = set()
            for fk, _ in studies:
                latest: dict[tuple[str, str], Any] = {}
                for inst in study_state.load(uow.session, fk).instances:
                    if series is not None and inst.series_uid not in series:
                        continue
                    if sops is not None and inst.sop_uid not in sops:
                        continue
                    k = (inst.series_uid, inst.sop_uid)
                    if k not in latest or inst.version > latest[k].version:
                        latest[k] = inst
                for inst in latest.values():
                    send.add(inst.id)
                    contexts.add((inst.sop_class, inst.transfer_syntax))
                    if not any(c.state == "ok" for c in inst.copies.values()):
                        offline.add(inst.id)
                if len(send) > self.max_instances:
                    raise MoveRefused(SUBOPERATIONS_FAILED,
                                      f"more than {self.max_instances} instances: move less")
        return MovePlan(dest, studies, send, sorted(contexts), level,
                        _single(keys.get("PatientID")),
                        study_uids[0] if len(study_uids) == 1 else None, offline)

    def needs_dr(self, plan: MovePlan) -> str:
        """For a plan with ``offline`` instances: alert the operator with the barcodes
        to load and return the message for the requestor (no patient data)."""
        with self.catalog.unit() as uow:
            barcodes = sorted(r[0] for r in uow.session.execute(
                select(DrVolume.barcode).distinct()
                .join(DrSegment, DrSegment.volume_fk == DrVolume.id)
                .join(DrInstance, DrInstance.segment_fk == DrSegment.id)
                .where(DrInstance.instance_fk.in_(list(plan.offline)[:10_000]))))
        if not barcodes:
            return f"{len(plan.offline)} instances have no readable copy on any tier"
        self._queue_online(plan, plan.offline, barcodes)
        self.alert(Alert("retrieve", "warning", "a retrieve needs DR volumes "
                         + ", ".join(barcodes[:32]) + ": load them and run 'pacsvault "
                         "restore --queued' (the studies are queued)",
                         counts={"instances": len(plan.offline), "volumes": len(barcodes)}))
        return (f"{len(plan.offline)} instances are only on DR volumes: load "
                + ", ".join(barcodes[:8]) + (" ..." if len(barcodes) > 8 else "")
                + " and restore them online")

    # -- sending ---------------------------------------------------------------------------
    def run(self, plan: MovePlan, progress: MoveProgress, stop: threading.Event,
            delivery: Any = None, originator: tuple[str, int] | None = None) -> None:
        """Send the plan's instances to its destination (or through ``delivery``, a
        C-GET's hand-off), counting into ``progress``; ``progress.done`` is set when the
        counts are final, so the listener answers at once."""
        try:
            self._run(plan, progress, stop, delivery, originator)
        finally:
            progress.done.set()
            progress.changed.set()

    def _run(self, plan: MovePlan, progress: MoveProgress, stop: threading.Event,
             delivery: Any, originator: tuple[str, int] | None) -> None:
        if not plan.send:
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        journal = self.scratch / f"move-{secrets.token_hex(8)}.journal"
        d = plan.destination
        where = d.ae_title if d is not None else "the requestor"
        if delivery is None:
            assert d is not None
            try:
                delivery = AeDelivery(f"{d.ae_title}@{d.host}:{d.port}", self.ae_title,
                                      plan.contexts[:128], journal, move_originator=originator)
            except Exception as e:  # noqa: BLE001 - refused, unreachable: all sub-operations fail
                with progress.lock:
                    progress.failed = progress.total
                    progress.comment = "the move destination could not be reached or refused us"
                log.error("C-MOVE to %s: %s", d.ae_title, type(e).__name__)
                return

        def counted(n: int) -> None:
            with progress.lock:
                progress.completed += n
            progress.changed.set()

        restorer = Restorer(self.catalog, self.sites, self.tier, delivery,
                            sources=("online", "objects"), scratch=self.scratch,
                            progress=counted, stop=stop,
                            wanted=lambda inst: inst.id in plan.send)
        try:
            report = restorer.run(plan.studies)
        except Exception as e:  # noqa: BLE001 - the destination went away mid-move
            log.error("retrieve to %s stopped: %s", where, type(e).__name__)
            with progress.lock:
                progress.failed = progress.total - progress.completed
                progress.comment = "the association to the destination was lost"
            return
        finally:
            journal.unlink(missing_ok=True)
        if stop.is_set():
            return
        failed = [f["sop_uid"] for f in report.failures if f.get("sop_uid")]
        with progress.lock:
            progress.failed = progress.total - progress.completed    # not sent: failed
            progress.failed_uids = failed[:1000]
        if failed:
            refused = sum(1 for f in report.failures if f.get("sop_uid") and (
                "presentation context" in f["reason"] or "answered 0x" in f["reason"]))
            barcodes = self._dr_barcodes(plan.send, set(failed))
            if barcodes and not refused:
                self._queue_online(plan, self._ids_of(plan.send, set(failed)), barcodes)
            if refused:
                why = (f"{refused} instances not taken by the destination (none of its "
                       "presentation contexts fits their stored transfer syntax, or it refused)")
            elif barcodes:
                why = (f"{len(failed)} instances are only on DR volumes: load "
                       + ", ".join(barcodes[:8]) + (" ..." if len(barcodes) > 8 else "")
                       + " and restore them online")
                # Barcodes and counts only: which patient asked for stays in the audit trail.
                self.alert(Alert("retrieve", "warning", "a DICOM retrieve needs DR volumes "
                                 + ", ".join(barcodes[:32]) + ": load them and run "
                                 "'pacsvault restore --queued' (the studies are queued)",
                                 counts={"instances": len(failed), "volumes": len(barcodes)}))
            else:
                why = f"{len(failed)} instances could not be read from any tier"
            progress.comment = why
            log.error("retrieve to %s: %s", where, why)

    def _queue_online(self, plan: MovePlan, instance_ids: set[int], barcodes: list[str]) -> None:
        try:
            restore_queue.queue(self.catalog, instance_ids, barcodes, plan.requested_by)
        except Exception as e:  # noqa: BLE001 - the refusal still goes out; the alert names the volumes
            log.error("could not queue a study to come back from DR volumes: %s",
                      type(e).__name__)

    def _ids_of(self, ids: set[int], sop_uids: set[str]) -> set[int]:
        with self.catalog.unit() as uow:
            return set(uow.session.scalars(select(Instance.id).where(
                Instance.id.in_(list(ids)[:10_000]), Instance.sop_uid.in_(list(sop_uids)[:10_000]))))

    def _dr_barcodes(self, ids: set[int], failed_uids: set[str]) -> list[str]:
        with self.catalog.unit() as uow:
            rows = uow.session.execute(
                select(DrVolume.barcode).distinct()
                .join(DrSegment, DrSegment.volume_fk == DrVolume.id)
                .join(DrInstance, DrInstance.segment_fk == DrSegment.id)
                .join(Instance, Instance.id == DrInstance.instance_fk)
                .where(DrInstance.instance_fk.in_(list(ids)[:10_000]),
                       Instance.sop_uid.in_(list(failed_uids)[:10_000])))
            return sorted(r[0] for r in rows)

    # -- audit ------------------------------------------------------------------------------
    def audit(self, plan: MovePlan | None, status: int, progress: MoveProgress | None, *,
              calling_ae: str, source: str, sop_class: str, destination: str | None,
              comment: str = "") -> None:
        done = progress.counts() if progress else (0, 0, 0, 0)
        # The operator's view in the log (no patient data: AE titles, counts, status).
        what = "C-MOVE" if destination is not None else "C-GET"
        line = f"{what} from %s to %s: %d sent, %d failed, status 0x%04X" \
            + (f" ({comment})" if comment else "")
        log.log(logging.INFO if status == SUCCESS else logging.WARNING, line, source,
                destination or calling_ae, done[1], done[2], status)
        audit.record_quietly(self.catalog, audit.Event(
            "retrieve", "success" if status in (SUCCESS, SOME_FAILED) and done[2] == 0
            else "failure", calling_ae, source,
            patient_id=plan.patient_id if plan else None,
            study_uid=plan.study_uid if plan else None,
            detail={"sop_class": sop_class, "level": plan.level if plan else "",
                    "destination_ae": (destination or calling_ae)[:16], "studies": len(plan.studies) if plan else 0,
                    "completed": done[1], "failed": done[2], "status": f"0x{status:04X}"}))


class HandOff:
    """A C-GET's delivery (dr/deliver.py's Delivery): the restore thread hands each
    verified file to the association's thread, which sends it as a C-STORE on the
    requestor's own association and hands back the outcome."""

    name = "the requestor (C-GET)"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: tuple[Any, Path] | None = None
        self._outcome: BaseException | None | bool = False     # False: not answered yet
        self._closed: BaseException | None = None
        self.finished = False                   # the restore has handed over its last

    # the restore thread's side
    def done(self, item: Any) -> bool:
        return False

    def deliver(self, item: Any, path: Path) -> None:
        with self._cond:
            if self._closed is not None:
                path.unlink(missing_ok=True)
                raise self._closed
            self._item, self._outcome = (item, path), False
            self._cond.notify_all()
            while self._outcome is False and self._closed is None:
                self._cond.wait()
            outcome, self._item = self._outcome, None
            if outcome is False:
                raise self._closed  # type: ignore[misc]
        path.unlink(missing_ok=True)
        if outcome is not None:
            raise outcome  # type: ignore[misc]

    def close(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    # the association's side
    def next(self, timeout: float) -> tuple[Any, Path] | None:
        with self._cond:
            if (self._item is None or self._outcome is not False) and not self.finished:
                self._cond.wait(timeout)
            return self._item if self._outcome is False else None

    def answer(self, error: BaseException | None) -> None:
        """None: sent and stored; an exception: this one failed (the run goes on if it
        is a DeliveryRefused)."""
        with self._cond:
            self._outcome = error
            self._cond.notify_all()

    def shut(self, error: BaseException) -> None:
        """The association ended: every delivery from now on raises ``error``."""
        with self._cond:
            self._closed = error
            self._cond.notify_all()


def final_status(progress: MoveProgress, cancelled: bool) -> int:
    remaining, completed, failed, warning = progress.counts()
    if cancelled and remaining:
        return CANCELLED            # a cancel that came after the last one changes nothing
    if failed and not completed:
        return SUBOPERATIONS_FAILED
    if failed or warning:
        return SOME_FAILED
    return SUCCESS


def _single(value: str | None) -> str | None:
    if not value or any(c in value for c in "*?\\"):
        return None
    return value[:64]
