"""The prepaid half of the ledger: an optional balance per API key, reservations and exact debits.

A mixin of `Ledger` (ledger.py), sharing its connection and transactions. A key without a balance (NULL,
the default) is never checked nor debited: without balances nothing changes. For a key with one:

  * admission: `reserve` sets aside each request's worst case (its whole prompt at the cache-miss price and
    every token it may generate at the output price, billing.PriceTable.worst_case), all or nothing, in one
    transaction, and refuses (InsufficientBalance) when the balance less what is already reserved cannot
    cover it. Two requests racing for the last of a balance are serialised by SQLite's write lock, or on
    PostgreSQL by a row lock on the key (replicas included): one wins.
  * settlement: the usage row of the request (ledger._insert_usage, same transaction) debits the exact cost
    and drops the reservation of the same request id. The cost can never exceed what was reserved, so a
    running request always finishes and the balance never goes below zero through requests.
  * `release` drops reservations that were never settled (a request refused or failed before it was
    billed); `release_all` at startup drops those of a process that died: every one on SQLite (one server
    per file, as for the batch lines that reset_in_flight hands back), on a shared database this process's own
    and those whose holder's lease lapsed (each reservation names its process, whose heartbeat renews it).
  * debits are one UPDATE ... SET balance = balance - cost: concurrent debits from replicas never lose one.

Amounts are integer pico-dollars, like every cost in the ledger (billing.py).
"""

from __future__ import annotations

from openr2.billing import format_usd
from openr2.server.db import retry_conflicts


class InsufficientBalance(ValueError):
    """The key's balance, less its reservations, cannot cover a request (the HTTP layer answers 402)."""

    def __init__(self, key_id: str, available: int, needed: int):
        super().__init__(f"Insufficient balance: this request may cost up to {format_usd(needed)} and "
                         f"{format_usd(max(available, 0))} is available.")
        self.key_id, self.available, self.needed = key_id, available, needed


class BalanceStore:
    """Balance methods of Ledger; they use its _db, _tx, _query, _now, _lease_until and replica_id."""

    def set_balance(self, key_id: str, pico_usd: int | None) -> None:
        """Give a key a prepaid balance (None: none, unlimited)."""
        if pico_usd is not None:
            _check_amount(pico_usd, "balance", allow_zero=True)
        with self._tx() as db:
            if db.execute("UPDATE api_keys SET balance_pico_usd = ? WHERE id = ?", (pico_usd, key_id)).rowcount != 1:
                raise ValueError(f"no key {key_id!r}")

    def top_up(self, key_id: str, pico_usd: int) -> int:
        """Add to a key's balance (a key without one starts from zero); returns the new balance."""
        _check_amount(pico_usd, "amount")
        with self._tx() as db:
            if db.execute("UPDATE api_keys SET balance_pico_usd = COALESCE(balance_pico_usd, 0) + ? WHERE id = ?",
                          (pico_usd, key_id)).rowcount != 1:
                raise ValueError(f"no key {key_id!r}")
            return db.execute("SELECT balance_pico_usd FROM api_keys WHERE id = ?", (key_id,)).fetchone()[0]

    def balance(self, key_id: str) -> dict | None:
        """{"balance_pico_usd", "reserved_pico_usd", "available_pico_usd"}, or None for a key without one."""
        rows = self._query("SELECT k.balance_pico_usd AS balance, CAST(SUM(r.amount_pico_usd) AS BIGINT) AS reserved"
                           " FROM api_keys k"
                           " LEFT JOIN reservations r ON r.key_id = k.id WHERE k.id = ? GROUP BY k.id", (key_id,))
        if not rows or rows[0]["balance"] is None:
            return None
        balance, reserved = rows[0]["balance"], int(rows[0]["reserved"] or 0)
        return {"balance_pico_usd": balance, "reserved_pico_usd": reserved, "available_pico_usd": balance - reserved}

    @retry_conflicts
    def reserve(self, key_id: str, amounts: dict[str, int]) -> bool:
        """Set aside `amounts` (request id -> worst-case pico-dollars) for a key, all or nothing. False (and
        no write) for a key without a balance; raises InsufficientBalance when it cannot cover them."""
        for amount in amounts.values():
            _check_amount(amount, "amount", allow_zero=True)
        if not self._query("SELECT 1 FROM api_keys WHERE id = ? AND balance_pico_usd IS NOT NULL", (key_id,)):
            return False  # the common case costs one read, no write
        with self._tx() as db:
            # the key's row locked (PostgreSQL) first: another replica's reserve waits here, then counts ours
            row = db.execute(f"SELECT balance_pico_usd AS balance FROM api_keys WHERE id = ?{self._db.lock}",
                             (key_id,)).fetchone()
            if row is None or row["balance"] is None:
                return False
            reserved = db.execute("SELECT CAST(SUM(amount_pico_usd) AS BIGINT) FROM reservations WHERE key_id = ?",
                                  (key_id,)).fetchone()[0] or 0
            available, needed = row["balance"] - reserved, sum(amounts.values())
            if needed > available:
                raise InsufficientBalance(key_id, available, needed)
            db.executemany("INSERT INTO reservations (id, key_id, amount_pico_usd, created_at, owner, lease_until)"
                           " VALUES (?,?,?,?,?,?)", [(rid, key_id, amount, self._now(), self.replica_id,
                                                      self._lease_until()) for rid, amount in amounts.items()])
        return True

    @retry_conflicts
    def release(self, request_ids) -> None:
        """Drop reservations that will not be settled (a no-op for ids already settled)."""
        with self._tx() as db:
            db.executemany("DELETE FROM reservations WHERE id = ?", [(rid,) for rid in request_ids])

    @retry_conflicts
    def release_all(self) -> int:
        """At startup: drop the reservations of requests a previous process never finished. Returns how many."""
        with self._tx() as db:
            if self._db.shared:  # this process's own and lapsed ones; the others are live replicas' requests
                return db.execute("DELETE FROM reservations WHERE owner = ? OR lease_until IS NULL OR"
                                  " lease_until <= ?", (self.replica_id, self._now())).rowcount
            return db.execute("DELETE FROM reservations").rowcount

    def _settle(self, db, key_id: str, request_id: str, cost: int, billed: bool) -> None:
        """Inside the usage row's transaction: debit the exact cost (if the row was new) and drop the
        request's reservation."""
        db.execute("DELETE FROM reservations WHERE id = ?", (request_id,))
        if billed and cost:
            db.execute("UPDATE api_keys SET balance_pico_usd = balance_pico_usd - ? WHERE id = ? AND"
                       " balance_pico_usd IS NOT NULL", (cost, key_id))


def _check_amount(value, name: str, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer of pico-dollars,"
                         f" got {value!r}")
