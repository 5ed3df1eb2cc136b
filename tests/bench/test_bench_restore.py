"""The restore benchmark runs end to end on a small study (CI's short version): every
tier restored completely and verified, compared with reading its medium."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench]
REPO = Path(__file__).resolve().parents[2]


def test_quick_restore_bench_measures_every_tier_against_its_medium(tmp_path: Path):
    out = tmp_path / "restore.json"
    p = subprocess.run([sys.executable, "-m", "bench.restore", "--quick", "--mb", "12",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["instances"] == 22 and set(r["median"]) == {"online", "objects", "dr"}
    for tier, m in r["median"].items():
        assert m["raw_MBps"] > 0 and m["restore_MBps"] > 0 and m["ratio"] > 0
        assert 0 < m["first_s"] <= m["last_s"]
    # Compressed media are smaller than the study they hold.
    rnd = r["rounds"][0]
    assert rnd["objects"]["medium_bytes"] < rnd["online"]["medium_bytes"]
    assert "raw/restore time" in p.stdout
