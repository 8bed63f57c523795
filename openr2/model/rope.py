"""Rotary position embedding for MLA's decoupled rope dims: plain RoPE and YaRN (frequencies + mscale).

The checkpoints store rope dims as interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's official code and
vLLM's is_neox_style=False); `rope_interleave=False` configs use the half-split layout instead. The
softmax-scale correction of YaRN lives in ModelConfig.softmax_scale.

Shape legend: B batch, T tokens, H heads, R rope dim (qk_rope_head_dim).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from openr2.config import ModelConfig, yarn_mscale


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [R/2] float32, factor applied to cos/sin), as transformers computes them."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    yarn = config.rope_scaling
    if not yarn:
        return 1.0 / pos_freqs, 1.0
    factor = yarn["factor"]
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    attention_factor = yarn.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1
    original_len = yarn["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:  # the dim whose wavelength fits num_rotations times
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 = keep the original frequency (high-frequency pairs), 0 = divide by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """positions [B, T] -> (cos, sin) [B, T, R/2] in the compute dtype."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        # A buffer, not a plain attribute: an exported step (engine/aoti.py) is given the model's parameters and
        # buffers, and a plain tensor became a constant of its own that the package's loader was never given
        # (inductor inlines tensors of up to 8 values, so only rope dims over 16 failed). Non-persistent: it is
        # derived from the config, so state dicts and checkpoints never carry it; float32 through casts (_apply).
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Moves reach it, casts (model.to(bfloat16), .double()) do not: the exact float32 frequencies are put
        # back on the new device, so the angles are the same whatever the model's dtype.
        exact = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = exact.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True,
               kernel_impl: str = "eager", inplace: bool = False) -> torch.Tensor:
    """Rotate x [..., R] by angles whose cos/sin broadcast to [..., R/2]; the layout is kept. kernel_impl
    "compiled" takes the real form (compiled code fuses it anyway; layers.KERNEL_IMPLS). inplace: write
    the result over x and return x (x a view into a fresh projection the caller owns: the rope columns of
    q, the rope key beside the latent), so the caller needs no concatenation afterwards."""
    if interleaved and x.dtype in (torch.bfloat16, torch.float16) and kernel_impl == "eager":
        # No complex type for bfloat16/half: rotate a float32 copy as below (a few kernels instead of the
        # real form's dozen) and round once on the way back, where the real form rounds every product.
        rotated = apply_rope(x.float(), cos.float(), sin.float(), interleaved, kernel_impl)
        return x.copy_(rotated) if inplace else rotated.to(x.dtype)
    if interleaved and x.dtype in (torch.float32, torch.float64) and cos.dtype == x.dtype \
            and kernel_impl == "eager":
        # Interleaved pairs are complex numbers x0 + i x1: one complex multiply does the rotation. Same
        # arithmetic as the real form below, but one kernel instead of six strided ones plus a stack
        # (about 6x faster on CPU).
        pairs = x.unflatten(-1, (-1, 2))
        whole_pairs = not (pairs.stride(-1) != 1 or pairs.storage_offset() % 2
                           or any(st % 2 for st in pairs.stride()[:-1]))
        if inplace and whole_pairs:
            torch.view_as_complex(pairs).mul_(torch.complex(cos, sin))
            return x
        if not whole_pairs:
            pairs = pairs.contiguous()  # view_as_complex needs whole (re, im) pairs at even offsets
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2)
    elif interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return x.copy_(rotated) if inplace else rotated
