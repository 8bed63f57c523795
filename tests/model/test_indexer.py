"""DeepSeek Sparse Attention (openr2/model/indexer.py and its use in mla.py): the scores are the paper's
formula, the fast path (top-k indices feeding absorbed MLA over the gathered latents) equals the plain one
(the selection as a mask over naive MLA) on random inputs, with and without a cache, and a context of at most
index_topk keys is exactly dense MLA.

Tolerances as everywhere (tests/numerics.py): against a float64 run, within a small factor of the plain
path's own float32 error; comparisons through the indexer first check that rounding cannot change its
selection (tests/dsa.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import openr2.model.indexer as indexer_module
import openr2.model.mla as mla_module
from openr2.model.indexer import index_scores, selection_mask
from openr2.model.mla import MLA, LatentCache, attend_latent, attend_latent_sparse, causal_mask
from openr2.model.rope import RotaryEmbedding
from openr2.model.transformer import Transformer, build_model
from openr2.presets import tiny_v3, tiny_v32
from tests.dsa import assert_selection_decided, dense_indexers, index_scores64_of, index_scores_of
from tests.hf_utils import perturb_
from tests.numerics import assert_close_to_reference, float64_compute, float64_copy, reference64

K = tiny_v32().index_topk  # 8


def _model(config, seed=0):
    model = build_model(config, seed=seed)
    perturb_(model, seed=seed)
    return model.eval()


def _ids(config, batch=2, tokens=40, seed=0):
    return torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- scores
def _scores_by_formula(q, k, w, visible):
    """I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s] / sqrt(D)), written from the paper (einsum, no matmuls)."""
    dots = torch.einsum("bthd,bsd->bths", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bth,bths->bts", w, dots.clamp(min=0)).masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
def test_index_scores_are_the_formula(chunked, monkeypatch):
    if chunked:  # a few queries per chunk: the loop over chunks is exercised
        monkeypatch.setattr(indexer_module, "_SCORE_CHUNK_ELEMENTS", 3 * 2 * 4 * 13)
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 13, 4, 16
    q, k, w = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, D, generator=gen), torch.randn(B, T, H, generator=gen)
    visible = causal_mask(torch.arange(T).expand(B, T), T)
    out = index_scores(q, k, w, D**-0.5, visible)
    ref = _scores_by_formula(q.double(), k.double(), w.double(), visible)
    plain = _scores_by_formula(q, k, w, visible)
    assert out.dtype == torch.float32 and torch.equal(torch.isinf(out), ~visible.expand(B, T, T))
    assert (out[visible.expand(B, T, T)] < 0).any()  # negative head weights make negative scores
    finite = visible.expand(B, T, T)
    assert_close_to_reference(out[finite], plain[finite], ref[finite], what="index scores vs the formula")


# ---------------------------------------------------------------------------------------------- sparse attention
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
def test_gathered_latent_attention_equals_masked_dense(chunked, monkeypatch):
    """attend_latent_sparse (the fast path) == attend_latent with causal & selected as its mask (the plain one),
    early queries' picks past their position masked as the model masks them."""
    if chunked:
        monkeypatch.setattr(mla_module, "_GATHER_CHUNK_ELEMENTS", 2 * 5 * 40)
    gen = torch.Generator().manual_seed(1)
    B, T, S, H, C, R, k = 2, 7, 20, 3, 16, 4, 5
    q_latent, q_rope = torch.randn(B, T, H, C, generator=gen), torch.randn(B, T, H, R, generator=gen)
    c_kv, k_rope = torch.randn(B, S, C, generator=gen), torch.randn(B, S, R, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 15, 18, 19], [2, 4, 6, 8, 10, 12, 19]])  # some see fewer than k keys
    visible = causal_mask(positions, S)
    indices = torch.rand(B, T, S, generator=gen).masked_fill(~visible, -1.0).topk(k, dim=-1).indices
    valid = indices <= positions[:, :, None]
    assert not valid.all() and valid.any(-1).all()
    scale = 0.3
    fast = attend_latent_sparse(q_latent, q_rope, c_kv, k_rope, indices, valid, scale)
    mask = visible & selection_mask(indices, S)
    plain = attend_latent(q_latent, q_rope, c_kv, k_rope, mask, scale)
    ref = attend_latent(q_latent.double(), q_rope.double(), c_kv.double(), k_rope.double(), mask, scale)
    assert_close_to_reference(fast, plain, ref, what="gathered vs masked latent attention")


def _mla(config, seed=0):
    torch.manual_seed(seed)
    mla = MLA(config, layer_idx=0)
    with torch.no_grad():
        for p in mla.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return mla.eval()


