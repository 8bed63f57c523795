"""Speculative decoding (engine/speculative.py + rejection.sample_with_drafts): greedy outputs equal those
without drafts token for token (MTP and n-gram, on the demo model, on random models whose drafts are mostly
rejected, on a checkpoint transformers wrote), seeded sampling reproduces, the prefix cache never holds a
rejected token, limits and usage are unchanged, bad configs are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.engine.llm import LLM
from openr2.engine.prefix_cache import chain_hashes
from openr2.engine.sampling import SamplingParams
from openr2.engine.speculative import SpeculativeConfig, ngram_propose
from openr2.model.mla import LatentCache
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from tests.numerics import assert_close_to_reference, float64_compute, float64_copy

DEMO = Path(__file__).resolve().parents[2] / "openr2" / "assets" / "openr2-demo"
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _random_model(num_mtp: int, seed: int = 0):
    model = build_model(dataclasses.replace(tiny_v3(), num_nextn_predict_layers=num_mtp), seed=seed).eval()
    with torch.no_grad():  # clear-cut greedy choices; the MTP drafts stay mostly wrong (it is untrained)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return model


def _prompts(lengths, seed=0, vocab=256):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _generate(model, prompts, params, tokenizer=None, compile=False, **options):
    llm = LLM(model, tokenizer, compile=compile, **options)
    outs = llm.generate(prompts, params)
    return outs, llm.engine


def _token_ids(outs):
    return [[o.token_ids for o in out.outputs] for out in outs]


@pytest.fixture(scope="module")
def demo():
    from openr2.checkpoints import load_model
    from openr2.tokenizer import Tokenizer

    return load_model(str(DEMO)), Tokenizer.from_pretrained(str(DEMO))


@pytest.mark.parametrize("spec", [{"method": "mtp", "num_speculative_tokens": 1}, "mtp:3", "ngram:3"])
def test_demo_greedy_outputs_equal_and_mtp_drafts_are_accepted(demo, spec):
    model, tokenizer = demo
    from openr2.chat_format import encode_chat

    questions = ["What is 123+456?", "Compute 905-388.", "hello", "Add 77 and 18.", "What is 340-59?"]
    prompts = [{"prompt_token_ids": encode_chat([{"role": "user", "content": q}], tokenizer)} for q in questions]
    params = SamplingParams(temperature=0, max_tokens=160)
    want, _ = _generate(model, prompts, params, tokenizer)
    got, engine = _generate(model, prompts, params, tokenizer, speculative_config=spec)
    assert _token_ids(got) == _token_ids(want)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert [o.usage for o in got] == [o.usage for o in want]  # usage is unchanged by speculation
    stats = engine.spec_stats
    assert stats.num_draft_tokens > 0
    if spec == "mtp:3":
        assert stats.num_draft_tokens > stats.num_drafts  # chained beyond the one MTP module
    if "mtp" in str(spec):  # the demo's MTP module is trained: its first draft is nearly always right
        assert stats.num_accepted_tokens >= 0.5 * stats.num_drafts


@pytest.mark.parametrize("num_mtp,spec", [(1, "mtp:2"), (2, "mtp:3"), (0, "ngram:2")])
def test_greedy_outputs_equal_with_mostly_rejected_drafts(num_mtp, spec):
    """Rows with and without drafts in one step (chunked prefills beside decodes), preemption, n > 1."""
    model = _random_model(num_mtp)
    prompts = _prompts([5, 40, 17, 70, 9, 33], seed=num_mtp)
    options = dict(block_size=8, num_blocks=40, max_num_batched_tokens=48)
    params = [GREEDY, GREEDY, dataclasses.replace(GREEDY, n=2, seed=1), GREEDY, GREEDY, GREEDY]
    want, _ = _generate(model, prompts, params, **options)
    got, engine = _generate(model, prompts, params, speculative_config=spec, **options)
    assert _token_ids(got) == _token_ids(want)
    stats = engine.spec_stats
    assert stats.num_draft_tokens > stats.num_accepted_tokens  # rejections (and rollbacks) happened
    assert engine.blocks.num_free == engine.pool.num_blocks  # every block came back


def test_ngram_on_a_checkpoint_transformers_wrote(tmp_path):
    from tests.hf_utils import hf_model

    config = dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0)
    hf_model(config).save_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], _prompts([30])[0]]
    # eager (LLM compiles by default: ~75 s of exports here; the compiled widths are tested on the demo model)
    want = LLM(str(tmp_path), compile=False).generate(prompts, GREEDY)
    engine = LLM(str(tmp_path), compile=False, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                                   "prompt_lookup_max": 3, "prompt_lookup_min": 2})
    assert _token_ids(engine.generate(prompts, GREEDY)) == _token_ids(want)


def test_seeded_sampling_reproduces_with_drafts():
    model = _random_model(1)
    prompts = _prompts([6, 21], seed=3)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=20, ignore_eos=True, n=2)
    runs = [_token_ids(_generate(model, prompts, params, speculative_config="mtp:2")[0]) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][0][0] != runs[0][0][1]  # the n samples differ


def test_prefix_cache_never_holds_a_rejected_token():
    """Every block the prefix cache holds has exactly the latent KV of the committed tokens it hashes."""
    model = _random_model(1)
    prompts = _prompts([13, 30, 8], seed=5)
    outs, engine = _generate(model, prompts, GREEDY, block_size=4, num_blocks=64, speculative_config="mtp:3")
    assert engine.spec_stats.num_accepted_tokens < engine.spec_stats.num_draft_tokens
    L, checked = model.config.num_hidden_layers, 0
    for out in outs:
        tokens = out.prompt_token_ids + out.outputs[0].token_ids
        hashes = chain_hashes(tokens, 4, None)
        plain, ref = _latent_kv(model, tokens), _latent_kv(model, tokens, float64=True)
        for i, h in enumerate(hashes):
            block = engine.blocks.block_of.get(h)
            if block is None:
                continue
            slots = slice(block * 4, block * 4 + 4)
            got = torch.cat((engine.pool.c_kv[:L, slots], engine.pool.k_rope[:L, slots]), -1)
            pos = slice(i * 4, i * 4 + 4)
            assert_close_to_reference(got, plain[:, pos], ref[:, pos], what=f"block {i} of a request")
            checked += 1
    assert checked >= 10


@torch.no_grad()
def _latent_kv(model, tokens, float64=False):
    """[L, T, C + R] latent cache of `tokens` from one contiguous forward (float64 for the reference)."""
    if float64:
        with float64_compute():
            return _latent_kv(float64_copy(model), tokens)
    dtype = next(model.parameters()).dtype
    cache = LatentCache.for_model(model.config, 1, len(tokens), dtype=dtype)
    model(torch.tensor([tokens]), cache=cache)
    return torch.cat((cache.c_kv[:, 0], cache.k_rope[:, 0]), -1)


def test_limits_stops_and_logprobs_see_committed_tokens_only(demo):
    model, tokenizer = demo
    from openr2.chat_format import encode_chat

    prompt = {"prompt_token_ids": encode_chat([{"role": "user", "content": "What is 123+456?"}], tokenizer)}
    for params in (SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0, max_tokens=7, logprobs=2),
                   SamplingParams(temperature=0, max_tokens=100, stop=["carry"])):
        want, _ = _generate(model, [prompt], params, tokenizer)
        got, _ = _generate(model, [prompt], params, tokenizer, speculative_config="mtp:3")
        w, g = want[0].outputs[0], got[0].outputs[0]
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert len(g.token_ids) <= params.max_tokens
        if params.logprobs:
            for a, b in zip(g.logprobs, w.logprobs):
                assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # the stream of a stopped request never shows text past the stop string
    engine = LLMEngine(model, tokenizer, EngineConfig(speculative_config="mtp:3"))
    text = "".join(out.outputs[0].text_delta for out in engine.stream(prompt, params))
    assert "carry" not in text and text == want[0].outputs[0].text


def test_ngram_lookup():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3], 2, 3, 1) == [9, 1]
    assert ngram_propose([1, 2, 3, 4], 2, 3, 1) == []
    assert ngram_propose([7, 5, 7, 6, 7], 3, 2, 1) == [6, 7]  # the most recent occurrence of [7]
    assert ngram_propose([4, 4], 3, 3, 1) == [4]


def test_bad_configs_are_refused():
    model = _random_model(0)
    with pytest.raises(ValueError, match="MTP modules"):
        LLMEngine(model, config=EngineConfig(speculative_config="mtp:2"))
    for bad in ("eagle:2", "mtp:0", "mtp", {"method": "ngram"}, {"method": "ngram", "num_speculative_tokens": 2,
                                                                  "prompt_lookup_min": 3, "prompt_lookup_max": 2}, 5):
        with pytest.raises(ValueError, match="speculative"):
            SpeculativeConfig.parse(bad)


@pytest.mark.slow
def test_compiled_steps_several_tokens_wide_equal_eager(demo):
    """The compiled decode step verifying a token and its drafts gives the eager engine's outputs."""
    model, tokenizer = demo
    from openr2.chat_format import encode_chat

    prompt = {"prompt_token_ids": encode_chat([{"role": "user", "content": "Subtract 199 from 512."}], tokenizer)}
    params = SamplingParams(temperature=0, max_tokens=120)
    want, _ = _generate(model, [prompt], params, tokenizer)
    got, engine = _generate(model, [prompt], params, tokenizer, compile=True, speculative_config="mtp:2")
    assert engine.runner._compiled_decode is not None  # it compiled, and stayed compiled
    assert _token_ids(got) == _token_ids(want)
    assert engine.spec_stats.num_accepted_tokens > engine.spec_stats.num_drafts  # widths 3 were verified
    # sampled rows commit tokens that are not always the argmax: the fused draft step's guess is then redone
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=60, ignore_eos=True)
    runs = [_token_ids(_generate(model, [prompt], sampled, tokenizer, compile=True, speculative_config="mtp:2")[0])
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_policy_measures_every_width_then_runs_the_best_and_keeps_probing():
    from openr2.engine.speculative import SpecPolicy

    policy = SpecPolicy(max_k=2, probe_every=8)
    seconds = {0: 1.0, 1: 0.8, 2: 1.5}  # tokens per second: k=1 is best, k=2 loses to k=0
    tokens = {0: 1, 1: 2, 2: 2}
    chosen = []
    for _ in range(40):
        k = policy.choose(num_rows=8)
        chosen.append(k)
        policy.record(8, k, tokens[k], seconds[k])
    assert chosen[:9] == [2] * 3 + [1] * 3 + [0] * 3  # each width measured min_samples times, widest first
    assert chosen.count(1) >= 30 and 0 in chosen[3:] and 2 in chosen[3:]  # the best, and probes of the others
    assert policy.choose(num_rows=1) == 2  # another batch size class is measured on its own
    for _ in range(policy.min_samples):
        policy.record(1, 2, 2, 1.0)
    policy.record(8, 2, 2, 1e-3)  # a much faster step replaces a stale (e.g. compiling) measurement
    assert policy.rate[policy.batch_class(8), 2] == pytest.approx(2000)


def test_policy_keeps_to_the_cap_it_is_given():
    from openr2.engine.speculative import SpecPolicy

    policy = SpecPolicy(max_k=3, probe_every=4)
    chosen = []
    for _ in range(20):
        k = policy.choose(num_rows=8, max_k=1)
        chosen.append(k)
        policy.record(8, k, 1 + k, 1.0)
    assert set(chosen) == {0, 1}  # widths past the cap are never tried, the others are
    assert policy.choose(num_rows=8, max_k=0) == 0


def test_drafts_are_capped_where_a_step_would_leave_the_compiled_shapes():
    engine = LLMEngine(_random_model(1), config=EngineConfig(num_blocks=8, speculative_config="mtp:3"))
    runner = engine.runner
    assert runner.max_drafts(8) is None  # eager engine: no cap
    runner._compiled_decode = object()  # as if compiled (only max_drafts looks at it here)
    assert [runner.max_drafts(rows) for rows in (1, 4, 5, 8, 16, 17)] == [3, 3, 2, 1, 0, None]


@pytest.mark.slow
def test_compiled_draft_over_prompts_equals_eager():
    """runner.draft over long rows (prompts) in a compiled engine writes the MTP keys before the drafting
    position eagerly and drafts there through the compiled one-token step: the eager draft's logits, block
    output and MTP cache."""
    from openr2.engine.kv_cache import KVPool
    from openr2.engine.runner import ModelRunner
    from openr2.engine.sequence import Sequence

    model = _random_model(1)
    L, D = model.config.num_hidden_layers + 1, model.config.hidden_size
    gen = torch.Generator().manual_seed(4)
    lengths, tables = (13, 6), ([5, 1, 6, 2], [7, 3])
    ids = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    hidden = [torch.randn(n, D, generator=gen) for n in lengths]

    def draft(m, compile, dtype=torch.float32):
        pool = KVPool(m.config, num_blocks=8, block_size=4, dtype=dtype, num_layers=L)
        seqs = [Sequence(i, str(i), 0, list(range(n)), n, SamplingParams(), None) for i, n in enumerate(lengths)]
        for seq, table in zip(seqs, tables):
            seq.block_table = list(table)
        runner = ModelRunner(m, pool, compile=compile)
        rows = [(seq, 0, h.to(dtype), i, len(i) - 1) for seq, h, i in zip(seqs, hidden, ids)]
        logits, h = runner.draft(rows)
        written = [table[p // 4] * 4 + p % 4 for table, n in zip(tables, lengths) for p in range(n)]
        return logits, h, torch.cat((pool.c_kv[L - 1, written], pool.k_rope[L - 1, written]), -1)

    with float64_compute():
        ref = draft(float64_copy(model), False, torch.float64)
    for fast, plain, r, what in zip(draft(model, True), draft(model, False), ref, ("logits", "block output", "cache")):
        assert_close_to_reference(fast, plain, r, what=f"draft over prompts: {what}")


def test_one_slow_step_does_not_shut_a_width_out():
    """The first step with drafts after a stretch without costs more (its first draft runs outside the fused
    step): a width is measured min_samples times before the policy settles, so that step alone does not decide."""
    from openr2.engine.speculative import SpecPolicy

    policy = SpecPolicy(max_k=1, probe_every=1000)
    chosen = []
    for i in range(30):
        k = policy.choose(num_rows=1)
        chosen.append(k)
        policy.record(1, k, 2 if k else 1, (10.0 if i == 0 else 1.0) if k else 0.7)  # k = 1: 2 tokens/s, 0: 1.43
    assert chosen[:3] == [1, 1, 1] and chosen[-10:] == [1] * 10


def test_policy_rates_hold_against_delayed_steps():
    """Every third step delayed by another process (thirty times slower) does not turn the policy from the
    better k (a moving average of per-step rates did, and then never measured that k again)."""
    from openr2.engine.speculative import SpecPolicy

    policy = SpecPolicy(max_k=1, probe_every=1000)
    for i in range(40):
        k = policy.choose(num_rows=1)
        delayed = k == 1 and i % 3 == 2
        policy.record(1, k, 2 if k else 1, (30.0 if delayed else 1.0) if k else 0.7)
    assert policy.choose(num_rows=1) == 1  # 2 tokens per second against 1.43
