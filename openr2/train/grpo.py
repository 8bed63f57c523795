"""GRPO with rewards the system makes itself (`openr2 rl`).

One step: draw prompts (train split of the task mixture), sample a group of G completions per prompt with
the engine — which runs the policy module itself, so updated weights are used at once (its prefix cache
is reset after each update, never a reload from disk) — score them (rewards.py), and update:

- advantages A_i = r_i - mean(group) (Dr. GRPO; `scale_rewards` also divides by the group std);
- dynamic sampling (DAPO): groups whose rewards are all equal carry no signal; they are dropped and more
  prompts are drawn, up to `max_sampling_rounds` rounds, to fill `prompts_per_step` groups;
- completions cut by max_tokens are masked out of the loss (`mask_truncated`);
- token-level loss (DAPO): sum over every completion token of -min(ratio A, clip(ratio, 1-clip_low,
  1+clip_high) A), divided by the number of such tokens; ratio = pi / pi_old, where pi_old is the policy
  that sampled (ratio 1 on the first of `ppo_epochs` passes over the same rollouts);
- optional KL to a frozen copy of the starting model, k3 estimator, weight `kl_beta` (default 0).
Log-probabilities use the sampling temperature (logits / T), as the sampler did.

Logs (out_dir/log.jsonl): reward mean/std per source, accuracy against the ground truth whenever it is
known (reported, never used for training unless `verifiable` is a reward source), pseudo-label accuracy of
the majority vote, judge accuracy, KL, clip fraction, completion length, truncation rate, zero-variance
groups, tokens/s; eval.jsonl: held-out greedy accuracy, pass@1 / maj@k / pass@k by sampling.
Checkpoints as in trainer.py (atomic, exact resume); the loop around the steps (Ctrl-C, cadence, the
final evaluation and checkpoint) is loop.py's, shared with Trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from openr2.tasks.answers import majority
from openr2.tasks.synthetic import Problem, held_out_problems, to_messages
from openr2.train import rewards as R
from openr2.train.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from openr2.train.config import GRPOConfig, read_config_file
from openr2.train.loop import EVAL_FILE, TrainingLoop, truncate_logs
from openr2.train.mixture import mixture_problems, parse_mixture
from openr2.train.trainer import param_groups


def config_from(config_file: str | None = None, **flags: Any) -> GRPOConfig:
    values = read_config_file(config_file) if config_file else {}
    try:
        return GRPOConfig.from_dict({**values, **flags})
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}" if config_file else str(e)) from e


# ---------------------------------------------------------------------------------------------- pure parts

def group_advantages(rewards: list[float], scale: bool = False, eps: float = 1e-6) -> list[float]:
    """r - mean(r) of one group (and / std(r) with scale=True; population std)."""
    mean = sum(rewards) / len(rewards)
    adv = [r - mean for r in rewards]
    if scale:
        std = math.sqrt(sum(a * a for a in adv) / len(adv))
        adv = [a / (std + eps) for a in adv]
    return adv


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, ref_logp: torch.Tensor | None = None, kl_beta: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped policy-gradient loss.

    logp, old_logp, mask [N, L] (per completion token), advantages [N]. Returns (loss, stats) with loss =
    sum over masked tokens of (-min(ratio A, clip(ratio) A) + kl_beta * k3) / number of masked tokens.
    """
    mask = mask.to(logp.dtype)
    count = mask.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    stats = {"clip_fraction": (((clipped < unclipped).to(logp.dtype) * mask).sum() / count).item()}
    if ref_logp is not None:
        log_r = ref_logp - logp
        k3 = torch.exp(log_r) - log_r - 1  # unbiased, non-negative estimate of KL(pi || ref)
        stats["kl"] = ((k3 * mask).sum() / count).item()
        if kl_beta:
            per_token = per_token + kl_beta * k3
    return (per_token * mask).sum() / count, stats


