"""Per-key rate limits: requests per minute and tokens per minute over a sliding 60-second window.

Owns only in-memory bookkeeping (a restart forgets the window, which errs on the side of the client); it
does not know keys exist in the ledger nor how a 429 is rendered. `acquire` either admits a request and
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
        for name, value in (("requests_per_min", requests_per_min), ("tokens_per_min", tokens_per_min)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
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
        _check_tokens(tokens)
        if self.tokens_per_min is not None and tokens > self.tokens_per_min:
            raise ValueError(f"tokens: the request needs {tokens} tokens but the limit is "
                             f"{self.tokens_per_min} tokens per minute")
        if not self.enabled:
            return 0.0
        with self._lock:
            now = self._clock()
            w = self._window(key_id, now)
            wait = 0.0
            if self.requests_per_min is not None and len(w.requests) >= self.requests_per_min:
                # Admission needs the count below the limit: wait for the (len - limit + 1)-th oldest to leave.
                wait = w.requests[len(w.requests) - self.requests_per_min] + self.window_s - now
            if self.tokens_per_min is not None:
                excess = w.token_sum + tokens - self.tokens_per_min
                for t, n in w.tokens:  # walk until enough old tokens have left the window
                    if excess <= 0:
                        break
                    excess -= n
                    wait = max(wait, t + self.window_s - now)
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


def _check_tokens(tokens) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
