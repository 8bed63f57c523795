"""MLA: absorbed == naive on random weights (with and without a cache), and the latent cache itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.model.mla import MLA, LatentCache
from openr2.model.rope import RotaryEmbedding
from openr2.presets import tiny_v2, tiny_v3
from tests.numerics import assert_close_to_reference, float64_compute, float64_copy


def _mla(config, seed=0):
    torch.manual_seed(seed)
    mla = MLA(config, layer_idx=0)
    with torch.no_grad():
        for p in mla.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))  # norms and biases near 1
    return mla


def _naive64(mla, x, positions, cos, sin):
    """The naive path of a float64 copy, without a cache: the reference (tests/numerics.py)."""
    with torch.no_grad(), float64_compute():
        return float64_copy(mla)(x.double(), positions, cos.double(), sin.double(), attn_impl="naive")


@pytest.mark.parametrize("config", [
    tiny_v3(), tiny_v2(), dataclasses.replace(tiny_v3(), attention_bias=True),
    # head dims for each branch of the naive path's CPU flash-attention shaping (qk dim N + R vs v dim V):
    dataclasses.replace(tiny_v3(), v_head_dim=6),  # V < R: v padded with zeros
    dataclasses.replace(tiny_v3(), v_head_dim=24),  # V = N + R: as it is
    dataclasses.replace(tiny_v3(), v_head_dim=40),  # V > N + R: q and k padded
], ids=["q-lora-yarn", "plain-q", "attention-bias", "v-below-rope", "v-equals-qk", "v-above-qk"])
def test_absorbed_equals_naive(config):
    mla, rotary = _mla(config), RotaryEmbedding(config)
    x = torch.randn(3, 11, config.hidden_size)
    positions = torch.arange(11).expand(3, 11)
    cos, sin = rotary(positions, x.dtype)
    with torch.no_grad():
        naive = mla(x, positions, cos, sin, attn_impl="naive")
        absorbed = mla(x, positions, cos, sin, attn_impl="absorbed")
    assert naive.abs().max() > 0.1
    assert_close_to_reference(absorbed, naive, _naive64(mla, x, positions, cos, sin), what="absorbed vs naive")


@pytest.mark.parametrize("attn_impl", ["naive", "absorbed"])
def test_chunked_prefill_through_cache_matches_one_pass(attn_impl):
    """Three chunks (5, 4, 1 tokens) written to and read from one cache == one pass without a cache."""
    config = tiny_v3()
    mla, rotary = _mla(config, seed=1), RotaryEmbedding(config)
    x = torch.randn(2, 10, config.hidden_size)
    positions = torch.arange(10).expand(2, 10)
    cos, sin = rotary(positions, x.dtype)
    cache = LatentCache(1, 2, 16, config.kv_lora_rank, config.qk_rope_head_dim)
    outs = []
    with torch.no_grad():
        full = mla(x, positions, cos, sin, attn_impl="naive")
        for start, end in [(0, 5), (5, 9), (9, 10)]:
            outs.append(mla(x[:, start:end], positions[:, start:end], cos[:, start:end], sin[:, start:end],
                            cache, attn_impl))
            cache.advance(end - start)
    assert_close_to_reference(torch.cat(outs, 1), full, _naive64(mla, x, positions, cos, sin),
                              what=f"chunked through the cache ({attn_impl}) vs one pass")
    # the cache holds only the latent and the rope key: C + R numbers per token per layer
    assert cache.c_kv.shape[-1] + cache.k_rope.shape[-1] == config.kv_lora_rank + config.qk_rope_head_dim
    assert cache.c_kv[0, :, 10:].abs().sum() == 0 and cache.c_kv[0, :, :10].abs().sum() > 0


@pytest.mark.parametrize("rows,tokens", [(1, 1), (1, 3), (2, 2), (4, 4)])
def test_absorbed_compiled_kernels_equal_eager_over_a_cache(rows, tokens):
    """kernel_impl "compiled" writes the absorbed per-head products as a product and a sum (few query rows,
    small weights): the eager bmm's outputs, for a few new tokens per row over a filled cache."""
    config = tiny_v3()
    mla, rotary = _mla(config, seed=3), RotaryEmbedding(config)
    x = torch.randn(rows, 9, config.hidden_size)
    positions = torch.arange(9).expand(rows, 9)
    cos, sin = rotary(positions, x.dtype)
    new = slice(9 - tokens, 9)

    def run(m, kernel_impl, dtype=torch.float32):
        cache = LatentCache(1, rows, 9, config.kv_lora_rank, config.qk_rope_head_dim, dtype)
        with torch.no_grad():
            m(x[:, : 9 - tokens].to(dtype), positions[:, : 9 - tokens], cos[:, : 9 - tokens].to(dtype),
              sin[:, : 9 - tokens].to(dtype), cache, "absorbed")
            cache.advance(9 - tokens)
            return m(x[:, new].to(dtype), positions[:, new], cos[:, new].to(dtype), sin[:, new].to(dtype), cache,
                     "absorbed", kernel_impl)

    with float64_compute():
        ref = run(float64_copy(mla), "eager", torch.float64)
    assert_close_to_reference(run(mla, "compiled"), run(mla, "eager"), ref,
                              what=f"absorbed products as product and sum, {rows} rows of {tokens}")


