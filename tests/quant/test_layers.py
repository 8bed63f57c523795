"""quant/layers.py: every quantized layer's fast path equals its dequantize-then-float reference, and a
quantized model's logits do too (float32 on random perturbed weights; bfloat16 where a packed kernel runs).

"Equals" up to rounding (tests/numerics.py): the fast path is within a small factor of the reference
path's own error against the reference path run in float64 (the same dequantized weights, float64 sums)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from openr2.model.moe import RoutedExperts
from openr2.model.transformer import build_model
from openr2.presets import tiny_v2, tiny_v3
from openr2.quant import schemes
from openr2.quant.checkpoint import quantize_model
from openr2.quant.layers import QuantExperts, QuantLinear, QuantSpec, quantize_modules, set_quant_impl
from tests.numerics import assert_close_to_reference, float64_compute, float64_copy

SPECS = [QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 64), QuantSpec("int4", 128),
         QuantSpec("int4", 64, symmetric=True)]
IDS = ["int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-sym"]


def _linear(in_f: int, out_f: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


def _quant_linear(lin: nn.Linear, spec: QuantSpec) -> QuantLinear:
    ql = QuantLinear(lin.in_features, lin.out_features, spec)
    ql.q.set_from(lin.weight.detach(), spec)
    return ql


def _both(module, *args):
    set_quant_impl(module, "fast")
    fast = module(*args)
    set_quant_impl(module, "reference")
    ref = module(*args)
    set_quant_impl(module, "fast")
    return fast, ref


@torch.no_grad()
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_linear_fast_equals_reference_float32(spec):
    lin = _linear(256, 96)
    ql = _quant_linear(lin, spec)
    x = torch.randn(3, 7, 256)
    fast, ref = _both(ql, x)
    assert fast.shape == (3, 7, 96)
    assert_close_to_reference(fast, ref, nn.functional.linear(x.double(), ql.weight.double()),
                              what=f"{spec.scheme} g{spec.group_size} linear")
    assert torch.equal(ql.weight, ql.q.dequantize())  # what absorbed MLA reads
    assert torch.equal(ref, nn.functional.linear(x, ql.weight))  # the reference is the float layer's math
    rel = ((ref - lin(x)).norm() / lin(x).norm()).item()
    assert rel < (0.02 if spec.scheme == "int8" else 0.16)


@torch.no_grad()
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_bfloat16_uses_the_packed_kernel(group):
    ql = _quant_linear(_linear(256, 64, seed=1), QuantSpec("int4", group))
    ql.compute_dtype = torch.bfloat16
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    fast, ref = _both(ql, x)
    assert -1 in ql.q._int4pack  # torch's packed int4 layout was built and used
    assert fast.dtype == torch.bfloat16
    # Elementwise bound against the float64 product with the stored weights w = (q - 8) s + z. The kernel
    # reads s and z rounded to bf16 and may form (q - 8) s' + z' in bf16, each step rounding by at most
    # u = 2^-9 (bf16 unit roundoff): |dw_i| <= 3u m_i, m_i = |q_i - 8| s + |z|; its output rounds to bf16
    # (u |out|); accumulation is float32 (negligible). The weight errors of one output are K = 256
    # independent bounded terms x_i dw_i: by Hoeffding their sum exceeds 6 sqrt(sum (3u x_i m_i)^2) with
    # probability 2 exp(-18) ~ 3e-8 per output (the worst case, 3u sum |x_i| m_i, is 16x wider and would
    # let a 10% error through; this one catches 3%, as the old 2e-2 x max|ref| did). The reference path
    # (bf16 weight, bf16 output) fits the same bound.
    ref64 = nn.functional.linear(x.double(), ql.q.dequantize(dtype=torch.float64))
    q = schemes.unpack_int4(ql.q.qweight).double().unflatten(-1, (-1, group))
    s, z = ql.q.scale.double()[..., None], ql.q.zero.double()[..., None]
    magnitude = ((q - 8).abs() * s + z.abs()).flatten(-2)  # m_i per weight
    u = 2**-9
    bound = u * ref64.abs() + 6 * ((3 * u) ** 2 * x.double() ** 2 @ (magnitude**2).T).sqrt()
    for name, out in (("packed kernel", fast), ("reference", ref)):
        ratio = ((out.double() - ref64).abs() / bound).max().item()
        print(f"int4 g{group} bf16, {name}: error / bound = {ratio:.2f}")
        assert ratio <= 1, name


@torch.no_grad()
def test_fp8_linear_fast_equals_reference():
    lin = _linear(100, 40, seed=2)  # ragged 16x16 blocks
    spec = QuantSpec("fp8", block=(16, 16))
    ql = QuantLinear(100, 40, spec)
    ql.q.qweight, ql.q.scale = schemes.quantize_fp8(lin.weight, (16, 16))
    x = torch.randn(4, 100)
    fast, ref = _both(ql, x)
    assert torch.equal(fast, ref)  # fp8 has no kernel of its own: the fast path is the reference's F.linear
    assert ((ref - lin(x)).norm() / lin(x).norm()).item() < 0.04


def _experts(config, seed: int = 0) -> RoutedExperts:
    torch.manual_seed(seed)
    experts = RoutedExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    return experts


@torch.no_grad()
@pytest.mark.parametrize("spec", SPECS[:3], ids=IDS[:3])
def test_experts_fast_equals_reference(spec):
    config = tiny_v3()
    experts = _experts(config)
    qe = QuantExperts(8, 64, 32, spec)
    qe.gate_up_proj.set_from(experts.gate_up_proj, spec)
    qe.down_proj.set_from(experts.down_proj, spec)
    x = torch.randn(40, 64)
    torch.manual_seed(1)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(40)])  # ~10 tokens per expert
    weights = torch.rand(40, 2)
    set_quant_impl(qe, "fast")
    fast = qe(x, weights, ids)
    set_quant_impl(qe, "reference")
    ref64 = qe(x.double(), weights.double(), ids, "looped")  # the same dequantized weights, in float64
    for impl in ("grouped", "looped"):  # the reference runs the float module's own paths
        ref = qe(x, weights, ids, impl)
        assert_close_to_reference(fast, ref, ref64, what=f"{spec.scheme} experts vs {impl}")
    float_out = experts(x, weights, ids, "looped")
    assert ((ref - float_out).norm() / float_out.norm()).item() < (0.03 if spec.scheme == "int8" else 0.2)


def _perturbed(config, seed=0):
    model = build_model(config, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


@torch.no_grad()
@pytest.mark.parametrize("preset", [tiny_v3, tiny_v2], ids=["tiny-v3", "tiny-v2"])
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 64)])
def test_quantized_model_fast_equals_reference(preset, scheme, group):
    model = _perturbed(preset())
    qmodel = quantize_model(copy.deepcopy(model), scheme, group)
    kinds = {type(m).__name__ for m in qmodel.modules()}
    assert {"QuantLinear", "QuantExperts"} <= kinds and "RoutedExperts" not in kinds
    assert not any(isinstance(m, nn.Linear) for m in qmodel.modules())  # head included; router is a Gate
    assert qmodel.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    fast, ref = _both(qmodel, ids)
    with float64_compute():  # the reference path of a float64 copy (int4 scales are float16: exact in float64)
        ref64 = set_quant_impl(float64_copy(qmodel), "reference")(ids)
    assert_close_to_reference(fast, ref, ref64, what=f"{scheme} model, fast vs reference")
    naive, absorbed = qmodel(ids), qmodel(ids, attn_impl="absorbed")  # absorbed reads kv_b_proj.weight
    assert_close_to_reference(absorbed, naive, ref64, what=f"{scheme} model, absorbed vs naive")


def test_a_bad_group_size_replaces_nothing():
    model = build_model(tiny_v3())
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"q_b_proj: int4 group size 32 does not divide the layer width 48"):
        quantize_modules(model, QuantSpec("int4", 32))
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(type(m) is type(before[n]) for n, m in model.named_modules())
