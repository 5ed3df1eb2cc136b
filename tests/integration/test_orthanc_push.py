"""A real Orthanc (Debian 1.10) acting as the PACS: it C-STOREs studies to `pacsvault serve`.

Orthanc is configured with pacsvault as a DICOM modality; the test uploads a
varied study to Orthanc over REST (including the private and retired SOP classes
that dcmtk storescu refuses to send) and asks Orthanc to push it.

Transfer syntax: with every syntax accepted as proposed, Orthanc 1.10 forwards each
file in the syntax it holds it in (no transcoding), and the data set bytes arrive
unchanged; the test checks that, since the archive stores exactly what it receives.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import require_tool, site_paths
from tests.support.daemon import Daemon, free_port, init_instance, run_cli
from tests.support.dataset import (
    NOT_FOR_STORESCU,
    SOP_CLASSES,
    VARIED,
    make_varied_study,
)
from tests.support.orthanc import ORTHANC_BIN, Orthanc, OrthancError, orthanc_binary
from tests.support.verify import audit, sqlite_url

pytestmark = [pytest.mark.needs_orthanc, pytest.mark.needs_dcmtk]


@pytest.fixture
def pv_config(tmp_path: Path) -> Path:
    """An embedded-default install that knows Orthanc (AE ORTHANC on 127.0.0.1) as a peer."""
    cfg = init_instance(tmp_path / "pv")
    run_cli(cfg, "peer", "add", "ORTHANC", "127.0.0.1")
    return cfg


@pytest.fixture
def pv_daemon(pv_config: Path):
    d = Daemon(pv_config, free_port(), free_port(), workers=2)
    d.start()
    yield d
    if d.proc and d.proc.poll() is None:
        try:
            d.stop()
        except AssertionError:
            pass
        d.kill9()


@pytest.fixture
def orthanc_factory(tmp_path: Path):
    require_tool(orthanc_binary() or ORTHANC_BIN)
    started: list[Orthanc] = []

    def start(aet: str, pacsvault_port: int) -> Orthanc:
        o = Orthanc(tmp_path / f"orthanc-{aet}", aet=aet,
                    modalities={"pacsvault": ("PACSVAULT", "127.0.0.1", pacsvault_port)})
        started.append(o)
        return o.start()

    yield start
    for o in started:
        o.stop()


def _catalog_rows(config: Path) -> dict[str, tuple[str, str, str]]:
    """sop_uid -> (sop_class, transfer_syntax, calling_ae) as the catalog recorded them."""
    with sqlite3.connect(config.parent / "catalog" / "catalog.db") as c:
        return {r[0]: (r[1], r[2], r[3]) for r in c.execute(
            "SELECT sop_uid, sop_class, transfer_syntax, calling_ae FROM instances")}


def _dataset_bytes(path: Path) -> bytes:
    from archive.dicom.part10 import dataset_offset

    with open(path, "rb") as f:
        offset = dataset_offset(f)
        f.seek(offset)
        return f.read()


def test_orthanc_pushes_varied_study_including_private_and_retired(
        pv_daemon: Daemon, orthanc_factory, tmp_path: Path):
    orthanc = orthanc_factory("ORTHANC", pv_daemon.dicom_port)
    kinds = VARIED + NOT_FOR_STORESCU
    made = make_varied_study(tmp_path / "in", per_kind=2, size=6000, kinds=kinds)
    studies = {orthanc.upload(m.path)["ParentStudy"] for m in made}
    assert len(studies) == 1
    assert orthanc.count_instances() == len(made)

    answer = orthanc.store_to("pacsvault", sorted(studies))
    assert answer["FailedInstancesCount"] == 0, answer
    assert answer["InstancesCount"] == len(made), answer
    assert answer["RemoteAet"] == "PACSVAULT" and answer["LocalAet"] == "ORTHANC"

    # The catalog holds exactly the pushed objects, with both copies verified.
    sites = site_paths(pv_daemon.config)
    a = audit(sqlite_url(pv_daemon.config.parent), sites)
    assert a.sop_uids == {m.sop_uid for m in made}
    assert a.instances == len(made)
    assert a.ok_copies == 2 * len(made) and a.missing_copies == 0
    assert not a.bad, a.bad
    assert not a.temp_files, a.temp_files

    rows = _catalog_rows(pv_daemon.config)
    private = {SOP_CLASSES[k][0] for k, _ in NOT_FOR_STORESCU}
    assert private <= {sop_class for sop_class, _, _ in rows.values()}
    for m in made:
        sop_class, ts, calling = rows[m.sop_uid]
        assert sop_class == m.sop_class
        assert calling == "ORTHANC"
        # Orthanc 1.10 did not transcode: each object arrived in its own syntax...
        assert ts == m.transfer_syntax, f"Orthanc sent {m.path.name} as {ts}"
        # ...with the data set bytes unchanged, and that is what both sites hold.
        stored = list(sites["site-a"].rglob(m.sop_uid + ".dcm"))
        assert len(stored) == 1
        assert _dataset_bytes(stored[0]) == _dataset_bytes(m.path), m.path.name
        twin = sites["site-b"] / stored[0].relative_to(sites["site-a"])
        assert twin.read_bytes() == stored[0].read_bytes()

    st = pv_daemon.status()
    assert st["instances"] == len(made) and st["studies"] == 1
    assert st["conflicts"] == 0 and st["under_replicated"] == 0
    assert all(s["objects"] == len(made) and s["missing"] == 0 and s["corrupt"] == 0
               for s in st["sites"])

    # Pushing the same study again is acknowledged without new copies.
    again = orthanc.store_to("pacsvault", sorted(studies))
    assert again["FailedInstancesCount"] == 0, again
    assert pv_daemon.status()["instances"] == len(made)
    assert "Test^Synthetic" not in pv_daemon.log()  # no PHI in our log


def test_orthanc_under_unknown_ae_title_is_refused(pv_daemon: Daemon, orthanc_factory,
                                                   tmp_path: Path):
    orthanc = orthanc_factory("STRANGER", pv_daemon.dicom_port)  # not on the allow-list
    made = make_varied_study(tmp_path / "in", per_kind=1, size=4096)
    ids = [orthanc.upload(m.path)["ID"] for m in made]
    assert not orthanc.echo("pacsvault")
    with pytest.raises(OrthancError) as e:
        orthanc.store_to("pacsvault", ids)
    assert "Association Rejected" in e.value.body
    jobs = orthanc.get("/jobs?expand")
    assert jobs and all(j["State"] == "Failure" for j in jobs if j["Type"] == "DicomModalityStore")
    assert pv_daemon.status()["instances"] == 0
    a = audit(sqlite_url(pv_daemon.config.parent), site_paths(pv_daemon.config))
    assert a.instances == 0 and not a.temp_files
    assert "calling AE 'STRANGER' is not a known peer" in pv_daemon.log()
