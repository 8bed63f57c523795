"""DeepSeek-V4 pieces on their own: the grouped experts against the looped reference (float64-referenced, as
tests/numerics.py), the routers' rules, and config.json reading against transformers' DeepseekV4Config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.config import ModelConfig
from openr2.model.moe_v4 import ClippedExperts, HashGate, ScoreGate, clipped_swiglu
from openr2.model.transformer import build_model
from openr2.presets import deepseek_v4_flash, deepseek_v4_pro, tiny_v4
from tests.hf_utils import perturb_
from tests.numerics import assert_close_to_reference, float64_compute, float64_copy


def _experts(seed=0):
    config = tiny_v4()
    experts = ClippedExperts(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # large enough that the clip at swiglu_limit (10) bites on some rows
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.8)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.2)
    return config, experts


def test_grouped_experts_equal_looped():
    config, experts = _experts()
    gen = torch.Generator().manual_seed(1)
    N, K, E = 64, config.num_experts_per_tok, config.n_routed_experts
    x = torch.randn(N, config.hidden_size, generator=gen) * 2
    ids = torch.rand(N, E, generator=gen).argsort(-1)[:, :K]
    weights = torch.rand(N, K, generator=gen)
    h = torch.einsum("nd,nkid->nki", x, experts.gate_up_proj[ids])
    gate, up = h.chunk(2, dim=-1)
    assert (gate > config.swiglu_limit).any() and (up.abs() > config.swiglu_limit).any()  # both clips bite
    with torch.no_grad():
        fast = experts(x, weights, ids, "grouped")
        plain = experts(x, weights, ids, "looped")
        with float64_compute():
            ref = float64_copy(experts)(x.double(), weights.double(), ids, "looped")
    assert_close_to_reference(fast, plain, ref, what="V4 experts grouped vs looped")
    with pytest.raises(ValueError, match="'looped', 'grouped' or 'fused'"):
        experts(x, weights, ids, "decode")


def test_trains_end_to_end():
    """A training step's backward (the trainer's moe_impl) reaches every parameter but the indexer's (sinks,
    position biases, hyper-connections, both routers' weights), and the hash table is a buffer the optimizer
    never sees."""
    model = build_model(tiny_v4(), seed=0)
    perturb_(model, seed=1)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(0))
    logits = model(ids[:, :-1], moe_impl="fused")
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    names = {n for n, _ in model.named_parameters()}
    assert not any("tid2eid" in n for n in names)
    # the indexer only ranks entries (top-k is not differentiable, as in DeepSeek-V3.2 and transformers): its
    # parameters get no gradient from the LM loss; everything else does
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    assert no_grad and all(".compressor.indexer." in n for n in no_grad), no_grad


def test_clipped_swiglu():
    gate_up = torch.tensor([[12.0, -3.0, 15.0, -20.0]])  # gate (12, -3), up (15, -20), limit 10
    want = torch.tensor([[torch.nn.functional.silu(torch.tensor(10.0)) * 10, torch.nn.functional.silu(
        torch.tensor(-3.0)) * -10]])
    assert torch.allclose(clipped_swiglu(gate_up, 10.0), want)


def test_routers():
    config = tiny_v4()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, config.hidden_size, generator=gen)
    ids_in = torch.randint(0, config.vocab_size, (3, 4), generator=gen)
    hashed = HashGate(config)
    scored = ScoreGate(config)
    with torch.no_grad():
        for gate in (hashed, scored):
            gate.weight.normal_(generator=gen)
        hashed.tid2eid.copy_(torch.rand(config.vocab_size, config.n_routed_experts, generator=gen).argsort(-1)[:, :2])
        scored.e_score_correction_bias.copy_(torch.rand(config.n_routed_experts, generator=gen))
    w, ids = hashed(x, ids_in)
    assert torch.equal(ids, hashed.tid2eid[ids_in.reshape(-1)])  # the table alone picks the experts
    assert torch.allclose(w.sum(-1), torch.full((12,), config.routed_scaling_factor))
    with pytest.raises(ValueError, match="token ids"):
        hashed(x)
    w, ids = scored(x)
    scores = torch.nn.functional.softplus(x @ scored.weight.t()).sqrt()
    want = (scores + scored.e_score_correction_bias).topk(2, dim=-1).indices  # the bias picks, never weighs
    assert torch.equal(ids, want)
    picked = scores.gather(1, ids)
    assert torch.allclose(w, picked / picked.sum(-1, keepdim=True) * config.routed_scaling_factor)


def test_config_matches_transformers_reading():
    """Flat keys read as transformers' DeepseekV4Config derives them: default schedules, legacy spellings."""
    import transformers

    for hf_kwargs in [
        {"num_hidden_layers": 7},
        {"num_hidden_layers": 5, "compress_ratios": [0, 4, 128, 4, 128, 0], "num_hash_layers": 2,
         "qk_rope_head_dim": 32, "compress_rate_hca": 64},
    ]:
        theirs = transformers.DeepseekV4Config(**hf_kwargs)
        ours = ModelConfig.from_hf({"model_type": "deepseek_v4", **hf_kwargs})
        assert ours.layer_types == theirs.layer_types
        assert ours.mlp_layer_types == theirs.mlp_layer_types
        assert ours.compress_rates == theirs.compress_rates
        assert ours.qk_rope_head_dim == theirs.qk_rope_head_dim


