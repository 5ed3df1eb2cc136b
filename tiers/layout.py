"""Object keys on an online site, derived only from validated UIDs.

Layout version 1 (docs/formats/site-layout.md):

    objects/<S[0:2]>/<S[2:4]>/<study-uid>/<I[0]>/<sop-uid>.dcm           first version
    objects/<S[0:2]>/<S[2:4]>/<study-uid>/<I[0]>/<sop-uid>.<h16>.dcm     a conflicting version

S = hex SHA-256 of the Study Instance UID, I = hex SHA-256 of the SOP Instance
UID, h16 = the first 16 hex digits of the conflicting file's SHA-256. Hashing
spreads studies over 65,536 directories (about 150 per directory at 10 million
studies) and a study's instances over 16, so no directory grows past a few
thousand entries even for a 50,000-image study.
"""
from __future__ import annotations

import hashlib
import re

from archive.uids import validate_uid

LAYOUT_VERSION = 1
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _h(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii")).hexdigest()


def study_prefix(study_uid: str) -> str:
    study_uid = validate_uid(study_uid, "Study Instance")
    s = _h(study_uid)
    return f"objects/{s[0:2]}/{s[2:4]}/{study_uid}/"


def instance_key(study_uid: str, sop_uid: str, conflict_sha256: str | None = None) -> str:
    """Key of one instance; ``conflict_sha256`` names a second, different version."""
    sop_uid = validate_uid(sop_uid, "SOP Instance")
    name = sop_uid
    if conflict_sha256 is not None:
        tag = conflict_sha256[:16]
        if not _HEX16.fullmatch(tag):
            raise ValueError("conflict tag must be hex")
        name = f"{sop_uid}.{tag}"
    return f"{study_prefix(study_uid)}{_h(sop_uid)[0]}/{name}.dcm"


def bundle_key(study_uid: str, bundle_id: str) -> str:
    """Key of a study bundle on the object tier (docs/formats/study-bundle.md):
    ``bundles/<S[0:2]>/<S[2:4]>/<study-uid>/<bundle-uuid>.pvb``. No patient data:
    the study UID is already part of every online key, the rest is random."""
    study_uid = validate_uid(study_uid, "Study Instance")
    if not _UUID.fullmatch(bundle_id):
        raise ValueError("bundle id must be a lowercase UUID")
    s = _h(study_uid)
    return f"bundles/{s[0:2]}/{s[2:4]}/{study_uid}/{bundle_id}.pvb"
