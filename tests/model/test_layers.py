"""layers: the product-and-sum form of compiled one-row decode (kernel_impl "compiled") equals F.linear; the
fast RMSNorm (one vector_norm, products in place when autograd records nothing, a hand-written backward
when it records) and the in-place SwiGLU activation equal their plain formulas, with and without autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openr2.model.layers import linear, rms_norm, rms_norm_reference, silu_mul
from tests.numerics import assert_close_to_reference, float64_compute


def test_compiled_one_row_linear_equals_f_linear():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 160, generator=gen), torch.randn(96, generator=gen)
    compiled = torch.compile(lambda x: linear(x, weight, bias, kernel_impl="compiled"), fullgraph=True, dynamic=False)
    with torch.no_grad():
        for shape in [(1, 160), (1, 1, 160), (3, 160)]:  # one row (product and sum), several rows (F.linear)
            x = torch.randn(shape, generator=gen)
            ref = F.linear(x.double(), weight.double(), bias.double())
            assert_close_to_reference(compiled(x), F.linear(x, weight, bias), ref, what=f"linear, x {shape}")


def _norm_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 96, generator=gen) * 3 + 0.5
    weight = 1 + 0.3 * torch.randn(96, generator=gen)
    return x.to(dtype), weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_rms_norm_equals_the_plain_formula(dtype, inplace):
    x, weight = _norm_inputs(dtype)
    with float64_compute():  # the plain formula's float32 step stays float64
        ref = rms_norm_reference(x.double(), weight.double(), 1e-6)
    plain = rms_norm_reference(x, weight, 1e-6)
    with torch.no_grad():
        given = x.clone()
        fast = rms_norm(given, weight, 1e-6, inplace=inplace)
    assert fast.dtype == dtype and (fast.data_ptr() == given.data_ptr()) == inplace
    assert inplace or torch.equal(given, x)  # not asked: x untouched
    assert_close_to_reference(fast, plain, ref, what=f"rms_norm {dtype}, inplace={inplace}")


def test_rms_norm_gradients_equal_the_plain_formula():
    """With autograd recording (the hand-written backward of _RMSNorm; nothing written in place, inplace=True
    is then ignored): same gradients as autograd over the plain formula."""
    x, weight = _norm_inputs(torch.float32, seed=1)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def grads(fn, x, weight, **kw):
        x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        fn(x, weight, 1e-6, **kw).backward(grad.to(x.dtype))
        return x.grad, weight.grad

    fast = grads(rms_norm, x, weight, inplace=True)
    plain = grads(rms_norm_reference, x, weight)
    with float64_compute():
        ref = grads(rms_norm_reference, x.double(), weight.double())
    for name, f, p, r in zip(("grad x", "grad weight"), fast, plain, ref):
        assert_close_to_reference(f, p, r, what=f"rms_norm {name}")


def test_silu_mul_in_place_equals_out_of_place():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(40, 64, generator=gen) * 2
    ref = F.silu(h[:, :32].double()) * h[:, 32:].double()
    plain = F.silu(h[:, :32]) * h[:, 32:]
    with torch.no_grad():
        given = h.clone()
        fast = silu_mul(given[:, :32], given[:, 32:])
    assert fast.data_ptr() == given.data_ptr()  # written over the gate half
    assert_close_to_reference(fast, plain, ref, what="silu_mul in place")
    g = h.clone().requires_grad_()
    out = silu_mul(g[:, :32], g[:, 32:])  # recorded: out of place
    assert out.data_ptr() != g.data_ptr()
    assert_close_to_reference(out.detach(), plain, ref, what="silu_mul with autograd")


def test_rms_norm_backward_gradcheck():
    """float64 gradcheck of the hand-written backward (_RMSNorm) against finite differences."""
    from openr2.model.layers import _RMSNorm

    x, weight = _norm_inputs(torch.float64, seed=6)
    x, weight = x[:2, :3, :8].clone().requires_grad_(), weight[:8].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (x, weight))
