"""The DICOMweb codecs: multipart/related bodies cut at every byte and hostile
(archive/dicom/multipart.py), and the DICOM JSON model and QIDO-RS parameters
(archive/dicom/dicom_json.py)."""
from __future__ import annotations

import io
import json
import random

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ImplicitVRLittleEndian

from archive.dicom import dicom_json as J
from archive.dicom import multipart as M
from archive.errors import InvalidInput

B = "pacs-7f3a.boundary"
DELIMITER = b"\r\n--" + B.encode()


def body_of(parts: list[tuple[dict[str, str], bytes]], boundary: str = B) -> bytes:
    out = b""
    for i, (headers, data) in enumerate(parts):
        extra = {k: v for k, v in headers.items() if k != "Content-Type"}
        out += M.part_head(boundary, headers.get("Content-Type", "application/dicom"),
                           extra, first=(i == 0)) + data
    return out + M.closing(boundary)


def parse(body: bytes, sizes, boundary: str = B, **kw) -> list:
    """Feed ``body`` in chunks of the given sizes (cycled), then close; events
    with consecutive PartData merged, so any chunking gives the same list."""
    p = M.RelatedParser(boundary, **kw)
    events: list = []
    pos, sizes = 0, list(sizes)
    i = 0
    while pos < len(body):
        n = sizes[i % len(sizes)]
        i += 1
        events += p.feed(body[pos:pos + n])
        pos += n
    p.close()
    return merged(events)


def merged(events: list) -> list:
    out: list = []
    for e in events:
        if isinstance(e, M.PartData):
            assert e.data, "an empty PartData"
            if out and isinstance(out[-1], M.PartData):
                out[-1] = M.PartData(out[-1].data + e.data)
                continue
        out.append(e)
    return out


def expected(parts: list[tuple[dict[str, str], bytes]]) -> list:
    out: list = []
    for headers, data in parts:
        out.append(M.PartStart({k.lower(): v for k, v in headers.items()}))
        if data:
            out.append(M.PartData(data))
        out.append(M.PartEnd())
    return out + [M.BodyEnd()]


TRICKY = [
    ({"Content-Type": "application/dicom"}, b"DICM" + bytes(range(256)) * 3),
    ({"Content-Type": "application/dicom", "Content-Location": "/studies/1.2.3"},
     b"ends with the boundary minus one\r\n--" + B[:-1].encode()),
    ({"Content-Type": "application/octet-stream"}, b""),
    ({"Content-Type": "application/dicom"}, b"\r\n--\r\n--" + B[:-1].encode() + b"X\r\n--\r"),
    ({"Content-Type": "application/dicom"}, b"\r"),
    ({"Content-Type": "application/dicom"}, b"--" + B.encode() + b" is not at a line start"),
]


# ---------------------------------------------------------------- Content-Type


@pytest.mark.parametrize("value, media_type, params", [
    ('multipart/related; type="application/dicom"; boundary=abc',
     "multipart/related", {"type": "application/dicom", "boundary": "abc"}),
    ("Multipart/Related;Type=application/dicom;BOUNDARY=AbC",
     "multipart/related", {"type": "application/dicom", "boundary": "AbC"}),
    ('  multipart/related ;  boundary = "a b\\"c\\\\d" ; ', "multipart/related",
     {"boundary": 'a b"c\\d'}),
    ("application/dicom", "application/dicom", {}),
    ("multipart/related;;boundary=x;", "multipart/related", {"boundary": "x"}),
    ('multipart/related; boundary=""', "multipart/related", {"boundary": ""}),
])
def test_content_type_is_parsed(value, media_type, params):
    assert M.parse_content_type(value) == (media_type, params)


@pytest.mark.parametrize("value", [
    "", "   ", "multipart", "multipart/", "/related", "multi part/related",
    "multipart/related boundary=x", "multipart/related; boundary", "multipart/related; =x",
    'multipart/related; boundary="unterminated', 'multipart/related; boundary="a"b',
    "multipart/related; boundary=a b", "multipart/related; boundary=a\x00",
    'multipart/related; boundary="a\nb"', "multipart/related; boundary=x; boundary=y",
    "multipart/related; boundary=\u00e9", "multipart/related\r\n; boundary=x",
])
def test_garbage_content_types_are_refused(value):
    with pytest.raises(M.MultipartError):
        M.parse_content_type(value)


