"""Checkpoint I/O in the Hugging Face DeepSeek-V2/V3/V3.2 layout: the one place that knows HF tensor names.

Reads a directory holding config.json and one or more safetensors files (sharded through
model.safetensors.index.json or not) into a model built on the meta device, materialised tensor by tensor
(peak memory near the model size): per-expert tensors are stacked, FP8 e4m3 weights with 128x128
`weight_scale_inv` block scales are dequantised to the asked dtype. Writes the same layout (per-expert
names, MTP copies of embedding and head) so that transformers loads our saves. Every problem with the files
raises an error naming the file and tensor; no half-loaded model escapes.

DeepSeek releases V3 and V3.2 in this layout, FP8: V3.2 adds `self_attn.indexer.{wq_b, wk}.weight` (FP8 with
their scales in the release), `indexer.k_norm.{weight, bias}` and `indexer.weights_proj.weight` (float) in
every layer, the MTP layer's too; its UE8M0 scales (`scale_fmt`) are powers of two stored as float32, read
like any other. transformers' conversion mapping does nothing more for deepseek_v32 than stack the experts
(its `qwen2_moe` rule), and neither does this module. Parameters of FLOAT32_MODULES (router, the indexer's
head weights) load in float32 whatever the dtype.

DeepSeek-V4 (model/names_v4.py) is read in two layouts, the release's own names (`embed.weight`,
`layers.N.attn.wq_a.weight`, with `.scale` beside FP8 weights) and what transformers' save_pretrained writes;
openr2 writes the latter, plus the MTP depths under the release's `mtp.{k}.*` names (transformers ignores them). Release experts may
be FP4 (e2m1, two per int8 byte, low nibble first) with a UE8M0 scale per 32 inputs: dequantised at load.
UE8M0 scales (float8_e8m0fnu, or raw uint8 exponents) are powers of two.

Modules whose state-dict keys are not the checkpoint's (quantized modules) are given to `load_weights` /
`write_checkpoint` as a `names` map (state-dict key -> name in our layout): this module knows no
quantization. `openr2/checkpoints.py` (load_model, save_model) builds the model and that map.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from openr2.config import ModelConfig
from openr2.model import names_v4
from openr2.model.transformer import FLOAT32_MODULES, FLOAT32_PARAMS, Transformer

INDEX_FILE = "model.safetensors.index.json"
# stacked experts, or (quantized checkpoints) one of their stored tensors: experts.gate_up_proj.weight_scale
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(?:\.(weight\w*))?$")
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


# ---------------------------------------------------------------------------------------------- names
def _hf_prefix(ours: str, num_layers: int) -> str:
    """Our module path -> HF's: add `model.`, and MTP module k lives at HF layer num_layers + k."""
    if ours.startswith("lm_head."):
        return ours
    if ours.startswith("mtp."):
        _, k, rest = ours.split(".", 2)
        return f"model.layers.{num_layers + int(k)}.{rest}"
    return "model." + ours


def hf_names(ours: str, config: ModelConfig, release: bool = False) -> list[str]:
    """HF tensor names that make up one of our parameters (several for stacked experts, in expert order);
    V4: the release's names if `release`, else transformers' saved names."""
    if config.is_v4:
        names = names_v4.release_names(ours, config.n_routed_experts)
        return names if release else [names_v4.transformers_name(n) for n in names]
    hf = _hf_prefix(ours, config.num_hidden_layers)
    m = _EXPERTS.match(hf)
    if not m:
        return [hf]
    base, kind, tensor = m.groups()
    projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    return [f"{base}.{e}.{p}.{tensor or 'weight'}" for e in range(config.n_routed_experts) for p in projs]


def _mtp_copies(config: ModelConfig) -> dict[str, str]:
    """HF names of the MTP layers' copies of embedding and head -> the main tensor they copy."""
    out = {}
    if config.is_v4:  # no V4 MTP block: nothing to copy
        return out
    for k in range(config.num_nextn_predict_layers):
        layer = f"model.layers.{config.num_hidden_layers + k}"
        out[f"{layer}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{layer}.shared_head.head.weight"] = "lm_head.weight"
    return out


