"""After a migration: fill the query attributes of objects already stored
(archive/catalog/backfill_query.py), from an online copy, else from the instance's
frame in its study bundle on the object tier (decompressed to scratch and checked
against its SHA-256 first). Objects only on DR volumes stay NULL: they are found by
the keys stored before, not by the new ones, until they are restored online and
this runs again."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

from sqlalchemy import select

from archive.app.compose import open_object_tier, open_sites
from archive.catalog.backfill_query import (
    BackfillReport,
    Sources,
    StoredCopy,
    backfill_query_attributes,
)
from archive.catalog.models import Bundle
from archive.catalog.uow import Catalog
from archive.config.schema import Settings
from archive.errors import PacsvaultError
from tiers.backend import Backend
from tiers.verified_copy import frame_verified


def backfill_from_sites(settings: Settings, catalog: Catalog,
                        progress: Callable[[BackfillReport], None] | None = None
                        ) -> BackfillReport:
    sources: Sources = {site.name: (lambda c, site=site: site.open(c.key))
                     for site in open_sites(settings)}
    try:
        tier = open_object_tier(settings)
    except PacsvaultError:
        tier = None                    # not reachable now: a later run reads it
    if tier is not None:
        sources[tier.name] = _frame_opener(catalog, tier, settings.ingest.spool_dir)
    return backfill_query_attributes(catalog, sources, progress=progress)


def _frame_opener(catalog: Catalog, tier: Backend, scratch: Path
                  ) -> Callable[[StoredCopy], BinaryIO]:
    bundles: dict[int, tuple[str, str | None]] = {}

    def open_frame(c: StoredCopy) -> BinaryIO:
        if c.bundle_fk is None or c.frame_offset is None or c.frame_length is None:
            raise OSError("not a bundle frame")
        if c.bundle_fk not in bundles:
            with catalog.unit() as uow:
                row = uow.session.execute(select(Bundle.key, Bundle.version_id)
                                          .where(Bundle.id == c.bundle_fk)).one()
            bundles[c.bundle_fk] = (row.key, row.version_id)
        key, version = bundles[c.bundle_fk]
        copy = frame_verified(lambda: tier.open_range(  # type: ignore[attr-defined]
            key, c.frame_offset, c.frame_length, version_id=version), c.frame_length, c.size,
            c.sha256, scratch / "backfill", suffix=".backfill.tmp")
        f = open(copy.path, "rb")
        os.unlink(copy.path)           # read through the open handle; nothing left behind
        return f

    return open_frame
