"""What a DR volume says about its contents, checked before any of it becomes a row.

A volume is input from outside, like a DICOM association: a catalog rebuilt from
it later names restore paths and decides what bytes are "verified". So every UID
is checked with the grammar ingest uses (archive/uids.py), every text field for
its type and length, every path inside a segment must be the one derived from
those UIDs, and every size and SHA-256 the index, the catalog member and the
manifests give must agree with the bytes the segment holds. One failure refuses
the whole volume: a volume that lies about one thing is trusted for nothing.
"""
from __future__ import annotations

import re
from typing import Any

from archive.errors import InvalidInput
from archive.uids import validate_uid
from dr import segment

_SHA = re.compile(r"^[0-9a-f]{64}$")
_STUDY_TEXT = {"study_date": 8, "study_time": 16, "accession": 16, "description": 64,
               "calling_ae": 16, "first_received_at": 40, "last_received_at": 40}
_PATIENT_TEXT = {"patient_id": 64, "issuer": 64, "name": 324, "birth_date": 8, "sex": 16}
_ENTRY_TEXT = {"sop_class": 64, "transfer_syntax": 64, "calling_ae": 16, "received_at": 40}


class Untrustworthy(InvalidInput):
    """{}"""    # the message template (archive/errors.py): what a volume's contents get wrong


def _text(doc: dict[str, Any], limits: dict[str, int], what: str) -> None:
    for key, n in limits.items():
        v = doc.get(key, "")
        if not isinstance(v, str) or len(v) > n:
            raise Untrustworthy(f"{what} {key} is not text of at most {n} characters")


def _int(v: Any, what: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise Untrustworthy(f"{what} is not an integer of at least {low}")
    return v


def _sha(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _SHA.fullmatch(v):
        raise Untrustworthy(f"{what} is not a SHA-256 (64 lower-case hex digits)")
    return v


def check_study(doc: Any) -> str:
    """The study document of a manifest or catalog member; its Study UID."""
    if not isinstance(doc, dict) or not isinstance(doc.get("patient"), dict):
        raise Untrustworthy("a study document is malformed")
    uid = validate_uid(doc.get("study_uid"), "Study Instance")
    _text(doc, _STUDY_TEXT, "study")
    _text(doc["patient"], _PATIENT_TEXT, "patient")
    series = doc.get("series", [])
    if not isinstance(series, list):
        raise Untrustworthy("a study's series list is malformed")
    for se in series:
        if not isinstance(se, dict):
            raise Untrustworthy("a series entry is malformed")
        validate_uid(se.get("series_uid"), "Series Instance")
        _text(se, {"modality": 16, "series_number": 12}, "series")
    return uid


def check_entry(e: Any, study_uid: str, *, in_segment: bool) -> tuple[str, int]:
    """One instance entry (a manifest's ``files`` or a catalog member's ``instances``);
    (SOP UID, version). In a segment, its path must be the one its UIDs give and a
    whole instance's size and SHA-256 must be those of the file the segment holds
    (segment.read checked part_size and part_sha256 against the bytes)."""
    if not isinstance(e, dict):
        raise Untrustworthy("an instance entry is malformed")
    sop = validate_uid(e.get("sop_uid"), "SOP Instance")
    validate_uid(e.get("series_uid"), "Series Instance")
    version = _int(e.get("version", 1), "an instance version", 1)
    size = _int(e.get("size"), "an instance size")
    sha = _sha(e.get("sha256"), "an instance SHA-256")
    _text(e, _ENTRY_TEXT, "instance")
    if not isinstance(e.get("conflict", False), bool):
        raise Untrustworthy("an instance's conflict flag is not true or false")
    if not in_segment:
        return sop, version
    path = segment.instance_path(study_uid, e)
    parts = _int(e.get("parts"), "an instance's parts", 1)
    part = _int(e.get("part"), "an instance's part")
    part_size = _int(e.get("part_size"), "a part size")
    part_sha = _sha(e.get("part_sha256"), "a part SHA-256")
    if part >= parts:
        raise Untrustworthy(f"instance {sop}: part {part} of {parts}")
    want = path if parts == 1 else f"{path}.part{part:04d}"
    if e.get("path") != path or e.get("file") != want:
        raise Untrustworthy(f"instance {sop}: its file name is not the one its UIDs give")
    if parts == 1 and (part_size != size or part_sha != sha):
        raise Untrustworthy(f"instance {sop}: size or SHA-256 differs from the bytes the "
                            f"volume holds ({size} said, {part_size} held)")
    if parts > 1 and part_size > size:
        raise Untrustworthy(f"instance {sop}: a part is larger than the instance")
    return sop, version


def check_volume(label: dict[str, Any], index: dict[str, Any] | None,
                 catalog: dict[str, Any] | None, members: list) -> None:  # noqa: ANN001
    """Everything a volume says before it is imported; raises Untrustworthy.
    ``members``: reader.MemberResult of every segment (only those read whole are
    checked against their bytes; a damaged one is not imported)."""
    if not isinstance(label.get("barcode"), str) or not re.fullmatch(r"[A-Za-z0-9-]{1,32}",
                                                                      label["barcode"]):
        raise Untrustworthy("the label's barcode is not letters, digits and '-'")
    if not isinstance(label.get("volume_set"), str) or len(label["volume_set"]) > 36:
        raise Untrustworthy("the label's volume set is not a UUID")
    _int(label.get("sequence"), "the label's sequence", 1)
    held: dict[tuple[str, int], tuple[int, str, str]] = {}
    index_study = {}
    if index is not None:
        for s in index.get("segments", []) if isinstance(index.get("segments"), list) else ():
            if isinstance(s, dict) and isinstance(s.get("member"), str):
                index_study[s["member"]] = validate_uid(s.get("study_uid"), "Study Instance")
    for m in members:
        if not m.ok or not m.manifest:
            continue
        man = m.manifest
        uid = check_study(man.get("study"))
        if man.get("study_uid") != uid or index_study.get(m.name, uid) != uid:
            raise Untrustworthy(f"member {m.name}: its manifest, study rows and index name "
                                "different studies")
        if man.get("barcode") != label["barcode"] or man.get("member") != m.name:
            raise Untrustworthy(f"member {m.name}: its manifest is for another volume or member")
        _int(man.get("study_segment"), "a study segment number", 1)
        _int(man.get("study_instances", 0), "a study's instance count")
        if not isinstance(man.get("last_of_study"), bool) or not isinstance(man.get("files"), list):
            raise Untrustworthy(f"member {m.name}: its manifest is malformed")
        for f in man["files"]:
            key = check_entry(f, uid, in_segment=True)
            held[key] = (f["size"], f["sha256"], uid)
    if catalog is None:
        return
    studies = catalog.get("studies", [])
    if not isinstance(studies, list):
        raise Untrustworthy("the catalog member is malformed")
    for d in studies:
        if not isinstance(d, dict) or not isinstance(d.get("instances"), list):
            raise Untrustworthy("the catalog member is malformed")
        uid = check_study(d.get("study"))
        for e in d["instances"]:
            key = check_entry(e, uid, in_segment=False)
            if key in held and held[key] != (e["size"], e["sha256"], uid):
                raise Untrustworthy(f"instance {key[0]}: the catalog member gives another "
                                    "size, SHA-256 or study than the segment that holds it")