def completion_logprobs(model, sequences: list[list[int]], prompt_lens: list[int], temperature: float,
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) of each completion token at the sampling temperature -> (logp [N, L], mask [N, L]),
    L the longest completion; sequence i is prompt (prompt_lens[i] tokens) + completion."""
    N = len(sequences)
    T = max(len(s) for s in sequences)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    ids = ids.to(model.device)
    # the training expert path, also without gradients (pi_ref, the KL check): its forward is the plain
    # grouped path's, number for number, so the ratio of the first pass is exactly 1
    logits = model(ids[:, :-1], moe_impl="fused").float() / temperature  # logits[:, t] predicts ids[:, t + 1]
    logp_all = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None])[..., 0]
    L = max(len(s) - p for s, p in zip(sequences, prompt_lens))
    logp = logp_all.new_zeros(N, L)
    mask = torch.zeros(N, L, dtype=torch.bool, device=logp.device)
    for i, (s, p) in enumerate(zip(sequences, prompt_lens)):
        n = len(s) - p
        logp[i, :n] = logp_all[i, p - 1:p - 1 + n]
        mask[i, :n] = True
    return logp, mask


# ---------------------------------------------------------------------------------------------- rollouts

@dataclass
class Group:
    problem: Problem
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    rewards: list[float] = dataclasses.field(default_factory=list)
    parts: dict[str, list[R.Reward]] = dataclasses.field(default_factory=dict)
    correct: list[bool] | None = None  # against the ground truth (logging only)


class PromptStream:
    """Problems of the task mixture's train split, in a fixed order for the seed; resumable by count."""

    def __init__(self, task: str, seed: int):
        self.items, self.seed, self.drawn = parse_mixture(task), seed, 0
        self._it = mixture_problems(self.items, None, seed)

    def take(self, n: int) -> list[Problem]:
        self.drawn += n
        return [next(self._it) for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._it = mixture_problems(self.items, None, self.seed)
        self.drawn = 0
        for _ in range(int(state["drawn"])):
            next(self._it)
        self.drawn = int(state["drawn"])


def sample_groups(llm, problems: list[Problem], n: int, temperature: float, top_p: float, top_k: int,
                  max_tokens: int, seed: int) -> list[Group]:
    """n sampled completions per problem, one request per problem (the n samples share its prompt cache)."""
    from openr2.engine.sampling import SamplingParams

    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                             seed=seed * 100_003 + i) for i in range(len(problems))]
    outs = llm.chat([to_messages(p)[:-1] for p in problems], params)
    return [Group(p, list(o.prompt_token_ids), [list(c.token_ids) for c in o.outputs], [c.text for c in o.outputs],
                  [c.finish_reason == "length" for c in o.outputs]) for p, o in zip(problems, outs)]


def sampled_metrics(llm, problems: list[Problem], k: int, temperature: float, max_tokens: int, seed: int
                    ) -> dict[str, float]:
    """pass@1 (mean over the k samples), maj@k (the majority answer is right) and pass@k (any is right)."""
    groups = sample_groups(llm, problems, k, temperature, 1.0, -1, max_tokens, seed)
    p1 = maj = anyk = 0.0
    for g in groups:
        answers = [R.answer_text(t) for t in g.texts]
        right = [a is not None and R.is_correct(g.problem, a) for a in answers]
        p1 += sum(right) / k
        anyk += any(right)
        maj += majority([None if a is None else R.normalize_answer(a) for a in answers], right)[1]
    n = max(len(groups), 1)
    return {"pass@1": p1 / n, f"maj@{k}": maj / n, f"pass@{k}": anyk / n}


# ---------------------------------------------------------------------------------------------- trainer

