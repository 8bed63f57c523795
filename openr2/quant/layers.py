"""Drop-in quantized modules: `QuantLinear` for nn.Linear, `QuantExperts` for the stacked routed experts.

Each holds the stored tensors of one format from quant/schemes.py (int8, int4 or fp8) as buffers and offers
two paths, chosen by its `impl` attribute (set through `set_quant_impl(model, impl)`, never a global):
- `reference`: dequantize the whole weight to float, then run exactly the float module's code;
- `fast`: a packed int kernel where one exists for the activation dtype (int4 with bfloat16 activations
  on CPU: torch's `_weight_int4pack_mm_for_cpu`, its packed layout built on first use), otherwise
  dequantize per use: int8 multiplies the int8 weight cast to the activation dtype and scales the
  outputs; experts dequantize only the experts a batch routes to.
`weight` (and the experts' `gate_up_proj` / `down_proj` via `dequantize`) gives the dequantized float
weight, so code that reads `module.weight` (absorbed MLA reads `kv_b_proj.weight`) keeps working.
`quantize_modules` swaps a model's modules in place (on real weights, or on the meta device to load).

Shape legend: N rows (tokens), I input features, O output features, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openr2.model.moe import RoutedExperts, experts_per_pair
from openr2.quant import schemes

IMPLS = ("fast", "reference")


class QuantSpec:
    """What to store for one weight: scheme int8 | int4 | fp8, int4 group size and symmetry, fp8 block."""

    def __init__(self, scheme: str, group_size: int = 64, symmetric: bool = False, block=(128, 128)):
        self.scheme, self.group_size, self.symmetric, self.block = scheme, group_size, symmetric, tuple(block)


class _QuantWeight(nn.Module):
    """The stored tensors of one weight [*lead, O, I] (lead = (E,) for stacked experts)."""

    def __init__(self, shape: tuple[int, ...], spec: QuantSpec, name: str = "layer", device=None, halves: int = 1):
        super().__init__()
        *lead, O, I = shape
        self.shape, self.scheme, self.impl = tuple(shape), spec.scheme, "fast"
        self.halves = halves  # stacked gate_up: FP8 scale grids of gate and up rows are stored one after the other
        self.group_size = None
        kw = {"device": device}
        if spec.scheme == "int8":
            self.register_buffer("qweight", torch.empty(*lead, O, I, dtype=torch.int8, **kw))
            self.register_buffer("scale", torch.empty(*lead, O, dtype=torch.float32, **kw))
        elif spec.scheme == "int4":
            g = self.group_size = schemes.layer_group_size(I, spec.group_size, name)
            self.register_buffer("qweight", torch.empty(*lead, O, I // 2, dtype=torch.uint8, **kw))
            self.register_buffer("scale", torch.empty(*lead, O, I // g, dtype=torch.float16, **kw))
            if not spec.symmetric:
                self.register_buffer("zero", torch.empty(*lead, O, I // g, dtype=torch.float16, **kw))
        elif spec.scheme == "fp8":
            self.block = spec.block
            self.register_buffer("qweight", torch.empty(*lead, O, I, dtype=torch.float8_e4m3fn, **kw))
            *lead_s, rows, cols = schemes.fp8_scale_shape((*lead, O // halves, I), spec.block)
            self.register_buffer("scale", torch.empty(*lead_s, rows * halves, cols, dtype=torch.float32, **kw))
        else:
            raise ValueError(f"unknown quantization scheme {spec.scheme!r}")
        self._int4pack = {}  # per stacked index: torch's packed int4 layout, built on first bf16 use

    @property
    def zero_or_none(self):
        return getattr(self, "zero", None)

    @torch.no_grad()
    def set_from(self, w: torch.Tensor, spec: QuantSpec) -> None:
        """Quantize a float weight into these buffers."""
        if self.scheme == "int8":
            q, s = schemes.quantize_int8(w)
            self.qweight, self.scale = q, s
        elif self.scheme == "int4":
            q, s, z = schemes.quantize_int4(w, self.group_size, spec.symmetric)
            self.qweight, self.scale = q, s
            if z is not None:
                self.zero = z
        else:
            raise ValueError("FP8 weights are loaded from checkpoints, not quantized here")
        self._int4pack = {}

    def dequantize(self, index: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """The float weight [O, I] (of stacked slice `index`) or the whole [*lead, O, I]."""
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        if self.scheme == "int8":
            w = schemes.dequantize_int8(pick(self.qweight), pick(self.scale))
        elif self.scheme == "int4":
            z = self.zero_or_none
            w = schemes.dequantize_int4(pick(self.qweight), pick(self.scale), None if z is None else pick(z))
        else:
            q, s = pick(self.qweight), pick(self.scale)
            w = torch.cat([schemes.dequantize_fp8(qh, sh, self.block) for qh, sh in
                           zip(q.chunk(self.halves, dim=-2), s.chunk(self.halves, dim=-2))], dim=-2)
        return w.to(dtype)

    def matmul(self, x: torch.Tensor, index: int | None = None, kernel_impl: str = "eager") -> torch.Tensor:
        """x [..., I] -> x @ W^T [..., O] (W the weight, or stacked slice `index`), by self.impl; kernel_impl
        as for the float layers (model/layers.py)."""
        if self.impl == "reference":
            return F.linear(x, self.dequantize(index, x.dtype))
        if self.scheme == "int8" and kernel_impl == "compiled":
            # compiled decode (a few rows): as a product-and-sum, inductor fuses the dequantization into one
            # kernel that reads the int8 bytes (an extern matmul would need the float weight written out first)
            return (x[..., None, :] * self.dequantize(index, x.dtype)).sum(-1)
        if self.scheme == "int8":
            q = self.qweight if index is None else self.qweight[index]
            s = self.scale if index is None else self.scale[index]
            return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
        if self.scheme == "int4" and x.dtype == torch.bfloat16 and x.device.type == "cpu" \
                and self.group_size in schemes.GROUP_SIZES and self.shape[-2] % 16 == 0:  # the kernel's limits
            packed, scales_zeros = self._packed_int4(index)
            flat = x.reshape(-1, x.shape[-1])
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_zeros)
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, self.dequantize(index, x.dtype))

    def _packed_int4(self, index):
        key = -1 if index is None else index
        if key not in self._int4pack:
            q = schemes.unpack_int4(self.qweight if index is None else self.qweight[index]).to(torch.int32)
            s = self.scale if index is None else self.scale[index]
            z = self.zero_or_none
            z = torch.zeros_like(s) if z is None else (z if index is None else z[index])
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
            scales_zeros = torch.stack((s, z), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._int4pack[key] = (packed, scales_zeros)
        return self._int4pack[key]

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"shape={self.shape}, scheme={self.scheme}{g}, impl={self.impl}"


class QuantLinear(nn.Module):
    """nn.Linear (no bias) with a quantized weight; `weight` is the dequantized float weight."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, name: str = "layer", device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.q = _QuantWeight((out_features, in_features), spec, name, device)

    @property
    def weight(self) -> torch.Tensor:
        return self.q.dequantize(dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor, kernel_impl: str = "eager") -> torch.Tensor:
        return self.q.matmul(x, kernel_impl=kernel_impl)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QuantExperts(nn.Module):
    """RoutedExperts with quantized stacked weights gate_up_proj [E, 2I, D] and down_proj [E, D, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, spec: QuantSpec, name: str = "experts",
                 device=None):
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = _QuantWeight((num_experts, 2 * intermediate, hidden), spec, f"{name}.gate_up_proj", device,
                                         halves=2)
        self.down_proj = _QuantWeight((num_experts, hidden, intermediate), spec, f"{name}.down_proj", device)

    @property
    def impl(self) -> str:
        return self.gate_up_proj.impl

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, impl: str = "grouped"):
        """x [N, D], weights [N, K], ids [N, K] -> [N, D]; `impl` is the float model's moe_impl (moe.MOE_IMPLS):
        the reference runs it on the dequantized weights; the fast path runs `decode` (the compiled decode
        step) as its own tensor-only path and every other choice as `_fast`."""
        if self.impl == "reference":
            return self._as_float(x.dtype).forward(x, weights, ids, impl)
        if impl == "decode":
            return self._tensor_only(x, weights, ids)
        return self._fast(x, weights, ids)

    def _tensor_only(self, x, weights, ids):
        """Compiled decode: each (token, slot) pair's expert weights indexed by id and dequantized inside the
        kernel that reads the quantized bytes (no host sync)."""
        flat = ids.flatten()
        return experts_per_pair(x, weights, ids, self.gate_up_proj.dequantize(flat, x.dtype),
                                self.down_proj.dequantize(flat, x.dtype))

    def _as_float(self, dtype: torch.dtype) -> RoutedExperts:
        """A float RoutedExperts holding the dequantized weights (the reference: the float model's code)."""
        ref = RoutedExperts.__new__(RoutedExperts)
        nn.Module.__init__(ref)
        ref.num_experts, ref.intermediate = self.num_experts, self.intermediate
        ref.gate_up_proj = self.gate_up_proj.dequantize(dtype=dtype)
        ref.down_proj = self.down_proj.dequantize(dtype=dtype)
        return ref

    def _fast(self, x, weights, ids):
        """Sort (token, slot) pairs by expert once; per routed expert one quantized matmul pair; scatter back."""
        N, K = ids.shape
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        token = order // K
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        rows = x.index_select(0, token)
        out_rows = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = self.gate_up_proj.matmul(rows[start : start + n], e)
                gate, up = h.chunk(2, dim=-1)
                out_rows[start : start + n] = self.down_proj.matmul(F.silu(gate) * up, e)
                start += n
        out_rows = out_rows * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, out_rows)


