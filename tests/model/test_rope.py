"""RoPE / YaRN tables against transformers' own functions, and the interleaved-pair convention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq
from openr2.presets import deepseek_v2_lite, deepseek_v3, tiny_v2


def _hf_yarn(config):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.AutoConfig.for_model(**config.to_hf())
    return ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")


@pytest.mark.parametrize("config", [
    deepseek_v3(),
    deepseek_v2_lite(),
    dataclasses.replace(deepseek_v3(), rope_scaling={"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 4096}),
], ids=["v3", "v2-lite", "no-mscale"])
def test_yarn_matches_transformers(config):
    inv_freq, factor = rope_inv_freq(config)
    ref_inv_freq, ref_factor = _hf_yarn(config)
    assert torch.allclose(inv_freq, ref_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor)


def test_v3_yarn_ramp_bounds():
    """dim 64, factor 40, L0 4096: pairs 0..10 keep their frequency, pairs 23..31 are divided by 40."""
    inv_freq, factor = rope_inv_freq(deepseek_v3())
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert factor == 1.0  # mscale == mscale_all_dim
    assert torch.allclose(inv_freq[:11].double(), base[:11], rtol=1e-6)
    assert torch.allclose(inv_freq[23:].double(), base[23:] / 40, rtol=1e-6)
    assert ((inv_freq[11:23].double() < base[11:23]) & (inv_freq[11:23].double() > base[11:23] / 40)).all()


def test_plain_rope():
    inv_freq, factor = rope_inv_freq(tiny_v2())
    dim = tiny_v2().qk_rope_head_dim
    assert factor == 1.0
    assert torch.allclose(inv_freq, 1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim))


def test_interleaved_pairs_rotate_as_complex_numbers():
    x = torch.randn(3, 5, 8)
    angle = torch.randn(3, 5, 4)
    out = apply_rope(x, angle.cos(), angle.sin())
    ref = torch.view_as_real(torch.view_as_complex(x.view(3, 5, 4, 2)) * torch.polar(torch.ones_like(angle), angle))
    assert torch.allclose(out, ref.flatten(-2), atol=1e-6)


def test_half_split_layout_is_a_permutation_of_interleaved():
    """rope_interleave=False expects weights permuted to [evens, odds]: then results are the same, permuted."""
    x = torch.randn(2, 6, 8)
    angle = torch.randn(2, 6, 4)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    inter = apply_rope(x, angle.cos(), angle.sin(), interleaved=True)
    half = apply_rope(x[..., perm], angle.cos(), angle.sin(), interleaved=False)
    assert torch.allclose(inter[..., perm], half, atol=1e-6)


def test_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(deepseek_v3())
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, generator=gen), torch.randn(64, generator=gen)

    def score(m, n):
        cos, sin = rotary(torch.tensor([[m, n]]), torch.float32)
        qm = apply_rope(q, cos[0, 0], sin[0, 0])
        kn = apply_rope(k, cos[0, 1], sin[0, 1])
        return (qm @ kn).item()

    assert score(7, 3) == pytest.approx(score(1007, 1003), abs=1e-3)
    assert abs(score(7, 3) - score(7, 5)) > 1e-2
