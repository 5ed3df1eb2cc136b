"""A site that disappears or fills up mid-push, and both sites gone."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import require_tool, site_paths
from tests.support.daemon import storescu
from tests.support.dataset import make_ct_series
from tests.support.scu import send_files
from tests.support.verify import audit, sqlite_url


def wait_for(pred, timeout: float = 60, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def test_site_unmounted_mid_push_then_returns(daemon, tmp_path: Path):
    made = make_ct_series(tmp_path / "in", 40, size=32 * 1024)
    b = site_paths(daemon.config)["site-b"]
    away = b.with_name("b.unmounted")
    count = [0]

    def on_ack(path, status):
        count[0] += 1
        if count[0] == 10:
            b.rename(away)  # what an unmounted NAS looks like: the directory is gone
            b.mkdir()        # ...and an empty mount point is left behind

    statuses = send_files(daemon.dicom_port, [m.path for m in made], on_ack=on_ack)
    assert statuses == [0] * 40, "ingest must continue on the healthy site"
    st = daemon.status()
    site_b = next(s for s in st["sites"] if s["name"] == "site-b")
    assert not site_b["healthy"] and st["under_replicated"] >= 25
    assert st["oldest_under_replicated_age_s"] is not None
    assert not any(b.iterdir()), "nothing may be written into an empty mount point"
    url = sqlite_url(daemon.config.parent)
    a = audit(url, site_paths(daemon.config) | {"site-b": away})
    assert a.instances == 40 and not a.bad

    b.rmdir()
    away.rename(b)  # the site is back
    wait_for(lambda: daemon.status()["under_replicated"] == 0)
    a = audit(url, site_paths(daemon.config))
    assert a.ok_copies == 80 and a.missing_copies == 0 and not a.bad
    assert "repaired" in daemon.log()


def _mount_tmpfs(path: Path, size: str) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        from tests.support.needs import missing

        missing(f"needs permission to mount a small tmpfs: {r.stderr.strip()}")


def test_site_fills_up_then_grows(instance: Path, tmp_path: Path):
    require_tool("mount")
    b = site_paths(instance)["site-b"]
    saved = tmp_path / "b-saved"
    shutil.copytree(b, saved)
    _mount_tmpfs(b, "1500k")
    try:
        shutil.copytree(saved, b, dirs_exist_ok=True)
        text = instance.read_text().replace("min_free_bytes = 67108864", "min_free_bytes = 0")
        instance.write_text(text)
        from tests.support.daemon import Daemon, free_port

        d = Daemon(instance, free_port(), free_port(), workers=1).start()
        try:
            made = make_ct_series(tmp_path / "in", 30, size=100 * 1024)
            assert send_files(d.dicom_port, [m.path for m in made]) == [0] * 30
            st = d.status()
            assert st["under_replicated"] > 0
            assert "storage full" in d.log() or "No space" in d.log()
            subprocess.run(["mount", "-o", "remount,size=64m", str(b)], check=True)
            wait_for(lambda: d.status()["under_replicated"] == 0)
            a = audit(sqlite_url(instance.parent), site_paths(instance))
            assert a.instances == 30 and a.ok_copies == 60 and not a.bad and not a.temp_files
        finally:
            d.stop()
    finally:
        subprocess.run(["umount", "-l", str(b)], capture_output=True)


def test_both_sites_gone_nothing_acknowledged(daemon, tmp_path: Path):
    sites = site_paths(daemon.config)
    for root in sites.values():
        root.rename(root.with_name(root.name + ".gone"))
    made = make_ct_series(tmp_path / "in", 5, size=8 * 1024)
    assert send_files(daemon.dicom_port, [m.path for m in made]) == [0xA700] * 5
    r = storescu(daemon.dicom_port, [m.path for m in made], extra=("-v",))
    assert "Refused: OutOfResources" in r.stdout + r.stderr, r.stdout + r.stderr
    st = daemon.status()
    assert st["instances"] == 0
    assert not any(s["healthy"] for s in st["sites"])
    assert "no verified copy" in daemon.log()
