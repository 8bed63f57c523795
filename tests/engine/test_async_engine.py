"""AsyncEngine: concurrent asyncio consumers, disconnects that abort, errors before queuing, a failing
request that ends alone, a failed step that marks the engine dead instead of hanging its callers; callers
never wait for a step, a burst is admitted into one step, and one step's outputs reach an event loop in
one hand-off."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from openr2.engine import async_engine
from openr2.engine.async_engine import AsyncEngine, EngineDeadError
from openr2.engine.engine import EngineConfig, LLMEngine, RequestError
from openr2.engine.sampling import SamplingParams
from tests.engine.test_engine import GREEDY, _naive_greedy, _prompts, _unsampleable, model  # noqa: F401 (fixture)


@pytest.fixture
def engine(model):  # noqa: F811
    front = AsyncEngine(LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32)))
    yield front
    front.shutdown()


def _settled(front, timeout_s: float = 10) -> bool:
    """Wait until the engine thread has run what was posted (aborts land before its next step)."""
    deadline = time.monotonic() + timeout_s
    while front.engine.has_unfinished_requests() or front.num_waiting:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def _collect(front, prompt, params):
    deltas, last = [], None
    async for out in front.generate(prompt, params):
        deltas += out.outputs[0].token_ids_delta
        last = out
    return deltas, last


def test_concurrent_consumers_get_their_own_tokens(engine, model):  # noqa: F811
    prompts = _prompts([7, 19, 30], seed=11)

    async def main():
        return await asyncio.gather(*(_collect(engine, p, GREEDY) for p in prompts))

    for prompt, (deltas, last) in zip(prompts, asyncio.run(main())):
        assert last.finished and deltas == last.outputs[0].token_ids == _naive_greedy(model, prompt, 16)


def test_disconnect_aborts_and_frees_blocks(engine):
    (prompt,) = _prompts([12], seed=12)

    async def main():
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True)):
            break  # the client goes away after the first output

    asyncio.run(main())  # closing the loop closes the generator, whose cleanup posts the abort
    assert _settled(engine)
    assert engine.engine.blocks.num_free == engine.engine.pool.num_blocks


def test_bad_input_raises_before_queuing(engine):
    async def main():
        async for _ in engine.generate([1, 2, 3], SamplingParams(temperature=-1)):
            pass

    with pytest.raises(ValueError, match="temperature"):
        asyncio.run(main())
    assert _settled(engine)


def test_a_failing_request_raises_alone_and_the_others_go_on(engine, model):  # noqa: F811
    good, bad = _prompts([10, 14], seed=13)

    async def main():
        async def failing():
            with pytest.raises(RequestError) as err:
                await _collect(engine, bad, _unsampleable(max_tokens=16))
            return err.value

        return await asyncio.gather(_collect(engine, good, GREEDY), failing())

    (deltas, last), error = asyncio.run(main())
    assert "Overflow" in str(error.__cause__)
    assert last.finished and deltas == _naive_greedy(model, good, 16)
    assert engine.failure is None and asyncio.run(_collect(engine, good, GREEDY))[0] == deltas
    assert engine.engine.blocks.num_free == engine.engine.pool.num_blocks


def test_a_failed_step_marks_the_engine_dead(model, monkeypatch):  # noqa: F811
    calls = []
    front = AsyncEngine(LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32)),
                        on_failure=lambda: calls.append("failed"))
    try:
        def broken(plan, **options):
            raise RuntimeError("device lost")  # no request to blame

        monkeypatch.setattr(front.engine.runner, "run", broken)
        (prompt,) = _prompts([8], seed=14)
        with pytest.raises(EngineDeadError):  # a waiting caller is told, not left hanging
            asyncio.run(_collect(front, prompt, GREEDY))
        front._thread.join(timeout=10)  # callers are told first, then on_failure runs as the thread ends
        assert "RuntimeError" in front.failure and calls == ["failed"]
        with pytest.raises(EngineDeadError):  # and so is every later one, at once
            asyncio.run(_collect(front, prompt, GREEDY))
    finally:
        front.shutdown()


def test_a_request_the_engine_refuses_raises_from_its_stream_alone(engine, model):  # noqa: F811
    good, too_long = _prompts([10, 300], seed=15)  # 300 tokens exceed the 32 blocks of 8 tokens

    async def main():
        async def refused():
            with pytest.raises(ValueError, match="KV cache pool"):
                await _collect(engine, too_long, GREEDY)

        return (await asyncio.gather(_collect(engine, good, GREEDY), refused()))[0]

    deltas, last = asyncio.run(main())
    assert last.finished and deltas == _naive_greedy(model, good, 16)
    assert _settled(engine) and engine.failure is None


def test_callers_never_wait_for_a_step(engine):
    """generate() and abort() only post: they return while a step is still running."""
    entered, release, left = threading.Event(), threading.Event(), threading.Event()
    step = engine.engine.step

    def slow_step():
        entered.set()
        release.wait(timeout=10)  # a caller that waited for the step would be stuck until then
        left.set()
        return step()

    engine.engine.step = slow_step
    first, second = _prompts([6, 9], seed=16)

    async def main():
        stream = engine.generate(first, GREEDY)
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.to_thread(entered.wait, 30)  # the engine thread is inside a step now
        other = engine.generate(second, GREEDY)
        pending = asyncio.ensure_future(other.__anext__())
        await asyncio.sleep(0)  # the second request is posted...
        engine.abort("nobody")  # ...and an abort too, while the step has not ended
        posted = not left.is_set() and engine.num_waiting >= 1
        release.set()
        outs = await asyncio.gather(waiting, pending)
        await stream.aclose()
        await other.aclose()
        return posted, outs

    posted, outs = asyncio.run(main())
    assert posted and all(len(out.outputs[0].token_ids) >= 1 for out in outs)
    assert _settled(engine) and engine.engine.blocks.num_free == engine.engine.pool.num_blocks


def test_a_burst_is_prefilled_in_one_step_and_handed_off_once_per_step(engine, monkeypatch):
    monkeypatch.setattr(async_engine, "ADMISSION_QUIET_S", 0.5)  # generous on a loaded machine
    monkeypatch.setattr(async_engine, "ADMISSION_WINDOW_S", 5.0)
    step, sizes = engine.engine.step, []

    def counted_step():
        outputs = step()
        sizes.append(len(outputs))
        return outputs

    engine.engine.step = counted_step
    prompts = _prompts([5, 7, 9, 11], seed=17)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        loop, wakeups = asyncio.get_running_loop(), []
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):
            wakeups.append(callback)
            return call_soon_threadsafe(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted
        await asyncio.gather(*(_collect(engine, p, params) for p in prompts))
        return wakeups

    wakeups = asyncio.run(main())
    assert sizes[0] == len(prompts)  # all four prompts were prefilled by the first step
    assert len(wakeups) == len([n for n in sizes if n])  # one wake-up per step, not one per request


def test_shutdown_ends_the_streams_still_waiting(model):  # noqa: F811
    front = AsyncEngine(LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32)))
    (prompt,) = _prompts([8], seed=18)

    async def main():
        async for _ in front.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True)):
            await asyncio.to_thread(front.shutdown)

    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(asyncio.wait_for(main(), 30))  # not left waiting forever
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(front, prompt, GREEDY))
