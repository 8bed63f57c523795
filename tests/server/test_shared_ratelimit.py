"""Rate limits counted in the database (shared_ratelimit.py): the in-memory limiter's answers on a fake clock,
on SQLite and PostgreSQL, and one limit held by two replicas' limiters admitting a key's requests at once."""

from __future__ import annotations

import threading

import psycopg
import pytest

from openr2.server.db import PostgresDatabase, SQLiteDatabase
from openr2.server.ledger import Ledger
from openr2.server.ratelimit import RateLimiter
from openr2.server.shared_ratelimit import SharedRateLimiter


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def make(request, tmp_path):
    """make(**limits) -> a limiter of the param's kind on a fresh database (the schema from Ledger)."""
    made = []
    if request.param == "memory":
        yield RateLimiter
        return
    target = tmp_path / "rl.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    Ledger(target).close()  # creates the schema

    def make_shared(**kw):
        db = SQLiteDatabase(target) if request.param == "sqlite" else PostgresDatabase(target)
        made.append(db)
        return SharedRateLimiter(db, **kw)

    yield make_shared
    for db in made:
        db.close()


def test_requests_window(make):
    clock = FakeClock()
    rl = make(requests_per_min=3, clock=clock)
    for t in (1000, 1010, 1020):
        clock.t = t
        assert rl.acquire("a") == 0
    assert rl.acquire("a") == pytest.approx(40)  # the request at t=1000 leaves the window at 1060
    assert rl.acquire("a") == pytest.approx(40)  # a refused request is not counted
    assert rl.acquire("b") == 0  # keys are independent
    clock.t = 1060
    assert rl.acquire("a") == 0
    assert rl.acquire("a") == pytest.approx(10)  # next to leave: t=1010


def test_tokens_window(make):
    clock = FakeClock()
    rl = make(tokens_per_min=100, clock=clock)
    assert rl.acquire("a", 60) == 0
    clock.t = 1005
    assert rl.acquire("a", 30) == 0
    assert rl.acquire("a", 20) == pytest.approx(55)  # needs the 60 tokens of t=1000 to leave
    clock.t = 1035
    rl.record_tokens("a", 50)
    clock.t = 1060  # window now holds 30 (t=1005) + 50 (t=1035)
    assert rl.acquire("a", 30) == pytest.approx(5)
    clock.t = 1065
    assert rl.acquire("a", 30) == 0
    with pytest.raises(ValueError, match="tokens"):
        rl.acquire("a", 101)
    with pytest.raises(ValueError, match="requests_per_min"):
        make(requests_per_min=-1)


def test_idle_keys_are_forgotten(pg_url):
    Ledger(pg_url).close()
    clock = FakeClock()
    db = PostgresDatabase(pg_url)
    try:
        rl = SharedRateLimiter(db, requests_per_min=1, clock=clock)
        for i in range(50):
            assert rl.acquire(f"k{i}") == 0
        clock.t += 61
        assert rl.acquire("z") == 0
        with psycopg.connect(pg_url) as conn:  # the table does not grow with every key ever seen
            assert conn.execute("SELECT DISTINCT key_id FROM rate_events").fetchall() == [("z",)]
    finally:
        db.close()


def test_replicas_hold_one_limit(pg_url):
    """Replicas' limiters (eight connections, as from eight replicas), 200 requests of one key at one instant
    against a limit of 30 a minute: exactly 30 are admitted (without the per-key lock, more slip through)."""
    Ledger(pg_url).close()
    clock = FakeClock()
    dbs = [PostgresDatabase(pg_url) for _ in range(8)]
    limiters = [SharedRateLimiter(db, requests_per_min=30, clock=clock) for db in dbs]
    admitted, lock, start = [], threading.Lock(), threading.Barrier(8)

    def hammer(rl):
        start.wait()
        for _ in range(25):
            ok = rl.acquire("key") == 0
            with lock:
                admitted.append(ok)

    threads = [threading.Thread(target=hammer, args=(limiters[i],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 200 and sum(admitted) == 30
    for db in dbs:
        db.close()
