"""Run by tests/train/test_pipeline.py under torchrun (or plainly): _dist_run.py's short tiny-MoE run (float64,
the same batches, 6 steps saved at 3 and 6) once per job, in one launch (the start of torchrun and of the
imports is most of a run's time on 2 cores).

    _pp_run.py OUT NAME=LAYOUT[@CHECKPOINT] ...

LAYOUT: "single" (one process), or "SCHEDULE[:EP[:fsdp]]": pipeline_parallel 2 with that pp_schedule, the
experts split over EP data-parallel ranks of each stage (4 processes for EP 2), FSDP2 over those ranks; @CHECKPOINT resumes from it. Rank 0
writes each job's per-step records and whole weights to OUT/NAME/result.pt."""

import os
import sys

import torch

from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.train import distributed
from openr2.train.config import TrainConfig
from openr2.train.pipeline_trainer import PipelineTrainer
from openr2.train.trainer import Trainer
from tests.numerics import float64_compute
from tests.train._dist_run import B, Batches, T

STEPS, SAVE_EVERY, MICROBATCHES = 6, 3, 4
KEYS = ("loss", "mtp_loss", "aux_loss", "grad_norm", "tokens", "lr", "step", "expert_load", "all_to_all_bytes")


def run(out_dir: str, layout: str, resume: str | None) -> dict:
    pp, schedule, ep, strategy = 1, "1f1b", 1, "ddp"
    if layout != "single":
        schedule, *rest = layout.split(":")
        pp, ep = 2, int(rest[0]) if rest else 1
        strategy = rest[1] if len(rest) > 1 else "ddp"
    cfg = TrainConfig(mode="sft", steps=STEPS, batch_size=B, seq_len=T, lr=1e-2, warmup_steps=2, grad_accum=2,
                      out_dir=out_dir, log_every=1, save_every=SAVE_EVERY, resume=resume, pipeline_parallel=pp,
                      pp_schedule=schedule, microbatches=MICROBATCHES, expert_parallel=ep,
                      distributed=strategy)
    # float64 from end to end, as _dist_run.py (see test_distributed.py for why)
    model = build_model(tiny_v3(), seed=0).to(torch.float64)
    with float64_compute():
        trainer = (PipelineTrainer if pp > 1 else Trainer)(model, Batches(), cfg)
        history = trainer.train()
    state = trainer.full_state_dict()
    return {**{k: [r.get(k, 0) for r in history] for k in KEYS},
            "state": {k: v.detach().clone() for k, v in state.items()}}


def main(out: str, *jobs: str) -> None:
    torch.set_num_threads(1)
    dist = distributed.init()
    for job in jobs:
        name, spec = job.split("=", 1)
        layout, _, resume = spec.partition("@")
        result = run(os.path.join(out, name), layout, resume or None)
        if dist.is_main:
            torch.save(result, os.path.join(out, name, "result.pt"))
        distributed.barrier(dist)
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(*sys.argv[1:])
