"""The scheduled migrate job: runs the policy, one at a time, stops when asked."""
import threading

from archive.catalog import lease
from archive.app.scheduled import run_migrate_job
from archive.daemon.scheduler import start_scheduler
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install


def test_job_runs_the_policy_and_respects_the_lease(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.ingest(make_ct_series(tmp_path / "ct", 2, size=4000))       # StudyDate 2024-01-02
    text = inst.config.read_text().replace("min_online_days = 30", "min_online_days = 0")
    inst.config.write_text(text)
    settings = inst.settings
    catalog = inst.catalog()
    try:
        with lease.lease(catalog, "job:migrate", what="x"):      # an operator's run holds it
            assert "skipped" in run_migrate_job(settings, threading.Event())
        assert len(inst.site_files()) == 4
        stop = threading.Event()
        stop.set()                                                # shutting down: nothing starts
        assert run_migrate_job(settings, stop)["studies"] == 0
        assert len(inst.site_files()) == 4
        totals = run_migrate_job(settings, threading.Event())
        assert totals["studies"] == 1 and totals["instances"] == 2
        assert inst.site_files() == [] and len(inst.tier_files()) == 1
    finally:
        catalog.close()


def test_scheduler_reads_the_cron_from_config(tmp_path):
    inst = Install.create(tmp_path / "pv")
    sched = start_scheduler(inst.settings, threading.Event())
    try:
        jobs = {j.id: j.next_run_time for j in sched.get_jobs()}
        assert set(jobs) == {"migrate", "scrub", "scrub-objects", "drill",   # no DR key yet
                             "audit-verify", "catalog-backup"}
        assert jobs["catalog-backup"].minute == 15                           # hourly
        assert jobs["audit-verify"].minute == 45                             # hourly
        assert (jobs["scrub-objects"].day, jobs["scrub-objects"].hour) == (1, 4)   # monthly
        assert (jobs["migrate"].hour, jobs["migrate"].minute) == (1, 30)
        assert (jobs["scrub"].weekday(), jobs["scrub"].hour) == (6, 3)       # Sunday 03:00
    finally:
        sched.shutdown(wait=False)
    off = inst.config.read_text().replace('schedule = "30 1 * * *"', 'schedule = ""')
    off = off.replace('schedule = "0 3 * * 0"', 'schedule = ""')
    off = off.replace('objects_schedule = "0 4 1 * *"', 'objects_schedule = ""')
    off = off.replace('schedule = "0 5 1 * *"', 'schedule = ""')
    off = off.replace('backup_schedule = "15 * * * *"', 'backup_schedule = ""')
    inst.config.write_text(off + '\n[audit]\nverify_schedule = ""\n')
    assert start_scheduler(inst.settings, threading.Event()) is None


def test_cron_weekdays_mean_what_they_mean_in_cron():
    from datetime import datetime, timezone

    from archive.config.cron import cron_trigger

    monday = datetime(2026, 11, 23, tzinfo=timezone.utc)           # a Monday
    nxt = lambda e: cron_trigger(e).get_next_fire_time(None, monday)  # noqa: E731
    assert nxt("0 3 * * 0").strftime("%a") == "Sun"
    assert nxt("0 3 * * 7").strftime("%a") == "Sun"
    assert nxt("0 3 * * 1-5").strftime("%a") == "Mon"
    assert nxt("0 3 * * 6").strftime("%a") == "Sat"
    assert nxt("0 3 * * sat").strftime("%a") == "Sat"


def test_scrub_job_runs_once_at_a_time(tmp_path):
    from archive.app.scheduled import run_scrub_job

    inst = Install.create(tmp_path / "pv")
    inst.ingest(make_ct_series(tmp_path / "ct", 3, size=4000))
    catalog = inst.catalog()
    try:
        with lease.lease(catalog, "job:scrub", what="x"):
            assert "skipped" in run_scrub_job(inst.settings, threading.Event())
        j = run_scrub_job(inst.settings, threading.Event())
        assert j["objects"] == 6 and j["damaged"] == 0 and j["ok"]
    finally:
        catalog.close()