def test_an_overlong_content_type_is_refused_before_it_is_read():
    value = "multipart/related; boundary=x; " + "".join(f"a{i}=b; " for i in range(900))
    assert len(value) > 4096
    with pytest.raises(M.MultipartError, match="longer than 4096"):
        M.parse_content_type(value)
    M.parse_content_type(value[:4096].rsplit(";", 1)[0])


def test_related_boundary_and_type():
    assert M.related_boundary('multipart/related; type="application/dicom"; boundary=b1') == \
        ("b1", "application/dicom")
    assert M.related_boundary("multipart/related; boundary=b1") == ("b1", "application/dicom")
    assert M.related_boundary('multipart/related; boundary=b1; type="Application/DICOM+XML"') \
        == ("b1", "application/dicom+xml")
    longest = "'()+_,-./:=? " * 5 + "aZ09a"
    assert len(longest) == 70
    assert M.related_boundary(f'multipart/related; boundary="{longest}"')[0] == longest


@pytest.mark.parametrize("value, why", [
    ("multipart/mixed; boundary=b1", "not multipart/related"),
    ("application/dicom", "not multipart/related"),
    ('multipart/related; type="application/dicom"', "no boundary"),
    ("multipart/related; boundary=" + "b" * 71, "1 to 70"),
    ('multipart/related; boundary=""', "1 to 70"),
    ('multipart/related; boundary="ends in space "', "1 to 70"),
    ('multipart/related; boundary="semi;colon"', "1 to 70"),
    ('multipart/related; boundary="a\\"b"', "1 to 70"),
    ('multipart/related; boundary=b1; type=""', "empty type"),
    ("multipart/related; boundary=b1; boundary=b2", "repeats"),
])
def test_related_boundary_refuses(value, why):
    with pytest.raises(M.MultipartError, match=why) as e:
        M.related_boundary(value)
    assert isinstance(e.value, InvalidInput)
    assert str(e.value).startswith("malformed multipart body: ")


# ---------------------------------------------------------------- writing


def test_part_head_and_closing_bytes():
    assert M.part_head("B", "application/dicom", first=True) == \
        b"--B\r\nContent-Type: application/dicom\r\n\r\n"
    assert M.part_head("B", 'application/dicom; transfer-syntax="1.2.840.10008.1.2.1"',
                       {"Content-Location": "/s/1"}) == \
        (b'\r\n--B\r\nContent-Type: application/dicom; transfer-syntax="1.2.840.10008.1.2.1"'
         b"\r\nContent-Location: /s/1\r\n\r\n")
    assert M.closing("B") == b"\r\n--B--\r\n"


@pytest.mark.parametrize("content_type, extra", [
    ("application/dicom\r\nX-Injected: 1", None),
    ("application/dicom", {"Content-Location": "/a\r\n\r\nbody"}),
    ("application/dicom", {"Bad Name": "v"}),
    ("application/dicom", {"Content-Location": "/\u00e9"}),
])
def test_part_head_refuses_header_injection(content_type, extra):
    with pytest.raises(ValueError):
        M.part_head("B", content_type, extra)


def test_writers_refuse_a_bad_boundary():
    for boundary in ("", "x" * 71, "a\r\nb", "trailing "):
        with pytest.raises(M.MultipartError):
            M.part_head(boundary, "application/dicom")
        with pytest.raises(M.MultipartError):
            M.closing(boundary)
        with pytest.raises(M.MultipartError):
            M.RelatedParser(boundary)


def test_new_boundaries_are_fresh_and_valid():
    seen = {M.new_boundary() for _ in range(200)}
    assert len(seen) == 200
    for b in seen:
        assert M.related_boundary(f"multipart/related; boundary={b}")[0] == b


# ---------------------------------------------------------------- parsing


def test_every_chunk_size_gives_the_same_events():
    body = body_of(TRICKY)
    want = expected(TRICKY)
    for size in range(1, len(body) + 2):
        assert parse(body, [size]) == want, size


