"""Read the few attributes the catalog needs from a received object.

Only these tags are parsed (pydicom skips over everything else, pixel data
included, without loading it), so a 2 GiB multiframe object costs the same as a
10 KB one. Values are cut to the catalog's column widths and stripped of NULs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from archive.errors import InvalidInput
from archive.uids import InvalidUID, validate_uid

_TAGS = [
    Tag(0x0008, 0x0005),  # SpecificCharacterSet (to decode names)
    Tag(0x0008, 0x0016), Tag(0x0008, 0x0018),  # SOP Class / Instance
    Tag(0x0008, 0x0020), Tag(0x0008, 0x0030),  # StudyDate / StudyTime
    Tag(0x0008, 0x0050), Tag(0x0008, 0x0060),  # AccessionNumber / Modality
    Tag(0x0008, 0x1030),  # StudyDescription
    Tag(0x0010, 0x0010), Tag(0x0010, 0x0020), Tag(0x0010, 0x0021),  # name, ID, issuer
    Tag(0x0010, 0x0030), Tag(0x0010, 0x0040),  # birth date, sex
    Tag(0x0020, 0x000D), Tag(0x0020, 0x000E), Tag(0x0020, 0x0011),  # study, series, number
]


@dataclass(frozen=True)
class ReceivedAttributes:
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession: str
    study_description: str
    modality: str
    series_number: str


def _text(ds: pydicom.Dataset, keyword: str, width: int) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed optional value must not refuse the object
        return ""
    if value is None:
        return ""
    text = str(value).replace("\x00", "").strip()
    return text[:width]


def read_attributes(source: Path | BinaryIO) -> ReceivedAttributes:
    """Parse the catalog attributes from a Part 10 file; raise InvalidInput if unusable."""
    try:
        ds = pydicom.dcmread(source if not isinstance(source, Path) else str(source),
                             stop_before_pixels=True, specific_tags=_TAGS)
        ds.get("SOPInstanceUID")  # force decoding of what we asked for
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, NotImplementedError) as e:
        raise InvalidInput(f"data set cannot be parsed ({type(e).__name__})") from None
    except Exception as e:  # pydicom raises many types on hostile input; none may crash us
        raise InvalidInput(f"data set cannot be parsed ({type(e).__name__})") from None

    def uid(keyword: str, what: str) -> str:
        try:
            raw = ds.get(keyword)
        except Exception:
            raise InvalidInput(f"{what} UID cannot be decoded") from None
        try:
            return validate_uid(None if raw is None else str(raw), what)
        except InvalidUID:
            raise
    return ReceivedAttributes(
        sop_class=uid("SOPClassUID", "SOP Class"),
        sop_uid=uid("SOPInstanceUID", "SOP Instance"),
        study_uid=uid("StudyInstanceUID", "Study Instance"),
        series_uid=uid("SeriesInstanceUID", "Series Instance"),
        patient_id=_text(ds, "PatientID", 64),
        issuer=_text(ds, "IssuerOfPatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        birth_date=_text(ds, "PatientBirthDate", 8),
        sex=_text(ds, "PatientSex", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        accession=_text(ds, "AccessionNumber", 16),
        study_description=_text(ds, "StudyDescription", 64),
        modality=_text(ds, "Modality", 16),
        series_number=_text(ds, "SeriesNumber", 12),
    )
