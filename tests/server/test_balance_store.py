"""Prepaid balances in the ledger (on SQLite and PostgreSQL): reservations all or nothing, exact debits settled with the usage row, releases,
a race between two processes' connections for the last of a balance, and the upgrade of a version-1 ledger."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from openr2.billing import PriceTable
from openr2.engine.usage import Usage
from openr2.server.ledger import _SCHEMA, SCHEMA_VERSION, InsufficientBalance, Ledger

PRICES = PriceTable()
USD = 10**12  # pico-dollars


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    """A ledger on each backend: SQLite in tmp_path, or a new database in the session's PostgreSQL cluster."""
    target = tmp_path / "openr2.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    with Ledger(target) as led:
        yield led


def _bill(led, key, usage, request_id, batch=False):
    return led.record_usage(key, "m", "/v1/chat/completions", usage, batch, PRICES.cost(usage, batch), request_id)


def test_a_key_without_a_balance_is_never_checked(ledger):
    key, _ = ledger.create_key("free")
    assert ledger.balance(key) is None
    assert ledger.reserve(key, {"r1": 10**30}) is False  # no balance: no limit, nothing written
    assert _bill(ledger, key, Usage(100, 0, 50), "r1")
    assert ledger.balance(key) is None and ledger.list_keys()[0].keys() == {
        "id", "name", "prefix", "created_at", "revoked_at"}


def test_reserve_settle_release(ledger):
    key, _ = ledger.create_key("prepaid")
    ledger.set_balance(key, 1 * USD)
    worst = PRICES.worst_case(1000, 500)
    assert worst == 1000 * 140_000 + 500 * 280_000
    assert ledger.reserve(key, {"r1": worst, "r2": worst})
    assert ledger.balance(key) == {"balance_pico_usd": USD, "reserved_pico_usd": 2 * worst,
                                   "available_pico_usd": USD - 2 * worst}
    usage = Usage(1000, 400, 120)
    assert _bill(ledger, key, usage, "r1")  # settles r1: the exact cost, its reservation gone
    assert ledger.balance(key)["balance_pico_usd"] == USD - PRICES.cost(usage)
    assert ledger.balance(key)["reserved_pico_usd"] == worst
    assert not _bill(ledger, key, usage, "r1")  # billed once, debited once
    assert ledger.balance(key)["balance_pico_usd"] == USD - PRICES.cost(usage)
    ledger.release(["r2", "r1", "never-reserved"])
    assert ledger.balance(key)["reserved_pico_usd"] == 0
    assert ledger.top_up(key, USD // 2) == USD + USD // 2 - PRICES.cost(usage)
    assert PRICES.cost(usage) == 123_200_000 and ledger.list_keys()[0]["balance_usd"] == "$1.4998768"


def test_reservations_are_all_or_nothing_and_name_the_amounts(ledger):
    key, _ = ledger.create_key("prepaid")
    ledger.set_balance(key, 10)
    with pytest.raises(InsufficientBalance) as err:
        ledger.reserve(key, {"a": 6, "b": 6})
    assert (err.value.available, err.value.needed) == (10, 12) and "Insufficient balance" in str(err.value)
    assert ledger.balance(key)["reserved_pico_usd"] == 0
    assert ledger.reserve(key, {"a": 10})
    with pytest.raises(InsufficientBalance):
        ledger.reserve(key, {"b": 1})
    assert ledger.release_all() == 1 and ledger.balance(key)["available_pico_usd"] == 10
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            ledger.reserve(key, {"c": bad})
    with pytest.raises(ValueError, match="positive"):
        ledger.top_up(key, 0)
    with pytest.raises(ValueError, match="no key"):
        ledger.top_up("key_nope", 5)
    with pytest.raises(ValueError, match="no key"):
        ledger.set_balance("key_nope", 5)


def test_batch_lines_settle_at_the_batch_price(ledger):
    key, _ = ledger.create_key("prepaid")
    ledger.set_balance(key, USD)
    assert PRICES.worst_case(100, 10, batch=True) * 2 == PRICES.worst_case(100, 10)
    ledger.reserve(key, {"line": PRICES.worst_case(100, 10, batch=True)})
    usage = Usage(100, 0, 10)
    assert _bill(ledger, key, usage, "line", batch=True)
    assert ledger.balance(key) == {"balance_pico_usd": USD - PRICES.cost(usage, batch=True), "reserved_pico_usd": 0,
                                   "available_pico_usd": USD - PRICES.cost(usage, batch=True)}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_connections_race_for_the_last_of_a_balance(tmp_path, request, backend):
    """Two ledgers on one file or database (two processes, or two replicas): of 2 x 20 reservations that each
    need the whole balance, one per round wins, whatever the interleaving."""
    path = tmp_path / "openr2.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    with Ledger(path) as a, Ledger(path) as b:
        key, _ = a.create_key("prepaid")
        a.set_balance(key, 1000)
        def take(led, request_id, start, outcomes):
            start.wait()
            try:
                outcomes.append(led.reserve(key, {request_id: 1000}))
            except InsufficientBalance:
                outcomes.append(False)

        for round_ in range(20):
            outcomes, start = [], threading.Barrier(2)
            threads = [threading.Thread(target=take, args=(led, f"{n}{round_}", start, outcomes))
                       for led, n in ((a, "a"), (b, "b"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes) == [False, True]
            assert a.balance(key)["reserved_pico_usd"] == 1000
            a.release([f"a{round_}", f"b{round_}"])  # whichever ledger won (release_all is per replica)


def test_a_version_1_ledger_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(_SCHEMA)
    con.execute("INSERT INTO api_keys VALUES ('key_old', 'old', 'abcdefgh', x'00', x'00', 1, 0, NULL)")
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    with Ledger(path) as led:
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert led.balance("key_old") is None and led.top_up("key_old", 7) == 7
        assert led.list_keys()[0]["name"] == "old"
