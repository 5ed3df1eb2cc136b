"""One rule for a missing external dependency: skip on a developer's machine, fail in
CI (CI=true), so a test never stops running unnoticed because an install step is gone."""
from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required in CI: deploy/install.sh --test installs it)")
    pytest.skip(reason)
