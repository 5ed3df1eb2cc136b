"""ATNA delivery to a real collector: Debian's rsyslog over TLS (RFC 5425).

The audit trail is the queue: every record reaches the collector in the trail's
order, none twice, across a collector outage and a daemon restart in between, with
records written meanwhile by the daemon (storescu pushes) and by a CLI command."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, free_port, init_instance, run_cli, storescu
from tests.support.dataset import make_ct_series
from tests.support.pki import make_pki
from tests.support.rsyslog import Rsyslog

pytestmark = pytest.mark.needs_dcmtk


def trail_ids(cfg: Path) -> list[int]:
    with sqlite3.connect(cfg.parent / "catalog" / "catalog.db") as c:
        return [r[0] for r in c.execute("select id from audit_log order by id")]


def wait_for(collector: Rsyslog, cfg: Path, since: int = 0, timeout: float = 45
             ) -> tuple[list[int], list[int]]:
    """(what the collector got, the trail from ``since``) once the collector has every
    record of the trail from ``since`` on, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        want = [i for i in trail_ids(cfg) if i >= since]
        got = collector.record_ids()
        if (want and set(want) <= set(got)) or time.monotonic() > deadline:
            return got, want
        time.sleep(0.25)


def test_every_record_reaches_rsyslog_in_order_none_twice_across_an_outage_and_a_restart(
        tmp_path):
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    collector = Rsyslog(tmp_path / "rsyslog", port, pki).start()
    cfg = init_instance(tmp_path / "pv", allow_any=True, toml_extra=(
        f'[audit]\nsyslog = "tls://localhost:{port}"\nsyslog_ca = "{pki.ca}"\n'))
    daemon = Daemon(cfg, free_port(), free_port(), workers=2).start()
    try:
        make_ct_series(tmp_path / "a", 3, size=4000, seed=1)
        assert storescu(daemon.dicom_port, tmp_path / "a").returncode == 0
        time.sleep(1)                                             # the association's record
        got, _ = wait_for(collector, cfg, trail_ids(cfg)[-1])
        assert got, (tmp_path / "rsyslog" / "rsyslogd.log").read_text(errors="replace")
        first = got[0]

        collector.stop()                                          # the collector goes away
        make_ct_series(tmp_path / "b", 3, size=4000, seed=2)
        assert storescu(daemon.dicom_port, tmp_path / "b").returncode == 0
        run_cli(cfg, "peer", "add", "VIEWER", "10.1.2.3")         # a CLI process's record
        assert daemon.stop() == 0                                 # ... and the daemon restarts
        daemon = Daemon(cfg, free_port(), free_port(), workers=2).start()
        make_ct_series(tmp_path / "c", 3, size=4000, seed=3)
        assert storescu(daemon.dicom_port, tmp_path / "c").returncode == 0
        held = [i for i in trail_ids(cfg) if i > got[-1]]
        assert len(held) >= 3                                     # waiting in the trail
        assert "unreachable" in daemon.log()                      # and the operator is told
        st = daemon.status()["atna"]
        assert st["waiting"] >= len(held) and st["oldest_age_s"] >= 0

        collector.start()                                         # back: the trail back-fills
        got, want = wait_for(collector, cfg, first)
        assert got == want, (got, want)                           # in order, none twice
    finally:
        daemon.stop()
        collector.stop()
    actions = [r for r in sqlite3.connect(cfg.parent / "catalog" / "catalog.db").execute(
        "select action from audit_log where id >= ?", (first,))]
    assert ("object-received",) in actions and ("peer-change",) in actions
