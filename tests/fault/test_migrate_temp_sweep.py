"""A killed `migrate` leaves its bundle (patient data) half-stored in the object
tier's tmp/; the next run removes it, and only files carrying our own temp naming."""
from __future__ import annotations

import json
import os
import subprocess
import time

from tests.support.daemon import PACSVAULT, run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install


def test_the_next_migrate_sweeps_temp_bundles_a_killed_one_left(tmp_path):
    inst = Install.create(tmp_path / "pv")
    first = make_varied_study(tmp_path / "a", per_kind=1, size=20_000)
    second = make_ct_series(tmp_path / "b", 3, size=20_000)
    inst.ingest(first + second)
    tmpdir = inst.settings.objects.path / "tmp"
    # Files that are not ours stay, whatever their name looks like.
    foreign = {"notes.tmp": b"x", "README": b"y", "0123456789abcdef01234567.tmp.keep": b"z"}
    for name, data in foreign.items():
        (tmpdir / name).write_bytes(data)

    p = run_cli(inst.config, "migrate", "--study", first[0].study_uid, "--json", check=False,
                env={"PACSVAULT_FAILPOINTS": "mirror.after_temp_write=kill"})
    assert p.returncode == -9, p.stderr[-2000:]
    left = sorted(set(os.listdir(tmpdir)) - set(foreign))
    assert len(left) == 1 and left[0].endswith(".tmp")              # the bundle, in full
    assert (tmpdir / left[0]).stat().st_size > 20_000

    r = json.loads(run_cli(inst.config, "migrate", "--study", second[0].study_uid,
                           "--json").stdout)
    assert r["ok"]
    assert sorted(os.listdir(tmpdir)) == sorted(foreign)
    assert {n: (tmpdir / n).read_bytes() for n in foreign} == foreign


def test_a_temp_file_a_live_writer_holds_is_not_swept(tmp_path):
    """Two processes may write the tier at once (a scrub re-bundling while the migrate
    job runs): a temp file still being written is never taken from under its writer."""
    inst = Install.create(tmp_path / "pv")
    made = make_ct_series(tmp_path / "a", 2, size=20_000)
    inst.ingest(made)
    tmpdir = inst.settings.objects.path / "tmp"
    live = tmpdir / "00112233445566778899aabb.tmp"
    holder = subprocess.Popen(
        [str(PACSVAULT).replace("pacsvault", "python"), "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(live)!r}, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = json.loads(run_cli(inst.config, "migrate", "--study", made[0].study_uid,
                               "--json").stdout)
        assert r["ok"] and live.exists()
    finally:
        holder.kill()
        holder.wait(10)
    time.sleep(0.1)
    made2 = make_ct_series(tmp_path / "b", 1, size=5_000, seed=7)
    inst.ingest(made2)
    run_cli(inst.config, "migrate", "--study", made2[0].study_uid, "--json")
    assert not live.exists()                        # its writer is gone: swept
