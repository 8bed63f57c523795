"""quant/schemes.py: pack/unpack, exact reconstruction from the stored tensors, and reconstruction errors
within the bounds measured in ../shared/reference/quant_longctx.md §3.2 (2048x2048 Student-t(5) weights)."""

from __future__ import annotations

import pytest
import torch

from openr2.quant import schemes


def _student_t(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    return torch.distributions.StudentT(5.0).sample((rows, cols)) * 0.02


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_int4_pack_roundtrip():
    q = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = schemes.pack_int4(q)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(schemes.unpack_int4(packed), q)
    assert packed[0, 0, 0] == q[0, 0, 0] | (q[0, 0, 1] << 4)  # column 2j low nibble, 2j+1 high


# (scheme, group, symmetric) -> upper bound on the relative weight and output error (the note's values
# plus a small margin: 1.74% / 9.3, 11.2, 13.3% asym / 12.3, 14.6, 17.2% sym)
BOUNDS = [("int8", None, True, 0.019), ("int4", 32, False, 0.10), ("int4", 64, False, 0.12),
          ("int4", 128, False, 0.14), ("int4", 32, True, 0.13), ("int4", 64, True, 0.155),
          ("int4", 128, True, 0.18)]


@pytest.fixture(scope="module")
def weight():
    return _student_t(2048, 2048)


@pytest.mark.parametrize("scheme, group, symmetric, bound", BOUNDS, ids=[f"{s}-g{g}-{'sym' if y else 'asym'}"
                                                                          for s, g, y, _ in BOUNDS])
def test_reconstruction_error_within_measured_bounds(weight, scheme, group, symmetric, bound):
    if scheme == "int8":
        q, s = schemes.quantize_int8(weight)
        assert q.dtype == torch.int8 and s.shape == (2048,)
        w = schemes.dequantize_int8(q, s)
    else:
        q, s, z = schemes.quantize_int4(weight, group, symmetric)
        assert q.shape == (2048, 1024) and s.shape == (2048, 2048 // group) and s.dtype == torch.float16
        assert (z is None) == symmetric
        w = schemes.dequantize_int4(q, s, z)
    x = torch.randn(64, 2048, generator=torch.Generator().manual_seed(1))
    weight_err, out_err = _rel(w, weight), _rel(x @ w.t(), x @ weight.t())
    print(f"{scheme} g{group} {'sym' if symmetric else 'asym'}: weight {weight_err:.4f}, output {out_err:.4f}")
    assert weight_err < bound and out_err < bound
    assert weight_err > bound / 3  # a quantizer that stored the float weight would pass everything else


def test_fp8_block_error_within_bound(weight):
    q, s = schemes.quantize_fp8(weight, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (16, 16)
    assert _rel(schemes.dequantize_fp8(q, s, (128, 128)), weight) < 0.03  # note: 2.63%


def test_int4_stacked_and_exact_against_stored_tensors():
    w = torch.randn(4, 16, 64)
    q, s, z = schemes.quantize_int4(w, 32)
    w_hat = schemes.dequantize_int4(q, s, z)
    # each stacked slice is quantized on its own, and (q - 8) * s + z is exactly what is stored
    q0, s0, z0 = schemes.quantize_int4(w[2], 32)
    assert torch.equal(q[2], q0) and torch.equal(s[2], s0) and torch.equal(w_hat[2], schemes.dequantize_int4(q0, s0, z0))
    codes = schemes.unpack_int4(q).double().view(4, 16, 2, 32)
    s64, z64 = s.double()[..., None], z.double()[..., None]
    exact = ((codes - 8) * s64 + z64).view(4, 16, 64)  # exact in float64 (4-bit codes, float16 s and z)
    # the same up to float32 rounding: dequantize forms z - 8 s (8 s is exact, the difference rounds by
    # u |z - 8 s|, u = 2^-24) and then q s + (z - 8 s) (q s is exact, 4 x 11 bits; the sum rounds by u |w|)
    u = torch.finfo(torch.float32).eps / 2
    offset = (z64 - 8 * s64).abs().expand(4, 16, 2, 32).reshape(4, 16, 64)
    assert ((w_hat.double() - exact).abs() <= u * (offset + exact.abs())).all()


def test_constant_and_zero_groups_stay_finite():
    w = torch.zeros(2, 64)
    w[1] = 0.5
    for sym in (False, True):
        q, s, z = schemes.quantize_int4(w, 32, sym)
        out = schemes.dequantize_int4(q, s, z)
        # a constant group lands on the grid (asym: it is the zero point; sym: it is 7 steps), so only the
        # float16 storage of the zero or the scale is left, 2^-11 relative (float16's unit roundoff): asym
        # |z' - w| <= 2^-11 |w|; sym 7 |s' - w / 7| <= 7 x 2^-11 |w| / 7. The float32 rebuild adds a few
        # 2^-24 |w|, and an all-zero group rebuilds to exactly 0: 2^-11 |w| + 1e-6 covers both
        assert torch.isfinite(out).all() and ((out - w).abs() <= 2**-11 * w.abs() + 1e-6).all()
    q, s = schemes.quantize_int8(w)
    assert torch.equal(schemes.dequantize_int8(q, s)[0], w[0])


def test_bad_options():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        schemes.check_scheme("int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        schemes.check_scheme("int4", 48)
    with pytest.raises(ValueError, match="q_b_proj: int4 group size 32 does not divide the layer width 48"):
        schemes.layer_group_size(48, 32, "q_b_proj")
    assert schemes.layer_group_size(48, 64) == 48  # narrower than a group: one group per row
    assert schemes.layer_group_size(128, 64) == 64
