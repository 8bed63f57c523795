"""Checkpoints: load, save and quantize HF-layout checkpoint directories, float or quantized.

Sits above model/ and quant/ so that neither knows the other's part of a checkpoint: model/hf_io.py knows
the HF tensor names, the files and float (and FP8-dequantised) tensors; quant/ knows its modules, how a
checkpoint's `quantization_config` builds them on the meta device (quant/checkpoint.py) and what their
buffers are called on disk (quant/layers.checkpoint_names). This module puts the two together:

    load_model(path, dtype, device, keep_fp8)   config.json -> meta model -> quantized modules where the
                                                checkpoint says so -> weights read -> eval-mode model
    save_model(model, path)                     the HF layout, quantized buffers under their stored names
    quantize_checkpoint(src, out, scheme, ...)  `openr2 quantize`: a float checkpoint -> an int8/int4 copy
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from openr2.model import hf_io
from openr2.model.transformer import Transformer
from openr2.quant.checkpoint import QUANT_METHOD, quant_config, quantize_meta_model, quantize_model
from openr2.quant.layers import checkpoint_names, is_quantized, weight_bytes

# what `openr2 quantize` copies next to the quantized weights
_COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "README.md")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               keep_fp8: bool = False) -> Transformer:
    """Load an HF-layout DeepSeek-V2/V3/V3.2 checkpoint directory (as transformers saves it or as DeepSeek
    releases it) into a ready (eval-mode) model.

    Quantized checkpoints (`openr2 quantize`: int8/int4) load into drop-in quantized layers (quant/).
    FP8 block weights are dequantised to `dtype` unless keep_fp8, which keeps every module whose stored
    weights are all FP8 in FP8 with per-use dequantisation (half the memory of bf16)."""
    config, files = hf_io.open_checkpoint(path)
    if keep_fp8 and config.is_v4:  # quant/ knows neither the release's `.scale` names nor its FP4 experts
        raise ValueError(f"{path}: keep_fp8 is not supported for DeepSeek-V4 yet; load without it (FP8 and FP4 "
                         f"weights are dequantised)")
    quantized = config.quantization_config or {}
    config.quantization_config = None  # weights are dequantised below, unless held quantized
    with torch.device("meta"):
        model = Transformer(config)
    if quantized.get("quant_method") == QUANT_METHOD or (keep_fp8 and quantized.get("quant_method") == "fp8"):
        quantize_meta_model(model, quantized, files, dtype, files.block)
    hf_io.load_weights(model, files, dtype, device, checkpoint_names(model))
    return model.eval()


def save_model(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) in the HF layout; a
    quantized model's buffers go under their stored names, with its quantization_config in config.json."""
    names = checkpoint_names(model)
    hf_io.write_checkpoint(model, path, max_shard_bytes, names,
                           model.config.quantization_config if names else None)


def quantize_checkpoint(src: str, out: str, scheme: str, group_size: int | None = 64,
                        symmetric: bool = False) -> dict:
    """Read a float checkpoint directory, write its quantized copy (with the tokenizer files) to `out`.

    Errors (unknown scheme, bad group size, a layer width the group does not divide, an existing non-empty
    `out`) come before anything is written; the output is built in a temporary sibling and renamed."""
    src, out = os.fspath(src), os.fspath(out)
    quant_config(scheme, group_size, symmetric)  # fail fast on options
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out}: already exists; choose a new output directory")
    model = load_model(src)
    if is_quantized(model):
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
