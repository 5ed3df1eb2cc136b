"""What the media say, checked and brought back into the catalog.

* ``verify``: a whole volume read back; every segment decrypts, decompresses
  and every file matches its manifest and the catalog's SHA-256; the stream
  hash matches the one recorded when the volume was sealed.
* ``rebuild_catalog``: volumes (any order, any subset, several sets) read back
  (``read_volumes``) and their catalog rows restored: patients, studies, series, instances, and
  the volumes, segments and which instance is where. The report says which
  volumes of each set are missing and which studies are incomplete.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from archive.catalog.models import (
    DrInstance,
    DrSegment,
    DrVolume,
    Instance,
    Patient,
    Series,
    Study,
)
from archive.catalog.uow import Catalog
from archive.errors import InvalidInput
from dr.contents import check_volume
from dr.format import FAILED, SEALED
from dr.reader import VolumeRead, read_volume


def _ts(text: str | None) -> datetime:
    if not text:
        return datetime.now(timezone.utc)
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def damaged(vol: VolumeRead) -> list[dict[str, Any]]:
    return [{"member": m.name, "study_uid": m.study_uid, "error": m.error}
            for m in vol.members if not m.ok]


def distrust(vol: VolumeRead, trust_unsigned: bool) -> str | None:
    """Why the volume must not be believed, in one line; None when it may be.
    Contents are checked whether or not it is signed (a signing key can leak);
    an unsigned or wrongly signed volume is believed only with --trust-unsigned."""
    if vol.label is None:
        return None                     # nothing to import; the reader said why
    name = vol.barcode if isinstance(vol.barcode, str) else vol.where
    if vol.unauthentic and not trust_unsigned:
        return (f"volume {name} refused: {vol.unauthentic}; read it anyway only if you know "
                "where it comes from (--trust-unsigned)")
    try:
        check_volume(vol.label, vol.index, vol.catalog, vol.members)
    except InvalidInput as e:
        return f"volume {name} refused: {e}"
    return None


# -- verify ------------------------------------------------------------------------------
def verify(catalog: Catalog | None, where: str, identities: list, verify_keys: list | None = None,
           trust_unsigned: bool = False) -> dict[str, Any]:
    vol = read_volume(where, identities, verify_keys=verify_keys)
    problems = list(vol.errors)
    why = distrust(vol, trust_unsigned)
    if why:
        problems.append(why)
    recorded_sha = None
    mismatched: list[dict[str, str]] = []
    if catalog is not None and vol.barcode:
        with catalog.unit() as uow:
            recorded = uow.session.scalars(select(DrVolume).where(
                DrVolume.barcode == vol.barcode)).first()
            if recorded is not None:
                recorded_sha = recorded.stream_sha256
                if recorded.volume_set != vol.label.get("volume_set"):
                    problems.append(f"volume {vol.barcode} is from another set: the catalog "
                                    f"has set {recorded.volume_set}, the label says "
                                    f"{vol.label.get('volume_set')}")
                elif recorded.stream_sha256 and vol.complete and \
                        recorded.stream_sha256 != vol.stream_sha256:
                    problems.append("the volume's SHA-256 differs from the one recorded "
                                    "when it was sealed")
                # Name the study of a damaged member from the catalog when the
                # member itself cannot say (age authenticates 64 KiB at a time).
                by_member = dict(uow.session.execute(
                    select(DrSegment.member, Study.study_uid)
                    .join(Study, Study.id == DrSegment.study_fk)
                    .where(DrSegment.volume_fk == recorded.id)).all())
                for m in vol.members:
                    if m.study_uid is None:
                        m.study_uid = by_member.get(m.name)
            sums = {}
            for m in vol.members:
                for f in (m.manifest or {}).get("files", []) if m.ok and not why else []:
                    sums[(f["sop_uid"], f.get("version", 1))] = f["sha256"]
            if sums:
                for sop, version, sha in uow.session.execute(
                        select(Instance.sop_uid, Instance.version, Instance.sha256)
                        .where(Instance.sop_uid.in_([k[0] for k in sums]))):
                    if (sop, version) in sums and sums[(sop, version)] != sha:
                        mismatched.append({"sop_uid": sop, "detail": "SHA-256 on the volume "
                                           "differs from the catalog"})
    bad = damaged(vol)
    files = sum(len((m.manifest or {}).get("files", [])) for m in vol.members if m.ok)
    ok = not problems and not bad and not mismatched and vol.complete
    return {
        "where": where, "barcode": vol.barcode, "ok": ok,
        "label": vol.label, "complete": vol.complete,
        "segments": len(vol.members), "segments_ok": sum(1 for m in vol.members if m.ok),
        "files_verified": files, "stream_bytes": vol.stream_bytes,
        "stream_sha256": vol.stream_sha256,
        "recorded_sha256": recorded_sha,
        "damaged": bad, "affected_studies": sorted({d["study_uid"] or "unknown" for d in bad}),
        "catalog_mismatches": mismatched, "problems": problems,
        "signed": vol.unauthentic is None, "signature_problem": vol.unauthentic,
        "catalog_backups": [{"member": b.name, "bytes": b.size, "complete": not b.truncated}
                            for b in vol.catalog_backups],
    }


# -- rebuild the catalog from volumes ------------------------------------------------------
def _study_rows(s, doc: dict[str, Any]) -> int:  # noqa: ANN001
    """Get or create the patient, study and series rows; the study's id."""
    st = s.scalars(select(Study).where(Study.study_uid == doc["study_uid"])).first()
    if st is None:
        p = doc["patient"]
        pat = s.scalars(select(Patient).where(Patient.patient_id == p["patient_id"],
                                              Patient.issuer == p.get("issuer", ""))).first()
        if pat is None:
            pat = Patient(patient_id=p["patient_id"], issuer=p.get("issuer", ""),
                          name=p.get("name", ""), birth_date=p.get("birth_date", ""),
                          sex=p.get("sex", ""))
            s.add(pat)
            s.flush()
        st = Study(study_uid=doc["study_uid"], patient_fk=pat.id,
                   study_date=doc.get("study_date", ""), study_time=doc.get("study_time", ""),
                   accession=doc.get("accession", ""), description=doc.get("description", ""),
                   calling_ae=doc.get("calling_ae", ""),
                   first_received_at=_ts(doc.get("first_received_at")),
                   last_received_at=_ts(doc.get("last_received_at")))
        s.add(st)
        s.flush()
    for se in doc.get("series", []):
        if _series_fk(s, st.id, se["series_uid"]) is None:
            s.add(Series(series_uid=se["series_uid"], study_fk=st.id,
                         modality=se.get("modality", ""),
                         series_number=se.get("series_number", ""),
                         uid_reused=_flag_reuse(s, st.id, se["series_uid"])))
    s.flush()
    return st.id