def test_a_delimiter_split_at_every_point_across_two_chunks():
    parts = [({"Content-Type": "application/dicom"}, b"A" * 50),
             ({"Content-Type": "application/dicom"}, b"B" * 50)]
    body = body_of(parts)
    at = body.index(DELIMITER, 10)
    for cut in range(at - 2, at + len(DELIMITER) + 4):
        p = M.RelatedParser(B)
        events = p.feed(body[:cut]) + p.feed(body[cut:])
        p.close()
        assert merged(events) == expected(parts), cut


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datas=st.lists(st.one_of(
           st.binary(max_size=300),
           st.lists(st.sampled_from([b"\r\n", b"--", B.encode(), B[:-1].encode(), b"\r",
                                     b"\n", b"x", b" ", b"-"]), max_size=30).map(b"".join)
           # A writer picks a boundary its data does not hold (new_boundary).
           ).filter(lambda d: DELIMITER not in d),
           min_size=1, max_size=6),
       sizes=st.lists(st.integers(1, 97), min_size=1, max_size=8))
def test_round_trip_with_random_chunks(datas, sizes):
    parts = [({"Content-Type": "application/dicom", "Content-ID": f"<{i}>"}, d)
             for i, d in enumerate(datas)]
    assert parse(body_of(parts), sizes) == expected(parts)


def test_round_trip_with_a_fresh_boundary_and_big_parts():
    rng = random.Random(7)
    boundary = M.new_boundary()
    parts = [({"Content-Type": "application/dicom"}, rng.randbytes(rng.randrange(0, 200_000)))
             for _ in range(5)]
    body = body_of(parts, boundary)
    sizes = [rng.randrange(1, 70_000) for _ in range(50)]
    assert parse(body, sizes, boundary) == expected(parts)


def test_data_is_passed_on_as_it_comes_not_held():
    p = M.RelatedParser(B)
    p.feed(M.part_head(B, "application/dicom", first=True))
    fed = passed = 0
    rng = random.Random(1)
    for _ in range(2000):
        chunk = rng.randbytes(rng.randrange(1, 600)).replace(b"\r", b"\n") + b"\r\n-"
        fed += len(chunk)
        passed += sum(len(e.data) for e in p.feed(chunk) if isinstance(e, M.PartData))
        assert fed - passed <= len(DELIMITER)       # only a possible delimiter start held
    events = p.feed(M.closing(B))
    passed += sum(len(e.data) for e in events if isinstance(e, M.PartData))
    assert passed == fed and isinstance(events[-1], M.BodyEnd)


def test_a_chunk_with_no_cr_near_its_end_is_passed_on_whole():
    p = M.RelatedParser(B)
    p.feed(M.part_head(B, "application/dicom", first=True))
    assert p.feed(b"\r\n--" + b"x" * 100) == [M.PartData(b"\r\n--" + b"x" * 100)]
    assert p.feed(b"abc\r\n--" + B[:3].encode()) == [M.PartData(b"abc")]


def test_preamble_epilogue_padding_and_the_first_delimiter():
    parts = [({"Content-Type": "application/dicom"}, b"one")]
    plain = body_of(parts)
    want = expected(parts)
    # The first delimiter may open the body bare, or follow a preamble after a CRLF.
    assert parse(plain, [1]) == want
    assert parse(b"\r\n" + plain, [3]) == want
    assert parse(b"This is a preamble.\r\n" + plain, [5]) == want
    assert parse(b"preamble --" + B.encode() + b"\r\n" + plain, [1]) == want
    # Epilogue, and anything after the closing delimiter, is ignored.
    assert parse(plain + b"epilogue\r\n--" + B.encode() + b"\r\ngarbage", [2]) == want
    # Transport padding after a delimiter.
    padded = plain.replace(B.encode() + b"\r\n", B.encode() + b" \t \r\n")
    assert padded != plain and parse(padded, [1]) == want
    # The closing delimiter may end the body without a CRLF.
    assert parse(plain[:-2], [4]) == want


def test_a_line_right_after_the_blank_line_is_data_not_a_delimiter():
    # The blank line's CRLF ends the headers; a delimiter brings its own CRLF.
    body = b"--" + B.encode() + b"\r\nX: y\r\n\r\n--" + B.encode() + b"--" + M.closing(B)
    assert parse(body, [1]) == [M.PartStart({"x": "y"}), M.PartData(b"--" + B.encode() + b"--"),
                                M.PartEnd(), M.BodyEnd()]


