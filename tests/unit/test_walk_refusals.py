"""What the frame check refuses that standard tools would read differently, or not at
all (archive/dicom/walk.py): each case is accepted by pydicom's partial read, so only
the walk stands between it and an acknowledgement."""
from __future__ import annotations

import io
import struct
import zlib

import pytest

from archive.dicom import walk
from archive.dicom.walk import Truncated, check_complete

ELE, ILE, DEFLATE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"


def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"SQ", b"OB", b"UN"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


BASE = el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7") + el(0x0008, 0x0018, b"UI", b"1.2.3.4") \
    + el(0x0020, 0x000D, b"UI", b"1.2.3")


def check(ds: bytes, ts: str = ELE) -> dict:
    return check_complete(io.BytesIO(ds), 0, len(ds), ts, frozenset({0x0020000D}))


def test_a_well_formed_data_set_passes_with_its_study_uid():
    assert check(BASE)[0x0020000D].rstrip(b"\x00") == b"1.2.3"


def test_a_duplicate_study_uid_is_refused():
    # The catalog would file it under the last value; dcmtk reads the first.
    with pytest.raises(Truncated, match=r"\(0020,000D\) appears twice"):
        check(BASE + el(0x0020, 0x000D, b"UI", b"9.9.9"))


@pytest.mark.parametrize("group", [0x0000, 0x0002])
def test_command_or_file_meta_elements_in_the_data_set_are_refused(group):
    with pytest.raises(Truncated, match="inside the data set"):
        check(el(group, 0x0010, b"UI", b"1.2.840.10008.1.2") + BASE)


def test_a_whole_part10_file_sent_as_a_data_set_is_refused():
    from archive.dicom.part10 import file_meta

    with pytest.raises(Truncated):
        check(file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", ELE) + BASE)


def test_deeply_nested_defined_length_sequences_are_refused():
    # 50,000 levels crashed dcmdump; pydicom's partial read never looks inside.
    body = b""
    for _ in range(walk._MAX_DEPTH + 2):
        body = el(0x0040, 0xA730, b"SQ", item(body))
    with pytest.raises(Truncated, match="nested too deeply"):
        check(BASE + body)
    ok = b""
    for _ in range(5):
        ok = el(0x0040, 0xA730, b"SQ", item(ok))
    check(BASE + ok)


def test_a_defined_length_sequence_with_a_broken_item_is_refused_in_implicit_vr_too():
    bad_item = struct.pack("<HHI", 0xFFFE, 0xE000, 40) + b"\x00" * 8   # item longer than its sequence
    seq = struct.pack("<HHI", 0x0040, 0xA730, len(bad_item)) + bad_item
    implicit = b"".join(struct.pack("<HHI", g, e, len(v)) + v for g, e, v in (
        (0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.7\x00"), (0x0008, 0x0018, b"1.2.3.4\x00")))
    with pytest.raises(Truncated):
        check(implicit + seq, ILE)


def deflated(ds: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(ds) + c.flush()


def test_a_deflated_data_set_is_walked_after_inflating():
    assert check(deflated(BASE), DEFLATE)[0x0020000D].rstrip(b"\x00") == b"1.2.3"
    with pytest.raises(Truncated):      # truncated pixel data inside the deflate
        check(deflated(BASE + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 1000) + b"\x00" * 10),
              DEFLATE)


def test_deflate_with_trailing_garbage_or_cut_short_is_refused():
    d = deflated(BASE)
    check(d + b"\x00", DEFLATE)                            # one NUL of padding is allowed
    for bad in (d + b"garbage!", d[:-3]):
        with pytest.raises(Truncated):
            check(bad, DEFLATE)


def test_a_deflate_bomb_is_refused_at_the_limit_without_holding_it(monkeypatch):
    import tracemalloc

    monkeypatch.setattr(walk, "MAX_INFLATED", 64 << 20)
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 200 << 20)
    c = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\x00" * (1 << 20)
    bomb = c.compress(BASE + pixels) + b"".join(c.compress(zeros) for _ in range(200)) + c.flush()
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(Truncated, match="inflates to more than"):
            check(bomb, DEFLATE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
