"""A config value must never be able to delete the archive.

Each test writes a config an operator could write by mistake (the spool on a
site, the spool on the install directory, two sites on one directory through a
symlink, ...), runs the real CLI, and checks for a one-line error that names the
key and that every file of the install is still there afterwards.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import PACSVAULT, Daemon, free_port, init_instance, run_cli


def snapshot(root: Path) -> dict[str, int]:
    """Every file under root (not following symlinks) with its size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.lstat().st_size
    return out


def set_key(cfg: Path, section: str, key: str, value: str) -> None:
    """Replace `key = ...` inside [section] (or append it there)."""
    text = cfg.read_text()
    pattern = re.compile(rf"(^\[{re.escape(section)}\]\n(?:(?!\[).*\n)*?){key} = .*$", re.M)
    if pattern.search(text):
        text = pattern.sub(lambda m: f"{m.group(1)}{key} = {value}", text, count=1)
    else:
        text = text.replace(f"[{section}]\n", f"[{section}]\n{key} = {value}\n", 1)
    cfg.write_text(text)


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    """An install with an object stored on both sites (written as the sites hold them)."""
    cfg = init_instance(tmp_path / "pv")
    for site in ("a", "b"):
        d = cfg.parent / "sites" / site / "objects" / "ab" / "cd" / "1.2.3"
        d.mkdir(parents=True)
        (d / "1.2.3.4.dcm").write_bytes(b"\0" * 128 + b"DICM")
    return cfg


def refused(cfg: Path, verb: tuple[str, ...], key: str) -> str:
    before = snapshot(cfg.parent)
    if verb[0] == "serve":
        args = [PACSVAULT, "--config", str(cfg), "serve", "--dicom-port", str(free_port()),
                "--http-port", "0", "--workers", "1"]
        p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    else:
        p = run_cli(cfg, *verb, check=False)
    assert p.returncode == 3, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert key in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    assert snapshot(cfg.parent) == before
    return lines[0]


@pytest.mark.parametrize("verb", [("serve",), ("status", "--json"), ("scrub", "--all")])
def test_spool_on_a_site_is_refused(populated: Path, verb: tuple[str, ...]) -> None:
    set_key(populated, "ingest", "spool_dir", '"sites/a"')
    refused(populated, verb, "ingest.spool_dir")
    assert (populated.parent / "sites" / "a" / "PACSVAULT-SITE.json").is_file()


@pytest.mark.parametrize("verb", [("serve",), ("status", "--json")])
def test_spool_on_the_install_directory_is_refused(populated: Path, verb: tuple[str, ...]) -> None:
    set_key(populated, "ingest", "spool_dir", '"."')
    refused(populated, verb, "ingest.spool_dir")
    assert populated.is_file()
    assert (populated.parent / "catalog" / "catalog.db").is_file()


def test_spool_through_a_symlink_onto_a_site_is_refused(populated: Path) -> None:
    (populated.parent / "spool-link").symlink_to(populated.parent / "sites" / "b")
    set_key(populated, "ingest", "spool_dir", '"spool-link"')
    refused(populated, ("serve",), "ingest.spool_dir")


def test_two_sites_on_one_directory_through_a_symlink_are_refused(populated: Path) -> None:
    (populated.parent / "b-link").symlink_to(populated.parent / "sites" / "a")
    text = populated.read_text().replace('path = "sites/b"', 'path = "b-link"')
    populated.write_text(text)
    refused(populated, ("status",), "sites.1.path")


def test_a_site_inside_another_site_is_refused(populated: Path) -> None:
    text = populated.read_text().replace('path = "sites/b"', 'path = "sites/a/b"')
    populated.write_text(text)
    refused(populated, ("serve",), "sites.1.path")


def test_object_tier_inside_a_site_is_refused(populated: Path) -> None:
    set_key(populated, "objects", "path", '"sites/a/objects"')
    refused(populated, ("status",), "objects.path")