def test_a_body_with_no_parts_is_just_ended():
    assert parse(b"--" + B.encode() + b"--", [1]) == [M.BodyEnd()]


def test_feeding_after_the_end_returns_nothing():
    p = M.RelatedParser(B)
    events = p.feed(body_of(TRICKY[:1]))
    assert isinstance(events[-1], M.BodyEnd)
    assert p.feed(b"\r\n--" + B.encode() + b"\r\n\r\nmore") == []
    p.close()


def test_headers_lower_cased_folded_joined_or_absent():
    head = (b"--" + B.encode() + b"\r\nContent-Type : application/dicom\r\n"
            b"X-Long: first\r\n  second\r\nX-Twice: a\r\nx-twice: b\r\n\r\ndata")
    assert parse(head + M.closing(B), [1]) == [
        M.PartStart({"content-type": "application/dicom", "x-long": "first second",
                     "x-twice": "a, b"}),
        M.PartData(b"data"), M.PartEnd(), M.BodyEnd()]
    no_headers = b"--" + B.encode() + b"\r\n\r\ndata" + M.closing(B)
    assert parse(no_headers, [1]) == [M.PartStart({}), M.PartData(b"data"), M.PartEnd(),
                                      M.BodyEnd()]


def hostile(body: bytes, sizes=(1, 7, 4096), **kw) -> None:
    for size in sizes:
        with pytest.raises(M.MultipartError):
            parse(body, [size], **kw)


def test_no_closing_delimiter_fails_on_close():
    body = body_of(TRICKY)
    for cut in (0, 1, 10, len(body) // 2, len(body) - 5, len(body) - 3):
        p = M.RelatedParser(B)
        p.feed(body[:cut])
        with pytest.raises(M.MultipartError, match="before the closing delimiter"):
            p.close()
    p = M.RelatedParser(B)
    p.feed(body[:-2])
    p.close()                           # only the CRLF after the closing "--" is missing


def test_an_empty_body_fails():
    p = M.RelatedParser(B)
    assert p.feed(b"") == []
    with pytest.raises(M.MultipartError):
        p.close()


def test_a_header_bomb_is_refused():
    bomb = b"--" + B.encode() + b"\r\n" + b"X-A: " + b"a" * 20_000
    hostile(bomb, sizes=(1, 100, 50_000))
    many = b"--" + B.encode() + b"\r\n" + b"X: y\r\n" * 3000 + b"\r\n" + M.closing(B)
    hostile(many, sizes=(1, 50_000))
    # Refused as it grows, not when the body ends: headers are held until complete.
    p = M.RelatedParser(B)
    p.feed(b"--" + B.encode() + b"\r\n")
    for _ in range(16):
        p.feed(b"X-A: " + b"a" * 1000)
    with pytest.raises(M.MultipartError, match="headers longer than 16384"):
        p.feed(b"a" * 1000)
    # A header block of exactly the limit is taken; one byte more is not.
    block = b"X-A: " + b"a" * (100 - 9) + b"\r\n\r\n"
    assert len(block) == 100
    ok = b"--" + B.encode() + b"\r\n" + block + M.closing(B)
    assert parse(ok, [1], max_header_bytes=100)[0] == M.PartStart({"x-a": "a" * 91})
    hostile(ok.replace(b"a\r\n", b"aa\r\n"), max_header_bytes=100)


@pytest.mark.parametrize("headers", [
    b"Content-Type application/dicom\r\n\r\n",
    b"Content-Type: application/dicom\r\nno colon here\r\n\r\n",
    b"NoColon\r\n\r\n",
    b": no name\r\n\r\n",
    b"Bad Name: x\r\n\r\n",
    b" folded: first\r\n\r\n",
    b"X-A: bare\nLF\r\n\r\n",
    b"X-A: \xff\xfe\r\n\r\n",
])
def test_malformed_header_lines_are_refused(headers):
    hostile(b"--" + B.encode() + b"\r\n" + headers + b"data" + M.closing(B))


def test_too_many_parts():
    parts = [({"Content-Type": "application/dicom"}, b"x")] * 5
    assert len(parse(body_of(parts), [3], max_parts=5)) == 16
    hostile(body_of(parts), max_parts=4)


def test_a_long_preamble_is_refused():
    plain = body_of(TRICKY[:1])
    assert parse(b"p" * 65_000 + b"\r\n" + plain, [4096])[-1] == M.BodyEnd()
    hostile(b"p" * (64 * 1024 + 1) + b"\r\n" + plain, sizes=(4096, 100_000))
    hostile(b"\r" * 70_000, sizes=(4096,))


@pytest.mark.parametrize("after", [b"x\r\n", b" x\r\n", b"-x", b" --", b"\n", b"\r\r",
                                   b" " * 1100 + b"\r\n"])
def test_a_delimiter_line_with_more_on_it_is_refused(after):
    hostile(b"--" + B.encode() + after + b"\r\n" + M.closing(B))
    hostile(M.part_head(B, "application/dicom", first=True) + b"data\r\n--" + B.encode()
            + after + M.closing(B))


def test_a_failed_parser_stays_failed():
    p = M.RelatedParser(B)
    with pytest.raises(M.MultipartError):
        p.feed(b"--" + B.encode() + b"garbage")
    with pytest.raises(M.MultipartError):
        p.feed(M.closing(B))
    with pytest.raises(M.MultipartError):
        p.close()


def test_parse_errors_do_not_quote_the_body():
    secret = b"DOE^JOHN"
    for body in (b"--" + B.encode() + b"\r\n" + secret + b"\r\n\r\n",
                 b"--" + B.encode() + secret,
                 b"--" + B.encode() + b"\r\nX: " + secret * 3000):
        with pytest.raises(M.MultipartError) as e:
            parse(body, [64])
        assert "DOE" not in str(e.value)


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(
           st.binary(max_size=400),
           st.lists(st.sampled_from([b"--", B.encode(), b"\r\n", b"\r\n\r\n", b"X: y",
                                     b"no colon", b" ", b"\t", b"\r", b"\n", b"\xff",
                                     B[:5].encode(), b"\x00"]),
                    max_size=40).map(b"".join)),
       sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5),
       max_header_bytes=st.integers(1, 64), max_parts=st.integers(0, 5))
