"""DICOM TLS (dcmtk +tls / +tla) and HTTPS against a real `pacsvault serve`."""
from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require_tool, site_paths
from tests.support.daemon import (
    PACSVAULT,
    Daemon,
    dcmtk_env,
    echoscu,
    free_port,
    init_instance,
    run_cli,
    storescu,
)
from tests.support.dataset import make_ct_series
from tests.support.pki import Pki, make_pki
from tests.support.verify import audit, sqlite_url

pytestmark = pytest.mark.needs_dcmtk


def configure(root: Path, pki: Pki, *, dicom: str = "", http: str = "") -> Path:
    """A fresh instance allowing STORESCU from 127.0.0.1, with TLS lines in [dicom]/[http]."""
    cfg = init_instance(root)
    text = cfg.read_text()
    text = text.replace("[dicom]\n", f"[dicom]\ntls_cert = '{pki.server_cert}'\n"
                                     f"tls_key = '{pki.server_key}'\n{dicom}\n", 1)
    text = text.replace("[http]\n", f"[http]\n{http}\n", 1)
    cfg.write_text(text)
    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    return cfg


def client_cert(pki: Pki) -> tuple[str, ...]:
    return ("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))


def anonymous(pki: Pki) -> tuple[str, ...]:
    return ("+tla", "+cf", str(pki.ca))


def tls_echo(port: int, tls: tuple[str, ...], aet: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", "PACSVAULT", *tls, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)


def get(url: str, ctx: ssl.SSLContext | None = None) -> dict:
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    require_tool("storescu")
    return make_pki(tmp_path / "pki")


@pytest.fixture
def started():  # noqa: ANN201
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        if d.proc and d.proc.poll() is None:
            d.kill9()


def test_tls_and_plain_ports_and_https(tmp_path: Path, pki: Pki, started):
    tls_port = free_port()
    cfg = configure(tmp_path / "pv", pki, dicom=f"tls_port = {tls_port}\ntls_ca = '{pki.ca}'",
                    http=f"tls_cert = '{pki.server_cert}'\ntls_key = '{pki.server_key}'")
    d = Daemon(cfg, free_port(), free_port(), workers=2)
    started.append(d)
    d.start()
    assert f"{tls_port} (TLS)" in d.log() and "HTTPS" in d.log()

    made = make_ct_series(tmp_path / "ct", 6, size=32 * 1024)
    r = storescu(tls_port, tmp_path / "ct", extra=client_cert(pki))
    assert r.returncode == 0, r.stderr
    a = audit(sqlite_url(cfg.parent), site_paths(cfg))
    assert a.instances == len(made) and a.ok_copies == 2 * len(made) and not a.bad
    # No client certificate: allowed, since tls_require_client_cert is false.
    assert tls_echo(tls_port, anonymous(pki)).returncode == 0
    # The allow-list holds on the TLS port too.
    r = tls_echo(tls_port, anonymous(pki), aet="STRANGER")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr + r.stdout
    # Plain DICOM to the TLS port fails, and nothing lands; the plain port still works.
    assert echoscu(tls_port).returncode != 0
    other = make_ct_series(tmp_path / "plain", 2, size=4096, seed=9)
    assert storescu(tls_port, [m.path for m in other]).returncode != 0
    assert d.status()["instances"] == len(made)
    assert "TLS handshake from 127.0.0.1 failed" in d.log()
    assert echoscu(d.dicom_port).returncode == 0

    # HTTPS with our CA works; plain HTTP to the same port does not. (/status is a
    # snapshot refreshed every 30 s: its numbers may predate the push above.)
    ca = ssl.create_default_context(cafile=str(pki.ca))
    assert "instances" in get(f"https://127.0.0.1:{d.http_port}/status", ca)
    assert "instances" in get(f"https://localhost:{d.http_port}/status", ca)
    with pytest.raises(OSError):  # ConnectionResetError, RemoteDisconnected, BadStatusLine...
        get(f"http://127.0.0.1:{d.http_port}/status")
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # not trusting our CA
        get(f"https://127.0.0.1:{d.http_port}/status", ssl.create_default_context())
    assert "Traceback" not in d.log() and "PRIVATE KEY" not in d.log()
    # Last (pynetdicom logs the TLS bytes it gets as bad PDUs): TLS to the plain port fails.
    assert tls_echo(d.dicom_port, anonymous(pki)).returncode != 0


def test_tls_only_with_required_client_cert(tmp_path: Path, pki: Pki, started):
    tls_port = free_port()
    cfg = configure(tmp_path / "pv", pki,
                    dicom=f"tls_port = {tls_port}\ntls_only = true\ntls_ca = '{pki.ca}'\n"
                          "tls_require_client_cert = true")
    pki.server_key.chmod(0o644)  # the operator forgot: warned about, still served
    d = Daemon(cfg, free_port(), free_port(), workers=1)
    started.append(d)
    d.start()
    assert "readable by group or others" in d.log()
    made = make_ct_series(tmp_path / "ct", 3, size=8192)
    # A connection that never says hello does not hold up others (one worker here).
    with socket.create_connection(("127.0.0.1", tls_port)):
        assert storescu(tls_port, tmp_path / "ct", extra=client_cert(pki)).returncode == 0
    assert d.status()["instances"] == len(made)
    assert tls_echo(tls_port, anonymous(pki)).returncode != 0  # no client certificate
    assert echoscu(d.dicom_port).returncode != 0                # no plain listener at all
    assert d.stop() == 0


def test_dicom_tls_port_option(tmp_path: Path, pki: Pki):
    cfg = configure(tmp_path / "pv", pki)
    tls_port, plain = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen([PACSVAULT, "--config", str(cfg), "serve", "--dicom-port", str(plain),
                              "--dicom-tls-port", str(tls_port), "--http-port", "0",
                              "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "pacsvault listening" not in log_path.read_text() and p.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tls_echo(tls_port, anonymous(pki)).returncode == 0, log_path.read_text()
        assert echoscu(plain).returncode == 0
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    # Same port twice: refused before anything starts.
    r = subprocess.run([PACSVAULT, "--config", str(cfg), "serve", "--dicom-port", str(plain),
                        "--dicom-tls-port", str(plain)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "tls_port must differ" in r.stderr


def test_https_required_off_loopback(tmp_path: Path):
    cfg = init_instance(tmp_path / "pv")
    text = cfg.read_text()
    cfg.write_text(text.replace('[http]\nbind = "127.0.0.1"', '[http]\nbind = "0.0.0.0"'))
    r = run_cli(cfg, "status", check=False)
    assert r.returncode == 3
    assert "http" in r.stderr and "not loopback" in r.stderr and "tls_cert" in r.stderr
    cfg.write_text(cfg.read_text().replace(
        '[http]\nbind = "0.0.0.0"\n', '[http]\nbind = "0.0.0.0"\nallow_plain_off_loopback = true\n'))
    assert run_cli(cfg, "status", check=False).returncode == 0


def test_bad_certificate_stops_start_up(tmp_path: Path, pki: Pki):
    cfg = configure(tmp_path / "pv", pki, dicom=f"tls_port = {free_port()}")
    pki.server_key.write_text("not a key\n")
    r = subprocess.run([PACSVAULT, "--config", str(cfg), "serve", "--http-port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "dicom.tls_cert/dicom.tls_key: cannot load" in r.stderr
