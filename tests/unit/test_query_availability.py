"""InstanceAvailability at each query level: ONLINE while every instance has a copy on
a site, NEARLINE once some are only in the object tier, OFFLINE when some have no
verified copy online or in the object tier (only DR volumes, or nothing)."""
from __future__ import annotations

import sqlite3

import pytest

from archive.app.compose import open_catalog
from archive.catalog import query as Q
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install


def availability(inst: Install, level: str, **keys: str) -> dict[str, str]:
    unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}[level]
    cat = open_catalog(inst.settings)
    try:
        return {m[unique]: m["InstanceAvailability"] for m in Q.find(
            cat, level, Q.STUDY_ROOT, {unique: "", "InstanceAvailability": "", **keys},
            max_matches=100)}
    finally:
        cat.close()


def sql(inst: Install, text: str, *args) -> None:  # noqa: ANN002
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        c.execute(text, args)


def test_online_nearline_offline_at_each_level(tmp_path):
    inst = Install.create(tmp_path / "pv")
    a = make_ct_series(tmp_path / "a", 3, size=3000)
    b = make_ct_series(tmp_path / "b", 2, size=3000)
    inst.ingest(a + b)
    assert availability(inst, "STUDY") == {a[0].study_uid: "ONLINE", b[0].study_uid: "ONLINE"}

    run_cli(inst.config, "migrate", "--study", a[0].study_uid)      # online copies purged
    assert availability(inst, "STUDY")[a[0].study_uid] == "NEARLINE"
    assert set(availability(inst, "IMAGE", StudyInstanceUID=a[0].study_uid,
                            SeriesInstanceUID=a[0].series_uid).values()) == {"NEARLINE"}

    # one instance of b loses every verified copy: b is OFFLINE, its other instance not
    sql(inst, "update copies set state = 'missing' where instance_fk = "
              "(select id from instances where sop_uid = ?)", b[1].sop_uid)
    assert availability(inst, "STUDY")[b[0].study_uid] == "OFFLINE"
    assert availability(inst, "SERIES", StudyInstanceUID=b[0].study_uid) == \
        {b[0].series_uid: "OFFLINE"}
    assert availability(inst, "IMAGE", StudyInstanceUID=b[0].study_uid,
                        SeriesInstanceUID=b[0].series_uid) == \
        {b[0].sop_uid: "ONLINE", b[1].sop_uid: "OFFLINE"}


def test_availability_can_be_asked_for_but_not_matched(tmp_path):
    inst = Install.create(tmp_path / "pv")
    cat = open_catalog(inst.settings)
    try:
        with pytest.raises(Q.ValueInvalid):
            Q.find(cat, "STUDY", Q.STUDY_ROOT, {"InstanceAvailability": "ONLINE"},
                   max_matches=10)
    finally:
        cat.close()