def test_random_bytes_only_ever_raise_multipart_errors(body, sizes, max_header_bytes,
                                                       max_parts):
    try:
        parse(body, sizes, max_header_bytes=max_header_bytes, max_parts=max_parts)
    except M.MultipartError:
        pass


# ---------------------------------------------------------------- DICOM JSON: matches


def test_a_match_becomes_a_dicom_json_object():
    got = J.match_to_json({
        "StudyInstanceUID": "1.2.3",
        "PatientName": "Doe^John",
        "ModalitiesInStudy": "CT\\MR",
        "StudyDate": "20240131",
        "StudyTime": "101500",
        "NumberOfStudyRelatedInstances": "12",
        "PatientID": "",
        "RetrieveURL": "https://pacs.example/studies/1.2.3",
        "NotAKeyword": "x",
    })
    assert got == {
        "00080020": {"vr": "DA", "Value": ["20240131"]},
        "00080030": {"vr": "TM", "Value": ["101500"]},
        "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
        "00081190": {"vr": "UR", "Value": ["https://pacs.example/studies/1.2.3"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]},
        "00100020": {"vr": "LO"},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00201208": {"vr": "IS", "Value": [12]},
    }
    assert list(got) == sorted(got)
    json.dumps(got)


@pytest.mark.parametrize("keyword, text, element", [
    ("PatientName", "Yamada^Tarou=山田^太郎=やまだ^たろう",
     {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                             "Phonetic": "やまだ^たろう"}]}),
    ("PatientName", "=山田^太郎", {"vr": "PN", "Value": [{"Ideographic": "山田^太郎"}]}),
    ("PatientName", "Doe^John==", {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}),
    ("OtherPatientNames", "A^B\\C^D",
     {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, {"Alphabetic": "C^D"}]}),
    ("OtherPatientNames", "A^B\\", {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, None]}),
    ("PixelSpacing", "0.5\\2", {"vr": "DS", "Value": [0.5, 2]}),
    ("SliceThickness", " 1.25E1 ", {"vr": "DS", "Value": [12.5]}),
    ("SliceThickness", "3.0", {"vr": "DS", "Value": [3]}),
    ("InstanceNumber", " -4", {"vr": "IS", "Value": [-4]}),
    ("Rows", "512", {"vr": "US", "Value": [512]}),
    ("SOPClassesInStudy", "1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.4",
     {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"]}),
    ("ModalitiesInStudy", "CT\\\\MR", {"vr": "CS", "Value": ["CT", None, "MR"]}),
    ("ModalitiesInStudy", "\\", {"vr": "CS"}),
    ("StudyDescription", "", {"vr": "LO"}),
    ("PatientComments", "a\\b is text", {"vr": "LT", "Value": ["a\\b is text"]}),
    ("LargestImagePixelValue", "4095", {"vr": "US", "Value": [4095]}),
    ("LargestImagePixelValue", "-1", {"vr": "SS", "Value": [-1]}),
])
def test_values_take_their_json_type(keyword, text, element):
    got = J.match_to_json({keyword: text})
    assert list(got.values()) == [element]


