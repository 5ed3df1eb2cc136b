"""The catalog benchmark runs end to end at a small size (the full 10M run is manual)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
ROWS = 20_000


def test_bench_catalog_small(tmp_path: Path) -> None:
    out = tmp_path / "catalog.json"
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "bench.catalog", "--rows", str(ROWS), "--quick",
                        "--dir", str(tmp_path / "work"), "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=110)
    elapsed = time.monotonic() - t
    assert p.returncode == 0, p.stderr
    assert elapsed < 30, f"bench took {elapsed:.0f}s"
    result = json.loads(out.read_text())
    assert result["rows"] == ROWS
    small = result["sizes"]["1000"]
    large = result["sizes"][str(ROWS)]
    assert large["shape"]["instances"] == ROWS and large["shape"]["copies"] == 2 * ROWS
    names = set(large["timings"])
    for expected in ("versions_of, new SOP UID", "study by UID", "instances of a study (100)",
                     "under_replicated(site, 200)", "counts_by_location",
                     "status.collect (all of status)"):
        assert expected in names
    assert set(small["timings"]) == names == set(result["ratios"])
    for t_ in (*small["timings"].values(), *large["timings"].values()):
        assert t_["reps"] >= 1 and 0 < t_["min_s"] <= t_["median_s"] <= t_["p95_s"]
    # The table is printed for people; the JSON is for scripts.
    assert "versions_of, new SOP UID" in p.stdout and "N/1k" in p.stdout
    # Work files are kept in --dir only when --keep is given.
    assert not list((tmp_path / "work").glob("catalog-*.db"))
