"""AsyncEngine: one background thread steps the LLMEngine; asyncio callers stream their own outputs.

The engine is not thread-safe, so every touch (add, abort, step) happens under one lock; the stepping
thread sleeps while there is no work. Outputs are engine snapshots handed to each request's asyncio queue
on its own event loop. A consumer that stops listening (a disconnected HTTP client) aborts its request,
which frees its cache blocks; what it had generated is in the last output it received.

Failures. A request the engine ended with an error raises RequestError from its own stream; the others
go on. A step that fails as a whole (no single request to blame) leaves the engine in an unknown state,
so the thread stops for good: every waiting stream, and every later generate(), raises EngineDeadError,
`failure` says why, and `on_failure` is called (the server exits so that a supervisor restarts it).

This is the server's whole view of the engine: `generate`, `abort`, `shutdown`, `failure`, and what the
model offers (`tokenizer`, `max_model_len`, the context length) and how busy it is (`num_running`,
`num_waiting`), so the routes never reach into the engine's parts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from openr2.engine.engine import LLMEngine, RequestError, RequestOutput
from openr2.engine.sampling import SamplingParams

ADMISSION_WINDOW_S = 0.003  # after idling, wait this long so requests arriving together start together
logger = logging.getLogger("openr2.engine")


class EngineDeadError(RuntimeError):
    """The engine runs nothing any more: it failed (see AsyncEngine.failure) or was shut down."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_failure: Callable[[], None] | None = None):
        self.engine = engine
        self.on_failure = on_failure  # called once, from the engine thread, when the engine dies
        self.failure: str | None = None  # why the engine died; None while it is healthy
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="openr2-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """The context length: prompt + completion tokens of one request."""
        return self.engine.max_model_len

    @property
    def num_running(self) -> int:
        return self.engine.num_running  # a len() read without the lock: a scrape never waits for a step

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def spec_stats(self):
        """Speculative decoding counters (engine/speculative.py SpecStats); plain ints, read without the lock."""
        return self.engine.spec_stats

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       salt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changed it; the last one is finished.

        Bad input raises ValueError before anything is queued; a request the engine failed raises
        RequestError; a dead or shut-down engine raises EngineDeadError.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._work:
            if self._stopped:
                raise EngineDeadError(self.failure or "the engine is shut down")
            self.engine.add_request(request_id, prompt, params, salt, priority)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._work.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestError(f"request {request_id} failed in the engine") from item.error
                yield item
        finally:
            if not finished:  # the consumer went away, or failed: free the request's blocks now
                self.abort(request_id)

    def abort(self, request_id: str) -> RequestOutput | None:
        with self._work:
            self._queues.pop(request_id, None)
            if self.failure is not None:  # the engine's state is unknown: leave it alone
                return None
            return self.engine.abort(request_id)

    def shutdown(self) -> None:
        with self._work:
            self._stopped = True
            self._work.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._work:
                idle = False
                while not self._stopped and not self.engine.has_unfinished_requests():
                    idle = True
                    self._work.wait()
            if idle:  # a burst of requests is arriving: let it gather so its prompts prefill together
                time.sleep(ADMISSION_WINDOW_S)
            with self._work:
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                except BaseException as e:  # no request to blame: the engine cannot go on
                    self._die(e)
                    break
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                for out in outputs:
                    target = self._queues.get(out.request_id)
                    if target is not None:
                        by_loop.setdefault(target[0], []).append((target[1], out))
                        if out.finished:
                            del self._queues[out.request_id]
            # One wake-up per event loop per step (outside the lock: the next step may start at once).
            for loop, deliveries in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, deliveries)
                except RuntimeError:  # the caller's event loop is closed: nobody is listening
                    for _, out in deliveries:
                        self.abort(out.request_id)
        if self.on_failure is not None:
            self.on_failure()

    def _die(self, error: BaseException) -> None:
        """Under the lock: stop for good and fail every waiting stream."""
        logger.critical("the engine failed; no request can run until the server restarts", exc_info=error)
        self.failure = f"the engine step failed ({type(error).__name__}); see the server log"
        self._stopped = True
        for loop, queue in self._queues.values():
            dead = EngineDeadError(self.failure)
            dead.__cause__ = error
            try:
                loop.call_soon_threadsafe(queue.put_nowait, dead)
            except RuntimeError:  # that caller's event loop is closed
                pass
        self._queues.clear()


def _deliver(deliveries: list) -> None:
    for queue, out in deliveries:
        queue.put_nowait(out)
