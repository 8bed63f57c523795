"""AsyncEngine: one background thread steps the LLMEngine; asyncio callers stream their own outputs.

The engine is not thread-safe, so only the stepping thread touches it. Callers post: `generate` queues its
request and `abort` its cancellation under a lock held for a moment only, never across a step, so an event
loop never waits for a step to end; the thread adds and aborts what was posted between steps. A request
the engine refuses (bad input: ValueError) raises from its own stream before any output. The thread
sleeps while there is no work; when a request wakes it, it waits a moment for more (the admission window:
until no new request arrived for ADMISSION_QUIET_S, at most ADMISSION_WINDOW_S), so a burst of requests
arriving together is prefilled together instead of the first one alone. Outputs are engine snapshots; the
outputs of one step reach each event loop in one call_soon_threadsafe, which puts each into its request's
asyncio queue. A consumer that stops listening (a disconnected HTTP client) aborts its request, which
frees its cache blocks before the next step; what it had generated is in the last output it received.

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

# After idling, the thread waits for a burst to finish arriving: until no request came for ADMISSION_QUIET_S,
# at most ADMISSION_WINDOW_S. A lone request pays ADMISSION_QUIET_S; a burst is prefilled in one step.
ADMISSION_QUIET_S = 0.002
ADMISSION_WINDOW_S = 0.05
logger = logging.getLogger("openr2.engine")


class EngineDeadError(RuntimeError):
    """The engine runs nothing any more: it failed (see AsyncEngine.failure) or was shut down."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_failure: Callable[[], None] | None = None):
        self.engine = engine
        self.on_failure = on_failure  # called once, from the engine thread, when the engine dies
        self.failure: str | None = None  # why the engine died; None while it is healthy
        self._cause: BaseException | None = None  # the exception that killed it
        self._lock = threading.Lock()  # guards the posts and _queues below, never held across a step
        self._work = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._adds: list[tuple] = []  # add_request arguments posted by generate(), added before the next step
        self._aborts: list[str] = []  # request ids posted by abort(), aborted before the next step
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="openr2-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_type(self) -> str:
        """The checkpoint's model_type (which chat format a template-less checkpoint speaks)."""
        return self.engine.model.config.model_type

    @property
    def max_model_len(self) -> int:
        """The context length: prompt + completion tokens of one request."""
        return self.engine.max_model_len

    @property
    def num_running(self) -> int:
        return self.engine.num_running  # a len() read without the lock: a scrape never waits for a step

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + len(self._adds)  # posted requests wait too

    @property
    def spec_stats(self):
        """Speculative decoding counters (engine/speculative.py SpecStats); plain ints, read without the lock."""
        return self.engine.spec_stats

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       salt: str | None = None, priority: int = 0,
                       restartable: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changed it; the last one is finished.

        Bad input raises ValueError before any output (nothing runs); a request the engine failed raises
        RequestError; a dead or shut-down engine raises EngineDeadError. `restartable` (the caller shows
        nothing before the end) matters only to the server's remote backend (server/gateway.py): a request
        here has no other engine to start again on.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._work:
            if self._stopped:
                raise EngineDeadError(self.failure or "the engine is shut down")
            if request_id in self._queues:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._adds.append((request_id, prompt, params, salt, priority))
            self._work.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):  # refused, or the engine died: nothing left to abort
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestError(f"request {request_id} failed in the engine") from item.error
                yield item
        finally:
            if not finished:  # the consumer went away, or failed: free the request's blocks now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed before the next step (the caller never waits for one)."""
        with self._work:
            if self._queues.pop(request_id, None) is not None and not self._stopped:
                self._aborts.append(request_id)
                self._work.notify()

    async def stop(self) -> None:
        """At the server's shutdown (its lifespan's end): blocks still queued for the disk tier are written, so
        that the next start finds them."""
        await asyncio.to_thread(self.engine.flush_cache)

    def shutdown(self) -> None:
        with self._work:
            self._stopped = True
            self._work.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------- the stepping thread
    def _run(self) -> None:
        while True:
            with self._work:
                idle = False
                while not (self._stopped or self._adds or self._aborts or self.engine.has_unfinished_requests()):
                    idle = True
                    self._work.wait()
                if idle:
                    self._gather_burst()
                if self._stopped:
                    break
                adds, aborts = self._adds, self._aborts
                self._adds, self._aborts = [], []
            refused = self._admit(adds, aborts)  # outside the lock: the engine is this thread's alone
            try:
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
            except BaseException as e:  # no request to blame: the engine cannot go on
                self._die(e)
                break
            self._hand_off(outputs, refused)
        self._fail_waiting(self.failure or "the engine is shut down")
        if self.failure is not None and self.on_failure is not None:
            self.on_failure()

    def _gather_burst(self) -> None:
        """Under the lock, after idling: wait until posts stop arriving for a moment (the admission window)."""
        deadline = time.monotonic() + ADMISSION_WINDOW_S
        seen = len(self._adds)
        while not self._stopped:
            left = deadline - time.monotonic()
            if left <= 0 or (not self._work.wait(min(ADMISSION_QUIET_S, left)) and len(self._adds) == seen):
                return
            seen = len(self._adds)

    def _admit(self, adds: list[tuple], aborts: list[str]) -> list[tuple[str, Exception]]:
        """Add the posted requests, then abort the posted aborts (one may name a request posted with it).
        Returns the refused requests with the reason (a ValueError for bad input)."""
        refused = []
        for request_id, *args in adds:
            try:
                self.engine.add_request(request_id, *args)
            except Exception as e:  # this request's own problem (bad input): its stream raises it
                refused.append((request_id, e))
        for request_id in aborts:
            self.engine.abort(request_id)
        return refused

    def _hand_off(self, outputs: list[RequestOutput], refused: list[tuple[str, Exception]]) -> None:
        """One wake-up per event loop per step: each loop gets its requests' outputs in one callback."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._work:
            for request_id, item in [*refused, *((out.request_id, out) for out in outputs)]:
                target = self._queues.get(request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], item))
                    if isinstance(item, BaseException) or item.finished:
                        del self._queues[request_id]
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                for _, item in deliveries:
                    if not isinstance(item, BaseException):
                        with self._work:
                            self._queues.pop(item.request_id, None)
                        self.engine.abort(item.request_id)

    def _die(self, error: BaseException) -> None:
        """Stop for good; the streams still waiting are failed on the way out of _run."""
        logger.critical("the engine failed; no request can run until the server restarts", exc_info=error)
        with self._work:
            self.failure = f"the engine step failed ({type(error).__name__}); see the server log"
            self._stopped = True
            self._cause = error

    def _fail_waiting(self, reason: str) -> None:
        """Every stream still waiting (and every request posted but never added) raises EngineDeadError."""
        with self._work:
            self._stopped = True
            waiting, self._queues = self._queues, {}
            self._adds, self._aborts = [], []
        for loop, queue in waiting.values():
            dead = EngineDeadError(reason)
            dead.__cause__ = self._cause
            try:
                loop.call_soon_threadsafe(queue.put_nowait, dead)
            except RuntimeError:  # that caller's event loop is closed
                pass


def _deliver(deliveries: list) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)
