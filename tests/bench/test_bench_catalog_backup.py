"""The catalog backup benchmark runs end to end at a small size, beside the tools."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_catalog_backup_quick(tmp_path: Path) -> None:
    out = tmp_path / "backup.json"
    p = subprocess.run([sys.executable, "-m", "bench.catalog_backup", "--quick",
                        "--dir", str(tmp_path / "work"), "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["rows"] == 20_000 and r["encrypted_bytes"] > 0
    assert r["seconds"]["pacsvault"] > 0 and r["seconds"]["tools"] > 0
    assert r["ratio_tools_over_pacsvault"] > 0
    assert "ratio" in p.stdout
