"""The configuration schema.

Every model forbids unknown keys and is frozen, so a typo is an error that names
the dotted key, and nothing changes settings behind the daemon's back. Relative
paths are resolved against the directory holding the config file (load.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from archive.uids import InvalidAETitle, validate_ae_title


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomSettings(_Strict):
    ae_title: str = "PACSVAULT"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    # Off only when the config says so: unknown peers are refused at association.
    allow_any_peer: bool = False
    # Refuse associations addressed to another called AE title (dcmtk's default is ANY-SCP).
    check_called_ae: bool = False
    # Worker processes sharing the port (SO_REUSEPORT); 0 = one per CPU core.
    workers: int = Field(0, ge=0, le=64)
    max_associations: int = Field(32, ge=1, le=1000)
    network_timeout_s: float = Field(60, gt=0)
    max_pdu: int = Field(262144, ge=0)
    # pynetdicom polls with 1 ms sleeps per message; shorter helps a bare acceptor (+25 %)
    # but measured no gain behind the full ingest path (docs/performance.md), so it stays.
    reactor_sleep_s: float = Field(0.001, gt=0, le=0.01)
    # On SIGTERM, open associations get this long to finish before they are aborted.
    shutdown_grace_s: float = Field(30, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        try:
            return validate_ae_title(v)
        except InvalidAETitle as e:
            raise ValueError(str(e)) from None


class HttpSettings(_Strict):
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class CatalogSettings(_Strict):
    # sqlite:///relative/or/absolute.db or postgresql+psycopg://user@host/db.
    # PACSVAULT_CATALOG_URL in the environment overrides it (keeps passwords out of files).
    url: str = "sqlite:///catalog/catalog.db"


class SiteSettings(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    path: Path


class IngestSettings(_Strict):
    spool_dir: Path = Path("spool")
    # "device": drop the page cache before the verify read so it reaches the disk;
    # "cache": verify from the page cache (faster, proves less).
    verify_read: Literal["device", "cache"] = "device"
    # A site with less free space than this is treated as full before writing.
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)
    # A site write that takes longer than this counts as failed for that object.
    site_timeout_s: float = Field(30, gt=0)
    # A failed site is not tried again for this long (the next object goes to the healthy one).
    site_retry_after_s: float = Field(5, ge=0)
    # How often the daemon re-copies under-replicated objects to returned sites.
    repair_interval_s: float = Field(5, gt=0)


class Settings(_Strict):
    config_path: Path | None = None
    data_dir: Path = Path(".")
    dicom: DicomSettings = DicomSettings()
    http: HttpSettings = HttpSettings()
    catalog: CatalogSettings = CatalogSettings()
    sites: tuple[SiteSettings, ...] = (
        SiteSettings(name="site-a", path=Path("sites/a")),
        SiteSettings(name="site-b", path=Path("sites/b")),
    )
    ingest: IngestSettings = IngestSettings()

    @model_validator(mode="after")
    def _sites_distinct(self) -> "Settings":
        if not self.sites:
            raise ValueError("sites: at least one online site is required")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("sites: site names must be unique")
        paths = [s.path for s in self.sites]
        if len(set(paths)) != len(paths):
            raise ValueError("sites: two sites share one path; mirrors must be distinct")
        return self
