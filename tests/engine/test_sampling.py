"""Sampling: exact mask sets, exact penalty values, greedy, distributions, seeds, logprobs, validation."""

from __future__ import annotations

import pytest
import torch

from openr2.engine.sampling import (
    SamplingParams,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    make_generator,
    sample,
    token_counts,
)

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG_INF).flatten().tolist()) for row in logits]


# -- masks -------------------------------------------------------------------------------------------

def test_top_k_exact_sets_ties_and_off_rows():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0],
                           [1.0, 4.0, 3.0, 2.0, 0.0],
                           [2.0, 5.0, 2.0, 1.0, 2.0],   # tie at the k-th value: all ties kept
                           [1.0, 4.0, 3.0, 2.0, 0.0],
                           [1.0, 4.0, 3.0, 2.0, 0.0]])
    out = apply_top_k(logits, torch.tensor([1, 3, 2, -1, 5]))
    assert kept(out) == [{1}, {1, 2, 3}, {0, 1, 2, 4}, set(range(5)), set(range(5))]
    assert torch.equal(out[3], logits[3]) and torch.equal(out[1][[1, 2, 3]], logits[1][[1, 2, 3]])
    assert apply_top_k(logits, torch.tensor([0, -1, 0, -1, 9])) is logits  # all off: untouched


def test_top_p_exact_sets():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(5, 1)
    out = apply_top_p(logits, torch.tensor([0.4, 0.75, 0.85, 0.99, 1.0]))
    assert kept(out) == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3}]


def test_top_p_keeps_ties_and_ignores_order():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 1.0, 0.0, 3.0]])
    assert kept(apply_top_p(logits, torch.tensor([0.1, 0.1]))) == [{1, 2}, {0, 3}]


def test_top_p_one_keeps_a_long_tiny_tail():
    logits = torch.cat([torch.tensor([[30.0]]), torch.full((1, 5000), -30.0)], dim=1)
    assert torch.equal(apply_top_p(logits, torch.tensor([1.0])), logits)


def test_min_p_exact_sets():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(3, 1) + 7.0  # a shift changes nothing: min_p is relative
    out = apply_min_p(logits, torch.tensor([0.0, 0.2, 0.7]))
    assert kept(out) == [{0, 1, 2, 3}, {0, 1, 2}, {0}]  # thresholds: none, 0.1, 0.35
    assert torch.equal(out[0], logits[0])


# -- penalties ---------------------------------------------------------------------------------------

def test_token_counts():
    counts = token_counts([[1, 1, 3], [], torch.tensor([0, 4, 4, 4])], vocab_size=5)
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 3]]


def test_each_penalty_exact_values():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]] * 3)
    counts = torch.tensor([[0, 0, 3, 1]] * 3)
    seen = torch.tensor([[True, True, True, False]] * 3)  # token 3 counted as output but "unseen" here
    ones, zeros = torch.ones(3), torch.zeros(3)
    rep = apply_penalties(logits, counts, seen, torch.tensor([2.0, 1.0, 0.5]), zeros, zeros)
    assert rep.tolist() == [[1.0, -4.0, 0.5, -1.0], [2.0, -2.0, 1.0, -1.0], [4.0, -1.0, 2.0, -1.0]]
    freq = apply_penalties(logits, counts, seen, ones, torch.tensor([0.5, 0.0, -1.0]), zeros)
    assert freq.tolist() == [[2.0, -2.0, -0.5, -1.5], [2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 4.0, 0.0]]
    pres = apply_penalties(logits, counts, seen, ones, zeros, torch.tensor([0.5, 0.0, -2.0]))
    assert pres.tolist() == [[2.0, -2.0, 0.5, -1.5], [2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 3.0, 1.0]]


def test_sample_penalties_use_prompt_for_repetition_and_output_for_frequency():
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0, repetition_penalty=2.0),  # token 0 in prompt: 3 -> 1.5
              SamplingParams(temperature=0, frequency_penalty=2.0),   # token 0 in prompt only: no effect
              SamplingParams(temperature=0, presence_penalty=1.0)]    # token 0 in output: 3 -> 2
    before = logits.clone()
    res = sample(logits, params, prompt_token_ids=[[0], [0], [2]], output_token_ids=[[], [], [0, 0]])
    assert res.token_ids.tolist() == [1, 0, 1]
    assert torch.equal(logits, before)  # the caller's logits are never modified
    with pytest.raises(ValueError, match="output_token_ids"):
        sample(logits, params)


# -- greedy and random sampling ----------------------------------------------------------------------

def test_greedy_is_argmax_and_ignores_masks_and_noise():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.5, seed=i) for i in range(6)]
    assert torch.equal(sample(logits, params).token_ids, logits.argmax(-1))


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    nz = expected > 0
    assert observed[~nz].sum() == 0, "sampled a masked token"
    return float(((observed[nz] - expected[nz]) ** 2 / expected[nz]).sum())


