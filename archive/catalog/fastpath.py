"""The ingest hot path's SQL, on a bare DBAPI connection.

Every C-STORE runs a handful of tiny statements. Through SQLAlchemy each cost
about 0.3 ms of Python (compilation cache keys, result processing, session
bookkeeping) against 0.03 ms in SQLite itself; under four associations that
Python, holding the GIL, was the daemon's ceiling (measured in
docs/performance.md). These few statements are therefore written once here, for
both dialects; everything else uses SQLAlchemy. Values are always bound, never
formatted into SQL. Timestamps are stored exactly as SQLAlchemy stores them, so
the ORM reads these rows back unchanged.
"""
from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone
from typing import Any

import psycopg
from sqlalchemy import exc as sa_exc

# What callers catch: a unique/foreign-key violation (a concurrent writer won), and
# any other database failure (locked, gone, disk full).
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError, sa_exc.IntegrityError)
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error, sa_exc.DBAPIError, sa_exc.OperationalError)


def _begin_immediate(cur: Any, patience_s: float = 60.0) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write lock in short steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25... ms between tries,
    while a worker's commit holds the lock for about one flush (under 1 ms): with
    two workers committing, a waiting worker overslept by several ms each time."""
    cur.execute("PRAGMA busy_timeout = 0")
    try:
        deadline = time.monotonic() + patience_s
        pause = 0.0001
        while True:
            try:
                cur.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 1.5, 0.002)
    finally:
        cur.execute("PRAGMA busy_timeout = 60000")


class RawTx:
    def __init__(self, dbapi_conn: Any, dialect: str) -> None:
        self.conn = dbapi_conn
        self.sqlite = dialect == "sqlite"
        self.cur = dbapi_conn.cursor()

    def _sql(self, sql: str) -> str:
        return sql if self.sqlite else sql.replace("?", "%s")

    def _ts(self, t: datetime) -> Any:
        if not self.sqlite:
            return t
        # SQLAlchemy's SQLite DateTime storage format (naive UTC).
        return t.astimezone(timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")

    def one(self, sql: str, params: tuple) -> Any:
        self.cur.execute(self._sql(sql), params)
        row = self.cur.fetchone()
        return None if row is None else row[0]

    def row(self, sql: str, params: tuple) -> tuple | None:
        self.cur.execute(self._sql(sql), params)
        return self.cur.fetchone()

    def begin(self) -> None:
        if self.sqlite:
            # Take the write lock up front: a deferred transaction that read and then
            # found another writer's commit fails with SQLITE_BUSY_SNAPSHOT at once.
            _begin_immediate(self.cur)

    def commit(self) -> None:
        self.conn.commit()

    # -- statements ------------------------------------------------------------
    def versions_settled(self, sop_uid: str) -> list[tuple[int, str, int, bool]]:
        """(version, sha256, instance id, settled) of each stored version. Not settled:
        committed while its copies were being written (ingest_in_flight) and not
        confirmed since, so the row alone does not prove the bytes are kept."""
        self.cur.execute(self._sql(
            "SELECT i.version, i.sha256, i.id, NOT EXISTS (SELECT 1 FROM ingest_in_flight f "
            "WHERE f.instance_fk = i.id) FROM instances i WHERE i.sop_uid = ?"), (sop_uid,))
        return [(int(v), s, int(i), bool(settled)) for v, s, i, settled in self.cur.fetchall()]

    def instance_id(self, sop_uid: str, sha256: str) -> int | None:
        found = self.one("SELECT id FROM instances WHERE sop_uid = ? AND sha256 = ?",
                         (sop_uid, sha256))
        return None if found is None else int(found)

    def copy_key(self, instance_fk: int) -> str | None:
        return self.one("SELECT key FROM copies WHERE instance_fk = ? AND bundle_fk IS NULL "
                        "ORDER BY id", (instance_fk,))

    def mark_in_flight(self, instance_fk: int, now: datetime) -> None:
        self.cur.execute(self._sql(
            "INSERT INTO ingest_in_flight (instance_fk, started_at) VALUES (?, ?)"),
            (instance_fk, self._ts(now)))

    def settle(self, instance_fk: int, *, verified: list[str], failed: list[str],
               now: datetime) -> None:
        """The copies' outcome once they are written: failed ones go to the repair
        queue, ones verified by a re-send become 'ok'; the instance is no longer in
        flight."""
        if verified:
            self.cur.executemany(self._sql(
                "UPDATE copies SET state = 'ok', verified_at = ? "
                "WHERE instance_fk = ? AND location = ? AND bundle_fk IS NULL"),
                [(self._ts(now), instance_fk, loc) for loc in verified])
        if failed:
            self.cur.executemany(self._sql(
                "UPDATE copies SET state = 'missing', verified_at = NULL "
                "WHERE instance_fk = ? AND location = ? AND bundle_fk IS NULL"),
                [(instance_fk, loc) for loc in failed])
        self.cur.execute(self._sql("DELETE FROM ingest_in_flight WHERE instance_fk = ?"),
                         (instance_fk,))

    def delete_instance(self, instance_fk: int) -> bool:
        """Undo a row whose copies failed: it was never acknowledged. Only while it is
        still in flight: a re-send that confirmed it meanwhile was answered on it."""
        if self.one("SELECT 1 FROM ingest_in_flight WHERE instance_fk = ?",
                    (instance_fk,)) is None:
            return False
        for table, column in (("ingest_in_flight", "instance_fk"), ("copies", "instance_fk"),
                              ("instances", "id")):
            self.cur.execute(self._sql(f"DELETE FROM {table} WHERE {column} = ?"),
                             (instance_fk,))
        return True

    def versions_of(self, sop_uid: str) -> list[tuple[int, str]]:
        self.cur.execute(self._sql("SELECT version, sha256 FROM instances WHERE sop_uid = ?"),
                         (sop_uid,))
        return [(int(v), s) for v, s in self.cur.fetchall()]

    def ensure_patient(self, patient_id: str, issuer: str, name: str, birth_date: str,
                       sex: str, name_fold: str = "") -> int:
        q = "SELECT id FROM patients WHERE patient_id = ? AND issuer = ?"
        found = self.one(q, (patient_id, issuer))
        if found is None:
            self.cur.execute(self._sql(
                "INSERT INTO patients (patient_id, issuer, name, birth_date, sex, name_fold) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                (patient_id, issuer, name, birth_date, sex, name_fold))
            found = self.one(q, (patient_id, issuer))
        return int(found)

    def ensure_study(self, study_uid: str, patient_fk: int, now: datetime, study_date: str,
                     study_time: str, accession: str, description: str, calling_ae: str, *,
                     study_id: str = "", referring_physician: str = "",
                     referring_physician_fold: str = "") -> int:
        # The query attributes are written as "" when absent, never NULL: NULL means
        # "not read yet" to archive/catalog/backfill_query.py.
        q = "SELECT id FROM studies WHERE study_uid = ?"
        found = self.one(q, (study_uid,))
        if found is None:
            self.cur.execute(self._sql(
                "INSERT INTO studies (study_uid, patient_fk, study_date, study_time, accession, "
                "description, calling_ae, first_received_at, last_received_at, study_id, "
                "referring_physician, referring_physician_fold) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                (study_uid, patient_fk, study_date, study_time, accession, description,
                 calling_ae, self._ts(now), self._ts(now), study_id, referring_physician,
                 referring_physician_fold))
            found = self.one(q, (study_uid,))
        return int(found)

    def touch_study(self, study_fk: int, now: datetime) -> None:
        self.cur.execute(self._sql("UPDATE studies SET last_received_at = ? WHERE id = ?"),
                         (self._ts(now), study_fk))

    def ensure_series(self, series_uid: str, study_fk: int, modality: str,
                      series_number: str, *, description: str = "", series_date: str = "",
                      series_time: str = "") -> tuple[int, bool]:
        """The study's row for this series UID, and whether the UID is also used by
        another study (then both rows are flagged uid_reused)."""
        q = "SELECT id, uid_reused FROM series WHERE study_fk = ? AND series_uid = ?"
        found = self.row(q, (study_fk, series_uid))
        if found is None:
            elsewhere = self.one("SELECT id FROM series WHERE series_uid = ? AND study_fk <> ? "
                                 "LIMIT 1", (series_uid, study_fk)) is not None
            self.cur.execute(self._sql(
                "INSERT INTO series (series_uid, study_fk, modality, series_number, uid_reused, "
                "series_description, series_date, series_time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                (series_uid, study_fk, modality, series_number, elsewhere, description,
                 series_date, series_time))
            if elsewhere:
                self.cur.execute(self._sql("UPDATE series SET uid_reused = ? WHERE series_uid = ?"),
                                 (True, series_uid))
            found = self.row(q, (study_fk, series_uid))
        return int(found[0]), bool(found[1])

    def insert_instance(self, *, sop_uid: str, version: int, series_fk: int, study_fk: int,
                        sop_class: str, transfer_syntax: str, size: int, sha256: str,
                        received_at: datetime, calling_ae: str, conflict: bool,
                        instance_number: str = "") -> int:
        return int(self.one(
            "INSERT INTO instances (sop_uid, version, series_fk, study_fk, sop_class, "
            "transfer_syntax, size, sha256, received_at, calling_ae, conflict, instance_number) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (sop_uid, version, series_fk, study_fk, sop_class, transfer_syntax, size, sha256,
             self._ts(received_at), calling_ae, conflict, instance_number)))

    def insert_copies(self, rows: list[tuple[int, str, str, str, datetime | None]]) -> None:
        self.cur.executemany(self._sql(
            "INSERT INTO copies (instance_fk, location, key, state, verified_at) "
            "VALUES (?, ?, ?, ?, ?)"),
            [(i, loc, key, state, None if at is None else self._ts(at))
             for i, loc, key, state, at in rows])