def _our_params(model: Transformer) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, tied weights once (the embedding)."""
    sd = model.state_dict(keep_vars=True)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# ---------------------------------------------------------------------------------------------- files
class CheckpointFiles:
    """Which file holds each tensor, with open handles; errors name the file. `block` is the FP8 scale
    block (config.json's quantization_config.weight_block_size, default 128x128)."""

    def __init__(self, path: str, block: list[int] | None = None):
        self.path, self.block = path, list(block or [128, 128])
        self.release = False  # V4 files under the release's own names (set by open_checkpoint)
        self.where: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(path, name)):
                    raise FileNotFoundError(f"{index}: shard {name!r} is missing from {path}")
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            weight_map = None
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors files")
        for name in files:
            handle = self._open(name)
            for key in handle.keys():
                if key in self.where:
                    raise ValueError(f"{path}: tensor {key!r} is stored twice ({self.where[key]}, {name})")
                self.where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise ValueError(f"{os.path.join(path, name)}: tensor {key!r} listed in {INDEX_FILE} "
                                     f"is not in that shard")

    def _open(self, name: str):
        if name not in self._handles:
            file = os.path.join(self.path, name)
            try:
                self._handles[name] = safe_open(file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{file}: unreadable or truncated safetensors file ({e})") from None
        return self._handles[name]

    def file_of(self, key: str) -> str:
        return os.path.join(self.path, self.where[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.where[key]).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """safetensors' dtype tag of a tensor (F32, BF16, F8_E4M3, I8, ...)."""
        return self._open(self.where[key]).get_slice(key).get_dtype()

    def scale_of(self, key: str) -> str | None:
        """The block-scale tensor stored beside a quantized weight: `_scale_inv` (HF) or the release's `.scale`."""
        for name in (key + "_scale_inv", names_v4.release_scale_name(key) if self.release else None):
            if name in self.where:
                return name
        return None

    def read(self, key: str) -> torch.Tensor:
        try:
            return self._open(self.where[key]).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{self.file_of(key)}: cannot read tensor {key!r} ({e})") from None


def _dequantize_fp8(files: CheckpointFiles, key: str, weight: torch.Tensor, block: list[int]) -> torch.Tensor:
    """W[i, j] = float(Wq[i, j]) * scale_inv[i // b0, j // b1] (scale_inv is a multiplier despite its name)."""
    scale_key = files.scale_of(key)
    if scale_key is None:
        raise ValueError(f"{files.file_of(key)}: FP8 tensor {key!r} has no {key + '_scale_inv'!r}")
    if weight.dim() != 2:
        raise ValueError(f"{files.file_of(key)}: FP8 tensor {key!r} must be 2-D, got {tuple(weight.shape)}")
    scale = _scale_values(files.read(scale_key))
    rows, cols = weight.shape
    want = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != want:
        raise ValueError(f"{files.file_of(scale_key)}: tensor {scale_key!r} has shape {tuple(scale.shape)}, "
                         f"expected {want} for {block[0]}x{block[1]} blocks of {tuple(weight.shape)}")
    scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    """float32 multipliers: UE8M0 as raw uint8 exponents is 2^(e - 127); float8_e8m0fnu and floats convert."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1


def _dequantize_fp4(files: CheckpointFiles, key: str, packed: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, cols / 2] int8, two e2m1 values per byte (low nibble first), times a scale per `cols / scale
    columns` inputs (the release: 32) -> float32 [rows, cols]."""
    scale_key = files.scale_of(key)
    if scale_key is None:
        raise ValueError(f"{files.file_of(key)}: FP4 tensor {key!r} has no {names_v4.release_scale_name(key)!r}")
    scale = _scale_values(files.read(scale_key))
    rows = packed.shape[0]
    if scale.dim() != 2 or scale.shape[0] != rows or cols % scale.shape[1]:
        raise ValueError(f"{files.file_of(scale_key)}: tensor {scale_key!r} has shape {tuple(scale.shape)}, "
                         f"expected ({rows}, {cols} / block) for FP4 weights of {rows} x {cols}")
    u8 = packed.view(torch.uint8)
    lut = torch.tensor(_FP4_VALUES)
    values = torch.stack((lut[(u8 & 0xF).long()], lut[(u8 >> 4).long()]), dim=-1).reshape(rows, cols)
    return values * scale.repeat_interleave(cols // scale.shape[1], dim=1)


# ---------------------------------------------------------------------------------------------- load
def open_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, CheckpointFiles]:
    """The config and tensor files of an HF-layout checkpoint directory. A config that announces MTP
    layers whose tensors the files lack (as transformers saves) is loaded with MTP off, with a warning."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    config = ModelConfig.from_pretrained(path)
    files = CheckpointFiles(path, (config.quantization_config or {}).get("weight_block_size"))
    files.release = config.is_v4 and "embed.weight" in files.where
    n_mtp = config.num_nextn_predict_layers
    mtp_prefix = "mtp." if config.is_v4 else f"model.layers.{config.num_hidden_layers}."
    if n_mtp and not any(k.startswith(mtp_prefix) for k in files.where):
        warnings.warn(f"{path}: config announces {n_mtp} MTP layer(s) but the files hold no MTP tensors "
                      f"(as transformers saves); loading with MTP off", stacklevel=3)
        config.num_nextn_predict_layers = 0
    return config, files


def load_weights(model: Transformer, files: CheckpointFiles, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", names: dict[str, str] | None = None) -> None:
    """Materialise a meta-device model from the files: float weights in `dtype` (FLOAT32_MODULES in float32),
    the tensors of `names` (state-dict key -> name in our layout: quantized modules) as they are stored."""
    config, names = model.config, names or {}
    params = _our_params(model)
    wanted = {ours: hf_names(names.get(ours, ours), config, files.release) for ours in params}
    _check_names(files, config, wanted)

    state = {}
    for ours, meta in params.items():
        target_dtype = torch.float32 if _is_router(model, ours) else meta.dtype if ours in names else dtype
        if not meta.is_floating_point():  # integer buffers (V4's hash table) keep their dtype
            target_dtype = meta.dtype
        state[ours] = _read_param(files, wanted[ours], meta, target_dtype, device, files.block)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _is_router(model: Transformer, ours: str) -> bool:
    """Whether the parameter stays float32 whatever the dtype: the router's, the indexer's head weights (V4:
    hyper-connections, norms, sinks, position biases)."""
    owner, _, leaf = ours.rpartition(".")
    return isinstance(model.get_submodule(owner), FLOAT32_MODULES) or leaf in FLOAT32_PARAMS


def _check_names(files: CheckpointFiles, config: ModelConfig, wanted: dict[str, list[str]]) -> None:
    expected = {n for names in wanted.values() for n in names}
    optional = set(_mtp_copies(config))
    if config.tie_word_embeddings:
        optional.add("lm_head.weight")
    present = set(files.where)
    if config.is_v4:  # MTP tensors past the depths the config builds (and the release's copies of embed/head)
        optional |= {n for n in present if n.startswith("mtp.")}
    missing = sorted(expected - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{files.path}: tensor {missing[0]!r} is missing{more}")
    scales = {n + "_scale_inv" for n in expected}
    if files.release:
        scales |= {names_v4.release_scale_name(n) for n in expected}
    unexpected = sorted(present - expected - optional - scales)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{files.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r}{more}")


def _read_param(files: CheckpointFiles, names: list[str], meta: torch.Tensor, dtype, device, block):
    """Read the HF tensor(s) of one parameter, dequantise FP8, check shapes, stack experts, cast, place."""
    out = torch.empty(meta.shape, dtype=dtype, device=device)
    slices = [out]
    if len(names) > 1:  # stacked experts: names are per expert (gate, up) or (down), in expert order
        per_expert = len(names) // meta.shape[0]
        rows = meta.shape[1] // per_expert
        slices = [out[e, i * rows : (i + 1) * rows] for e in range(meta.shape[0]) for i in range(per_expert)]
    for name, dest in zip(names, slices):
        shape = files.shape(name)
        # FP4-packed: two values per byte along the inputs
        fp4 = files.dtype_name(name) == "I8" and dest.is_floating_point() and dest.dim() == 2 \
            and shape == (dest.shape[0], dest.shape[1] // 2)
        if shape != tuple(dest.shape) and not fp4:
            raise ValueError(f"{files.file_of(name)}: tensor {name!r} has shape {shape}, "
                             f"expected {tuple(dest.shape)}")
        tensor = files.read(name)
        if fp4:
            tensor = _dequantize_fp4(files, name, tensor, dest.shape[1])
        elif tensor.dtype in _FP8_DTYPES and dest.dtype not in _FP8_DTYPES:  # kept FP8: copied as stored
            tensor = _dequantize_fp8(files, name, tensor, block)
        dest.copy_(tensor)
    return out


# ---------------------------------------------------------------------------------------------- save
def hf_state_items(model: Transformer, stored: dict[str, str] | None = None,
                   release: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of the whole checkpoint, experts unstacked, MTP copies included; `stored`
    names tensors whose state-dict key is not their name in our layout (see load_weights); `release`: V4's
    release names instead of transformers'."""
    config, stored = model.config, stored or {}
    for ours, tensor in _our_params(model).items():
        names = hf_names(stored.get(ours, ours), config, release)
        if len(names) == 1:
            yield names[0], tensor.detach()
            continue
        per_expert = len(names) // tensor.shape[0]
        rows = tensor.shape[1] // per_expert
        for i, name in enumerate(names):
            e, part = divmod(i, per_expert)
            yield name, tensor.detach()[e, part * rows : (part + 1) * rows]
    main = {"model.embed_tokens.weight": model.embed_tokens.weight, "lm_head.weight": model.lm_head.weight}
    for name, source in _mtp_copies(config).items():
        yield name, main[source].detach()


def write_checkpoint(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                     names: dict[str, str] | None = None, quantization_config: dict | None = None) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) in the HF layout;
    `names` as for load_weights, `quantization_config` written into config.json when given (to_hf leaves
    it out: a float model's loads dequantise)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = model.config
    config_out = ModelConfig.from_hf(config.to_hf(), source=config.source)
    config_out.torch_dtype = str(model.dtype).removeprefix("torch.")
    config_out.save_pretrained(path)
    if quantization_config:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
        hf["quantization_config"] = quantization_config
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
            f.write("\n")

    # Plan shards from sizes first, then materialise one shard at a time (peak memory ~ one shard).
    shard_of, sizes = {}, [0]
    for name, tensor in hf_state_items(model, names):
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            sizes.append(0)
        shard_of[name] = len(sizes) - 1
        sizes[-1] += nbytes
    total = len(sizes)
    files = ["model.safetensors"] if total == 1 else \
        [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    for old in os.listdir(path):  # stale shards of an earlier save would confuse every loader
        if (old.startswith("model") and old.endswith(".safetensors") and old not in files) or old == INDEX_FILE:
            os.remove(os.path.join(path, old))
    for i, file in enumerate(files):
        # own storage on CPU: safetensors rejects views that share memory
        shard = {n: t.to("cpu").contiguous().clone() for n, t in hf_state_items(model, names) if shard_of[n] == i}
        tmp = os.path.join(path, file + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, file))
    if total > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": {n: files[i] for n, i in shard_of.items()}}
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


