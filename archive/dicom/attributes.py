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

from archive.dicom import pn
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
    # For C-FIND (archive/catalog/query.py):
    Tag(0x0008, 0x0021), Tag(0x0008, 0x0031),  # SeriesDate / SeriesTime
    Tag(0x0008, 0x0090),  # ReferringPhysicianName
    Tag(0x0008, 0x103E),  # SeriesDescription
    Tag(0x0020, 0x0010), Tag(0x0020, 0x0013),  # StudyID / InstanceNumber
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
    # For C-FIND; defaults keep constructors from before them working.
    study_id: str = ""
    referring_physician: str = ""
    series_description: str = ""
    series_date: str = ""
    series_time: str = ""
    instance_number: str = ""

    @property
    def patient_name_fold(self) -> str:
        """patients.name_fold: the name as C-FIND matches it case-insensitively."""
        return pn.fold(self.patient_name)

    @property
    def referring_physician_fold(self) -> str:
        """studies.referring_physician_fold."""
        return pn.fold(self.referring_physician)


CATALOG_TAGS = frozenset(int(t) for t in _TAGS)
_KEYWORDS = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080020: "StudyDate",
    0x00080030: "StudyTime", 0x00080050: "AccessionNumber", 0x00080060: "Modality",
    0x00081030: "StudyDescription", 0x00100010: "PatientName", 0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID", 0x00100030: "PatientBirthDate", 0x00100040: "PatientSex",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID", 0x00200011: "SeriesNumber",
    0x00080021: "SeriesDate", 0x00080031: "SeriesTime", 0x00080090: "ReferringPhysicianName",
    0x0008103E: "SeriesDescription", 0x00200010: "StudyID", 0x00200013: "InstanceNumber",
}
# Text VRs whose bytes depend on the Specific Character Set (PS3.5 6.1.2.3).
_CHARSET_DEPENDENT = {"PatientName", "PatientID", "IssuerOfPatientID", "StudyDescription",
                      "AccessionNumber", "ReferringPhysicianName", "SeriesDescription", "StudyID"}


def attributes_from_raw(raw: dict[int, bytes]) -> ReceivedAttributes:
    """Build the attributes from raw top-level values collected by walk.check_complete.

    Same result as read_attributes, without a second parse of the object.
    """
    from pydicom.charset import convert_encodings, decode_bytes

    charset = raw.get(0x00080005, b"").decode("ascii", "replace").strip(" \x00")
    try:
        encodings = convert_encodings([c.strip() for c in charset.split("\\")] if charset else [])
    except Exception:
        encodings = ["iso8859"]
    values: dict[str, str] = {}
    for tag, kw in _KEYWORDS.items():
        b = raw.get(tag)
        if b is None:
            continue
        if kw in _CHARSET_DEPENDENT:
            try:
                text = decode_bytes(b, encodings, {0x5C, 0x3D, 0x5E})  # \ = ^ reset the encoding
            except Exception:
                text = b.decode("latin-1")
        else:
            text = b.decode("ascii", "replace")
        values[kw] = text.replace("\x00", "").strip()

    def uid(kw: str, what: str) -> str:
        return validate_uid(values.get(kw), what)

    def text(kw: str, width: int) -> str:
        return values.get(kw, "")[:width]

    return ReceivedAttributes(
        sop_class=uid("SOPClassUID", "SOP Class"),
        sop_uid=uid("SOPInstanceUID", "SOP Instance"),
        study_uid=uid("StudyInstanceUID", "Study Instance"),
        series_uid=uid("SeriesInstanceUID", "Series Instance"),
        patient_id=text("PatientID", 64), issuer=text("IssuerOfPatientID", 64),
        patient_name=text("PatientName", 324), birth_date=text("PatientBirthDate", 8),
        sex=text("PatientSex", 16), study_date=text("StudyDate", 8),
        study_time=text("StudyTime", 16), accession=text("AccessionNumber", 16),
        study_description=text("StudyDescription", 64), modality=text("Modality", 16),
        series_number=text("SeriesNumber", 12),
        study_id=text("StudyID", 16), referring_physician=text("ReferringPhysicianName", 324),
        series_description=text("SeriesDescription", 64), series_date=text("SeriesDate", 8),
        series_time=text("SeriesTime", 16), instance_number=text("InstanceNumber", 12),
    )


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
    if not isinstance(source, Path):
        source.seek(0)
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
        study_id=_text(ds, "StudyID", 16),
        referring_physician=_text(ds, "ReferringPhysicianName", 324),
        series_description=_text(ds, "SeriesDescription", 64),
        series_date=_text(ds, "SeriesDate", 8),
        series_time=_text(ds, "SeriesTime", 16),
        instance_number=_text(ds, "InstanceNumber", 12),
    )
