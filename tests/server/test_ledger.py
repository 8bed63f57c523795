"""The ledger on SQLite and (where the test is not about the SQLite file) PostgreSQL: WAL and schema version, hashed keys, usage rows and reports, files, per-key scoping,
and the batch lifecycle including a crash mid-batch (every line exactly once, billed once)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from openr2.billing import PriceTable
from openr2.engine.usage import Usage
from openr2.server.ledger import SCHEMA_VERSION, BatchStateError, Ledger

PRICES = PriceTable()
DAY = 86_400
T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path, clock):
    """A ledger on each backend: SQLite in tmp_path, or a new database in the session's PostgreSQL cluster."""
    target = tmp_path / "openr2.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    with Ledger(target, clock=clock) as led:
        yield led


@pytest.fixture
def sqlite_ledger(tmp_path, clock):
    """For what only the SQLite file shows: its WAL, its bytes, the files beside it."""
    with Ledger(tmp_path / "openr2.db", clock=clock) as led:
        yield led


def _bill(led, key, usage, request_id, model="m", batch=False, **kw):
    return led.record_usage(key, model, "/v1/chat/completions", usage, batch, PRICES.cost(usage, batch),
                            request_id, **kw)


def test_wal_and_schema_version(sqlite_ledger, tmp_path):
    con = sqlite3.connect(tmp_path / "openr2.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="newer"):
        Ledger(tmp_path / "openr2.db")


def test_keys_hashed_verified_revoked(sqlite_ledger, tmp_path):
    assert not sqlite_ledger.has_keys()
    key_a, secret_a = sqlite_ledger.create_key("alice")
    key_b, secret_b = sqlite_ledger.create_key("bob")
    assert secret_a.startswith("sk-openr2-") and len(secret_a) == len("sk-openr2-") + 32
    assert sqlite_ledger.has_keys()
    assert sqlite_ledger.verify_key(secret_a) == key_a and sqlite_ledger.verify_key(secret_b) == key_b
    assert sqlite_ledger.verify_key(secret_a[:-1] + ("A" if secret_a[-1] != "A" else "B")) is None
    assert sqlite_ledger.verify_key("sk-openr2-short") is None and sqlite_ledger.verify_key("") is None
    listed = sqlite_ledger.list_keys()
    assert [k["name"] for k in listed] == ["alice", "bob"]
    assert listed[0]["prefix"] == secret_a[:18] + "..."
    # The secret appears nowhere in the database files, only its salted hash: check the WAL while open,
    # then the main file after close (which checkpoints the WAL into it).
    for close in (False, True):
        if close:
            sqlite_ledger.close()
        files = [f for f in tmp_path.iterdir() if f.is_file()]
        assert any(f.name.endswith("-wal") for f in files) != close
        for f in files:
            data = f.read_bytes()
            for s in (secret_a, secret_b):
                assert s.encode() not in data and s[10:].encode() not in data
    led = Ledger(tmp_path / "openr2.db")
    assert led.revoke_key(key_a) and not led.revoke_key(key_a)
    assert led.verify_key(secret_a) is None and led.verify_key(secret_b) == key_b
    assert led.list_keys()[0]["revoked_at"] is not None
    assert led.revoke_key(key_b) and not led.has_keys()
    led.close()


def test_usage_rows_idempotent_and_reported(ledger, clock):
    a, _ = ledger.create_key("alice")
    b, _ = ledger.create_key("bob")
    assert _bill(ledger, a, Usage(1_000_000), "r1")
    assert not _bill(ledger, a, Usage(1_000_000), "r1")  # a retried bill for the same request is ignored
    clock.t += DAY
    assert _bill(ledger, b, Usage(100, 40, 10, 3), "r2", model="m2")
    assert _bill(ledger, a, Usage(0, 0, 1_000_000), "r3", batch=True, batch_id="batch_x", custom_id="c1")

    (total,) = ledger.usage_report()
    assert total["requests"] == 3 and total["batch_requests"] == 1
    assert total["prompt_tokens"] == 1_000_100 and total["cached_prompt_tokens"] == 40
    assert total["cache_miss_tokens"] == 1_000_060 and total["reasoning_tokens"] == 3
    expected = 140_000 * 1_000_000 + 60 * 140_000 + 40 * 14_000 + 10 * 280_000 + 140_000 * 1_000_000
    assert total["cost_pico_usd"] == expected and total["cost_usd"] == "$0.28001176"

    by_day = ledger.usage_report(group_by="day")
    assert [r["day"] for r in by_day] == ["2023-11-14", "2023-11-15"]
    by_key = {r["key_id"]: r for r in ledger.usage_report(group_by="key")}
    assert by_key[a]["key_name"] == "alice" and by_key[a]["requests"] == 2 and by_key[b]["requests"] == 1
    assert {r["model"] for r in ledger.usage_report(group_by="model")} == {"m", "m2"}
    assert ledger.usage_report(start=T0 + DAY)[0]["requests"] == 2
    assert ledger.usage_report(end=T0 + DAY)[0]["requests"] == 1
    assert ledger.usage_report(key_id=b)[0]["prompt_tokens"] == 100  # a key sees only its own usage
    assert ledger.usage_report(start=T0 + 9 * DAY) == []
    with pytest.raises(ValueError, match="group_by"):
        ledger.usage_report(group_by="week")
    with pytest.raises(ValueError, match="cost"):
        ledger.record_usage(a, "m", "/v1/completions", Usage(1), False, 0.5, "r9")


def test_each_bill_says_where_its_usage_came_from(ledger):
    assert _bill(ledger, "k", Usage(10, 0, 5), "r1", usage_source="engine")
    assert _bill(ledger, "k", Usage(20, 8, 5), "r2", usage_source="upstream")
    assert _bill(ledger, "k", Usage(30, 0, 5), "r3", usage_source="local")
    assert _bill(ledger, "k", Usage(40, 0, 5), "r4")  # a caller that does not say: NULL, as rows before v4
    batch_id = ledger.validate_batch(ledger.create_batch(
        "k", ledger.create_file("k", "in.jsonl", "batch", _input(1))["id"], "/v1/chat/completions")["id"])["id"]
    (line,) = ledger.claim_pending(batch_id, 1)
    assert ledger.complete_request(batch_id, line["custom_id"], 200, {}, line["id"], Usage(50, 0, 5), 1,
                                   usage_source="upstream")
    rows = dict(ledger._query("SELECT request_id, usage_source FROM usage"))
    assert rows == {"r1": "engine", "r2": "upstream", "r3": "local", "r4": None, line["id"]: "upstream"}
    by_source = {r["usage_source"]: (r["requests"], r["prompt_tokens"]) for r in ledger.usage_report(group_by="source")}
    assert by_source == {"engine": (1, 10), "upstream": (2, 70), "local": (1, 30), None: (1, 40)}
    with pytest.raises(ValueError, match="usage_source"):
        _bill(ledger, "k", Usage(1), "r5", usage_source="guessed")
    assert "r5" not in dict(ledger._query("SELECT request_id, usage_source FROM usage"))


def test_a_version_3_ledger_gains_the_usage_source_column(tmp_path, request):
    """Both backends: a database left at version 3 (with a bill) is migrated when a newer openr2 opens it;
    the old bill's source is unknown (NULL), new ones say theirs."""
    from openr2.server import schema

    for backend in ("sqlite", "postgresql"):
        if backend == "sqlite":
            target = tmp_path / "v3.db"
            con = sqlite3.connect(target, isolation_level=None)
            run = con.execute
        else:
            import psycopg

            target = request.getfixturevalue("pg_url")
            con = psycopg.connect(target, autocommit=True)
            run = con.execute
            run("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        for v in (1, 2, 3):
            for stmt in schema.statements(v, backend):
                run(stmt)
            if backend == "postgresql":
                run("INSERT INTO schema_version (version) VALUES (%s)", (v,))
        if backend == "sqlite":
            run("PRAGMA user_version=3")
        run("INSERT INTO usage (created_at, request_id, key_id, model, endpoint, batch, prompt_tokens,"
            " cached_prompt_tokens, completion_tokens, reasoning_tokens, cost_pico_usd)"
            " VALUES (1, 'old', 'k', 'm', '/v1/completions', 0, 1, 0, 1, 0, 0)")
        con.close()
        with Ledger(target) as led:
            assert _bill(led, "k", Usage(2), "new", usage_source="upstream")
            assert dict(led._query("SELECT request_id, usage_source FROM usage")) == {"old": None, "new": "upstream"}


def test_sql_sums_are_exact(ledger):
    rng, expected = random.Random(1), 0
    for i in range(2_000):
        prompt = rng.randint(1, 99_999)
        usage, batch = Usage(prompt, rng.randint(0, prompt), rng.randint(0, 9_999)), i % 3 == 0
        expected += PRICES.cost(usage, batch)
        _bill(ledger, f"k{i % 7}", usage, f"r{i}", batch=batch)
    assert ledger.usage_report()[0]["cost_pico_usd"] == expected
    assert sum(r["cost_pico_usd"] for r in ledger.usage_report(group_by="key")) == expected


def test_content_only_with_log_content(tmp_path):
    secret_text = "the quick brown fox"
    for flag in (False, True):
        with Ledger(tmp_path / f"{flag}.db", log_content=flag) as led:
            led.record_usage("k", "m", "/v1/completions", Usage(1), False, 0, "r1",
                             content={"prompt": secret_text, "completion": "ok"})
        data = b"".join(f.read_bytes() for f in tmp_path.glob(f"{flag}.db*"))
        assert (secret_text.encode() in data) is flag


def test_files_scoped_and_atomic(sqlite_ledger, tmp_path):
    f = sqlite_ledger.create_file("A", "in.jsonl", "batch", b"hello\n")
    assert f["id"].startswith("file-") and f["object"] == "file" and f["bytes"] == 6
    assert f["status"] == "processed" and f["purpose"] == "batch" and isinstance(f["created_at"], int)
    assert (tmp_path / "files" / f["id"]).read_bytes() == b"hello\n"
    assert not list((tmp_path / "files").glob(".*tmp"))
    assert sqlite_ledger.get_file("A", f["id"]) == f and sqlite_ledger.read_file("A", f["id"]) == b"hello\n"
    assert sqlite_ledger.get_file("B", f["id"]) is None and sqlite_ledger.read_file("B", f["id"]) is None
    assert sqlite_ledger.list_files("B") == ([], False)
    assert not sqlite_ledger.delete_file("B", f["id"])
    ids = [sqlite_ledger.create_file("A", f"{i}.txt", "user_data", b"x")["id"] for i in range(3)]
    page, more = sqlite_ledger.list_files("A", limit=2)
    assert [x["id"] for x in page] == ids[::-1][:2] and more
    page, more = sqlite_ledger.list_files("A", limit=2, after=page[-1]["id"])
    assert [x["id"] for x in page] == [ids[0], f["id"]] and not more
    assert [x["id"] for x in sqlite_ledger.list_files("A", purpose="batch")[0]] == [f["id"]]
    assert sqlite_ledger.delete_file("A", f["id"]) and sqlite_ledger.get_file("A", f["id"]) is None
    assert not (tmp_path / "files" / f["id"]).exists()
    with pytest.raises(ValueError, match="purpose"):
        sqlite_ledger.create_file("A", "x", "nonsense", b"")
    with pytest.raises(ValueError, match="filename"):
        sqlite_ledger.create_file("A", "", "batch", b"")


def _input(n, model="m", endpoint="/v1/chat/completions"):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": endpoint,
              "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]}} for i in range(n)]
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def _run(led, batch_id, n=None):
    """A worker's inner loop: claim lines and complete them, billing each at the batch price."""
    done = 0
    while n is None or done < n:
        claimed = led.claim_pending(batch_id, 4 if n is None else min(4, n - done))
        if not claimed:
            break
        for req in claimed:
            i = int(req["custom_id"][1:])  # counts depend on the line, not on which run finished it
            usage = Usage(10 + i, i % 5, 7)
            body = {"id": f"chatcmpl-{req['custom_id']}", "object": "chat.completion", "usage": {}}
            assert led.complete_request(batch_id, req["custom_id"], 200, body, f"req-{req['custom_id']}",
                                        usage, PRICES.cost(usage, batch=True))
            done += 1
    return done


def test_batch_lifecycle_with_crash(tmp_path, clock):
    db = tmp_path / "openr2.db"
    led = Ledger(db, clock=clock)
    f = led.create_file("A", "in.jsonl", "batch", _input(10))
    b = led.create_batch("A", f["id"], "/v1/chat/completions", metadata={"job": "nightly"})
    assert b["status"] == "validating" and b["id"].startswith("batch_") and b["expires_at"] == T0 + DAY
    assert led.list_active_batches() == [b["id"]]
    b = led.validate_batch(b["id"])
    assert b["status"] == "in_progress" and b["model"] == "m" and b["request_counts"]["total"] == 10
    assert _run(led, b["id"], n=4) == 4
    claimed = led.claim_pending(b["id"], 3)  # in flight when the process dies
    assert [r["custom_id"] for r in claimed] == ["c4", "c5", "c6"]
    led.close()  # "SIGKILL": nothing else is written

    led = Ledger(db, clock=clock)
    assert led.list_active_batches() == [b["id"]]
    assert led.reset_in_flight() == 3
    assert led.finalize_batch(b["id"]) is None  # lines remain
    assert _run(led, b["id"]) == 6
    assert not led.complete_request(b["id"], "c0", 200, {"dup": True}, "req-dup", Usage(99), 1)  # ignored
    out = led.finalize_batch(b["id"])
    assert out["status"] == "completed" and out["completed_at"] == T0 and out["finalizing_at"] == T0
    assert out["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert out["error_file_id"] is None and led.list_active_batches() == []
    lines = [json.loads(x) for x in led.read_file("A", out["output_file_id"]).decode().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"c{i}" for i in range(10)]  # each exactly once
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert lines[0]["response"]["body"]["id"] == "chatcmpl-c0" and lines[0]["id"].startswith("batch_req_")
    assert led.get_file("A", out["output_file_id"])["purpose"] == "batch_output"

    # Billed once per line, at half price.
    (rep,) = led.usage_report()
    assert rep["requests"] == 10 and rep["batch_requests"] == 10
    assert out["usage"]["input_tokens"] == rep["prompt_tokens"] == sum(10 + i for i in range(10))
    assert rep["cost_pico_usd"] == sum(PRICES.cost(Usage(10 + i, i % 5, 7), batch=True) for i in range(10))
    assert led.finalize_batch(b["id"])["status"] == "completed"  # idempotent
    with pytest.raises(BatchStateError, match="status"):
        led.cancel_batch("A", b["id"])
    # Request bodies are dropped once the output file is written.
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM batch_requests WHERE body IS NOT NULL "
                                       "OR response IS NOT NULL").fetchone()[0] == 0
    led.close()


_KILLED_WORKER = """
import os, signal, sys
from openr2.billing import PriceTable
from openr2.engine.usage import Usage
from openr2.server.ledger import Ledger
led = Ledger(sys.argv[1])
claimed = led.claim_pending(sys.argv[2], 5)
for req in claimed[:2]:
    i = int(req["custom_id"][1:])
    u = Usage(10 + i, i % 5, 7)
    led.complete_request(sys.argv[2], req["custom_id"], 200, {"id": "x"}, "req-" + req["custom_id"], u,
                         PriceTable().cost(u, batch=True))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_batch_survives_sigkill(tmp_path):
    """A worker process killed mid-batch with 5 lines claimed and 2 finished: on restart the 3 unfinished
    lines run again, the 2 finished ones do not, and every line is billed exactly once."""
    led = Ledger(tmp_path / "openr2.db")
    f = led.create_file("A", "in.jsonl", "batch", _input(8))
    b = led.validate_batch(led.create_batch("A", f["id"], "/v1/chat/completions")["id"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WORKER, str(tmp_path / "openr2.db"), b["id"]], env=env)
    assert proc.returncode == -signal.SIGKILL
    led.close()

    led = Ledger(tmp_path / "openr2.db")  # the restarted server
    assert led.reset_in_flight() == 3
    assert _run(led, b["id"]) == 6  # 3 reset + 3 never claimed
    out = led.finalize_batch(b["id"])
    lines = [json.loads(x)["custom_id"] for x in led.read_file("A", out["output_file_id"]).decode().splitlines()]
    assert lines == [f"c{i}" for i in range(8)]
    (rep,) = led.usage_report()
    assert rep["requests"] == 8
    assert rep["cost_pico_usd"] == sum(PRICES.cost(Usage(10 + i, i % 5, 7), batch=True) for i in range(8))
    led.close()


def test_batch_failed_lines_cancel_and_expiry(ledger, clock):
    f = ledger.create_file("A", "in.jsonl", "batch", _input(6))
    b = ledger.validate_batch(ledger.create_batch("A", f["id"], "/v1/chat/completions")["id"])
    (first, second) = ledger.claim_pending(b["id"], 2)
    ledger.complete_request(b["id"], first["custom_id"], 400, {"error": {"message": "bad"}}, "req-1")
    c = ledger.cancel_batch("A", b["id"])
    assert c["status"] == "cancelling"  # one line is still running
    assert ledger.claim_pending(b["id"], 10) == []
    ledger.complete_request(b["id"], second["custom_id"], 200, {"ok": 1}, "req-2", Usage(5), 1)
    c = ledger.finalize_batch(b["id"])
    assert c["status"] == "cancelled" and c["cancelled_at"] == T0
    assert c["request_counts"] == {"total": 6, "completed": 1, "failed": 5}
    errs = [json.loads(x) for x in ledger.read_file("A", c["error_file_id"]).decode().splitlines()]
    assert errs[0]["response"]["status_code"] == 400
    assert [e["error"]["code"] for e in errs[1:]] == ["batch_cancelled"] * 4
    assert ledger.usage_report()[0]["requests"] == 1  # only the finished line is billed

    f2 = ledger.create_file("A", "in2.jsonl", "batch", _input(3))
    b2 = ledger.validate_batch(ledger.create_batch("A", f2["id"], "/v1/chat/completions")["id"])
    _run(ledger, b2["id"], n=1)
    assert ledger.finalize_batch(b2["id"]) is None
    clock.t += DAY
    assert ledger.claim_pending(b2["id"], 5) == []  # past the window nothing new starts
    e = ledger.finalize_batch(b2["id"])
    assert e["status"] == "expired" and e["request_counts"] == {"total": 3, "completed": 1, "failed": 2}

    f3 = ledger.create_file("A", "in3.jsonl", "batch", _input(2))
    b3 = ledger.create_batch("A", f3["id"], "/v1/chat/completions")
    assert ledger.cancel_batch("A", b3["id"])["status"] == "cancelled"  # cancelled before validation
    assert ledger.validate_batch(b3["id"])["status"] == "cancelled"


def test_batch_validation(ledger):
    def make(content, **kw):
        f = ledger.create_file("A", "in.jsonl", "batch", content)
        return ledger.validate_batch(ledger.create_batch("A", f["id"], "/v1/chat/completions")["id"], **kw)

    bad = _input(2).decode().splitlines()
    bad.append("not json")
    bad.append(bad[0])  # duplicate custom_id
    bad.append(json.dumps({"custom_id": "s", "method": "GET", "url": "/v1/completions",
                           "body": {"model": "m", "stream": True}}))
    bad.append(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "other"}}))
    b = make("\n".join(bad).encode())
    assert b["status"] == "failed" and b["failed_at"] == T0
    codes = [(e["line"], e["code"]) for e in b["errors"]["data"]]
    assert codes == [(3, "invalid_json"), (4, "duplicate_custom_id"), (5, "invalid_method"), (5, "invalid_url"),
                     (5, "invalid_request"), (6, "mismatched_model")]
    assert make(b"\n")["errors"]["data"][0]["code"] == "empty_file"
    assert make(_input(1), models={"served"})["errors"]["data"][0]["code"] == "model_not_found"

    f = ledger.create_file("A", "notes.txt", "user_data", b"x")
    with pytest.raises(ValueError, match="input_file_id"):
        ledger.create_batch("A", f["id"], "/v1/chat/completions")
    with pytest.raises(ValueError, match="input_file_id"):
        ledger.create_batch("B", f["id"], "/v1/chat/completions")  # another key's file
    g = ledger.create_file("A", "in.jsonl", "batch", _input(1))
    with pytest.raises(ValueError, match="endpoint"):
        ledger.create_batch("A", g["id"], "/v1/embeddings")
    with pytest.raises(ValueError, match="completion_window"):
        ledger.create_batch("A", g["id"], "/v1/chat/completions", completion_window="1h")
    with pytest.raises(ValueError, match="metadata"):
        ledger.create_batch("A", g["id"], "/v1/chat/completions", metadata={str(i): "v" for i in range(17)})


def test_batches_scoped_by_key(ledger):
    f = ledger.create_file("A", "in.jsonl", "batch", _input(1))
    b = ledger.create_batch("A", f["id"], "/v1/chat/completions")
    assert ledger.get_batch("B", b["id"]) is None and ledger.cancel_batch("B", b["id"]) is None
    assert ledger.list_batches("B") == ([], False)
    ids = [b["id"]] + [ledger.create_batch("A", f["id"], "/v1/chat/completions")["id"] for _ in range(2)]
    page, more = ledger.list_batches("A", limit=2)
    assert [x["id"] for x in page] == ids[::-1][:2] and more
    assert [x["id"] for x in ledger.list_batches("A", after=page[-1]["id"])[0]] == [ids[0]]


def test_threads_share_one_ledger(ledger):
    def work(t):
        for i in range(25):
            _bill(ledger, "k", Usage(1, 0, 1), f"t{t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.usage_report()[0]["requests"] == 100
