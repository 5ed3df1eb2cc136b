"""Alembic environment: the engine is handed in by archive.catalog.engine."""
from alembic import context

from archive.catalog.models import Base

engine = context.config.attributes["engine"]
sqlite = engine.dialect.name == "sqlite"
with engine.connect() as connection:
    if sqlite:
        # Batch mode rebuilds a table (copy, drop, rename). With foreign keys on,
        # SQLite refuses to drop a table other rows point at, and the pragma is
        # ignored inside a transaction: switch it off first, check after, restore.
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        with connection.begin():
            context.configure(connection=connection, target_metadata=Base.metadata,
                              render_as_batch=sqlite)
            with context.begin_transaction():
                context.run_migrations()
            if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                raise RuntimeError("catalog migration left rows pointing at nothing")
    finally:
        if sqlite:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
