"""SIGTERM on the own engine: open associations finish, new ones are not taken, and
one held open past the grace period is aborted, with nothing acknowledged lost.
Also our SCU (archive/dicom/net/client.py) over DICOM TLS to our own listener."""
from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import pytest

from archive.dicom.net import client
from tests.conftest import require_tool, site_paths
from tests.support.daemon import Daemon, free_port, init_instance, run_cli
from tests.support.dataset import make_ct_series
from tests.support.pki import make_pki
from tests.support.verify import audit, sqlite_url

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def instance(root: Path, dicom: str = "") -> Path:
    cfg = init_instance(root)
    text = re.sub(r"(?m)^shutdown_grace_s = .*$", "shutdown_grace_s = 4", cfg.read_text())
    cfg.write_text(text.replace("[dicom]\n", f"[dicom]\n{dicom}\n", 1))
    run_cli(cfg, "peer", "add", "MODALITY", "127.0.0.1")
    return cfg


def open_scu(port: int, **kw) -> client.ScuAssociation:  # noqa: ANN003
    return client.associate("127.0.0.1", port, called_ae="PACSVAULT", calling_ae="MODALITY",
                            contexts=[(CT, [EXPLICIT])],
                            timeouts=client.Timeouts(connect_s=5, network_s=10, dimse_s=30), **kw)


def test_sigterm_lets_an_open_association_finish_and_takes_no_new_one(tmp_path: Path):
    cfg = instance(tmp_path / "pv")
    made = make_ct_series(tmp_path / "ct", 6, size=20_000)
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    try:
        scu = open_scu(d.dicom_port)
        assert scu.store(CT, made[0].sop_uid, made[0].path).status == 0
        d.proc.send_signal(15)
        time.sleep(1.0)                       # the worker has stopped accepting by now
        with pytest.raises(client.ConnectFailed):
            open_scu(d.dicom_port)
        for m in made[1:]:                    # the open association is still served
            assert scu.store(CT, m.sop_uid, m.path).status == 0
        assert scu.release()
        assert d.proc.wait(30) == 0
    finally:
        if d.proc.poll() is None:
            d.kill9()
    a = audit(sqlite_url(cfg.parent), site_paths(cfg))
    assert a.instances == len(made) and a.ok_copies == 2 * len(made) and not a.bad


def test_an_association_held_past_the_grace_period_is_aborted_and_loses_nothing(tmp_path: Path):
    cfg = instance(tmp_path / "pv")
    made = make_ct_series(tmp_path / "ct", 3, size=20_000)
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    try:
        scu = open_scu(d.dicom_port)
        for m in made:
            assert scu.store(CT, m.sop_uid, m.path).status == 0
        t0 = time.monotonic()
        d.proc.send_signal(15)
        assert d.proc.wait(30) == 0           # after shutdown_grace_s (4 s), not 30 s
        assert 3.5 < time.monotonic() - t0 < 20
        with pytest.raises(client.ScuError):
            scu.echo()
    finally:
        if d.proc.poll() is None:
            d.kill9()
    assert "aborting associations still open after the shutdown grace period" in d.log()
    a = audit(sqlite_url(cfg.parent), site_paths(cfg))
    assert a.instances == len(made) and a.ok_copies == 2 * len(made) and not a.bad


def test_our_scu_stores_over_dicom_tls_to_our_listener(tmp_path: Path):
    require_tool("openssl")
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    cfg = instance(tmp_path / "pv", dicom=f"tls_port = {tls_port}\ntls_cert = '{pki.server_cert}'"
                                          f"\ntls_key = '{pki.server_key}'")
    made = make_ct_series(tmp_path / "ct", 3, size=50_000)
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    try:
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        with open_scu(tls_port, ssl_context=trusting, server_hostname="localhost") as scu:
            for m in made:
                assert scu.store(CT, m.sop_uid, m.path).status == 0
        # Not trusting our CA: the handshake fails with a clear error, nothing stored.
        with pytest.raises(client.ConnectFailed, match="TLS handshake failed"):
            open_scu(tls_port, ssl_context=ssl.create_default_context(),
                     server_hostname="localhost")
        # Plain DICOM to the TLS port is not an association.
        with pytest.raises(client.ScuError):
            open_scu(tls_port)
    finally:
        d.stop()
    a = audit(sqlite_url(cfg.parent), site_paths(cfg))
    assert a.instances == len(made) and a.ok_copies == 2 * len(made) and not a.bad
