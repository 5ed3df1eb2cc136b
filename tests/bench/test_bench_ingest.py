"""The ingest benchmark runs end to end (tiny counts, so CI takes well under a minute).

This checks the harness, not the targets: every system must be measured, every
round must store all its objects, and the ratios must be finite and positive.
The real numbers come from the full run (docs/performance.md).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support.orthanc import ORTHANC_BIN, orthanc_binary

pytestmark = [pytest.mark.bench, pytest.mark.needs_dcmtk, pytest.mark.needs_orthanc]

REPO = Path(__file__).resolve().parents[2]


def test_quick_ingest_bench_measures_all_three_systems(tmp_path: Path):
    for tool in ("storescu", "storescp", "echoscu"):
        require_tool(tool)
    require_tool(orthanc_binary() or ORTHANC_BIN)
    out = tmp_path / "ingest.json"
    p = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--quick", "--ct", "6", "--small", "24",
         "--large", "1", "--large-mb", "2", "--repeat", "1", "--workdir", str(tmp_path),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())

    assert set(report["systems"]) == {"pacsvault", "orthanc", "storescp"}
    results = report["results"]
    seen = {(r["system"], r["dataset"], r["associations"]) for r in results}
    for system in ("pacsvault", "orthanc", "storescp"):
        for dataset in ("ct", "small", "large"):
            for assoc in (1, 4):
                assert (system, dataset, assoc) in seen
    for r in results:
        assert r["ok"], r
        assert r["objects_per_s"] > 0 and math.isfinite(r["objects_per_s"])
        assert r["mb_per_s"] > 0 and math.isfinite(r["mb_per_s"])

    ratios = report["ratios"]
    assert len(ratios) == 6
    for row in ratios:
        for key in ("pacsvault_vs_orthanc", "pacsvault_vs_storescp"):
            v = row[key]
            assert v is not None and math.isfinite(v) and v > 0, row
    assert "pv/Orthanc" in p.stdout and "pacsvault" in p.stdout  # the table is printed
    st = report["pacsvault_status"]
    assert st["conflicts"] == 0 and st["under_replicated"] == 0
