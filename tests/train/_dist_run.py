"""Run by tests/train/test_distributed.py under torchrun (or plainly): a short tiny-MoE run whose losses,
grad norms and final weights rank 0 writes to OUT/result.pt. The model and every step of the computation
are float64 (see test_distributed.py for why)."""

import contextlib
import os
import sys

import torch

from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.train import distributed
from openr2.train.config import TrainConfig
from openr2.train.data import IGNORE_INDEX
from openr2.train.trainer import Trainer
from tests.numerics import float64_compute

B, T = 8, 16


class Batches:
    """Deterministic SFT batches with uneven label masks (ranks get different target-token counts)."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        g = torch.Generator().manual_seed(self.i)
        ids = torch.randint(3, 60, (B, T), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, -1] = IGNORE_INDEX
        for r in range(B):
            labels[r, : (r * 3 + self.i) % (T // 2)] = IGNORE_INDEX
        return ids, labels

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def main(out_dir: str, strategy: str, dtype: str = "float64", resume: str = "") -> None:
    """strategy "ddp", "fsdp", "ep" (DDP with the experts split over the processes), "epN" (over N of them),
    "fsdp-ep" (EP with FSDP2) or "eplb" (ep with 2 redundant expert slots per layer, re-placed every 3 steps):
    10 steps, saved at step 5 and at the end; resumed from the checkpoint directory `resume` when given."""
    torch.set_num_threads(1)
    dist = distributed.init()
    # "ep"/"eplb": the experts over all processes, "epN": over N of them (world/N replicas)
    ep = strategy.startswith("ep") or strategy == "fsdp-ep"
    redundant = 2 if strategy == "eplb" else 0
    n = int(strategy[2:]) if strategy.startswith("ep") and strategy[2:].isdigit() else dist.world_size
    strategy = "fsdp" if strategy == "fsdp-ep" else strategy
    cfg = TrainConfig(mode="sft", steps=10, batch_size=B, seq_len=T, lr=1e-2, warmup_steps=2,
                      grad_accum=2, out_dir=out_dir, distributed="ddp" if strategy.startswith("ep") else strategy,
                      log_every=1, expert_parallel=n if ep else 1, save_every=5, resume=resume or None,
                      redundant_experts=redundant, rebalance_every=3)
    # .to(float64) casts the router too (build_model's dtype= keeps it float32); float64_compute() lifts the
    # steps that cast to float32 whatever the model's dtype (RMSNorm, router, the trainer's cross-entropy).
    # "float32" (a third argument) runs the test's old setting, for comparison.
    model = build_model(tiny_v3(), seed=0).to(getattr(torch, dtype))
    with float64_compute() if dtype == "float64" else contextlib.nullcontext():
        trainer = Trainer(model, Batches(), cfg)
        history = trainer.train()
    state = trainer.full_state_dict()  # the whole weights as they are
    replicas = trainer.ep.replicas_agree() if trainer.ep else True
    if dist.is_main:
        torch.save({"loss": [r["loss"] for r in history], "mtp_loss": [r["mtp_loss"] for r in history],
                    "grad_norm": [r["grad_norm"] for r in history], "tokens": [r["tokens"] for r in history],
                    "lr": [r["lr"] for r in history], "step": [r["step"] for r in history],
                    "all_to_all_bytes": [r.get("all_to_all_bytes", 0) for r in history],
                    "ep_rows_max_over_mean": [r.get("ep_rows_max_over_mean") for r in history],
                    "ep_rebalanced": [r.get("ep_rebalanced", False) for r in history], "replicas_agree": replicas,
                    "state": {k: v.detach().clone() for k, v in state.items()}},
                   os.path.join(out_dir, "result.pt"))
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(*sys.argv[1:])
