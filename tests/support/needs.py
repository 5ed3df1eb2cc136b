"""One rule for a missing external dependency: skip on a developer's machine, fail in
CI (CI set to any true-ish value), so a test never stops running unnoticed because an
install step is gone."""
from __future__ import annotations

import os
from typing import NoReturn

import pytest

# CI systems spell "true" differently: GitHub and GitLab "true", others "1", "True", "yes".
TRUE_ISH = frozenset({"1", "true", "yes", "y", "on"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in TRUE_ISH


def missing(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason} (required in CI: deploy/install.sh --test installs it)")
    pytest.skip(reason)