def test_cache_overflow_and_bad_impl():
    config = tiny_v2()
    mla, rotary = _mla(config), RotaryEmbedding(config)
    x = torch.randn(1, 5, config.hidden_size)
    positions = torch.arange(5)[None]
    cos, sin = rotary(positions, x.dtype)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        mla(x, positions, cos, sin, LatentCache(1, 1, 4, config.kv_lora_rank, config.qk_rope_head_dim))
    with pytest.raises(ValueError, match="attn_impl"):
        mla(x, positions, cos, sin, attn_impl="flash")


def test_single_row_decode_over_cache_matches_full_pass():
    """B = 1, T = 1 absorbed decode skips the mask: every cached key is the token's past."""
    config = tiny_v2()
    mla, rotary = _mla(config, seed=2), RotaryEmbedding(config)
    x = torch.randn(1, 7, config.hidden_size)
    positions = torch.arange(7)[None]
    cos, sin = rotary(positions, x.dtype)
    cache = LatentCache(1, 1, 8, config.kv_lora_rank, config.qk_rope_head_dim)
    with torch.no_grad():
        full = mla(x, positions, cos, sin)
        outs = []
        for t in range(7):
            outs.append(mla(x[:, t : t + 1], positions[:, t : t + 1], cos[:, t : t + 1], sin[:, t : t + 1], cache,
                            "absorbed"))
            cache.advance(1)
    assert_close_to_reference(torch.cat(outs, 1), full, _naive64(mla, x, positions, cos, sin),
                              what="one-row decode vs one pass")


@pytest.mark.parametrize("config", [tiny_v3(), tiny_v2(), dataclasses.replace(tiny_v3(), v_head_dim=24),
                                    dataclasses.replace(tiny_v2(), rope_interleave=False)],
                         ids=["q-lora-yarn", "plain-q", "v-equals-qk", "half-split-rope"])
def test_training_attention_backward_equals_autograd_of_the_naive_path(config, monkeypatch):
    """The training forward (_NaiveAttention, a hand-written backward) against autograd over the plain
    naive path: the output and the gradients of x and of every parameter, against float64 autograd."""
    import openr2.model.mla as mla_mod

    mla, rotary = _mla(config, seed=3), RotaryEmbedding(config)
    x = torch.randn(2, 13, config.hidden_size, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(13).expand(2, 13)
    grad = torch.randn(2, 13, config.hidden_size, generator=torch.Generator().manual_seed(5))

    def run(module, x, fused):
        monkeypatch.setattr(mla_mod, "_fused_training_ok", lambda *a, fused=fused: fused and a[1].dtype == torch.float32)
        cos, sin = rotary(positions, x.dtype)
        x = x.detach().clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        out = module(x, positions, cos, sin)
        assert _graph_has(out.grad_fn, "_NaiveAttentionBackward") == fused
        out.backward(grad.to(x.dtype))
        return [out.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]

    fast, plain = run(mla, x, True), run(mla, x, False)
    with float64_compute():
        ref = run(float64_copy(mla), x.double(), False)
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in mla.named_parameters()]
    for name, f, p, r in zip(names, fast, plain, ref):
        assert_close_to_reference(f, p, r, what=f"training attention vs autograd, {name}")


def _graph_has(fn, name: str) -> bool:
    """Whether the autograd graph below `fn` has a node called `name`."""
    seen, todo = set(), [fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn.name() == name:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False
