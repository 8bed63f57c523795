"""AsyncEngine: one background thread steps the LLMEngine; asyncio callers stream their own outputs.

The engine is not thread-safe, so every touch (add, abort, step) happens under one lock; the stepping
thread sleeps while there is no work. Outputs are engine snapshots handed to each request's asyncio queue
on its own event loop. A consumer that stops listening (a disconnected HTTP client) aborts its request,
which frees its cache blocks; what it had generated is in the last output it received.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator

from openr2.engine.engine import LLMEngine, RequestOutput
from openr2.engine.sampling import SamplingParams

ADMISSION_WINDOW_S = 0.003  # after idling, wait this long so requests arriving together start together


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="openr2-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       salt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changed it; the last one is finished.

        Bad input raises ValueError before anything is queued.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._work:
            if self._stopped:
                raise RuntimeError("engine is shut down")
            self.engine.add_request(request_id, prompt, params, salt, priority)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._work.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed") from item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away, or failed: free the request's blocks now
                self.abort(request_id)

    def abort(self, request_id: str) -> RequestOutput | None:
        with self._work:
            self._queues.pop(request_id, None)
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
                except BaseException as e:  # hand the failure to every waiting caller, then stop
                    for loop, queue in self._queues.values():
                        loop.call_soon_threadsafe(queue.put_nowait, e)
                    self._queues.clear()
                    self._stopped = True
                    return
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


def _deliver(deliveries: list) -> None:
    for queue, out in deliveries:
        queue.put_nowait(out)
