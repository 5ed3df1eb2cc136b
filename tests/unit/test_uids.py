import pytest

from archive.uids import InvalidAETitle, InvalidUID, validate_ae_title, validate_uid


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "0", "1.2.3\x00", "1.2 "])
def test_valid_uids(uid):
    assert validate_uid(uid) == uid.rstrip("\x00 ")


@pytest.mark.parametrize("uid", [
    "", "../../etc/passwd", "/abs/path", "1.2/3", "1..2", ".1.2", "1.2.", "1.2.a", "1" * 65,
    "1.2\x00.3", "1.2.3\n", "１.２", None, 12, "1.2.3/..", "1.2.3\\x",
])
def test_hostile_uids_refused(uid):
    with pytest.raises(InvalidUID):
        validate_uid(uid)


def test_leading_zero_only_in_strict_mode():
    assert validate_uid("1.02.3") == "1.02.3"
    with pytest.raises(InvalidUID):
        validate_uid("1.02.3", strict=True)


def test_error_message_never_echoes_the_value():
    with pytest.raises(InvalidUID) as e:
        validate_uid("1.2.Smith^John")
    assert "Smith" not in str(e.value)


@pytest.mark.parametrize("ae,expected", [("STORESCU", "STORESCU"), (" PACS ", "PACS"), ("A" * 16, "A" * 16)])
def test_valid_ae(ae, expected):
    assert validate_ae_title(ae) == expected


@pytest.mark.parametrize("ae", ["", "    ", "A" * 17, "BAD\\AE", "BAD\nAE", b"\xff", None])
def test_invalid_ae(ae):
    with pytest.raises(InvalidAETitle):
        validate_ae_title(ae)
