"""One connection to the ledger's database, SQLite (a file) or PostgreSQL (a URL), behind the few calls the
stores make: `tx()` (a write transaction), `query()` (one read), and the handful of SQL words that differ.

The stores write their SQL once with `?` placeholders; the PostgreSQL side turns them into psycopg's `%s`.
Rows answer both by name and by position on both sides. What differs, and why:

  * Locking. SQLite has one writer at a time (BEGIN IMMEDIATE takes the file's write lock up front), so a
    read-then-write inside `tx()` is already serialised. PostgreSQL runs transactions concurrently (READ
    COMMITTED): such a read must lock what it reads (`lock`: FOR UPDATE, `share_lock`: FOR SHARE,
    `skip_locked` for a shared queue, `lock_name` for a per-key advisory lock), or two replicas both act on
    what they read. Row locks can deadlock; PostgreSQL then aborts one transaction, which retry_conflicts
    runs again.
  * `shared`: whether other servers may use the same database at once. With SQLite one server owns the
    file, so at startup it takes back every claim a previous process left; on PostgreSQL only lapsed ones.
  * Schema versions: SQLite keeps PRAGMA user_version (as ledgers before PostgreSQL did); PostgreSQL a
    schema_version table, migrated under an advisory lock so that replicas starting together migrate once.

Threads. One connection shared under a lock; each call is one short transaction, as ledger.py explains.
A PostgreSQL connection that drops (a database restart, a network cut) is replaced at the next call: a read
or a transaction that had not begun is sent again on the new one; one that broke mid-way fails (its caller
retries, as for any error: nothing was committed).
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from openr2.server import schema

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_MIGRATION_LOCK = 0x6F70656E7232  # "openr2": the advisory lock id under which a replica migrates


def is_postgres_url(target) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def retry_conflicts(method):
    """Run a Ledger method again (up to 3 times in all) when PostgreSQL aborted its transaction as a deadlock
    victim or a serialization failure: such a transaction was rolled back whole, so running it again is
    exactly once. (Not on a dropped connection: a commit may have landed without its answer.)"""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        for attempt in range(3):
            try:
                return method(self, *args, **kwargs)
            except self._db.conflict_errors:
                if attempt == 2:
                    raise

    return run


class SQLiteDatabase:
    dialect, shared = "sqlite", False
    conflict_errors: tuple = ()  # one writer at a time: no deadlock between transactions
    lock = share_lock = skip_locked = ""  # the write lock is already held
    day_sql = "date({}, 'unixepoch')"

    def __init__(self, path: Path, timeout_s: float = 30.0):
        self.path = path
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so a write transaction takes the write
        # lock up front instead of failing half-way when another process writes.
        self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ValueError(f"{path}: cannot enable WAL journal (got {mode}); is it on a network filesystem?")
        self._db.execute("PRAGMA synchronous=FULL")
        # privacy: overwrite deleted or replaced content with zeros, so cleared batch bodies (and revoked
        # rows) do not linger in free space of the file (see scrub)
        self._db.execute("PRAGMA secure_delete=ON")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def lock_name(self, db, name: str) -> None:
        """Serialise transactions that touch `name` (the write lock already does)."""

    def scrub(self) -> None:
        """After clearing content: the WAL still holds the pages with it; copy them back and empty it."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def migrate(self) -> None:
        with self.tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            _check_version(version, self.path)
            for v in range(version + 1, schema.SCHEMA_VERSION + 1):
                for stmt in schema.statements(v, self.dialect):
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION}")


class _Row(tuple):
    """A row read by position or by column name, and dict(row) gives {name: value} (like sqlite3.Row)."""

    _names: dict[str, int]

    def __getitem__(self, key):
        return tuple.__getitem__(self, self._names[key] if isinstance(key, str) else key)

    def keys(self):
        return list(self._names)


def _row_factory(cursor):
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    cls = type("Row", (_Row,), {"_names": names})
    return lambda values: cls(values)


