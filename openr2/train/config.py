"""The options of the two training commands, as validated dataclasses: `TrainConfig` (`openr2 train`,
trainer.py and run.py) and `GRPOConfig` (`openr2 rl`, grpo.py). Each field is a command-line flag and a key
of a JSON/TOML config file; an unknown key or an impossible value raises ValueError naming it before any
work. Torch-free, so building the command line stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

MODES = ("pretrain", "sft")
STRATEGIES = ("ddp", "fsdp")  # data parallelism under torchrun (distributed.py)
PP_SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipev")  # torch.distributed.pipelining's (pipeline.py)


class _Options:
    """What both configs share: construction from a mapping (an unknown key is named), to_dict, and the
    type checks that follow the field annotations (int, float, bool)."""

    LABEL = "config"

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise ValueError(f"{cls.LABEL}: expected a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ValueError(f"{cls.LABEL}: unknown key {key!r}; expected one of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def _bad(self, key: str, why: str) -> ValueError:
        return ValueError(f"{self.LABEL}: {key}={getattr(self, key)!r}: {why}")

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise self._bad(f.name, "must be an integer")
            if f.type == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise self._bad(f.name, "must be a finite number")
                setattr(self, f.name, float(v))
            if f.type == "bool" and not isinstance(v, bool):
                raise self._bad(f.name, "must be true or false")


@dataclass
class TrainConfig(_Options):
    mode: str = "pretrain"
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 64
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    balance_gamma: float = 1e-3
    aux_loss_alpha: float = 1e-4  # 0 = off
    mtp_lambda: float = 0.3
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    out_dir: str = "runs/train"
    resume: str | None = None  # a run directory (follows `latest`) or a step directory
    deterministic: bool = True
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    expert_parallel: int = 1  # under torchrun: routed experts split over this many ranks (expert_parallel.py)
    # under torchrun: the layers split into pipeline stages over this many ranks (pipeline.py, mesh.py)
    pipeline_parallel: int = 1
    pp_schedule: str = "1f1b"  # 1f1b | interleaved | zbv | dualpipev (the last three: two stages per rank)
    microbatches: int = 0  # per batch and data-parallel rank through the pipeline (0: as many as stages)
    redundant_experts: int = 0  # with expert_parallel: replica slots per MoE layer for hot experts (eplb.py)
    rebalance_every: int = 10  # with redundant_experts: steps between placements from the measured loads
    eval_every: int = 0  # 0: evaluate at the end only (when an evaluator is given)
    # What to train and on what (read by run.py, the `openr2 train` command; the loop ignores them).
    model: str = "small-moe"  # a preset name or a directory/config.json (fresh weights)
    init_from: str | None = None  # a checkpoint to start from instead (e.g. SFT after pretraining)
    tokenizer: str | None = None  # a tokenizer directory; default: init_from's, else one trained on the data
    vocab_size: int = 512  # of a tokenizer trained here
    data: list[str] = dataclasses.field(default_factory=list)  # .txt / .jsonl (text, messages, GSM8K) files
    tasks: str | None = None  # synthetic task mixture, e.g. "addition:1-5:3,countdown:2-4"
    num_examples: int = 50_000  # synthetic problems drawn from `tasks`
    chat_variety: float = 0.0  # share of them asked as people ask: other wordings, system prompts, earlier turns
    eval_tasks: str | None = None  # task accuracy by greedy generation, e.g. "addition:3,subtraction:3"
    eval_samples: int = 100  # held-out problems per task and difficulty at each evaluation
    final_eval_samples: int = 0  # at the end (0: eval_samples)
    eval_max_tokens: int = 512
    eval_wordings: str | None = None  # e.g. "addition:3": also asked in held-out wordings, after a system prompt, 2nd turn
    device: str = "auto"  # auto: cuda when available
    threads: int = 0  # torch threads on CPU (0: torch's default)
    # DeepSeek Sparse Attention (train/dsa.py): "dsa" turns the model into a V3.2 one (an indexer per layer,
    # keeping index_topk keys per query), trains the indexer alone for indexer_warmup_steps (dense attention,
    # lr indexer_lr), then everything sparsely for the remaining steps
    sparse_attention: str | None = None
    index_topk: int = 0
    index_n_heads: int = 16
    index_head_dim: int = 32
    indexer_warmup_steps: int = 0
    indexer_lr: float = 1e-3

    def __post_init__(self) -> None:
        self.validate()

    LABEL = "train config"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """JSON (.json) or TOML (.toml) file; `overrides` (e.g. command-line flags) win."""
        values = read_config_file(path)
        try:
            return cls.from_dict({**values, **overrides})
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        bad = self._bad
        self._check_types()
        if self.mode not in MODES:
            raise bad("mode", f"expected one of {MODES}")
        for k in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_last", "num_examples",
                  "eval_samples", "eval_max_tokens"):
            if getattr(self, k) < 1:
                raise bad(k, "must be at least 1")
        for k in ("warmup_steps", "save_every", "eval_every", "final_eval_samples", "threads", "weight_decay",
                  "grad_clip", "balance_gamma", "aux_loss_alpha", "mtp_lambda"):
            if getattr(self, k) < 0:
                raise bad(k, "must be non-negative")
        if self.lr <= 0:
            raise bad("lr", "must be positive")
        if not 0 <= self.chat_variety <= 1:
            raise bad("chat_variety", "must be in [0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or \
                not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise bad("betas", "expected two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        if not isinstance(self.out_dir, (str, os.PathLike)) or not os.fspath(self.out_dir):
            raise bad("out_dir", "must be a non-empty path")
        self.out_dir = os.fspath(self.out_dir)
        if self.resume is not None and not isinstance(self.resume, (str, os.PathLike)):
            raise bad("resume", "must be a path or null")
        if self.distributed not in STRATEGIES:
            raise bad("distributed", f"expected one of {STRATEGIES}")
        if self.expert_parallel < 1:
            raise bad("expert_parallel", "must be at least 1")
        self._validate_pipeline()
        self._validate_redundant_experts()
        for k in ("model", "init_from", "tokenizer", "tasks", "eval_tasks", "device"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, str) and v):
                raise bad(k, "must be a non-empty string" + ("" if k in ("model", "device") else " or null"))
        if isinstance(self.data, str):
            self.data = [self.data]
        if not isinstance(self.data, list) or not all(isinstance(d, str) and d for d in self.data):
            raise bad("data", "expected a list of file paths")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise bad("device", "expected auto, cpu or cuda[:N]")
        self._validate_sparse_attention()

    def _validate_pipeline(self) -> None:
        bad = self._bad
        if self.pipeline_parallel < 1:
            raise bad("pipeline_parallel", "must be at least 1")
        if self.pp_schedule not in PP_SCHEDULES:
            raise bad("pp_schedule", f"expected one of {PP_SCHEDULES}")
        if self.microbatches < 0:
            raise bad("microbatches", "must be 0 (as many as stages) or more")
        if self.pipeline_parallel > 1 and self.distributed == "fsdp" and self.pp_schedule in ("zbv", "dualpipev"):
            raise bad("pp_schedule", f"{self.pp_schedule} with distributed=fsdp is not supported yet (its split "
                                     "backward gave wrong gradients / hung under FSDP2 here): use 1f1b or "
                                     "interleaved with fsdp, or distributed=ddp")

    def _validate_redundant_experts(self) -> None:
        bad = self._bad
        if self.redundant_experts < 0 or self.rebalance_every < 0:
            raise bad("redundant_experts" if self.redundant_experts < 0 else "rebalance_every", "must be >= 0")
        if not self.redundant_experts:
            return
        if self.expert_parallel == 1:
            raise bad("redundant_experts", "replicas of hot experts need expert parallelism (expert_parallel > 1)")
        if self.distributed == "fsdp":
            raise bad("redundant_experts", "redundant experts (--redundant-experts) with --distributed fsdp are "
                                           "not supported yet (use --distributed ddp)")
        if self.pipeline_parallel > 1:
            raise bad("redundant_experts", "redundant experts (--redundant-experts) with pipeline parallelism "
                                           "(--pipeline-parallel > 1) are not supported yet")

    def _validate_sparse_attention(self) -> None:
        bad = self._bad
        if self.sparse_attention not in (None, "dsa"):
            raise bad("sparse_attention", "expected dsa (DeepSeek Sparse Attention) or null")
        if self.sparse_attention is None:
            return
        for k in ("index_topk", "index_n_heads", "index_head_dim"):
            if getattr(self, k) < 1:
                raise bad(k, "must be at least 1 with sparse_attention=dsa")
        if self.indexer_warmup_steps < 0:
            raise bad("indexer_warmup_steps", "must be non-negative")
        if self.indexer_warmup_steps > self.steps:
            raise bad("indexer_warmup_steps", f"must be at most steps ({self.steps})")
        if self.indexer_lr <= 0:
            raise bad("indexer_lr", "must be positive")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw options of a JSON or TOML config file (validated by TrainConfig.from_dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                values = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{path}: cannot parse config: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of options at the top level")
    return values


@dataclass
class GRPOConfig(_Options):
    model: str = ""  # the starting checkpoint (an SFT model)
    task: str = "addition:4"  # prompts: a task mixture (train split), e.g. "addition:4-5,countdown:3"
    rewards: str = "verifiable:1,format:0.1"  # label-free: "majority:1,format:0.1"; also judge:W
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ppo_epochs: int = 1  # passes over each step's rollouts (ratio and clipping matter from the second)
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO's clip-higher
    kl_beta: float = 0.0
    scale_rewards: bool = False  # divide advantages by the group std (off: Dr. GRPO)
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 4
    mask_truncated: bool = True
    majority_min_share: float = 0.0  # a group's top answer needs this share of its votes to be a pseudo-label
    judge: str = "policy"  # who judges with judge rewards: the policy, a frozen copy, or a checkpoint path
    judge_samples: int = 4
    judge_max_tokens: int = 128
    eval_every: int = 20  # 0: only at the start and the end
    eval_tasks: str | None = None  # default: the training task mixture
    eval_samples: int = 200  # held-out problems per task and difficulty
    eval_k: int = 8  # samples per problem for pass@1 / maj@k / pass@k (0: greedy only)
    seed: int = 0
    save_every: int = 0
    keep_last: int = 2
    out_dir: str = "runs/rl"
    resume: str | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        self.validate()

    LABEL = "rl config"

    def validate(self) -> None:
        bad = self._bad
        self._check_types()
        for k in ("steps", "prompts_per_step", "group_size", "max_tokens", "ppo_epochs", "max_sampling_rounds",
                  "judge_samples", "judge_max_tokens", "eval_samples", "keep_last"):
            if getattr(self, k) < 1:
                raise bad(k, "must be at least 1")
        for k in ("warmup_steps", "weight_decay", "grad_clip", "clip_low", "clip_high", "kl_beta", "eval_every",
                  "eval_k", "save_every", "threads", "temperature"):
            if getattr(self, k) < 0:
                raise bad(k, "must be non-negative")
        if self.group_size < 2:
            raise bad("group_size", "must be at least 2 (advantages are relative to the group)")
        if self.temperature == 0:
            raise bad("temperature", "must be positive: a group of greedy samples is one sample repeated")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.majority_min_share <= 1:
            raise bad("majority_min_share", "must be in [0, 1]")
        if self.lr <= 0:
            raise bad("lr", "must be positive")
        if self.clip_low >= 1:
            raise bad("clip_low", "must be below 1")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise bad("betas", "expected two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not self.model:
            raise bad("model", "the starting checkpoint is required")
        from openr2.train.mixture import parse_mixture
        from openr2.train.rewards import parse_reward_spec

        for key in ("task", "eval_tasks"):
            if getattr(self, key) is not None:
                try:
                    parse_mixture(getattr(self, key))
                except ValueError as e:
                    raise ValueError(f"rl config: {key}: {e}") from None
        try:
            parse_reward_spec(self.rewards)
        except ValueError as e:
            raise ValueError(f"rl config: {e}") from None
