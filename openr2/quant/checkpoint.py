"""Quantized checkpoints: `openr2 quantize` (float checkpoint -> int8 / int4 checkpoint) and what load_model needs
to build quantized modules before reading them.

A quantized checkpoint is the HF layout plus, per quantized linear `P`: `P.weight` (int8 [O, I] or packed
uint8 [O, I/2]), `P.weight_scale` and for asymmetric int4 `P.weight_zero` (float16 [O, I/g]); experts per
expert as usual. config.json carries
    "quantization_config": {"quant_method": "openr2", "scheme": "int4", "group_size": 64, "symmetric": false}
Router, norms and embeddings stay float; every other linear (experts, shared experts, head) is quantized.
Bad options raise before anything is written; the output directory appears only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from openr2.quant import schemes
from openr2.quant.layers import QuantSpec, quantize_modules, weight_bytes

QUANT_METHOD = "openr2"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "README.md")


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


def quantize_checkpoint(src: str, out: str, scheme: str, group_size: int | None = 64,
                        symmetric: bool = False) -> dict:
    """Read a float checkpoint directory, write its quantized copy (with the tokenizer files) to `out`.

    Errors (unknown scheme, bad group size, a layer width the group does not divide, an existing non-empty
    `out`) come before anything is written; the output is built in a temporary sibling and renamed."""
    from openr2.model.hf_io import load_model, save_model

    src, out = os.fspath(src), os.fspath(out)
    quant_config(scheme, group_size, symmetric)  # fail fast on options
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out}: already exists; choose a new output directory")
    model = load_model(src)
    if any(type(m).__module__ == "openr2.quant.layers" for m in model.modules()):
        raise ValueError(f"{src}: already quantized; quantize the float checkpoint")
    float_bytes = weight_bytes(model)
    quantize_model(model, scheme, group_size, symmetric)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".quantize-", dir=parent)
    try:
        save_model(model, tmp)
        for name in _COPIED:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "scheme": scheme, "group_size": model.config.quantization_config["group_size"],
            "symmetric": model.config.quantization_config["symmetric"], "float_weight_bytes": float_bytes,
            "weight_bytes": weight_bytes(model)}
