"""The README and docs stand alone in a user's clone and list what the code does."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.daemon import PACSVAULT

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "deploy" / "compose.yaml"]


def test_no_reference_outside_the_clone_and_no_issue_numbers() -> None:
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text, doc
        assert not re.search(r"\bissues? \d", text), (doc, re.search(r".*\bissues? \d.*", text))


def test_every_exit_code_in_the_code_is_in_the_readme() -> None:
    codes = set()
    for src in [*ROOT.glob("archive/**/*.py"), *ROOT.glob("tiers/*.py"), *ROOT.glob("dr/*.py"),
                *ROOT.glob("replication/*.py")]:
        codes |= {int(c) for c in re.findall(r"^\s+exit_code = (\d+)", src.read_text(), re.M)}
    readme = ROOT.joinpath("README.md").read_text()
    listed = readme[readme.index("Exit codes:"):].split("\n\n", 1)[0]
    missing = sorted(c for c in codes if not re.search(rf"\b{c} ", listed))
    assert codes and not missing, missing


def test_init_hint_names_the_config(tmp_path: Path) -> None:
    p = subprocess.run([PACSVAULT, "init", str(tmp_path / "pv")], capture_output=True, text=True,
                       check=True)
    hint = p.stdout.strip().splitlines()[-1]
    assert f"--config {tmp_path / 'pv' / 'pacsvault.toml'}" in hint, hint


def test_readme_push_example_proposes_compressed_syntaxes() -> None:
    readme = ROOT.joinpath("README.md").read_text()
    assert "-xy 127.0.0.1 11112" in readme and "-xs" in readme
