"""`migrate --dry-run` says, per study that stays online, which rule kept it."""
from __future__ import annotations

import json

from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series, make_instance
from tests.support.tiering import Install


def test_dry_run_names_the_rule_that_kept_each_study(tmp_path):
    inst = Install.create(tmp_path / "pv")
    cfg = inst.config
    text = cfg.read_text()
    old = make_ct_series(tmp_path / "old", 2, size=5_000, seed=3)      # StudyDate 2024
    listed = make_ct_series(tmp_path / "listed", 1, size=5_000, seed=4)
    mr = [make_instance(tmp_path / "mr.dcm", kind="MR", size=5_000)]
    inst.ingest(old + listed + mr)
    cfg.write_text(text[:text.index("[lifecycle]")] + (
        "[lifecycle]\nmin_online_days = 0\n"
        f"never_migrate_studies = ['{listed[0].study_uid}']\n"
        "[[lifecycle.rules]]\nname = 'old-ct'\nolder_than_days = 365\nmodalities = ['CT']\n"))
    j = json.loads(run_cli(cfg, "migrate", "--dry-run", "--json").stdout)
    assert [s["study_uid"] for s in j["studies"]] == [old[0].study_uid]
    kept = {k["study_uid"]: k for k in j["kept"]}
    assert kept[listed[0].study_uid]["reason"] == "never_migrate_studies"
    assert kept[mr[0].study_uid]["reason"] == "no rule matches"
    assert kept[mr[0].study_uid]["detail"] == "old-ct: no series of modalities CT"
    assert j["totals"]["kept"] == 2
    # min_online_days, in the text output too: every study is young now.
    cfg.write_text(cfg.read_text().replace("min_online_days = 0", "min_online_days = 30"))
    out = run_cli(cfg, "migrate", "--dry-run").stdout
    assert "would move 0 studies" in out
    for uid in (old[0].study_uid, mr[0].study_uid):
        line = next(ln for ln in out.splitlines() if uid in ln)
        assert line.startswith("kept") and "min_online_days" in line, out
    assert "TEST-" not in out                                   # no Patient ID
