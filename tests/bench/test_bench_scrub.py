"""The scrub benchmark runs end to end on a small data set (CI's short version):
every contender measured over the same files, every scrub clean and complete."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench]
REPO = Path(__file__).resolve().parents[2]


def test_quick_scrub_bench_compares_with_sha256sum_and_the_bare_loop(tmp_path: Path):
    out = tmp_path / "scrub.json"
    p = subprocess.run([sys.executable, "-m", "bench.scrub", "--mb", "20", "--repeat", "1",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    assert set(report["median_MBps"]) == {"sha256sum", "bare loop", "scrub x1", "scrub x2"}
    assert all(v > 0 for v in report["median_MBps"].values())
    assert report["files"] == 38 and report["ratios"]["scrub_x1_vs_bare"] > 0
