"""An object is acknowledged only once both sites hold it durably: its file and the
directory entries leading to it fsync'd before the C-STORE response leaves.

kill -9 keeps the page cache, so the kill tests cannot see a missing fsync; a power
cut would. Instead the real daemon runs under strace while dcmtk's storescu pushes,
and the trace shows, per acknowledged object and per site, that

* the file (its temp name or its final one) was fsync'd after its last write,
* its directory was fsync'd after the link/rename that named it,
* every directory created for it was made durable in its parent,

each completed before the send of that object's C-STORE response began.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import require_tool, site_paths
from tests.support.daemon import Daemon, free_port, storescu
from tests.support.dataset import make_ct_series, make_instance
from tests.support.needs import missing
from tests.support.strace import Call, StoreResponse, parse, store_responses

TRACED = ("openat,open,fsync,fdatasync,rename,renameat,renameat2,link,linkat,mkdir,mkdirat,"
          "sendto,write,sendmsg")
SYNCS = ("fsync", "fdatasync")
PLACES = ("link", "linkat", "rename", "renameat", "renameat2")


def durability_problems(calls: list[Call], rsp: StoreResponse, site: Path) -> list[str]:
    """What was not durable on ``site`` when the response for ``rsp.sop_uid`` was sent."""
    before = [c for c in calls if c.end < rsp.start and c.ok]
    objects = str(site / "objects") + "/"
    placed = [c for c in before if c.name in PLACES and len(c.paths()) == 2
              and c.paths()[1].startswith(objects)
              and Path(c.paths()[1]).name.startswith(rsp.sop_uid + ".")]
    if not placed:
        return [f"{site.name}: no file named for {rsp.sop_uid} before its response"]
    place = placed[-1]
    tmp, final = place.paths()
    problems = []

    def synced(path: str, after: int) -> bool:
        return any(c.name in SYNCS and c.fd_arg() == path and c.start > after for c in before)

    writes = [c.end for c in before if c.name == "write" and c.fd_arg() in (tmp, final)]
    if not writes:
        problems.append(f"{site.name}: no write of {Path(tmp).name} seen")
    elif not synced(tmp, writes[-1]) and not synced(final, writes[-1]):
        problems.append(f"{site.name}: file of {rsp.sop_uid} not fsync'd before its response")
    if not synced(str(Path(final).parent), place.end):
        problems.append(f"{site.name}: directory of {rsp.sop_uid} not fsync'd after the "
                        "link, before its response")
    for c in before:
        if c.name in ("mkdir", "mkdirat") and c.paths():
            made = c.paths()[-1].rstrip("/")
            if final.startswith(made + "/") and not synced(str(Path(made).parent), c.end):
                problems.append(f"{site.name}: new directory {made} not made durable in its "
                                "parent before the response")
    return problems


def test_each_acknowledged_object_is_fsynced_on_both_sites_before_its_response(
        instance: Path, tmp_path: Path):
    strace = require_tool("strace")
    require_tool("storescu")
    probe = subprocess.run([strace, "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:                   # ptrace refused (a container's seccomp)
        missing(f"strace cannot trace here: {probe.stderr.strip()}")
    # Two studies: the first objects create directories, the later ones reuse them.
    made = make_ct_series(tmp_path / "s1", 4, size=40_000, seed=3)
    made += make_ct_series(tmp_path / "s2", 3, size=300_000, seed=4)
    made.append(make_instance(tmp_path / "mr.dcm", kind="MR", size=5_000))
    trace = tmp_path / "trace.txt"
    d = Daemon(instance, free_port(), free_port(), workers=2,
               prefix=(strace, "--seccomp-bpf", "-f", "-tt", "-yy", "-s", "1024", "-o", str(trace),
                       "-e", f"trace={TRACED}"))
    d.start(timeout=120)
    try:
        r = storescu(d.dicom_port, [m.path for m in made])
        assert r.returncode == 0, r.stderr
    finally:
        stop_traced(d)
    calls = parse(trace.read_text(errors="replace"))
    responses = store_responses(calls, d.dicom_port)
    acked = {x.sop_uid: x for x in responses if x.status == 0 or x.status >> 12 == 0xB}
    assert set(acked) == {m.sop_uid for m in made}, "every push must be acknowledged"
    problems = [p for rsp in acked.values() for site in site_paths(instance).values()
                for p in durability_problems(calls, rsp, site)]
    assert problems == []
    for m in made:                                   # and the files really are there
        for site in site_paths(instance).values():
            assert list((site / "objects").rglob(m.sop_uid + "*.dcm")), (site, m.sop_uid)


def stop_traced(d: Daemon) -> None:
    """Let strace detach and flush its log, then kill the daemon it leaves behind."""
    assert d.proc is not None
    if d.proc.poll() is None:
        # The whole session (strace and the daemon under it): strace does not pass a
        # signal on, so the daemon would otherwise wait out the 30 s below.
        os.killpg(d.proc.pid, signal.SIGTERM)
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(10)
    try:
        os.killpg(d.proc.pid, signal.SIGKILL)         # the daemon's session, led by strace
    except ProcessLookupError:
        pass