def test_mla_fast_path_equals_plain_on_random_inputs():
    """One DSA attention layer on random weights and inputs, 40 tokens with top-8: absorbed over the gathered
    latents == naive with the selection as a mask, in one pass and through a cache (prefill, then decode)."""
    config = tiny_v32()
    mla, rotary = _mla(config), RotaryEmbedding(config)
    B, T, P = 2, 40, 25
    x = torch.randn(B, T, config.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(T).expand(B, T)
    cos, sin = rotary(positions, x.dtype)
    with dense_indexers(mla):
        dense = mla(x, positions, cos, sin)
    scores = index_scores_of(mla, x, positions, cos, sin)
    with float64_compute():
        scores64 = index_scores_of(float64_copy(mla), x.double(), positions, cos.double(), sin.double())
    assert_selection_decided(scores, scores64, K, what="one DSA layer")
    with torch.no_grad(), float64_compute():
        ref = float64_copy(mla)(x.double(), positions, cos.double(), sin.double(), attn_impl="naive")
    with torch.no_grad():
        plain = mla(x, positions, cos, sin, attn_impl="naive")
        fast = mla(x, positions, cos, sin, attn_impl="absorbed")
        cached = {}
        for impl in ("naive", "absorbed"):
            cache = LatentCache.for_model(config, B, T)
            steps = [mla(x[:, :P], positions[:, :P], cos[:, :P], sin[:, :P], cache, "naive")]
            cache.advance(P)
            for t in range(P, T):
                steps.append(mla(x[:, t : t + 1], positions[:, t : t + 1], cos[:, t : t + 1], sin[:, t : t + 1],
                                 cache, impl))
                cache.advance(1)
            cached[impl] = torch.cat(steps, dim=1)
    assert (plain - dense).abs().max() > 1e-2 * dense.abs().max()  # the selection decides
    assert_close_to_reference(fast, plain, ref, what="DSA absorbed vs naive")
    for impl, out in cached.items():
        assert_close_to_reference(out, plain, ref, what=f"DSA through the cache, {impl} decode")


# ---------------------------------------------------------------------------------------------- dense when short
def _without_indexer(model: Transformer) -> Transformer:
    """The same weights in a V3 model (no indexer)."""
    config = dataclasses.replace(model.config, model_type="deepseek_v3", index_n_heads=None, index_head_dim=None,
                                 index_topk=None)
    dense = Transformer(config).eval()
    state = {k: v for k, v in model.state_dict().items() if ".indexer." not in k}
    dense.load_state_dict(state, strict=True)
    return dense


def test_context_of_at_most_index_topk_is_exactly_dense():
    """Up to index_topk tokens every key is selected: the logits are the V3 model's with the same weights, bit
    for bit, in one pass (both paths) and decoding through a cache; one token more and the last query drops
    a key."""
    model = _model(tiny_v32(), seed=3)
    dense = _without_indexer(model)
    ids = _ids(model.config, tokens=K + 1, seed=3)
    with torch.no_grad():
        for impl in ("naive", "absorbed"):
            assert torch.equal(model(ids[:, :K], attn_impl=impl), dense(ids[:, :K], attn_impl=impl)), impl
        caches = [LatentCache.for_model(m.config, 2, K) for m in (model, dense)]
        for m, cache in zip((model, dense), caches):
            m(ids[:, :3], cache=cache)
        for t in range(3, K):
            a = model(ids[:, t : t + 1], cache=caches[0], attn_impl="absorbed")
            b = dense(ids[:, t : t + 1], cache=caches[1], attn_impl="absorbed")
            assert torch.equal(a, b), t
        assert caches[0].index_keys[:, :, :K].abs().min() > 0  # the indexer keys were written all along
        sparse, full = model(ids), dense(ids)
    scale = full.abs().max().item()
    assert (sparse[:, :K] - full[:, :K]).abs().max() < 1e-5 * scale  # the first K queries still see every key
    assert (sparse[:, K] - full[:, K]).abs().max() > 1e-3 * scale  # the last one sees K of K + 1


def test_model_fast_path_equals_plain_and_cache_without_indexer_keys_is_refused():
    model = _model(tiny_v32(), seed=4)
    ids = _ids(model.config, tokens=36, seed=4)
    assert_selection_decided(index_scores_of(model, ids), index_scores64_of(model, ids), K, what="tiny V3.2")
    with torch.no_grad():
        plain, fast = model(ids, attn_impl="naive"), model(ids, attn_impl="absorbed")
    assert_close_to_reference(fast, plain, reference64(model, ids, attn_impl="naive"), what="model absorbed vs naive")
    c = model.config
    cache = LatentCache(c.num_hidden_layers, 2, 36, c.kv_lora_rank, c.qk_rope_head_dim)
    with pytest.raises(ValueError, match="no indexer keys"):
        model(ids, cache=cache)


def test_bfloat16_keeps_the_indexer_head_weights_in_float32():
    model = build_model(tiny_v32(), dtype=torch.bfloat16)
    indexer = model.layers[1].self_attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32
    assert indexer.wq_b.weight.dtype == indexer.k_norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(_ids(model.config, tokens=20))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_v3_models_have_no_indexer():
    model = Transformer(tiny_v3())
    assert all(layer.self_attn.indexer is None for layer in model.layers)
    assert not any(".indexer." in k for k in model.state_dict())


def test_training_gradients_reach_everything_but_the_indexer():
    """As in transformers, the selection is made without autograd: the language-model loss trains MLA and the
    rest through the selected keys, and nothing in the indexer (its KL loss is training's business)."""
    model = _model(tiny_v32(), seed=5).train()
    ids = _ids(model.config, tokens=24, seed=5)
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        if ".indexer." in name:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name