def _series_fk(s, study_fk: int, series_uid: str) -> int | None:  # noqa: ANN001
    """Series rows are per study: a series UID another study reused is not this one's."""
    return s.scalar(select(Series.id).where(Series.study_fk == study_fk,
                                            Series.series_uid == series_uid))


def _flag_reuse(s, study_fk: int, series_uid: str) -> bool:  # noqa: ANN001
    """Whether another study already has this series UID (then its rows are flagged too)."""
    others = list(s.scalars(select(Series).where(Series.series_uid == series_uid,
                                                 Series.study_fk != study_fk)))
    for o in others:
        o.uid_reused = True
    return bool(others)


def _instance_row(s, study_fk: int, e: dict[str, Any]) -> int:  # noqa: ANN001
    version = e.get("version", 1)
    got = s.scalar(select(Instance.id).where(Instance.sop_uid == e["sop_uid"],
                                             Instance.version == version))
    if got is not None:
        return got
    series_fk = _series_fk(s, study_fk, e["series_uid"])
    if series_fk is None:
        se = Series(series_uid=e["series_uid"], study_fk=study_fk, modality="", series_number="",
                    uid_reused=_flag_reuse(s, study_fk, e["series_uid"]))
        s.add(se)
        s.flush()
        series_fk = se.id
    row = Instance(sop_uid=e["sop_uid"], version=version, series_fk=series_fk, study_fk=study_fk,
                   sop_class=e.get("sop_class", ""), transfer_syntax=e.get("transfer_syntax", ""),
                   size=e["size"], sha256=e["sha256"], received_at=_ts(e.get("received_at")),
                   calling_ae=e.get("calling_ae", ""), conflict=bool(e.get("conflict", False)))
    s.add(row)
    s.flush()
    return row.id


