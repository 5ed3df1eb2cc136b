"""C-FIND identifiers to text and back (archive/dicom/identifier.py): every transfer
syntax a query context is accepted in, character sets, and hostile bytes."""
from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.dicom import identifier as I

SYNTAXES = I.COMMAND_TRANSFER_SYNTAXES


@pytest.mark.parametrize("ts", SYNTAXES)
def test_what_is_encoded_decodes_to_the_same_keys(ts):
    keys = {"PatientName": "DOE^JOHN", "PatientID": "", "StudyDate": "20240101-20240131",
            "ModalitiesInStudy": "CT\\MR", "StudyInstanceUID": "1.2.3\\1.2.4",
            "NumberOfStudyRelatedInstances": "12"}
    raw = I.encode(keys, "STUDY", ts)
    back = I.decode(raw, ts)
    assert back.level == "STUDY"
    assert back.keys == keys
    assert back.character_set == ()


def test_a_latin1_request_gets_latin1_answers_and_utf8_only_when_it_must():
    latin = I.encode({"PatientName": "Müller^Jürgen"}, "PATIENT", I.EXPLICIT_LE,
                     character_set=("ISO_IR 100",))
    assert b"M\xfcller" in latin
    got = I.decode(latin, I.EXPLICIT_LE)
    assert got.character_set == ("ISO_IR 100",) and got.keys["PatientName"] == "Müller^Jürgen"
    # Latin-1 cannot carry Greek: the answer switches to UTF-8 and declares it.
    greek = I.encode({"PatientName": "Παπαδόπουλος^Νίκος"}, "PATIENT", I.EXPLICIT_LE,
                     character_set=("ISO_IR 100",))
    got = I.decode(greek, I.EXPLICIT_LE)
    assert got.character_set == ("ISO_IR 192",)
    assert got.keys["PatientName"] == "Παπαδόπουλος^Νίκος"


def test_an_ascii_answer_keeps_the_requests_declaration_or_none():
    assert I.decode(I.encode({"PatientID": "X1"}, "PATIENT", I.IMPLICIT_LE),
                    I.IMPLICIT_LE).character_set == ()
    assert I.decode(I.encode({"PatientID": "X1"}, "PATIENT", I.IMPLICIT_LE,
                             character_set=("ISO_IR 100",)), I.IMPLICIT_LE
                    ).character_set == ("ISO_IR 100",)


def test_sequences_private_and_binary_elements_are_set_aside_not_matched():
    from pydicom import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.ReferencedStudySequence = Sequence([Dataset()])
    ds.add_new(0x00091010, "LO", "private")
    ds.add_new(0x7FE00010, "OB", b"\x00\x01")
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = False, True
    write_dataset(buf, ds)
    got = I.decode(buf.getvalue(), I.EXPLICIT_LE)
    assert got.keys == {"StudyInstanceUID": ""}
    assert set(got.ignored) == {"ReferencedStudySequence", "PixelData"}


def test_oversized_identifiers_and_deflate_bombs_are_refused_unread():
    with pytest.raises(I.IdentifierUnreadable, match="longer than"):
        I.decode(b"\x00" * (I.MAX_IDENTIFIER_BYTES + 1), I.EXPLICIT_LE)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = c.compress(b"\x00" * (50 << 20)) + c.flush()        # 50 MB in ~50 KB
    assert len(bomb) < I.MAX_IDENTIFIER_BYTES
    with pytest.raises(I.IdentifierUnreadable, match="inflates past"):
        I.decode(bomb, I.DEFLATED_LE)
    with pytest.raises(I.IdentifierUnreadable, match="corrupt"):
        I.decode(b"\xff\xfe garbage", I.DEFLATED_LE)


def test_an_error_never_carries_a_value():
    raw = I.encode({"PatientName": "SECRET^NAME"}, "PATIENT", I.EXPLICIT_LE)
    with pytest.raises(I.IdentifierUnreadable) as e:
        I.decode(raw[:-3], I.EXPLICIT_LE)                  # cut inside the name
    assert "SECRET" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048), ts=st.sampled_from(SYNTAXES))
def test_any_bytes_give_keys_or_a_clear_refusal(data, ts):
    try:
        got = I.decode(data, ts)
    except I.IdentifierUnreadable:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in got.keys.items())


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from([b"", I.encode({"PatientID": ""}, "PATIENT", I.EXPLICIT_LE)]),
       tail=st.binary(max_size=512))
def test_a_valid_start_with_any_tail_gives_keys_or_a_clear_refusal(prefix, tail):
    try:
        I.decode(prefix + tail, I.EXPLICIT_LE)
    except I.IdentifierUnreadable:
        pass


def test_file_meta_elements_some_scus_add_are_set_aside():
    # Orthanc 1.10 sends (0002,0003) beside SOPInstanceUID in an IMAGE identifier.
    import struct

    uid = b"1.2.5\x00"
    meta = struct.pack("<HH2sH", 0x0002, 0x0003, b"UI", len(uid)) + uid
    got = I.decode(meta + I.encode({"SOPInstanceUID": "1.2.5"}, "IMAGE", I.EXPLICIT_LE),
                   I.EXPLICIT_LE)
    assert got.keys == {"SOPInstanceUID": "1.2.5"} and got.level == "IMAGE"