def test_attributes_without_a_text_form_are_left_out():
    assert J.match_to_json({"ReferencedStudySequence": "", "PixelData": "x",
                            "": "x", "00100010": "x"}) == {}


def test_retrieve_url_works_without_pydicom_knowing_it(monkeypatch):
    real = J.tag_for_keyword
    monkeypatch.setattr(J, "tag_for_keyword",
                        lambda kw: None if kw == "RetrieveURL" else real(kw))
    assert J.match_to_json({"RetrieveURL": "https://x/studies/1"}) == \
        {"00081190": {"vr": "UR", "Value": ["https://x/studies/1"]}}
    assert J.parse_qido([("includefield", "RetrieveURL,00081190")]).include == ["RetrieveURL"]


@pytest.mark.parametrize("keyword, text", [
    ("NumberOfStudyRelatedInstances", "DOE12"),
    ("SliceThickness", "1.5mm"),
    ("SliceThickness", "NaN"),
    ("SliceThickness", "1e999"),
    ("Rows", "5.5"),
    ("PatientName", "DOE=A=B=C"),
])
def test_bad_stored_values_are_named_not_quoted(keyword, text):
    with pytest.raises(InvalidInput) as e:
        J.match_to_json({keyword: text})
    assert keyword in str(e.value)
    assert text not in str(e.value) and "DOE" not in str(e.value)


# ---------------------------------------------------------------- DICOM JSON: data sets


def _dataset() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientName = "Doe^John"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = "1.2.3"
    ds.Rows, ds.Columns, ds.BitsAllocated = 16, 16, 16
    ds.PixelRepresentation = 0
    ds.add_new(0x00280106, "US", 3)                         # SmallestImagePixelValue
    ds.add_new(0x00091010, "OB", b"\x01" * 4000)           # private, bulk
    ds.add_new(0x00091011, "OB", b"\x02" * 10)             # private, small: inlined
    icon = pydicom.Dataset()
    icon.Rows, icon.BitsAllocated = 2, 8
    icon.PixelData = b"\x03" * 2000
    ds.IconImageSequence = DicomSequence([icon])
    ds.ReferencedStudySequence = DicomSequence([])
    ds.PixelData = b"\x00\x01" * 256                        # 512 bytes
    return ds