@pytest.mark.parametrize("make", [tiny_v4, deepseek_v4_flash, deepseek_v4_pro])
def test_config_round_trip(make):
    config = make()
    back = ModelConfig.from_hf(config.to_hf())
    for f in dataclasses.fields(config):
        if f.name not in ("source", "quantization_config", "torch_dtype"):
            assert getattr(back, f.name) == getattr(config, f.name), f.name


def test_config_errors_name_the_key():
    hf = tiny_v4().to_hf()
    for key, value, why in [
        ("layer_types", ["sliding_attention"] * 3 + ["full_attention"], "layer_types"),
        ("mlp_layer_types", ["moe"] * 3, "mlp_layer_types"),
        ("o_groups", 3, "o_groups"),
        ("scoring_func", "softmax", "scoring_func"),
        ("compress_ratios", [0, 4, 5, 4], "compress_ratios"),
    ]:
        bad = {**hf, key: value}
        if key == "compress_ratios":
            bad.pop("layer_types")
        with pytest.raises(ValueError, match=f"key '{why}'"):
            ModelConfig.from_hf(bad, source="x/config.json")


def test_mtp_depths_read_the_right_tokens():
    """Depth k's draft at position i predicts t_{i+k+1} from the streams up to i and Emb(t_{i+k}): it moves with
    token i + k and with earlier tokens, never with later ones; and the trainer's with_mtp backward reaches
    every MTP parameter."""
    config = dataclasses.replace(tiny_v4(), num_nextn_predict_layers=2)
    model = build_model(config, seed=0)
    perturb_(model, seed=4)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    i = 20
    with torch.no_grad():
        _, drafts = model(ids, with_mtp=True)
        for k, draft in enumerate(drafts, start=1):
            assert draft.shape[1] == ids.shape[1] - k
            later, at = ids.clone(), ids.clone()
            later[0, i + k + 1 :] = (later[0, i + k + 1 :] + 1) % 256
            at[0, i + k] = (at[0, i + k] + 1) % 256
            # rounding only (other sequence contents change the products' blocking): ~1e-7 at logits ~1
            assert (model(later, with_mtp=True)[1][k - 1][0, i] - draft[0, i]).abs().max() < 1e-5
            assert (model(at, with_mtp=True)[1][k - 1][0, i] - draft[0, i]).abs().max() > 1e-2
    logits, drafts = model(ids[:, :-1], with_mtp=True, moe_impl="fused")
    sum(torch.nn.functional.cross_entropy(d[0], ids[0, k + 1 :]) for k, d in enumerate(drafts, start=1)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())


def test_balancing_updates_only_score_routed_biases():
    """Training forwards count each expert's tokens; update_correction_bias moves every score-routed layer's
    bias by +-gamma towards the mean load (as for V3's noaux_tc gates) and leaves the hash layers' frozen table."""
    from openr2.model.moe import update_correction_bias
    from openr2.model.moe_v4 import V4MoE

    model = build_model(tiny_v4(), seed=0).train()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    tables = [m.gate.tid2eid.clone() for m in model.modules() if isinstance(m, V4MoE) and hasattr(m.gate, "tid2eid")]
    with torch.no_grad():
        model(ids)
    moes = [m for m in model.modules() if isinstance(m, V4MoE)]
    loads = [m.expert_load.clone() for m in moes]
    assert all(load.sum() == 60 * 2 for load in loads)  # 60 tokens x top-2 per layer
    stats = update_correction_bias(model, 0.01)
    assert len(stats) == len(moes) and all(m.expert_load.sum() == 0 for m in moes)
    for m, load in zip(moes, loads):
        if hasattr(m.gate, "e_score_correction_bias"):
            assert torch.equal(m.gate.e_score_correction_bias, 0.01 * torch.sign(load.mean() - load))
    after = [m.gate.tid2eid for m in model.modules() if isinstance(m, V4MoE) and hasattr(m.gate, "tid2eid")]
    assert tables and all(torch.equal(a, b) for a, b in zip(tables, after))
