"""One training loop for pretraining and SFT: step, accumulate, log, evaluate, checkpoint; one or N processes.

`TrainConfig` holds every option (from keyword arguments, a dict, or a JSON/TOML file); unknown keys and
impossible values raise ValueError naming the key before any work. `Trainer(model, dataset, config,
tokenizer).train()` runs `config.steps` optimizer steps:

- loss = CE(main logits) + sum of MoE.aux_loss (sequence-wise balance loss, weight aux_loss_alpha, when the
  MoE layers provide it) + mtp_lambda * mean_k CE(depth-k drafts) when the model has MTP layers;
  pretrain batches are [B, T+1] windows (inputs [:, :-1], targets [:, 1:]), SFT batches (input_ids,
  labels) with -100 on ignored positions. With grad_accum > 1 each micro-batch's mean loss is divided by
  grad_accum (so micro-batches weigh equally, whatever their count of target tokens).
- AdamW; weight decay on tensors of 2+ dimensions (matrices, embeddings, stacked experts, router weight),
  none on 1-D tensors (norm gains, biases). The noaux_tc correction bias is a buffer, never in the optimizer.
- LR: linear warmup from lr/warmup_steps to lr over warmup_steps, then cosine to lr * min_lr_ratio.
- gradient clipping to grad_clip (0: off; the norm is still measured and logged).
- after each optimizer step, auxiliary-loss-free balancing `update_correction_bias(model, balance_gamma)`.
- a JSONL line per logged step (out_dir/log.jsonl): step, loss, (mtp_loss, aux_loss), lr, tokens_per_s,
  grad_norm, expert load max/mean per MoE layer; a tqdm progress bar.
- checkpoints (checkpoint.py) every save_every steps and at the end; Ctrl-C (SIGINT) finishes the current
  step, saves and returns cleanly (the loop around the steps is loop.py's, shared with GRPO). `resume` restores model, optimizer, step, data position and RNG states,
  so a resumed run reproduces an uninterrupted one bitwise on CPU.
- under torchrun (distributed.py): DDP or FSDP2, each rank trains on its rows of the global batch with
  losses normalised by the global token count (N processes == one process on the whole batch); rank 0
  logs, evaluates and saves; checkpoints hold whole tensors and name-keyed optimizer state, so a run can
  resume under a different parallelism.
- with expert_parallel N (expert_parallel.py) each rank holds 1/N of the routed experts, tokens travel to
  them by all-to-all, the rest stays DDP; the grad norm sums the ranks' expert parts, checkpoints gather the
  experts (the single-process format) and resume slices them; records carry all_to_all_bytes and
  ep_rows_max_over_mean; with redundant_experts R, EPLB (eplb.py) re-places R replicas of hot experts every
  rebalance_every steps (the same math).
Float32 on CPU; bf16 autocast on CUDA.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from openr2.model.moe import MoE, update_correction_bias
from openr2.train import distributed as dist_utils
from openr2.train import expert_parallel
from openr2.train.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from openr2.train.config import TrainConfig
from openr2.train.data import IGNORE_INDEX
from openr2.train.loop import EVAL_FILE, TrainingLoop, truncate_logs


def lr_at(config: TrainConfig, step: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on 2+-D parameters, none on 1-D ones (norm gains, biases); tied weights once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _moe_modules(model: torch.nn.Module) -> list[MoE]:
    """The MoE layers whose expert load is counted (all-reduced under data parallelism): V3's, and V4's
    (moe_v4.V4MoE, which has no sequence-wise aux loss)."""
    return [m for m in model.modules() if isinstance(m, MoE) or getattr(m, "counts_expert_load", False)]


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class Trainer(TrainingLoop):
    """The loop. Under torchrun every rank builds the same Trainer; rank 0 alone logs, evaluates and saves.

    `evaluator(model, step) -> dict` (optional) runs on rank 0 every eval_every steps and at the end, on
    the whole (unsharded) model; its record goes to out_dir/eval.jsonl. `on_step(step, record)` is called
    after each step (tests use it).
    """

    # every trainable parameter has optimizer state in a checkpoint; train/dsa.py's warm-up trains only some
    strict_optimizer_state = True

    def __init__(self, model: torch.nn.Module, dataset: Any, config: TrainConfig, tokenizer: Any = None,
                 on_step: Callable[[int, dict], None] | None = None,
                 evaluator: Callable[[torch.nn.Module, int], dict] | None = None):
        self.model, self.dataset, self.config, self.tokenizer = model, dataset, config, tokenizer
        self.on_step, self.evaluator = on_step, evaluator
        for key in ("batch_size", "seq_len"):
            have = getattr(dataset, key, None)
            if key == "seq_len" and config.mode == "sft":
                continue
            if have is not None and have != getattr(config, key):
                raise ValueError(f"train config: {key}={getattr(config, key)} but the dataset has {key}={have}")
        self.dist = dist_utils.current()
        if config.batch_size % self.dist.world_size:
            raise ValueError(f"train config: batch_size={config.batch_size} is not divisible by the "
                             f"{self.dist.world_size} processes")
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.moe = _moe_modules(model)
        for m in self.moe:  # the sequence-wise aux loss weight comes from the training config
            m.aux_loss_alpha = config.aux_loss_alpha
        self.has_mtp = config.mtp_lambda > 0 and len(getattr(model, "mtp", ())) > 0
        self._parallelize(model, config)
        self._plain_copy: torch.nn.Module | None = None
        self.step = 0
        self.interrupted = False
        self.history: list[dict] = []
        self.evals: list[dict] = []  # this call's evaluation records (rank 0)
        if config.resume:
            self._resume(config.resume)

    def _parallelize(self, model: torch.nn.Module, config: TrainConfig) -> None:
        """Set ep (expert_parallel.py, None without), module (what the step calls), sharded and optimizer
        (pipeline_trainer.py has its own)."""
        self.ep = expert_parallel.apply(model, config.expert_parallel, self.dist, None, config.redundant_experts,
                                        config.rebalance_every)  # None without EP
        self.module = dist_utils.wrap(model, config.distributed, self.dist,
                                      self.ep.expert_names if self.ep else ())  # what the step calls
        self.sharded = dist_utils.is_sharded(model)
        self.optimizer = self._adamw(model)

    def _adamw(self, params: torch.nn.Module) -> torch.optim.AdamW:
        cfg = self.config
        return torch.optim.AdamW(param_groups(params, cfg.weight_decay), lr=lr_at(cfg, 0), betas=cfg.betas,
                                 weight_decay=cfg.weight_decay, foreach=False)

    def _own_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a whole (single-process format) model state this rank holds: with expert
        parallelism its slice of the experts."""
        return self.ep.local_state_dict(state) if self.ep else state

    def _own_optimizer_state(self, state: dict) -> dict:
        """The part of a whole (single-process format) optimizer state this rank's optimizer holds."""
        return self.ep.local_optimizer_state(state) if self.ep else state

    # ------------------------------------------------------------------ state dicts (any parallelism)
    def _optimizer_state(self) -> dict:
        """Parameter-name keyed, whole (unsharded) optimizer state: the same file whatever the parallelism."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # cpu_offload leaves the other ranks empty: expert parallelism gathers its moments on every rank
        state = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=self.sharded and not self.ep))
        return self.ep.full_optimizer_state(state) if self.ep else state

    def full_model(self) -> torch.nn.Module:
        """The model with whole tensors, for saving and evaluation: the model itself unless FSDP sharded it
        (then a plain copy on rank 0, filled from the gathered state; every rank must call this); the same
        under expert parallelism, whose ranks hold a part of the experts each."""
        if not self.sharded and not self.ep:
            return self.model
        from openr2.model.transformer import build_model

        state = self.full_state_dict()
        if not self.dist.is_main:
            return self.model
        if self._plain_copy is None:
            self._plain_copy = build_model(self.model.config, dtype=self.model.dtype, seed=None)
        self._plain_copy.load_state_dict(state)
        return self._plain_copy

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with whole tensors, in the single-process format (collective)."""
        if self.ep:
            return self.ep.full_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=self.sharded))

    # ------------------------------------------------------------------ resume / save
    def _resume(self, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = load_checkpoint(path, dtype=self.model.dtype, device="cpu")
        loaded = state["model"].state_dict()
        missing = [k for k in self.model.state_dict() if k not in loaded]
        if missing:
            raise ValueError(f"{state['path']}: checkpoint lacks {missing[:3]} of this model")
        loaded = self._own_model_state(loaded)
        state["optimizer"] = self._own_optimizer_state(state["optimizer"])
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, loaded, options=options)
        try:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True,
                                                              strict=self.strict_optimizer_state))
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{state['path']}: optimizer state does not fit this model: {e}") from e
        self.step = int(state["step"])
        if state["data"] is not None and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["data"])
        set_rng_states(state["rng"])
        if self.dist.is_main:
            truncate_logs(self.config.out_dir, self.step)
        dist_utils.barrier(self.dist)

    def save(self) -> str | None:
        """Checkpoint (collective under data parallelism: every rank calls it; rank 0 writes)."""
        model, optimizer_state = self.full_model(), self._optimizer_state()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.config.out_dir, model, self.tokenizer, optimizer_state, None, self.step,
                                   self.dataset.state_dict() if hasattr(self.dataset, "state_dict") else None,
                                   rng_states(), self.config.to_dict(), keep_last=self.config.keep_last)
        dist_utils.barrier(self.dist)
        return path

    def evaluate(self) -> dict | None:
        """Run the evaluator on rank 0 (collective: every rank calls it); append to eval.jsonl."""
        if self.evaluator is None:
            return None
        model = self.full_model()
        record = None
        if self.dist.is_main:
            record = {"step": self.step, **self.evaluator(model, self.step)}
            self.evals.append(record)
            with open(os.path.join(self.config.out_dir, EVAL_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        dist_utils.barrier(self.dist)
        return record

    # ------------------------------------------------------------------ one step
    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) rows of the global batch."""
        device = self.model.device
        if self.config.mode == "pretrain":
            if not isinstance(batch, torch.Tensor):
                raise ValueError("mode=pretrain expects [B, T+1] token tensors; got "
                                 f"{type(batch).__name__} (use mode=sft for (input_ids, labels) batches)")
            batch = dist_utils.shard_rows(batch, self.dist).to(device)
            return batch[:, :-1], batch[:, 1:]
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("mode=sft expects (input_ids, labels) batches")
        return (dist_utils.shard_rows(batch[0], self.dist).to(device),
                dist_utils.shard_rows(batch[1], self.dist).to(device))

    def _global_count(self, targets: torch.Tensor) -> torch.Tensor:
        return dist_utils.all_reduce_sum((targets != IGNORE_INDEX).sum().float(), self.dist)

    def _micro_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch loss to backpropagate and its parts (token sums and global counts, to log).

        Token losses are sums over this rank's tokens divided by the global token count, times the world
        size because DDP and FSDP average gradients over ranks: N ranks then produce exactly the gradient
        of the global token mean. The sequence-wise aux loss is a per-rank mean over equal row counts, so
        the ranks' average is already the global mean.
        """
        W = self.dist.world_size
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.model.device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        parts: dict[str, torch.Tensor] = {}
        with autocast:
            # the training expert path: grouped with its hand-written backward (model/moe.py)
            if self.has_mtp:
                logits, drafts = self.module(inputs, with_mtp=True, moe_impl="fused")
            else:
                logits, drafts = self.module(inputs, moe_impl="fused"), []
            count = self._global_count(targets)
            ce_sum = _ce_sum(logits, targets)
            loss = ce_sum * (W / count.clamp(min=1))
            parts["loss"] = (ce_sum.detach(), count)
            if drafts:
                mtp_terms, mtp_logged = [], []
                for k, d in enumerate(drafts, start=1):
                    n = self._global_count(targets[:, k:]).clamp(min=1)
                    term = _ce_sum(d, targets[:, k:])
                    mtp_terms.append(term / n)
                    mtp_logged.append(term.detach() / n)
                loss = loss + self.config.mtp_lambda * W * torch.stack(mtp_terms).mean()
                parts["mtp_loss"] = (torch.stack(mtp_logged).mean(), torch.tensor(1.0))
            aux = [m.aux_loss for m in self.moe if getattr(m, "aux_loss", None) is not None]
            if aux:
                aux_sum = torch.stack([a.float() for a in aux]).sum()
                loss = loss + aux_sum
                parts["aux_loss"] = (aux_sum.detach() / W, torch.tensor(1.0))
        return loss, parts

    def train_step(self) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        self.module.train()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        tokens = 0
        for _ in range(cfg.grad_accum):
            inputs, targets = self._split(next(self.dataset))
            loss, parts = self._micro_loss(inputs, targets)
            (loss / cfg.grad_accum).backward()
            for k, (value, count) in parts.items():
                if k != "loss":  # mtp and aux parts are already means on this rank; summed over ranks here
                    value = dist_utils.all_reduce_sum(value.clone(), self.dist) / count
                else:
                    value = dist_utils.all_reduce_sum(value.clone(), self.dist) / count.clamp(min=1)
                    tokens += int(count.item())
                sums[k] = sums.get(k, 0.0) + value.item() / cfg.grad_accum
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if self.ep:  # each rank holds a part of the experts' gradients
            grad_norm = self.ep.clip_grad_norm_(params, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor norm
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        loads = self._balance()
        self.step += 1
        dt = time.perf_counter() - t0
        record = {"step": self.step, **sums, "lr": lr, "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                  "grad_norm": float(grad_norm), "tokens": tokens}
        if loads:
            record["expert_load"] = loads
        if self.ep:  # this rank's, forward and backward (the backward sends what the forward sent)
            record["all_to_all_bytes"] = 2 * self.ep.take_sent_bytes()
            record.update(self.ep.after_step(self.optimizer, self.step))  # rows per rank; EPLB rebalances
        return record

    def lr_at(self, step: int) -> float:
        """The LR of optimizer step `step` (a subclass with stages has its own schedule)."""
        return lr_at(self.config, step)

    def _balance(self) -> list[dict]:
        """Correction-bias update from the step's expert loads (summed over ranks, so every rank applies the
        same update); max/mean load per MoE layer."""
        for m in self.moe:
            dist_utils.all_reduce_sum(m.expert_load, self.dist)
        return update_correction_bias(self.model, self.config.balance_gamma)

    # ------------------------------------------------------------------ the loop's hooks (loop.py)
    @property
    def desc(self) -> str:
        return self.config.mode

    @property
    def log_every(self) -> int:
        return self.config.log_every

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def barrier(self) -> None:
        dist_utils.barrier(self.dist)

    def stop_requested(self) -> bool:
        """Stop together: any rank's Ctrl-C stops all of them after the same step."""
        if not self.dist.enabled:
            return self.interrupted
        flag = dist_utils.all_reduce_sum(torch.tensor(float(self.interrupted)), self.dist)
        self.interrupted = bool(flag.item() > 0)
        return self.interrupted

    def progress(self, record: dict) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}

    def report_eval(self, bar, record: dict | None) -> None:
        if record is None:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                        if not isinstance(v, (dict, list)))
        (bar.write if bar is not None else print)(f"eval {text}")
