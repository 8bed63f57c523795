"""The ledger's schema as one numbered list of migrations, written once for SQLite and PostgreSQL.

Version 1 is the first schema; migration v upgrades v - 1 to v. Both backends run the same list (a new
database runs all of it), so a version number means the same tables everywhere. The SQL is written with a
few type words that differ between the two ({int}, {blob}, {serial_pk}) and a {rowid} column that
PostgreSQL needs because it has no SQLite rowid (listings page in insertion order). Where the version is
kept, and how two processes are kept from migrating at once, is the backend's business (db.py).
"""

from __future__ import annotations

SCHEMA_VERSION = 4

_TYPES = {
    "sqlite": {"int": "INTEGER", "blob": "BLOB", "serial_pk": "INTEGER PRIMARY KEY", "rowid": ""},
    "postgresql": {"int": "BIGINT", "blob": "BYTEA", "serial_pk": "BIGSERIAL PRIMARY KEY",
                   "rowid": ", rowid BIGSERIAL"},
}

_V1 = """
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, lookup TEXT NOT NULL, salt {blob} NOT NULL,
    hash {blob} NOT NULL, iterations {int} NOT NULL, created_at {int} NOT NULL, revoked_at {int}{rowid});
CREATE INDEX api_keys_lookup ON api_keys(lookup);
CREATE TABLE usage (
    id {serial_pk}, created_at {int} NOT NULL, request_id TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, batch {int} NOT NULL,
    batch_id TEXT, custom_id TEXT, prompt_tokens {int} NOT NULL, cached_prompt_tokens {int} NOT NULL,
    completion_tokens {int} NOT NULL, reasoning_tokens {int} NOT NULL,
    cost_pico_usd {int} NOT NULL, content TEXT, UNIQUE (batch_id, custom_id));
CREATE INDEX usage_time ON usage(created_at);
CREATE TABLE files (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes {int} NOT NULL, created_at {int} NOT NULL, status TEXT NOT NULL{rowid});
CREATE INDEX files_key ON files(key_id);
CREATE TABLE batches (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, model TEXT, metadata TEXT, errors TEXT,
    output_file_id TEXT, error_file_id TEXT, created_at {int} NOT NULL, expires_at {int},
    in_progress_at {int}, finalizing_at {int}, completed_at {int}, failed_at {int},
    expired_at {int}, cancelling_at {int}, cancelled_at {int}{rowid});
CREATE INDEX batches_key ON batches(key_id);
CREATE TABLE batch_requests (
    batch_id TEXT NOT NULL, custom_id TEXT NOT NULL, line {int} NOT NULL, id TEXT NOT NULL,
    body TEXT, state TEXT NOT NULL, status_code {int}, request_id TEXT, response TEXT,
    PRIMARY KEY (batch_id, custom_id));
CREATE INDEX batch_requests_state ON batch_requests(batch_id, state, line);
"""

_MIGRATIONS = {
    # prepaid balances (balance_store.py)
    2: """
ALTER TABLE api_keys ADD COLUMN balance_pico_usd {int};
CREATE TABLE reservations (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, amount_pico_usd {int} NOT NULL, created_at {int} NOT NULL);
CREATE INDEX reservations_key ON reservations(key_id);
""",
    # several replicas: who holds a batch line or a reservation and until when (renewed by that process's
    # heartbeat, taken back once it lapses); rate-limit events counted in the database; file contents in
    # the database (PostgreSQL: replicas share no disk; SQLite keeps them in data_dir/files)
    3: """
ALTER TABLE batch_requests ADD COLUMN claimed_by TEXT;
ALTER TABLE batch_requests ADD COLUMN lease_until {int};
ALTER TABLE reservations ADD COLUMN owner TEXT;
ALTER TABLE reservations ADD COLUMN lease_until {int};
CREATE INDEX batch_requests_claimed ON batch_requests(claimed_by, state);
CREATE TABLE rate_events (key_id TEXT NOT NULL, at_ms {int} NOT NULL, tokens {int} NOT NULL, request {int} NOT NULL);
CREATE INDEX rate_events_key ON rate_events(key_id, at_ms);
CREATE TABLE file_blobs (id TEXT PRIMARY KEY, content {blob} NOT NULL);
""",
    # where each bill's token counts came from: "engine" (this process's own engine), "upstream" (reported by
    # the gateway's upstream), "local" (the gateway counted them with the tokenizer); NULL on older rows
    4: """
ALTER TABLE usage ADD COLUMN usage_source TEXT;
""",
}


def render(sql: str, dialect: str) -> str:
    return sql.format(**_TYPES[dialect])


def statements(version: int, dialect: str) -> list[str]:
    """The SQL statements that upgrade `dialect`'s schema from version - 1 to `version`."""
    sql = _V1 if version == 1 else _MIGRATIONS[version]
    return [s.strip() for s in render(sql, dialect).split(";") if s.strip()]


assert sorted(_MIGRATIONS) == list(range(2, SCHEMA_VERSION + 1))
