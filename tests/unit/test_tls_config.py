"""[dicom] and [http] TLS settings: validation, path resolution, contexts."""
from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from archive.config import load_settings
from archive.daemon.tls import server_context, warn_if_key_exposed
from archive.errors import ConfigError
from tests.support.pki import make_pki


def load(tmp_path: Path, text: str):  # noqa: ANN201
    p = tmp_path / "pacsvault.toml"
    p.write_text(text)
    return load_settings(p)


def test_tls_is_off_by_default_and_http_stays_on_loopback(tmp_path):
    s = load(tmp_path, "")
    assert s.dicom.tls_port is None and not s.dicom.tls_only
    assert s.http.bind == "127.0.0.1" and s.http.tls_cert is None


def test_relative_tls_paths_resolve_under_data_dir(tmp_path):
    s = load(tmp_path, 'data_dir = "data"\n[dicom]\ntls_port = 2762\ntls_cert = "tls/c.pem"\n'
                       'tls_key = "tls/c.key"\ntls_ca = "/etc/ca.pem"\n'
                       '[http]\ntls_cert = "tls/h.pem"\ntls_key = "tls/h.key"\n')
    assert s.dicom.tls_cert == tmp_path / "data" / "tls" / "c.pem"
    assert s.dicom.tls_key == tmp_path / "data" / "tls" / "c.key"
    assert s.dicom.tls_ca == Path("/etc/ca.pem")
    assert s.http.tls_key == tmp_path / "data" / "tls" / "h.key"


@pytest.mark.parametrize("text,words", [
    ("[dicom]\ntls_port = 2762\n", "tls_cert and tls_key"),
    ("[dicom]\ntls_port = 2762\ntls_cert = 'c.pem'\n", "tls_cert and tls_key"),
    ("[dicom]\ntls_only = true\n", "needs tls_port"),
    ("[dicom]\nport = 2762\ntls_port = 2762\ntls_cert = 'c'\ntls_key = 'k'\n", "must differ"),
    ("[dicom]\ntls_port = 2762\ntls_cert = 'c'\ntls_key = 'k'\ntls_require_client_cert = true\n",
     "needs tls_ca"),
    ("[dicom]\ntls_port = 0\n", "dicom.tls_port"),
    ("[http]\ntls_cert = 'c.pem'\n", "go together"),
    ("[http]\nbind = '0.0.0.0'\n", "not loopback"),
    ("[http]\nbind = '::'\n", "allow_plain_off_loopback"),
    ("[http]\nbind = 'pacs.example.org'\n", "not loopback"),
])
def test_bad_tls_config_is_refused_with_a_clear_message(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert words in str(e.value)


@pytest.mark.parametrize("text", [
    "[http]\nbind = '127.0.0.1'\n",
    "[http]\nbind = '::1'\n",
    "[http]\nbind = 'localhost'\n",
    "[http]\nbind = '0.0.0.0'\nallow_plain_off_loopback = true\n",
    "[http]\nbind = '0.0.0.0'\ntls_cert = 'h.pem'\ntls_key = 'h.key'\n",
    "[dicom]\nport = 2762\ntls_port = 2762\ntls_only = true\ntls_cert = 'c'\ntls_key = 'k'\n",
])
def test_good_tls_config_loads(tmp_path, text):
    load(tmp_path, text)


def test_server_context_is_tls12_plus_and_checks_client_certs(tmp_path):
    pki = make_pki(tmp_path / "pki")
    ctx = server_context(pki.server_cert, pki.server_key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert server_context(pki.server_cert, pki.server_key, pki.ca).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(pki.server_cert, pki.server_key, pki.ca,
                          require_client_cert=True).verify_mode == ssl.CERT_REQUIRED


def test_unusable_key_is_a_config_error_without_its_contents(tmp_path):
    pki = make_pki(tmp_path / "pki")
    with pytest.raises(ConfigError, match="dicom.tls_cert/dicom.tls_key") as e:
        server_context(pki.server_cert, pki.client_key, what="dicom.tls")  # key of another cert
    assert "PRIVATE KEY" not in str(e.value)
    with pytest.raises(ConfigError, match="http.tls_cert"):
        server_context(tmp_path / "nope.pem", pki.server_key, what="http.tls")
    with pytest.raises(ConfigError, match="dicom.tls_ca"):
        server_context(pki.server_cert, pki.server_key, tmp_path / "nope.pem", what="dicom.tls")


def test_key_readable_by_others_is_warned_about(tmp_path, caplog):
    pki = make_pki(tmp_path / "pki")
    caplog.set_level(logging.WARNING, logger="pacsvault.tls")
    warn_if_key_exposed(pki.server_key)
    assert not caplog.records
    pki.server_key.chmod(0o644)
    warn_if_key_exposed(pki.server_key)
    assert "readable by group or others" in caplog.text
    assert "PRIVATE KEY" not in caplog.text
