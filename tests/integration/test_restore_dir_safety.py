"""`restore --to DIR` into a directory that already holds things: a different file at
an instance's name is kept and reported (exit 1), the same file is fine, and a
symlink anywhere below DIR (study directory, series directory, file name) is never
followed, so nothing is written outside DIR."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.ct = make_ct_series(tmp_path / "ct", 3, size=4000)
    i.ingest(i.ct)
    i.study, i.series = i.ct[0].study_uid, i.ct[0].series_uid
    i.out = tmp_path / "out"
    i.outside = tmp_path / "outside"
    i.outside.mkdir()
    return i


def restore(inst: Install) -> dict:
    p = run_cli(inst.config, "restore", "--study", inst.study, "--to", str(inst.out), "--json",
                check=False)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_different_existing_file_is_kept_and_reported(inst):
    first = restore(inst)
    assert first["_rc"] == 0 and first["restored"] == 3
    victim = inst.out / inst.study / inst.series / f"{inst.ct[1].sop_uid}.dcm"
    victim.write_bytes(b"the radiologist's annotated copy")
    r = restore(inst)
    assert r["_rc"] == 1
    assert victim.read_bytes() == b"the radiologist's annotated copy"     # kept
    [f] = r["failures"]
    assert f["sop_uid"] == inst.ct[1].sop_uid and f["reason"].startswith("conflict:")
    assert f"FAILED instance {inst.ct[1].sop_uid}" in r["_stderr"] and "conflict" in r["_stderr"]
    assert r["already_there"] == 2                       # identical files are fine
    assert not list(inst.out.rglob("*.tmp"))             # no scratch left behind


def test_an_identical_existing_file_is_fine(inst):
    assert restore(inst)["_rc"] == 0
    again = restore(inst)
    assert again["_rc"] == 0 and again["already_there"] == 3 and not again["failures"]


@pytest.mark.parametrize("level", ["study", "series"])
def test_a_symlinked_directory_is_not_followed(inst, level):
    inst.out.mkdir()
    link = inst.out / inst.study
    if level == "series":
        link.mkdir()
        link = link / inst.series
    link.symlink_to(inst.outside, target_is_directory=True)
    r = restore(inst)
    assert r["_rc"] == 1 and len(r["failures"]) == 3
    assert all("symlink" in f["reason"] for f in r["failures"])
    assert list(inst.outside.iterdir()) == []            # nothing written through the link
    assert link.is_symlink()


def test_a_symlink_at_a_file_name_is_kept_and_its_target_untouched(inst):
    target = inst.outside / "precious.txt"
    target.write_bytes(b"not yours")
    d = inst.out / inst.study / inst.series
    d.mkdir(parents=True)
    (d / f"{inst.ct[0].sop_uid}.dcm").symlink_to(target)
    r = restore(inst)
    assert r["_rc"] == 1 and [f["sop_uid"] for f in r["failures"]] == [inst.ct[0].sop_uid]
    assert (d / f"{inst.ct[0].sop_uid}.dcm").is_symlink()
    assert target.read_bytes() == b"not yours"
    assert r["restored"] == 2
