"""Dynamic sparsity (config.routing_top_p, model/moe.py): each token keeps the fewest of its top-k candidates
whose normalised gates reach top_p (at least routing_min_k); the experts run on the kept pairs only and give
what the fixed-k computation gives with the dropped pairs' weights zeroed, on every expert path (float64);
the compute penalty is a differentiable count that training can lower; config.json keeps the mode; the
engine generates what the model's own greedy loop does; GGUF export refuses it with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.config import ModelConfig
from openr2.model.moe import MOE_IMPLS, MoE
from openr2.model.transformer import build_model, greedy_full_forward
from openr2.presets import tiny_v3
from tests.numerics import float64_compute

DYNAMIC = dict(n_routed_experts=16, num_experts_per_tok=6, n_group=4, topk_group=4, routing_top_p=0.5,
               routing_min_k=2, routing_compute_penalty=0.1)


def _config(**changes) -> ModelConfig:
    return dataclasses.replace(tiny_v3(), **{**DYNAMIC, **changes})


def _moe(config: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(config).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.3)
        moe.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, dtype=torch.float64) * 0.1)
    return moe


def _reference_kept(gate, x: torch.Tensor) -> list[list[int]]:
    """Per token, the kept experts by the rule, written plainly from the fixed top-k gate's choice."""
    top_p, gate.top_p = gate.top_p, 0.0
    try:
        weights, ids, _ = gate(x)
    finally:
        gate.top_p = top_p
    out = []
    for w, e in zip(weights.tolist(), ids.tolist()):
        pairs = sorted(zip(w, e), reverse=True)
        total, mass, kept = sum(w), 0.0, []
        for i, (wi, ei) in enumerate(pairs):
            if i >= gate.min_k and mass >= top_p * total:
                break
            kept.append(ei)
            mass += wi
        out.append(sorted(kept))
    return out


def test_gate_keeps_the_fewest_candidates_reaching_top_p():
    config = _config()
    moe = _moe(config)
    x = torch.randn(64, config.hidden_size, dtype=torch.float64) * 4  # gates from ~0 to ~1: counts vary
    with float64_compute():
        weights, ids, _ = moe.gate(x)
        want = _reference_kept(moe.gate, x)
    got = [sorted(e for e, w in zip(row_ids, row_w) if w != 0) for row_ids, row_w in zip(ids.tolist(), weights.tolist())]
    assert got == want
    counts = (weights != 0).sum(-1)
    assert counts.min() >= config.routing_min_k and counts.max() <= config.num_experts_per_tok
    assert len(set(counts.tolist())) > 1  # the count does vary here
    # kept weights renormalised over the kept experts (norm_topk_prob), times the scaling factor
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), config.routed_scaling_factor, dtype=torch.float64))
    moe.gate.top_p = 1e-9  # nothing but the first min_k
    assert ((moe.gate(x)[0] != 0).sum(-1) == config.routing_min_k).all()


@pytest.mark.parametrize("impl", MOE_IMPLS)
def test_kept_pairs_only_equal_zeroed_weights_on_every_path(impl):
    """Output and gradients (input, router, experts) of the dynamic layer == the fixed-k layer fed the same
    choice with the dropped pairs' weights zeroed, through the looped reference (float64: the same products,
    summed in another order; 1e-12 relative is ~100x the ~20 roundings of the longest chain here, while a lost
    or extra pair is off by O(1))."""
    config = _config()
    moe = _moe(config).train()
    x = torch.randn(2, 24, config.hidden_size, dtype=torch.float64) * 4
    g_out = torch.randn_like(x)
    results = {}
    for side in ("dynamic", "reference"):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        with float64_compute():
            if side == "dynamic":
                out = moe(xi, moe_impl=impl)
            else:
                flat = xi.reshape(-1, x.shape[-1])
                weights, ids, _ = moe.gate(flat)  # zeros at the dropped pairs
                out = (moe.experts(flat, weights, ids, "looped") + moe.shared_experts(flat)).view(x.shape)
        out.backward(g_out)
        results[side] = [out.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()]
    for a, b in zip(results["dynamic"], results["reference"]):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-12


def test_compute_penalty_is_a_count_training_can_lower():
    config = _config(routing_compute_penalty=1.0)
    moe = _moe(config).train()
    x = torch.randn(4, 32, config.hidden_size, dtype=torch.float64)

    def kept_per_token():
        with torch.no_grad(), float64_compute():
            return float((moe.gate(x.reshape(-1, x.shape[-1]))[0] != 0).sum(-1).double().mean())

    with float64_compute():
        moe(x)
    extra = moe.gate.extra
    # each term in [0, 1] and > 0 exactly when its slot is kept: 0 <= extra <= kept - min_k
    assert 0 < extra.item() <= kept_per_token() - config.routing_min_k
    assert moe.aux_loss is not None and moe.aux_loss.item() >= extra.item()  # penalty (+ balance loss)
    before = kept_per_token()
    opt = torch.optim.Adam([moe.gate.weight], lr=0.05)
    for _ in range(20):  # the penalty alone, on the router: peakier gates, fewer experts (min_k = 2)
        opt.zero_grad()
        with float64_compute():
            moe(x)
        moe.gate.extra.backward()
        opt.step()
    assert kept_per_token() < before - 0.5, (before, kept_per_token())


def test_config_round_trip_and_validation(tmp_path):
    config = _config()
    config.save_pretrained(tmp_path)
    again = ModelConfig.from_pretrained(tmp_path)
    assert (again.routing_top_p, again.routing_min_k, again.routing_compute_penalty) == (0.5, 2, 0.1)
    assert "routing_top_p" not in tiny_v3().to_hf()  # fixed top-k configs are written as before
    for key, value, why in (("routing_top_p", 1.5, "must be in \\[0, 1\\]"),
                            ("routing_min_k", 7, "must be in 1..num_experts_per_tok \\(6\\)"),
                            ("routing_compute_penalty", -1.0, "must be >= 0")):
        with pytest.raises(ValueError, match=f"'{key}' {why}"):
            _config(**{key: value}).validate()


def test_gguf_export_refuses_variable_k():
    from openr2.export.gguf import check_exportable

    with pytest.raises(ValueError, match="dynamic sparsity.*exactly n_expert_used = 6 experts"):
        check_exportable(_config(), "ckpt")
    check_exportable(tiny_v3(), "ckpt")  # fixed top-k passes this check


def test_engine_generates_as_the_model_does(tmp_path):
    """The paged engine (prefill on the grouped path, eager decode) == the model's full-forward greedy."""
    from openr2 import LLM, SamplingParams
    from openr2.checkpoints import save_model

    config = _config(num_nextn_predict_layers=0)
    model = build_model(config, seed=3)
    with torch.no_grad():  # clear-cut greedy choices
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    save_model(model, tmp_path)
    prompts = [[5, 17, 33, 2, 9], [40, 41, 3]]
    want = [greedy_full_forward(model.eval(), torch.tensor([p]), 8)[0, len(p):].tolist() for p in prompts]
    llm = LLM(tmp_path, compile=False, block_size=16, num_blocks=32)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == want
