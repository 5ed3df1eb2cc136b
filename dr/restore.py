"""Restore: the fastest tier holding a verified copy, every SHA-256 checked first.

For the instances selected (studies by UID, patient, accession or date range):

1. **online**: a site copy re-read and checked against the catalog SHA-256;
2. **objects**: the instance's frame in its study bundle (one ranged read),
   decompressed and checked;
3. **dr**: DR volumes, tape-aware: the volumes needed are listed with their
   custody state, then each is read once, front to back, in set order, and only
   the segments needed are decrypted (a large instance's parts are joined and
   checked whole).

A copy that fails its check falls through to the next tier (and is named in
the report). ``sources`` restricts the tiers (``--from``). Each instance goes
through a scratch file, so memory stays bounded, to a Delivery (dr/deliver.py):
a directory, a PACS by C-STORE, or the online sites. Already delivered
instances are skipped, so a restore that was interrupted resumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import and_, select, update

from archive import failpoints, phi
from archive.catalog.models import (
    Bundle,
    Copy,
    DrInstance,
    DrSegment,
    DrVolume,
    Patient,
    Study,
)
from archive.catalog.uow import Catalog
from archive.checksum import sha256_file
from archive.errors import InvalidInput, describe_failure
from archive.uids import validate_uid
from dr import crypt, segment
from dr.deliver import Delivery, DeliveryRefused
from dr.format import GOOD_STATES, LABEL, ONSITE_STATES
from dr.reader import RawMember, ltfs_members, tar_members, unpack
from tiers import study_state
from tiers.backend import Backend, BackendError
from tiers.bundle import BundleError
from tiers.verified_copy import copy_verified, frame_verified

log = logging.getLogger("pacsvault.restore")

TIERS = ("online", "objects", "dr")


@dataclass
class Selection:
    studies: tuple[str, ...] = ()
    patient: str | None = None
    accession: str | None = None
    from_date: str | None = None      # StudyDate, YYYYMMDD
    to_date: str | None = None

    def empty(self) -> bool:
        return not (self.studies or self.patient or self.accession or self.from_date
                    or self.to_date)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class Item:
    inst: Any                 # tiers.study_state.InstanceRow
    study_uid: str
    study_fk: int
    source: str | None = None
    tried: list[str] = field(default_factory=list)


@dataclass
class RestoreReport:
    target: str
    sources: tuple[str, ...]
    studies: int = 0
    instances: int = 0
    restored: int = 0
    already_there: int = 0
    bytes: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    per_instance: list[dict[str, str]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    first_s: float | None = None
    last_s: float | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "target": self.target, "sources": list(self.sources),
            "studies": self.studies, "instances": self.instances, "restored": self.restored,
            "already_there": self.already_there, "bytes": self.bytes,
            "by_source": self.by_source, "seconds": round(self.seconds, 3),
            "time_to_first_s": None if self.first_s is None else round(self.first_s, 3),
            "time_to_last_s": None if self.last_s is None else round(self.last_s, 3),
            "mb_per_s": round(self.bytes / 1e6 / self.seconds, 1) if self.seconds > 0 else None,
            "volumes_needed": self.volumes, "failures": self.failures,
            "instances_detail": self.per_instance,
        }


def select_studies(catalog: Catalog, sel: Selection) -> list[tuple[int, str]]:
    """(study id, study UID) of the selection, in UID order."""
    if sel.empty():
        raise InvalidInput("say what to restore: --study, --patient, --accession or a date range")
    q = select(Study.id, Study.study_uid).join(Patient, Patient.id == Study.patient_fk)
    if sel.studies:
        q = q.where(Study.study_uid.in_([validate_uid(u, "Study Instance") for u in sel.studies]))
    if sel.patient:
        q = q.where(Patient.patient_id == sel.patient)
    if sel.accession:
        q = q.where(Study.accession == sel.accession)
    for d in (sel.from_date, sel.to_date):
        if d is not None and not (len(d) == 8 and d.isdigit()):
            raise InvalidInput("--from-date/--to-date want YYYYMMDD")
    if sel.from_date:
        q = q.where(Study.study_date >= sel.from_date)
    if sel.to_date:
        q = q.where(Study.study_date <= sel.to_date)
    with catalog.unit() as uow:
        found = [(fk, uid) for fk, uid in uow.session.execute(q.order_by(Study.study_uid))]
    if sel.studies:
        missing = set(sel.studies) - {uid for _, uid in found}
        if missing:
            raise InvalidInput(f"no study {sorted(missing)[0]} in the catalog")
    return found


READ_AHEAD = 8                       # online copies verified ahead of the delivery
READ_AHEAD_BYTES = 256 * 1024 * 1024  # ... and their bytes in scratch (one is always allowed)


class _Window:
    """How far the read-ahead may run: items and bytes in flight, bounded."""

    def __init__(self, items: int, size: int) -> None:
        self.items, self.size = items, size
        self._n = self._bytes = 0
        self._cond = threading.Condition()

    def enter(self, size: int, quit_: threading.Event) -> bool:
        with self._cond:
            while self._n and (self._n >= self.items or self._bytes + size > self.size):
                if quit_.is_set():
                    return False
                self._cond.wait(0.5)
            if quit_.is_set():
                return False
            self._n += 1
            self._bytes += size
            return True

    def leave(self, size: int) -> None:
        with self._cond:
            self._n -= 1
            self._bytes -= size
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class Restorer:
    def __init__(self, catalog: Catalog, sites: list[Backend], tier: Backend | None,
                 delivery: Delivery, *, sources: tuple[str, ...] = TIERS,
                 identities: list | None = None, volume_paths: list[str] | None = None,
                 scratch: Path | None = None,
                 load_volume: Callable[[str, str], bool] | None = None,
                 progress: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None,
                 wanted: Callable[[Any], bool] | None = None) -> None:
        self.catalog = catalog
        self.sites = {s.name: s for s in sites}
        self.tier = tier
        self.delivery = delivery
        self.sources = sources
        self.identities = identities or []
        self.volume_paths = volume_paths or []
        self.scratch = scratch or Path(tempfile.gettempdir())
        self.load_volume = load_volume            # ask an operator to load a tape
        self.progress = progress or (lambda n: None)
        self.stop = stop or threading.Event()
        self.wanted = wanted                      # which instances of each study (all: None)
        self._turn = 0                            # spreads online reads over the sites
        self._t0 = 0.0
        self._member_sums: dict[tuple[str, str], tuple[int, str]] = {}

    # -- the run --------------------------------------------------------------------
    def run(self, studies: list[tuple[int, str]]) -> RestoreReport:
        self._t0 = time.monotonic()
        report = RestoreReport(self.delivery.name, self.sources)
        report.studies = len(studies)
        todo: list[Item] = []
        for fk, uid in studies:
            try:
                with self.catalog.unit() as uow:
                    state = study_state.load(uow.session, fk)
                items = [Item(inst, uid, fk) for inst in state.instances
                         if self.wanted is None or self.wanted(inst)]
                there = [self.delivery.done(item) for item in items]
            except Exception as e:  # noqa: BLE001 - one bad study never stops the others
                why = describe_failure(e)
                report.failures.append({"study_uid": uid, "reason": f"study not restored: {why}"})
                log.error("restore: study %s not restored (%s); going on with the others", uid, why)
                continue
            for item, done in zip(items, there):
                report.instances += 1
                if done:
                    report.already_there += 1
                else:
                    todo.append(item)
        self.scratch.mkdir(parents=True, exist_ok=True)
        for tier in self.sources:
            if not todo or self.stop.is_set():
                break
            todo = {"online": self._online, "objects": self._objects, "dr": self._dr}[tier](
                todo, report)
        for item in todo:
            report.failures.append({
                "sop_uid": item.inst.sop_uid, "study_uid": item.study_uid,
                "reason": "; ".join(item.tried) or "no copy in the tiers allowed (--from)"})
        report.seconds = time.monotonic() - self._t0
        self.delivery.close()
        return report

    def _delivered(self, item: Item, source: str, path: Path, report: RestoreReport) -> None:
        try:
            self.delivery.deliver(item, path)
        except DeliveryRefused as e:    # e.g. another file is there: kept, reported, not retried
            path.unlink(missing_ok=True)
            item.source = "refused"
            report.failures.append({"sop_uid": item.inst.sop_uid, "study_uid": item.study_uid,
                                    "reason": str(e)})
            log.error("restore: instance %s not delivered: %s", phi.token(item.inst.sop_uid),
                      str(e).split(":")[0])
            return
        item.source = source
        failpoints.hit("restore.after_deliver")
        now = time.monotonic() - self._t0
        report.first_s = now if report.first_s is None else report.first_s
        report.last_s = now
        report.restored += 1
        report.bytes += item.inst.size
        report.by_source[source] = report.by_source.get(source, 0) + 1
        report.per_instance.append({"sop_uid": item.inst.sop_uid, "study_uid": item.study_uid,
                                    "version": item.inst.version, "source": source})
        self.progress(1)

    def _scratch_file(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.scratch, suffix=".restore.tmp")
        return fd, Path(name)

    # -- tier 1: the online sites -----------------------------------------------------------
    def _online(self, todo: list[Item], report: RestoreReport) -> list[Item]:
        left = []
        for item, path in self._read_ahead(todo):
            if path is None:
                left.append(item)
            else:
                self._delivered(item, "online", path, report)
        return left

    def _read_ahead(self, todo: list[Item]) -> Iterator[tuple[Item, Path | None]]:
        """Each item with a verified scratch copy (None: no site gave one), in order.
        A thread reads and verifies ahead of the delivery (the next read overlaps the
        previous send), at most READ_AHEAD items and READ_AHEAD_BYTES at a time;
        copies read ahead but never delivered are removed."""
        window = _Window(READ_AHEAD, READ_AHEAD_BYTES)
        out: queue.Queue = queue.Queue()
        quit_ = threading.Event()

        def read() -> None:
            try:
                for item in todo:
                    if not window.enter(item.inst.size, quit_):
                        return
                    path = None if self.stop.is_set() else self._read_online(item)
                    out.put((item, path))
            except BaseException as e:  # noqa: BLE001 - handed to the delivering thread
                out.put(e)
            finally:
                out.put(None)

        reader = threading.Thread(target=read, name="restore-read-ahead", daemon=True)
        reader.start()
        try:
            while (got := out.get()) is not None:
                if isinstance(got, BaseException):
                    raise got
                window.leave(got[0].inst.size)
                yield got
        finally:
            quit_.set()
            window.wake()
            reader.join()
            while not out.empty():
                got = out.get()
                if isinstance(got, tuple) and got[1] is not None:
                    got[1].unlink(missing_ok=True)

    def _read_online(self, item: Item) -> Path | None:
        copies = list(item.inst.copies.items())
        self._turn += 1                 # both healthy sites share the reads
        k = self._turn % len(copies) if copies else 0
        for name, c in copies[k:] + copies[:k]:
            site = self.sites.get(name)
            if site is None or c.state != "ok":
                continue
            path, mismatch = self._copy_verified(lambda: site.open(c.key), item)
            if path is not None:
                return path
            if mismatch:
                item.tried.append(f"online copy on {name} does not match the catalog")
                log.error("restore: online copy of %s on %s does not match the "
                          "catalog; queued for repair from its twin",
                          phi.token(item.inst.sop_uid), name)
                self._queue_repair(item.inst.id, name)
        return None

    def _copy_verified(self, opener, item: Item) -> tuple[Path | None, bool]:  # noqa: ANN001
        """(a scratch copy of the source if it matches the catalog, whether it was read
        and did not match)."""
        try:
            copy = copy_verified(opener, item.inst.sha256, self.scratch, size=item.inst.size,
                                 suffix=".restore.tmp")
        except (BackendError, OSError) as e:
            item.tried.append(f"unreadable: {e}")
            return None, False
        return (None, True) if copy is None else (copy.path, False)

    def _queue_repair(self, instance_id: int, site: str) -> None:
        """A copy that read back wrong is 'missing' from now on: the repair loop rewrites
        it from a copy that verifies (replication/repair.py), and nothing reads it."""
        try:
            with self.catalog.unit(write=True) as uow:
                uow.session.execute(update(Copy).where(
                    Copy.instance_fk == instance_id, Copy.location == site, Copy.state == "ok"
                ).values(state="missing", verified_at=None))
                uow.commit()
        except Exception as e:  # noqa: BLE001 - the retrieve goes on; the scrub finds it later
            log.error("restore: could not queue the repair of a copy on %s (%s)", site,
                      type(e).__name__)

    # -- tier 2: the object tier ----------------------------------------------------------------
    def _objects(self, todo: list[Item], report: RestoreReport) -> list[Item]:
        if self.tier is None or not self.tier.health().ok:
            for item in todo:
                item.tried.append("object tier unavailable")
            return todo
        fks = {item.inst.copies[self.tier.name].bundle_fk for item in todo
               if self.tier.name in item.inst.copies}
        with self.catalog.unit() as uow:
            bundles = {b.id: (b.key, b.version_id) for b in uow.session.scalars(
                select(Bundle).where(Bundle.id.in_([f for f in fks if f]), Bundle.state == "ok"))}
        left = []
        for item in todo:
            c = item.inst.copies.get(self.tier.name)
            if self.stop.is_set() or c is None or c.state != "ok" or c.bundle_fk not in bundles:
                left.append(item)
                continue
            key, version = bundles[c.bundle_fk]
            try:
                path = frame_verified(lambda: self.tier.open_range(  # type: ignore[attr-defined]
                    key, c.frame_offset, c.frame_length, version_id=version), c.frame_length,
                    item.inst.size, item.inst.sha256, self.scratch, suffix=".restore.tmp").path
            except (BundleError, BackendError, OSError) as e:
                item.tried.append(f"object copy does not verify: {e}")
                log.error("restore: object copy of %s does not verify",
                          phi.token(item.inst.sop_uid))
                left.append(item)
                continue
            self._delivered(item, "objects", path, report)
        return left

    # -- tier 3: DR volumes ----------------------------------------------------------------------
    def _dr(self, todo: list[Item], report: RestoreReport) -> list[Item]:
        by_id = {item.inst.id: item for item in todo}
        with self.catalog.unit() as uow:
            rows = uow.session.execute(
                select(DrInstance.instance_fk, DrInstance.part, DrInstance.parts, DrInstance.path,
                       DrSegment.member, DrSegment.size.label("member_size"),
                       DrSegment.sha256.label("member_sha256"),
                       DrVolume.id, DrVolume.barcode, DrVolume.state,
                       DrVolume.location, DrVolume.device, DrVolume.volume_set,
                       DrVolume.sequence, DrVolume.pool)
                .join(DrSegment, DrSegment.id == DrInstance.segment_fk)
                .join(DrVolume, and_(DrVolume.id == DrSegment.volume_fk,
                                     DrVolume.state.in_(GOOD_STATES)))
                .where(DrInstance.instance_fk.in_(list(by_id)))).all()
        # Per instance, one pool: prefer the one whose volumes are on site.
        pools: dict[int, dict[str, list]] = {}
        for r in rows:
            pools.setdefault(r.instance_fk, {}).setdefault(r.pool, []).append(r)
        plan: dict[int, list] = {}          # instance id -> rows (its parts) to read
        for fk, per_pool in pools.items():
            complete = [rs for rs in per_pool.values() if len({r.part for r in rs}) == rs[0].parts]
            if complete:
                plan[fk] = min(complete, key=lambda rs: sum(r.state not in ONSITE_STATES for r in rs))
        for item in todo:
            if item.inst.id not in plan:
                item.tried.append("not on any DR volume")
        if not plan:
            return todo
        if not self.identities:
            for fk in plan:
                by_id[fk].tried.append("on DR volumes, but no --identity was given")
            return todo
        volumes: dict[int, dict[str, Any]] = {}
        members: dict[int, dict[str, list]] = {}
        for fk, rs in plan.items():
            for r in rs:
                volumes.setdefault(r.id, {"barcode": r.barcode, "state": r.state,
                                          "location": r.location, "device": r.device,
                                          "volume_set": r.volume_set, "sequence": r.sequence})
                members.setdefault(r.id, {}).setdefault(r.member, []).append((fk, r.part, r.path))
                # What the catalog recorded of the member: written by us, or imported from a
                # volume whose signature was checked. A member used must be exactly that.
                self._member_sums[(r.barcode, r.member)] = (r.member_size, r.member_sha256)
        order = sorted(volumes, key=lambda v: (volumes[v]["volume_set"], volumes[v]["sequence"]))
        report.volumes = [{**{k: volumes[v][k] for k in ("barcode", "state", "location",
                                                         "sequence")},
                           "must_recall": volumes[v]["state"] not in ONSITE_STATES, "read": False}
                          for v in order]
        parts: dict[tuple[int, int], Path] = {}
        for n, vid in enumerate(order):
            if self.stop.is_set():
                break
            v = volumes[vid]
            where = self._locate(v)
            if where is None:
                why = (f"needs DR volume {v['barcode']} ({v['state']}"
                       + (f" at {v['location']}" if v["location"] else "") + "): "
                       + ("recall it, then " if v["state"] not in ONSITE_STATES else "")
                       + "make it readable (load it, or give --volume PATH)")
                for fk, _, _ in (x for xs in members[vid].values() for x in xs):
                    if why not in by_id[fk].tried:
                        by_id[fk].tried.append(why)
                continue
            self._read_volume(where, v, members[vid], by_id, plan, parts, report)
            report.volumes[n]["read"] = True
        for p in parts.values():
            p.unlink(missing_ok=True)
        return [item for item in todo if item.source is None]

    def _locate(self, v: dict[str, Any]) -> str | None:
        """A readable path for the volume: one given with --volume whose label has its
        barcode, else where it was written, if that still holds it."""
        for p in self.volume_paths:
            if _label_barcode(p) == v["barcode"]:
                return p
        dev = v["device"]
        if not dev or dev == "-":
            return None
        if Path(dev).exists():
            mode = os.stat(dev).st_mode
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                return dev if _label_barcode(dev) == v["barcode"] else None
            # A tape drive: an operator loads the volume (asked on a terminal).
            if self.load_volume is not None and self.load_volume(v["barcode"], dev):
                return dev
        return None

    def _read_volume(self, where: str, v: dict[str, Any], wanted: dict[str, list],
                     by_id: dict[int, Item], plan: dict[int, list],
                     parts: dict[tuple[int, int], Path], report: RestoreReport) -> None:
        """One pass over the volume; decrypt only the members needed."""
        path = Path(where)
        f = None
        if path.is_dir():
            stream = ltfs_members(path)
        else:
            f = open(path, "rb")
            stream = tar_members(f, lambda *a: None)
        try:
            for m in stream:
                if m.name not in wanted:
                    continue
                self._segment(m, v, wanted[m.name], by_id, plan, parts, report)
        except Exception as e:          # a damaged stream: what was read stays delivered
            log.error("restore: DR volume %s unreadable past a point: %s", v["barcode"], e)
        finally:
            if f is not None:
                f.close()

    def _segment(self, m: RawMember, v: dict[str, Any], needs: list, by_id: dict[int, Item],
                 plan: dict[int, list], parts: dict[tuple[int, int], Path],
                 report: RestoreReport) -> None:
        try:
            if m.truncated:
                raise segment.SegmentError("member cut short (truncated volume)")
            if self._member_sums.get((v["barcode"], m.name)) != \
                    (len(m.data), hashlib.sha256(m.data).hexdigest()):
                raise segment.SegmentError("differs from the member the catalog recorded "
                                           "(altered, or another volume with its barcode)")
            _, files = segment.read(unpack(m.data, self.identities))
        except (crypt.DecryptFailed, segment.SegmentError) as e:
            for fk, _, _ in needs:
                by_id[fk].tried.append(f"DR volume {v['barcode']} member {m.name}: {e}")
            return
        for fk, part, fpath in needs:
            item = by_id[fk]
            body = files.get(fpath)
            if body is None:
                item.tried.append(f"DR volume {v['barcode']}: {fpath} missing from its segment")
                continue
            p = parts.get((fk, 0))
            if p is None:
                _, p = self._scratch_file()
                parts[(fk, 0)] = p
            with open(p, "ab") as out:   # parts come in order: volumes and members are read in order
                out.write(body)
            nparts = plan[fk][0].parts
            if part == nparts - 1:
                parts.pop((fk, 0))
                if p.stat().st_size == item.inst.size and sha256_file(p) == item.inst.sha256:
                    self._delivered(item, "dr", p, report)
                else:
                    p.unlink(missing_ok=True)
                    item.tried.append(f"DR copy on {v['barcode']} does not match the catalog")


def _label_barcode(where: str) -> str | None:
    """The barcode on a volume's label (reads only its first member)."""
    p = Path(where)
    try:
        if p.is_dir():
            return json.loads((p / LABEL).read_text()).get("barcode")
        if not p.is_file():
            return None
        with open(p, "rb") as f:
            for m in tar_members(f, lambda *a: None):
                return json.loads(m.data).get("barcode") if m.name == LABEL else None
    except (OSError, ValueError):
        return None
    return None