def test_catalog_inside_the_spool_is_refused(populated: Path) -> None:
    set_key(populated, "catalog", "url", '"sqlite:///spool/catalog.db"')
    refused(populated, ("status",), "catalog.url")


def test_a_site_holding_the_config_file_is_refused(populated: Path) -> None:
    text = populated.read_text().replace('path = "sites/a"', 'path = "."')
    populated.write_text(text)
    refused(populated, ("status",), "sites.0.path")


def test_spool_sweep_never_touches_a_directory_without_our_marker(tmp_path: Path) -> None:
    """An absolute spool_dir pointing at someone's directory: nothing in it is deleted."""
    cfg = init_instance(tmp_path / "pv")
    theirs = tmp_path / "radiology-share"
    (theirs / "w0").mkdir(parents=True)
    (theirs / "report.pdf").write_bytes(b"%PDF")
    (theirs / "w0" / "tmpabcdefgh.dcm").write_bytes(b"someone else's")
    set_key(cfg, "ingest", "spool_dir", json.dumps(str(theirs)))
    before = snapshot(theirs)
    p = subprocess.run([PACSVAULT, "--config", str(cfg), "serve", "--dicom-port",
                        str(free_port()), "--http-port", "0", "--workers", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    assert "ingest.spool_dir" in p.stderr.strip().splitlines()[-1]
    assert snapshot(theirs) == before


def test_sweeps_delete_only_our_temp_files(tmp_path: Path) -> None:
    """In our own spool and site tmp/, only files with our temp naming go."""
    cfg = init_instance(tmp_path / "pv")
    root = cfg.parent
    spool = root / "spool"
    assert (spool / "PACSVAULT-SPOOL.json").is_file(), "init marks the spool"
    (spool / "w0").mkdir(exist_ok=True)
    (spool / "w0" / "notes.txt").write_text("an operator's file")
    (spool / "w0" / "pv-spool-abcd1234.dcm").write_bytes(b"crash leftover")
    (spool / "repair").mkdir(exist_ok=True)
    (spool / "repair" / "tmpk2j4_x9q.tmp").write_bytes(b"crash leftover")
    (spool / "keep-me").mkdir()
    (spool / "keep-me" / "data.dcm").write_bytes(b"x")
    site_tmp = root / "sites" / "a" / "tmp"
    (site_tmp / f"{'0' * 24}.tmp").write_bytes(b"crash leftover")
    (site_tmp / "precious.dcm").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"{'1' * 24}.tmp").write_bytes(b"not ours to delete")
    b_tmp = root / "sites" / "b" / "tmp"
    os.rmdir(b_tmp)
    b_tmp.symlink_to(elsewhere)            # a site tmp/ that leads out of the site
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    try:
        assert d.stop() == 0
    finally:
        d.kill9()
    assert (spool / "w0" / "notes.txt").is_file()
    assert (spool / "keep-me" / "data.dcm").is_file()
    assert not (spool / "w0" / "pv-spool-abcd1234.dcm").exists()
    assert not (spool / "repair" / "tmpk2j4_x9q.tmp").exists()
    assert (site_tmp / "precious.dcm").is_file()
    assert not (site_tmp / f"{'0' * 24}.tmp").exists()
    assert (elsewhere / f"{'1' * 24}.tmp").is_file()


def test_both_sites_on_one_device_is_a_visible_risk(tmp_path: Path) -> None:
    cfg = init_instance(tmp_path / "pv")
    st = run_cli(cfg, "status", "--json")
    risks = json.loads(st.stdout)["risks"]
    assert any("site-a" in r and "site-b" in r and "device" in r for r in risks), risks
    assert "same filesystem" in run_cli(cfg, "status").stdout
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    try:
        assert d.stop() == 0
    finally:
        d.kill9()
    assert re.search(r"WARNING .*site-a and site-b .*same filesystem", d.log()), d.log()
