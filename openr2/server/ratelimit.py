"""Per-key rate limits: requests per minute and tokens per minute over a sliding 60-second window.

Owns only in-memory bookkeeping (a restart forgets the window, which errs on the side of the client); it
does not know keys exist in the ledger nor how a 429 is rendered. Replicas sharing a PostgreSQL ledger count
in the database instead (shared_ratelimit.py, same rule, same wait_s). `acquire` either admits a request and
records it, or returns how many seconds to wait (the Retry-After value) without recording anything.

    limiter = RateLimiter(requests_per_min=60, tokens_per_min=100_000)
    wait_s = limiter.acquire(key_id, tokens=prompt_tokens + max_tokens)
    if wait_s: -> 429 with Retry-After: math.ceil(wait_s)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """Sliding-window limits per key. A limit of 0 or None means unlimited. Thread-safe."""

    def __init__(self, requests_per_min: int | None = None, tokens_per_min: int | None = None,
                 window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        check_limits(requests_per_min, tokens_per_min, window_s)
        self.requests_per_min = requests_per_min or None
        self.tokens_per_min = tokens_per_min or None
        self.window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.requests_per_min is not None or self.tokens_per_min is not None

    def acquire(self, key_id: str, tokens: int = 0) -> float:
        """Admit and record one request of `tokens`, returning 0.0; or return seconds to wait (> 0).

        Raises ValueError when `tokens` alone exceeds tokens_per_min: waiting would never help, so the
        caller should reject the request outright (413/400) rather than answer 429.
        """
        check_admissible(tokens, self.tokens_per_min)
        if not self.enabled:
            return 0.0
        with self._lock:
            now = self._clock()
            w = self._window(key_id, now)
            wait = wait_s(w.requests, w.tokens, w.token_sum, now, tokens, self.requests_per_min,
                          self.tokens_per_min, self.window_s)
            if wait > 0:
                return wait
            w.requests.append(now)
            w.add_tokens(now, tokens)
            self._windows[key_id] = w
            return 0.0

    def record_tokens(self, key_id: str, tokens: int) -> None:
        """Count more tokens now (e.g. output beyond what was admitted), without an admission check."""
        _check_tokens(tokens)
        if not tokens or self.tokens_per_min is None:
            return
        with self._lock:
            now = self._clock()
            w = self._window(key_id, now)
            w.add_tokens(now, tokens)
            self._windows[key_id] = w

    def _window(self, key_id: str, now: float) -> _Window:
        if now - self._last_sweep >= self.window_s:  # once a window, drop keys idle for a whole window
            self._last_sweep = now
            for k in [k for k, w in self._windows.items() if w.idle_since(now - self.window_s)]:
                del self._windows[k]
        w = self._windows.get(key_id) or _Window()
        w.expire(now - self.window_s)
        if not w.requests and not w.tokens:
            self._windows.pop(key_id, None)
        return w


class _Window:
    """One key's events inside the window, oldest first."""

    def __init__(self):
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0

    def add_tokens(self, now: float, n: int) -> None:
        if n:
            self.tokens.append((now, n))
            self.token_sum += n

    def idle_since(self, cutoff: float) -> bool:
        """True if every event is at or before cutoff (all would expire)."""
        return (not self.requests or self.requests[-1] <= cutoff) and \
            (not self.tokens or self.tokens[-1][0] <= cutoff)

    def expire(self, cutoff: float) -> None:
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            self.token_sum -= self.tokens.popleft()[1]


def wait_s(requests, token_events, token_sum: int, now: float, tokens: int, requests_per_min: int | None,
           tokens_per_min: int | None, window_s: float) -> float:
    """Seconds until one more request of `tokens` fits a key's window (0.0: now). `requests`: the times of
    the requests in the window, oldest first; `token_events`: (time, tokens) in the window, oldest first,
    summing to token_sum. Shared by the in-memory limiter and the database one (shared_ratelimit.py)."""
    wait = 0.0
    if requests_per_min is not None and len(requests) >= requests_per_min:
        # Admission needs the count below the limit: wait for the (len - limit + 1)-th oldest to leave.
        wait = requests[len(requests) - requests_per_min] + window_s - now
    if tokens_per_min is not None:
        excess = token_sum + tokens - tokens_per_min
        for t, n in token_events:  # walk until enough old tokens have left the window
            if excess <= 0:
                break
            excess -= n
            wait = max(wait, t + window_s - now)
    return wait


def check_limits(requests_per_min, tokens_per_min, window_s) -> None:
    for name, value in (("requests_per_min", requests_per_min), ("tokens_per_min", tokens_per_min)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s!r}")


def check_admissible(tokens, tokens_per_min) -> None:
    """ValueError when `tokens` is not a token count, or alone exceeds tokens_per_min (waiting never helps)."""
    _check_tokens(tokens)
    if tokens_per_min is not None and tokens > tokens_per_min:
        raise ValueError(f"tokens: the request needs {tokens} tokens but the limit is "
                         f"{tokens_per_min} tokens per minute")


def _check_tokens(tokens) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
