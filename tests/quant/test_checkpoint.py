"""quant/checkpoint.py + openr2/checkpoints.py: `openr2 quantize` checkpoints load into quantized layers
(load_model, LLM, openr2 serve), FP8 block weights stay FP8 with keep_fp8, and bad input fails before any
output exists."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openr2.checkpoints import load_model, quantize_checkpoint
from openr2.cli import main
from openr2.quant import schemes
from openr2.quant.checkpoint import quantize_model
from openr2.quant.layers import QuantExperts, QuantLinear, weight_bytes
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.numerics import assert_close_to_reference, reference64

DEMO = Path(__file__).resolve().parents[2] / "openr2" / "assets" / "openr2-demo"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    save_tiny_chat_checkpoint(path)
    return path


def _ids(n=14):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
@pytest.mark.parametrize("scheme, group, symmetric", [("int8", None, False), ("int4", 64, False), ("int4", 128, True)])
def test_quantize_save_load_roundtrip(ckpt, tmp_path, scheme, group, symmetric):
    out = tmp_path / "q"
    summary = quantize_checkpoint(ckpt, out, scheme, group, symmetric)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "openr2", "scheme": scheme, "group_size": group,
                                             "symmetric": scheme == "int8" or symmetric}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".quantize-")]
    tensors = load_file(out / "model.safetensors")
    q_a = "model.layers.0.self_attn.q_a_proj"
    assert tensors[q_a + ".weight"].dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert (q_a + ".weight_zero" in tensors) == (scheme == "int4" and not symmetric)
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale" in tensors  # per expert, as HF names them
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # router, embeddings stay float
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32

    loaded = load_model(out)
    assert isinstance(loaded.layers[1].mlp.experts, QuantExperts)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.config.quantization_config["scheme"] == scheme
    expected = quantize_model(load_model(ckpt), scheme, group, symmetric)
    assert torch.equal(loaded(_ids()), expected(_ids()))
    ratio = summary["weight_bytes"] / summary["float_weight_bytes"]
    assert ratio < (0.35 if scheme == "int8" else 0.25), ratio  # the embedding stays float (a large share of a tiny model)
    assert weight_bytes(loaded) == summary["weight_bytes"]


@pytest.mark.parametrize("args, message", [
    (("int3", 64, False), "unknown quantization scheme 'int3'"),
    (("int4", 48, False), "group size must be one of"),
    (("int4", 32, False), r"q_b_proj: int4 group size 32 does not divide the layer width 48"),
])
def test_bad_options_leave_no_output(ckpt, tmp_path, args, message):
    out = tmp_path / "q"
    with pytest.raises(ValueError, match=message):
        quantize_checkpoint(ckpt, out, *args)
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_output_and_quantized_input(ckpt, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        quantize_checkpoint(ckpt, tmp_path / "taken", "int8")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    quantize_checkpoint(ckpt, tmp_path / "q8", "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q8", tmp_path / "again", "int4")
    assert not (tmp_path / "again").exists()


def test_cli_quantize(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), "--scheme", "int4", "--group-size", "64", "--out", str(tmp_path / "q")]) == 0
    assert json.loads(capsys.readouterr().out)["scheme"] == "int4"
    assert main(["quantize", str(ckpt), "--scheme", "int2", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown quantization scheme 'int2'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bad_quantization_config_names_the_key(ckpt, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(ckpt, out, "int4", 64)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["group_size"] = 50
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: key 'quantization_config'.*group size"):
        load_model(out)


# ---------------------------------------------------------------------------------------------- FP8
def _fp8_checkpoint(src, dst, block):
    """src's linear weights (not head, embedding, norms, router) as FP8 e4m3 with block scales, as DeepSeek-V3."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        linear = t.dim() == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight") \
            and "norm" not in name
        if linear:
            out[name], out[name + "_scale_inv"] = schemes.quantize_fp8(t, block)
        else:
            out[name] = t
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(open(os.path.join(src, "config.json")).read())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


