"""Tests for MLA.attention_probs (openr2/model/mla.py), the hook training's indexer loss reads: its
distribution times the values is the layer's own attention (dense, and over the indexer's selection).

Both sides run in float64 (tests/numerics.py), so they differ only by float64 rounding: a few ulps of the
output's size times the length of the longest sum (T keys, H V columns), far below 1e-10 of it."""

from __future__ import annotations

import pytest
import torch

from openr2.model.transformer import build_model
from openr2.presets import tiny_v2, tiny_v3, tiny_v32
from tests.numerics import float64_compute, float64_copy

B, T = 2, 24  # T > tiny_v32's index_topk (8): the selection decides


def _attention_from_probs(mla, x, cos, sin, topk):
    P = mla.attention_probs(x, cos, sin, topk)  # [B, H, T, T]
    c_kv = mla.kv_a_proj_with_mqa(x)[..., : mla.kv_lora_rank]
    v = mla.kv_b_proj(mla.kv_a_layernorm(c_kv)).view(B, T, mla.num_heads, -1)[..., mla.nope_dim:]
    out = torch.einsum("bhts,bshv->bthv", P, v).reshape(B, T, -1)
    return mla.o_proj(out), P


@pytest.mark.parametrize("config", [tiny_v3, tiny_v2, tiny_v32], ids=["v3", "v2", "v32"])
def test_probs_times_values_is_the_attention(config):
    model = float64_copy(build_model(config(), seed=3))
    with float64_compute(), torch.no_grad():
        x = torch.randn(B, T, model.config.hidden_size, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        positions = torch.arange(T).expand(B, T)
        cos, sin = model.rotary(positions, x.dtype)
        mla = model.layers[1].self_attn
        xq = mla.q_a_layernorm(mla.q_a_proj(x)) if mla.q_lora_rank else x
        topk = None if mla.indexer is None else mla.indexer(x, xq, positions, cos, sin)
        assert (topk is not None) == (config is tiny_v32)
        ours, P = _attention_from_probs(mla, x, cos, sin, topk)
        ref = mla(x, positions, cos, sin)
    assert P.dtype == torch.float64
    torch.testing.assert_close(P.sum(-1), torch.ones(B, mla.num_heads, T, dtype=torch.float64))
    assert (P.triu(1) == 0).all()  # causal
    if topk is not None:  # nothing outside the selection
        selected = torch.zeros(B, T, T, dtype=torch.bool).scatter_(-1, topk, True)
        assert (P.masked_fill(selected[:, None], 0) == 0).all()
        assert ((P > 0).sum(-1) <= model.config.index_topk).all()
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
