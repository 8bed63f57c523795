"""Tolerances derived from the problem, not from one machine's last digits (issue 14).

A float32 fast path (compiled, fused, absorbed, grouped, cached, quantized kernels) and the plain float32
path it replaces both round; how much, and where, depends on the CPU (AVX2, AVX-512, AMX: other blocking
and accumulation orders) and on the thread count. So a fast path is not compared with the plain path at a
fixed tolerance: both are compared with a float64 run of the same computation, and the fast path's error
must stay within a small factor of the plain path's own float32 error:

    max|fast - ref64| <= FACTOR * max(max|plain - ref64|, FLOOR_ULPS ulps of max|ref64|)

FACTOR = 8: two correct float32 implementations of one computation differ only in the order of their
roundings, so their errors are of one size (the worst-case bound of a length-K sum, ~K u sum|terms|, holds
for every order; blocked and pairwise orders do better, which is why a fast path can also be the more
accurate one). On the test models the ratio fast/plain stays below ~3 (pytest -s prints every pair of
errors); 8 leaves room for another machine's kernels. A real bug is far outside: a 1e-3 relative slip is
~8000 ulps, the float32 errors of the tiny test models are a few to a few tens of ulps of their largest
value.

FLOOR_ULPS = 4: the plain path can be (nearly) exact by luck on a small output (a few dozen values: the
cache entries of one decode step); the fast path must still be allowed the rounding of its output (half an
ulp) and of the few operations after its last long reduction (a norm: the mean of squares, rsqrt, two
products; a residual add), each within an ulp. The floor is in ulps of the largest reference value (or of
`scale`, where the error follows another magnitude: a log-probability's error follows the logits', not
its own) and of the fast path's dtype.

Sanity, not a tolerance: a plain path off its float64 run by more than SANE_ULPS ulps of the largest
value computed something else (a near-tie routed differently in float64, a reference built wrong); any
fast path would then pass, so the check fails instead.

The float64 reference: `float64_copy(model)` run inside `float64_compute()` (or `reference64`). The model
keeps some steps in float32 whatever its dtype, on purpose (RMSNorm normalises in float32 and the router
runs in float32, as transformers does; the trainer's cross-entropy casts logits to float32). Inside
`float64_compute()` a `.float()` of a float64 tensor stays float64, so a float64 copy computes every step in
float64. RoPE angles stay float32 (inverse frequencies are float32 by definition, positions are integers):
every path, the reference included, reads the same angles.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: one float32 ulp at 1.0 (the unit roundoff u is EPS32 / 2)
FACTOR = 8.0
FLOOR_ULPS = 4.0
SANE_ULPS = 1024.0


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, computed in float64 (no rounding of the difference itself)."""
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check_close_to_reference(fast: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, factor: float = FACTOR,
                             floor_ulps: float = FLOOR_ULPS, scale: float | None = None
                             ) -> tuple[float, float, float, float]:
    """(fast error, plain error, floor, bound) against the float64 reference; see the module docstring."""
    assert fast.shape == plain.shape == ref64.shape, (fast.shape, plain.shape, ref64.shape)
    assert ref64.dtype == torch.float64, f"the reference must be float64, not {ref64.dtype}"
    if scale is None:
        scale = ref64.detach().abs().max().item()
    fast_err, plain_err = max_abs_diff(fast, ref64), max_abs_diff(plain, ref64)
    sane = min(SANE_ULPS * torch.finfo(plain.dtype).eps, 0.1) * scale  # bfloat16: 10% at most
    assert plain_err <= sane, (f"the plain path is off the float64 reference by {plain_err:.3g} (> {sane:.3g}): "
                               "the reference does not compute the same thing")
    floor = floor_ulps * torch.finfo(fast.dtype).eps * scale
    return fast_err, plain_err, floor, factor * max(plain_err, floor)


def assert_close_to_reference(fast: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, factor: float = FACTOR,
                              floor_ulps: float = FLOOR_ULPS, scale: float | None = None, what: str = "") -> None:
    """max|fast - ref64| <= factor * max(max|plain - ref64|, floor_ulps ulps of max|ref64| (or of scale))."""
    fast_err, plain_err, floor, bound = check_close_to_reference(fast, plain, ref64, factor, floor_ulps, scale)
    print(f"{what or 'fast vs plain'}: float64 reference off by fast {fast_err:.3g}, plain {plain_err:.3g} "
          f"(bound {bound:.3g})")  # shown by pytest -s
    assert fast_err <= bound, (
        f"{what + ': ' if what else ''}fast path off the float64 reference by {fast_err:.3g}, the plain path by "
        f"{plain_err:.3g}: over {bound:.3g} = {factor:g} x max(plain error, floor {floor:.3g})")


def assert_same_function(ours: torch.Tensor, theirs: torch.Tensor, ref64: torch.Tensor, factor: float = FACTOR,
                         floor_ulps: float = FLOOR_ULPS, what: str = "") -> None:
    """Two float32 implementations of one function (ours and transformers'), each within `factor` of the
    other's error against the float64 reference. Both directions, so it does not matter which of the two
    computed the reference: an implementation of another function is far from a reference that the other
    one matches."""
    assert_close_to_reference(ours, theirs, ref64, factor, floor_ulps, what=f"{what} (ours against theirs)")
    assert_close_to_reference(theirs, ours, ref64, factor, floor_ulps, what=f"{what} (theirs against ours)")


def _float_keeps_float64(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.dtype == torch.float64:
        return self
    return torch._C.TensorBase.float(self, *args, **kwargs)


@contextlib.contextmanager
def float64_compute() -> Iterator[None]:
    """Within: `tensor.float()` leaves float64 tensors float64 (and casts anything else as usual), so the
    model's deliberate float32 steps (RMSNorm, router; the trainer's cross-entropy) run in float64 when the
    model is float64. For reference runs: it patches torch.Tensor in this process until the block ends."""
    assert "float" not in torch.Tensor.__dict__, "float64_compute() does not nest"
    torch.Tensor.float = _float_keeps_float64
    try:
        yield
    finally:
        del torch.Tensor.float


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of `module` (every floating-point parameter and buffer, the router's included); run
    it inside float64_compute()."""
    return copy.deepcopy(module).double()


def reference64(model: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """model(*args, **kwargs) computed by a float64 copy in float64_compute(), without grad; floating-point
    tensor arguments are cast to float64 (token ids and strings pass as they are)."""

    def up(a):
        return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    with float64_compute(), torch.no_grad():
        return float64_copy(model)(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
