"""AsyncEngine: concurrent asyncio consumers, disconnects that abort, errors before queuing."""

from __future__ import annotations

import asyncio

import pytest

from openr2.engine.async_engine import AsyncEngine
from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.engine.sampling import SamplingParams
from tests.engine.test_engine import GREEDY, _naive_greedy, _prompts, model  # noqa: F401 (fixture)


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
