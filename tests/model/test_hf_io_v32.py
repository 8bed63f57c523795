"""DeepSeek-V3.2 checkpoints: as DeepSeek releases them (HF-style names with per-expert tensors, the
indexer's `self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`, FP8 e4m3 weights with power-of-two (UE8M0)
block scales, the MTP layer at index num_hidden_layers with its own indexer, the legacy `rope_scaling` key),
as openr2 saves them, and errors that name the file and tensor.

The release checkpoint is written here by hand from transformers' own save (names that openr2's code did
not write) and quantised blockwise; its reference is the same tensors dequantised, read by openr2 (bit for
bit) and by transformers (logit parity).
"""

from __future__ import annotations

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
from openr2.presets import tiny_v32
from tests.dsa import assert_selection_decided, index_scores64_of, index_scores_of
from tests.hf_utils import hf_model, perturb_
from tests.numerics import assert_close_to_reference, assert_same_function, max_abs_diff, reference64

BLOCK = (16, 16)  # several blocks (and ragged ones) per tiny weight; the release uses 128 x 128
# what the release quantises: every projection inside the layers (the MTP layer's too, the indexer's wq_b and
# wk included) but the MTP's eh_proj and the indexer's weights_proj; norms, router, embedding and head stay
RELEASE_FP8 = re.compile(r"^model\.layers\.\d+\.(?!eh_proj\.)(?!self_attn\.indexer\.weights_proj\.)"
                         r"(.*_proj(_with_mqa)?|self_attn\.indexer\.(wq_b|wk))\.weight$")
MTP_OWN = ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight")


def _config():
    return dataclasses.replace(tiny_v32(), num_nextn_predict_layers=0)  # transformers' save has no MTP


def _ids(config, tokens=40, seed=0):
    return torch.randint(0, config.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(seed))


