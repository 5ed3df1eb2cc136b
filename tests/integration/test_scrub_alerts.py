"""`pacsvault scrub --all --json` with damage raises an alert through the configured hooks."""
from __future__ import annotations

import json
import socket
import sys

from tests.integration.test_scrub import files, flip
from tests.support.daemon import run_cli
from tests.support.dataset import make_varied_study
from tests.support.tiering import Install

# The hook: an operator's pager script, here recording what it was given.
HOOK = """import json, os, sys
alert = json.load(sys.stdin)
alert["env_severity"] = os.environ["PACSVAULT_ALERT_SEVERITY"]
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(alert) + "\\n")
"""


def test_damaged_copies_raise_one_alert_with_counts_and_no_uid(tmp_path):
    hook, got = tmp_path / "hook.py", tmp_path / "alerts.jsonl"
    hook.write_text(HOOK)
    with socket.socket() as s:          # a webhook nobody listens on: reported, not fatal
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    inst = Install.create(tmp_path / "pv", toml_extra=(
        "[alerts]\n"
        f"command = {json.dumps([sys.executable, str(hook), str(got)])}\n"
        f'webhook_url = "http://127.0.0.1:{dead}/hook?key=q-secret"\n'
        "webhook_timeout_s = 2\n"))
    made = make_varied_study(tmp_path / "v", per_kind=1, size=20_000)
    inst.ingest(made)

    assert json.loads(run_cli(inst.config, "scrub", "--all", "--json").stdout)["ok"]
    assert not got.exists()                                # a clean scrub alerts nobody

    a, b = files(inst, 0), files(inst, 1)
    flip(a[1])                                             # repaired from site-b
    flip(a[4])
    [twin] = [p for p in b if p.name == a[4].name]         # both copies bad: unrecoverable
    flip(twin, at=-200)
    p = run_cli(inst.config, "scrub", "--all", "--json", check=False)
    report = json.loads(p.stdout)                          # the hooks never touch stdout
    assert p.returncode == 1 and report["unrecoverable"] == 2 and report["repaired"] == 1

    [line] = got.read_text().splitlines()
    alert = json.loads(line)
    assert alert["source"] == "scrub" and alert["severity"] == "critical"
    assert alert["env_severity"] == "critical" and alert["run_id"] == report["run_id"]
    assert alert["counts"] == {"damaged": 3, "repaired": 1, "unrecoverable": 2, "orphans": 0,
                               "objects": report["objects"], "bytes": report["bytes"],
                               "skipped_sites": 0}
    uids = {m.sop_uid for m in made} | {m.study_uid for m in made}
    assert not [u for u in uids if u in line]
    assert f"run {report['run_id']}" in alert["details"]

    # The webhook's failure is one line on stderr, without the URL's query string.
    assert f"ALERT not delivered: webhook http://127.0.0.1:{dead}:" in p.stderr
    assert "q-secret" not in p.stderr


def test_the_scheduled_scrub_and_migrate_jobs_alert_too(tmp_path):
    import threading

    from archive.app.scheduled import run_migrate_job, run_scrub_job

    hook, got = tmp_path / "hook.py", tmp_path / "alerts.jsonl"
    hook.write_text(HOOK)
    inst = Install.create(tmp_path / "pv", toml_extra=(
        "[alerts]\n" f"command = {json.dumps([sys.executable, str(hook), str(got)])}\n"))
    made = make_varied_study(tmp_path / "v", per_kind=1, size=20_000)
    inst.ingest(made)
    files(inst, 1)[0].unlink()
    j = run_scrub_job(inst.settings, threading.Event())
    assert j["damaged"] == 1 and j["repaired"] == 1
    [alert] = [json.loads(x) for x in got.read_text().splitlines()]
    assert (alert["source"], alert["severity"]) == ("scrub", "warning")
    assert alert["counts"]["repaired"] == 1

    # A migrate run whose object tier is gone alerts with its job run.
    text = inst.config.read_text().replace("min_online_days = 30", "min_online_days = 0")
    inst.config.write_text(text)
    import shutil
    shutil.rmtree(inst.settings.objects.path)
    inst.settings.objects.path.write_text("not a directory")
    totals = run_migrate_job(inst.settings, threading.Event())
    assert totals["failed"] >= 1
    alerts = [json.loads(x) for x in got.read_text().splitlines()]
    assert alerts[-1]["source"] == "migrate" and alerts[-1]["counts"]["failed"] == totals["failed"]
    uids = {m.sop_uid for m in made} | {m.study_uid for m in made}
    assert not [u for u in uids if u in got.read_text()]