@pytest.mark.parametrize("kwargs, expected", [
    (dict(temperature=1.0), [0.1, 0.2, 0.3, 0.4]),
    (dict(temperature=2.0), [x**0.5 for x in (0.1, 0.2, 0.3, 0.4)]),
    (dict(temperature=1.0, top_k=2), [0, 0, 0.3, 0.4]),
    (dict(temperature=1.0, top_p=0.5), [0, 0, 0.3, 0.4]),
    (dict(temperature=1.0, min_p=0.6), [0, 0, 0.3, 0.4]),
])
def test_sampled_distribution(kwargs, expected):
    n = 4000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().repeat(n, 1)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(n)]  # deterministic, per-row streams
    tokens = sample(logits, [SamplingParams(**kwargs)] * n, gens).token_ids
    probs = torch.tensor(expected) / sum(expected)
    # 3 degrees of freedom: P(chi2 > 25) ~ 1.5e-5, so a wrong distribution fails and a right one passes
    assert chi_square(tokens, probs) < 25


def step_logits(step: int, V: int = 1000) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(step)) * 2


def run_steps(params: list[SamplingParams], target: int, steps: int = 12) -> list[int]:
    """Sample `steps` tokens for a batch (each row sees the same logits) and return row `target`'s."""
    gens = [make_generator(p.seed) for p in params]
    out = []
    for step in range(steps):
        logits = step_logits(step).repeat(len(params), 1)
        out.append(int(sample(logits, params, gens).token_ids[target]))
    return out


def test_seeded_request_is_the_same_alone_and_in_a_mixed_batch():
    me = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    alone = run_steps([me], 0)
    batch = [SamplingParams(temperature=0),                      # greedy: draws no noise
             SamplingParams(temperature=1.3),                    # global RNG
             me,
             SamplingParams(temperature=0.7, top_k=5, seed=123)]
    torch.manual_seed(99)
    assert run_steps(batch, 2) == alone
    assert run_steps(batch[::-1], 1) == alone  # another position, another neighbour order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_request_is_batch_invariant_on_cuda():
    logits = (torch.randn(4, 129280, generator=torch.Generator().manual_seed(0)) * 3).cuda()
    me = SamplingParams(temperature=0.8, top_p=0.9, top_k=100, seed=11)
    alone = sample(logits[2:3], [me], [make_generator(11, "cuda")]).token_ids
    batch = [SamplingParams(temperature=0), SamplingParams(), me, SamplingParams(seed=3)]
    gens = [None, None, make_generator(11, "cuda"), make_generator(3, "cuda")]
    assert int(sample(logits, batch, gens).token_ids[2]) == int(alone[0])


def test_different_seeds_differ_and_same_seed_repeats():
    a = run_steps([SamplingParams(temperature=1.0, seed=1)], 0)
    b = run_steps([SamplingParams(temperature=1.0, seed=2)], 0)
    assert a != b
    assert a == run_steps([SamplingParams(temperature=1.0, seed=1)], 0)


def test_make_generator_offsets_the_seed_per_sample():
    assert make_generator(None) is None
    g0, g1 = make_generator(5), make_generator(5, index=1)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=make_generator(6)))
    assert not torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=make_generator(6)))


# -- logprobs ----------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_ordered_top_k():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(temperature=0.5, logprobs=5, seed=0, repetition_penalty=1.5),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0)]
    res = sample(logits, params, [make_generator(0), None, None],
                 prompt_token_ids=[[1, 2], None, None], output_token_ids=[[3], None, None])
    # before penalties and temperature; sample() takes log_softmax of the same float32 logits, so the
    # values are the same to the last bit (one op on one tensor), and so are the Python floats of tolist()
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.equal(res.logprobs, ref.gather(1, res.token_ids[:, None]).squeeze(1))
    top = ref[0].sort(descending=True)
    assert res.top_token_ids[0].tolist() == top.indices[:5].tolist()
    assert torch.equal(res.top_logprobs[0], top.values[:5])
    rows = res.tolist()
    assert rows[0].token_id == int(res.token_ids[0]) and len(rows[0].top) == 5
    assert rows[0].top[0] == (int(top.indices[0]), float(top.values[0]))
    assert rows[1].top == [] and rows[1].logprob == float(ref[1].max())
    assert rows[2].logprob is None and rows[2].top is None


def test_no_logprobs_fields_when_none_asked():
    res = sample(torch.zeros(2, 8), [SamplingParams()] * 2)
    assert res.logprobs is None and res.top_token_ids is None
    assert all(r.logprob is None for r in res.tolist())


# -- validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5),
    ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.1),
    ("top_k", -2), ("top_k", 2.0), ("top_k", 2**63),
    ("min_p", -0.1), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", -3.0), ("frequency_penalty", 2.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("seed", 1.5), ("seed", 2**64),
    ("max_tokens", 0), ("max_tokens", -5),
    ("stop", ["ok", 3]), ("stop", ""), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
    ("logprobs", -1), ("logprobs", 21),
    ("ignore_eos", "yes"),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_normalisation():
    p = SamplingParams(stop="###", top_k=0)
    assert p.stop == ["###"] and p.top_k == -1 and p.stop_token_ids == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_the_largest_top_k_is_off_not_an_overflow():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(top_k=2**63 - 1, seed=0), SamplingParams(temperature=0, top_k=2**63 - 1)]
    ids = sample(logits, params, [make_generator(0), None]).token_ids
    assert ids[1] == logits[1].argmax()
