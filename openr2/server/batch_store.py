"""The batch half of the ledger: batches and their lines, from validation to the output files.

A mixin of `Ledger` (ledger.py), sharing its connection, transactions and file blobs. Each line's
progress is a row, so a worker killed mid-batch resumes with nothing lost and nothing run or billed twice
(see ledger.py on durability).

Several replicas on one PostgreSQL database share the queue: `claim_pending` takes lines with row locks
that skip what another replica is claiming, and marks them with this process's id and a lease. The
process's heartbeat (Ledger.heartbeat) renews the lease; a line whose lease lapsed (its replica died) goes
back to pending at the next claim by anyone. Two replicas that both end up running one line (a replica
that was only slow) are harmless: the first completion wins, and the usage table's unique (batch_id,
custom_id) bills it once. Every read-then-write on a batch or a line locks the row it read
(db.lock), so two replicas never both validate, finalise or complete the same thing.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection

from openr2.engine.usage import Usage
from openr2.server.db import retry_conflicts
from openr2.server.errors import decode_json

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETION_WINDOWS_S = {"24h": 24 * 3600}
MAX_BATCH_LINES = 50_000
MAX_CUSTOM_ID_CHARS = 64
ACTIVE_BATCH_STATES = ("validating", "in_progress", "finalizing", "cancelling")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class BatchStateError(ValueError):
    """The batch is in a state that does not allow the operation (the HTTP layer answers 409)."""


class BatchStore:
    """Batch methods of Ledger; they use its _db, _tx, _query, _now, _lease_until, replica_id, _read_blob,
    _write_blob, _delete_blob, _insert_file, _insert_usage and _page."""

    def create_batch(self, key_id: str, input_file_id: str, endpoint: str, completion_window: str = "24h",
                     metadata: dict | None = None) -> dict:
        """A batch in `validating`; the worker's validate_batch reads its lines (uploads may be large)."""
        if endpoint not in BATCH_ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, got {endpoint!r}")
        if completion_window not in COMPLETION_WINDOWS_S:
            raise ValueError(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS_S)}, "
                             f"got {completion_window!r}")
        _check_metadata(metadata)
        batch_id, now = new_id("batch_"), self._now()
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

    @retry_conflicts
    def validate_batch(self, batch_id: str, models: Collection[str] | None = None) -> dict:
        """validating -> in_progress with one pending row per line, or -> failed with errors.data listing
        the bad lines. A no-op in any other state, so it is safe to call again after a restart."""
        row = self._batch_row(batch_id)
        if row["status"] == "validating":
            content = self._read_blob(row["input_file_id"])
            requests, errors, model = _parse_batch_input(content, row["endpoint"], models)
            if errors:
                return self.fail_batch(batch_id, errors)
            with self._tx() as db:
                if db.execute(f"SELECT status FROM batches WHERE id = ?{self._db.lock}",
                              (batch_id,)).fetchone()[0] == "validating":
                    db.executemany("INSERT INTO batch_requests (batch_id, custom_id, line, id, body, state)"
                                   " VALUES (?,?,?,?,?,'pending')",
                                   [(batch_id, cid, line, new_id("batch_req_"), body) for line, cid, body in requests])
                    db.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ?, model = ?"
                               " WHERE id = ?", (self._now(), model, batch_id))
        return self._batch_obj(self._batch_row(batch_id))

    def fail_batch(self, batch_id: str, errors: list[dict]) -> dict:
        """validating -> failed with errors.data (OpenAI's {code, line, message, param}); a no-op in any
        other state."""
        with self._tx() as db:
            db.execute("UPDATE batches SET status = 'failed', failed_at = ?, errors = ? WHERE id = ? AND"
                       " status = 'validating'", (self._now(), json.dumps(errors), batch_id))
        return self._batch_obj(self._batch_row(batch_id))

    @retry_conflicts
    def claim_pending(self, batch_id: str, n: int) -> list[dict]:
        """Mark up to n pending lines running, held by this process under a lease, and return them ({id,
        custom_id, body}) in file order. Lines whose holder's lease lapsed are pending again first.
        Returns [] unless the batch is in_progress and inside its completion window."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        with self._tx() as db:
            # FOR SHARE: claims run side by side, but not beside a cancel or finalize of the batch
            b = db.execute(f"SELECT status, expires_at FROM batches WHERE id = ?{self._db.share_lock}",
                           (batch_id,)).fetchone()
            if b is None or b["status"] != "in_progress" or self._now() >= b["expires_at"]:
                return []
            self._reclaim_lapsed(db, batch_id)
            rows = db.execute("SELECT custom_id, id, body FROM batch_requests WHERE batch_id = ? AND"
                              f" state = 'pending' ORDER BY line LIMIT ?{self._db.lock}{self._db.skip_locked}",
                              (batch_id, n)).fetchall()
            db.executemany("UPDATE batch_requests SET state = 'running', claimed_by = ?, lease_until = ?"
                           " WHERE batch_id = ? AND custom_id = ?",
                           [(self.replica_id, self._lease_until(), batch_id, r["custom_id"]) for r in rows])
        return [{"id": r["id"], "custom_id": r["custom_id"], "body": json.loads(r["body"])} for r in rows]

    @retry_conflicts
    def complete_request(self, batch_id: str, custom_id: str, status_code: int, body: dict, request_id: str,
                         usage=None, cost: int = 0, usage_source: str | None = None) -> bool:
        """Record one line's response and, when `usage` is given, its bill (cost = prices.cost(usage,
        batch=True)) in one transaction. False, with nothing written, if the line was already finished:
        the first completion wins and a duplicate is never billed."""
        if isinstance(status_code, bool) or not isinstance(status_code, int):
            raise ValueError(f"status_code must be an integer, got {status_code!r}")
        with self._tx() as db:
            r = db.execute("SELECT r.state, r.body, b.key_id, b.endpoint, b.model FROM batch_requests r"
                           " JOIN batches b ON b.id = r.batch_id WHERE r.batch_id = ? AND r.custom_id = ?"
                           f"{self._db.lock and self._db.lock + ' OF r'}", (batch_id, custom_id)).fetchone()
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
                                          cost, request_id, batch_id, custom_id, content, usage_source):
                    raise ValueError(f"request_id {request_id!r} is already billed")  # rolls the line back
        return True

    def reset_in_flight(self) -> int:
        """Call once at startup, before any worker: lines claimed by a dead process go back to pending
        (their results were never committed, so they were never billed). Returns how many. A SQLite ledger
        has one server, so every running line was the dead one's; on a shared database only the lines whose
        lease lapsed are (the others belong to live replicas)."""
        with self._tx() as db:
            if self._db.shared:
                return self._reclaim_lapsed(db)
            return db.execute("UPDATE batch_requests SET state = 'pending', claimed_by = NULL, lease_until = NULL"
                              " WHERE state = 'running'").rowcount

    @retry_conflicts
    def release_claims(self) -> int:
        """At shutdown: the lines this process holds go back to pending now, for the other replicas to run,
        rather than when the lease lapses (a line finished meanwhile stays finished). Returns how many."""
        with self._tx() as db:
            return db.execute("UPDATE batch_requests SET state = 'pending', claimed_by = NULL, lease_until = NULL"
                              " WHERE claimed_by = ? AND state = 'running'", (self.replica_id,)).rowcount

    def _reclaim_lapsed(self, db, batch_id: str | None = None) -> int:
        """Running lines whose holder stopped renewing its lease -> pending."""
        where, args = "state = 'running' AND lease_until <= ?", [self._now()]
        if batch_id is not None:
            where, args = "batch_id = ? AND " + where, [batch_id, *args]
        return db.execute("UPDATE batch_requests SET state = 'pending', claimed_by = NULL, lease_until = NULL"
                          f" WHERE {where}", args).rowcount

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
        rows = self._query("SELECT * FROM batch_requests WHERE batch_id = ? ORDER BY line", (batch_id,))
        if any(r["state"] in ("done", "failed") and r["response"] is None for r in rows):
            # another replica finalised it since its status was read (the responses go with that commit)
            b = self._batch_row(batch_id)
            return self._batch_obj(b) if b["status"] not in ACTIVE_BATCH_STATES else None
        out, err = [], []
        for r in rows:
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
                files[kind] = (new_id("file-"), ("\n".join(lines) + "\n").encode())
                self._write_blob(*files[kind])
        with self._tx() as db:
            if db.execute(f"SELECT status FROM batches WHERE id = ?{self._db.lock}",
                          (batch_id,)).fetchone()[0] == final:
                committed = False  # another caller finished it first
            elif db.execute("SELECT 1 FROM batch_requests WHERE batch_id = ? AND state = 'running' LIMIT 1",
                            (batch_id,)).fetchone():
                committed = False  # a replica claimed lines since they were read: finalise later
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
                self._delete_blob(file_id)
            if self._batch_row(batch_id)["status"] != final:
                return None
        else:  # the bodies may linger in the database's own files: clear them there too
            self._db.scrub()
        return self._batch_obj(self._batch_row(batch_id))

    @retry_conflicts
    def cancel_batch(self, key_id: str, batch_id: str) -> dict | None:
        """validating/in_progress -> cancelling (-> cancelled at once if nothing is running). None if this
        key has no such batch; BatchStateError if it already ended otherwise."""
        with self._tx() as db:
            b = db.execute(f"SELECT status FROM batches WHERE id = ? AND key_id = ?{self._db.lock}",
                           (batch_id, key_id)).fetchone()
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
        u = self._query("SELECT CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(cached_prompt_tokens) AS BIGINT),"
                        " CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(reasoning_tokens) AS BIGINT)"
                        " FROM usage WHERE batch_id = ?", (b["id"],))[0]
        prompt, cached, completion, reasoning = (int(x or 0) for x in u)
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
            obj = decode_json(raw)
        except json.JSONDecodeError:
            error(i, "invalid_json", "line is not valid JSON")
            continue
        except ValueError as e:  # valid JSON the server cannot take: nested too deeply, or not Unicode
            error(i, "invalid_request", f"line: {e}", getattr(e, "param", None))
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
