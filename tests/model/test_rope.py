"""RoPE / YaRN tables against transformers' own functions, and the interleaved-pair convention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from openr2.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq
from openr2.presets import deepseek_v2_lite, deepseek_v3, tiny_v2
from tests.numerics import EPS32, assert_close_to_reference

U32 = EPS32 / 2  # float32 unit roundoff, 2^-24


def _yarn_rtol(base: float) -> float:
    """Relative error of a float32 evaluation of the (YaRN) inverse frequencies against exact arithmetic:
    the exponent 2i/d rounds by u (absolute, as it is below 1), which base^e turns into ln(base) u relative;
    pow itself is within an ulp (2u); then the reciprocal, the division by the factor and the ramp's blend
    of two positive terms add at most u each: (ln(base) + 6) u, 9.1e-7 for base 10000."""
    return (math.log(base) + 6) * U32


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
    # two float32 evaluations of one formula (they differ in the last ulp): each within _yarn_rtol of exact
    assert torch.allclose(inv_freq, ref_inv_freq, rtol=2 * _yarn_rtol(config.rope_theta), atol=0)
    assert factor == pytest.approx(ref_factor)


def test_v3_yarn_ramp_bounds():
    """dim 64, factor 40, L0 4096: pairs 0..10 keep their frequency, pairs 23..31 are divided by 40."""
    inv_freq, factor = rope_inv_freq(deepseek_v3())
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert factor == 1.0  # mscale == mscale_all_dim
    rtol = _yarn_rtol(10000.0)  # float32 against the float64 frequencies
    assert torch.allclose(inv_freq[:11].double(), base[:11], rtol=rtol, atol=0)
    assert torch.allclose(inv_freq[23:].double(), base[23:] / 40, rtol=rtol, atol=0)
    assert ((inv_freq[11:23].double() < base[11:23]) & (inv_freq[11:23].double() > base[11:23] / 40)).all()


def test_plain_rope():
    inv_freq, factor = rope_inv_freq(tiny_v2())
    dim = tiny_v2().qk_rope_head_dim
    assert factor == 1.0
    # the same float32 operations on the same values: equal to the last bit
    assert torch.equal(inv_freq, 1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim))


def test_interleaved_pairs_rotate_as_complex_numbers():
    x = torch.randn(3, 5, 8)
    angle = torch.randn(3, 5, 4)
    out = apply_rope(x, angle.cos(), angle.sin())

    def rotated(x, angle):
        turn = torch.polar(torch.ones_like(angle), angle)
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2))) * turn)

    assert_close_to_reference(out, rotated(x, angle).flatten(-2), rotated(x.double(), angle.double()).flatten(-2),
                              what="interleaved rope vs a complex rotation")


def test_half_split_layout_is_a_permutation_of_interleaved():
    """rope_interleave=False expects weights permuted to [evens, odds]: then results are the same, permuted."""
    x = torch.randn(2, 6, 8)
    angle = torch.randn(2, 6, 4)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    inter = apply_rope(x, angle.cos(), angle.sin(), interleaved=True)
    half = apply_rope(x[..., perm], angle.cos(), angle.sin(), interleaved=False)
    ref = apply_rope(x.double(), angle.double().cos(), angle.double().sin(), interleaved=True)
    assert_close_to_reference(half, inter[..., perm], ref[..., perm], what="half-split vs interleaved")


def test_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(deepseek_v3())
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, generator=gen), torch.randn(64, generator=gen)

    def score(m, n):
        cos, sin = rotary(torch.tensor([[m, n]]), torch.float32)
        qm = apply_rope(q, cos[0, 0], sin[0, 0])
        kn = apply_rope(k, cos[0, 1], sin[0, 1])
        return (qm @ kn).item()

    # Rounding bound: the float32 angle p * theta_j rounds by u |p theta_j| (u = 2^-24), cos/sin add an
    # ulp (2u); a pair j's term |q_j| |k_j| cos(angle difference) moves by at most |q_j| |k_j| times the
    # angle errors of both positions; the rotations and the 64-term dot product round by ~64 u sum |q_i k_i|.
    theta = rotary.inv_freq.double() * rotary.attention_factor
    pair = (q.view(32, 2).norm(dim=-1) * k.view(32, 2).norm(dim=-1)).double()

    def bound(m, n):
        return (pair * (U32 * (m + n) * theta + 4 * 2 * U32)).sum().item() + 64 * U32 * (q.abs() @ k.abs()).item()

    rounding = bound(7, 3) + bound(1007, 1003)
    assert abs(score(7, 3) - score(1007, 1003)) <= rounding
    assert abs(score(7, 3) - score(7, 5)) > 100 * rounding  # while another relative position changes it


@pytest.mark.parametrize("interleaved", [True, False])
def test_in_place_rotation_of_a_projection_slice(interleaved):
    """The rope columns of q rotated in place inside the projection's output (MLA's naive path hands q to
    attention as it stands): the same values and the same gradients as rotating a copy and concatenating."""
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 5, 12, generator=gen), torch.randn(3 * 10, 12, generator=gen)
    angle = torch.randn(2, 5, 1, 2, generator=gen)
    grad = torch.randn(2, 5, 3, 10, generator=gen)

    def run(x, w, inplace):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        q = (x @ w.t()).view(2, 5, 3, 10)  # 3 heads of [6 nope | 4 rope]
        cos, sin = angle.to(x.dtype).cos(), angle.to(x.dtype).sin()
        if inplace:
            apply_rope(q[..., 6:], cos, sin, interleaved, inplace=True)
        else:
            q = torch.cat((q[..., :6], apply_rope(q[..., 6:], cos, sin, interleaved)), -1)
        q.backward(grad.to(x.dtype))
        return q.detach(), x.grad, w.grad

    fast, plain, ref = run(x, w, True), run(x, w, False), run(x.double(), w.double(), False)
    for name, f, p, r in zip(("q", "grad x", "grad w"), fast, plain, ref):
        assert_close_to_reference(f, p, r, what=f"in-place rope ({'interleaved' if interleaved else 'half'}), {name}")


def test_bfloat16_rotates_in_float32_like_the_real_form():
    """bfloat16 rope (a float32 complex rotation, rounded once) against the real form computed in bfloat16
    (kernel_impl "compiled" takes it), both against float64; in place too."""
    gen = torch.Generator().manual_seed(5)
    x, angle = torch.randn(3, 7, 2, 16, generator=gen) * 2, torch.randn(3, 7, 1, 8, generator=gen) * 3
    xb, cos, sin = x.bfloat16(), angle.cos().bfloat16(), angle.sin().bfloat16()
    ref = apply_rope(xb.double(), cos.double(), sin.double())
    plain = apply_rope(xb, cos, sin, kernel_impl="compiled")
    fast = apply_rope(xb, cos, sin)
    assert fast.dtype == torch.bfloat16
    assert_close_to_reference(fast, plain, ref, what="bfloat16 rope vs the real form")
    given = xb.clone()
    assert apply_rope(given, cos, sin, inplace=True) is given and torch.equal(given, fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_frequencies_are_a_float32_buffer_outside_state_dicts(dtype, tmp_path):
    """The inverse frequencies are a buffer (an exported step reads them as a model tensor), kept exactly
    float32 whatever the model's dtype and never in a state dict or a saved checkpoint; the tables the model
    computes are those of the float32 frequencies (so outputs are unchanged by the cast)."""
    import safetensors

    from openr2.checkpoints import load_model, save_model
    from openr2.model.transformer import build_model, cast_model
    from openr2.presets import tiny_v3

    config = dataclasses.replace(tiny_v3(), qk_rope_head_dim=64, num_nextn_predict_layers=0)
    exact, factor = rope_inv_freq(config)
    model = build_model(config, dtype=dtype)
    rotary = model.rotary
    assert "inv_freq" in dict(rotary.named_buffers()) and rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, exact)  # not a float32 copy of a rounded bfloat16 value
    assert not any("inv_freq" in k for k in model.state_dict())
    positions = torch.tensor([[0, 1, 4095, 100_000]])
    cos, sin = rotary(positions, dtype)
    angles = positions[..., None].float() * exact
    assert torch.equal(cos, (angles.cos() * factor).to(dtype)) and torch.equal(sin, (angles.sin() * factor).to(dtype))
    cast_model(model, torch.float16).to("cpu").float()  # casts back and forth, a move: still the same values
    assert torch.equal(rotary.inv_freq, exact)

    save_model(model, tmp_path)
    with safetensors.safe_open(next(tmp_path.glob("*.safetensors")), "pt") as f:
        assert not any("inv_freq" in k for k in f.keys())
    loaded = load_model(tmp_path, dtype=dtype)
    assert loaded.rotary.inv_freq.dtype == torch.float32 and torch.equal(loaded.rotary.inv_freq, exact)
    assert loaded.state_dict().keys() == model.state_dict().keys()
