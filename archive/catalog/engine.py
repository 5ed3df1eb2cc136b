"""Engine creation and schema migration (Alembic). No I/O at import."""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).parent / "migrations"


def _private_db_file(db: Path) -> None:
    """The catalog holds names, IDs, birth dates and password hashes: its directory
    is 0750 and the file 0640 whatever the umask. SQLite creates -wal and -shm with
    the database file's mode, so creating (or tightening) the file here covers them."""
    if not db.parent.exists():
        db.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.chmod(db.parent, 0o750)          # mkdir's mode is cut by the umask only
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640))
        os.chmod(db, 0o640)
    except FileExistsError:
        mode = os.stat(db).st_mode & 0o777
        if mode & 0o037:                    # an install from before: close it to others
            try:
                os.chmod(db, mode & 0o740)
            except PermissionError:
                pass                        # not ours (a shared read-only catalog)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            _private_db_file(Path(path.split("?", 1)[0]))
        engine = create_engine(url, connect_args={"timeout": 60}, pool_size=8, max_overflow=32)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            # Let SQLAlchemy, not pysqlite, decide when transactions begin (see _begin).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # WAL: readers never block the writer; synchronous=FULL: a committed
            # catalog row survives power loss, as the C-STORE success promises.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:  # noqa: ANN001
            # A deferred transaction that reads, then writes after another process
            # committed, fails at once with SQLITE_BUSY_SNAPSHOT (no busy wait), which
            # would refuse a C-STORE. Writers ask for the lock up front instead.
            if conn.get_execution_options().get("sqlite_write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("BEGIN")

        return engine
    return create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)


def _alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest version (idempotent)."""
    from alembic import command

    command.upgrade(_alembic_config(engine), "head")


def schema_is_current(engine: Engine) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        current = MigrationContext.configure(conn).get_current_heads()
    head = ScriptDirectory.from_config(_alembic_config(engine)).get_heads()
    return set(current) == set(head)