class _PGConnection:
    """psycopg's connection speaking the stores' `?` placeholders."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, args=()):
        return self._conn.execute(_pg_sql(sql), tuple(args))

    def executemany(self, sql: str, rows):
        with self._conn.cursor() as cur:
            cur.executemany(_pg_sql(sql), [tuple(r) for r in rows])
            return cur


def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresDatabase:
    dialect, shared = "postgresql", True
    lock, share_lock, skip_locked = " FOR UPDATE", " FOR SHARE", " SKIP LOCKED"
    day_sql = "to_char(to_timestamp({}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:  # a dependency of openr2, but say what is missing rather than a bare traceback
            raise ValueError("--database-url postgresql://... needs psycopg 3: pip install 'psycopg[binary]'") from None
        self.url, self._psycopg = url, psycopg
        self.conflict_errors = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
        self._lock = threading.RLock()
        self._conn = None
        self._connect()

    def _connect(self):
        try:
            # autocommit: each statement outside tx() commits; tx() opens an explicit transaction
            self._conn = self._psycopg.connect(self.url, autocommit=True, row_factory=_row_factory)
        except self._psycopg.Error as e:
            raise ValueError(f"cannot connect to the database {_redact(self.url)}: {e}".strip()) from None
        return self._conn

    def _live(self):
        """The connection, opened again if the last one broke (a PostgreSQL restart, a dropped link)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[_PGConnection]:
        with self._lock:
            tx = self._begin()
            try:
                yield _PGConnection(self._conn)
            except BaseException as e:
                if not tx.__exit__(type(e), e, e.__traceback__):
                    raise
            else:
                tx.__exit__(None, None, None)

    def _begin(self):
        """A started transaction; a connection found dead at BEGIN (nothing sent yet) is replaced once."""
        for attempt in (0, 1):
            tx = self._live().transaction()
            try:
                tx.__enter__()
                return tx
            except self._psycopg.OperationalError:
                if attempt or not self._conn.broken:
                    raise
                self._connect()

    def query(self, sql: str, args=()) -> list:
        with self._lock:
            for attempt in (0, 1):
                try:
                    return self._live().execute(_pg_sql(sql), tuple(args)).fetchall()
                except self._psycopg.OperationalError:  # a read: safe to send again on a new connection
                    if attempt or not self._conn.broken:
                        raise
                    self._connect()

    def lock_name(self, db, name: str) -> None:
        """Serialise transactions that touch `name` until this one ends (an advisory transaction lock)."""
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (name,))

    def scrub(self) -> None:
        """Cleared content lingers in dead row versions until VACUUM reuses their space; the cluster's
        autovacuum does that (there is no WAL checkpoint to force as with SQLite)."""

    def migrate(self) -> None:
        with self.tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] or 0
            _check_version(version, _redact(self.url))
            for v in range(version + 1, schema.SCHEMA_VERSION + 1):
                for stmt in schema.statements(v, self.dialect):
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (v,))


class DatabaseClock:
    """Wall-clock time read on the database server's clock, for what replicas compare across processes (batch
    line leases, reservation leases, rate-limit windows): a replica whose own clock is off would otherwise take
    live replicas' lines as lapsed, or count a key's window from the wrong edge. Not a round trip per reading:
    `sync` measures the offset between `clock` and the server's clock_timestamp() (to within half a round
    trip), and readings are `clock()` plus it; call `sync` now and then (the ledger's heartbeat does), so that
    the drift of the local clock since does not add up."""

    def __init__(self, db: PostgresDatabase, clock=time.time):
        self._db, self.base, self.offset = db, clock, 0.0
        self.sync()

    def sync(self) -> None:
        before = self.base()
        (db_now,) = self._db.query("SELECT EXTRACT(EPOCH FROM clock_timestamp())")[0]
        after = self.base()
        self.offset = float(db_now) - (before + after) / 2

    def __call__(self) -> float:
        return self.base() + self.offset


def _check_version(version: int, where) -> None:
    if version > schema.SCHEMA_VERSION:
        raise ValueError(f"{where}: schema version {version} is newer than this openr2 "
                         f"({schema.SCHEMA_VERSION}); upgrade openr2")


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{creds}{at}{host}"
