"""RMSNorm, the SwiGLU MLP and `linear`, numerically as the HF DeepSeek modules compute them.

`kernel_impl` (KERNEL_IMPLS), chosen by the caller and passed down every forward as attn_impl and moe_impl
are, says how products are written:
- `eager` (the default): F.linear, and RoPE as one complex multiply (rope.py);
- `compiled`: the formulations inductor fuses, for the compiled decode step (engine/compiled.py): one row
  on CPU as a product and a sum (`linear`), RoPE in real form, int8 weights as a product and a sum with
  the dequantization fused in (quant/layers.py). Numbers equal the eager forms' to rounding (tests).

Shape legend: B batch, T tokens, D hidden, I intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

KERNEL_IMPLS = ("eager", "compiled")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           kernel_impl: str = "eager") -> torch.Tensor:
    """x @ weight.T (+ bias). With kernel_impl "compiled" (the compiled decode step) one row on CPU is
    written as a product and a sum: inductor turns that into one vectorised reduction that streams the
    weight at about twice the speed of MKL's matrix-vector product at these sizes (a 4096x256 head plus six
    small projections, one thread: 118 vs 227 us), and fuses it with its neighbours. Otherwise F.linear."""
    if kernel_impl == "compiled" and x.numel() == x.shape[-1] and x.device.type == "cpu":
        y = (x.unsqueeze(-2) * weight).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose product is `linear` (the same parameters and state-dict names)."""

    def forward(self, x: torch.Tensor, kernel_impl: str = "eager") -> torch.Tensor:
        return linear(x, self.weight, self.bias, kernel_impl)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps); normalised in float32, cast back, then scaled (HF order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """inplace: the caller owns x (a fresh projection read by nothing else) and lets the norm write over
        it when autograd records nothing."""
        return rms_norm(x, self.weight, self.eps, inplace)


class Float32RMSNorm(RMSNorm):
    """DeepSeek-V4's norm: its weight stays float32 whatever the model dtype, the normalised input is scaled in
    float32 and cast once at the end (transformers' DeepseekV4RMSNorm; `RMSNorm` casts first). With a weight
    of the input's dtype (a float32 model) it is `RMSNorm`."""

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x, inplace)
        x32 = x.float()
        return (self.weight.float() * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors: an in-place fast path is taken only when not."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain formula, as transformers writes it (the reference of `rms_norm`)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, inplace: bool = False) -> torch.Tensor:
    """`rms_norm_reference` in fewer passes over x: one fused reduction (vector_norm: no squared copy of x),
    the per-row factor on [..., 1], then x times it and times the weight, in place when autograd records
    nothing (over x itself if `inplace`). F.rms_norm is a composite of six kernels on CPU, about twice the
    time. Float32 and bfloat16/half inputs with a weight of their dtype; anything else (float64 references)
    takes the reference. Same numbers to rounding (tests/model/test_layers.py)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps)
    # mean(x^2) = |x|^2 / D: vector_norm accumulates in float32 whatever x's dtype (its result is rounded
    # to x's dtype); the [..., 1] steps in float32, in place unless autograd records them (vector_norm's
    # backward reads its own output)
    if records_grad(x, weight):
        if x.dtype == torch.float32:
            return _RMSNorm.apply(x, weight, eps)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        return (x * torch.rsqrt(norm.square() / x.shape[-1] + eps)).to(x.dtype) * weight
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    inv = (norm if norm.dtype == torch.float32 else norm.float()).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    inv = inv if x.dtype == torch.float32 else inv.to(x.dtype)
    # bfloat16: the factor is rounded to bfloat16 before the product (a mixed-dtype product is 3-5x slower
    # on CPU), one more rounding than transformers' float32 product; within the bound of the tests
    return (x.mul_(inv) if inplace else x * inv).mul_(weight)


class _RMSNorm(torch.autograd.Function):
    """float32 rms_norm with a hand-written backward (training). Autograd over the formula records a dozen
    element-wise kernels and their backward twice that (the norm's division by itself, masks for zero
    norms, pow and mean backwards); here the forward keeps x and the per-row factor r = 1/rms, and

        y = w * x * r,  r = (|x|^2 / D + eps)^(-1/2)
        dL/dw = sum_rows g * x * r,   dL/dx = r * (g * w) - x * r^3 * (sum_d g * w * x) / D

    take one pass for g * x, two matrix-vector products for the row and column sums, and three passes for
    dL/dx. Same numbers to rounding (tests/model/test_layers.py)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, inv)
        return torch.mul(x, inv).mul_(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, inv = ctx.saved_tensors
        D = x.shape[-1]
        gx = (grad * x).reshape(-1, D)  # [rows, D]
        rows = inv.reshape(-1)
        grad_weight = torch.mv(gx.t(), rows) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dot = torch.mv(gx, weight).view(inv.shape)  # sum_d g w x, per row
            coef = inv.pow(3).mul_(dot).div_(-D)
            grad_x = torch.mul(grad, weight).mul_(inv).addcmul_(x, coef)
        return grad_x, grad_weight, None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; written over `gate` (a fresh product the caller owns) when autograd does not record
    it, which saves two tensors' worth of allocation and writing."""
    if records_grad(gate, up):
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernel_impl: str = "eager") -> torch.Tensor:
        k = kernel_impl
        return self.down_proj(silu_mul(self.gate_proj(x, k), self.up_proj(x, k)), k)