@torch.no_grad()
@pytest.mark.parametrize("block", [(16, 16), (32, 16)])
def test_keep_fp8_matches_dequantize_at_load_in_less_memory(ckpt, tmp_path, block):
    _fp8_checkpoint(ckpt, tmp_path, block)  # tiny: experts 32 rows, kv_a 40 rows: ragged 16/32 blocks
    dequantised = load_model(tmp_path)
    kept = load_model(tmp_path, keep_fp8=True)
    layer = kept.layers[1]
    assert layer.self_attn.kv_b_proj.q.qweight.dtype == torch.float8_e4m3fn
    assert isinstance(layer.mlp.experts, QuantExperts) and layer.mlp.experts.gate_up_proj.scheme == "fp8"
    assert not isinstance(kept.lm_head, QuantLinear)  # stored in float: stays a float layer
    assert kept.config.quantization_config["quant_method"] == "fp8"
    ids = _ids()
    for attn in ("naive", "absorbed"):  # kept FP8 layers vs float layers holding the same dequantized weights
        assert_close_to_reference(kept(ids, attn_impl=attn), dequantised(ids, attn_impl=attn),
                                  reference64(dequantised, ids, attn_impl=attn), what=f"keep_fp8, {attn}")

    # memory: the FP8 modules hold 1 byte per weight (+ block scales) against 2 for bf16
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    kept16 = load_model(tmp_path, dtype=torch.bfloat16, keep_fp8=True)
    linear = [n for n, m in kept16.named_modules() if isinstance(m, (QuantLinear, QuantExperts))]
    fp8_bytes = sum(weight_bytes(kept16.get_submodule(n)) for n in linear)
    bf16_bytes = sum(weight_bytes(bf16.get_submodule(n)) for n in linear)
    assert fp8_bytes < 0.6 * bf16_bytes, (fp8_bytes, bf16_bytes)
    # two bf16 runs of the same weights (dequantized once to bf16, or per product): a sanity bound. Each is
    # within a random walk of ~19 bf16-rounded products (2 x 2^-9 relative each) of the exact logits,
    # sqrt(19) x 2 x 2^-9 = 1.7% rms; the largest of 2 x 14 x 256 differences is ~4 sigma, and two runs
    # differ by up to sqrt(2) x that: ~10% of the largest logit at most
    assert (kept16(ids).float() - bf16(ids).float()).abs().max() < 0.1 * bf16(ids).float().abs().max()


@torch.no_grad()
def test_keep_fp8_saves_back_as_fp8(ckpt, tmp_path):
    from openr2.checkpoints import save_model

    _fp8_checkpoint(ckpt, tmp_path / "fp8", (16, 16))
    kept = load_model(tmp_path / "fp8", keep_fp8=True)
    save_model(kept, tmp_path / "again")
    tensors = load_file(tmp_path / "again" / "model.safetensors")
    name = "model.layers.2.mlp.experts.5.gate_proj.weight"
    original = load_file(tmp_path / "fp8" / "model.safetensors")
    assert tensors[name].dtype == torch.float8_e4m3fn
    assert torch.equal(tensors[name + "_scale_inv"], original[name + "_scale_inv"])
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert torch.equal(load_model(tmp_path / "again", keep_fp8=True)(_ids()), kept(_ids()))


# ---------------------------------------------------------------------------------------------- serve
@pytest.mark.slow
def test_quantized_model_generates_and_serves(ckpt, tmp_path):
    import openai

    from openr2 import LLM, SamplingParams
    from tests.server._live import serve

    out = tmp_path / "q4"
    quantize_checkpoint(ckpt, out, "int4", 64)
    params = SamplingParams(temperature=0, max_tokens=12)
    quantized = LLM(str(out), compile=False).generate(["What is 12+30?"], params)[0].outputs[0]
    reference = quantize_model(load_model(ckpt), "int4", 64)
    assert quantized.token_ids == LLM(reference, LLM(str(ckpt), compile=False).tokenizer, compile=False).generate(
        ["What is 12+30?"], params)[0].outputs[0].token_ids
    assert len(quantized.token_ids) > 0
    with serve(out, tmp_path / "data") as (base_url, _):
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                               _strict_response_validation=True)
        resp = client.completions.create(model="tiny", prompt="What is 12+30?", max_tokens=12, temperature=0)
    assert resp.choices[0].text == quantized.text
    assert resp.usage.completion_tokens == len(quantized.token_ids)


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="the bundled demo model is not there yet")
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 64)])
def test_quantized_demo_model_loads_and_serves(tmp_path, scheme, group):
    import openai

    from openr2.server.app import ServerConfig
    from tests.server._live import serve

    out = tmp_path / "demo-q"
    summary = quantize_checkpoint(DEMO, out, scheme, group)
    assert summary["weight_bytes"] / summary["float_weight_bytes"] <= (0.28 if scheme == "int8" else 0.17)
    config = ServerConfig(model_name="demo-q", default_max_tokens=300)
    with serve(out, tmp_path / "data", config) as (base_url, _):
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                               _strict_response_validation=True)
        resp = client.chat.completions.create(model="demo-q", messages=[{"role": "user", "content": "What is 347+589?"}],
                                              max_tokens=300, temperature=0)
    message = resp.choices[0].message
    assert "347+589=936" in (message.reasoning_content or ""), message
    assert message.content.strip() == "936", message
