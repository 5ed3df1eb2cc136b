"""Where each study lives: the use case behind `pacsvault find`.

The studies are found with the C-FIND matching engine (archive/catalog/query.py,
so the command line matches exactly as a PACS's query does); for each, the
catalog says how many of its instances (latest versions) have a good copy on
each online site and on the object tier, which DR volumes hold them with their
custody state, and how many were received again with different content.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from archive.catalog import query as Q
from archive.catalog.models import (
    Copy,
    DrInstance,
    DrSegment,
    DrVolume,
    Instance,
    Study,
)
from archive.catalog.uow import Catalog
from dr.format import GOOD_STATES, ONSITE_STATES

RETURNED = ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber",
            "ModalitiesInStudy", "StudyDescription", "NumberOfStudyRelatedInstances")


def find_studies(catalog: Catalog, keys: dict[str, str], *, limit: int) -> list[dict[str, str]]:
    """Study-level matches (Study Root) of ``keys``, each with RETURNED."""
    identifier = {k: "" for k in RETURNED} | {k: v for k, v in keys.items() if v}
    return list(Q.find(catalog, Q.STUDY, Q.STUDY_ROOT, identifier, max_matches=limit))


def locate(catalog: Catalog, studies: list[dict[str, str]], *, sites: list[str],
           tier: str) -> list[dict[str, Any]]:
    """Each match with where its instances are."""
    uids = [s["StudyInstanceUID"] for s in studies]
    out = []
    with catalog.unit() as uow:
        s = uow.session
        fks = dict(s.execute(select(Study.study_uid, Study.id)
                             .where(Study.study_uid.in_(uids))).all())
        for match in studies:
            fk = fks[match["StudyInstanceUID"]]
            copies = {(loc, state): n for loc, state, n in s.execute(
                select(Copy.location, Copy.state, func.count(func.distinct(Copy.instance_fk)))
                .join(Instance, Instance.id == Copy.instance_fk)
                .where(Instance.study_fk == fk).group_by(Copy.location, Copy.state))}
            conflicts = s.scalar(select(func.count()).select_from(Instance).where(
                Instance.study_fk == fk, Instance.conflict.is_(True))) or 0
            volumes = [{"barcode": b, "state": st, "location": loc, "instances": n,
                        "on_site": st in ONSITE_STATES}
                       for b, st, loc, n in s.execute(
                           select(DrVolume.barcode, DrVolume.state, DrVolume.location,
                                  func.count(func.distinct(DrInstance.instance_fk)))
                           .join(DrSegment, DrSegment.volume_fk == DrVolume.id)
                           .join(DrInstance, DrInstance.segment_fk == DrSegment.id)
                           .join(Instance, Instance.id == DrInstance.instance_fk)
                           .where(Instance.study_fk == fk, DrVolume.state.in_(GOOD_STATES))
                           .group_by(DrVolume.barcode, DrVolume.state, DrVolume.location)
                           .order_by(DrVolume.barcode))]
            online = {site: copies.get((site, "ok"), 0) for site in sites}
            entry = {
                "study_uid": match["StudyInstanceUID"], "patient_id": match["PatientID"],
                "patient_name": match["PatientName"], "study_date": match["StudyDate"],
                "accession": match["AccessionNumber"], "modalities": match["ModalitiesInStudy"],
                "description": match["StudyDescription"],
                "instances": int(match["NumberOfStudyRelatedInstances"] or 0),
                "online": online, "object_tier": copies.get((tier, "ok"), 0),
                "dr_volumes": volumes, "conflicts": conflicts,
                "damaged": {f"{loc}:{state}": n for (loc, state), n in copies.items()
                            if state in ("missing", "corrupt")},
            }
            entry["where"] = _where(entry)
            out.append(entry)
    return out


def _where(e: dict[str, Any]) -> str:
    """One line an operator reads: the fastest place that holds the whole study."""
    n = e["instances"]
    whole = [site for site, k in e["online"].items() if k >= n > 0]
    if whole:
        return "online on " + ", ".join(whole)
    if any(e["online"].values()):
        return "partly online (" + ", ".join(f"{s} {k}/{n}" for s, k in e["online"].items()) + ")"
    if e["object_tier"] >= n > 0:
        return "object tier"
    if e["dr_volumes"]:
        return "DR volumes only: " + ", ".join(v["barcode"] for v in e["dr_volumes"])
    return "no readable copy recorded"
