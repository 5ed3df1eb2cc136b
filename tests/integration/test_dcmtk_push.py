"""dcmtk storescu/echoscu push real, varied studies to `pacsvault serve`."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import site_paths
from tests.support.daemon import echoscu, run_cli, storescu
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.verify import audit, sha256_file, sqlite_url

pytestmark = pytest.mark.needs_dcmtk


def test_echo_from_known_peer(daemon):
    r = echoscu(daemon.dicom_port)
    assert r.returncode == 0, r.stderr


def test_varied_study_lands_bit_identical_on_both_sites(daemon, tmp_path: Path):
    made = make_varied_study(tmp_path / "in", per_kind=2, size=6000)
    r = storescu(daemon.dicom_port, tmp_path / "in")
    assert r.returncode == 0, r.stderr
    sites = site_paths(daemon.config)
    a = audit(sqlite_url(daemon.config.parent), sites)
    assert a.instances == len(made)
    assert a.ok_copies == 2 * len(made) and a.missing_copies == 0
    assert not a.bad and not a.temp_files
    assert a.sop_uids == {m.sop_uid for m in made}
    # The data set bytes are stored exactly as sent: each site file ends with the
    # sender's data set, whatever the transfer syntax (deflate and big endian included).
    from archive.dicom.part10 import dataset_offset

    for m in made:
        sent = m.path.read_bytes()
        with open(m.path, "rb") as f:
            sent_ds = sent[dataset_offset(f):]
        stored = list(sites["site-a"].rglob(m.sop_uid + ".dcm"))
        assert len(stored) == 1
        assert stored[0].read_bytes().endswith(sent_ds)
        twin = sites["site-b"] / stored[0].relative_to(sites["site-a"])
        assert sha256_file(twin) == sha256_file(stored[0])
    st = daemon.status()
    assert st["instances"] == len(made) and st["studies"] == 1
    assert all(s["objects"] == len(made) for s in st["sites"])


def test_resend_is_idempotent_and_status_counts(daemon, tmp_path: Path):
    made = make_ct_series(tmp_path / "ct", 20, size=64 * 1024)
    assert storescu(daemon.dicom_port, tmp_path / "ct").returncode == 0
    assert storescu(daemon.dicom_port, tmp_path / "ct").returncode == 0
    st = daemon.status()
    assert st["instances"] == len(made)
    assert st["conflicts"] == 0 and st["under_replicated"] == 0


def test_unknown_ae_and_wrong_address_are_refused(daemon, tmp_path: Path):
    r = echoscu(daemon.dicom_port, aet="STRANGER")
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr + r.stdout
    run_cli(daemon.config, "peer", "add", "ELSEWHERE", "127.0.0.2")
    import time

    time.sleep(5.5)  # the daemon re-reads the allow-list every 5 s
    r = echoscu(daemon.dicom_port, aet="ELSEWHERE")
    assert r.returncode != 0
    made = make_ct_series(tmp_path / "x", 2, size=2048)
    r = storescu(daemon.dicom_port, [m.path for m in made], aet="ELSEWHERE")
    assert r.returncode != 0
    assert daemon.status()["instances"] == 0
    assert "not allowed from 127.0.0.1" in daemon.log()
    assert "Test^Synthetic" not in daemon.log()  # no PHI in the log


def test_sigterm_exits_zero_without_errors(daemon):
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()
    assert "pacsvault stopped" in daemon.log()
