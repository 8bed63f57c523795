"""DeepSeek-V4 checkpoints under the release's own names and formats (synthetic, tiny_v4): a release-style
config.json (`compress_ratios` with the MTP layer's trailing entry, `num_hash_layers`, `qk_rope_head_dim`, flat
`rope_scaling`), release tensor names (transformers' conversion_mapping.py read backwards), FP8 e4m3 linears
with UE8M0 block scales (`.scale`), FP4 e2m1 experts packed two per byte with a UE8M0 scale per 32 inputs, and
an MTP depth under `mtp.0.*` (loaded; tensors of depths the config does not build are skipped). transformers' own FP8/FP4 dequantizer (Fp8Dequantize) is the oracle for the
dequantised values.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from openr2.checkpoints import load_model, save_model
from openr2.config import ModelConfig
from openr2.model import hf_io
from openr2.model.transformer import build_model
from openr2.presets import tiny_v4
from tests.hf_utils import perturb_

MTP_CONFIG = dataclasses.replace(tiny_v4(), num_nextn_predict_layers=1)
BLOCK = [16, 16]  # FP8 block of the synthetic checkpoint (the release: 128 x 128; tiny_v4's widths are 32-256)
FP8 = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.shared_experts\.w\d\.weight$")
FP4 = re.compile(r"\.ffn\.experts\.\d+\.w\d\.weight$")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-12) / top)))


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (e4m3 [r, c], UE8M0 scales [r/16, c/16]): power-of-two block scales, as the release's `scale_fmt`."""
    r, c = w.shape
    blocks = w.view(r // BLOCK[0], BLOCK[0], c // BLOCK[1], BLOCK[1])
    scale = _pow2_scale(blocks.abs().amax(dim=(1, 3)), 448.0)
    q = (blocks / scale[:, None, :, None]).view(r, c).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (int8 [r, c/2]: nearest e2m1 codes, low nibble first; UE8M0 scales [r, c/32])."""
    r, c = w.shape
    groups = w.view(r, c // 32, 32)
    scale = _pow2_scale(groups.abs().amax(-1), 6.0)
    codes = ((groups / scale[..., None])[..., None] - E2M1).abs().argmin(-1).view(r, c).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scale.to(torch.float8_e8m0fnu)


def _oracle(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32)


def release_config(config: ModelConfig) -> dict:
    """config.json as the release writes V4's keys (transformers reads these legacy spellings too)."""
    hf = config.to_hf()
    ratio = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    hf["compress_ratios"] = [ratio[t] for t in hf.pop("layer_types")] + [0]  # + the MTP layer's
    hf["compress_rate_hca"] = config.compress_rates["heavily_compressed_attention"]  # tiny: 16, not 128
    hf.pop("compress_rates")
    hf["num_hash_layers"] = hf.pop("mlp_layer_types").count("hash_moe")
    hf["qk_rope_head_dim"] = config.qk_rope_head_dim
    hf.pop("partial_rotary_factor")
    hf.pop("rope_parameters")
    hf["rope_scaling"] = dict(config.rope_scaling)
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                 "weight_block_size": BLOCK, "expert_dtype": "fp4"}
    return hf