def _read_dir(path) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _quantize_ue8m0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 with UE8M0 scales: s = 2^ceil(log2(amax / 448)) per block, Wq = e4m3(W / s)."""
    rows, cols = w.shape
    b0, b1 = BLOCK
    scale = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            amax = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].abs().max().item()
            scale[i, j] = 2.0 ** math.ceil(math.log2(amax / 448.0))
    full = scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    wq = (w.float() / full).to(torch.float8_e4m3fn)
    return wq, scale


def _dequantize(wq, scale):
    rows, cols = wq.shape
    return wq.float() * scale.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]


def _write_shards(path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards and an index, each weight's scale in the other shard than the weight when they differ."""
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for file in sorted(set(files.values())):
        save_file({n: tensors[n].contiguous().clone() for n in names if files[n] == file}, os.path.join(path, file),
                  metadata={"format": "pt"})
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": files}, f)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release dir, dequantised float dir for openr2 (with MTP), the same for transformers (without), config)."""
    config = _config()
    hf = hf_model(config, seed=7)
    src = tmp_path_factory.mktemp("hf-save")
    hf.save_pretrained(src)
    tensors = _read_dir(src)
    hf_cfg = json.loads((src / "config.json").read_text())
    L = config.num_hidden_layers
    # the MTP layer: a whole V3.2 block (layer 1's shapes, its own values) with its indexer, plus its own
    # eh_proj and norms and copies of embedding and head
    gen = torch.Generator().manual_seed(6)
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        t = tensors[name]
        tensors[name.replace("model.layers.1.", f"model.layers.{L}.")] = t + 0.05 * torch.randn(t.shape, generator=gen)
    D = config.hidden_size
    tensors[f"model.layers.{L}.eh_proj.weight"] = 0.05 * torch.randn(D, 2 * D, generator=gen)
    for own in MTP_OWN[1:]:
        tensors[f"model.layers.{L}.{own}"] = 1 + 0.05 * torch.randn(D, generator=gen)
    tensors[f"model.layers.{L}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{L}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()

    stored, floats = dict(tensors), dict(tensors)
    quantised = sorted(n for n in tensors if RELEASE_FP8.match(n))
    for name in quantised:
        wq, scale = _quantize_ue8m0(tensors[name])
        stored[name], stored[name + "_scale_inv"] = wq, scale
        floats[name] = _dequantize(wq, scale)
    assert f"model.layers.{L}.self_attn.indexer.wk.weight" in quantised
    assert "model.layers.0.self_attn.indexer.wq_b.weight" in quantised
    assert not any("weights_proj" in n or "k_norm" in n for n in quantised)

    # the release's config.json: legacy keys (rope_scaling, torch_dtype), routing keys, MTP, FP8 with UE8M0
    rope = hf_cfg.pop("rope_parameters")
    for key in ("layer_types", "mlp_layer_types", "head_dim", "qk_head_dim", "dtype", "transformers_version"):
        hf_cfg.pop(key, None)
    release_cfg = {
        **hf_cfg, "rope_theta": rope.pop("rope_theta"), "rope_scaling": {**rope, "type": rope.pop("rope_type")},
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1, "ep_size": 1,
        "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16", "transformers_version": "4.44.2",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": list(BLOCK)},
    }
    root = tmp_path_factory.mktemp("release")
    rel, ours_ref, hf_ref = root / "release", root / "dequantised", root / "dequantised-hf"
    _write_shards(rel, stored)
    (rel / "config.json").write_text(json.dumps(release_cfg, indent=2))
    _write_shards(ours_ref, floats)
    (ours_ref / "config.json").write_text(json.dumps({**release_cfg, "quantization_config": None}))
    os.makedirs(hf_ref)
    save_file({n: t.contiguous() for n, t in floats.items() if not n.startswith(f"model.layers.{L}.")},
              hf_ref / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", hf_ref / "config.json")
    return rel, ours_ref, hf_ref, floats


def test_release_checkpoint_with_fp8_and_mtp_loads(release):
    rel, ours_ref, hf_ref, floats = release
    ours = load_model(rel)
    config = ours.config
    assert config.model_type == "deepseek_v32" and config.index_topk == 8 and config.rope_scaling["factor"] == 4
    assert config.quantization_config is None and len(ours.mtp) == 1
    assert ours.layers[0].self_attn.indexer.wq_b.weight.dtype == torch.float32
    # the dequantised weights, bit for bit: the same as reading the float tensors
    reference = load_model(ours_ref)
    state, ref_state = ours.state_dict(), reference.state_dict()
    assert [k for k in state if not torch.equal(state[k], ref_state[k])] == []
    L = config.num_hidden_layers
    indexer = ours.mtp[0].self_attn.indexer
    assert torch.equal(indexer.wk.weight, floats[f"model.layers.{L}.self_attn.indexer.wk.weight"])
    assert torch.equal(indexer.k_norm.bias, floats[f"model.layers.{L}.self_attn.indexer.k_norm.bias"])
    assert torch.equal(ours.mtp[0].eh_proj.weight, floats[f"model.layers.{L}.eh_proj.weight"])
    ids = _ids(config)
    with torch.no_grad():
        logits, hidden = ours(ids, return_hidden=True)
        (drafts,) = ours.forward_mtp(hidden, ids)  # the MTP block attends sparsely too (39 > 8 tokens)
        (ref_drafts,) = reference.forward_mtp(hidden, ids)
        ref_logits = reference(ids)
    assert torch.equal(logits, ref_logits) and torch.equal(drafts, ref_drafts)
    # and transformers, reading the same dequantised weights, computes the same logits
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_ref, dtype=torch.float32).eval()
    assert_selection_decided(index_scores_of(ours, ids), index_scores64_of(ours, ids), config.index_topk,
                             what="release checkpoint")
    with torch.no_grad():
        theirs = hf(ids).logits
    assert_same_function(logits, theirs, reference64(ours, ids), what="logits, release checkpoint vs transformers")
    print(f"release checkpoint: max |ours - transformers| = {max_abs_diff(logits, theirs):.3g}")
    assert max_abs_diff(logits, theirs) <= 1e-4


def test_release_checkpoint_in_bfloat16_and_kept_fp8(release):
    rel, ours_ref, _, floats = release
    low = load_model(rel, dtype=torch.bfloat16)
    indexer = low.layers[1].self_attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32  # as stored, not rounded through bfloat16
    assert torch.equal(indexer.weights_proj.weight, floats["model.layers.1.self_attn.indexer.weights_proj.weight"])
    assert indexer.wq_b.weight.dtype == indexer.k_norm.weight.dtype == torch.bfloat16
    assert low.layers[1].mlp.gate.weight.dtype == torch.float32
    kept = load_model(rel, keep_fp8=True)  # wq_b and wk stay FP8 (dequantised per use), weights_proj float
    indexer = kept.layers[1].self_attn.indexer
    assert type(indexer.wq_b).__name__ == "QuantLinear" and type(indexer.wk).__name__ == "QuantLinear"
    assert type(indexer.weights_proj).__name__ == "HeadWeights"
    ids = _ids(kept.config)  # the prompt whose selection the test above found decided
    reference = load_model(ours_ref)
    assert_selection_decided(index_scores_of(reference, ids), index_scores64_of(reference, ids), 8, what="kept FP8")
    with torch.no_grad():
        fast, plain = kept(ids), reference(ids)
    assert_close_to_reference(fast, plain, reference64(reference, ids), what="FP8 kept vs dequantised on load")


def test_round_trip_through_our_save(tmp_path):
    model = build_model(tiny_v32(), seed=7)  # with its MTP layer
    perturb_(model, seed=7)
    model.eval()
    save_model(model, tmp_path)
    tensors = _read_dir(tmp_path)
    for name in ["model.layers.0.self_attn.indexer.wq_b.weight", "model.layers.2.self_attn.indexer.k_norm.bias",
                 "model.layers.3.self_attn.indexer.weights_proj.weight"]:  # layer 3: the MTP layer
        assert name in tensors
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV32ForCausalLM"] and cfg["model_type"] == "deepseek_v32"
    assert (cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]) == (16, 32, 8)
    loaded = load_model(tmp_path)
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(t, original[k]) for k, t in loaded.state_dict().items())
    ids = _ids(model.config, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def broken(release, tmp_path):
    """A one-file copy of the release checkpoint to break: (dir, tensors)."""
    rel = release[0]
    path = tmp_path / "ckpt"
    os.makedirs(path)
    shutil.copy(rel / "config.json", path / "config.json")
    return path, _read_dir(rel)


def _write(path, tensors):
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.indexer.k_norm.bias",
                                  "model.layers.3.self_attn.indexer.weights_proj.weight"])
