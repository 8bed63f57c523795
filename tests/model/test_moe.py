"""The router against transformers' routers, and grouped vs looped experts (outputs and gradients)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.model.moe import Gate, MoE, RoutedExperts
from openr2.presets import tiny_v2, tiny_v3
from tests.numerics import (
    EPS32,
    assert_close_to_reference,
    assert_same_function,
    float64_compute,
    float64_copy,
)

V2_GROUPED = dataclasses.replace(tiny_v2(), topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                 routed_scaling_factor=16.0)
CONFIGS = {"v3-noaux_tc": tiny_v3(), "v2-greedy": tiny_v2(), "v2-group_limited_greedy": V2_GROUPED}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gate_matches_transformers_router(name):
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = CONFIGS[name]
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    ref = (DeepseekV3TopkRouter if config.is_v3 else DeepseekV2TopkRouter)(hf_config)
    ours = Gate(config)
    with torch.no_grad():
        ours.weight.copy_(_randn(*ours.weight.shape, seed=1))
        ref.weight.copy_(ours.weight)
        if config.is_v3:
            ours.e_score_correction_bias.copy_(_randn(config.n_routed_experts, seed=2).abs() * 0.3)
            ref.e_score_correction_bias.copy_(ours.e_score_correction_bias)
    x = _randn(1024, config.hidden_size, seed=3)
    weights, ids, _ = ours(x)
    _, ref_weights, ref_ids = ref(x)
    with float64_compute():  # both routers compute in float32 whatever the input: ours, lifted, is the reference
        weights64, ids64, _ = float64_copy(ours)(x.double())
    # transformers picks with sorted=False: compare expert sets, and weights in the same expert order
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    assert torch.equal(ids, ids64)  # no near-tie flips between float32 and float64 on these inputs
    assert_same_function(weights.gather(1, order), ref_weights.gather(1, ref_order), weights64.gather(1, order),
                         what=f"router weights, ours vs transformers ({name})")


def test_correction_bias_selects_but_does_not_weigh():
    config = tiny_v3()
    gate = Gate(config)
    with torch.no_grad():
        gate.weight.copy_(_randn(*gate.weight.shape, seed=4))
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[5] = 10.0  # expert 5 always selected ...
    x = _randn(64, config.hidden_size, seed=5)
    weights, ids, scores = gate(x)
    assert (ids == 5).any(dim=-1).all()
    # ... but weighted by its plain sigmoid score, renormalised over the chosen set, times 2.5. Against the
    # same formula in float64 from the same float32 scores: the gate's float32 sum, division and scaling
    # round three times, each by at most u = EPS32 / 2 relative (the 1e-20 guard changes nothing), so
    # |w - ref| <= 3u |ref| to first order; 4u covers the higher-order terms
    picked = scores.gather(1, ids).double()
    ref = picked / picked.sum(-1, keepdim=True) * 2.5
    assert ((weights.double() - ref).abs() <= 2 * EPS32 * ref.abs()).all()
    # and they sum to 2.5: each weight within 4u of its exact share (the float64 sum adds ~1e-16)
    assert ((weights.double().sum(-1) - 2.5).abs() <= 2 * EPS32 * 2.5).all()


def test_group_limited_routing_stays_in_kept_groups():
    config = V2_GROUPED
    gate = Gate(config)
    with torch.no_grad():
        gate.weight.copy_(_randn(*gate.weight.shape, seed=6))
    _, ids, scores = gate(_randn(256, config.hidden_size, seed=7))
    per_group = config.n_routed_experts // config.n_group
    best_groups = scores.view(256, config.n_group, per_group).amax(-1).topk(config.topk_group).indices
    for row_groups, kept in zip((ids // per_group).tolist(), best_groups.tolist()):
        assert set(row_groups) <= set(kept)


def _experts(config, seed=8):
    experts = RoutedExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(_randn(*experts.gate_up_proj.shape, seed=seed) * 0.2)
        experts.down_proj.copy_(_randn(*experts.down_proj.shape, seed=seed + 1) * 0.2)
    return experts


def _outputs_and_grads(experts, x, weights, ids, grad_out, impl):
    """(output, grads of x, weights, gate_up_proj, down_proj) of experts(x, weights, ids, impl)."""
    x, weights = x.detach().requires_grad_(), weights.detach().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = experts(x, weights, ids, impl)
    out.backward(grad_out)
    result = (out.detach(), x.grad, weights.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
    experts.zero_grad(set_to_none=True)
    return result


def test_grouped_equals_looped_outputs_and_gradients():
    config = tiny_v3()
    experts = _experts(config)
    n, k, e = 200, config.num_experts_per_tok, config.n_routed_experts
    x = _randn(n, config.hidden_size, seed=9).requires_grad_()
    ids = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:k] for i in range(n)])
    ids[ids == 3] = 4  # expert 3 gets no tokens: both paths must skip it
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 1] + 1) % e, ids[:, 1])
    ids[ids == 3] = 5
    assert not (ids == 3).any() and (ids[:, 0] != ids[:, 1]).all()
    weights = _randn(n, k, seed=10).abs().requires_grad_()
    grad_out = _randn(n, config.hidden_size, seed=11)

    grads = {impl: _outputs_and_grads(experts, x, weights, ids, grad_out, impl) for impl in ("looped", "grouped")}
    ref = _outputs_and_grads(float64_copy(experts), x.double(), weights.double(), ids, grad_out.double(), "looped")
    names = ("output", "grad x", "grad weights", "grad gate_up_proj", "grad down_proj")
    for name, looped, grouped, ref64 in zip(names, grads["looped"], grads["grouped"], ref):
        assert looped.abs().max() > 0
        assert_close_to_reference(grouped, looped, ref64, what=f"grouped vs looped, {name}")


def test_moe_block_paths_agree_and_include_shared_experts():
    config = tiny_v2()
    moe = MoE(config)
    with torch.no_grad():
        for i, p in enumerate(moe.parameters()):
            p.copy_(_randn(*p.shape, seed=20 + i) * 0.2)
    x = _randn(2, 9, config.hidden_size, seed=12)
    with torch.no_grad():
        looped, grouped = moe(x, "looped"), moe(x, "grouped")
        weights, ids, _ = moe.gate(x.view(-1, config.hidden_size))
        routed = moe.experts(x.view(-1, config.hidden_size), weights, ids, "looped").view_as(x)
        with float64_compute():
            moe64 = float64_copy(moe)
            ref = moe64(x.double(), "looped")
            assert torch.equal(moe64.gate(x.view(-1, config.hidden_size).double())[1], ids)  # same routing
    assert_close_to_reference(grouped, looped, ref, what="MoE block, grouped vs looped")
    # the block is routed experts + shared experts: the sum by hand, as a plain path
    assert_close_to_reference(grouped, routed + moe.shared_experts(x), ref, what="MoE block = routed + shared")
    with pytest.raises(ValueError, match="moe_impl"):
        moe(x, "fast")


@pytest.mark.parametrize("num_tokens", [1, 2, 4])
def test_decode_sized_batches_match_looped(num_tokens):
    """Up to 8 (token, expert) pairs the grouped path runs each pair directly: same numbers."""
    config = tiny_v3()
    experts = _experts(config, seed=30)
    x = _randn(num_tokens, config.hidden_size, seed=31)
    ids = torch.tensor([[1, 6], [6, 2], [0, 7], [3, 6]])[:num_tokens]
    weights = _randn(num_tokens, 2, seed=32).abs()
    with torch.no_grad():
        ref = float64_copy(experts)(x.double(), weights.double(), ids, "looped")
        assert_close_to_reference(experts(x, weights, ids, "grouped"), experts(x, weights, ids, "looped"), ref,
                                  what=f"decode-sized grouped vs looped, {num_tokens} tokens")


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 9])
def test_tensor_only_path_matches_looped(num_tokens):
    """The compiled-decode expert path: gathered pairs up to E pairs (1-4 tokens here), every expert on
    every token beyond (9 tokens)."""
    config = tiny_v3()
    experts = _experts(config, seed=33)
    x = _randn(num_tokens, config.hidden_size, seed=34)
    ids = torch.stack([torch.randperm(config.n_routed_experts, generator=torch.Generator().manual_seed(n))[:2]
                       for n in range(num_tokens)])
    weights = _randn(num_tokens, 2, seed=35).abs()
    with torch.no_grad():
        ref = float64_copy(experts)(x.double(), weights.double(), ids, "looped")
        assert_close_to_reference(experts._tensor_only(x, weights, ids), experts(x, weights, ids, "looped"), ref,
                                  what=f"tensor-only vs looped, {num_tokens} tokens")


def test_sequence_aux_loss_is_alpha_for_uniform_routing():
    from openr2.model.moe import MoE

    config = dataclasses.replace(tiny_v3(), aux_loss_alpha=1e-4)
    moe = MoE(config).train()
    E, K, T = config.n_routed_experts, config.num_experts_per_tok, 8
    ids = torch.arange(T * K).view(T, K) % E  # every expert chosen equally often
    scores = torch.full((T, E), 0.5)
    moe._balance_stats(ids, scores, batch=1)
    assert moe.aux_loss.item() == pytest.approx(1e-4)
    assert torch.equal(moe.expert_load, torch.full((E,), T * K / E))


def test_bias_updates_balance_a_skewed_router():
    """Aux-loss-free balancing alone (no gradients) evens out a router that favours a few experts."""
    from openr2.model.moe import MoE, update_correction_bias

    config = tiny_v3()
    held_out = _randn(4096, config.hidden_size, seed=41)[None]

    def imbalance(gamma: float) -> float:
        moe = MoE(config)
        with torch.no_grad():
            for i, p in enumerate(moe.parameters()):
                p.copy_(_randn(*p.shape, seed=50 + i) * 0.2)
            moe.gate.weight[:2] += _randn(config.hidden_size, seed=60)  # experts 0, 1 attract tokens
            moe.gate.e_score_correction_bias.zero_()
        moe.train()
        with torch.no_grad():
            for step in range(300):
                moe(_randn(4, 64, config.hidden_size, seed=100 + step))
                update_correction_bias(moe, gamma)
            moe(held_out)
        return update_correction_bias(moe, 0.0)[0]["max_over_mean"]

    balanced, skewed = imbalance(0.003), imbalance(0.0)
    print(f"max/mean expert load on held-out tokens: with bias updates {balanced:.2f}, without {skewed:.2f}")
    assert balanced <= 1.3 < skewed


def test_loads_are_counted_only_while_training():
    from openr2.model.moe import MoE

    moe = MoE(tiny_v3()).eval()
    with torch.no_grad():
        moe(_randn(1, 4, tiny_v3().hidden_size, seed=70))
    assert moe.expert_load.sum() == 0 and moe.aux_loss is None


def _skewed_routing(n, config, seed):
    """ids [n, K] (distinct per token; expert 3 gets no token, expert 0 most) and weights [n, K]."""
    e, k = config.n_routed_experts, config.num_experts_per_tok
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    ids[ids == 3] = 0
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 1] + 1) % e, ids[:, 1])
    ids[ids == 3] = 5
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 1] + 2) % e, ids[:, 1])
    assert not (ids == 3).any() and (ids[:, 0] != ids[:, 1]).all()
    return ids


@pytest.mark.parametrize("n", [9, 300])
def test_training_grouped_backward_equals_autograd_of_plain_grouped(n, monkeypatch):
    """The hand-written backward of the training path (_GroupedExperts) against autograd over the plain
    grouped code (the path it replaces): outputs and the gradients of x, weights and both expert stacks."""
    import openr2.model.moe as moe_mod

    config = tiny_v3()
    experts = _experts(config, seed=40)
    x = _randn(n, config.hidden_size, seed=41).requires_grad_()
    ids = _skewed_routing(n, config, seed=42)
    weights = _randn(n, config.num_experts_per_tok, seed=43).abs().requires_grad_()
    grad_out = _randn(n, config.hidden_size, seed=44)

    results = {}
    for fused in (True, False):
        monkeypatch.setattr(moe_mod, "_fused_ok", lambda *a, fused=fused: fused)
        out = experts(x, weights, ids, "fused")
        assert (out.grad_fn.name() == "_GroupedExpertsBackward") == fused
        out.backward(grad_out)
        results[fused] = (out.detach(), x.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
        x.grad = weights.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
    # the reference: autograd over the plain grouped code, in float64
    ref = _outputs_and_grads(float64_copy(experts), x.double(), weights.double(), ids, grad_out.double(), "grouped")
    names = ("output", "grad x", "grad weights", "grad gate_up_proj", "grad down_proj")
    for name, fast, plain, ref64 in zip(names, results[True], results[False], ref):
        assert plain.abs().max() > 0
        assert_close_to_reference(fast, plain, ref64, what=f"fused vs autograd, {name}, {n} tokens")
    assert (results[True][3][3] == 0).all() and (results[True][4][3] == 0).all()  # unused expert: zero grad


def test_training_grouped_backward_gradcheck():
    """float64 gradcheck of _GroupedExperts (x, weights, gate_up, down) against finite differences."""
    from openr2.model.moe import _GroupedExperts

    config = tiny_v3()
    n, k, e, d, i = 7, config.num_experts_per_tok, config.n_routed_experts, 6, 5
    ids = _skewed_routing(n, config, seed=50)
    order = ids.flatten().argsort(stable=True)
    counts = torch.bincount(ids.flatten(), minlength=e).tolist()
    args = [_randn(n, d, seed=51), _randn(n, k, seed=52).abs(), _randn(e, 2 * i, d, seed=53),
            _randn(e, d, i, seed=54)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: _GroupedExperts.apply(*a, order // k, order, counts), args)


@pytest.mark.parametrize("chunk_rows", [1, 30, None], ids=["expert-by-expert", "chunks", "one-chunk"])
def test_prefill_experts_in_chunks_match_looped(chunk_rows, monkeypatch):
    """The no-grad grouped path runs chunks of whole experts (each chunk's first product within
    _CHUNK_BYTES; an expert larger than that alone): every chunking gives the looped path's numbers."""
    import openr2.model.moe as moe_mod

    config = tiny_v3()
    experts = _experts(config, seed=64)
    x = _randn(120, config.hidden_size, seed=65)
    ids = _skewed_routing(120, config, seed=66)  # an expert with no tokens, one with many
    weights = _randn(120, 2, seed=67).abs()
    if chunk_rows is not None:
        row_bytes = 2 * config.moe_intermediate_size * x.element_size()
        monkeypatch.setattr(moe_mod, "_CHUNK_BYTES", chunk_rows * row_bytes)
    with torch.no_grad():
        ref = float64_copy(experts)(x.double(), weights.double(), ids, "looped")
        assert_close_to_reference(experts(x, weights, ids, "grouped"), experts(x, weights, ids, "looped"), ref,
                                  what=f"grouped prefill, chunks of {chunk_rows} rows")


def test_fused_path_only_when_the_caller_asks():
    config = tiny_v3()
    experts = _experts(config, seed=60)
    x = _randn(40, config.hidden_size, seed=61)
    ids = _skewed_routing(40, config, seed=62)
    weights = _randn(40, 2, seed=63).abs()
    with torch.no_grad():
        looped = experts(x, weights, ids, "looped")
        ref = float64_copy(experts)(x.double(), weights.double(), ids, "looped")
        assert_close_to_reference(experts(x, weights, ids, "grouped"), looped, ref, what="grouped, no grad")
    out = experts(x, weights, ids, "fused")
    assert out.grad_fn.name() == "_GroupedExpertsBackward"
    assert_close_to_reference(out.detach(), looped, ref, what="grouped, fused training path")
    assert experts(x, weights, ids, "grouped").grad_fn.name() != "_GroupedExpertsBackward"  # grad mode picks nothing
