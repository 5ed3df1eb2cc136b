"""After a migration: fill the query attributes of objects already stored, from
the online sites (archive/catalog/backfill_query.py). Objects only on the object
tier or on DR volumes stay NULL: they are found by the keys stored before, not
by the new ones, until they are recalled and this runs again."""
from __future__ import annotations

from typing import Callable

from archive.app.compose import open_sites
from archive.catalog.backfill_query import BackfillReport, backfill_query_attributes
from archive.catalog.uow import Catalog
from archive.config.schema import Settings


def backfill_from_sites(settings: Settings, catalog: Catalog,
                        progress: Callable[[BackfillReport], None] | None = None
                        ) -> BackfillReport:
    sources = {site.name: site.open for site in open_sites(settings)}
    return backfill_query_attributes(catalog, sources, progress=progress)