def import_volume(catalog: Catalog, vol: VolumeRead, retain_days: int = 3650,
                  trust_unsigned: bool = False) -> dict[str, Any]:
    """Restore the catalog rows one volume holds. Idempotent: rows already there
    are kept; a barcode already cataloged for another set is refused, and so is a
    volume that is not signed by a key of the identity files (unless
    ``trust_unsigned``) or whose contents fail dr/contents.py's checks."""
    label = vol.label or {}
    added = {"studies": 0, "instances": 0, "segments": 0}
    with catalog.unit(write=True) as uow:
        s = uow.session
        have = s.scalars(select(DrVolume).where(DrVolume.barcode == str(label.get("barcode"))
                                                )).first()
        if have is not None and have.volume_set != label.get("volume_set"):
            return {"refused": f"barcode {label['barcode']} is cataloged for another set "
                               f"({have.volume_set})"}
        why = distrust(vol, trust_unsigned)
        if why:
            return {"refused": why}
        before_studies = s.scalar(select(Study.id).order_by(Study.id.desc()).limit(1)) or 0
        before_inst = s.scalar(select(Instance.id).order_by(Instance.id.desc()).limit(1)) or 0
        docs = []
        if vol.catalog is not None:
            docs = [(d["study"], d["instances"]) for d in vol.catalog.get("studies", [])]
        for m in vol.members:
            if m.ok and m.manifest:
                docs.append((m.manifest["study"], m.manifest["files"]))
        study_fks, inst_fks = {}, {}
        for doc, entries in docs:
            fk = study_fks.get(doc["study_uid"]) or _study_rows(s, doc)
            study_fks[doc["study_uid"]] = fk
            for e in entries:
                inst_fks[(e["sop_uid"], e.get("version", 1))] = _instance_row(s, fk, e)
        if have is None:
            have = DrVolume(
                barcode=label["barcode"], pool=label.get("pool", ""),
                volume_set=label["volume_set"], sequence=label["sequence"],
                capacity=label.get("capacity", 0), block_size=label.get("block_size", 0),
                bytes=vol.stream_bytes if vol.complete else 0,
                segments=0, studies=0, state=SEALED if vol.complete else FAILED,
                location="", device=vol.where, kind=label.get("kind", "stream"),
                recipients=json.dumps(label.get("recipients", [])),
                continues=bool((vol.index or {}).get("continues", False)), writer="",
                created_at=_ts(label.get("created_at")),
                sealed_at=_ts(label.get("created_at")) if vol.complete else None,
                retain_until=_ts(label.get("created_at")) + timedelta(days=retain_days),
                stream_sha256=vol.stream_sha256 if vol.complete else None)
            s.add(have)
            s.flush()
        elif vol.where != "-" and vol.complete:
            # Known (a catalog backup named it): it was just read here, so it is found here.
            have.device = vol.where
        known = set(s.scalars(select(DrSegment.member).where(DrSegment.volume_fk == have.id)))
        for m in vol.members:
            if not m.ok or not m.manifest or m.name in known:
                continue
            man = m.manifest
            seg = DrSegment(volume_fk=have.id, study_fk=study_fks[man["study_uid"]],
                            member=m.name, study_segment=man["study_segment"],
                            last_of_study=man["last_of_study"], offset=m.offset, size=m.size,
                            sha256=m.sha256, instances=len(man["files"]),
                            bytes=sum(f["part_size"] for f in man["files"]))
            s.add(seg)
            s.flush()
            s.add_all([DrInstance(instance_fk=inst_fks[(f["sop_uid"], f.get("version", 1))],
                                  segment_fk=seg.id, path=f["file"], part=f["part"],
                                  parts=f["parts"]) for f in man["files"]])
            added["segments"] += 1
        have.segments = s.scalar(select(func.count()).select_from(DrSegment)
                                 .where(DrSegment.volume_fk == have.id)) or 0
        have.studies = len(study_fks)
        added["studies"] = len([f for f in study_fks.values() if f > before_studies])
        added["instances"] = len([f for f in inst_fks.values() if f > before_inst])
        uow.commit()
    return added


