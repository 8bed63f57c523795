"""The server's durable state: usage rows, hashed API keys, files, batches; in one SQLite file (the embedded
default) or in a PostgreSQL database that several server replicas share.

Owns every query (the batch queries in batch_store.py and the prepaid balances in balance_store.py, mixins
of Ledger); the schema and its migrations are schema.py, the two backends' differences db.py. With SQLite,
file contents live beside the database under data_dir/files/<id>; with PostgreSQL, in the database (replicas
share no disk). The same SQL and the same unique keys serve both, so a line is billed once however many
replicas race for it (batch_store.py on the shared queue, balance_store.py on the balances).
It does not compute prices (openr2/billing.py), parse HTTP, or run models: a batch worker drives the batch
methods (validate_batch -> claim_pending -> complete_request -> finalize_batch) and calls
reset_in_flight() once at startup.

Durability. WAL journal with synchronous=FULL: each commit waits for one fsync of the WAL. A commit is
one request's bill (or one batch line plus its bill), so that fsync is small next to generating the
tokens, and it buys survival of power loss, not just of a killed process. A finished batch line and its
usage row commit in one transaction, and the usage table is unique on (batch_id, custom_id) and on
request_id, so a resumed batch can neither lose a line nor bill one twice.

Durability on PostgreSQL is the cluster's (synchronous_commit on by default: a commit is on its disk).

Threads. One connection shared under a lock; each public method is one short transaction. SQLite
serialises writers anyway, and a single connection keeps transactions simple. From async code the calls
block for about a millisecond (plus the fsync on writes); run them in a thread if that matters. Other
processes (the `openr2 keys`/`usage` CLI) may open the same file at the same time: WAL lets them read
while the server writes, and busy_timeout makes writers wait instead of failing.

Privacy. Prompt and completion text are stored only when opened with log_content=True. Batch request
and response bodies are kept only until the batch is finalised; then the output file is the record
(secure_delete and a WAL checkpoint then clear them from the database file's bytes too; on PostgreSQL the
old row versions stay in the cluster's files until autovacuum reuses their space). Keys are stored as
salted hashes on both backends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from openr2.billing import format_usd
from openr2.engine.usage import Usage
from openr2.server.balance_store import BalanceStore, InsufficientBalance  # noqa: F401 (re-exported)
from openr2.server.batch_store import (  # noqa: F401 (re-exported: the ledger's public names)
    ACTIVE_BATCH_STATES,
    BatchStateError,
    BatchStore,
    new_id,
)
from openr2.server.db import DatabaseClock, PostgresDatabase, SQLiteDatabase, is_postgres_url, retry_conflicts
from openr2.server.private_files import open_private, private_dir, private_file
from openr2.server.ratelimit import RateLimiter
from openr2.server.schema import SCHEMA_VERSION, statements  # noqa: F401 (SCHEMA_VERSION re-exported)
from openr2.server.shared_ratelimit import SharedRateLimiter

KEY_PREFIX = "sk-openr2-"
KEY_RANDOM_CHARS = 32
KEY_LOOKUP_CHARS = 8  # first random chars, stored in clear to find the row; 48 of 192 bits
PBKDF2_ITERATIONS = 1_000  # keys are 192 random bits: the hash only hides them, no stretching needed
FILE_PURPOSES = ("batch", "batch_output", "user_data", "assistants", "fine-tune", "vision", "evals")
DEFAULT_LEASE_S = 30.0
# where a bill's token counts came from: this process's engine, the gateway's upstream, or the gateway's own
# count with the tokenizer (an upstream that did not report them, or an answer cut midway)
USAGE_SOURCES = ("engine", "upstream", "local")
USAGE_GROUPS = ("day", "key", "model", "source")
_SCHEMA = ";\n".join(statements(1, "sqlite")) + ";"  # version 1 on SQLite (tests build old ledgers)


def _hash_secret(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


class Ledger(BatchStore, BalanceStore):
    """The durable state of one server, or of several replicas sharing one PostgreSQL database. `key_id`
    scopes files, batches and usage: pass the verified key's id, or any fixed string (e.g. "local") when
    the server runs without keys.

    `target` is a SQLite file path (file contents then live under data_dir/files) or a postgresql:// URL
    (file contents in the database: replicas share no disk). `lease_s`: how long batch lines and balance
    reservations this process holds stay its own without a `heartbeat()`; past that another replica (or
    this one restarted) takes them back.

    `clock`: wall-clock seconds. On a shared database it is read on the database server's clock (db.DatabaseClock,
    `db_clock`), so that replicas whose clocks disagree still agree on when a lease lapses; by default unless a
    clock is given (tests drive their own)."""

    def __init__(self, target: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 log_content: bool = False, clock: Callable[[], float] | None = None,
                 lease_s: float = DEFAULT_LEASE_S, db_clock: bool | None = None):
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s!r}")
        self.log_content, self.lease_s = log_content, float(lease_s)
        self._clock = clock or time.time
        self.replica_id = new_id("replica_")  # who holds this process's claims
        self._closing: list = []
        if is_postgres_url(target):
            self.path, self.data_dir = None, None
            self._db = PostgresDatabase(target)
        else:
            self.path = Path(target)
            self.data_dir = Path(data_dir) if data_dir is not None else self.path.parent
            for folder in (self.path.parent, self.data_dir, self.data_dir / "files"):
                private_dir(folder)
            # SQLite gives the -wal and -shm it creates the database file's mode; ones left by an older
            # version are tightened here
            private_file(self.path)
            for extra in ("-wal", "-shm"):
                private_file(self.path.with_name(self.path.name + extra), create=False)
            self._db = SQLiteDatabase(self.path)
        try:
            self._db.migrate()
            if self._db.shared and (clock is None if db_clock is None else db_clock):
                self._clock = DatabaseClock(self._db, self._clock)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        for other in self._closing:
            other.close()
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _now(self) -> int:
        return int(self._clock())

    def _lease_until(self) -> int:
        return math.ceil(self._clock() + self.lease_s)

    def _tx(self):
        return self._db.tx()

    def _query(self, sql: str, args=()) -> list:
        return self._db.query(sql, args)

    def rate_limiter(self, requests_per_min: int | None, tokens_per_min: int | None):
        """The server's per-key limiter: in memory for the one server of a SQLite ledger; counted in the
        database (on a connection of its own) when replicas share it, so that the limit holds across them."""
        if not self._db.shared or not (requests_per_min or tokens_per_min):
            return RateLimiter(requests_per_min, tokens_per_min)
        db = PostgresDatabase(self._db.url)
        clock = DatabaseClock(db, self._clock.base) if isinstance(self._clock, DatabaseClock) else self._clock
        limiter = SharedRateLimiter(db, requests_per_min, tokens_per_min, clock=clock)
        self._closing.append(limiter)
        return limiter

    @retry_conflicts
    def heartbeat(self) -> None:
        """Renew this process's claims (call every lease_s / 3 or so) and drop reservations whose holder
        stopped renewing them (a replica that died)."""
        if isinstance(self._clock, DatabaseClock):
            self._clock.sync()
        until, now = self._lease_until(), self._now()
        with self._tx() as db:
            db.execute("UPDATE batch_requests SET lease_until = ? WHERE claimed_by = ? AND state = 'running'",
                       (until, self.replica_id))
            db.execute("UPDATE reservations SET lease_until = ? WHERE owner = ?", (until, self.replica_id))
            db.execute("DELETE FROM reservations WHERE lease_until <= ?", (now,))

    # ---------------------------------------------------------------- API keys

    def create_key(self, name: str) -> tuple[str, str]:
        """A new key: (key_id, secret). The secret is returned once and only its salted hash is kept."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("name must be a non-empty string")
        secret = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_CHARS * 3 // 4)
        assert len(secret) == len(KEY_PREFIX) + KEY_RANDOM_CHARS
        key_id, salt = new_id("key_"), secrets.token_bytes(16)
        lookup = secret[len(KEY_PREFIX):len(KEY_PREFIX) + KEY_LOOKUP_CHARS]
        with self._tx() as db:
            db.execute("INSERT INTO api_keys (id, name, lookup, salt, hash, iterations, created_at)"
                       " VALUES (?,?,?,?,?,?,?)",
                       (key_id, name.strip(), lookup, salt, _hash_secret(secret, salt, PBKDF2_ITERATIONS),
                        PBKDF2_ITERATIONS, self._now()))
        return key_id, secret

    def verify_key(self, secret: str) -> str | None:
        """The id of the live key with this secret, else None."""
        if not isinstance(secret, str) or not secret.startswith(KEY_PREFIX) \
                or len(secret) != len(KEY_PREFIX) + KEY_RANDOM_CHARS:
            return None
        lookup = secret[len(KEY_PREFIX):len(KEY_PREFIX) + KEY_LOOKUP_CHARS]
        rows = self._query("SELECT id, salt, hash, iterations FROM api_keys "
                           "WHERE lookup = ? AND revoked_at IS NULL", (lookup,))
        if not rows:  # hash anyway, so an unknown lookup prefix costs the same time as a wrong secret
            _hash_secret(secret, b"\0" * 16, PBKDF2_ITERATIONS)
        for row in rows:  # more than one only on a 48-bit lookup collision
            if hmac.compare_digest(_hash_secret(secret, row["salt"], row["iterations"]), row["hash"]):
                return row["id"]
        return None

    def list_keys(self) -> list[dict]:
        rows = self._query("SELECT id, name, lookup, created_at, revoked_at, balance_pico_usd FROM api_keys"
                           " ORDER BY rowid")
        return [{"id": r["id"], "name": r["name"], "prefix": f"{KEY_PREFIX}{r['lookup']}...",
                 "created_at": r["created_at"], "revoked_at": r["revoked_at"],
                 **({} if r["balance_pico_usd"] is None else {"balance_usd": format_usd(r["balance_pico_usd"])})}
                for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        """True if a live key was revoked. The row stays so usage reports can still name it."""
        with self._tx() as db:
            cur = db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                             (self._now(), key_id))
        return cur.rowcount == 1

    def has_keys(self) -> bool:
        """Whether any live key exists (the server can require auth exactly when this is true)."""
        return bool(self._query("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1"))

    # ---------------------------------------------------------------- usage

    @retry_conflicts
    def record_usage(self, key_id: str, model: str, endpoint: str, usage, batch: bool, cost: int,
                     request_id: str, batch_id: str | None = None, custom_id: str | None = None,
                     content: dict | str | None = None, usage_source: str | None = None) -> bool:
        """One billed request. False (nothing written) if this request_id or (batch_id, custom_id) is
        already billed, which makes billing safe to retry. `content` is dropped unless log_content.
        `usage_source`: where the token counts came from (USAGE_SOURCES; None: not said)."""
        with self._tx() as db:
            return self._insert_usage(db, key_id, model, endpoint, Usage.of(usage), batch, cost, request_id,
                                      batch_id, custom_id, content, usage_source)

    def _insert_usage(self, db, key_id, model, endpoint, usage: Usage, batch, cost, request_id, batch_id,
                      custom_id, content, usage_source=None) -> bool:
        if usage_source is not None and usage_source not in USAGE_SOURCES:
            raise ValueError(f"usage_source must be one of {', '.join(USAGE_SOURCES)} or None, got {usage_source!r}")
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost must be a non-negative integer of pico-dollars, got {cost!r}")
        for name, value in (("key_id", key_id), ("model", model), ("endpoint", endpoint),
                            ("request_id", request_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if (batch_id is None) != (custom_id is None):
            raise ValueError("batch_id and custom_id go together")
        if content is not None and self.log_content:
            content = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        else:
            content = None
        cur = db.execute(
            "INSERT INTO usage (created_at, request_id, key_id, model, endpoint, batch, batch_id, custom_id,"
            " prompt_tokens, cached_prompt_tokens, completion_tokens, reasoning_tokens, cost_pico_usd, content,"
            " usage_source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (self._now(), request_id, key_id, model, endpoint, int(bool(batch)), batch_id, custom_id,
             usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens, usage.reasoning_tokens,
             cost, content, usage_source))
        self._settle(db, key_id, request_id, cost, billed=cur.rowcount == 1)  # a prepaid balance pays
        return cur.rowcount == 1

    def usage_report(self, start: int | None = None, end: int | None = None, group_by: str | None = None,
                     key_id: str | None = None) -> list[dict]:
        """Totals over start <= created_at < end (Unix seconds, None = open), optionally per UTC day, key
        model or usage source ("source": engine, upstream, local; null for rows from before it was recorded),
        optionally for one key. Costs are exact pico-dollar sums plus a formatted string."""
        groups = {None: "CAST(NULL AS TEXT)", "day": self._db.day_sql.format("u.created_at"), "key": "u.key_id",
                  "model": "u.model", "source": "u.usage_source"}
        if group_by not in groups:
            raise ValueError(f"group_by must be one of {', '.join(USAGE_GROUPS)} or None, got {group_by!r}")
        where, args = [], []
        for cond, value in (("u.created_at >= ?", start), ("u.created_at < ?", end), ("u.key_id = ?", key_id)):
            if value is not None:
                where.append(cond)
                args.append(value)
        rows = self._query(
            f"SELECT {groups[group_by]} AS grp, MAX(k.name) AS key_name, COUNT(*) AS requests,"
            f" {_sum('u.batch')} AS batch_requests, {_sum('u.prompt_tokens')} AS prompt_tokens,"
            f" {_sum('u.cached_prompt_tokens')} AS cached_prompt_tokens,"
            f" {_sum('u.completion_tokens')} AS completion_tokens, {_sum('u.reasoning_tokens')} AS reasoning_tokens,"
            f" {_sum('u.cost_pico_usd')} AS cost_pico_usd"
            " FROM usage u LEFT JOIN api_keys k ON k.id = u.key_id"
            f" {'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY grp ORDER BY grp", args)
        out = []
        for r in rows:
            if r["requests"] == 0:  # an ungrouped aggregate over no rows still yields one row of NULLs
                continue
            item = {} if group_by is None else {{"key": "key_id", "source": "usage_source"}.get(group_by, group_by): r["grp"]}
            if group_by == "key":
                item["key_name"] = r["key_name"]
            item.update({name: r[name] for name in ("requests", "prompt_tokens", "cached_prompt_tokens",
                                                    "completion_tokens", "reasoning_tokens", "cost_pico_usd")})
            item["batch_requests"] = int(r["batch_requests"])
            item["cache_miss_tokens"] = item["prompt_tokens"] - item["cached_prompt_tokens"]
            item["cost_usd"] = format_usd(item["cost_pico_usd"])
            out.append(item)
        return out

    # ---------------------------------------------------------------- files

    def _file_path(self, file_id: str) -> Path:
        return self.data_dir / "files" / file_id

    def _write_blob(self, file_id: str, content: bytes) -> None:
        """Temp file + fsync + rename + directory fsync: the file is whole or absent after a crash. On a
        shared database, a row of file_blobs (committed: as durable as the rest)."""
        if self._db.shared:
            with self._tx() as db:
                db.execute("INSERT INTO file_blobs (id, content) VALUES (?, ?)", (file_id, content))
            return
        final = self._file_path(file_id)
        tmp = final.with_name(f".{file_id}.tmp")
        with open_private(tmp) as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read_blob(self, file_id: str) -> bytes | None:
        if self._db.shared:
            rows = self._query("SELECT content FROM file_blobs WHERE id = ?", (file_id,))
            return bytes(rows[0][0]) if rows else None
        path = self._file_path(file_id)
        return path.read_bytes() if path.is_file() else None

    def _delete_blob(self, file_id: str) -> None:
        if self._db.shared:
            with self._tx() as db:
                db.execute("DELETE FROM file_blobs WHERE id = ?", (file_id,))
        else:
            self._file_path(file_id).unlink(missing_ok=True)

    def _insert_file(self, db, file_id: str, key_id: str, filename: str, purpose: str, size: int) -> dict:
        row = (file_id, key_id, filename, purpose, size, self._now(), "processed")
        db.execute("INSERT INTO files (id, key_id, filename, purpose, bytes, created_at, status)"
                   " VALUES (?,?,?,?,?,?,?)", row)
        return _file_obj(dict(zip(("id", "key_id", "filename", "purpose", "bytes", "created_at", "status"), row)))

    def create_file(self, key_id: str, filename: str, purpose: str, content: bytes) -> dict:
        """Store an upload; returns OpenAI's FileObject. Content is on disk before the row exists, so a
        crash leaves at most an orphan blob, never a row without its bytes."""
        if purpose not in FILE_PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}")
        if not isinstance(filename, str) or not filename or len(filename) > 255 or "\0" in filename:
            raise ValueError(f"filename must be a non-empty name of at most 255 chars, got {filename!r}")
        if not isinstance(content, (bytes, bytearray)):
            raise ValueError("file content must be bytes")
        file_id = new_id("file-")
        self._write_blob(file_id, bytes(content))
        with self._tx() as db:
            return self._insert_file(db, file_id, key_id, filename, purpose, len(content))

    def get_file(self, key_id: str, file_id: str) -> dict | None:
        rows = self._query("SELECT * FROM files WHERE id = ? AND key_id = ?", (file_id, key_id))
        return _file_obj(dict(rows[0])) if rows else None

    def file_path(self, key_id: str, file_id: str) -> Path | None:
        """Where the content is on disk (for streaming it back), or None if this key has no such file or
        the content lives in the database (read_file then)."""
        return self._file_path(file_id) if not self._db.shared and self.get_file(key_id, file_id) else None

    def read_file(self, key_id: str, file_id: str) -> bytes | None:
        return self._read_blob(file_id) if self.get_file(key_id, file_id) else None

    def list_files(self, key_id: str, purpose: str | None = None, after: str | None = None,
                   limit: int = 10_000, order: str = "desc") -> tuple[list[dict], bool]:
        """(files, has_more), newest first by default; `after` is the last id of the previous page."""
        return self._page("files", key_id, after, limit, order, _file_obj,
                          ("purpose = ?", purpose) if purpose is not None else None)

    def delete_file(self, key_id: str, file_id: str) -> bool:
        with self._tx() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND key_id = ?", (file_id, key_id)).rowcount
        if deleted:
            self._delete_blob(file_id)
        return bool(deleted)

    def _page(self, table, key_id, after, limit, order, to_obj, extra=None) -> tuple[list[dict], bool]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        where, args = ["key_id = ?"], [key_id]
        if extra:
            where.append(extra[0])
            args.append(extra[1])
        if after is not None:
            cmp = "<" if order == "desc" else ">"
            where.append(f"rowid {cmp} (SELECT rowid FROM {table} WHERE id = ? AND key_id = ?)")
            args += [after, key_id]
        rows = self._query(f"SELECT * FROM {table} WHERE {' AND '.join(where)} "
                           f"ORDER BY rowid {order.upper()} LIMIT ?", [*args, limit + 1])
        return [to_obj(dict(r)) for r in rows[:limit]], len(rows) > limit

    # ---------------------------------------------------------------- batches

def usage_source(*outputs) -> str:
    """Where outputs' token counts came from, for their ledger row: the gateway marks its outputs (an upstream's
    report or its own count, gateway.py); the in-process engine counted them itself. Outputs billed together
    (a batch line's prompts) are "upstream" only if every count came from the upstream."""
    sources = {getattr(output, "usage_source", None) or "engine" for output in outputs}
    return sources.pop() if len(sources) == 1 else "local"


def _sum(column: str) -> str:
    """SUM as a 64-bit integer on both backends (PostgreSQL's SUM of BIGINT is NUMERIC)."""
    return f"CAST(SUM({column}) AS BIGINT)"


def _file_obj(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"]}
