"""Fixtures for the catalog conformance suite: one test body, every catalog backend.

``catalog_url`` is parametrized: SQLite (a file in tmp_path, the embedded
default) and PostgreSQL (marker ``needs_pg``: a real server on loopback, one per
test session, and a fresh database per test). Under CI=true a missing PostgreSQL
fails the PostgreSQL half instead of skipping it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support import pg


@pytest.fixture
def pg_url(pg_server: pg.PgServer) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    url = pg_server.create_database()
    yield url
    try:
        pg_server.drop_database(url)
    except Exception:  # a leftover database dies with the server's directory
        pass


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.needs_pg)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog' / 'catalog.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def dialect(catalog_url: str) -> str:
    return "sqlite" if catalog_url.startswith("sqlite") else "postgresql"
