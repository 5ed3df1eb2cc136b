"""Seeing trouble: every condition the daemon's watch looks for raises one alert when it
begins, through the real hooks (a webhook receiver over HTTP), carrying counts and
place names only, never patient data or UIDs; a site that comes back sends a note."""
from __future__ import annotations

import json
import time
import urllib.request
from datetime import timedelta

import pytest

from archive import audit
from archive.alerts import send_alert
from archive.app.ingest import IngestService, StoreRequest
from archive.app.watch import Watch
from archive.audit import Event
from archive.auth import create_user
from archive.catalog.models import DrVolume, User
from archive.clock import utcnow
from archive.daemon.received import Received
from replication.mirror import MirrorWriter
from tests.support.daemon import Daemon, free_port, run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install
from tests.unit.test_alerts import Receiver


@pytest.fixture
def hook():
    r = Receiver()
    yield r
    r.close()


def alerts_of(hook: Receiver) -> list[dict]:
    return [json.loads(body) for _, _, body in hook.got]


@pytest.fixture
def watched(tmp_path, hook):
    inst = Install.create(tmp_path / "pv", toml_extra=(
        f'[alerts]\nwebhook_url = "http://127.0.0.1:{hook.port}/hook"\n'
        'failed_logins = 3\noffsite_after_days = 7\n'))
    inst.made = make_ct_series(tmp_path / "ct", 3, size=5000)
    inst.ingest(inst.made)
    audit.configure(inst.settings.data_dir)
    cat = inst.catalog()
    sites = inst.sites()
    run_cli(inst.config, "catalog", "backup")              # fresh: no backup alert yet
    w = Watch(inst.settings, cat, sites, lambda a: send_alert(inst.settings.alerts, a))
    assert w.check() == [] and hook.got == []               # a healthy install: silence
    yield inst, cat, sites, w
    cat.close()


def test_a_site_down_alerts_once_and_its_return_sends_a_note(watched, hook):
    inst, cat, sites, w = watched
    marker = inst.settings.sites[1].path / "PACSVAULT-SITE.json"
    kept = marker.read_bytes()
    marker.unlink()                                          # unmounted
    [a] = w.check()
    assert a.source == "site" and a.severity == "critical" and "site-b" in a.summary
    assert w.check() == []                                   # while it lasts: nothing more
    marker.write_bytes(kept)
    [back] = w.check()
    assert "usable again" in back.summary
    got = alerts_of(hook)
    assert [g["severity"] for g in got] == ["critical", "warning"]
    assert got[0]["counts"] == {"sites_down": 1}


def test_objects_refused_for_want_of_a_verified_copy_alert(watched, hook, tmp_path):
    inst, cat, sites, w = watched
    (inst.settings.sites[1].path / "PACSVAULT-SITE.json").unlink()
    mirror = MirrorWriter(sites, timeout_s=5, retry_after_s=0)
    ingest = IngestService(cat, mirror, min_copies=2)          # both copies or nothing
    received = Received()
    for m in make_ct_series(tmp_path / "more", 2, size=5000, seed=4):
        data = m.path.read_bytes()
        import pydicom
        ds = pydicom.dcmread(m.path, stop_before_pixels=True)
        r = ingest.store(StoreRequest(None, ds.SOPClassUID, ds.SOPInstanceUID,
                                      str(ds.file_meta.TransferSyntaxUID), "MODALITY",
                                      data=data))
        assert not r.acknowledged
        received.count("assoc-1", ("MODALITY", "MODALITY@127.0.0.1"), r)
    received.flush("assoc-1", cat)
    mirror.close()
    got = {a.source: a for a in w.check()}
    assert got["ingest"].severity == "critical" and got["ingest"].counts == {"refused": 2}
    assert "ingest" not in {a.source for a in w.check()}       # each refusal alerts once
    for g in alerts_of(hook):
        assert "1.2." not in json.dumps(g) and "TEST-0001" not in json.dumps(g)   # no UID, no PHI


def test_failed_logins_and_locked_accounts_alert(watched, hook):
    inst, cat, sites, w = watched
    for _ in range(3):
        audit.record(cat, Event("login-failed", "failure", "mallory", "10.9.9.9"))
    [a] = w.check()
    assert a.source == "security" and a.counts == {"failed_logins": 3}
    create_user(cat, "vic", "viewer", "Correct-Horse-9-Battery", inst.settings.accounts,
                must_change=False)
    with cat.unit(write=True) as uow:
        uow.session.query(User).filter(User.name == "vic").update(
            {"locked_until": utcnow() + timedelta(minutes=15)})
        uow.commit()
    [b] = w.check()
    assert b.counts == {"accounts_locked": 1}
    assert [g["source"] for g in alerts_of(hook)] == ["security", "security"]


def test_an_old_catalog_backup_and_a_volume_left_on_site_alert(watched, hook):
    inst, cat, sites, w = watched
    w.s = w.s.model_copy(update={"alerts": w.s.alerts.model_copy(
        update={"catalog_backup_max_age_h": 0.0002})})       # 0.72 s
    time.sleep(1.0)
    got = w.check()
    assert {a.summary.split(" is ")[0] for a in got} == {
        "the newest catalog backup on site-a", "the newest catalog backup on site-b"}
    now = utcnow()
    with cat.unit(write=True) as uow:
        uow.session.add(DrVolume(barcode="PV000001", pool="offsite", volume_set="s", sequence=1,
                                 capacity=1, block_size=1, bytes=1, segments=1, studies=1,
                                 state="sealed", location="", device="", kind="stream",
                                 recipients="[]", continues=False, writer="",
                                 created_at=now - timedelta(days=9),
                                 sealed_at=now - timedelta(days=9)))
        uow.commit()
    [a] = w.check()
    assert a.source == "dr" and a.counts == {"volumes": 1}
    run_cli(inst.config, "catalog", "backup")                # fixed: the condition ends
    time.sleep(0.1)
    assert w.check() == []


@pytest.mark.needs_dcmtk
def test_the_daemon_watches_and_metrics_show_the_condition(tmp_path, hook):
    inst = Install.create(tmp_path / "pv", toml_extra=(
        f'[alerts]\nwebhook_url = "http://127.0.0.1:{hook.port}/hook"\nwatch_interval_s = 1\n'))
    http = free_port()
    d = Daemon(inst.config, free_port(), http, workers=1).start()
    try:
        (inst.settings.sites[1].path / "PACSVAULT-SITE.json").unlink()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not hook.got:
            time.sleep(0.2)
        [a] = alerts_of(hook)
        assert a["source"] == "site" and "site-b" in a["summary"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics").read().decode()
            if 'pacsvault_watch_condition{condition="site-down",place="site-b"} 1.0' in metrics:
                break
            time.sleep(1)
        else:
            raise AssertionError(metrics[-2000:])
    finally:
        d.stop()
