"""LLMEngine end to end on a random tiny model: exactness against a naive recompute loop under chunked
prefill and preemption, prefix-cache hits, forked samples, abort, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.engine.engine import EngineConfig, LLMEngine, RequestError
from openr2.engine.sampling import SamplingParams
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from tests.numerics import assert_close_to_reference, float64_compute, float64_copy

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    model = build_model(dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0), seed=0).eval()
    with torch.no_grad():  # a fresh init is nearly uniform; make greedy choices clear-cut
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return model


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def _naive_greedy(model, prompt, num_tokens):
    """The spec: recompute the whole sequence for every token, take the argmax."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt) :]


def _run(engine, requests, add_every=1):
    """Submit (id, prompt, params) one per `add_every` steps; collect final outputs by id."""
    pending, done, step = list(requests), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % add_every == 0:
            engine.add_request(*pending.pop(0))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


def test_greedy_equals_naive_loop_under_chunking_and_preemption(model):
    prompts = _prompts([5, 9, 17, 23, 31, 40, 12, 3])
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=20, max_num_batched_tokens=16))
    done = _run(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts)], add_every=2)
    assert engine.scheduler.num_preemptions > 0  # the pool was small enough to force recompute
    for i, prompt in enumerate(prompts):
        out = done[str(i)]
        assert out.outputs[0].token_ids == _naive_greedy(model, prompt, 16), f"prompt {i}"
        assert out.outputs[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 16
    assert engine.blocks.num_free == engine.pool.num_blocks  # everything released


def test_prefix_cache_hit_gives_the_same_tokens(model):
    (prompt,) = _prompts([70], seed=1)
    engine = LLMEngine(model, config=EngineConfig(block_size=16, num_blocks=32))
    cold = _run(engine, [("cold", prompt, GREEDY)])["cold"]
    warm = _run(engine, [("warm", prompt, GREEDY)])["warm"]
    assert cold.usage.cached_prompt_tokens == 0
    assert warm.usage.cached_prompt_tokens == 64  # four full blocks; the block with the last token is recomputed
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    other_tenant = _run(engine, [("t", {"prompt_token_ids": prompt}, GREEDY, "tenant-b")])["t"]
    assert other_tenant.usage.cached_prompt_tokens == 0
    engine.reset_prefix_cache()  # e.g. after a weight update: nothing cached is served again
    assert not engine.blocks.block_of and engine.blocks.num_free == engine.pool.num_blocks
    after = _run(engine, [("after", prompt, GREEDY)])["after"]
    assert after.usage.cached_prompt_tokens == 0 and after.outputs[0].token_ids == cold.outputs[0].token_ids
    assert engine.blocks.block_of  # its blocks are cached again


def test_n_seeded_samples_are_reproducible_and_share_the_prompt(model):
    (prompt,) = _prompts([21], seed=2)
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)

    def run():
        engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32))
        out = _run(engine, [("r", prompt, params)])["r"]
        return [o.token_ids for o in out.outputs], out

    first, out = run()
    second, _ = run()
    assert first == second
    assert len({tuple(t) for t in first}) > 1  # four different samples
    assert out.usage.completion_tokens == 4 * 12 and out.usage.prompt_tokens == 21


def test_abort_mid_generation_frees_every_block(model):
    prompts = _prompts([30, 50], seed=3)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=24))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.blocks.num_free < engine.pool.num_blocks
    for i in range(2):
        out = engine.abort(str(i))
        assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free == engine.pool.num_blocks
    assert engine.step() == []


def test_streaming_deltas_add_up(model):
    (prompt,) = _prompts([11], seed=4)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=16))
    deltas, last = [], None
    for out in engine.stream(prompt, GREEDY):
        deltas += out.outputs[0].token_ids_delta
        last = out
    assert last.finished and deltas == last.outputs[0].token_ids == _naive_greedy(model, prompt, 16)


def test_stop_token_ids_and_eos(model):
    (prompt,) = _prompts([9], seed=5)
    expected = _naive_greedy(model, prompt, 16)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=16))
    stop_at = expected[5]
    out = _run(engine, [("s", prompt, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_at]))])["s"]
    first = expected.index(stop_at)
    assert out.outputs[0].token_ids == expected[: first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop_at)


