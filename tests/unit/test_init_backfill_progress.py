"""`pacsvault init` on a large existing archive reads every stored object once: it says
how far it got every 10 s, and that an interruption loses nothing."""
from archive.catalog.backfill_query import BackfillReport
from archive.cli import setup


def test_progress_is_shown_every_ten_seconds_not_per_batch(monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(setup.time, "monotonic", lambda: now[0])
    show = setup._backfill_progress()
    show(BackfillReport(instances=500))          # the first batch, at once: quiet
    now[0] += 10.5
    show(BackfillReport(instances=1000))
    now[0] += 3
    show(BackfillReport(instances=1500))         # 3 s later: quiet again
    err = capsys.readouterr().err.splitlines()
    assert err == ["query attributes: 1000 instances read so far (interrupt at any time: "
                   "'pacsvault init' again resumes)"]
