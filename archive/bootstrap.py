"""The composition root: the only place that builds engines, backends and services."""
from __future__ import annotations

from archive.catalog.engine import make_engine, schema_is_current, upgrade
from archive.catalog.uow import Catalog
from archive.config.schema import Settings
from archive.errors import CatalogError
from tiers.fs import FilesystemBackend


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


def open_object_tier(settings: Settings):  # noqa: ANN201 - a tiers.backend.Backend
    """The long-term tier: a local directory (embedded default) or an S3 bucket.
    Bundles are large and verified once, so the directory tier reads back from
    the device like the sites do."""
    o = settings.objects
    if o.kind == "s3":
        from tiers.s3 import S3Backend, S3Settings

        return S3Backend(o.name, S3Settings(**o.s3.model_dump()))
    return FilesystemBackend(o.name, o.path, min_free_bytes=settings.ingest.min_free_bytes,
                             verify_read=settings.ingest.verify_read)


def open_object_tier_or_none(settings: Settings):  # noqa: ANN201
    """For reports: the tier, or a stand-in whose health names why it cannot be
    opened here (e.g. its credentials are not in this process's environment)."""
    from archive.errors import PacsvaultError
    from tiers.backend import SiteHealth

    try:
        return open_object_tier(settings)
    except PacsvaultError as e:
        reason = f"cannot open: {e}"

        class _Unopened:
            name = settings.objects.name

            def health(self) -> SiteHealth:
                return SiteHealth(False, reason)
        return _Unopened()


def open_scrubber(settings: Settings, catalog: Catalog, stop=None):  # noqa: ANN001, ANN201
    """The site scrubber with this config's sites, object tier (repair source) and limits."""
    from replication.scrub import Scrubber

    tier = open_object_tier_or_none(settings)
    return Scrubber(catalog, open_sites(settings),
                    tier if hasattr(tier, "open_range") else None,
                    scratch=settings.ingest.spool_dir / "scrub",
                    max_mb_per_s=settings.scrub.max_mb_per_s,
                    threads=settings.scrub.threads, stop=stop)


def open_object_scrubber(settings: Settings, catalog: Catalog, stop=None):  # noqa: ANN001, ANN201
    """The object-tier scrubber: reads every study bundle back (repairs from the sites)."""
    from replication.scrub_objects import ObjectTierScrubber

    return ObjectTierScrubber(catalog, open_sites(settings), open_object_tier(settings), settings,
                              scratch=settings.ingest.spool_dir / "scrub",
                              max_mb_per_s=settings.scrub.max_mb_per_s,
                              threads=settings.scrub.threads, stop=stop)


def open_driller(settings: Settings, catalog: Catalog, *, identities=None, volume_paths=None,  # noqa: ANN001
                 trigger: str = "manual", actor: str | None = None):  # noqa: ANN201
    """Restore drills over this config's sites, object tier and DR volumes."""
    from dr.drill import Driller

    tier = open_object_tier_or_none(settings)
    return Driller(catalog, open_sites(settings), tier if hasattr(tier, "open_range") else None,
                   scratch=settings.ingest.spool_dir / "drill", identities=identities,
                   volume_paths=volume_paths, trigger=trigger, actor=actor)
