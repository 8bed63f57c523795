"""GRPO: advantages, clipping and token-level aggregation on hand-built groups, log-probabilities against a
plain computation, dynamic sampling, and a few real steps end to end (rollouts, rewards, update,
checkpoint, exact resume) on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from openr2.train import grpo
from openr2.train import rewards as R
from openr2.train.grpo import Group, GRPOConfig, group_advantages, policy_loss
from tests.numerics import assert_close_to_reference, reference64


def test_group_advantages():
    assert group_advantages([1, 0, 0, 1]) == [0.5, -0.5, -0.5, 0.5]
    # std 0.5 plus eps 1e-6 in the denominator: +-0.5 / 0.500001 is +-1 less 2e-6 (float64 rounding: 1e-16)
    assert group_advantages([1, 0, 0, 1], scale=True) == pytest.approx([1, -1, -1, 1], abs=4e-6)
    assert group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]
    assert group_advantages([2.0, 0.0]) == [1.0, -1.0]


def test_token_level_aggregation_and_gradient():
    # two completions: 1 token with A=+1, 3 tokens with A=-1 (padding masked out)
    logp = torch.tensor([[-1.0, 0.0, 0.0], [-2.0, -0.5, -0.1]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-(1 * 1 + 3 * -1) / 4)  # per token, not per sequence (that gives 0)
    loss.backward()
    expected = torch.tensor([[-1 / 4, 0, 0], [1 / 4, 1 / 4, 1 / 4]])
    # exact: the ratio is exp(0) = 1, the advantages +-1, the token count 4 (a power of two)
    assert torch.equal(logp.grad, expected) and stats["clip_fraction"] == 0


def test_clipping_low_and_high():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]]))  # ratios
    mask = torch.ones(1, 4, dtype=torch.bool)
    pos, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    # float32 rounding, u = 2^-24: each ratio exp(log r) is within ~4u relative of r (r and log r stored:
    # u each, log's and exp's own rounding: ~u each), so within 6u absolute for r <= 1.5; the clip bounds
    # 1 +- c round by u; the sum of 4 and the mean add ~3u x 4: the mean is within ~9u = 5.4e-7; abs=1e-6
    # A>0: min(r, clip(r)) -> 1.28 (clipped high), 1.1, 0.5 (unclipped, below), 0.9
    assert pos.item() == pytest.approx(-(1.28 + 1.1 + 0.5 + 0.9) / 4, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.25)
    neg, stats = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A<0: -min(-r, -clip(r)) = max(r, clip(r)) -> 1.5 (unclipped, above), 1.1, 0.8 (clipped low), 0.9
    assert neg.item() == pytest.approx((1.5 + 1.1 + 0.8 + 0.9) / 4, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.25)


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, same = policy_loss(logp, logp, torch.tensor([0.0]), mask, 0.2, 0.2, ref_logp=logp, kl_beta=0.1)
    assert same["kl"] == 0
    ref = logp + torch.tensor([[0.5, -0.5]])
    loss, s = policy_loss(logp, logp, torch.tensor([0.0]), mask, 0.2, 0.2, ref_logp=ref, kl_beta=0.1)
    k3 = [(math.exp(d) - d - 1) for d in (0.5, -0.5)]
    # float32, u = 2^-24: exp(d) within 2u e^d, then - d and - 1 round by u |e^d - d| and u k3: 4.6u for
    # d = 0.5, 2.4u for d = -0.5; their mean within 3.5u + u (the sum) ~ 4.5u = 2.7e-7 of 0.1276 (rel 2.1e-6);
    # the loss multiplies by 0.1 (float32 0.1 and the product: 2u more)
    assert s["kl"] == pytest.approx(sum(k3) / 2, rel=0, abs=5 * 2**-24)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, rel=0, abs=0.1 * 7 * 2**-24)


def test_completion_logprobs_match_a_plain_computation():
    from openr2.model.transformer import build_model
    from openr2.presets import tiny_v3

    model = build_model(tiny_v3(), seed=0).eval()
    seqs, plens = [[5, 6, 7, 8, 9], [10, 11, 12]], [3, 1]
    logp, mask = grpo.completion_logprobs(model, seqs, plens, temperature=0.7, pad_id=0)
    assert mask.tolist() == [[True, True], [True, True]]
    for i, (s, p) in enumerate(zip(seqs, plens)):  # the batched, padded forward vs each sequence alone
        with torch.no_grad():
            logits = model(torch.tensor([s]))[0] / 0.7
        logits64 = reference64(model, torch.tensor([s]))[0] / 0.7
        n = len(s) - p
        rows, targets = torch.arange(p - 1, p - 1 + n), torch.tensor(s[p:])
        want = torch.log_softmax(logits, -1)[rows, targets]
        want64 = torch.log_softmax(logits64, -1)[rows, targets]
        assert_close_to_reference(logp[i, :n].detach(), want, want64, scale=logits64.abs().max().item(),
                                  what=f"completion logprobs, sequence {i}")


def test_dynamic_sampling_refills_informative_groups(monkeypatch, tmp_path):
    from openr2.tasks.synthetic import addition_problem

    calls, seen = [], []

    def fake_sample(llm, problems, n, *args, seed):
        calls.append(len(problems))
        groups = []
        for p in problems:  # every other group overall: all samples right (zero variance)
            k = len(seen)
            seen.append(p)
            texts = [f"w\n</think>\n\n{p.answer}"] * n if k % 2 == 0 else \
                [f"w\n</think>\n\n{p.answer}", "w\n</think>\n\n-1"] * (n // 2)
            groups.append(Group(p, [1, 2], [[3, 4]] * n, texts, [False] * n))
        return groups

    monkeypatch.setattr(grpo, "sample_groups", fake_sample)
    trainer = grpo.GRPOTrainer.__new__(grpo.GRPOTrainer)
    trainer.config = GRPOConfig(model="m", prompts_per_step=4, group_size=4, max_sampling_rounds=5, task="addition:3")
    trainer.weights, trainer.judge_fn, trainer.llm, trainer.step = {"verifiable": 1.0}, None, None, 0
    trainer.prompts = grpo.PromptStream("addition:3", 0)
    kept, stats = trainer.collect()
    assert len(kept) == 4 and calls == [4, 2, 1, 1]  # refilled until four groups had signal
    assert all(max(g.rewards) > min(g.rewards) for g in kept)
    assert stats["groups"] == 8 and stats["zero_variance_fraction"] == 0.5 and stats["accuracy"] == 0.75
    assert trainer.prompts.drawn == 8
    assert R.verifiable(addition_problem(1, 2), ["w\n</think>\n\n3"])[0].score == 1


def test_config_errors():
    for values, key in [({"model": "m", "group_size": 1}, "group_size"), ({"model": "m", "rewards": "x"}, "rewards"),
                        ({"model": "m", "task": "addition:99"}, "task"), ({"model": "m", "lr": 0}, "lr"),
                        ({"model": "m", "stepz": 1}, "stepz"), ({"model": "m", "temperature": 0}, "temperature"),
                        ({"model": "m", "majority_min_share": 1.5}, "majority_min_share"), ({}, "model")]:
        with pytest.raises(ValueError, match=key):
            GRPOConfig.from_dict(values)


@pytest.mark.slow
def test_grpo_steps_end_to_end_and_exact_resume(tmp_path, monkeypatch):
    """Real rollouts on a tiny random model; a stand-in reward with variance (answer length parity) so that
    updates happen; checkpoints; a resumed run repeats the uninterrupted one."""
    from tests.checkpoints import save_tiny_chat_checkpoint

    def parity(problem, completions):
        return [R.Reward(float(len(c) % 2), "parity") for c in completions]

    monkeypatch.setitem(R.SOURCES, "parity", parity)
    monkeypatch.setattr(R, "parse_reward_spec", lambda spec: {"parity": 1.0})
    ckpt = tmp_path / "ckpt"
    save_tiny_chat_checkpoint(ckpt)

    def run(out, **kw):
        cfg = GRPOConfig(model=str(ckpt), task="addition:2", steps=3, prompts_per_step=2, group_size=4,
                         max_tokens=12, lr=1e-3, warmup_steps=0, eval_samples=3, eval_k=2, eval_every=0,
                         save_every=1, keep_last=5, out_dir=str(out), mask_truncated=False, **kw)  # all hit max_tokens
        return grpo.run(cfg)

    summary = run(tmp_path / "a")
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and [r["step"] for r in log] == [1, 2, 3]
    assert all(r["groups_used"] >= 1 and "loss" in r and r["tokens"] > 0 for r in log)
    assert {"reward_parity", "accuracy", "clip_fraction", "kl_to_old", "completion_len"} <= set(log[0])
    evals = [json.loads(x) for x in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and {"greedy", "pass@1", "maj@2", "pass@2"} <= set(evals[0]["addition:2"])
    assert (tmp_path / "a" / "rl.png").read_bytes()[:4] == b"\x89PNG"
    # the policy moved: weights differ from the start
    from openr2.checkpoints import load_model
    start, end = load_model(str(ckpt)).state_dict(), load_model(str(tmp_path / "a" / "step-0000003")).state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    # resume from step 1 of a copy: steps 2-3 repeat exactly
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run(tmp_path / "b", resume=str(tmp_path / "b" / "step-0000001"))
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["reward_mean"]) for r in log_b] == [(r["step"], r["loss"], r["reward_mean"]) for r in log]
