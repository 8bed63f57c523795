"""Per-key rate limits counted in the database, so that replicas sharing it enforce one limit together.

The same sliding 60-second windows and the same answer as ratelimit.RateLimiter (ratelimit.wait_s): a
request is admitted and recorded, or told how long to wait, without being recorded. Each admission is one
transaction that takes a per-key lock (db.lock_name: a PostgreSQL advisory lock; SQLite's write lock), so
two replicas admitting requests of one key at once are counted one after the other and the limit holds.
Events are rows of rate_events, deleted once they leave the window.

Each admission is a database round trip, so the server runs it off its event loop, on `executor` (one thread:
the limiter has one connection anyway, and a slow database then holds up admissions only, not the worker
threads that bill and the streams on the loop).

The clock: the ledger gives its limiter the database server's (db.DatabaseClock, synced once a window), so
replicas whose own clocks disagree still count one window. Commits do not wait for the
disk (synchronous_commit off on PostgreSQL): a crash forgets at most the last instants' events, which errs
on the side of the client, as a restart of the in-memory limiter does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from openr2.server.ratelimit import _check_tokens, check_admissible, check_limits, wait_s


class SharedRateLimiter:
    """Sliding-window limits per key in the database `db` (a db.SQLiteDatabase or db.PostgresDatabase of its
    own: admissions then never wait behind the ledger's transactions). A limit of 0 or None: unlimited."""

    def __init__(self, db, requests_per_min: int | None = None, tokens_per_min: int | None = None,
                 window_s: float = 60.0, clock: Callable[[], float] = time.time):
        check_limits(requests_per_min, tokens_per_min, window_s)
        self.db = db
        self.requests_per_min = requests_per_min or None
        self.tokens_per_min = tokens_per_min or None
        self.window_s = float(window_s)
        self._clock = clock
        self._last_sweep = self._synced = clock()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="openr2-ratelimit")

    @property
    def enabled(self) -> bool:
        return self.requests_per_min is not None or self.tokens_per_min is not None

    def acquire(self, key_id: str, tokens: int = 0) -> float:
        """Admit and record one request of `tokens`, returning 0.0; or return seconds to wait (> 0).
        ValueError when `tokens` alone exceeds tokens_per_min (see RateLimiter.acquire)."""
        check_admissible(tokens, self.tokens_per_min)
        if not self.enabled:
            return 0.0
        now = self._now()
        with self._window(key_id, now) as (db, requests, token_events):
            wait = wait_s(requests, token_events, sum(n for _, n in token_events), now, tokens,
                          self.requests_per_min, self.tokens_per_min, self.window_s)
            if wait > 0:
                return wait
            db.execute("INSERT INTO rate_events (key_id, at_ms, tokens, request) VALUES (?, ?, ?, 1)",
                       (key_id, _ms(now), tokens))
        return 0.0

    def record_tokens(self, key_id: str, tokens: int) -> None:
        """Count more tokens now (e.g. output beyond what was admitted), without an admission check."""
        _check_tokens(tokens)
        if not tokens or self.tokens_per_min is None:
            return
        now = self._now()
        with self._window(key_id, now) as (db, _, _):
            db.execute("INSERT INTO rate_events (key_id, at_ms, tokens, request) VALUES (?, ?, ?, 0)",
                       (key_id, _ms(now), tokens))

    def _now(self) -> float:
        now = self._clock()
        if hasattr(self._clock, "sync") and now - self._synced >= self.window_s:  # the local clock's drift
            self._clock.sync()
            now = self._synced = self._clock()
        return now

    @contextmanager
    def _window(self, key_id: str, now: float):
        """A transaction holding the key's lock: (db, request times, (time, tokens) events), the key's events
        still in the window, oldest first."""
        with self.db.tx() as db:
            if self.db.dialect == "postgresql":
                db.execute("SET LOCAL synchronous_commit = off")
            self.db.lock_name(db, f"openr2-rate:{key_id}")
            cutoff = _ms(now - self.window_s)
            if now - self._last_sweep >= self.window_s:  # once a window: the events of keys gone idle too
                self._last_sweep = now
                db.execute("DELETE FROM rate_events WHERE at_ms <= ?", (cutoff,))
            else:
                db.execute("DELETE FROM rate_events WHERE key_id = ? AND at_ms <= ?", (key_id, cutoff))
            rows = db.execute("SELECT at_ms, tokens, request FROM rate_events WHERE key_id = ? ORDER BY at_ms",
                              (key_id,)).fetchall()
            yield db, [r[0] / 1000 for r in rows if r[2]], [(r[0] / 1000, r[1]) for r in rows if r[1]]

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.db.close()


def _ms(t: float) -> int:
    return round(t * 1000)
