"""The server's durable state in one SQLite file: usage rows, hashed API keys, files, batches.

Owns the schema and every query; file contents live beside the database under data_dir/files/<id>.
It does not compute prices (billing.py), parse HTTP, or run models: a batch worker drives the batch
methods (validate_batch -> claim_pending -> complete_request -> finalize_batch) and calls
reset_in_flight() once at startup.

Durability. WAL journal with synchronous=FULL: each commit waits for one fsync of the WAL. A commit is
one request's bill (or one batch line plus its bill), so that fsync is small next to generating the
tokens, and it buys survival of power loss, not just of a killed process. A finished batch line and its
usage row commit in one transaction, and the usage table is unique on (batch_id, custom_id) and on
request_id, so a resumed batch can neither lose a line nor bill one twice.

Threads. One connection shared under a lock; each public method is one short transaction. SQLite
serialises writers anyway, and a single connection keeps transactions simple. From async code the calls
block for about a millisecond (plus the fsync on writes); run them in a thread if that matters. Other
processes (the `openr2 keys`/`usage` CLI) may open the same file at the same time: WAL lets them read
while the server writes, and busy_timeout makes writers wait instead of failing.

Privacy. Prompt and completion text are stored only when opened with log_content=True. Batch request
and response bodies are kept only until the batch is finalised; then the output file is the record
(secure_delete and a WAL checkpoint then clear them from the database file's bytes too).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from openr2.server.billing import Usage, format_usd

SCHEMA_VERSION = 1
KEY_PREFIX = "sk-openr2-"
KEY_RANDOM_CHARS = 32
KEY_LOOKUP_CHARS = 8  # first random chars, stored in clear to find the row; 48 of 192 bits
PBKDF2_ITERATIONS = 1_000  # keys are 192 random bits: the hash only hides them, no stretching needed
FILE_PURPOSES = ("batch", "batch_output", "user_data", "assistants", "fine-tune", "vision", "evals")
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETION_WINDOWS_S = {"24h": 24 * 3600}
MAX_BATCH_LINES = 50_000
MAX_CUSTOM_ID_CHARS = 64
ACTIVE_BATCH_STATES = ("validating", "in_progress", "finalizing", "cancelling")

_SCHEMA = """
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, lookup TEXT NOT NULL, salt BLOB NOT NULL,
    hash BLOB NOT NULL, iterations INTEGER NOT NULL, created_at INTEGER NOT NULL, revoked_at INTEGER);
CREATE INDEX api_keys_lookup ON api_keys(lookup);
CREATE TABLE usage (
    id INTEGER PRIMARY KEY, created_at INTEGER NOT NULL, request_id TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, batch INTEGER NOT NULL,
    batch_id TEXT, custom_id TEXT, prompt_tokens INTEGER NOT NULL, cached_prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    cost_pico_usd INTEGER NOT NULL, content TEXT, UNIQUE (batch_id, custom_id));
CREATE INDEX usage_time ON usage(created_at);
CREATE TABLE files (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL);
CREATE INDEX files_key ON files(key_id);
CREATE TABLE batches (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, model TEXT, metadata TEXT, errors TEXT,
    output_file_id TEXT, error_file_id TEXT, created_at INTEGER NOT NULL, expires_at INTEGER,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER);
CREATE INDEX batches_key ON batches(key_id);
CREATE TABLE batch_requests (
    batch_id TEXT NOT NULL, custom_id TEXT NOT NULL, line INTEGER NOT NULL, id TEXT NOT NULL,
    body TEXT, state TEXT NOT NULL, status_code INTEGER, request_id TEXT, response TEXT,
    PRIMARY KEY (batch_id, custom_id));
