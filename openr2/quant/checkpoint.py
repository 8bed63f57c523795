"""Quantized checkpoints: the quantization_config they carry, and how load_model (openr2/checkpoints.py)
builds quantized modules for one before reading its tensors (`quantize_meta_model`); `quantize_model`
quantizes a float model in place (`openr2 quantize` is checkpoints.quantize_checkpoint).

A quantized checkpoint is the HF layout plus, per quantized linear `P`: `P.weight` (int8 [O, I] or packed
uint8 [O, I/2]), `P.weight_scale` and for asymmetric int4 `P.weight_zero` (float16 [O, I/g]); experts per
expert as usual. config.json carries
    "quantization_config": {"quant_method": "openr2", "scheme": "int4", "group_size": 64, "symmetric": false}
Router, norms and embeddings stay float; every other linear (experts, shared experts, head) is quantized.
"""

from __future__ import annotations

import torch

from openr2.quant import schemes
from openr2.quant.layers import QuantSpec, quantize_modules

QUANT_METHOD = "openr2"


def quant_config(scheme: str, group_size: int | None = 64, symmetric: bool = False) -> dict:
    """The quantization_config written to config.json (validated)."""
    schemes.check_scheme(scheme, group_size)
    if scheme == "int8":
        return {"quant_method": QUANT_METHOD, "scheme": "int8", "group_size": None, "symmetric": True}
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "group_size": group_size, "symmetric": bool(symmetric)}


def spec_from_config(qc: dict, source: str = "config.json") -> QuantSpec:
    """quantization_config of an openr2 checkpoint -> QuantSpec; a bad value names the key."""
    scheme, group = qc.get("scheme"), qc.get("group_size")
    try:
        schemes.check_scheme(scheme, group)
    except ValueError as e:
        raise ValueError(f"{source}: key 'quantization_config': {e}") from None
    if not isinstance(qc.get("symmetric", False), bool):
        raise ValueError(f"{source}: key 'quantization_config.symmetric' must be true or false")
    return QuantSpec(scheme, group or 0, qc.get("symmetric", False))


def quantize_meta_model(model, qc: dict, files, dtype: torch.dtype, block) -> None:
    """Swap the (meta-device) model's modules for quantized ones matching the checkpoint's stored tensors."""
    from torch import nn

    from openr2.model.hf_io import hf_names
    from openr2.model.moe import RoutedExperts

    config = model.config
    if qc.get("quant_method") == QUANT_METHOD:
        quantize_modules(model, spec_from_config(qc, config.source), quantize_weights=False, dtype=dtype)
    else:  # FP8 kept: each module whose stored weights all come with block scales
        only = set()
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                keys = [name + ".weight"]
            elif isinstance(m, RoutedExperts):
                keys = [name + ".gate_up_proj", name + ".down_proj"]
            else:
                continue
            stored = [n for k in keys for n in hf_names(k, config)]
            if all(n + "_scale_inv" in files.where for n in stored):
                only.add(name)
        quantize_modules(model, QuantSpec("fp8", block=block), quantize_weights=False, dtype=dtype, only=only)
    config.quantization_config = dict(qc)


def quantize_model(model, scheme: str, group_size: int | None = 64, symmetric: bool = False):
    """Quantize a float model in place (also checks every layer width first); returns it."""
    qc = quant_config(scheme, group_size, symmetric)
    if model.config.quantization_config:
        raise ValueError(f"{model.config.source}: the model is already quantized ({model.config.quantization_config})")
    quantize_modules(model, spec_from_config(qc), dtype=model.dtype)
    model.config.quantization_config = qc
    return model
