from pathlib import Path

import pytest

from archive.config import load_settings
from archive.config.load import default_config_text
from archive.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pacsvault.toml"
    p.write_text(text)
    return p


def test_default_config_loads_and_resolves_under_its_directory(tmp_path):
    s = load_settings(write(tmp_path, default_config_text()))
    assert s.dicom.ae_title == "PACSVAULT" and s.dicom.allow_any_peer is False
    assert all(str(site.path).startswith(str(tmp_path)) for site in s.sites)
    assert s.catalog.url == f"sqlite:///{tmp_path}/catalog/catalog.db"


@pytest.mark.parametrize("text,key", [
    ("[dicom]\nport = 70000\n", "dicom.port"),
    ("[dicom]\nae_tittle = 'X'\n", "dicom.ae_tittle"),
    ("[dicom]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", "dicom.ae_title"),
    ("[ingest]\nverify_read = 'sometimes'\n", "ingest.verify_read"),
    ("[[sites]]\nname='a'\npath='x'\n[[sites]]\nname='a'\npath='y'\n", "sites"),
    ("[[sites]]\nname='../evil'\npath='x'\n", "sites.0.name"),
    ("unknown = 1\n", "unknown"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text))
    assert key in str(e.value)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[dicom\nport = "))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        load_settings(p)


def test_catalog_url_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSVAULT_CATALOG_URL", "postgresql+psycopg://u:secret@db/pv")
    s = load_settings(write(tmp_path, ""))
    assert s.catalog.url == "postgresql+psycopg://u:secret@db/pv"