# ---------------------------------------------------------------------------------------------- model
def quantize_modules(model: nn.Module, spec: QuantSpec, quantize_weights: bool = True,
                     dtype: torch.dtype = torch.float32, only: set[str] | None = None) -> nn.Module:
    """Replace every nn.Linear (but a head tied to the embedding) and every RoutedExperts in place.

    quantize_weights=True quantizes the current float weights; False builds empty modules (e.g. on the
    meta device) for a loader to fill; `only` limits it to those module names. The router (a Gate, not an
    nn.Linear), norms and embeddings stay float."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    targets = [(name, m) for name, m in model.named_modules()
               if ((isinstance(m, nn.Linear) and not (tied and name == "lm_head")) or isinstance(m, RoutedExperts))
               and (only is None or name in only)]
    for name, m in targets:  # build all first: a bad group size raises before anything is replaced
        device = m.gate_up_proj.device if isinstance(m, RoutedExperts) else m.weight.device
        if isinstance(m, nn.Linear):
            if m.bias is not None:
                raise ValueError(f"{name}: quantized layers carry no bias (attention_bias is not supported)")
            new = QuantLinear(m.in_features, m.out_features, spec, name, device, dtype)
        else:
            E, two_i, D = m.gate_up_proj.shape
            new = QuantExperts(E, D, two_i // 2, spec, name, device)
        targets[targets.index((name, m))] = (name, (m, new))
    for name, (old, new) in targets:
        if quantize_weights:
            if isinstance(new, QuantLinear):
                new.q.set_from(old.weight.detach(), spec)
            else:
                new.gate_up_proj.set_from(old.gate_up_proj.detach(), spec)
                new.down_proj.set_from(old.down_proj.detach(), spec)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def set_quant_impl(model: nn.Module, impl: str) -> nn.Module:
    """Choose the `fast` or `reference` path of every quantized module in the model."""
    if impl not in IMPLS:
        raise ValueError(f"quant impl must be one of {IMPLS}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, _QuantWeight):
            m.impl = impl
    return model


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """State-dict key of each quantized buffer -> its name in our checkpoint layout (before hf_io adds the
    HF prefix and unstacks experts): `P.q.qweight` -> `P.weight`, `P.q.scale` -> `P.weight_scale` (FP8:
    `P.weight_scale_inv`, as DeepSeek-V3 names it), `P.q.zero` -> `P.weight_zero`; stacked experts
    `X.gate_up_proj.qweight` -> `X.gate_up_proj` and `X.gate_up_proj.scale` -> `X.gate_up_proj.weight_scale`,
    which hf_io turns into per-expert `X.{e}.gate_proj.weight_scale` / `X.{e}.up_proj.weight_scale`."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            parts = [(f"{name}.q.", name, m.q, ".weight")]
        elif isinstance(m, QuantExperts):
            parts = [(f"{name}.{p}.", f"{name}.{p}", getattr(m, p), "") for p in ("gate_up_proj", "down_proj")]
        else:
            continue
        for prefix, base, w, weight_suffix in parts:
            scale = "weight_scale_inv" if w.scheme == "fp8" else "weight_scale"
            disk = {"qweight": base + weight_suffix, "scale": f"{base}.{scale}", "zero": f"{base}.weight_zero"}
            for buf, _ in w.named_buffers(recurse=False):
                out[prefix + buf] = disk[buf]
    return out


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _QuantWeight) for m in model.modules())


def quant_schemes(model: nn.Module) -> set[str]:
    """The quantization schemes of the model's weights ("int8", "int4", "fp8"); empty for a float model."""
    return {m.scheme for m in model.modules() if isinstance(m, _QuantWeight)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (the stored weights; a tied head counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
