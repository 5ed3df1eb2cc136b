"""The pynetdicom listener ([dicom] engine = "pynetdicom"), kept as a fallback for one
release: the listener's daemon tests run on it unchanged (imported, so they check the
same things)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile.test_dicom_input import (  # noqa: F401 - collected and run here too
    test_malformed_truncated_and_missing_uids,
    test_unknown_calling_ae_is_rejected_before_data,
    test_wrong_sop_class_is_a_mismatch,
)
from tests.integration.test_dcmtk_push import (  # noqa: F401
    test_echo_from_known_peer,
    test_sigterm_exits_zero_without_errors,
    test_varied_study_lands_bit_identical_on_both_sites,
)
from tests.support.daemon import init_instance, run_cli

pytestmark = pytest.mark.needs_dcmtk


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PV_TEST_DICOM_ENGINE", "pynetdicom")
    cfg = init_instance(tmp_path / "pv")
    assert 'engine = "pynetdicom"' in cfg.read_text()
    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    return cfg


def test_the_pynetdicom_listener_is_the_one_listening(daemon):
    assert "pynetdicom engine" in daemon.log()
