"""Load and validate the TOML config; resolve relative paths; render the default."""
from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from archive.config.paths import check_layout
from archive.config.schema import Settings
from archive.errors import ConfigError

DEFAULT_NAME = "pacsvault.toml"


def config_path_from(option: str | None) -> Path:
    """--config, else $PACSVAULT_CONFIG, else ./pacsvault.toml."""
    return Path(option or os.environ.get("PACSVAULT_CONFIG") or DEFAULT_NAME)


def default_config_text() -> str:
    return resources.files("archive.config").joinpath("default.toml").read_text()


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{key}: {e['msg']}")
    return "; ".join(lines)


def load_settings(path: Path) -> Settings:
    """Parse, validate and resolve. Raises ConfigError naming the bad key."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run 'pacsvault init' or pass --config)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if "config_path" in raw:
        raise ConfigError(f"{path}: config_path: not a setting")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    resolved = resolve(settings, path)
    check_layout(resolved)   # before anything creates, sweeps or opens a path
    return resolved


def resolve(settings: Settings, path: Path) -> Settings:
    """Make every path absolute, relative to the config file's directory."""
    base = path.resolve().parent
    data_dir = (base / settings.data_dir).resolve()

    def under(p: Path) -> Path:
        return p if p.is_absolute() else (data_dir / p)

    url = os.environ.get("PACSVAULT_CATALOG_URL") or settings.catalog.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url[len("sqlite:///"):]
        if rel and rel != ":memory:":
            url = "sqlite:///" + str(under(Path(rel)))
    sites = tuple(s.model_copy(update={"path": under(s.path)}) for s in settings.sites)
    ingest = settings.ingest.model_copy(update={"spool_dir": under(settings.ingest.spool_dir)})
    objects = settings.objects.model_copy(update={"path": under(settings.objects.path)})
    device = settings.dr.device
    if device != "-" and not device.startswith("/"):
        device = str(under(Path(device)))
    dr = settings.dr.model_copy(update={"device": device})
    dicom = settings.dicom.model_copy(update={
        k: under(getattr(settings.dicom, k)) for k in ("tls_cert", "tls_key", "tls_ca")
        if getattr(settings.dicom, k) is not None})
    http = settings.http.model_copy(update={
        k: under(getattr(settings.http, k)) for k in ("tls_cert", "tls_key")
        if getattr(settings.http, k) is not None})
    return settings.model_copy(
        update={
            "objects": objects,
            "dr": dr,
            "dicom": dicom,
            "http": http,
            "config_path": path.resolve(),
            "data_dir": data_dir,
            "catalog": settings.catalog.model_copy(update={"url": url}),
            "sites": sites,
            "ingest": ingest,
        }
    )