def test_bulk_data_becomes_a_uri_by_tag_and_path():
    seen: list[str] = []

    def uri(path: str) -> str:
        seen.append(path)
        return f"https://pacs/bulk/{path}"

    got = J.dataset_to_json(_dataset(), uri, threshold=256)
    assert seen == ["00091010", "00880200/0/7FE00010", "7FE00010"]
    assert got["00091010"] == {"vr": "OB", "BulkDataURI": "https://pacs/bulk/00091010"}
    assert got["7FE00010"] == {"vr": "OW", "BulkDataURI": "https://pacs/bulk/7FE00010"}
    assert got["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"].endswith(
        "00880200/0/7FE00010")
    assert got["00091011"] == {"vr": "OB", "InlineBinary": "AgICAgICAgICAg=="}
    assert got["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert got["00280106"] == {"vr": "US", "Value": [3]}
    assert got["00081110"] == {"vr": "SQ"}
    assert list(got) == sorted(got)
    json.dumps(got)


def test_without_a_uri_maker_bulk_data_is_left_out_never_inlined():
    got = J.dataset_to_json(_dataset())
    assert "00091010" not in got
    assert "7FE00010" not in got["00880200"]["Value"][0]
    assert got["7FE00010"]["vr"] == "OW" and "InlineBinary" in got["7FE00010"]   # 512 bytes
    assert "7FE00010" not in J.dataset_to_json(_dataset(), threshold=511)
    assert "InlineBinary" in J.dataset_to_json(_dataset(), threshold=512)["7FE00010"]


@pytest.mark.parametrize("vr, value, json_vr", [
    ("OB or OW", b"\x00" * 2000, "OW"),        # nothing to settle it by: the binary reading
    ("UT", "A" * 2000, "UT"),                 # a file that declares something odd
])
def test_pixel_data_in_any_vr_is_bulk(vr, value, json_vr):
    ds = pydicom.Dataset()
    ds.add_new(0x7FE00010, vr, value)
    got = J.dataset_to_json(ds, lambda t: "u")
    assert got == {"7FE00010": {"vr": json_vr, "BulkDataURI": "u"}}
    assert J.dataset_to_json(ds) == {}


def test_the_rest_matches_pydicom_and_the_data_set_is_left_as_it_was():
    ds = _dataset()
    ds.add_new(0x00280107, "US or SS", 7)                  # LargestImagePixelValue
    before = {tag: (elem.VR, elem.value) for tag, elem in ds.items()}
    got = J.dataset_to_json(ds, lambda t: t, threshold=256)
    theirs = ds.to_json_dict(bulk_data_threshold=100_000)
    for key in ("00100010", "00100020", "0020000D", "00280010", "00091011"):
        assert got[key] == theirs[key]
    assert got["00280107"] == {"vr": "US", "Value": [7]}
    assert {tag: (elem.VR, elem.value) for tag, elem in ds.items()} == before


def test_an_implicit_vr_file_gets_its_ambiguous_vrs_settled():
    ds = _dataset()
    ds.PixelRepresentation = 1
    ds.add_new(0x00280107, "SS", -2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    got = J.dataset_to_json(back, lambda t: "u", threshold=256)
    assert got["00280107"] == {"vr": "SS", "Value": [-2]}
    assert got["7FE00010"] == {"vr": "OW", "BulkDataURI": "u"}
    assert got["00091010"] == {"vr": "UN", "BulkDataURI": "u"}
    assert got["00880200"]["Value"][0]["7FE00010"] == {"vr": "OW", "BulkDataURI": "u"}


def test_an_element_pydicom_cannot_write_is_named_not_quoted(recwarn):
    raw = b"\x20\x00\x08\x12IS\x08\x00DOE^JOHN"      # (0020,1208) IS, explicit VR LE
    ds = read_dataset(io.BytesIO(raw), is_implicit_VR=False, is_little_endian=True)
    with pytest.raises(InvalidInput) as e:
        J.dataset_to_json(ds)
    assert "00201208" in str(e.value) and "DOE" not in str(e.value)
    assert not recwarn.list             # pydicom's warning would quote the value


# ---------------------------------------------------------------- QIDO-RS parameters


def test_a_qido_query_is_read_into_c_find_terms():
    q = J.parse_qido([
        ("PatientName", "Doe*"), ("00100020", "P1"), ("StudyDate", "20240101-20240131"),
        ("StudyInstanceUID", "1.2,1.3"), ("ModalitiesInStudy", "CT,MR"),
        ("includefield", "StudyDescription,00081030"), ("includefield", "0020000d"),
        ("fuzzymatching", "true"), ("limit", "25"), ("offset", "50"), ("AccessionNumber", ""),
    ])
    assert q == J.QidoQuery(
        keys={"PatientName": "Doe*", "PatientID": "P1", "StudyDate": "20240101-20240131",
              "StudyInstanceUID": "1.2\\1.3", "ModalitiesInStudy": "CT,MR",
              "AccessionNumber": ""},
        include=["StudyDescription", "StudyInstanceUID"], include_all=False, fuzzy=True,
        limit=25, offset=50)


def test_qido_defaults_caps_and_all():
    assert J.parse_qido([]) == J.QidoQuery(keys={}, include=[], include_all=False,
                                           fuzzy=False, limit=None, offset=0)
    assert J.parse_qido([("limit", "5000")]).limit == 1000
    assert J.parse_qido([("limit", "5000")], max_limit=10).limit == 10
    assert J.parse_qido([("limit", "0"), ("offset", "0")]).limit == 0
    assert J.parse_qido([("fuzzymatching", "False")]).fuzzy is False
    q = J.parse_qido([("includefield", "all"), ("includefield", "PatientAge")])
    assert q.include_all and q.include == ["PatientAge"]
    assert J.parse_qido([("SeriesInstanceUID", " 1.2 , 1.3 ")]).keys == \
        {"SeriesInstanceUID": "1.2\\1.3"}
    assert J.parse_qido([("x", "v")] * 0 + [("PatientID", "v" * 1024)]).keys["PatientID"] \
        == "v" * 1024
    assert len(J.parse_qido([("includefield", "PatientID")] * 64).include) == 1


@pytest.mark.parametrize("params, named", [
    ([("PatientName", "Doe*"), ("PatientName", "Roe*")], "PatientName"),
    ([("PatientName", "Doe*"), ("00100010", "Roe*")], "00100010"),
    ([("patientname", "Doe*")], "patientname"),
    ([("NoSuchKeyword", "Doe*")], "NoSuchKeyword"),
    ([("0010001", "Doe*")], "0010001"),
    ([("0010001G", "Doe*")], "0010001G"),
    ([("001000100", "Doe*")], "001000100"),
    ([("00091010", "Doe*")], "00091010"),
    ([("50000010", "Doe*")], "50000010"),
    ([("ReferencedStudySequence", "Doe*")], "sequence"),
    ([("00081110", "")], "sequence"),
    ([("ReferencedStudySequence.ReferencedSOPInstanceUID", "Doe*")], "sequence"),
    ([("PixelData", "Doe*")], "binary"),
    ([("PatientName", "Doe*" * 300)], "PatientName"),
    ([("PatientID", "x")] * 65, "64"),
    ([("includefield", "PatientName,Nope")], "includefield"),
    ([("includefield", "PatientName,,PatientID")], "includefield"),
    ([("includefield", "Doe*")], "includefield"),
    ([("fuzzymatching", "yes")], "fuzzymatching"),
    ([("fuzzymatching", "true"), ("fuzzymatching", "true")], "fuzzymatching"),
    ([("limit", "-1")], "limit"),
    ([("limit", "1.5")], "limit"),
    ([("limit", "")], "limit"),
    ([("limit", "+5")], "limit"),
    ([("limit", " 5")], "limit"),
    ([("limit", "\u0663")], "limit"),
    ([("limit", "5"), ("limit", "6")], "limit"),
    ([("offset", "DOE")], "offset"),
    ([("x" * 100, "Doe*")], "xxxx"),
])
def test_bad_query_parameters_are_named_not_quoted(params, named):
    with pytest.raises(J.QueryParamError) as e:
        J.parse_qido(params)
    message = str(e.value)
    assert message.startswith("bad query parameter: ")
    assert named in message
    assert "Doe" not in message and "DOE" not in message
    assert len(message) < 200
    assert isinstance(e.value, InvalidInput)


def test_a_tag_is_taken_only_as_the_attribute_it_is(monkeypatch):
    # keyword_for_tag answers for whole repeating groups (60xx0010 is "OverlayRows");
    # were it to give a keyword that names another tag, the tag is refused, not
    # read as that other attribute.
    real = J.keyword_for_tag
    monkeypatch.setattr(J, "keyword_for_tag",
                        lambda tag: "Rows" if tag == 0x60020010 else real(tag))
    with pytest.raises(J.QueryParamError, match="60020010"):
        J.parse_qido([("60020010", "1")])
    with pytest.raises(J.QueryParamError, match="includefield"):
        J.parse_qido([("includefield", "60020010")])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.one_of(st.sampled_from(["PatientName", "00100010", "StudyInstanceUID", "includefield",
                               "limit", "offset", "fuzzymatching", "ModalitiesInStudy",
                               "PixelData", "ReferencedStudySequence"]), st.text(max_size=12)),
    st.text(max_size=20)), max_size=8))
def test_random_parameters_only_ever_raise_query_param_errors(params):
    try:
        q = J.parse_qido(params)
    except J.QueryParamError:
        return
    assert q.limit is None or 0 <= q.limit <= 1000
    assert q.offset >= 0
