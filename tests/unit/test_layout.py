import pytest

from archive.uids import InvalidUID
from tiers.layout import instance_key, study_prefix


def test_key_shape_and_determinism():
    k = instance_key("1.2.3", "1.2.3.4")
    assert k == instance_key("1.2.3", "1.2.3.4")
    parts = k.split("/")
    assert parts[0] == "objects" and len(parts[1]) == 2 and len(parts[2]) == 2
    assert parts[3] == "1.2.3" and len(parts[4]) == 1 and parts[5] == "1.2.3.4.dcm"
    assert k.startswith(study_prefix("1.2.3"))


def test_conflict_key_is_content_addressed():
    sha = "ab" * 32
    k = instance_key("1.2.3", "1.2.3.4", sha)
    assert k.endswith("/1.2.3.4." + sha[:16] + ".dcm")
    with pytest.raises(ValueError):
        instance_key("1.2.3", "1.2.3.4", "../../../../")


@pytest.mark.parametrize("study,sop", [("../..", "1.2"), ("1.2", "../../x"), ("1.2", "/etc/passwd")])
def test_keys_only_from_valid_uids(study, sop):
    with pytest.raises(InvalidUID):
        instance_key(study, sop)


def test_spread_is_bounded():
    # 20,000 studies over 65,536 first-level dirs: never more than a handful per dir.
    from collections import Counter

    c = Counter(instance_key(f"1.2.{i}", "1.2.3").split("/")[1:3].__str__() for i in range(20000))
    assert max(c.values()) < 10


def test_worked_example_from_the_format_spec():
    # docs/formats/site-layout.md section 8
    assert instance_key("1.2.3", "1.2.3.4") == "objects/c4/7f/1.2.3/6/1.2.3.4.dcm"
    from archive.dicom.part10 import file_meta

    assert len(file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")) == 128 + 4 + 176
