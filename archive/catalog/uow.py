"""Unit of work: leaving the ``with`` block rolls back unless commit() ran."""
from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


class Catalog:
    """Holds the engine and hands out units of work (one per logical change)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def unit(self) -> "UnitOfWork":
        return UnitOfWork(self._sessions)

    def close(self) -> None:
        self.engine.dispose()


class UnitOfWork:
    def __init__(self, factory: sessionmaker) -> None:
        self._factory = factory
        self.session: Session

    def __enter__(self) -> "UnitOfWork":
        self.session = self._factory()
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.rollback()
        self.session.close()

    def commit(self) -> None:
        self.session.commit()
