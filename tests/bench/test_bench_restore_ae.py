"""The restore-to-PACS benchmark runs end to end (CI's short version): both senders
deliver every instance to a real storescp, as shipped and with TCP_NODELAY, and a
ratio is printed for each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.needs import missing
from tests.support.storescp import storescp_binary

pytestmark = [pytest.mark.bench, pytest.mark.needs_dcmtk]
REPO = Path(__file__).resolve().parents[2]


def test_quick_restore_to_a_pacs_is_measured_against_storescu(tmp_path: Path):
    if storescp_binary() is None:
        missing("dcmtk storescp is not installed")
    out = tmp_path / "ae.json"
    p = subprocess.run([sys.executable, "-m", "bench.restore_ae", "--quick", "--count", "30",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["instances"] == 30 and set(r["pacs"]) == {"as shipped", "TCP_NODELAY=1"}
    for m in r["pacs"].values():
        assert m["ratio_wall"] > 0 and m["median"]["pacsvault"]["sending_s"] > 0
    assert p.stdout.count("storescu/pacsvault") == 2
