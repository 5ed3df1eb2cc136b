import io
import random
from pathlib import Path

import pydicom
import pytest

from archive.dicom.part10 import SpooledObject, dataset_offset, file_meta
from archive.dicom.walk import Truncated, check_complete
from tests.support.dataset import VARIED, make_varied_study


def test_file_meta_is_readable_by_pydicom_and_deterministic():
    meta = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
    assert meta == file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
    ds = pydicom.dcmread(io.BytesIO(meta), force=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert dataset_offset(io.BytesIO(meta)) == len(meta)


def test_spooled_object_streams_meta_then_region(tmp_path: Path):
    spool = tmp_path / "s"
    spool.write_bytes(b"HEADER" + bytes(range(256)) * 40)
    obj = SpooledObject(spool, 6, 256 * 40, b"META")
    obj.compute_sha256()
    with obj.open() as f:
        out = b"".join(iter(lambda: f.read(7), b""))
    assert out == b"META" + bytes(range(256)) * 40
    assert obj.size == len(out)


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> list:
    return make_varied_study(tmp_path_factory.mktemp("v"), size=3000)


def _check(path: Path, data: bytes | None = None) -> None:
    data = data if data is not None else path.read_bytes()
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    f = io.BytesIO(data)
    off = dataset_offset(f)
    check_complete(f, off, len(data) - off, ts)


def test_every_kind_is_complete(varied):
    assert len(varied) == len(VARIED)
    for m in varied:
        _check(m.path)


def test_truncation_inside_the_last_value_is_detected(varied):
    """The realistic failure: the connection drops in the middle of the pixel data
    (or the document/text that ends the object). Every such cut must be refused."""
    rng = random.Random(7)
    checked = 0
    for m in varied:
        if m.transfer_syntax == "1.2.840.10008.1.2.1.99":
            continue  # deflated: framing is checked by inflating
        data = m.path.read_bytes()
        for _ in range(20):
            cut = len(data) - rng.randrange(1, 1000)
            with pytest.raises(Truncated):
                _check(m.path, data[:cut])
            checked += 1
    assert checked > 100


def test_random_cuts_are_refused_unless_on_an_element_boundary(varied):
    """A cut exactly between two elements leaves a shorter but well-formed data set,
    which framing cannot tell apart; anywhere else must be refused."""
    rng = random.Random(11)
    refused = total = 0
    for m in varied:
        if m.transfer_syntax == "1.2.840.10008.1.2.1.99":
            continue
        data = m.path.read_bytes()
        off = dataset_offset(io.BytesIO(data))
        for _ in range(30):
            total += 1
            try:
                _check(m.path, data[:rng.randrange(off + 1, len(data))])
            except Truncated:
                refused += 1
    assert refused / total > 0.9


@pytest.mark.parametrize("charset,name", [
    ("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "山田^太郎"), (None, "Plain^Ascii"),
    ("ISO 2022 IR 6\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎"),
])
def test_raw_attributes_match_pydicom(tmp_path: Path, varied, charset, name):
    """The one-pass reader used at ingest gives what pydicom gives, for every kind."""
    from archive.dicom.attributes import (
        CATALOG_TAGS,
        attributes_from_raw,
        read_attributes,
    )
    from tests.support.dataset import make_instance

    extra = make_instance(tmp_path / "n.dcm")
    ds = pydicom.dcmread(extra.path)
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.PatientName = name
    ds.save_as(extra.path)
    for path in [m.path for m in varied] + [extra.path]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        with open(path, "rb") as f:
            off = dataset_offset(f)
            raw = check_complete(f, off, path.stat().st_size - off, ts, CATALOG_TAGS)
        if raw is None:
            continue  # deflated: pydicom reads it
        assert attributes_from_raw(raw) == read_attributes(path), path.name
    with open(extra.path, "rb") as f:
        off = dataset_offset(f)
        raw = check_complete(f, off, extra.path.stat().st_size - off, "1.2.840.10008.1.2.1", CATALOG_TAGS)
    assert attributes_from_raw(raw).patient_name == name
