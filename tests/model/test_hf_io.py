"""Checkpoint I/O (openr2/model/hf_io.py through openr2/checkpoints.py): round trips, sharding, FP8 block dequantisation, MTP, bad files.

Every model is built with build_model and perturbed (norm weights leave 1, correction biases leave 0), so
a tensor loaded into the wrong slot changes the logits. FP8 checkpoints are quantised here, by hand, from a
float save; their reference is the same model with its weights replaced by the dequantised values.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openr2.checkpoints import load_model, save_model
from openr2.model.hf_io import INDEX_FILE
from openr2.model.transformer import build_model
from openr2.presets import tiny_v2, tiny_v3
from tests.hf_utils import max_diff, perturb_
from tests.numerics import (
    assert_close_to_reference,
    assert_same_function,
    float64_compute,
    float64_copy,
    reference64,
)

SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
# FP8 tensors of a DeepSeek-V3 checkpoint: every *_proj.weight inside layers except the MTP's eh_proj
FP8_NAME = re.compile(r"^model\.layers\.\d+\.(?!eh_proj\.).*_proj(_with_mqa)?\.weight$")


# ---------------------------------------------------------------------------------------------- helpers
def _model(config, seed=0):
    model = build_model(config, seed=seed)
    perturb_(model, seed=seed)
    return model.eval()


def _ids(config, batch=2, tokens=12, seed=0):
    return torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _read_dir(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, whatever its sharding."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    assert key not in out, f"{key} stored twice"
                    out[key] = f.get_tensor(key)
    return out


def _clear(path) -> None:
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name == INDEX_FILE:
            os.remove(os.path.join(path, name))


def _rewrite(path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the checkpoint's tensors by `tensors` in one model.safetensors (dropping any index)."""
    _clear(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def _edit_config(path, **changes) -> None:
    file = os.path.join(path, "config.json")
    with open(file, encoding="utf-8") as f:
        raw = json.load(f)
    raw.update(changes)
    with open(file, "w", encoding="utf-8") as f:
        json.dump(raw, f)


@pytest.fixture(scope="module")
def v3():
    return _model(tiny_v3(), seed=0)


@pytest.fixture(scope="module")
def v3_dir(v3, tmp_path_factory):
    """A float save of `v3`; tests copy it before changing anything."""
    path = tmp_path_factory.mktemp("v3")
    save_model(v3, path)
    return path


@pytest.fixture
def ckpt(v3_dir, tmp_path):
    """A private copy of v3_dir to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(v3_dir, path)
    return path


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_single_file(v3, v3_dir):
    assert sorted(os.listdir(v3_dir)) == ["config.json", "model.safetensors"]
    loaded = load_model(v3_dir)
    assert loaded.config.num_nextn_predict_layers == 1 and len(loaded.mtp) == 1
    ids = _ids(v3.config)
    assert torch.equal(_logits(loaded, ids), _logits(v3, ids))
    original = v3.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
        assert tensor.dtype == original[name].dtype, name


def test_saved_names_follow_hf_layout(v3, v3_dir):
    tensors = _read_dir(v3_dir)
    n = v3.config.num_hidden_layers  # 3: MTP lives at HF layer 3
    E, I = v3.config.n_routed_experts, v3.config.moe_intermediate_size
    mtp = f"model.layers.{n}"
    # per-expert names, none of our stacked names, and the layer-1 router with its correction bias
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in tensors)
    for e in range(E):
        ours = v3.layers[1].mlp.experts
        assert torch.equal(tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"], ours.gate_up_proj[e, :I])
        assert torch.equal(tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], ours.gate_up_proj[e, I:])
        assert torch.equal(tensors[f"model.layers.1.mlp.experts.{e}.down_proj.weight"], ours.down_proj[e])
        assert f"{mtp}.mlp.experts.{e}.up_proj.weight" in tensors
    assert torch.equal(tensors["model.layers.1.mlp.gate.e_score_correction_bias"],
                       v3.layers[1].mlp.gate.e_score_correction_bias)
    # MTP: its own module tensors plus copies of the main embedding and head
    assert torch.equal(tensors[f"{mtp}.eh_proj.weight"], v3.mtp[0].eh_proj.weight)
    assert torch.equal(tensors[f"{mtp}.enorm.weight"], v3.mtp[0].enorm.weight)
    assert torch.equal(tensors[f"{mtp}.hnorm.weight"], v3.mtp[0].hnorm.weight)
    assert torch.equal(tensors[f"{mtp}.shared_head.norm.weight"], v3.mtp[0].shared_head.norm.weight)
    assert torch.equal(tensors[f"{mtp}.self_attn.kv_b_proj.weight"], v3.mtp[0].self_attn.kv_b_proj.weight)
    assert torch.equal(tensors[f"{mtp}.embed_tokens.weight"], v3.embed_tokens.weight)
    assert torch.equal(tensors[f"{mtp}.shared_head.head.weight"], v3.lm_head.weight)
    assert not any(k.startswith("mtp.") or k.startswith(f"model.layers.{n + 1}.") for k in tensors)
    assert {k.split(".")[0] for k in tensors} == {"model", "lm_head"}
    config = json.loads((v3_dir / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["num_nextn_predict_layers"] == 1
    assert "quantization_config" not in config


def test_round_trip_sharded(v3, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"stale")  # an earlier unsharded save must not survive
    save_model(v3, tmp_path, max_shard_bytes=200_000)
    names = sorted(os.listdir(tmp_path))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert set(names) == {"config.json", INDEX_FILE, *shards}
    assert len(shards) > 2 and all(SHARD.match(s) for s in shards)
    assert [int(SHARD.match(s)[1]) for s in shards] == list(range(1, len(shards) + 1))
    assert {int(SHARD.match(s)[2]) for s in shards} == {len(shards)}

    index = json.loads((tmp_path / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    tensors = {}
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            for key in f.keys():
                assert weight_map[key] == shard, key
                tensors[key] = f.get_tensor(key)
    assert set(weight_map) == set(tensors) and set(weight_map.values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # no shard grows past the limit unless one tensor alone is bigger
    for shard in shards:
        size = sum(tensors[k].numel() * tensors[k].element_size() for k, s in weight_map.items() if s == shard)
        assert size <= 200_000 or sum(1 for s in weight_map.values() if s == shard) == 1
    assert f"model.layers.{v3.config.num_hidden_layers}.shared_head.head.weight" in weight_map

    loaded = load_model(tmp_path)
    ids = _ids(v3.config, seed=1)
    assert torch.equal(_logits(loaded, ids), _logits(v3, ids))

    save_model(v3, tmp_path)  # back to one file: the shards and the index go
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert torch.equal(_logits(load_model(tmp_path), ids), _logits(v3, ids))


@pytest.mark.parametrize("preset", [tiny_v3, tiny_v2])
def test_round_trip_tied_embeddings(preset, tmp_path):
    model = _model(dataclasses.replace(preset(), tie_word_embeddings=True), seed=3)
    assert model.lm_head.weight is model.embed_tokens.weight
    save_model(model, tmp_path)
    tensors = _read_dir(tmp_path)
    assert "lm_head.weight" not in tensors
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    ids = _ids(model.config, seed=2)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    if model.config.num_nextn_predict_layers:
        assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], model.embed_tokens.weight)


def test_round_trip_two_mtp_layers(tmp_path):
    model = _model(dataclasses.replace(tiny_v3(), num_nextn_predict_layers=2), seed=5)
    save_model(model, tmp_path)
    tensors = _read_dir(tmp_path)
    for k in range(2):  # MTP depth k + 1 lives at HF layer num_hidden_layers + k
        assert torch.equal(tensors[f"model.layers.{3 + k}.eh_proj.weight"], model.mtp[k].eh_proj.weight)
        assert torch.equal(tensors[f"model.layers.{3 + k}.embed_tokens.weight"], model.embed_tokens.weight)
    loaded = load_model(tmp_path)
    ids = _ids(model.config, seed=3)
    with torch.no_grad():
        logits, hidden = loaded(ids, return_hidden=True)
        drafts = loaded.forward_mtp(hidden, ids)
        expected = model.forward_mtp(hidden, ids)
    assert len(drafts) == 2 and all(torch.equal(a, b) for a, b in zip(drafts, expected))


def test_bfloat16_save_and_load_keep_router_in_float32(v3, v3_dir, tmp_path):
    gates = ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
             "model.layers.3.mlp.gate.weight"]
    low = load_model(v3_dir, dtype=torch.bfloat16)
    assert low.embed_tokens.weight.dtype == torch.bfloat16
    assert low.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    for name in ["layers.1.mlp.gate.weight", "mtp.0.mlp.gate.weight"]:
        assert low.get_parameter(name).dtype == torch.float32
        assert torch.equal(low.get_parameter(name), v3.get_parameter(name))  # not rounded through bf16
    assert low.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    save_model(low, tmp_path)
    tensors = _read_dir(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert tensors["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert all(tensors[name].dtype == torch.float32 for name in gates)
    back = load_model(tmp_path, dtype=torch.bfloat16)
    ids = _ids(v3.config, seed=4)
    assert torch.equal(_logits(back, ids), _logits(low, ids))


# ---------------------------------------------------------------------------------------------- FP8
def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block FP8: scale_inv = amax(|block|) / 448 per block (ragged edges too), Wq = e4m3(W / s)."""
    rows, cols = w.shape
    b0, b1 = block
    scale = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1), dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].abs().max() / 448.0
    wq = (w.float() / _expand(scale, block, w.shape)).to(torch.float8_e4m3fn)
    return wq, scale


