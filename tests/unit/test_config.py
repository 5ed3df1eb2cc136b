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


def test_default_has_a_directory_object_tier_and_a_policy(tmp_path):
    s = load_settings(write(tmp_path, default_config_text()))
    assert s.objects.kind == "directory" and s.objects.path == tmp_path / "objects"
    assert s.lifecycle.rules and s.lifecycle.min_online_days == 30


@pytest.mark.parametrize("text,key", [
    ("[objects]\nkind = 's3'\n", "objects"),
    ("[objects]\nkind = 'tape'\n", "objects.kind"),
    ("[objects]\ncompression_level = 40\n", "objects.compression_level"),
    ("[objects]\nname = 'site-a'\n", "objects.name"),
    ("[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'b'\nobject_lock_mode = 'COMPLIANCE'\n",
     "object lock needs retain_days"),
    ("[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'b'\nprefix = '../x'\n", "prefix"),
    ("[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'b'\naccess_key = 'AKIA'\n",
     "objects.s3.access_key"),   # keys never in the file: only the names of variables
    ("[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'b'\n"
     "endpoint_url = 'http://10.0.0.5:8333'\n", "plain HTTP to another host"),
    ("[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'b'\n"
     "endpoint_url = 'http://s3.storage-provider.example'\n", "plain HTTP to another host"),
    ("[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'b'\nendpoint_url = 'ftp://x'\n",
     "not an http(s) URL"),
    ("[lifecycle]\nschedule = 'every night'\n", "lifecycle.schedule"),
    ("[lifecycle]\nnever_migrate_studies = ['1.2.abc']\n", "lifecycle.never_migrate_studies"),
    ("[[lifecycle.rules]]\nname = 'all'\n", "no condition"),
    ("[[lifecycle.rules]]\nname = 'x'\nolder_than_days = -1\n", "lifecycle.rules.0.older_than_days"),
    ("[[lifecycle.rules]]\nname = 'x'\nage_from = 'birth'\nolder_than_days = 1\n",
     "lifecycle.rules.0.age_from"),
])
def test_bad_tier_and_policy_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text))
    assert key in str(e.value)


def test_s3_tier_config_is_accepted(tmp_path):
    s = load_settings(write(tmp_path, "[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'pv'\n"
                                      "endpoint_url = 'http://127.0.0.1:8333'\n"
                                      "object_lock_mode = 'COMPLIANCE'\nretain_days = 3650\n"))
    assert s.objects.s3.bucket == "pv" and s.objects.s3.retain_days == 3650


def test_production_example_config_is_valid():
    p = Path(__file__).resolve().parents[2] / "deploy" / "pacsvault.production.toml"
    s = load_settings(p)
    assert s.objects.kind == "s3" and s.objects.s3.object_lock_mode == "COMPLIANCE"
    assert [r.name for r in s.lifecycle.rules] == ["older-than-2-years", "untouched-for-a-year"]


def test_plain_http_to_the_object_tier_only_on_loopback_or_when_trusted(tmp_path):
    base = "[objects]\nkind = 's3'\n[objects.s3]\nbucket = 'pv'\n"
    for ok in ("endpoint_url = 'http://localhost:8333'\n", "endpoint_url = 'http://[::1]:9000'\n",
               "endpoint_url = 'https://s3.storage-provider.example'\n",
               "endpoint_url = 'http://10.0.0.5:8333'\nallow_plain_http = true\n"):
        assert load_settings(write(tmp_path, base + ok)).objects.s3.bucket == "pv"
