"""Unit of work: leaving the ``with`` block rolls back unless commit() ran."""
from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


class Catalog:
    """Holds the engine and hands out units of work (one per logical change)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def unit(self, write: bool = False) -> "UnitOfWork":
        """A unit of work; ``write=True`` takes SQLite's write lock when it begins."""
        return UnitOfWork(self._sessions, write)

    def close(self) -> None:
        self.engine.dispose()


class UnitOfWork:
    def __init__(self, factory: sessionmaker, write: bool = False) -> None:
        self._factory = factory
        self._write = write
        self.session: Session

    def __enter__(self) -> "UnitOfWork":
        self.session = self._factory()
        if self._write:
            self.session.connection(execution_options={"sqlite_write": True})
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.rollback()
        self.session.close()

    def commit(self) -> None:
        self.session.commit()
