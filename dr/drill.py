"""Restore drills: prove, on an ordinary day, that restores work and how long they take.

For each tier asked for (online, objects, dr), a random but reproducible sample
of the studies that have copies there (the seed is printed and recorded) is
restored from that tier alone (dr/restore.py) into a scratch directory. Every
file is checked again: its SHA-256 against the catalog, and that it parses as
DICOM with the SOP Instance and Study Instance UIDs the catalog has. Time to
the first and to the last instance and the throughput are measured. The
scratch area is removed, and the drill (who, when, sample, seed, result,
figures, failures) is a row in ``drills``; ``history`` gives monthly trends.
"""
from __future__ import annotations

import getpass
import json
import logging
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import and_, exists, select

from archive.catalog.models import (
    Copy,
    Drill,
    DrInstance,
    DrSegment,
    DrVolume,
    Instance,
    Study,
)
from archive.catalog.uow import Catalog
from archive.checksum import sha256_file
from archive.clock import Clock, iso, utcnow
from archive.errors import describe_failure
from dr.deliver import DirDelivery
from dr.format import GOOD_STATES
from dr.restore import Restorer
from tiers.backend import Backend

log = logging.getLogger("pacsvault.drill")

TIERS = ("online", "objects", "dr")


@dataclass
class DrillReport:
    id: int | None
    seed: int
    sample: int
    tiers: list[str]
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        """Counts for job_runs (no UIDs)."""
        return {"drill_id": self.id, "seed": self.seed, "failures": len(self.failures),
                "tiers": {t: f["instances"] for t, f in self.figures.items()}}

    def to_json(self) -> dict[str, Any]:
        return {"drill_id": self.id, "ok": self.ok, "seed": self.seed, "sample": self.sample,
                "tiers": self.tiers, "figures": self.figures, "failures": self.failures,
                "skipped_tiers": self.skipped, "seconds": round(self.seconds, 3)}


def candidates(catalog: Catalog, tier: str, sites: list[str], tier_name: str | None
               ) -> list[str]:
    """UIDs of studies that have at least one copy on ``tier``, in UID order."""
    if tier == "online":
        has = exists().where(Copy.instance_fk == Instance.id, Copy.location.in_(sites),
                             Copy.state == "ok")
    elif tier == "objects":
        has = exists().where(Copy.instance_fk == Instance.id, Copy.location == tier_name,
                             Copy.state == "ok")
    else:
        has = exists().where(and_(DrInstance.instance_fk == Instance.id,
                                  DrSegment.id == DrInstance.segment_fk,
                                  DrVolume.id == DrSegment.volume_fk,
                                  DrVolume.state.in_(GOOD_STATES)))
    q = (select(Study.study_uid).join(Instance, Instance.study_fk == Study.id).where(has)
         .distinct().order_by(Study.study_uid))
    with catalog.unit() as uow:
        return list(uow.session.scalars(q))


def _check_file(path: Path, sop: str, study: str, sha: str) -> str | None:
    """Why the restored file is not right, or None."""
    if sha256_file(path) != sha:
        return "SHA-256 differs from the catalog"
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, Exception) as e:      # noqa: BLE001 - any parse failure counts
        return f"does not parse as DICOM ({type(e).__name__})"
    if str(ds.get("SOPInstanceUID", "")) != sop or str(ds.get("StudyInstanceUID", "")) != study:
        return "DICOM UIDs differ from the catalog"
    return None


