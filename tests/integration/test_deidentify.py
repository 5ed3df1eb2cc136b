"""`pacsvault restore ... --deidentify`: de-identified copies (PS3.15 basic profile)
to a directory or a PACS, never back online; nothing identifying left in the bytes
or the paths, references coherent, pixels untouched, resumable, and audited."""
from __future__ import annotations

import json
import os
import stat
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread

from archive import audit
from tests.support.daemon import run_cli
from tests.support.dataset import DEFLATED_LE, make_ct_series, make_varied_study
from tests.support.needs import missing
from tests.support.tiering import Install

KEY = "a-research-project-key-0001"


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.varied = make_varied_study(tmp_path / "v", per_kind=1, size=20_000)
    # A series of several instances in the same study: grouping must survive.
    i.ct = make_ct_series(tmp_path / "ct", 3, size=20_000, study_uid=i.varied[0].study_uid)
    i.made = i.varied + i.ct
    i.ingest(i.made)
    return i


def export(inst: Install, out: Path, *args: str, env: dict | None = None) -> dict:
    p = run_cli(inst.config, "restore", "--patient", "TEST-0001", "--to", str(out),
                "--deidentify", "--json", *args, check=False, env=env)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return {**json.loads(p.stdout), "_stdout": p.stdout}


def dataset_bytes(path: Path) -> bytes:
    """The bytes to search for leaks: a deflated data set is inflated first."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    if ds.file_meta.TransferSyntaxUID != DEFLATED_LE:
        return raw
    start = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    return raw[:start] + zlib.decompress(raw[start:], -zlib.MAX_WBITS)


def secrets_of(made) -> set[str]:  # noqa: ANN001
    """Everything identifying in the originals (see tests/support/dataset.py)."""
    out = {"Test^Synthetic", "TEST-0001", "19700101", "20240102", "Synthetic test study"}
    for m in made:
        ds = dcmread(m.path, stop_before_pixels=True)
        out |= {ds.AccessionNumber, m.study_uid, m.series_uid, m.sop_uid}
    return out


def test_a_deidentified_export_to_a_directory(inst, tmp_path):
    out = tmp_path / "out"
    r = export(inst, out)
    n = len(inst.made)
    assert r["restored"] == n and r["deidentified"] is True
    d = r["deidentification"]
    assert d["changed"] == n and d["key"] == "random" and d["map_file"] is None
    assert d["needs_review"]["burned_in_annotation"] > 0        # no BurnedInAnnotation: reported
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == n
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files    # no scratch, no temp
    secrets = secrets_of(inst.made)
    for p in files:
        ds = dcmread(p)
        assert ds.PatientIdentityRemoved == "YES"
        assert "113100" in {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}
        assert ds.DeidentificationMethod
        assert "StudyDescription" not in ds
        # The path is <new study>/<new series>/<new sop>.dcm: nothing original in it.
        rel = p.relative_to(out)
        assert rel.parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID + ".dcm")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        body = dataset_bytes(p)
        leaks = {s for s in secrets if s.encode() in body or s in str(rel)}
        assert not leaks, (rel, leaks)
    # One study; the CT series of 3 is still one series; every other kind its own.
    dss = [dcmread(p) for p in files]
    assert len({ds.StudyInstanceUID for ds in dss}) == 1
    series = {}
    for ds in dss:
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert sorted(len(v) for v in series.values()) == [1] * len(inst.varied) + [3]
    # Pixel data (and document content) byte for byte, the transfer syntax kept: each
    # output paired with its original by what is not de-identified (SOP class and
    # transfer syntax are unique per kind; the 3 CTs by their pixels).
    ct = {dcmread(c.path).PixelData for c in inst.ct}
    orig = {(m.sop_class, m.transfer_syntax): dcmread(m.path) for m in inst.varied}
    for ds in dss:
        if len(series[ds.SeriesInstanceUID]) == 3:
            assert ds.PixelData in ct
            ct.discard(ds.PixelData)
            continue
        o = orig[(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)]
        for kw in ("PixelData", "EncapsulatedDocument", "TextValue"):
            assert ds.get(kw) == o.get(kw), kw
    assert not ct
    # Dates shifted by one offset: StudyDate moved back, the same in every file.
    assert len({ds.StudyDate for ds in dss}) == 1 and dss[0].StudyDate < "20240102"
    # The report names no new UID (the mapping is only given with --deid-map).
    assert dss[0].StudyInstanceUID not in r["_stdout"]
    # Audited: one "export" record for the study, with the original IDs.
    catalog = inst.catalog()
    try:
        recs = [x for x in audit.query(catalog, study_uid=inst.varied[0].study_uid)
                if x["action"] == "export"]
    finally:
        catalog.close()
    assert len(recs) == 1 and recs[0]["patient_id"] == "TEST-0001"
    assert recs[0]["detail"]["deidentified"] is True and recs[0]["detail"]["instances"] == n
    assert recs[0]["detail"]["target"] == "dir" and recs[0]["outcome"] == "success"


def test_a_key_gives_the_same_mapping_across_exports_and_a_map_on_request(inst, tmp_path):
    mapfile = tmp_path / "private" / "map.csv"
    mapfile.parent.mkdir()
    mapfile.write_text("")
    mapfile.chmod(0o644)                          # already there, readable by all: tightened
    a = export(inst, tmp_path / "a", "--deid-key", KEY, "--deid-map", str(mapfile))
    b = export(inst, tmp_path / "b", env={"PACSVAULT_DEID_KEY": KEY})
    c = export(inst, tmp_path / "c")                                   # random key
    assert a["deidentification"]["key"] == b["deidentification"]["key"] == "given"
    assert c["deidentification"]["key"] == "random"
    names = {k: sorted(str(p.relative_to(tmp_path / k)) for p in (tmp_path / k).rglob("*.dcm"))
             for k in "abc"}
    assert names["a"] == names["b"] and not set(names["a"]) & set(names["c"])
    assert stat.S_IMODE(os.stat(mapfile).st_mode) == 0o600
    rows = mapfile.read_text().splitlines()
    assert rows[0] == "level,original_uid,deidentified_uid"
    new_study = names["a"][0].split("/")[0]
    assert f"study,{inst.varied[0].study_uid},{new_study}" in rows
    assert sum(r.startswith("sop,") for r in rows) == len(inst.made)
    assert {m.sop_uid for m in inst.made} <= {r.split(",")[1] for r in rows}


def test_refused_without_a_place_outside_the_archive(inst, tmp_path):
    cases = [
        (["--patient", "TEST-0001", "--online", "--deidentify"], "never replace"),
        (["--patient", "TEST-0001", "--to", str(tmp_path / "o"), "--deid-key", KEY], "--deidentify"),
        (["--patient", "TEST-0001", "--to", str(tmp_path / "o"), "--deid-map",
          str(tmp_path / "m.csv")], "--deidentify"),
        (["--patient", "TEST-0001", "--to", str(tmp_path / "o"), "--deidentify", "--deid-map",
          str(tmp_path / "o" / "m.csv")], "outside the export directory"),
        (["--patient", "TEST-0001", "--to", str(tmp_path / "o"), "--deidentify", "--deid-key",
          "short"], "at least"),
    ]
    for args, text in cases:
        p = run_cli(inst.config, "restore", *args, check=False)
        assert p.returncode == 4, (args, p.stderr)
        assert text in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    assert not (tmp_path / "o").exists()


def test_an_interrupted_export_resumes_with_the_same_mapping(inst, tmp_path):
    out = tmp_path / "out"
    p = run_cli(inst.config, "restore", "--patient", "TEST-0001", "--to", str(out), "--deidentify",
                "--json", check=False, env={"PACSVAULT_FAILPOINTS": "restore.after_deliver=kill@4"})
    assert p.returncode == -9 and len(list(out.rglob("*.dcm"))) == 4
    # A key other than the (random) one it started with is refused.
    p = run_cli(inst.config, "restore", "--patient", "TEST-0001", "--to", str(out), "--deidentify",
                "--deid-key", KEY, "--resume", check=False)
    assert p.returncode == 4 and "different de-identification key" in p.stderr
    r = export(inst, out, "--resume")
    n = len(inst.made)
    assert r["already_there"] == 4 and r["restored"] == n - 4
    files = list(out.rglob("*.dcm"))
    assert len(files) == n
    assert len({dcmread(f).StudyInstanceUID for f in files}) == 1
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    # Complete: nothing is left to resume; a later export is a new one (a new random key).
    again = export(inst, out, "--resume")
    assert again["already_there"] == 0 and again["restored"] == n
    assert len(list(out.rglob("*.dcm"))) == 2 * n


@pytest.mark.needs_dcmtk
def test_a_deidentified_export_to_a_pacs(inst, tmp_path):
    from tests.support.storescp import start_storescp, storescp_binary

    if storescp_binary() is None:
        missing("dcmtk storescp is not installed")
    scp = start_storescp(tmp_path / "scp")
    try:
        p = run_cli(inst.config, "restore", "--patient", "TEST-0001", "--to-ae",
                    f"STORESCP@127.0.0.1:{scp.port}", "--deidentify", "--json", check=False)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["restored"] == len(inst.made)
        got = scp.received()
        assert len(got) == len(inst.made)
        secrets = secrets_of(inst.made)
        for f in got:
            assert dcmread(f).PatientIdentityRemoved == "YES"
            assert not {s for s in secrets if s.encode() in dataset_bytes(f)}, f
        again = json.loads(run_cli(inst.config, "restore", "--patient", "TEST-0001", "--to-ae",
                                   f"STORESCP@127.0.0.1:{scp.port}", "--deidentify",
                                   "--json").stdout)
        # A later export is a new run (new random key, new UIDs): everything is sent again.
        assert again["already_there"] == 0 and again["restored"] == len(inst.made)
        assert len(scp.received()) == 2 * len(got)
    finally:
        scp.stop()
    catalog = inst.catalog()
    try:
        recs = [x for x in audit.query(catalog, study_uid=inst.varied[0].study_uid)
                if x["action"] == "export"]
    finally:
        catalog.close()
    assert [x["detail"]["target"] for x in recs] == ["ae", "ae"]     # two exports, two records
