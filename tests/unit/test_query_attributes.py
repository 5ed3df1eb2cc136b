"""The attributes C-FIND needs are read at ingest, by both readers, in every character set."""
from __future__ import annotations

from pathlib import Path

import pytest

from archive.dicom import pn
from archive.dicom.attributes import (
    CATALOG_TAGS,
    ReceivedAttributes,
    attributes_from_raw,
    read_attributes,
)
from archive.dicom.part10 import dataset_offset
from archive.dicom.walk import check_complete
from tests.support.dataset import EXPLICIT_LE, IMPLICIT_LE, make_instance

QUERY = {"StudyID": "S-42", "ReferringPhysicianName": "Who^Doctor", "SeriesDescription": "AX T1",
         "SeriesDate": "20240103", "SeriesTime": "111213.5", "InstanceNumber": "17"}


def _raw(path: Path, ts: str) -> dict[int, bytes]:
    with open(path, "rb") as f:
        off = dataset_offset(f)
        return check_complete(f, off, path.stat().st_size - off, ts, CATALOG_TAGS)


@pytest.mark.parametrize("ts", [EXPLICIT_LE, IMPLICIT_LE])
@pytest.mark.parametrize("charset,physician,description", [
    ("ISO_IR 100", "Müller^Jürgen", "Schädel nativ"),
    ("ISO_IR 192", "山田^太郎", "頭部 単純"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "AX T1"),
])
def test_query_attributes_from_both_readers(tmp_path: Path, ts, charset, physician, description):
    made = make_instance(tmp_path / "q.dcm", ts=ts, raw_overrides={
        **QUERY, "SpecificCharacterSet": charset, "ReferringPhysicianName": physician,
        "SeriesDescription": description})
    slow = read_attributes(made.path)
    assert slow == attributes_from_raw(_raw(made.path, ts))
    assert (slow.study_id, slow.referring_physician, slow.series_description, slow.series_date,
            slow.series_time, slow.instance_number) == (
        "S-42", physician, description, "20240103", "111213.5", "17")
    assert slow.referring_physician_fold == pn.fold(physician)


@pytest.mark.filterwarnings("ignore")  # pydicom warns about the over-long values we write
def test_absent_query_attributes_are_empty_and_cut_to_width(tmp_path: Path):
    made = make_instance(tmp_path / "a.dcm")   # has InstanceNumber 1, none of the others
    a = read_attributes(made.path)
    assert (a.study_id, a.referring_physician, a.series_description, a.series_date,
            a.series_time, a.instance_number) == ("", "", "", "", "", "1")
    made = make_instance(tmp_path / "b.dcm", raw_overrides={
        "StudyID": "X" * 40, "SeriesDescription": "D" * 200, "ReferringPhysicianName": "R" * 400})
    b = read_attributes(made.path)
    assert b == attributes_from_raw(_raw(made.path, EXPLICIT_LE))
    assert (len(b.study_id), len(b.series_description), len(b.referring_physician)) == (16, 64, 324)


def test_constructors_from_before_keep_working():
    a = ReceivedAttributes("1.2", "1.3", "1.4", "1.5", "P", "", "Doe^Jane", "", "", "", "",
                           "", "", "CT", "1")
    assert (a.study_id, a.instance_number, a.patient_name_fold) == ("", "", "doe^jane")


@pytest.mark.parametrize("name,folded", [
    ("DOE^JOHN", "doe^john"), ("Doe^John^^^", "doe^john"), ("Straße^Émile", "strasse^émile"),
    ("Yamada^Tarou==", "yamada^tarou"), ("Yamada^^=山田^太郎^", "yamada=山田^太郎"),
    ("", ""), (None, ""), ("E\u0301mile", "émile"),   # NFC: a combining accent is one letter
])
def test_fold(name, folded):
    assert pn.fold(name) == folded


def test_fold_keeps_the_column_width():
    assert len(pn.fold("ß" * 324)) == pn.WIDTH
