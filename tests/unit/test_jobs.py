"""Job runs: every run recorded with its outcome; a run missed while down is made up once."""
import json
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from archive import jobs
from archive.app.status import collect
from archive.catalog import lease
from archive.catalog.models import JobRun
from archive.config.cron import cron_trigger
from archive.daemon.scheduler import start_scheduler
from archive.daemon.web import WebApp, WebServer
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install

UTC = timezone.utc


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.ingest(make_ct_series(tmp_path / "ct", 3, size=4000))
    return i


def test_each_outcome_is_recorded_with_its_counts(inst):
    catalog = inst.catalog()
    try:
        with jobs.recorded(catalog, "scrub", "manual") as rec:
            rec.outcome, rec.summary = "findings", {"damaged": 2}
        with pytest.raises(RuntimeError):
            with jobs.recorded(catalog, "migrate", "schedule"):
                raise RuntimeError("study 1.2.3 broke")        # message may name a study
        with pytest.raises(lease.LeaseHeld):
            with jobs.recorded(catalog, "migrate", "catch-up"):
                raise lease.LeaseHeld("the migrate job", "someone")
        runs = jobs.history(catalog)
    finally:
        catalog.close()
    assert [(r["job"], r["trigger"], r["outcome"]) for r in runs] == [
        ("migrate", "catch-up", "skipped"), ("migrate", "schedule", "failed"),
        ("scrub", "manual", "findings")]
    assert runs[1]["summary"] == {"error": "RuntimeError"}     # the type only, never the text
    assert runs[2]["summary"] == {"damaged": 2}
    assert all(r["finished_at"] >= r["started_at"] for r in runs)


def test_a_run_whose_process_died_shows_as_interrupted(inst):
    catalog = inst.catalog()
    try:
        import socket
        with catalog.unit(write=True) as uow:
            uow.session.add(JobRun(job="scrub", trigger="schedule",
                                   host=f"{socket.gethostname()[:64]}:999999999:dead",
                                   started_at=datetime.now(UTC), outcome="running", summary="{}"))
            uow.commit()
        with jobs.recorded(catalog, "scrub", "manual"):      # a live one stays running meanwhile
            assert jobs.settle_interrupted(catalog) == 1
            assert [r["outcome"] for r in jobs.history(catalog)] == ["running", "interrupted"]
    finally:
        catalog.close()


def test_missed_fire_time_only_for_a_job_that_was_due_while_down(inst):
    trig = cron_trigger("0 3 * * *")
    now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    grace = timedelta(hours=24)
    assert jobs.last_fire_time(trig, now, grace) == datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    assert jobs.last_fire_time(trig, now, timedelta(hours=5)) is None
    catalog = inst.catalog()
    try:
        assert jobs.missed_fire_time(catalog, "scrub", trig, now, grace) is None   # never ran
        at = lambda t: (lambda: t)  # noqa: E731
        with jobs.recorded(catalog, "scrub", "schedule",
                           clock=at(datetime(2026, 11, 30, 3, 0, tzinfo=UTC))):
            pass
        assert jobs.missed_fire_time(catalog, "scrub", trig, now, grace) == \
            datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
        with jobs.recorded(catalog, "scrub", "manual",
                           clock=at(datetime(2026, 12, 1, 4, 0, tzinfo=UTC))):
            pass                          # someone ran it by hand after the due time
        assert jobs.missed_fire_time(catalog, "scrub", trig, now, grace) is None
    finally:
        catalog.close()


def test_serve_makes_up_a_missed_scrub_once_at_start_up(inst):
    due = datetime.now(UTC) - timedelta(hours=2)
    cron = f"{due.minute} {due.hour} * * *"
    text = inst.config.read_text().replace('schedule = "0 3 * * 0"', f'schedule = "{cron}"')
    inst.config.write_text(text)
    catalog = inst.catalog()
    try:
        old = datetime.now(UTC) - timedelta(days=3)
        with jobs.recorded(catalog, "scrub", "schedule", clock=lambda: old):
            pass
        stop = threading.Event()
        sched = start_scheduler(inst.settings, stop)
        try:
            ids = {j.id for j in sched.get_jobs()}
            assert "scrub-catch-up" in ids and "migrate-catch-up" not in ids
            assert "scrub-objects-catch-up" not in ids and "drill-catch-up" not in ids
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runs = jobs.history(catalog, "scrub")
                if runs[0]["trigger"] == "catch-up" and runs[0]["outcome"] != "running":
                    break
                time.sleep(0.2)
        finally:
            sched.shutdown(wait=True)
        runs = jobs.history(catalog, "scrub")
        assert [(r["trigger"], r["outcome"]) for r in runs] == [("catch-up", "ok"),
                                                                 ("schedule", "ok")]
        assert runs[0]["summary"]["objects"] == 6
        assert runs[0]["scheduled_for"].startswith(due.strftime("%Y-%m-%dT%H:%M"))
        # Made up once: a second start-up finds nothing missed.
        sched = start_scheduler(inst.settings, stop)
        try:
            assert "scrub-catch-up" not in {j.id for j in sched.get_jobs()}
        finally:
            sched.shutdown(wait=False)
    finally:
        catalog.close()


def test_manual_runs_show_in_jobs_status_and_metrics(inst):
    f = sorted((inst.settings.sites[0].path / "objects").rglob("*.dcm"))[0]
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 1
    f.write_bytes(bytes(raw))
    assert run_cli(inst.config, "scrub", "--all", check=False).returncode == 1
    out = json.loads(run_cli(inst.config, "jobs", "--json").stdout)
    assert [s["job"] for s in out["schedule"]] == ["migrate", "scrub", "scrub-objects", "drill",
                                                 "audit-verify", "catalog-backup"]
    run = out["runs"][0]
    assert (run["job"], run["trigger"], run["outcome"]) == ("scrub", "manual", "findings")
    assert run["summary"]["damaged"] == 1 and run["summary"]["repaired"] == 1
    assert "study" not in json.dumps(run)                     # counts only
    human = run_cli(inst.config, "jobs").stdout
    assert "scrub" in human and "findings" in human

    st = json.loads(run_cli(inst.config, "status", "--json").stdout)
    assert st["jobs"]["scrub"]["last_run"]["outcome"] == "findings"
    assert st["jobs"]["scrub"]["last_ok_at"] is None and st["jobs"]["scrub"]["next_run"]
    assert st["last_scrub"]["findings"] == 1 and st["last_scrub"]["repaired"] == 1

    settings = inst.settings
    catalog = inst.catalog()
    server = WebServer(WebApp(lambda: collect(settings, catalog, inst.sites()), None),
                       "127.0.0.1", 0)
    try:
        port = server.port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        catalog.close()
    assert "pacsvault_scrub_last_findings 1.0" in body
    assert "pacsvault_scrub_last_unrecoverable 0.0" in body
    assert 'pacsvault_job_last_run_ok{job="scrub"} 0.0' in body
    assert 'pacsvault_job_last_ok_timestamp_seconds{job="scrub"} 0.0' in body
