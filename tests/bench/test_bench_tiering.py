"""The tiering benchmark runs end to end on a small study (CI's short version).

This checks the harness, not the targets: both contenders measured in the same
run, every round migrated and recalled every instance, and the ratios finite.
The real figures come from the full run (docs/performance.md).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.seaweed import require_weed

pytestmark = [pytest.mark.bench, pytest.mark.needs_s3]
REPO = Path(__file__).resolve().parents[2]


def test_quick_tiering_bench_compares_with_boto3(tmp_path: Path):
    require_weed()
    out = tmp_path / "tiering.json"
    p = subprocess.run([sys.executable, "-m", "bench.tiering", "--mb", "20", "--repeat", "1",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    [r] = report["rounds"]
    assert r["boto3_s"] > 0 and r["pacsvault_s"] > 0 and r["recall_s"] > 0
    assert math.isfinite(report["median"]["ratio"]) and report["median"]["ratio"] > 0
    assert report["study"]["instances"] == 38 and report["study"]["compression_ratio"] > 1.0
    assert "ratio" in p.stdout and "boto3 upload_file" in p.stdout
