"""The scrub benchmark runs end to end on a small data set (CI's short version):
every contender measured over the same files, cold and warm, every scrub clean
and complete with the small and the large catalog, and the scrub's catalog
queries served by an index without sorting the site's copies."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench]
REPO = Path(__file__).resolve().parents[2]


def test_quick_scrub_bench_compares_with_sha256sum_the_bare_loop_and_a_large_catalog(
        tmp_path: Path):
    out = tmp_path / "scrub.json"
    p = subprocess.run([sys.executable, "-m", "bench.scrub", "--quick", "--mb", "20",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    assert report["files"] == 38
    tables = report["tables"]
    assert set(tables["cold"]["median"]) == {"sha256sum", "bare loop", "bare + read-ahead",
                                             "scrub x1", "scrub x2"}
    assert set(tables["warm"]["median"]) == {"sha256sum", "bare loop", "scrub x1", "scrub x2"}
    assert set(tables["catalog"]["median"]) == {"scrub x1 few", "scrub x1 large",
                                                "scrub x2 few", "scrub x2 large"}
    assert all(m["MBps"] > 0 for t in tables.values() for m in t["median"].values())
    assert all(v > 0 for v in report["ratios"].values()) and len(report["ratios"]) == 8
    # The large catalog really is large, and every scrub (4 cold and warm, 4 on the
    # two catalogs) verified every file of site-a.
    assert report["catalog_rows"]["large"]["copies"] == 2 * 38 + 3 * 20_000
    assert report["scrubs"] == 8 and report["scrub_objects_min"] == 38
    q = report["queries"]
    assert q["ok_copies_on_tier"] == 20_000
    assert any("ix_copies_location_state" in step for step in q["batch_plan"])
    assert not any("TEMP B-TREE" in step for step in q["batch_plan"]), q["batch_plan"]
    assert any("ix_copies_location_state" in step for step in q["orphan_keys_plan"])
