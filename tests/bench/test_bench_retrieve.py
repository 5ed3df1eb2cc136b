"""The retrieve benchmark runs end to end (CI's short version): both systems move
both studies to a real storescp by C-MOVE, send both whole over WADO-RS (Orthanc
through its DICOMweb plugin) and answer both C-FIND queries, and the ratios
pacsvault/Orthanc are printed. This checks the harness, not the target;
the real numbers come from the full run (docs/performance.md)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support.needs import missing
from tests.support.orthanc import DICOMWEB_PLUGIN, ORTHANC_BIN, orthanc_binary

pytestmark = [pytest.mark.bench, pytest.mark.needs_dcmtk, pytest.mark.needs_orthanc]
REPO = Path(__file__).resolve().parents[2]


def test_quick_retrieve_bench_measures_pacsvault_and_orthanc(tmp_path: Path):
    for tool in ("storescu", "storescp", "echoscu", "movescu"):
        require_tool(tool)
    require_tool(orthanc_binary() or ORTHANC_BIN)
    if not Path(DICOMWEB_PLUGIN).exists():
        missing(f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} (orthanc-dicomweb) not installed")
    out = tmp_path / "retrieve.json"
    p = subprocess.run([sys.executable, "-m", "bench.retrieve", "--quick", "--workdir",
                        str(tmp_path), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())

    assert set(r["systems"]) == {"pacsvault", "orthanc"}
    moves = {(m["system"], m["dataset"]): m for m in r["moves"]}
    assert set(moves) == {(s, d) for s in ("pacsvault", "orthanc") for d in ("ct", "small")}
    for m in moves.values():
        assert m["ok"], m             # final status Success, every object at the destination
        assert m["objects_per_s"] > 0 and math.isfinite(m["objects_per_s"])
        assert m["mb_per_s"] > 0 and math.isfinite(m["mb_per_s"])
    for d in ("ct", "small"):
        ratio = r["ratios"]["move"][d]["pacsvault_vs_orthanc"]
        assert ratio > 0 and math.isfinite(ratio)

    # WADO-RS: each study whole from each system, every instance a part of the body.
    assert r["wado_skipped"] is None
    assert r["systems"]["orthanc"]["plugins"].get("dicom-web")
    wado = {(w["system"], w["dataset"]): w for w in r["wado"]}
    assert set(wado) == set(moves)
    for (system, dataset), w in wado.items():
        assert w["ok"], w             # HTTP 200, a whole multipart body, one part per object
        assert w["objects"] == moves[(system, dataset)]["objects"]
        assert all(run["parts"] == w["objects"] for run in w["runs"])
        assert w["objects_per_s"] > 0 and math.isfinite(w["objects_per_s"])
        assert w["mb_per_s"] > 0 and math.isfinite(w["mb_per_s"])
        assert w["body_bytes_median"] > w["bytes"] * 0.9      # the objects, not a summary
    for d in ("ct", "small"):
        ratio = r["ratios"]["wado"][d]["pacsvault_vs_orthanc"]
        assert ratio > 0 and math.isfinite(ratio)

    finds = {(f["system"], f["query"]): f for f in r["finds"]}
    assert set(finds) == {(s, q) for s in ("pacsvault", "orthanc") for q in ("study", "patient")}
    for f in finds.values():
        assert f["queries"] == 40 and 0 < f["p50_ms"] <= f["p99_ms"]
    for q in ("study", "patient"):
        assert r["ratios"]["find"][q]["p50_pacsvault_vs_orthanc"] > 0
    # Both answered the study query with the query patient's two studies.
    assert len(r["find_answers"]["study"]["pacsvault"]) == 2

    for word in ("pacsvault", "orthanc", "pv/Orthanc", "C-MOVE", "WADO-RS", "C-FIND"):
        assert word in p.stdout
