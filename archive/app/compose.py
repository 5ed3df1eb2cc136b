"""The composition root: the only place that builds engines, backends and services."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from archive.catalog.engine import make_engine, schema_is_current, upgrade
from archive.catalog.uow import Catalog
from archive.config.schema import Settings
from archive.errors import CatalogError, PacsvaultError
from tiers.backend import Backend, SiteHealth
from tiers.fs import FilesystemBackend

# The services are imported inside the function that builds each: every `pacsvault`
# call imports this module, and a verb should pay only for what it opens (DR pulls in
# pynetdicom and pyrage, the object tier boto3). import-linter counts these imports all
# the same, so they hide no cycle and climb no floor.
if TYPE_CHECKING:
    from dr.deliver import Delivery
    from dr.drill import Driller
    from dr.restore import Restorer
    from dr.writer import DrWriter
    from replication.scrub import Scrubber
    from replication.scrub_objects import ObjectTierScrubber
    from tiers.migrate import Migrator
    from tiers.recall import Recaller


def open_catalog(settings: Settings, migrate: bool = False) -> Catalog:
    engine = make_engine(settings.catalog.url)
    try:
        if migrate:
            upgrade(engine)
        elif not schema_is_current(engine):
            raise CatalogError("schema is missing or older than this version: "
                               "run 'pacsvault init' (it migrates an existing catalog)")
    except CatalogError:
        engine.dispose()
        raise
    except Exception as e:
        engine.dispose()
        raise CatalogError(f"cannot open the catalog: {type(e).__name__}: {e}") from None
    return Catalog(engine)


def open_sites(settings: Settings) -> list[FilesystemBackend]:
    return [
        FilesystemBackend(s.name, s.path, min_free_bytes=settings.ingest.min_free_bytes,
                          verify_read=settings.ingest.verify_read)
        for s in settings.sites
    ]


def open_object_tier(settings: Settings) -> Backend:
    """The long-term tier: a local directory (embedded default) or an S3 bucket.
    Bundles are large and verified once, so the directory tier reads back from
    the device like the sites do."""
    o = settings.objects
    if o.kind == "s3":
        from tiers.s3 import S3Backend

        return S3Backend(o.name, o.s3)
    return FilesystemBackend(o.name, o.path, min_free_bytes=settings.ingest.min_free_bytes,
                             verify_read=settings.ingest.verify_read)


class UnopenedTier:
    """Stands in for an object tier this process cannot open (e.g. its credentials
    are not in this environment): reports say why, and nothing reads from it."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def health(self) -> SiteHealth:
        return SiteHealth(False, self.reason)


def open_object_tier_or_none(settings: Settings) -> Backend | UnopenedTier:
    """For reports: the tier, or a stand-in whose health names why it cannot be
    opened here."""
    try:
        return open_object_tier(settings)
    except PacsvaultError as e:
        return UnopenedTier(settings.objects.name, f"cannot open: {e}")


def readable_object_tier(settings: Settings) -> Backend | None:
    """The object tier as a source to read from (whole objects and ranges), or None
    when it cannot be opened here: the one way use cases get a ranged reader."""
    tier = open_object_tier_or_none(settings)
    return None if isinstance(tier, UnopenedTier) else tier


def open_scrubber(settings: Settings, catalog: Catalog,
                  stop: threading.Event | None = None) -> Scrubber:
    """The site scrubber with this config's sites, object tier (repair source) and limits."""
    from replication.scrub import Scrubber

    return Scrubber(catalog, open_sites(settings), readable_object_tier(settings),
                    scratch=settings.ingest.spool_dir / "scrub",
                    max_mb_per_s=settings.scrub.max_mb_per_s,
                    threads=settings.scrub.threads, stop=stop)


def open_object_scrubber(settings: Settings, catalog: Catalog,
                         stop: threading.Event | None = None) -> ObjectTierScrubber:
    """The object-tier scrubber: reads every study bundle back (repairs from the sites)."""
    from replication.scrub_objects import ObjectTierScrubber

    return ObjectTierScrubber(catalog, open_sites(settings), open_object_tier(settings), settings,
                              scratch=settings.ingest.spool_dir / "scrub",
                              max_mb_per_s=settings.scrub.max_mb_per_s,
                              threads=settings.scrub.threads, stop=stop)


def open_driller(settings: Settings, catalog: Catalog, *, identities: list | None = None,
                 volume_paths: list | None = None, trigger: str = "manual",
                 actor: str | None = None) -> Driller:
    """Restore drills over this config's sites, object tier and DR volumes."""
    from dr.drill import Driller

    return Driller(catalog, open_sites(settings), readable_object_tier(settings),
                   scratch=settings.ingest.spool_dir / "drill", identities=identities,
                   volume_paths=volume_paths, trigger=trigger, actor=actor)


def open_migrator(settings: Settings, catalog: Catalog,
                  stop: threading.Event | None = None) -> Migrator:
    """Lifecycle migration from this config's sites to its object tier."""
    from tiers.migrate import Migrator

    return Migrator(catalog, open_sites(settings), open_object_tier(settings), settings, stop=stop)


def open_recaller(settings: Settings, catalog: Catalog) -> Recaller:
    """Brings migrated studies back onto this config's sites."""
    from tiers.recall import Recaller

    return Recaller(catalog, open_sites(settings), open_object_tier(settings),
                    scratch=settings.ingest.spool_dir / "recall")


def open_dr_writer(settings: Settings, catalog: Catalog, *, recipients: list[str],
                   stop: threading.Event | None = None, **device: object) -> DrWriter:
    """A DR volume writer signing with this install's key; ``device`` overrides the
    config's [dr] device, kind, capacity, barcode and next-volume prompt (and the scratch
    directory, by default the spool's)."""
    from archive.audit import key_path
    from dr.signing import writer_key
    from dr.writer import DrWriter

    device.setdefault("scratch", settings.ingest.spool_dir / "dr")   # bundle frames, never tmpfs
    device.setdefault("audit_key", key_path(settings.data_dir))
    return DrWriter(catalog, open_sites(settings), readable_object_tier(settings), settings.dr,
                    recipients=recipients, signing_key=writer_key(settings.data_dir), stop=stop,
                    **device)  # type: ignore[arg-type]


def open_restorer(settings: Settings, catalog: Catalog, delivery: Delivery, *,
                  sources: tuple[str, ...] | None = None, identities: list | None = None,
                  volume_paths: list[Path] | None = None, scratch: Path | None = None,
                  load_volume: Callable[[str, str], bool] | None = None,
                  sites: list[FilesystemBackend] | None = None) -> Restorer:
    """A restore from this config's tiers to ``delivery`` (``sites``: the ones the
    delivery already holds open, when it writes back onto them)."""
    from dr.restore import TIERS, Restorer

    return Restorer(catalog, sites or open_sites(settings), readable_object_tier(settings), delivery,
                    sources=sources or TIERS, identities=identities, volume_paths=volume_paths or [],
                    scratch=scratch or settings.ingest.spool_dir / "restore",
                    load_volume=load_volume)
