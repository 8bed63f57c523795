"""Replicas sharing one PostgreSQL ledger, as Ledger objects (each its own connection and replica id): one
migration, one queue claimed without overlap, leases that hand a dead replica's lines to another, a line
billed once when two replicas both finish it, debits that lose no update, one finalisation, file contents
in the database."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from openr2.billing import PriceTable
from openr2.engine.usage import Usage
from openr2.server.ledger import SCHEMA_VERSION, Ledger

PRICES = PriceTable()
T0 = 1_700_000_000


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def _input(n: int) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]}})
                     for i in range(n)).encode()


def _batch(led: Ledger, n: int) -> str:
    f = led.create_file("A", "in.jsonl", "batch", _input(n))
    return led.validate_batch(led.create_batch("A", f["id"], "/v1/chat/completions")["id"])["id"]


def _complete(led: Ledger, batch_id: str, line: dict) -> bool:
    usage = Usage(10, 0, 5)
    return led.complete_request(batch_id, line["custom_id"], 200, {"id": line["id"]}, line["id"], usage,
                                PRICES.cost(usage, batch=True))


def _together(*fns):
    """Run the functions in threads released at once; their results in order (a thread's exception raised)."""
    start, results = threading.Barrier(len(fns)), [None] * len(fns)

    def run(i, fn):
        start.wait()
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: B036 (handed to the test's thread)
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def replicas(pg_url, clock):
    with Ledger(pg_url, clock=clock, lease_s=30) as a, Ledger(pg_url, clock=clock, lease_s=30) as b:
        yield a, b


def test_replicas_starting_together_migrate_once(pg_url):
    ledgers = _together(*[lambda: Ledger(pg_url) for _ in range(4)])
    for led in ledgers:
        led.close()
    with psycopg.connect(pg_url) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == \
            list(range(1, SCHEMA_VERSION + 1))
        conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ValueError, match="newer"):
        Ledger(pg_url)


def test_bad_database_url_is_a_clear_error(pg_cluster):
    with pytest.raises(ValueError, match="cannot connect to the database postgresql://openr2:\\*\\*\\*@"):
        Ledger(f"postgresql://openr2:hunter2@/no_such_db?host={pg_cluster.dir}")


def test_two_replicas_claim_one_queue_without_overlap(replicas):
    a, b = replicas
    batch_id = _batch(a, 60)
    claimed = {a.replica_id: [], b.replica_id: []}

    def drain(led):
        while lines := led.claim_pending(batch_id, 3):
            claimed[led.replica_id] += [x["custom_id"] for x in lines]
            for line in lines:
                assert _complete(led, batch_id, line)

    _together(lambda: drain(a), lambda: drain(b))
    both = claimed[a.replica_id] + claimed[b.replica_id]
    assert sorted(both) == sorted(f"c{i}" for i in range(60))  # every line once, by one replica
    out = a.finalize_batch(batch_id)
    assert out["status"] == "completed" and out["request_counts"]["completed"] == 60
    assert a.usage_report()[0]["requests"] == 60


def test_a_dead_replicas_lines_go_to_another_once_its_lease_lapses(replicas, clock):
    a, b = replicas
    batch_id = _batch(a, 5)
    held = a.claim_pending(batch_id, 3)  # then `a` dies: no heartbeat, no completion
    assert [x["custom_id"] for x in b.claim_pending(batch_id, 10)] == ["c3", "c4"]
    assert b.claim_pending(batch_id, 10) == [] and b.reset_in_flight() == 0  # a's lease still runs
    assert b.finalize_batch(batch_id) is None
    clock.t += 20
    a.heartbeat()  # alive after all: its lease is renewed from now (to T0 + 50)
    b.heartbeat()
    clock.t += 20
    b.heartbeat()  # b lives on (to T0 + 70)
    assert b.claim_pending(batch_id, 10) == []
    clock.t += 11  # a's last renewal has lapsed, b's has not
    taken = b.claim_pending(batch_id, 10)
    assert [x["custom_id"] for x in taken] == ["c0", "c1", "c2"]
    # `a` was only slow and finishes c0 first: it wins; b's later completion of c0 is not billed again
    assert _complete(a, batch_id, held[0])
    for line in taken:
        assert _complete(b, batch_id, line) == (line["custom_id"] != "c0")
    assert b.claim_pending(batch_id, 10) == []  # nothing is claimed twice
    # c3 and c4, claimed by b at the start, are still running: b finishes them
    with psycopg.connect(a._db.url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM batch_requests WHERE state = 'running'").fetchone()[0] == 2
    for cid in ("c3", "c4"):
        assert b.complete_request(batch_id, cid, 200, {}, f"req-{cid}", Usage(10, 0, 5), 7)
    out = b.finalize_batch(batch_id)
    lines = [json.loads(x)["custom_id"] for x in b.read_file("A", out["output_file_id"]).decode().splitlines()]
    assert lines == [f"c{i}" for i in range(5)]
    assert b.usage_report()[0]["requests"] == 5  # billed once per line


def test_a_restarted_replica_takes_back_only_lapsed_lines(replicas, clock, pg_url):
    a, b = replicas
    batch_id = _batch(a, 4)
    a.claim_pending(batch_id, 2)
    b.claim_pending(batch_id, 1)
    clock.t += 31
    b.heartbeat()  # b lives on; a died
    with Ledger(pg_url, clock=clock) as restarted:
        assert restarted.reset_in_flight() == 2
        assert [x["custom_id"] for x in restarted.claim_pending(batch_id, 10)] == ["c0", "c1", "c3"]


def test_concurrent_debits_from_two_replicas_lose_no_update(replicas):
    a, b = replicas
    key, _ = a.create_key("prepaid")
    a.set_balance(key, 10**12)
    usage = Usage(100, 0, 10)
    cost = PRICES.cost(usage)

    def bill(led, tag):
        # 40 distinct requests each, and 40 the other replica also bills (a retried bill): once only
        return [led.record_usage(key, "m", "/v1/chat/completions", usage, False, cost, rid)
                for i in range(40) for rid in (f"{tag}-{i}", f"shared-{i}")]

    billed_a, billed_b = _together(lambda: bill(a, "a"), lambda: bill(b, "b"))
    assert sum(billed_a) + sum(billed_b) == 120
    assert b.balance(key)["balance_pico_usd"] == 10**12 - 120 * cost
    assert a.usage_report()[0]["requests"] == 120


def test_two_replicas_finalise_one_batch_once(replicas):
    a, b = replicas
    batch_id = _batch(a, 3)
    for line in a.claim_pending(batch_id, 3):
        _complete(a, batch_id, line)
    out_a, out_b = _together(lambda: a.finalize_batch(batch_id), lambda: b.finalize_batch(batch_id))
    assert out_a["output_file_id"] == out_b["output_file_id"] is not None
    assert [f["purpose"] for f in a.list_files("A")[0]].count("batch_output") == 1


def test_reservations_of_a_dead_replica_are_released(replicas, clock):
    a, b = replicas
    key, _ = a.create_key("prepaid")
    a.set_balance(key, 100)
    assert a.reserve(key, {"ra": 60}) and b.reserve(key, {"rb": 40})
    assert b.release_all() == 1  # its own only: a's request is still running
    assert a.balance(key)["reserved_pico_usd"] == 60
    clock.t += 31
    b.heartbeat()  # a stopped renewing: its reservation is dropped
    assert a.balance(key)["reserved_pico_usd"] == 0


def test_file_contents_live_in_the_database(replicas):
    a, b = replicas
    f = a.create_file("A", "in.jsonl", "batch", b"hello\n")
    assert b.read_file("A", f["id"]) == b"hello\n" and b.read_file("B", f["id"]) is None
    assert a.file_path("A", f["id"]) is None and a.data_dir is None  # nothing on this replica's disk
    assert b.delete_file("A", f["id"]) and a.read_file("A", f["id"]) is None
    with psycopg.connect(a._db.url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM file_blobs").fetchone()[0] == 0


def test_the_batch_workers_heartbeat_keeps_its_lines(pg_url):
    """BatchWorker._heartbeat renews the leases of the lines its process holds: another replica takes none
    of them while it beats, and all of them once it stops."""
    import asyncio
    import time
    from types import SimpleNamespace

    from openr2.server.batches import BatchWorker

    with Ledger(pg_url, lease_s=1.0) as a, Ledger(pg_url, lease_s=1.0) as b:
        batch_id = _batch(a, 3)
        assert len(a.claim_pending(batch_id, 3)) == 3

        async def beat_for(seconds):
            task = asyncio.create_task(BatchWorker(SimpleNamespace(ledger=a))._heartbeat())
            await asyncio.sleep(seconds)
            task.cancel()

        asyncio.run(beat_for(2.5))  # 2.5 leases long
        assert b.claim_pending(batch_id, 3) == []
        time.sleep(3.5)  # leases are whole seconds (ledger times are): lapsed within 3 s of the last beat
        assert len(b.claim_pending(batch_id, 3)) == 3


def test_keys_and_usage_commands_take_a_database_url(pg_url, pg_cluster, capsys):
    from openr2.cli import main

    assert main(["keys", "create", "ops", "--balance", "2.50", "--database-url", pg_url]) == 0
    key_id = capsys.readouterr().out.split()[0]
    assert main(["keys", "topup", key_id, "1.00", "--database-url", pg_url]) == 0
    assert capsys.readouterr().out.strip() == f"{key_id}: balance $3.50"
    assert main(["usage", "--database-url", pg_url]) == 0
    with Ledger(pg_url) as led:
        led.record_usage(key_id, "m", "/v1/chat/completions", Usage(10, 0, 5), False, 0, "r1", usage_source="upstream")
        led.record_usage(key_id, "m", "/v1/chat/completions", Usage(20, 0, 5), False, 0, "r2", usage_source="local")
    capsys.readouterr()
    assert main(["usage", "--group-by", "source", "--database-url", pg_url]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["usage_source"]: r["prompt_tokens"] for r in rows} == {"local": 20, "upstream": 10}
    assert main(["keys", "list", "--database-url", "mysql://u@h/db"]) == 2
    assert "must be a postgresql:// URL" in capsys.readouterr().err
    assert main(["keys", "list", "--database-url", f"postgresql://openr2@/nope?host={pg_cluster.dir}"]) == 2
    assert "cannot connect to the database" in capsys.readouterr().err


def test_a_dropped_connection_is_replaced(pg_url):
    """A PostgreSQL restart or a dropped link: the next call opens a new connection instead of failing forever
    (reads and transactions that had not started are sent again; nothing is sent twice)."""
    with Ledger(pg_url) as led, psycopg.connect(pg_url, autocommit=True) as admin:
        key, _ = led.create_key("k")
        for call in (led.list_keys, lambda: led.top_up(key, 5)):
            pid = led._db._conn.info.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            call()
            assert led._db._conn.info.backend_pid != pid
        assert led.balance(key)["balance_pico_usd"] == 5


def test_a_replica_shutting_down_hands_its_lines_back_at_once(replicas):
    a, b = replicas
    batch_id = _batch(a, 4)
    held = a.claim_pending(batch_id, 3)
    assert _complete(a, batch_id, held[0])
    assert a.release_claims() == 2  # c1, c2: c0 is finished and stays so
    assert [x["custom_id"] for x in b.claim_pending(batch_id, 10)] == ["c1", "c2", "c3"]


def test_a_deadlock_victim_is_run_again(replicas, monkeypatch):
    """PostgreSQL aborts one of two deadlocked transactions (rolled back whole): the ledger runs that method
    again, so a finished line is recorded and billed once rather than failing."""
    from contextlib import contextmanager

    a, _ = replicas
    batch_id = _batch(a, 2)
    line = a.claim_pending(batch_id, 1)[0]
    real_tx, begun = a._db.tx, []

    @contextmanager
    def victim_once():
        with real_tx() as db:
            begun.append(1)
            if len(begun) == 1:
                db.execute("UPDATE batch_requests SET state = 'done' WHERE batch_id = ?", (batch_id,))
                raise psycopg.errors.DeadlockDetected("deadlock detected")  # rolls the update back
            yield db

    monkeypatch.setattr(a._db, "tx", victim_once)
    assert _complete(a, batch_id, line)
    assert len(begun) == 2 and a.usage_report()[0]["requests"] == 1
    assert a.get_batch("A", batch_id)["request_counts"]["completed"] == 1


def _skewed(offset_s: float):
    return lambda: time.time() + offset_s


def test_a_replica_with_a_skewed_clock_takes_no_live_line(pg_url):
    """Leases are read on the database's clock: a replica whose own clock runs an hour ahead does not see the
    other's lines as lapsed, so no line runs twice. (The same replica on its own clock takes them all.)"""
    with Ledger(pg_url, lease_s=30) as a, Ledger(pg_url, lease_s=30, clock=_skewed(3600), db_clock=True) as b:
        assert abs(b._now() - a._now()) <= 1
        batch_id = _batch(a, 8)
        held_by_a = {line["custom_id"] for line in a.claim_pending(batch_id, 4)}
        b.heartbeat()  # nor does its heartbeat drop a's balance reservations as lapsed
        held_by_b = {line["custom_id"] for line in b.claim_pending(batch_id, 8)}
        assert held_by_a.isdisjoint(held_by_b) and len(held_by_a | held_by_b) == 8
        for led, held in ((a, held_by_a), (b, held_by_b)):
            for cid in held:
                assert _complete(led, batch_id, {"custom_id": cid, "id": f"req-{cid}"})
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT custom_id) FROM usage").fetchone() == (8, 8)

    # the control: on its own skewed clock, a replica takes a live replica's lines as lapsed
    with Ledger(pg_url, lease_s=30) as a, Ledger(pg_url, lease_s=30, clock=_skewed(3600), db_clock=False) as b:
        batch_id = _batch(a, 4)
        held_by_a = {line["custom_id"] for line in a.claim_pending(batch_id, 4)}
        assert {line["custom_id"] for line in b.claim_pending(batch_id, 4)} == held_by_a  # each would run twice


def test_a_key_rate_limit_holds_across_replicas_with_skewed_clocks(pg_url):
    """Rate-limit windows on the database's clock: replicas an hour apart still count one window per key."""
    with Ledger(pg_url) as a, Ledger(pg_url, clock=_skewed(-3600), db_clock=True) as b:
        limiters = [a.rate_limiter(3, None), b.rate_limiter(3, None)]
        admitted = [limiters[i % 2].acquire("k") == 0 for i in range(6)]
        assert admitted == [True, True, True, False, False, False]
    # the control: on its own clock, each replica drops the other's events as outside its window
    with Ledger(pg_url) as a, Ledger(pg_url, clock=_skewed(-3600), db_clock=False) as b:
        limiters = [a.rate_limiter(3, None), b.rate_limiter(3, None)]
        assert sum(limiters[i % 2].acquire("k2") == 0 for i in range(6)) > 3


def test_a_clock_step_is_corrected_at_the_next_heartbeat(pg_url):
    """A replica's clock stepped after start (an NTP correction, a VM resumed) reads the database's time again
    once its heartbeat measures the offset anew, well before a lease could lapse."""
    jump = [0.0]
    with Ledger(pg_url, lease_s=30) as a, Ledger(pg_url, lease_s=30, clock=lambda: time.time() + jump[0],
                                                  db_clock=True) as b:
        jump[0] = 3600.0
        assert b._now() - a._now() >= 3599
        b.heartbeat()
        assert abs(b._now() - a._now()) <= 1
