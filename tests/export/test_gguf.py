"""export/gguf.py: GGUFReader sees every key and tensor llama.cpp's deepseek2 reads, with the right shapes and
types; the GGUF tensors, dequantized with numpy and loaded back into our model, reproduce our logits; input
GGUF cannot hold fails before any file exists."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from openr2.checkpoints import load_model, save_model
from openr2.cli import main
from openr2.export import gguf as export
from openr2.model.transformer import Transformer, build_model
from openr2.presets import tiny_v2, tiny_v3
from tests.tokenizer_utils import tiny_tokenizer

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def save_checkpoint(path, preset=tiny_v3, **changes):
    tokenizer = tiny_tokenizer()
    config = dataclasses.replace(preset(), vocab_size=tokenizer.vocab_size + 6, num_nextn_predict_layers=0,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **changes)
    model = build_model(config, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.uniform_(-0.1, 0.1)
    save_model(model, path)
    tokenizer.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    return path, save_checkpoint(path)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    path = tmp_path_factory.mktemp("v2")
    return path, save_checkpoint(path, tiny_v2)


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def test_structure_v3(v3, tmp_path):
    path, model = v3
    c = model.config
    out = tmp_path / "m.gguf"
    info = export.export_gguf(path, out, "q8_0", name="openr2-tiny")
    assert info["pre_tokenizer"] == "qwen2"  # our single-digit split; DeepSeek-V3's own regexes map to deepseek-v3
    reader = gguf.GGUFReader(out)
    kv = _fields(reader)
    A = "deepseek2."
    expected = {
        "general.architecture": "deepseek2", "general.name": "openr2-tiny", "general.file_type": 7,
        A + "block_count": 3, A + "context_length": 512, A + "embedding_length": 64, A + "feed_forward_length": 128,
        A + "attention.head_count": 4, A + "attention.head_count_kv": 1, A + "attention.key_length": 32 + 8,
        A + "attention.value_length": 32, A + "attention.key_length_mla": 24, A + "attention.value_length_mla": 16,
        A + "attention.q_lora_rank": 48, A + "attention.kv_lora_rank": 32, A + "rope.dimension_count": 8,
        A + "leading_dense_block_count": 1, A + "expert_count": 8, A + "expert_used_count": 2,
        A + "expert_shared_count": 1, A + "expert_feed_forward_length": 32, A + "expert_group_count": 4,
        A + "expert_group_used_count": 2, A + "expert_weights_norm": True, A + "expert_gating_func": 2,
        A + "vocab_size": c.vocab_size, A + "rope.scaling.type": "yarn",
        A + "rope.scaling.original_context_length": 128,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True,
    }
    for key, value in expected.items():
        assert kv[key] == value, key
    for key, value in {A + "expert_weights_scale": 2.5, A + "rope.scaling.factor": 4.0,
                       A + "rope.scaling.yarn_log_multiplier": 0.1, A + "rope.scaling.yarn_beta_fast": 32.0,
                       A + "rope.freq_base": 10000.0, A + "attention.layer_norm_rms_epsilon": 1e-6}.items():
        assert kv[key] == pytest.approx(value), key
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    tok = tiny_tokenizer()
    assert len(tokens) == c.vocab_size and tokens[5] == tok.id_to_token(5) and tokens[-1] == f"[PAD{c.vocab_size - 1}]"
    assert types[0] == 3 and types[tok.token_to_id("<think>")] == 4 and types[300] == 1 and types[-1] == 5
    assert len(kv["tokenizer.ggml.merges"]) > 0 and " " in kv["tokenizer.ggml.merges"][0]
    assert "<｜Assistant｜>" in kv["tokenizer.chat_template"]

    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors}
    H, C, N, V, I, E = 4, 32, 16, 16, 32, 8
    shapes = {"token_embd.weight": (c.vocab_size, 64), "output_norm.weight": (64,), "output.weight": (c.vocab_size, 64),
              "blk.0.ffn_gate.weight": (128, 64), "blk.0.ffn_down.weight": (64, 128),
              "blk.1.attn_q_a.weight": (48, 64), "blk.1.attn_q_a_norm.weight": (48,), "blk.1.attn_q_b.weight": (4 * 24, 48),
              "blk.1.attn_kv_a_mqa.weight": (C + 8, 64), "blk.1.attn_kv_a_norm.weight": (C,),
              "blk.1.attn_k_b.weight": (H, C, N), "blk.1.attn_v_b.weight": (H, V, C), "blk.1.attn_output.weight": (64, H * V),
              "blk.1.ffn_gate_inp.weight": (E, 64), "blk.1.exp_probs_b.bias": (E,),
              "blk.1.ffn_gate_exps.weight": (E, I, 64), "blk.1.ffn_up_exps.weight": (E, I, 64),
              "blk.1.ffn_down_exps.weight": (E, 64, I), "blk.2.ffn_gate_shexp.weight": (I, 64),
              "blk.2.ffn_down_shexp.weight": (64, I), "blk.2.attn_norm.weight": (64,), "blk.2.ffn_norm.weight": (64,)}
    for name, shape in shapes.items():
        assert tensors[name][0] == shape, name
    assert tensors["blk.1.ffn_gate_inp.weight"][1] == T.F32 and tensors["blk.1.exp_probs_b.bias"][1] == T.F32
    assert tensors["blk.1.attn_norm.weight"][1] == T.F32
    assert tensors["blk.1.ffn_gate_exps.weight"][1] == T.Q8_0 and tensors["token_embd.weight"][1] == T.Q8_0
    assert tensors["blk.1.attn_q_b.weight"][1] == T.F16  # rows of 48: not a multiple of Q8_0's 32-block
    assert not any("kv_b" in n or "attn_q.weight" in n or "nextn" in n for n in tensors)
    assert len(tensors) == 3 + 2 * 3 + 3 * 8 + 3 + 2 * 8  # top, norms, attention, dense FFN, MoE FFN


def test_structure_v2_plain_q_softmax(v2, tmp_path):
    path, model = v2
    out = tmp_path / "m.gguf"
    export.export_gguf(path, out, "f16")
    reader = gguf.GGUFReader(out)
    kv = _fields(reader)
    A = "deepseek2."
    assert kv[A + "attention.q_lora_rank"] == 0  # required key; 0 selects attn_q
    assert kv[A + "expert_gating_func"] == 1 and kv[A + "expert_weights_norm"] is False
    assert kv[A + "expert_group_count"] == 1 and kv[A + "leading_dense_block_count"] == 2
    assert kv["general.name"] == os.path.basename(path) and kv["general.file_type"] == 1
    assert not any(k.startswith(A + "rope.scaling") for k in kv)
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"] == ((4 * 24, 64), T.F16)
    assert tensors["blk.3.ffn_up_shexp.weight"][0] == (2 * 32, 64)  # two shared experts, one wide MLP
    assert "blk.3.exp_probs_b.bias" not in tensors and "blk.0.attn_q_a.weight" not in tensors


@torch.no_grad()
@pytest.mark.parametrize("which", ["v3", "v2"])
@pytest.mark.parametrize("export_type, bound", [("f32", 1e-4), ("bf16", 0.05), ("q8_0", 0.1), ("q4_0", 0.5)])
def test_numpy_dequantized_gguf_reproduces_our_logits(request, tmp_path, which, export_type, bound):
    path, model = request.getfixturevalue(which)
    out = tmp_path / "m.gguf"
    export.export_gguf(path, out, export_type)
    back = Transformer(model.config)
    missing = back.load_state_dict(export.gguf_state_dict(str(out), model.config), strict=False)
    assert missing.unexpected_keys == [] and missing.missing_keys == []
    back.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = model(ids)
    diff = (back(ids) - ours).abs()
    if export_type == "f32":
        assert diff.max() <= bound
    else:  # quantized types: close on the whole, though MoE routing may flip a few positions
        assert diff.median() <= bound * ours.abs().median() * 10 and diff.mean() <= bound * ours.abs().mean() * 10


def test_deepseek_v3_regexes_map_to_deepseek_v3(v3, tmp_path):
    from openr2.export.gguf_vocab import DEEPSEEK_V3_SPLITS, vocab_metadata

    path, model = v3
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        os.link(os.path.join(path, name), tmp_path / name)
    spec = json.loads((path / "tokenizer.json").read_text())
    steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
             for r in DEEPSEEK_V3_SPLITS]
    spec["pre_tokenizer"]["pretokenizers"] = steps + spec["pre_tokenizer"]["pretokenizers"][1:]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert vocab_metadata(str(tmp_path), model.config.vocab_size)["pre"] == "deepseek-v3"
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,4}"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="match no llama.cpp pre-tokenizer"):
        vocab_metadata(str(tmp_path), model.config.vocab_size)
    assert vocab_metadata(str(tmp_path), model.config.vocab_size, "deepseek-v3")["pre"] == "deepseek-v3"


# ---------------------------------------------------------------------------------------------- bad input
def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"moe_layer_freq": 2}, "moe_layer_freq 2"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "deepseek_v32", "index_n_heads": 4, "index_head_dim": 16, "index_topk": 8},
     "deepseek_v32 .*no lightning indexer"),
    ({"model_type": "deepseek_v4", "o_groups": 2}, "deepseek_v4 .*has none of them"),
    ({"rope_interleave": False}, "rope_interleave"),
    ({"quantization_config": {"quant_method": "openr2", "scheme": "int4", "group_size": 64, "symmetric": False}},
     "the checkpoint is quantized"),
])
def test_unexportable_checkpoints_fail_before_writing(v3, tmp_path, changes, message):
    path, _ = v3
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in os.listdir(path):
        os.link(path / name, ckpt / name)
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_text((path / "config.json").read_text())
    _edit_config(ckpt, **changes)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError, match=message):
        export.export_gguf(ckpt, out, "f32")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_v2_group_limited_greedy_is_refused(tmp_path):
    save_checkpoint(tmp_path, tiny_v2, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="group_limited_greedy"):
        export.export_gguf(tmp_path, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_other_bad_input(v3, tmp_path):
    path, _ = v3
    with pytest.raises(ValueError, match="unknown GGUF type 'q4_k'"):
        export.export_gguf(path, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(ValueError, match="is a directory"):
        export.export_gguf(path, tmp_path, "f32")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(path / name, bare / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        export.export_gguf(bare, tmp_path / "m.gguf")
    assert sorted(os.listdir(tmp_path)) == ["bare"]


def test_failure_mid_write_leaves_nothing(v3, tmp_path, monkeypatch):
    path, _ = v3
    (tmp_path / "m.gguf").write_bytes(b"old")

    def broken(model):
        yield "token_embd.weight", torch.zeros(4, 4)
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "gguf_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_gguf(path, tmp_path / "m.gguf", "f32")
    assert os.listdir(tmp_path) == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


def test_cli_export_gguf(v3, tmp_path, capsys):
    path, _ = v3
    assert main(["export-gguf", str(path), "--out", str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "q4_0" and info["tensor_types"]["Q4_0"] > 0 and info["bytes"] == os.path.getsize(tmp_path / "m.gguf")
    assert main(["export-gguf", str(path), "--out", str(tmp_path / "x.gguf"), "--type", "q3"]) == 2
    assert "unknown GGUF type 'q3'" in capsys.readouterr().err


def test_fp8_checkpoint_exports_dequantised(v3, tmp_path):
    from tests.quant.test_checkpoint import _fp8_checkpoint

    path, _ = v3
    _fp8_checkpoint(str(path), str(tmp_path / "fp8"), (16, 16))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.link(path / name, tmp_path / "fp8" / name)
    export.export_gguf(tmp_path / "fp8", tmp_path / "m.gguf", "f32")
    config = load_model(tmp_path / "fp8").config
    state = export.gguf_state_dict(str(tmp_path / "m.gguf"), config)
    ref = load_model(tmp_path / "fp8").state_dict()
    assert np.allclose(state["layers.1.self_attn.o_proj.weight"].numpy(), ref["layers.1.self_attn.o_proj.weight"].numpy())


DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "openr2", "assets", "openr2-demo")


@pytest.mark.parametrize("which, export_type", [("v3", "q8_0"), ("v2", "q4_0"), ("demo", "q8_0")])
def test_names_and_blocks_are_what_the_gguf_package_expects(request, tmp_path, which, export_type):
    """Every tensor is one the installed gguf package lists for deepseek2 (llama.cpp's current names: split
    attn_k_b/attn_v_b, no attn_kv_b) and every quantized tensor's rows hold whole blocks of its type."""
    if which == "demo":
        if not os.path.isfile(os.path.join(DEMO, "config.json")):
            pytest.skip("the bundled demo model is not there")
        path, layers = DEMO, json.load(open(os.path.join(DEMO, "config.json")))["num_hidden_layers"]
    else:
        path, model = request.getfixturevalue(which)
        layers = model.config.num_hidden_layers
    out = tmp_path / "m.gguf"
    export.export_gguf(path, out, export_type)
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    assert gguf.MODEL_ARCH_NAMES[arch] == export.ARCH
    bases = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]]
    allowed = {b.format(bid=i) + suffix for b in bases for i in range(layers) for suffix in (".weight", ".bias")}
    reader = gguf.GGUFReader(out)
    quantized = 0
    for t in reader.tensors:
        assert t.name in allowed, t.name
        block = gguf.GGML_QUANT_SIZES[T(t.tensor_type)][0]
        assert int(t.shape[0]) % block == 0, (t.name, t.tensor_type)  # shape[0]: the row (innermost) length
        quantized += T(t.tensor_type) not in (T.F32, T.F16)
    names = {t.name for t in reader.tensors}
    assert {f"blk.{layers - 1}.attn_k_b.weight", f"blk.{layers - 1}.attn_v_b.weight"} <= names
    assert quantized > 0 and not any("attn_kv_b" in n for n in names)
