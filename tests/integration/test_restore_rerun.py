"""`pacsvault restore --to-ae` against a real dcmtk storescp: the SCU's socket sends
without Nagle's delay whatever the PACS does, a later run sends everything again,
and only `--resume` continues an interrupted run."""
from __future__ import annotations

import json
import socket

import pytest

from archive.config.load import load_settings
from dr.deliver import AeDelivery
from tests.support.daemon import run_cli
from tests.support.dataset import (
    EXPLICIT_LE,
    JPEG_BASELINE,
    make_ct_series,
    make_instance,
)
from tests.support.needs import missing
from tests.support.storescp import StoreSCP, storescp_binary
from tests.support.tiering import Install

pytestmark = pytest.mark.needs_dcmtk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SMALL = 100          # instances: with Nagle's delay each costs ~40 ms on loopback


@pytest.fixture
def scp(tmp_path):
    """storescp as a PACS ships it: TCP_NODELAY is NOT in its environment."""
    if storescp_binary() is None:
        missing("dcmtk storescp is not installed")
    s = StoreSCP(tmp_path / "scp", nodelay=False).start()
    yield s
    s.stop()


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.ct = make_ct_series(tmp_path / "ct", SMALL, size=2_000)
    i.ingest(i.ct)
    i.study = i.ct[0].study_uid
    return i


def restore(inst: Install, scp: StoreSCP, *args: str, env: dict | None = None) -> dict:
    p = run_cli(inst.config, "restore", "--study", inst.study, "--to-ae",
                f"{scp.aet}@127.0.0.1:{scp.port}", *args, "--json", check=False, env=env)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def taken(scp: StoreSCP) -> int:
    """How many objects the PACS received since the last call (storescp names a file
    by its SOP UID, so one sent twice would overwrite itself: count, then clear)."""
    got = scp.received()
    for f in got:
        f.unlink()
    return len(got)


def test_the_c_store_socket_has_tcp_nodelay(scp, tmp_path):
    d = AeDelivery(f"{scp.aet}@127.0.0.1:{scp.port}", "PACSVAULT",
                   [(CT_IMAGE_STORAGE, EXPLICIT_LE)], tmp_path / "journal")
    try:
        sock = d.assoc.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        d.close()


def test_small_instances_are_not_held_back_by_nagle(inst, scp):
    r = restore(inst, scp)
    assert r["_rc"] == 0 and r["restored"] == SMALL, r["_stderr"]
    assert taken(scp) == SMALL
    # Nagle + the peer's delayed ACK cost ~40 ms per C-STORE: 100 would take >= 4 s.
    sending = r["time_to_last_s"] - r["time_to_first_s"]
    assert sending < SMALL * 0.040 / 2, sending


def test_a_later_restore_to_the_same_pacs_sends_every_instance_again(inst, scp):
    first = restore(inst, scp)
    assert first["_rc"] == 0 and first["restored"] == SMALL and taken(scp) == SMALL
    assert not list((load_settings(inst.config).ingest.spool_dir / "restore").glob("*.journal"))
    second = restore(inst, scp)
    assert second["_rc"] == 0, second["_stderr"]
    assert second["restored"] == SMALL and second["already_there"] == 0
    assert taken(scp) == SMALL


def test_an_interrupted_restore_to_a_pacs_resumes_only_when_asked(inst, scp):
    p = run_cli(inst.config, "restore", "--study", inst.study, "--to-ae",
                f"{scp.aet}@127.0.0.1:{scp.port}", "--json", check=False,
                env={"PACSVAULT_FAILPOINTS": "restore.after_deliver=kill@4"})
    assert p.returncode == -9 and taken(scp) == 4
    r = restore(inst, scp, "--resume")
    assert r["_rc"] == 0 and r["already_there"] == 4 and r["restored"] == SMALL - 4
    assert taken(scp) == SMALL - 4
    # Interrupted again, then a new run without --resume: everything is sent again.
    p = run_cli(inst.config, "restore", "--study", inst.study, "--to-ae",
                f"{scp.aet}@127.0.0.1:{scp.port}", "--json", check=False,
                env={"PACSVAULT_FAILPOINTS": "restore.after_deliver=kill@4"})
    assert p.returncode == -9 and taken(scp) == 4
    r = restore(inst, scp)
    assert r["_rc"] == 0 and r["already_there"] == 0 and r["restored"] == SMALL
    assert "--resume" in r["_stderr"]           # says an interrupted run was not resumed
    assert taken(scp) == SMALL


def test_quick_responses_never_lose_the_association(scp, tmp_path):
    """A response that arrives at once must reach the sender: pynetdicom's reactor
    thread, which the restore used before its own SCU, took one such response and
    dropped about one association in ten of 100 quick C-STOREs."""
    made = make_ct_series(tmp_path / "q", SMALL, size=2_000)
    for run in range(10):
        d = AeDelivery(f"{scp.aet}@127.0.0.1:{scp.port}", "PACSVAULT",
                       [(CT_IMAGE_STORAGE, EXPLICIT_LE)], tmp_path / "journal")
        try:
            codes = [d.assoc.store(m.sop_class, m.sop_uid, m.path,
                                   transfer_syntax=m.transfer_syntax).status for m in made]
        finally:
            d.close()
        assert codes == [0] * SMALL, run


def test_an_instance_the_pacs_takes_in_no_syntax_is_named_and_the_rest_is_sent(tmp_path):
    """A PACS that accepts only uncompressed syntaxes cannot take a JPEG object sent
    verbatim: that instance is a named failure, every other one is sent, exit 1."""
    if storescp_binary() is None:
        missing("dcmtk storescp is not installed")
    i = Install.create(tmp_path / "pv")
    ct = make_ct_series(tmp_path / "ct", 3, size=2_000)
    jpeg = make_instance(tmp_path / "us.dcm", kind="US", ts=JPEG_BASELINE, size=2_000,
                         study_uid=ct[0].study_uid)
    i.ingest(ct + [jpeg])
    i.study = ct[0].study_uid
    s = StoreSCP(tmp_path / "scp", accept_all=False).start()
    try:
        r = restore(i, s)
        assert r["_rc"] == 1 and "Traceback" not in r["_stderr"], r["_stderr"]
        assert r["restored"] == 3 and taken(s) == 3, r
        [failure] = r["failures"]
        assert failure["sop_uid"] == jpeg.sop_uid and JPEG_BASELINE in failure["reason"], r
    finally:
        s.stop()