def read_volumes(wheres: list[str], identities: list, verify_keys: list | None = None,
                 keep_backups: Path | None = None) -> list[VolumeRead]:
    """Every volume read and checked (segments' plaintext not kept); their catalog
    backup members copied into ``keep_backups`` when given."""
    return [read_volume(w, identities, verify_keys=verify_keys, keep_backups=keep_backups)
            for w in wheres]


def rebuild_catalog(catalog: Catalog, reads: list[VolumeRead], retain_days: int = 3650,
                    trust_unsigned: bool = False) -> dict[str, Any]:
    """Import the rows of volumes already read (read_volumes), in any order."""
    volumes, sets = [], {}
    seen_instances: dict[str, dict[tuple[str, int], set[int]]] = {}
    expected: dict[str, int] = {}
    parts_of: dict[tuple[str, int], int] = {}
    for vol in reads:
        where = vol.where
        entry = {"where": where, "barcode": vol.barcode, "complete": vol.complete,
                 "problems": vol.errors, "damaged": damaged(vol),
                 "signed": vol.unauthentic is None, "signature_problem": vol.unauthentic}
        if vol.label is None:
            entry["imported"] = None
            volumes.append(entry)
            continue
        lab = vol.label
        entry.update({"volume_set": lab.get("volume_set"), "sequence": lab.get("sequence"),
                      "pool": lab.get("pool")})
        entry["imported"] = import_volume(catalog, vol, retain_days, trust_unsigned)
        volumes.append(entry)
        if "refused" in entry["imported"]:
            continue
        st = sets.setdefault(lab["volume_set"], {"pool": lab.get("pool"), "found": [],
                                                 "continues_after": {}})
        st["found"].append(lab["sequence"])
        st["continues_after"][lab["sequence"]] = (vol.index or {}).get("continues")
        for m in vol.members:
            if not m.ok or not m.manifest:
                continue
            man = m.manifest
            expected[man["study_uid"]] = man.get("study_instances", 0)
            per = seen_instances.setdefault(man["study_uid"], {})
            for f in man["files"]:
                key = (f["sop_uid"], f.get("version", 1))
                per.setdefault(key, set()).add(f["part"])
                parts_of[key] = f["parts"]
    set_report = {}
    for vs, st in sets.items():
        found = sorted(set(st["found"]))
        missing = [n for n in range(1, max(found) + 1) if n not in found]
        last = st["continues_after"].get(max(found))
        set_report[vs] = {"pool": st["pool"], "found": found, "missing": missing,
                          # None: the last volume read is truncated, so nobody can tell
                          "more_after_last": True if last else (None if last is None else False),
                          "complete": not missing and last is False}
    incomplete = []
    for uid, per in seen_instances.items():
        whole = sum(1 for k, got in per.items() if len(got) == parts_of[k])
        if whole < expected.get(uid, 0):
            incomplete.append({"study_uid": uid, "instances_found": whole,
                               "instances_expected": expected[uid]})
    return {"volumes": volumes, "sets": set_report,
            "studies": len(seen_instances), "studies_complete": len(seen_instances) - len(incomplete),
            "incomplete_studies": incomplete,
            "ok": all(v.get("imported") and "refused" not in v["imported"] and v["complete"]
                      and not v["damaged"] for v in volumes)
            and all(s["complete"] for s in set_report.values()) and not incomplete}