def test_missing_indexer_tensor(broken, name):
    path, tensors = broken
    del tensors[name]
    _write(path, tensors)
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor {name!r} is missing")):
        load_model(path)


def test_misshaped_indexer_tensor(broken):
    path, tensors = broken
    name = "model.layers.1.self_attn.indexer.k_norm.weight"
    tensors[name] = tensors[name][:-1].clone()
    _write(path, tensors)
    with pytest.raises(ValueError, match=re.escape(f"{path / 'model.safetensors'}: tensor {name!r} has shape (31,)")):
        load_model(path)


def test_fp8_indexer_weight_without_its_scale(broken):
    path, tensors = broken
    name = "model.layers.2.self_attn.indexer.wq_b.weight"
    del tensors[name + "_scale_inv"]
    _write(path, tensors)
    with pytest.raises(ValueError, match=re.escape(f"{path / 'model.safetensors'}: FP8 tensor {name!r} has no")):
        load_model(path)


def test_mlp_layer_types_that_disagree_are_refused(broken):
    path, _ = broken
    cfg = json.loads((path / "config.json").read_text())
    cfg["mlp_layer_types"] = ["dense", "dense", "sparse"]  # first_k_dense_replace says one dense layer
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: key 'mlp_layer_types'"):
        load_model(path)