class Driller:
    def __init__(self, catalog: Catalog, sites: list[Backend], tier: Backend | None, *,
                 scratch: Path, identities: list | None = None, volume_paths: list[str] | None = None,
                 clock: Clock = utcnow, actor: str | None = None, trigger: str = "manual") -> None:
        self.catalog = catalog
        self.sites = sites
        self.tier = tier
        self.scratch = scratch
        self.identities = identities or []
        self.volume_paths = volume_paths or []
        self.clock = clock
        self.actor = actor or getpass.getuser()
        self.trigger = trigger

    def run(self, tiers: list[str], sample: int, seed: int | None = None) -> DrillReport:
        seed = seed if seed is not None else random.SystemRandom().randrange(1, 2 ** 31)
        t0 = time.monotonic()
        report = DrillReport(None, seed, sample, tiers)
        started = self.clock()
        for tier in tiers:
            if tier == "dr" and not self.identities:
                report.skipped[tier] = "no --identity: DR volumes cannot be read"
                continue
            if tier == "objects" and self.tier is None:
                report.skipped[tier] = "no object tier"
                continue
            pool = candidates(self.catalog, tier, [s.name for s in self.sites],
                              self.tier.name if self.tier is not None else None)
            if not pool:
                report.skipped[tier] = "no study has a copy here yet"
                continue
            chosen = random.Random(f"{seed}:{tier}").sample(pool, min(sample, len(pool)))
            self._tier(tier, chosen, report)
        report.seconds = time.monotonic() - t0
        report.id = self._record(started, report)
        return report

    def _tier(self, tier: str, study_uids: list[str], report: DrillReport) -> None:
        area = self.scratch / f"drill-{tier}-{int(time.time() * 1000)}"
        try:
            with self.catalog.unit() as uow:
                studies = [(fk, uid) for fk, uid in uow.session.execute(
                    select(Study.id, Study.study_uid).where(Study.study_uid.in_(study_uids))
                    .order_by(Study.study_uid))]
            delivery = DirDelivery(area)
            r = Restorer(self.catalog, self.sites, self.tier, delivery, sources=(tier,),
                         identities=self.identities, volume_paths=self.volume_paths,
                         scratch=area / ".pacsvault-restore").run(studies)
            j = r.to_json()
            for f in j["failures"]:
                report.failures.append({"tier": tier, **f})
            checked = 0
            # Keyed by (study, SOP UID, version): two objects under one SOP UID (a
            # conflict, or the UID sent again in another study) are checked apart.
            restored = {(d["study_uid"], d["sop_uid"], d.get("version", 1))
                        for d in j["instances_detail"]}
            with self.catalog.unit() as uow:
                rows = uow.session.execute(
                    select(Instance.sop_uid, Instance.version, Instance.sha256, Instance.series_fk,
                           Study.study_uid).join(Study, Study.id == Instance.study_fk)
                    .where(Instance.sop_uid.in_(list({sop for _, sop, _ in restored})))).all()
            for sop, version, sha, _, study in rows:
                if (study, sop, version) not in restored:
                    continue
                name = sop + (f".v{version}" if version != 1 else "")
                found = list(area.glob(f"{study}/*/{name}.dcm"))
                why = "missing after restore" if not found else _check_file(found[0], sop, study, sha)
                if why:
                    report.failures.append({"tier": tier, "sop_uid": sop, "study_uid": study,
                                            "reason": why})
                else:
                    checked += 1
            report.figures[tier] = {
                "studies": len(studies), "sampled": [uid for _, uid in studies], "instances": j["instances"], "verified": checked,
                "bytes": j["bytes"], "time_to_first_s": j["time_to_first_s"],
                "time_to_last_s": j["time_to_last_s"], "mb_per_s": j["mb_per_s"],
                "volumes_read": [v["barcode"] for v in j["volumes_needed"] if v["read"]],
            }
        except Exception as e:  # noqa: BLE001 - one failed tier never stops the others
            why = describe_failure(e)
            report.failures.append({"tier": tier, "reason": f"drill of this tier failed: {why}"})
            log.error("drill of tier %s failed (%s); going on with the others", tier, why)
        finally:
            shutil.rmtree(area, ignore_errors=True)

    def _record(self, started, report: DrillReport) -> int:  # noqa: ANN001
        with self.catalog.unit(write=True) as uow:
            row = Drill(actor=self.actor[:128], trigger=self.trigger, tiers=",".join(report.tiers),
                        sample=report.sample, seed=report.seed, started_at=started,
                        finished_at=self.clock(), ok=report.ok,
                        figures=json.dumps(report.figures, sort_keys=True),
                        failures=json.dumps(report.failures[:1000], sort_keys=True))
            uow.session.add(row)
            uow.commit()
            return row.id


def history(catalog: Catalog, limit: int = 100) -> dict[str, Any]:
    """Every drill (newest first) and per month: drills, failures, and the median
    time to last instance and throughput per tier, so trends show."""
    with catalog.unit() as uow:
        rows = list(uow.session.scalars(select(Drill).order_by(Drill.started_at.desc(),
                                                               Drill.id.desc()).limit(limit)))
        drills = [{"id": d.id, "started_at": iso(d.started_at), "finished_at": iso(d.finished_at),
                   "actor": d.actor, "trigger": d.trigger, "tiers": d.tiers.split(","),
                   "sample": d.sample, "seed": d.seed, "ok": d.ok,
                   "figures": json.loads(d.figures), "failures": len(json.loads(d.failures))}
                  for d in rows]
    months: dict[str, dict[str, Any]] = defaultdict(lambda: {"drills": 0, "failed": 0,
                                                             "tiers": defaultdict(list)})
    for d in drills:
        m = months[d["started_at"][:7]]
        m["drills"] += 1
        m["failed"] += 0 if d["ok"] else 1
        for tier, f in d["figures"].items():
            m["tiers"][tier].append(f)
    trend = []
    for month in sorted(months):
        m = months[month]
        per = {}
        for tier, fs in m["tiers"].items():
            last = sorted(f["time_to_last_s"] for f in fs if f["time_to_last_s"] is not None)
            rate = sorted(f["mb_per_s"] for f in fs if f["mb_per_s"] is not None)
            per[tier] = {"drills": len(fs),
                         "median_time_to_last_s": last[len(last) // 2] if last else None,
                         "median_mb_per_s": rate[len(rate) // 2] if rate else None}
        trend.append({"month": month, "drills": m["drills"], "failed": m["failed"], "tiers": per})
    return {"drills": drills, "months": trend}
