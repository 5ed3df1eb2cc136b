"""The floors are a contract (pyproject.toml, [tool.importlinter]): edges >
use cases > capabilities > ground, no cycles, media formats without the catalog.
import-linter counts imports inside functions too, so a cycle cannot hide there."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("archive", "tiers", "replication", "dr")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                           "lint_imports_command()", "--no-cache"],
                          cwd=root, capture_output=True, text=True, timeout=300)


def test_the_floors_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "4 kept, 0 broken" in r.stdout


@pytest.fixture
def copy_of_the_code(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_import(root: Path, module: str, line: str, *, in_function: bool = False) -> None:
    path = root / (module.replace(".", "/") + ".py")
    text = textwrap.indent(line, "    ") if in_function else line
    wrapper = f"\n\ndef _probe() -> None:\n{text}\n" if in_function else f"\n{text}\n"
    path.write_text(path.read_text() + wrapper)


@pytest.mark.parametrize("module, line, broken", [
    # The ground climbing to a capability (the old circle: config -> tiers.s3).
    ("archive.config.schema", "import tiers.s3", "Floors"),
    # A capability reaching the use cases.
    ("tiers.migrate", "import archive.app.compose", "Floors"),
    # The two edges importing each other.
    ("archive.daemon.scheduler", "import archive.cli.dr", "Floors"),
    # A byte format reading the catalog.
    ("dr.segment", "import archive.catalog.models", "Byte formats"),
    # A cycle between two capability modules, hidden inside a function.
    ("dr.keys", "import dr.writer", "No import cycle"),
])
def test_a_climbing_import_breaks_the_contract(copy_of_the_code, module, line, broken):
    _add_import(copy_of_the_code, module, line, in_function=True)
    r = lint_imports(copy_of_the_code)
    assert r.returncode != 0
    assert f"{broken}" in r.stdout.split("Broken contracts")[-1]


def test_a_new_module_of_archive_must_be_placed_in_a_room(copy_of_the_code):
    (copy_of_the_code / "archive" / "unplaced.py").write_text("import archive.errors\n")
    r = lint_imports(copy_of_the_code)
    assert r.returncode != 0 and "archive.unplaced" in r.stdout + r.stderr
