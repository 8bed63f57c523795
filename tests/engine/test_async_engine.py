"""AsyncEngine: concurrent asyncio consumers, disconnects that abort, errors before queuing, a failing
request that ends alone, and a failed step that marks the engine dead instead of hanging its callers."""

from __future__ import annotations

import asyncio

import pytest

from openr2.engine.async_engine import AsyncEngine, EngineDeadError
from openr2.engine.engine import EngineConfig, LLMEngine, RequestError
from openr2.engine.sampling import SamplingParams
from tests.engine.test_engine import GREEDY, _naive_greedy, _prompts, _unsampleable, model  # noqa: F401 (fixture)


@pytest.fixture
def engine(model):  # noqa: F811
    front = AsyncEngine(LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32)))
    yield front
    front.shutdown()


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

    asyncio.run(main())  # closing the loop closes the generator, whose cleanup aborts at once
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.blocks.num_free == engine.engine.pool.num_blocks


def test_bad_input_raises_before_queuing(engine):
    async def main():
        async for _ in engine.generate([1, 2, 3], SamplingParams(temperature=-1)):
            pass

    with pytest.raises(ValueError, match="temperature"):
        asyncio.run(main())
    assert not engine.engine.has_unfinished_requests()


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
        assert "RuntimeError" in front.failure and calls == ["failed"]
        with pytest.raises(EngineDeadError):  # and so is every later one, at once
            asyncio.run(_collect(front, prompt, GREEDY))
    finally:
        front.shutdown()