def _write(path, config_json: dict, tensors: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_json))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(openr2 model, float release tensors, quantized release dir, dequantised-float release dir)."""
    config = MTP_CONFIG
    model = build_model(config)
    perturb_(model, seed=5)
    items = {name: t.clone() for name, t in hf_io.hf_state_items(model, release=True)}
    assert "embed.weight" in items and "layers.1.attn.indexer.compressor.ape" in items
    assert "mtp.0.e_proj.weight" in items and "mtp.0.hc_head_fn" in items and "mtp.0.ffn.gate.bias" in items
    mtp = {"mtp.1.e_proj.weight": torch.randn(8, 8), "mtp.1.attn.attn_sink": torch.randn(4)}  # a 2nd depth: skipped
    quant, dequant, counts = {}, {}, {"fp8": 0, "fp4": 0}
    for name, t in items.items():
        kind = "fp8" if FP8.search(name) else "fp4" if FP4.search(name) else None
        if kind is None:
            quant[name] = dequant[name] = t
            continue
        q, s = (quantize_fp8 if kind == "fp8" else quantize_fp4)(t.float())
        quant[name], quant[name.removesuffix(".weight") + ".scale"] = q, s
        dequant[name] = _oracle(q, s)
        counts[kind] += 1
    assert counts["fp8"] >= 5 * 6 and counts["fp4"] == 5 * 8 * 3, counts  # 4 layers and the MTP block
    root = tmp_path_factory.mktemp("v4-release")
    cfg = release_config(config)
    _write(root / "float", cfg, {**items, **mtp})
    _write(root / "quant", cfg, {**quant, **mtp})
    _write(root / "dequant", cfg, dequant)
    return model, root


def test_release_config_reads_as_the_preset(release):
    _, root = release
    read = ModelConfig.from_pretrained(root / "float")
    want = MTP_CONFIG
    for f in dataclasses.fields(want):
        if f.name not in ("source", "quantization_config", "torch_dtype"):
            assert getattr(read, f.name) == getattr(want, f.name), f.name


def test_release_names_load_bit_for_bit(release):
    model, root = release
    loaded = load_model(root / "float")
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_fp8_and_fp4_dequantised_as_transformers_does(release):
    """The quantized release loads to exactly the weights transformers' dequantizer gives (power-of-two
    scales: every product is exact), and close to the float model (quantization error only)."""
    model, root = release
    quant, dequant = load_model(root / "quant").state_dict(), load_model(root / "dequant").state_dict()
    changed = 0
    for key in dequant:
        assert torch.equal(quant[key], dequant[key]), key
        changed += not torch.equal(dequant[key], model.state_dict()[key])
    assert changed >= 4 * 6 + 4 * 2  # the quantized linears and every layer's stacked experts differ
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rel = (load_model(root / "quant")(ids) - model(ids)).norm() / model(ids).norm()
    assert 0 < rel < 0.5, rel  # FP4 experts move the logits, but they are still the same model's
    with pytest.raises(ValueError, match="keep_fp8 is not supported for DeepSeek-V4"):
        load_model(root / "quant", keep_fp8=True)  # refused, not silently dequantised


def test_errors_name_file_and_tensor(release, tmp_path):
    _, root = release
    from safetensors.torch import load_file

    tensors = load_file(str(root / "quant" / "model.safetensors"))
    cfg = json.loads((root / "quant" / "config.json").read_text())
    def drop(name):
        return lambda t: t.pop(name)

    def replace(name, value):
        return lambda t: t.update({name: value})

    def swap(old, new, value):
        return lambda t: (t.pop(old), t.update({new: value}))

    for name, broken in [  # (the tensor the message must name, the damage)
        ("layers.0.attn.wq_a.weight", drop("layers.0.attn.wq_a.scale")),  # FP8 without its scale
        ("layers.1.ffn.experts.3.w2.weight", drop("layers.1.ffn.experts.3.w2.scale")),  # FP4 without its scale
        ("layers.2.attn.compressor.ape", replace("layers.2.attn.compressor.ape", torch.zeros(3, 3))),
        ("layers.3.ffn.gate.bias", swap("layers.3.ffn.gate.bias", "layers.3.ffn.gate.tid2eid",
                                        torch.zeros(256, 2, dtype=torch.long))),
    ]:
        copy = dict(tensors)
        broken(copy)
        path = tmp_path / name.replace(".", "_")
        _write(path, cfg, copy)
        with pytest.raises(ValueError) as err:
            load_model(path)
        message = str(err.value)
        assert str(path) in message and repr(name) in message, message


def test_mtp_round_trip_and_transformers_ignores_it(tmp_path):
    """openr2 saves its MTP depth under the release's names and reads it back bit for bit; transformers loads
    the same directory (it ignores `mtp.*`) and its logits are ours."""
    import transformers

    model = build_model(MTP_CONFIG)
    perturb_(model, seed=2)
    save_model(model, tmp_path)
    back = load_model(tmp_path)
    mine, theirs = model.state_dict(), back.state_dict()
    assert any(k.startswith("mtp.0.") for k in mine) and mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path).float().eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4


def test_transformers_save_without_mtp_loads_with_mtp_off(tmp_path):
    """transformers writes num_nextn_predict_layers 1 but no MTP tensors: loaded with MTP off, with a warning."""
    from tests.hf_utils import hf_model

    hf = hf_model(MTP_CONFIG, seed=0)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="MTP off"):
        model = load_model(tmp_path)
    assert model.config.num_nextn_predict_layers == 0 and len(model.mtp) == 0
