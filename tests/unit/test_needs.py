"""tests.support.needs.missing: any true-ish CI value makes a missing tool a failure.

CI systems spell it differently (GitHub and GitLab say "true", others "1", "True",
"yes"); a strict comparison silently turned required tests into skips there."""
from __future__ import annotations

import pytest

from tests.support.needs import missing


def outcome_of_missing() -> str:
    """What missing() does to the calling test: 'fail' or 'skip' (caught here, so a
    skip cannot hide this test's own failure)."""
    try:
        missing("frobnicator not installed")
    except pytest.fail.Exception as e:
        assert "frobnicator not installed" in str(e) and "required in CI" in str(e)
        return "fail"
    except pytest.skip.Exception as e:
        assert "frobnicator not installed" in str(e)
        return "skip"
    raise AssertionError("missing() returned")


@pytest.mark.parametrize("value", ["1", "true", "True", "TRUE", "yes", "Yes", "on", "ON",
                                   " true ", "y"])
def test_a_true_ish_ci_value_fails_instead_of_skipping(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert outcome_of_missing() == "fail"


@pytest.mark.parametrize("value", [None, "", "0", "false", "False", "no", "off", "n"])
def test_no_or_a_false_ci_value_skips(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert outcome_of_missing() == "skip"
