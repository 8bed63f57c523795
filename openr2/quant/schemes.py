"""Weight-only quantization formats as pure tensor functions: quantize, pack, dequantize.

Owns the numeric formats and nothing else (modules live in quant/layers.py, files in quant/checkpoint.py):
- int8 per output channel, symmetric: s_o = max|W_o,:| / 127, q = round(W / s) in [-127, 127] (int8),
  scale float32 [O]. W ~= q * s.
- int4 group-wise along the input dim (groups of g = 32/64/128 columns): q in [0, 15], two per byte
  (low nibble = even column), scale and zero float16 [O, I/g], W ~= (q - 8) * s + z: the tinygemm
  convention, so the same numbers feed torch's packed int4 CPU kernel. Asymmetric: s = (max - min) / 15,
  z = min + 8 s. Symmetric: s = max|W| / 7, z = 0 (no zero tensor stored). A row narrower than g is one
  group (g = I for that layer); otherwise g must divide I.
- FP8 e4m3 with one float32 `weight_scale_inv` per 128x128 block (DeepSeek-V3 checkpoints):
  W = fp8 * scale_inv[i // b0, j // b1].
q is computed against the float16-rounded scale and zero, so dequantize() reproduces exactly what a
kernel reading the stored tensors computes. Every function accepts a leading stack dim ([E, O, I]).

Shape legend: O output features, I input features, G groups per row (I / g), E stacked experts.
"""

from __future__ import annotations

import math

import torch

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
_FP16_TINY = 2.0**-14  # smallest normal float16: a smaller scale would underflow when stored


def check_scheme(scheme: str, group_size: int | None = None) -> None:
    """Raise ValueError for an unknown scheme or group size (before any work)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size!r}")


def layer_group_size(in_features: int, group_size: int, name: str = "layer") -> int:
    """The group a layer of this width uses: group_size if it divides the width, the whole row if the row is
    narrower than one group; anything else is an error naming the layer."""
    if in_features <= group_size:
        if in_features % 2:
            raise ValueError(f"{name}: input width {in_features} is odd; int4 packs two columns per byte")
        return in_features
    if in_features % group_size:
        raise ValueError(f"{name}: int4 group size {group_size} does not divide the layer width {in_features}")
    return group_size


# ---------------------------------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] float -> (q int8 [..., O, I], scale float32 [..., O])."""
    w = w.float()
    scale = (w.abs().amax(dim=-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


# ---------------------------------------------------------------------------------------------- int4
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., I] values 0..15 -> uint8 [..., I/2], column 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., I/2] -> uint8 [..., I] values 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [..., O, I] float -> (packed uint8 [..., O, I/2], scale fp16 [..., O, G], zero fp16 [..., O, G] or None).

    group_size must divide I (see layer_group_size)."""
    *lead, O, I = w.shape
    assert I % group_size == 0 and I % 2 == 0, (I, group_size)
    groups = w.float().reshape(*lead, O, I // group_size, group_size)
    if symmetric:
        scale = groups.abs().amax(dim=-1) / 7
        zero = torch.zeros_like(scale)
    else:
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = (hi - lo) / 15
        zero = None
    scale = scale.clamp_min(_FP16_TINY).to(torch.float16)
    if zero is None:
        zero = (lo + 8 * scale.float()).to(torch.float16)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]) + 8
    q = q.clamp_(0, 15).reshape(*lead, O, I)
    return pack_int4(q), scale, None if symmetric else zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Inverse of quantize_int4: float32 [..., O, I], as q * s + (z - 8 s) in one fused multiply-add."""
    *lead, O, half = packed.shape
    q = torch.empty(*lead, O, half, 2, dtype=torch.float32, device=packed.device)
    torch.bitwise_and(packed, 0xF, out=q[..., 0])  # written straight into float: no uint8 intermediate
    torch.bitwise_right_shift(packed, 4, out=q[..., 1])
    G = scale.shape[-1]
    s = scale.float()
    offset = -8 * s if zero is None else zero.float() - 8 * s
    return torch.addcmul(offset[..., None], q.view(*lead, O, G, 2 * half // G), s[..., None]).view(*lead, O, 2 * half)


# ---------------------------------------------------------------------------------------------- fp8
def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, O, I = shape
    return (*lead, math.ceil(O / block[0]), math.ceil(I / block[1]))


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q float8 [..., O, I], scale_inv float32 [..., ceil(O/b0), ceil(I/b1)] -> float32 [..., O, I]."""
    O, I = q.shape[-2:]
    s = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :O, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :I]
    return q.float() * s


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] float -> (float8_e4m3fn [O, I], scale_inv float32 [ceil(O/b0), ceil(I/b1)]), amax/448 per block
    (how DeepSeek-V3's checkpoints are made; used by tests and benchmarks to build FP8 checkpoints)."""
    O, I = w.shape
    b0, b1 = block
    pad = torch.zeros(math.ceil(O / b0) * b0, math.ceil(I / b1) * b1)
    pad[:O, :I] = w.float()
    tiles = pad.view(pad.shape[0] // b0, b0, pad.shape[1] // b1, b1)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448).clamp_min(torch.finfo(torch.float32).tiny)
    q = (tiles / scale[:, None, :, None]).view_as(pad)[:O, :I].to(torch.float8_e4m3fn)
    return q, scale
