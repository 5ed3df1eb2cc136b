"""Synthetic DICOM objects of many kinds (no real patient data).

``make_instance`` writes a Part 10 file with the given SOP class and transfer
syntax; pixel data is random noise of roughly the requested size, so that
compression does not make sizes meaningless. Compressed transfer syntaxes get
an encapsulated (fragmented) pixel data element: the bytes are not a valid
JPEG, which does not matter to an archive that stores bytes as received.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
ENCAPSULATED_TS = {JPEG_BASELINE, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, JPEG_2000, RLE}

# (SOP class UID, modality): current, retired and private classes.
SOP_CLASSES = {
    "CT": ("1.2.840.10008.5.1.4.1.1.2", "CT"),
    "MR": ("1.2.840.10008.5.1.4.1.1.4", "MR"),
    "CR": ("1.2.840.10008.5.1.4.1.1.1", "CR"),
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", "DX"),
    "MG": ("1.2.840.10008.5.1.4.1.1.1.2", "MG"),
    "US": ("1.2.840.10008.5.1.4.1.1.6.1", "US"),
    "US_RETIRED": ("1.2.840.10008.5.1.4.1.1.6", "US"),           # retired Ultrasound
    "US_MF_RETIRED": ("1.2.840.10008.5.1.4.1.1.3", "US"),        # retired US Multi-frame
    "NM": ("1.2.840.10008.5.1.4.1.1.20", "NM"),
    "PT": ("1.2.840.10008.5.1.4.1.1.128", "PT"),
    "XA": ("1.2.840.10008.5.1.4.1.1.12.1", "XA"),
    "SC": ("1.2.840.10008.5.1.4.1.1.7", "OT"),
    "SR": ("1.2.840.10008.5.1.4.1.1.88.11", "SR"),
    "RTSTRUCT": ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT"),
    "PDF": ("1.2.840.10008.5.1.4.1.1.104.1", "DOC"),
    "PRIVATE": ("1.3.12.2.1107.5.9.1", "OT"),                    # a vendor private class
}
NO_PIXELS = {"SR", "RTSTRUCT", "PDF"}


@dataclass(frozen=True)
class Made:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str


def make_instance(path: Path, *, kind: str = "CT", ts: str = EXPLICIT_LE,
                  size: int = 8192, study_uid: str | None = None,
                  series_uid: str | None = None, sop_uid: str | None = None,
                  patient_id: str = "TEST-0001", rng: random.Random | None = None,
                  raw_overrides: dict | None = None) -> Made:
    rng = rng or random.Random()
    sop_class, modality = SOP_CLASSES[kind]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + str(rng.randrange(10**6))
    ds.Modality = modality
    ds.StudyDescription = "Synthetic test study"
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if kind == "PDF":
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        body = b"%PDF-1.4\n" + rng.randbytes(max(0, size - 9))
        ds.EncapsulatedDocument = body + (b"\x00" if len(body) % 2 else b"")
    elif kind in NO_PIXELS:
        ds.ContentDate = "20240102"
        ds.ValueType = "CONTAINER"
        ds.ContentLabel = "SYNTHETIC"
        ds.TextValue = "x" * max(2, size)  # UT: sizes the object
    else:
        side = max(2, int((size / 2) ** 0.5)) // 2 * 2
        ds.Rows = side
        ds.Columns = side
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        pixels = rng.randbytes(side * side * 2)
        if ts in ENCAPSULATED_TS:
            ds.PixelData = encapsulate([pixels[: len(pixels) // 2], pixels[len(pixels) // 2:]])
        else:
            ds.PixelData = pixels
    for keyword, value in (raw_overrides or {}).items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    ds.set_original_encoding(ts == IMPLICIT_LE, ts != EXPLICIT_BE)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ts in ENCAPSULATED_TS and "PixelData" in ds:
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return Made(path, study_uid, series_uid, sop_uid, sop_class, ts)


VARIED = [
    ("CT", EXPLICIT_LE), ("CT", IMPLICIT_LE), ("MR", EXPLICIT_BE), ("CR", DEFLATED_LE),
    ("DX", JPEG_LOSSLESS_SV1), ("MG", JPEG_2000), ("US", JPEG_BASELINE), ("US", RLE),
    ("NM", JPEG_LS_LOSSLESS), ("PT", EXPLICIT_LE),
    ("XA", IMPLICIT_LE), ("SC", EXPLICIT_LE), ("SR", EXPLICIT_LE), ("RTSTRUCT", IMPLICIT_LE),
    ("PDF", EXPLICIT_LE),
]
# dcmtk's storescu ignores SOP classes it does not know (retired and private ones);
# these are pushed with pynetdicom or Orthanc instead.
NOT_FOR_STORESCU = [("PRIVATE", EXPLICIT_LE), ("US_RETIRED", RLE), ("US_MF_RETIRED", EXPLICIT_LE)]


def make_varied_study(directory: Path, per_kind: int = 1, size: int = 4096,
                      seed: int = 1, kinds: list[tuple[str, str]] | None = None) -> list[Made]:
    """One study holding every kind in ``kinds`` (default VARIED), each its own series."""
    rng = random.Random(seed)
    study = generate_uid()
    out = []
    for kind, ts in kinds or VARIED:
        series = generate_uid()
        for i in range(per_kind):
            out.append(make_instance(directory / f"{kind}-{ts}-{i}.dcm", kind=kind, ts=ts,
                                     size=size, study_uid=study, series_uid=series, rng=rng))
    return out


def make_ct_series(directory: Path, count: int, size: int = 512 * 1024, seed: int = 2,
                   study_uid: str | None = None, patient_id: str = "TEST-0001") -> list[Made]:
    rng = random.Random(seed)
    study = study_uid or generate_uid()
    series = generate_uid()
    return [make_instance(directory / f"ct{i:05d}.dcm", kind="CT", size=size, study_uid=study,
                          series_uid=series, patient_id=patient_id, rng=rng)
            for i in range(count)]


def write_raw_part10(path: Path, sop_class: str, sop_uid: str, ts: str, dataset_bytes: bytes) -> Path:
    """A Part 10 file whose data set is arbitrary bytes (for malformed-input tests)."""
    from archive.dicom.part10 import file_meta

    path.write_bytes(file_meta(sop_class, sop_uid, ts) + dataset_bytes)
    os.sync()
    return path


def make_conflict(directory: Path, size: int = 9000, patient_id: str = "TEST-0001"
                  ) -> tuple[Made, Made]:
    """Two different objects under one SOP Instance UID, in one study and series:
    the one received second is a conflict (both versions are kept)."""
    first = make_instance(directory / "v1.dcm", size=size, patient_id=patient_id)
    second = make_instance(directory / "v2.dcm", size=size - 2000, patient_id=patient_id,
                           study_uid=first.study_uid, series_uid=first.series_uid,
                           sop_uid=first.sop_uid)
    return first, second
