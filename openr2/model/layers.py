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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel, same numbers
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernel_impl: str = "eager") -> torch.Tensor:
        k = kernel_impl
        return self.down_proj(F.silu(self.gate_proj(x, k)) * self.up_proj(x, k), k)