def _expand(scale: torch.Tensor, block, shape) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def _dequantize(wq: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    return wq.float() * _expand(scale, block, wq.shape)


def _our_slot(hf_name: str, config):
    """HF tensor name -> (our parameter name, index into it), written out independently of hf_io."""
    n, I = config.num_hidden_layers, config.moe_intermediate_size
    name = hf_name.removeprefix("model.")
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m and int(m[1]) >= n:
        name = f"mtp.{int(m[1]) - n}.{m[2]}"
    m = re.match(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
    if not m:
        return name, ()
    base, e, kind = m[1], int(m[2]), m[3]
    if kind == "down":
        return f"{base}.down_proj", (e,)
    return f"{base}.gate_up_proj", (e, slice(0, I) if kind == "gate" else slice(I, 2 * I))


def _fp8_checkpoint(model, path, block, split_scales=False):
    """Save `model`, quantise its FP8-eligible weights blockwise; return the dequantised reference model.

    split_scales puts every weight_scale_inv in a second shard, away from its weight (an index resolves them).
    """
    save_model(model, path)
    tensors = _read_dir(path)
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    quantised = sorted(k for k in tensors if FP8_NAME.match(k))
    weights, scales = {}, {}
    for name in quantised:
        wq, scale = _quantize(tensors[name], block)
        weights[name], scales[name + "_scale_inv"] = wq, scale
        ours, index = _our_slot(name, model.config)
        with torch.no_grad():
            params[ours][index].copy_(_dequantize(wq, scale, block))
    rest = {k: v for k, v in tensors.items() if k not in weights}
    if split_scales:
        _clear(path)
        files = {"model-00001-of-00002.safetensors": {**rest, **weights},
                 "model-00002-of-00002.safetensors": scales}
        for file, part in files.items():
            save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map = {k: f for f, part in files.items() for k in part}
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    else:
        _rewrite(path, {**rest, **weights, **scales})
    _edit_config(path, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": list(block)})
    return reference.eval(), quantised


@pytest.mark.parametrize("block, split_scales", [((16, 16), False), ((32, 16), True), ((128, 128), False)],
                         ids=["16x16", "32x16-scales-in-own-shard", "128x128"])
def test_fp8_checkpoint_dequantises_blockwise(block, split_scales, tmp_path):
    # moe_intermediate 24 and intermediate 100 leave ragged 16x16 blocks (kv_a_proj's 40 rows too); a
    # non-square block catches swapped block dims; with 128x128 every tiny weight is one ragged block
    config = dataclasses.replace(tiny_v3(), moe_intermediate_size=24, intermediate_size=100)
    model = _model(config, seed=4)
    reference, quantised = _fp8_checkpoint(model, tmp_path, block, split_scales)

    # the quantised set is what DeepSeek-V3 quantises: attention, dense MLP, experts, shared experts (MTP too)
    kinds = {re.sub(r"\.\d+\.", ".N.", k) for k in quantised}
    for kind in ["model.layers.N.self_attn.q_a_proj.weight", "model.layers.N.self_attn.q_b_proj.weight",
                 "model.layers.N.self_attn.kv_a_proj_with_mqa.weight", "model.layers.N.self_attn.kv_b_proj.weight",
                 "model.layers.N.self_attn.o_proj.weight", "model.layers.N.mlp.gate_proj.weight",
                 "model.layers.N.mlp.down_proj.weight", "model.layers.N.mlp.experts.N.up_proj.weight",
                 "model.layers.N.mlp.shared_experts.down_proj.weight"]:
        assert kind in kinds
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in quantised  # the MTP block
    assert not any("eh_proj" in k or "embed" in k or "head" in k or "norm" in k or k.endswith("gate.weight")
                   for k in quantised)
    tensors = _read_dir(tmp_path)
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    scale_shapes = {  # [rows, cols] of the weight -> ceil(rows / b0) x ceil(cols / b1)
        (16, 16): {"layers.0.self_attn.kv_a_proj_with_mqa": (3, 4), "layers.1.mlp.experts.0.down_proj": (4, 2),
                   "layers.0.mlp.gate_proj": (7, 4)},
        (32, 16): {"layers.0.self_attn.kv_a_proj_with_mqa": (2, 4), "layers.1.mlp.experts.0.down_proj": (2, 2),
                   "layers.0.mlp.gate_proj": (4, 4)},
        (128, 128): {"layers.0.mlp.down_proj": (1, 1), "layers.0.self_attn.kv_b_proj": (1, 1)},
    }[block]
    for name, shape in scale_shapes.items():
        assert tensors[f"model.{name}.weight_scale_inv"].shape == shape, name

    loaded = load_model(tmp_path)
    assert loaded.config.quantization_config is None  # weights now hold the dequantised values
    assert loaded.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    ids = _ids(config, seed=5)
    # the loader dequantises to exactly the reference's weights (every tensor, bit for bit), so the same
    # code on the same tensors gives the same logits, bit for bit
    state, ref_state = loaded.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    assert [k for k in state if not torch.equal(state[k], ref_state[k])] == []
    out, ref = _logits(loaded, ids), _logits(reference, ids)
    assert torch.equal(out, ref)
    # FP8 rounding is visible: a loader that ignored the scales, or skipped the FP8 step, would fail above
    # (e4m3 rounds each weight by up to 2^-4 relative, which moves logits ~1e-2; float32 rounding: ~1e-6)
    assert max_diff(ref, _logits(model, ids)) > 1e-4
    for name in ["layers.1.mlp.experts.gate_up_proj", "mtp.0.mlp.experts.down_proj", "layers.0.mlp.up_proj.weight",
                 "layers.2.self_attn.kv_a_proj_with_mqa.weight"]:
        assert torch.equal(loaded.get_parameter(name), reference.get_parameter(name)), name
    # untouched tensors load as they were
    assert torch.equal(loaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)


# ---------------------------------------------------------------------------------------------- MTP
def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def _drafts_by_hand(model, hidden, ids):
    """The depth-1 MTP drafts, written out from the paper's equations with the model's modules."""
    mtp, eps, T = model.mtp[0], model.config.rms_norm_eps, ids.shape[1]
    # h_i = final-normed hidden of the main model at i; the MTP reads the embedding of t_{i+1}
    emb = model.embed_tokens.weight[ids[:, 1:]]
    x = torch.cat([_rms(emb, mtp.enorm.weight, eps), _rms(hidden[:, :-1], mtp.hnorm.weight, eps)], dim=-1)
    x = x @ mtp.eh_proj.weight.T
    positions = torch.arange(T - 1).expand(2, T - 1)
    cos, sin = model.rotary(positions, x.dtype)
    h = x + mtp.self_attn(_rms(x, mtp.input_layernorm.weight, eps), positions, cos, sin)
    h = h + mtp.mlp(_rms(h, mtp.post_attention_layernorm.weight, eps), "looped")
    return _rms(h, mtp.shared_head.norm.weight, eps) @ model.lm_head.weight.T


def test_mtp_loads_and_drafts_as_written_out(v3, v3_dir):
    loaded = load_model(v3_dir)
    mtp = loaded.mtp[0]
    with safe_open(v3_dir / "model.safetensors", framework="pt") as f:
        assert torch.equal(mtp.eh_proj.weight, f.get_tensor("model.layers.3.eh_proj.weight"))
        assert torch.equal(mtp.mlp.gate.e_score_correction_bias,
                           f.get_tensor("model.layers.3.mlp.gate.e_score_correction_bias"))
    config = loaded.config
    ids = _ids(config, tokens=10, seed=6)
    T = ids.shape[1]
    with torch.no_grad():
        logits, hidden = loaded(ids, return_hidden=True)
        (drafts,) = loaded.forward_mtp(hidden, ids)
    expected = _drafts_by_hand(loaded, hidden, ids)
    with float64_compute(), torch.no_grad():  # the same by hand in float64: the reference
        loaded64 = float64_copy(loaded)
        ref = _drafts_by_hand(loaded64, loaded64(ids, return_hidden=True)[1], ids)
    assert drafts.shape == (2, T - 1, config.vocab_size)
    assert expected.abs().max() > 0.1
    assert_close_to_reference(drafts, expected, ref, what="MTP drafts vs by hand")
    with torch.no_grad():  # and the same as the saved model's own drafts
        (original,) = v3.forward_mtp(hidden, ids)
    assert torch.equal(drafts, original)


def test_mtp_announced_but_absent_loads_without_it(v3, ckpt):
    tensors = _read_dir(ckpt)
    _rewrite(ckpt, {k: v for k, v in tensors.items() if not k.startswith("model.layers.3.")})
    with pytest.warns(UserWarning, match="MTP"):
        loaded = load_model(ckpt)
    assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
    ids = _ids(v3.config, seed=7)
    assert torch.equal(_logits(loaded, ids), _logits(v3, ids))


# ---------------------------------------------------------------------------------------------- bad input
def _without(ckpt, name):
    tensors = _read_dir(ckpt)
    del tensors[name]
    _rewrite(ckpt, tensors)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.experts.5.up_proj.weight",
                                  "model.layers.1.mlp.gate.e_score_correction_bias",  # else silently zero
                                  "model.layers.3.shared_head.norm.weight", "lm_head.weight"])
def test_missing_tensor(ckpt, name):
    _without(ckpt, name)
    with pytest.raises(ValueError, match=re.escape(repr(name)) + " is missing"):
        load_model(ckpt)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.experts.8.gate_proj.weight",  # one expert too many
                                  "model.layers.0.self_attn.rotary_emb.inv_freq",
                                  "model.layers.4.eh_proj.weight"])