CREATE INDEX batch_requests_state ON batch_requests(batch_id, state, line);
"""
_MIGRATIONS: dict[int, str] = {}  # version -> SQL that upgrades from version - 1 (none yet)


class BatchStateError(ValueError):
    """The batch is in a state that does not allow the operation (the HTTP layer answers 409)."""


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _hash_secret(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


class Ledger:
    """SQLite-backed state of one server. `key_id` scopes files, batches and usage: pass the verified key's
    id, or any fixed string (e.g. "local") when the server runs without keys."""

    def __init__(self, path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 log_content: bool = False, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.data_dir = Path(data_dir) if data_dir is not None else self.path.parent
        self.log_content = log_content
        self._clock = clock
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "files").mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so a write transaction takes the write
        # lock up front instead of failing half-way when another process writes.
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ValueError(f"{self.path}: cannot enable WAL journal (got {mode}); is it on a network filesystem?")
        self._db.execute("PRAGMA synchronous=FULL")
        # privacy: overwrite deleted or replaced content with zeros, so cleared batch bodies (and revoked
        # rows) do not linger in free space of the file (see finalize_batch for the WAL)
        self._db.execute("PRAGMA secure_delete=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _now(self) -> int:
        return int(self._clock())

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ValueError(f"{self.path}: schema version {version} is newer than this openr2 "
                                 f"({SCHEMA_VERSION}); upgrade openr2")
            if version == 0:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            else:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in _MIGRATIONS[v].split(";"):
                        if stmt.strip():
                            db.execute(stmt)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---------------------------------------------------------------- API keys

    def create_key(self, name: str) -> tuple[str, str]:
        """A new key: (key_id, secret). The secret is returned once and only its salted hash is kept."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("name must be a non-empty string")
        secret = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_CHARS * 3 // 4)
        assert len(secret) == len(KEY_PREFIX) + KEY_RANDOM_CHARS
        key_id, salt = _new_id("key_"), secrets.token_bytes(16)
        lookup = secret[len(KEY_PREFIX):len(KEY_PREFIX) + KEY_LOOKUP_CHARS]
        with self._tx() as db:
            db.execute("INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,NULL)",
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
        rows = self._query("SELECT id, name, lookup, created_at, revoked_at FROM api_keys ORDER BY rowid")
        return [{"id": r["id"], "name": r["name"], "prefix": f"{KEY_PREFIX}{r['lookup']}...",
                 "created_at": r["created_at"], "revoked_at": r["revoked_at"]} for r in rows]

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

    def record_usage(self, key_id: str, model: str, endpoint: str, usage, batch: bool, cost: int,
                     request_id: str, batch_id: str | None = None, custom_id: str | None = None,
                     content: dict | str | None = None) -> bool:
        """One billed request. False (nothing written) if this request_id or (batch_id, custom_id) is
        already billed, which makes billing safe to retry. `content` is dropped unless log_content."""
        with self._tx() as db:
            return self._insert_usage(db, key_id, model, endpoint, Usage.of(usage), batch, cost, request_id,
                                      batch_id, custom_id, content)

    def _insert_usage(self, db, key_id, model, endpoint, usage: Usage, batch, cost, request_id, batch_id,
                      custom_id, content) -> bool:
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
            " prompt_tokens, cached_prompt_tokens, completion_tokens, reasoning_tokens, cost_pico_usd, content)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (self._now(), request_id, key_id, model, endpoint, int(bool(batch)), batch_id, custom_id,
             usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens, usage.reasoning_tokens,
             cost, content))
        return cur.rowcount == 1

    def usage_report(self, start: int | None = None, end: int | None = None, group_by: str | None = None,
                     key_id: str | None = None) -> list[dict]:
        """Totals over start <= created_at < end (Unix seconds, None = open), optionally per UTC day, key
        or model, optionally for one key. Costs are exact pico-dollar sums plus a formatted string."""
        groups = {None: "NULL", "day": "date(u.created_at, 'unixepoch')", "key": "u.key_id", "model": "u.model"}
        if group_by not in groups:
            raise ValueError(f"group_by must be one of day, key, model or None, got {group_by!r}")
        where, args = [], []
        for cond, value in (("u.created_at >= ?", start), ("u.created_at < ?", end), ("u.key_id = ?", key_id)):
            if value is not None:
                where.append(cond)
                args.append(value)
        rows = self._query(
            f"SELECT {groups[group_by]} AS grp, MAX(k.name) AS key_name, COUNT(*) AS requests,"
            " TOTAL(u.batch) AS batch_requests, SUM(u.prompt_tokens) AS prompt_tokens,"
            " SUM(u.cached_prompt_tokens) AS cached_prompt_tokens, SUM(u.completion_tokens) AS completion_tokens,"
            " SUM(u.reasoning_tokens) AS reasoning_tokens, SUM(u.cost_pico_usd) AS cost_pico_usd"
            " FROM usage u LEFT JOIN api_keys k ON k.id = u.key_id"
            f" {'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY grp ORDER BY grp", args)
        out = []
        for r in rows:
            if r["requests"] == 0:  # an ungrouped aggregate over no rows still yields one row of NULLs
                continue
            item = {} if group_by is None else {{"key": "key_id"}.get(group_by, group_by): r["grp"]}
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
        """Temp file + fsync + rename + directory fsync: the file is whole or absent after a crash."""
        final = self._file_path(file_id)
        tmp = final.with_name(f".{file_id}.tmp")
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _insert_file(self, db, file_id: str, key_id: str, filename: str, purpose: str, size: int) -> dict:
        row = (file_id, key_id, filename, purpose, size, self._now(), "processed")
        db.execute("INSERT INTO files VALUES (?,?,?,?,?,?,?)", row)
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
        file_id = _new_id("file-")
        self._write_blob(file_id, bytes(content))
        with self._tx() as db:
            return self._insert_file(db, file_id, key_id, filename, purpose, len(content))

    def get_file(self, key_id: str, file_id: str) -> dict | None:
        rows = self._query("SELECT * FROM files WHERE id = ? AND key_id = ?", (file_id, key_id))
        return _file_obj(dict(rows[0])) if rows else None

    def file_path(self, key_id: str, file_id: str) -> Path | None:
        """Where the content is (for streaming it back), or None if this key has no such file."""
        return self._file_path(file_id) if self.get_file(key_id, file_id) else None

    def read_file(self, key_id: str, file_id: str) -> bytes | None:
        path = self.file_path(key_id, file_id)
        return path.read_bytes() if path else None

    def list_files(self, key_id: str, purpose: str | None = None, after: str | None = None,
                   limit: int = 10_000, order: str = "desc") -> tuple[list[dict], bool]:
        """(files, has_more), newest first by default; `after` is the last id of the previous page."""
        return self._page("files", key_id, after, limit, order, _file_obj,
                          ("purpose = ?", purpose) if purpose is not None else None)

    def delete_file(self, key_id: str, file_id: str) -> bool:
        with self._tx() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND key_id = ?", (file_id, key_id)).rowcount
        if deleted:
            self._file_path(file_id).unlink(missing_ok=True)
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

    def create_batch(self, key_id: str, input_file_id: str, endpoint: str, completion_window: str = "24h",
                     metadata: dict | None = None) -> dict:
        """A batch in `validating`; the worker's validate_batch reads its lines (uploads may be large)."""
        if endpoint not in BATCH_ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, got {endpoint!r}")
        if completion_window not in COMPLETION_WINDOWS_S:
            raise ValueError(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS_S)}, "
                             f"got {completion_window!r}")
        _check_metadata(metadata)
        batch_id, now = _new_id("batch_"), self._now()
        with self._tx() as db:
            f = db.execute("SELECT purpose FROM files WHERE id = ? AND key_id = ?", (input_file_id, key_id)).fetchone()
            if f is None:
                raise ValueError(f"input_file_id: no file {input_file_id!r}")
            if f["purpose"] != "batch":
                raise ValueError(f"input_file_id: file {input_file_id!r} has purpose {f['purpose']!r}, not 'batch'")
            db.execute("INSERT INTO batches (id, key_id, endpoint, input_file_id, completion_window, status,"
                       " metadata, created_at, expires_at) VALUES (?,?,?,?,?,'validating',?,?,?)",
                       (batch_id, key_id, endpoint, input_file_id, completion_window,
                        json.dumps(metadata) if metadata is not None else None, now,
                        now + COMPLETION_WINDOWS_S[completion_window]))
        return self.get_batch(key_id, batch_id)

    def validate_batch(self, batch_id: str, models: Collection[str] | None = None) -> dict:
        """validating -> in_progress with one pending row per line, or -> failed with errors.data listing
        the bad lines. A no-op in any other state, so it is safe to call again after a restart."""
        row = self._batch_row(batch_id)
        if row["status"] == "validating":
            path = self._file_path(row["input_file_id"])
            content = path.read_bytes() if path.is_file() else None
            requests, errors, model = _parse_batch_input(content, row["endpoint"], models)
            now = self._now()
            with self._tx() as db:
                if db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()[0] == "validating":
                    if errors:
                        db.execute("UPDATE batches SET status = 'failed', failed_at = ?, errors = ? WHERE id = ?",
                                   (now, json.dumps(errors), batch_id))
                    else:
                        db.executemany("INSERT INTO batch_requests (batch_id, custom_id, line, id, body, state)"
                                       " VALUES (?,?,?,?,?,'pending')",
                                       [(batch_id, cid, line, _new_id("batch_req_"), body)
                                        for line, cid, body in requests])
                        db.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ?, model = ?"
                                   " WHERE id = ?", (now, model, batch_id))
        return self._batch_obj(self._batch_row(batch_id))

    def claim_pending(self, batch_id: str, n: int) -> list[dict]:
        """Mark up to n pending lines running and return them ({id, custom_id, body}) in file order.
        Returns [] unless the batch is in_progress and inside its completion window."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        with self._tx() as db:
            b = db.execute("SELECT status, expires_at FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if b is None or b["status"] != "in_progress" or self._now() >= b["expires_at"]:
                return []
            rows = db.execute("SELECT custom_id, id, body FROM batch_requests WHERE batch_id = ? AND"
                              " state = 'pending' ORDER BY line LIMIT ?", (batch_id, n)).fetchall()
            db.executemany("UPDATE batch_requests SET state = 'running' WHERE batch_id = ? AND custom_id = ?",
                           [(batch_id, r["custom_id"]) for r in rows])
        return [{"id": r["id"], "custom_id": r["custom_id"], "body": json.loads(r["body"])} for r in rows]

    def complete_request(self, batch_id: str, custom_id: str, status_code: int, body: dict, request_id: str,
                         usage=None, cost: int = 0) -> bool:
        """Record one line's response and, when `usage` is given, its bill (cost = prices.cost(usage,
        batch=True)) in one transaction. False, with nothing written, if the line was already finished:
        the first completion wins and a duplicate is never billed."""
        if isinstance(status_code, bool) or not isinstance(status_code, int):
            raise ValueError(f"status_code must be an integer, got {status_code!r}")
        with self._tx() as db:
            r = db.execute("SELECT r.state, r.body, b.key_id, b.endpoint, b.model FROM batch_requests r"
                           " JOIN batches b ON b.id = r.batch_id WHERE r.batch_id = ? AND r.custom_id = ?",
                           (batch_id, custom_id)).fetchone()
            if r is None:
                raise ValueError(f"custom_id: batch {batch_id!r} has no line {custom_id!r}")
            if r["state"] not in ("pending", "running"):
                return False
            state = "done" if 200 <= status_code < 300 else "failed"
            db.execute("UPDATE batch_requests SET state = ?, status_code = ?, request_id = ?, response = ?"
                       " WHERE batch_id = ? AND custom_id = ?",
                       (state, status_code, request_id, json.dumps(body), batch_id, custom_id))
            if usage is not None:
                content = {"request": json.loads(r["body"]), "response": body} if self.log_content else None
                if not self._insert_usage(db, r["key_id"], r["model"], r["endpoint"], Usage.of(usage), True,
                                          cost, request_id, batch_id, custom_id, content):
                    raise ValueError(f"request_id {request_id!r} is already billed")  # rolls the line back
        return True

    def reset_in_flight(self) -> int:
        """Call once at startup, before any worker: lines claimed by a dead process go back to pending
        (their results were never committed, so they were never billed). Returns how many."""
        with self._tx() as db:
            return db.execute("UPDATE batch_requests SET state = 'pending' WHERE state = 'running'").rowcount

    def finalize_batch(self, batch_id: str) -> dict | None:
        """Write the output/error files and end the batch (completed, cancelled or expired), once no line
        is running and none is left to run (or it was cancelled, or its window passed). None if not yet."""
        b = self._batch_row(batch_id)
        if b["status"] not in ("in_progress", "finalizing", "cancelling"):
            return self._batch_obj(b) if b["status"] not in ACTIVE_BATCH_STATES else None
        states = dict(self._query("SELECT state, COUNT(*) FROM batch_requests WHERE batch_id = ? GROUP BY state",
                                  (batch_id,)))
        now = self._now()
        if states.get("running"):
            return None
        if b["status"] == "cancelling":
            final, leftover = "cancelled", "batch_cancelled"
        elif states.get("pending"):
            if now < b["expires_at"]:
                return None
            final, leftover = "expired", "batch_expired"
        else:
            final, leftover = "completed", None
            with self._tx() as db:  # visible while the files are written
                db.execute("UPDATE batches SET status = 'finalizing', finalizing_at = ? WHERE id = ? AND"
                           " status = 'in_progress'", (now, batch_id))
        out, err = [], []
        for r in self._query("SELECT * FROM batch_requests WHERE batch_id = ? ORDER BY line", (batch_id,)):
            line = {"id": r["id"], "custom_id": r["custom_id"], "response": None, "error": None}
            if r["state"] in ("done", "failed"):
                line["response"] = {"status_code": r["status_code"], "request_id": r["request_id"],
                                    "body": json.loads(r["response"])}
            else:
                line["error"] = {"code": leftover, "message": f"the batch was {final} before this request ran"}
            (out if r["state"] == "done" else err).append(json.dumps(line, ensure_ascii=False))
        # Blobs first, rows after (one transaction): a crash in between leaves only orphan blobs, and the
        # next finalize_batch starts over.
        files = {}
        for kind, lines in (("output", out), ("error", err)):
            if lines:
                files[kind] = (_new_id("file-"), ("\n".join(lines) + "\n").encode())
                self._write_blob(*files[kind])
        with self._tx() as db:
            if db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()[0] == final:
                committed = False  # another caller finished it first
            else:
                committed = True
                for kind, (file_id, data) in files.items():
                    self._insert_file(db, file_id, b["key_id"], f"{batch_id}_{kind}.jsonl", "batch_output", len(data))
                if leftover:
                    db.execute("UPDATE batch_requests SET state = ? WHERE batch_id = ? AND state = 'pending'",
                               (final, batch_id))
                db.execute("UPDATE batch_requests SET body = NULL, response = NULL WHERE batch_id = ?", (batch_id,))
                db.execute(f"UPDATE batches SET status = ?, {final}_at = ?, output_file_id = ?, error_file_id = ?"
                           " WHERE id = ?", (final, now, files.get("output", (None,))[0],
                                             files.get("error", (None,))[0], batch_id))
        if not committed:
            for file_id, _ in files.values():
                self._file_path(file_id).unlink(missing_ok=True)
        else:  # the WAL still holds the pages with the bodies: copy them back and empty it
            with self._lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return self._batch_obj(self._batch_row(batch_id))

    def cancel_batch(self, key_id: str, batch_id: str) -> dict | None:
        """validating/in_progress -> cancelling (-> cancelled at once if nothing is running). None if this
        key has no such batch; BatchStateError if it already ended otherwise."""
        with self._tx() as db:
            b = db.execute("SELECT status FROM batches WHERE id = ? AND key_id = ?", (batch_id, key_id)).fetchone()
            if b is None:
                return None
            if b["status"] in ("validating", "in_progress"):
                db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ?",
                           (self._now(), batch_id))
            elif b["status"] not in ("cancelling", "cancelled"):
                raise BatchStateError(f"status: batch {batch_id} is {b['status']} and cannot be cancelled")
        return self.finalize_batch(batch_id) or self.get_batch(key_id, batch_id)

    def get_batch(self, key_id: str, batch_id: str) -> dict | None:
        rows = self._query("SELECT * FROM batches WHERE id = ? AND key_id = ?", (batch_id, key_id))
        return self._batch_obj(rows[0]) if rows else None

    def list_batches(self, key_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """(batches, has_more), newest first; `after` is the last id of the previous page."""
        return self._page("batches", key_id, after, limit, "desc", self._batch_obj)

    def batch_owner(self, batch_id: str) -> str:
        """The key that created the batch: its lines run, and are billed, as that key."""
        return self._batch_row(batch_id)["key_id"]

    def list_active_batches(self) -> list[str]:
        """Ids of every key's unfinished batches, oldest first: what a worker resumes after a restart."""
        marks = ",".join("?" * len(ACTIVE_BATCH_STATES))
        return [r[0] for r in self._query(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY rowid",
                                          ACTIVE_BATCH_STATES)]

    def _batch_row(self, batch_id: str) -> dict:
        rows = self._query("SELECT * FROM batches WHERE id = ?", (batch_id,))
        if not rows:
            raise ValueError(f"batch_id: no batch {batch_id!r}")
        return dict(rows[0])

    def _batch_obj(self, b) -> dict:
        b = dict(b)
        states = dict(self._query("SELECT state, COUNT(*) FROM batch_requests WHERE batch_id = ? GROUP BY state",
                                  (b["id"],)))
        u = self._query("SELECT TOTAL(prompt_tokens), TOTAL(cached_prompt_tokens), TOTAL(completion_tokens),"
                        " TOTAL(reasoning_tokens) FROM usage WHERE batch_id = ?", (b["id"],))[0]
        prompt, cached, completion, reasoning = (int(x) for x in u)
        obj = {"id": b["id"], "object": "batch", "endpoint": b["endpoint"],
               "errors": {"object": "list", "data": json.loads(b["errors"])} if b["errors"] else None,
               "input_file_id": b["input_file_id"], "completion_window": b["completion_window"],
               "status": b["status"], "output_file_id": b["output_file_id"], "error_file_id": b["error_file_id"]}
        for t in ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                  "expired_at", "cancelling_at", "cancelled_at"):
            obj[t] = b[t]
        obj["request_counts"] = {"total": sum(states.values()), "completed": states.get("done", 0),
                                 "failed": sum(states.get(s, 0) for s in ("failed", "cancelled", "expired"))}
        obj["metadata"] = json.loads(b["metadata"]) if b["metadata"] else None
        obj["model"] = b["model"]
        obj["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                        "total_tokens": prompt + completion}
        return obj


def _check_metadata(metadata) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise ValueError("metadata must be an object of at most 16 pairs")
    for k, v in metadata.items():
        if not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise ValueError(f"metadata: keys must be strings of at most 64 chars and values of at most 512, "
                             f"got {k!r}")


def _parse_batch_input(content: bytes | None, endpoint: str, models: Collection[str] | None):
    """Input JSONL -> ([(line, custom_id, body json)], errors, model). Errors use OpenAI's
    {code, line, message, param} shape; the first 100 are kept."""
    errors: list[dict] = []

    def error(line, code, message, param=None):
        errors.append({"code": code, "line": line, "message": message, "param": param})

    if content is None:
        error(None, "file_not_found", "the input file was deleted", "input_file_id")
        return [], errors, None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        error(None, "invalid_file", "the input file is not UTF-8", "input_file_id")
        return [], errors, None
    requests, seen, model = [], set(), None
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            error(i, "invalid_json", "line is not valid JSON")
            continue
        if not isinstance(obj, dict):
            error(i, "invalid_request", "line must be a JSON object")
            continue
        cid, body = obj.get("custom_id"), obj.get("body")
        if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID_CHARS:
            error(i, "invalid_custom_id", f"custom_id must be a string of 1-{MAX_CUSTOM_ID_CHARS} chars", "custom_id")
            continue
        if cid in seen:
            error(i, "duplicate_custom_id", f"custom_id {cid!r} appears more than once", "custom_id")
            continue
        seen.add(cid)
        if obj.get("method") != "POST":
            error(i, "invalid_method", "method must be POST", "method")
        if obj.get("url") != endpoint:
            error(i, "invalid_url", f"url must equal the batch endpoint {endpoint}", "url")
        if not isinstance(body, dict):
            error(i, "invalid_request", "body must be a JSON object", "body")
            continue
        if body.get("stream"):
            error(i, "invalid_request", "stream is not allowed in batch requests", "body.stream")
        m = body.get("model")
        if not isinstance(m, str) or not m:
            error(i, "invalid_request", "body.model is required", "body.model")
        elif models is not None and m not in models:
            error(i, "model_not_found", f"model {m!r} is not served here", "body.model")
        elif model is None:
            model = m
        elif m != model:
            error(i, "mismatched_model", f"all lines must use one model ({model!r}), got {m!r}", "body.model")
        requests.append((i, cid, json.dumps(body)))
    if len(requests) > MAX_BATCH_LINES:
        error(None, "too_many_requests", f"a batch holds at most {MAX_BATCH_LINES} requests")
    if not requests and not errors:
        error(None, "empty_file", "the input file has no requests", "input_file_id")
    return requests, errors[:100], model


def _file_obj(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"]}