@pytest.mark.parametrize("prompt, params, match", [
    (list(range(1, 513)), GREEDY, "context window"),
    ([1, 2, 3], dict(temperature=-1.0), "temperature"),
    ([1, 2, 3], dict(top_p=0.0), "top_p"),
    ([1, 2, 3], dict(top_p=1.5), "top_p"),
    ([1, 2, 3], dict(n=0), "n"),
    ([1, 2, 3], dict(max_tokens=0), "max_tokens"),
    ([], GREEDY, "prompt"),
    ([1, 999], GREEDY, "prompt_token_ids"),
    ("text", GREEDY, "tokenizer"),
])
def test_bad_input_names_the_field(model, prompt, params, match):
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=128))
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", prompt, params if isinstance(params, SamplingParams) else SamplingParams(**params))
    assert not engine.has_unfinished_requests()


def test_pool_sized_from_budget_holds_only_the_latent(model):
    config = model.config
    engine = LLMEngine(model, config=EngineConfig(block_size=64, kv_cache_bytes=1 << 20))
    per_token = engine.pool.nbytes / (engine.pool.num_blocks * 64 * config.num_hidden_layers)
    assert per_token == (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # float32: C + R numbers
    assert engine.pool.nbytes <= 1 << 20


def test_abandoned_stream_is_aborted(model):
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=16))
    stream = engine.stream(_prompts([10], seed=6)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not engine.has_unfinished_requests() and engine.blocks.num_free == 16


def test_runner_picks_absorbed_for_few_queries_over_long_context(model):
    runner = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=8)).runner
    assert runner._attn_impl(1, 300) == "absorbed"
    assert runner._attn_impl(200, 200) == "naive"


def test_logprobs_match_the_model(model):
    (prompt,) = _prompts([13], seed=7)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=16))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    out = _run(engine, [("lp", prompt, params)])["lp"].outputs[0]
    assert len(out.logprobs) == 4
    ids = list(prompt)
    model64 = float64_copy(model)
    with torch.no_grad():
        for token, sample in zip(out.token_ids, out.logprobs):
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
            with float64_compute():
                ref64 = torch.log_softmax(model64(torch.tensor([ids]))[0, -1], dim=-1)
            assert sample.token_id == token == ref.argmax().item()
            top = ref.topk(3).indices
            assert [t for t, _ in sample.top] == top.tolist()
            # the engine's logprobs (paged cache, chunked prefill, decode steps; the chosen token's and the
            # top 3) vs the whole-sequence forward's; their rounding follows the logits' magnitude
            picked = torch.cat([torch.tensor([token]), top])
            got = torch.tensor([sample.logprob] + [lp for _, lp in sample.top], dtype=torch.float32)
            assert_close_to_reference(got, ref[picked], ref64[picked], scale=ref64.abs().max().item(),
                                      what=f"logprobs at token {len(ids) - len(prompt)}")
            ids.append(token)
    # the same Python floats added in the same order from 0.0: equal to the last bit
    assert out.cumulative_logprob == sum(s.logprob for s in out.logprobs)


def test_interactive_requests_run_before_batch_work(model):
    """A batch-priority request waits while interactive ones fill the step, and is preempted first."""
    prompts = _prompts([20, 20, 20], seed=8)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=64, max_num_seqs=2))
    engine.add_request("batch", prompts[0], GREEDY, priority=1)
    engine.add_request("chat-1", prompts[1], GREEDY)
    engine.add_request("chat-2", prompts[2], GREEDY)
    engine.step()
    assert {s.request_id for s in engine.scheduler.running} == {"chat-1", "chat-2"}
    done = _run(engine, [])
    assert set(done) == {"batch", "chat-1", "chat-2"}
    assert done["batch"].outputs[0].token_ids == _naive_greedy(model, prompts[0], 16)


def _unsampleable(**options) -> SamplingParams:
    """Params that pass validation, then are changed to what once killed the engine: the sampler's int64
    top_k tensor overflows (a stand-in for any failure inside one request's sampling)."""
    params = SamplingParams(temperature=1.0, ignore_eos=True, **options)
    params.top_k = 2**63
    return params


def test_a_request_failing_in_the_sampler_ends_alone(model):
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32))
    good, bad = _prompts([9, 11], seed=5)
    engine.add_request("good", good, GREEDY)
    engine.add_request("bad", bad, _unsampleable(max_tokens=16, n=2))
    done, failed = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                failed.append(out)
            elif out.finished:
                done[out.request_id] = out
    (out,) = failed  # reported once, finished, and its blocks are back
    assert out.request_id == "bad" and out.finished and out.outputs[0].finish_reason == "abort"
    assert "Overflow" in str(out.error)
    assert done["good"].outputs[0].token_ids == _naive_greedy(model, good, 16)
    assert engine.blocks.num_free == engine.pool.num_blocks
    with pytest.raises(RequestError):
        list(engine.stream(bad, _unsampleable(max_tokens=4)))
    assert not engine.has_unfinished_requests()