def test_unexpected_tensor(ckpt, name):
    tensors = _read_dir(ckpt)
    tensors[name] = torch.ones(3)
    _rewrite(ckpt, tensors)
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor " + re.escape(repr(name))):
        load_model(ckpt)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.kv_b_proj.weight",
                                  "model.layers.2.mlp.experts.3.down_proj.weight",
                                  "model.layers.3.eh_proj.weight", "model.norm.weight"])
def test_misshaped_tensor(ckpt, name):
    tensors = _read_dir(ckpt)
    tensors[name] = tensors[name][:-1].clone()
    _rewrite(ckpt, tensors)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor " + re.escape(repr(name)) + " has shape"):
        load_model(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_file(ckpt, keep):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable or truncated"):
        load_model(ckpt)


def test_truncated_shard(v3, tmp_path):
    save_model(v3, tmp_path, max_shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(shard.name)):
        load_model(tmp_path)


def test_missing_shard(v3, tmp_path):
    save_model(v3, tmp_path, max_shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name) + ".* is missing"):
        load_model(tmp_path)


def test_index_points_to_wrong_shard(v3, tmp_path):
    save_model(v3, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        load_model(tmp_path)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_invalid_json_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "deepseek_v3",')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(ckpt)


def test_bad_config_value(ckpt):
    _edit_config(ckpt, n_group=3)  # 8 routed experts do not split into 3 groups
    with pytest.raises(ValueError, match=r"config\.json: key 'n_group'"):
        load_model(ckpt)


def test_no_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .*safetensors"):
        load_model(ckpt)


def _fp8_broken(path, change):
    tensors = _read_dir(path)
    name = "model.layers.2.mlp.experts.6.down_proj.weight"
    wq, scale = _quantize(tensors[name], (128, 128))
    tensors[name] = wq
    tensors[name + "_scale_inv"] = scale
    change(tensors, name)
    _rewrite(path, tensors)
    _edit_config(path, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    return name


def test_fp8_weight_without_scale(ckpt):
    name = _fp8_broken(ckpt, lambda t, n: t.pop(n + "_scale_inv"))
    with pytest.raises(ValueError, match=r"model\.safetensors: FP8 tensor " + re.escape(repr(name))
                       + ".*" + re.escape(name + "_scale_inv")):
        load_model(ckpt)


def test_fp8_scale_of_wrong_shape(ckpt):
    name = _fp8_broken(ckpt, lambda t, n: t.__setitem__(n + "_scale_inv", torch.ones(2, 1)))
    with pytest.raises(ValueError, match=re.escape(repr(name + "_scale_inv")) + r" has shape \(2, 1\)"):
        load_model(ckpt)


# ---------------------------------------------------------------------------------------------- transformers
def test_transformers_loads_our_save_with_mtp(v3, v3_dir):
    import transformers

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(v3_dir, dtype=torch.float32).eval()
    ids = _ids(v3.config, tokens=16, seed=8)
    with torch.no_grad():
        ref = hf(ids).logits
    assert ref.abs().max() > 0.1
    assert_same_function(_logits(v3, ids), ref, reference64(v3, ids), what="logits, transformers reading our save")