class GRPOTrainer(TrainingLoop):
    def __init__(self, model, tokenizer, config: GRPOConfig, judge_model=None):
        from openr2.engine.llm import LLM

        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = config
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.weights = R.parse_reward_spec(cfg.rewards)
        # eager: rollouts decode hundreds of rows at once (dispatch amortised), and a run must not wait on compiling
        self.llm = LLM(model, tokenizer, compile=False, max_num_seqs=256, max_num_batched_tokens=4096)
        self.ref = None
        if cfg.kl_beta > 0:
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.judge_fn = None
        if "judge" in self.weights:
            judge_llm = self.llm if judge_model is None else LLM(judge_model, tokenizer, compile=False)
            self.judge_fn = R.make_judge(self._judge_generate(judge_llm), cfg.judge_samples)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay, foreach=False)
        self.prompts = PromptStream(cfg.task, cfg.seed)
        self.step = 0
        self.interrupted = False
        self.history: list[dict] = []
        if cfg.resume:
            self._resume(cfg.resume)

    def _judge_generate(self, llm) -> Callable[[list[str], int], list[list[str]]]:
        from openr2.engine.sampling import SamplingParams

        def generate(prompts: list[str], k: int) -> list[list[str]]:
            params = [SamplingParams(n=k, temperature=self.config.temperature, max_tokens=self.config.judge_max_tokens,
                                     seed=self.config.seed * 7919 + self.step * 1009 + i) for i in range(len(prompts))]
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
            return [[c.text for c in o.outputs] for o in outs]

        return generate

    # ------------------------------------------------------------------ checkpoints
    def _resume(self, path: str) -> None:
        state = load_checkpoint(path, dtype=self.model.dtype, device="cpu")
        self.model.load_state_dict(state["model"].state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"{state['path']}: optimizer state does not fit this model: {e}") from e
        self.step = int(state["step"])
        self.prompts.load_state_dict(state["data"])
        set_rng_states(state["rng"])
        truncate_logs(self.config.out_dir, self.step)

    def save(self) -> str:
        return save_checkpoint(self.config.out_dir, self.model, self.tokenizer, self.optimizer.state_dict(), None,
                               self.step, self.prompts.state_dict(), rng_states(), self.config.to_dict(),
                               keep_last=self.config.keep_last)

    # ------------------------------------------------------------------ one step
    def _score(self, group: Group) -> None:
        group.rewards, group.parts = R.combine(group.problem, group.texts, self.weights, self.judge_fn,
                                               self.config.majority_min_share)
        if group.problem.answer is not None:  # ground truth: logged, and used only by `verifiable`
            group.correct = [a is not None and R.is_correct(group.problem, a) for a in map(R.answer_text, group.texts)]

    def collect(self) -> tuple[list[Group], dict[str, Any]]:
        """Rollouts for one step: prompts_per_step groups with non-constant rewards (dynamic sampling)."""
        cfg = self.config
        kept: list[Group] = []
        seen: list[Group] = []
        for rnd in range(cfg.max_sampling_rounds):
            need = cfg.prompts_per_step - len(kept)
            if need <= 0:
                break
            problems = self.prompts.take(need)
            groups = sample_groups(self.llm, problems, cfg.group_size, cfg.temperature, cfg.top_p, cfg.top_k,
                                   cfg.max_tokens, seed=cfg.seed * 1_000_003 + self.step * 101 + rnd)
            for g in groups:
                self._score(g)
                seen.append(g)
                if not cfg.dynamic_sampling or max(g.rewards) > min(g.rewards):
                    kept.append(g)
            if not cfg.dynamic_sampling:
                break
        return kept, self._rollout_stats(seen, kept)

    def _rollout_stats(self, seen: list[Group], kept: list[Group]) -> dict[str, Any]:
        texts = [t for g in seen for t in g.texts]
        lengths = [len(c) for g in seen for c in g.completion_ids]
        stats: dict[str, Any] = {
            "groups": len(seen), "groups_used": len(kept),
            "zero_variance_fraction": sum(max(g.rewards) == min(g.rewards) for g in seen) / max(len(seen), 1),
            "reward_mean": sum(r for g in seen for r in g.rewards) / max(len(texts), 1),
            "completion_len": sum(lengths) / max(len(lengths), 1),
            "truncated_fraction": sum(t for g in seen for t in g.truncated) / max(len(texts), 1),
        }
        for name in self.weights:
            scores = [r.score for g in seen for r in g.parts[name]]
            mean = sum(scores) / max(len(scores), 1)
            stats[f"reward_{name}"] = mean
            stats[f"reward_{name}_std"] = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(len(scores), 1))
        if all(g.correct is not None for g in seen) and seen:
            stats["accuracy"] = sum(c for g in seen for c in g.correct) / max(len(texts), 1)
            if "majority" in self.weights:  # is the pseudo-label the answer of a correct sample?
                labelled = [(g, R.majority_label(g.texts, self.config.majority_min_share)) for g in seen]
                right = [any(ok and a is not None and R.normalize_answer(a) == label
                             for a, ok in zip(map(R.answer_text, g.texts), g.correct))
                         for g, label in labelled if label is not None]
                if right:
                    stats["pseudo_label_accuracy"] = sum(right) / len(right)
            if "judge" in self.weights:
                pairs = [(r.score >= 0.5, ok) for g in seen for r, ok in zip(g.parts["judge"], g.correct)]
                stats["judge_accuracy"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
        return stats

    def _update(self, groups: list[Group]) -> dict[str, float]:
        cfg, model = self.config, self.model
        seqs, prompt_lens, advs, keep = [], [], [], []
        for g in groups:
            for ids, adv, cut in zip(g.completion_ids, group_advantages(g.rewards, cfg.scale_rewards), g.truncated):
                if not ids:
                    continue
                seqs.append(g.prompt_ids + ids)
                prompt_lens.append(len(g.prompt_ids))
                advs.append(adv)
                keep.append(not (cut and cfg.mask_truncated))
        if not seqs:
            return {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        advantages = torch.tensor(advs, device=model.device)
        model.eval()  # no MoE balance statistics during RL; gradients still flow
        with torch.no_grad():
            ref_logp = completion_logprobs(self.ref, seqs, prompt_lens, cfg.temperature, pad)[0] if self.ref else None
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        stats: dict[str, float] = {"lr": lr}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        old_logp = mask = None
        for _ in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            logp, token_mask = completion_logprobs(model, seqs, prompt_lens, cfg.temperature, pad)
            if old_logp is None:  # the first pass runs the sampling policy: it is pi_old (ratio 1)
                old_logp = logp.detach()
                mask = token_mask & torch.tensor(keep, device=token_mask.device)[:, None]
                stats["tokens"] = int(mask.sum())
            loss, s = policy_loss(logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high, ref_logp,
                                  cfg.kl_beta)
            loss.backward()
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
                                                  foreach=False)
            self.optimizer.step()
            stats.update(s)
            stats["loss"], stats["grad_norm"] = loss.item(), float(norm)
        with torch.no_grad():  # how far the policy moved on these tokens (k3 of new vs sampling policy)
            new_logp, _ = completion_logprobs(model, seqs, prompt_lens, cfg.temperature, pad)
            log_r = old_logp - new_logp
            stats["kl_to_old"] = (((torch.exp(log_r) - log_r - 1) * mask).sum() / mask.sum().clamp(min=1)).item()
        self.llm.engine.reset_prefix_cache()  # cached K/V came from the old weights
        return stats

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        groups, record = self.collect()
        record.update(self._update(groups) if groups else {"skipped": True})
        self.step += 1
        dt = time.perf_counter() - t0
        record = {"step": self.step, **record, "seconds": dt}
        record["tokens_per_s"] = sum(len(c) for g in groups for c in g.completion_ids) / dt if dt > 0 else 0.0
        return record

    # ------------------------------------------------------------------ evaluation and loop
    def evaluate(self) -> dict[str, Any]:
        from openr2.train.evaluate import task_accuracy

        cfg = self.config
        record: dict[str, Any] = {"step": self.step}
        for it in parse_mixture(cfg.eval_tasks or cfg.task):
            name = f"{it.task}:{it.difficulty}"
            greedy = task_accuracy(self.model, self.tokenizer, it.task, it.difficulty, cfg.eval_samples,
                                   seed=cfg.seed + 1, max_tokens=cfg.max_tokens, llm=self.llm)
            entry: dict[str, Any] = {"greedy": greedy.accuracy, "n": greedy.total}
            if cfg.eval_k:
                problems = held_out_problems(it.task, it.difficulty, cfg.eval_samples, seed=cfg.seed + 1)
                entry.update(sampled_metrics(self.llm, problems, cfg.eval_k, cfg.temperature, cfg.max_tokens,
                                             seed=cfg.seed + 2))
            record[name] = entry
        with open(os.path.join(cfg.out_dir, EVAL_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return record

    # ------------------------------------------------------------------ the loop's hooks (loop.py)
    desc = "grpo"
    evaluate_first = True  # the starting policy's scores, the baseline of every curve

    def progress(self, record: dict) -> dict[str, str]:
        return {"reward": f"{record['reward_mean']:.3f}", "acc": f"{record.get('accuracy', 0):.3f}"}


def run(cfg: GRPOConfig) -> dict[str, Any]:
    """`openr2 rl`: load the starting checkpoint (or resume), train, plot; returns a summary."""
    from openr2.checkpoints import load_model
    from openr2.tokenizer import Tokenizer
    from openr2.train.checkpoint import resolve_checkpoint
    from openr2.train.plots import plot_rl

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = resolve_checkpoint(cfg.resume) if cfg.resume else cfg.model
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: no such checkpoint directory")
    tokenizer = Tokenizer.from_pretrained(source)
    model = load_model(cfg.model if not cfg.resume else source)
    judge_model = None
    if "judge" in R.parse_reward_spec(cfg.rewards) and cfg.judge != "policy":
        judge_model = copy.deepcopy(model).eval() if cfg.judge == "frozen" else load_model(cfg.judge)
    start = time.time()
    trainer = GRPOTrainer(model, tokenizer, cfg, judge_model)
    trainer.train()
    plots = plot_rl(cfg.out_dir)
    summary = {"steps": trainer.step, "wall_time_s": round(time.time() - start, 1), "plots": plots,
               "interrupted": trainer.interrupted}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary
