"""DeepSeek-V3.2 (sparse attention) over the paged pool: the indexer keys beside the latent (one budget, one
block table, copy-on-write), the paged `index_scores` / `attend_sparse` against LatentCache's on random
inputs, and a whole tiny V3.2 model over the paged cache (chunked prefill, a prefix shared by two rows,
ragged decode rows, contexts several times index_topk) against its full forward.

Sparse attention is discontinuous, so every whole-model comparison first checks that rounding cannot
change the selection (tests/dsa.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.engine import kv_cache
from openr2.engine.kv_cache import KVPool, LatentKind, bytes_per_token, cache_kinds
from openr2.model.mla import LatentCache
from openr2.model.transformer import build_model
from openr2.presets import tiny_v32
from tests.dsa import assert_selection_decided, dense_indexers, index_scores64_of, index_scores_of
from tests.hf_utils import perturb_
from tests.numerics import assert_close_to_reference, float64_compute, reference64


def test_indexer_keys_share_the_latents_blocks_and_budget():
    config = tiny_v32()
    L, C, R, Di = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim
    kinds = cache_kinds(config, L + 1)
    assert kinds == [LatentKind(C, R, index_dim=Di)] * (L + 1)
    assert kinds[0].fields == {"c_kv": C, "k_rope": R, "k_index": Di}
    per_block = 16 * (L + 1) * (C + R + Di) * 4
    assert bytes_per_token(config, torch.float32, L + 1) * 16 == per_block
    pool = KVPool.from_budget(config, 10 * per_block + per_block - 1, block_size=16, num_layers=L + 1)
    assert pool.num_blocks == 10 and pool.nbytes == 10 * per_block
    assert pool.k_index.shape == (L + 1, 160, Di)
    pool.k_index.normal_()
    pool.copy_block(1, 3, num_tokens=5)  # copy-on-write carries the indexer keys too
    assert torch.equal(pool.k_index[:, 48:53], pool.k_index[:, 16:21])
    assert not torch.equal(pool.k_index[:, 53], pool.k_index[:, 21])
    assert KVPool(dataclasses.replace(tiny_v32(), model_type="deepseek_v3"), 2, 16).k_index is None


def _random_pool(config, lengths, bs, dtype, gen):
    """A pool holding rows of `lengths` tokens (random latents and indexer keys) in shuffled blocks; returns
    (pool, block tables, per-row contexts (c_kv, k_rope, k_index) in position order)."""
    num_blocks = sum(-(-n // bs) for n in lengths) + 2
    pool = KVPool(config, num_blocks, bs, dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // bs))] for n in lengths]
    C, R, Di = config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim
    B, S = len(lengths), max(lengths)
    ctx = [torch.randn(B, S, w, generator=gen, dtype=torch.float64) for w in (C, R, Di)]
    view = pool.view(tables, [0] * B, lengths)
    for layer in range(config.num_hidden_layers):
        view.write(layer, ctx[0], ctx[1])
        view.write_indexer(layer, ctx[2])
    return pool, tables, ctx


@pytest.mark.parametrize("dtype,chunked", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_paged_index_scores_and_attend_sparse_equal_the_latent_caches(dtype, chunked, monkeypatch):
    """Rows of 45, 13 and 70 cached tokens whose last 3, 1 and 4 are this step's queries (padded to 4);
    random queries, head weights and selections (some keys past the query: masked). Each row's paged
    result equals LatentCache's over that row's context (float32), both against a float64 LatentCache.
    chunked: index_scores and attend_sparse take one query at a time."""
    if chunked:
        monkeypatch.setattr(kv_cache, "_GATHER_CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(kv_cache, "_SCORE_CHUNK_ELEMENTS", 1)
    config = tiny_v32()
    gen = torch.Generator().manual_seed(0)
    lengths, new, bs, layer = [45, 13, 70], [3, 1, 4], 8, 1
    pool, tables, ctx = _random_pool(config, lengths, bs, dtype, gen)
    B, T, S, K = len(lengths), max(new), max(lengths), 12
    H, C, R, Hi, Di = 4, config.kv_lora_rank, config.qk_rope_head_dim, config.index_n_heads, config.index_head_dim
    view = pool.view(tables, [n - t for n, t in zip(lengths, new)], new)
    positions = torch.tensor([[n - t + min(j, t - 1) for j in range(T)] for n, t in zip(lengths, new)])
    q_index, weights = torch.randn(B, T, Hi, Di, generator=gen), torch.randn(B, T, Hi, generator=gen)
    q_latent, q_rope = torch.randn(B, T, H, C, generator=gen), torch.randn(B, T, H, R, generator=gen)
    # K distinct keys of 0..S-1 per query, its own position first (at least one visible key)
    order = torch.rand(B, T, S, generator=gen).scatter_(-1, positions[..., None], -1.0)
    indices = order.argsort(-1)[..., :K]
    scale = 0.3
    scores = view.index_scores(layer, q_index, weights, positions, scale)
    out = view.attend_sparse(layer, q_latent, q_rope, positions, indices, scale)
    assert scores.shape == (B, T, S) and scores.dtype == torch.float32 and out.shape == (B, T, H, C)

    def latent(b, fdtype):  # row b's context in a one-row LatentCache, as stored in the pool (rounded to dtype)
        cache = LatentCache(config.num_hidden_layers, 1, S, C, R, fdtype, index_head_dim=Di)
        c, r, k = (t[b : b + 1].to(dtype).to(fdtype) for t in ctx)
        cache.write(layer, c, r)
        cache.write_indexer(layer, k)
        f = lambda t: t[b : b + 1].to(fdtype)  # noqa: E731
        return (cache.index_scores(layer, f(q_index), f(weights), positions[b : b + 1], scale),
                cache.attend_sparse(layer, f(q_latent), f(q_rope), positions[b : b + 1], indices[b : b + 1], scale))

    for b in range(B):
        s32, o32 = latent(b, torch.float32)
        with float64_compute():  # the indexer's .float() keeps float64
            s64, o64 = latent(b, torch.float64)
        t = new[b]
        visible = torch.isfinite(s64[0, :t])
        assert torch.equal(torch.isfinite(scores[b, :t]), visible) and visible.sum(-1).tolist() == \
            [lengths[b] - new[b] + j + 1 for j in range(t)]
        assert_close_to_reference(scores[b, :t][visible], s32[0, :t][visible], s64[0, :t][visible],
                                  what=f"paged index_scores, row {b} ({dtype})")
        assert_close_to_reference(out[b, :t], o32[0, :t], o64[0, :t], what=f"paged attend_sparse, row {b} ({dtype})")


@pytest.fixture(scope="module")
def model():
    config = dataclasses.replace(tiny_v32(), num_nextn_predict_layers=0)
    model = build_model(config, seed=5)
    perturb_(model, seed=5, scale=0.5)  # a fresh init is nearly uniform: spread attention, scores, logits
    return model.eval()


def test_sparse_model_over_the_paged_cache_equals_the_full_forward(model):
    """Three sequences (top-8 of contexts up to ~8x longer): row 0 prefilled in chunks of 13, row 1 a
    prefix-cache hit on row 0's first two blocks (its tail one chunk), row 2 in two chunks; then four decode
    steps of all three rows together through the absorbed path (row 1 carries 2 tokens per step, the others
    1: ragged, padded). The logits of every chunk's and step's tokens equal the full forward's."""
    config, bs = model.config, 8
    K, V = config.index_topk, config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, V, (16,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, V, (27,), generator=gen).tolist(),
               prefix + torch.randint(0, V, (20,), generator=gen).tolist(),
               torch.randint(0, V, (33,), generator=gen).tolist()]
    steps, per_step = 4, [1, 2, 1]
    seqs = [p + torch.randint(0, V, (steps * n,), generator=gen).tolist() for p, n in zip(prompts, per_step)]
    for b, seq in enumerate(seqs):  # well posed: rounding cannot change any selection
        full = torch.tensor([seq])
        assert_selection_decided(index_scores_of(model, full), index_scores64_of(model, full), K, what=f"row {b}")
    pool = KVPool(config, num_blocks=32, block_size=bs)
    free = torch.randperm(32, generator=gen).tolist()
    tables = []
    for b, seq in enumerate(seqs):
        shared = tables[0][:2] if b == 1 else []
        tables.append(shared + [free.pop() for _ in range(-(-len(seq) // bs) - len(shared))])
    got: list[dict[int, torch.Tensor]] = [{} for _ in seqs]  # row -> position -> logits

    def forward(rows, attn_impl):  # rows: (b, start, n)
        T = max(n for _, _, n in rows)
        ids = torch.tensor([seqs[b][s : s + n] + [0] * (T - n) for b, s, n in rows])
        positions = torch.tensor([[s + min(t, n - 1) for t in range(T)] for _, s, n in rows])
        view = pool.view([tables[b] for b, _, _ in rows], [s for _, s, _ in rows], [n for _, _, n in rows])
        with torch.inference_mode():
            logits = model(ids, positions, cache=view, attn_impl=attn_impl)
        for i, (b, s, n) in enumerate(rows):
            for t in range(n):
                got[b][s + t] = logits[i, t]

    for start in range(0, len(prompts[0]), 13):  # chunked prefill, the naive path
        forward([(0, start, min(13, len(prompts[0]) - start))], "naive")
    forward([(1, 16, len(prompts[1]) - 16), (2, 0, 17)], "naive")  # a prefix hit and a first chunk together
    forward([(2, 17, len(prompts[2]) - 17)], "absorbed")  # a short tail over its context
    done = [len(p) for p in prompts]
    for _ in range(steps):
        forward([(b, done[b], per_step[b]) for b in range(3)], "absorbed")
        done = [d + n for d, n in zip(done, per_step)]
    fast, plain, ref = [], [], []
    for b, seq in enumerate(seqs):
        full = torch.tensor([seq])
        cols = sorted(got[b])
        assert cols == list(range(16 if b == 1 else 0, len(seq)))
        with torch.inference_mode():
            plain.append(model(full)[0, cols])
            with dense_indexers(model):
                assert (model(full)[0, cols] - plain[-1]).abs().max() > 1e-2  # the selection decides the logits
        ref.append(reference64(model, full)[0, cols])
        fast.append(torch.stack([got[b][c] for c in cols]))
    assert_close_to_reference(torch.cat(fast), torch.cat(plain), torch.cat(ref),
                              what="sparse attention over the paged cache vs the full forward")


@pytest.mark.slow
def test_llm_greedy_generation_equals_transformers_generate(tmp_path):
    """`LLM` over a V3.2 checkpoint transformers wrote (blocks of 8, prompt chunks of at most 12 tokens, two
    sequences at once, decode steps compiled) generates what transformers' `generate`
    does, 3 x index_topk tokens past prompts of index_topk + 8; then continuing one of them from a prefix
    the cache holds (a prefix-cache hit) still does."""
    from openr2.checkpoints import load_model
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams
    from tests.hf_utils import hf_model
    from tests.numerics import FACTOR, max_abs_diff

    config = dataclasses.replace(tiny_v32(), num_nextn_predict_layers=0)
    K = config.index_topk
    hf = hf_model(config, seed=0)
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, config.vocab_size, (2, K + 8), generator=torch.Generator().manual_seed(3))
    P, new = prompt.shape[1], 3 * K
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    ours = load_model(tmp_path)
    # well posed: the selection along the whole sequence, and each greedy choice, are far from rounding
    assert_selection_decided(index_scores_of(ours, want), index_scores64_of(ours, want), K, what="generated")
    with torch.no_grad():
        logits, theirs = ours(want), hf(want).logits
    top2 = logits[:, P - 1 : -1].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > FACTOR * max_abs_diff(logits, theirs)

    llm = LLM(str(tmp_path), compile=True, block_size=8, max_num_batched_tokens=12, num_blocks=24)
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt.tolist()], greedy)
    assert [o.outputs[0].token_ids for o in outs] == want[:, P:].tolist()
    step = llm.engine.runner._compiled_decode
    assert step is not None and step.num_packages >= 1  # decoded through exported packages, and stayed so
    # row 0 again from its prompt and first K generated tokens: at least its prompt's blocks come from the cache
    again = llm.generate([{"prompt_token_ids": want[0, : P + K].tolist()}],
                         SamplingParams(temperature=0, max_tokens=new - K, ignore_eos=True))[0]
    assert again.num_cached_tokens >= P and again.outputs[0].token_ids == want[0, P + K :].tolist()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_mtp_speculative_greedy_equals_plain_greedy(compile, tmp_path):
    """MTP drafts on V3.2 (the MTP layer's indexer keys in the pool's layer L; verify rows of 1 + k tokens
    through the sparse path; rejected tokens' keys overwritten later): greedy outputs equal those without
    drafts, with chunked prefills beside decodes and prompts up to ~9x index_topk. compiled: the decode, fused
    decode-and-draft and draft steps compiled, the indexer keys passed to each, one row at a time (each width's
    one-row package: the several-rows ones double the export time, ~4 min here, and the V3.2 decode's several
    rows are compiled in test_llm_greedy_generation_equals_transformers_generate)."""
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams

    model = build_model(dataclasses.replace(tiny_v32(), num_nextn_predict_layers=1), seed=7)
    perturb_(model, seed=7, scale=0.5)
    model.eval()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 40, 17, 70)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    options = dict(compile=compile, block_size=8, num_blocks=40, max_num_batched_tokens=48)
    if compile:
        options.update(compile_cache_dir=str(tmp_path), max_num_seqs=1)
    outs = {}
    for spec in (None, "mtp:2"):
        llm = LLM(model, speculative_config=spec, **options)
        outs[spec] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        assert llm.engine.blocks.num_free == llm.engine.pool.num_blocks
    assert llm.engine.spec_stats.num_draft_tokens > 0
    if compile:  # the steps ran compiled (a failed compile would have fallen back to eager)
        from openr2.engine import compiled

        steps = compiled._COMPILED[model]
        assert llm.engine.runner._compiled_decode is not None and {"decode", "decode-draft", "draft-0"} <= set(steps)
        assert all(step.num_packages >= 1 for step in steps.values())
    assert outs["mtp:2"] == outs[None]
    for prompt, got in zip(prompts, outs[None]):  # and both are the full forward's greedy continuation
        seq = torch.tensor([prompt])
        with torch.inference_mode():
            for _ in range(16):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert seq[0, len(prompt):].tolist() == got


def test_the_runner_sends_long_context_chunks_of_v32_through_the_sparse_absorbed_path():
    """The runner's cost model: absorbed attends over index_topk keys per query on V3.2 (the naive path masks
    the whole context), so a prompt chunk over a long context goes absorbed there and naive on V3."""
    from openr2.engine.runner import ModelRunner

    for model_type, want in (("deepseek_v32", "absorbed"), ("deepseek_v3", "naive")):
        cfg = dataclasses.replace(tiny_v32(), model_type=model_type)
        runner = ModelRunner.__new__(ModelRunner)
        runner.model = type("M", (), {"config": cfg})()
        assert runner._attn_impl(64, 64 * cfg.index_topk) == want
        assert runner._attn_impl(1, 2 * cfg.index_topk) == "absorbed"  # decode: absorbed either way
