"""Run by tests/train/test_distributed.py under torchrun (or plainly): a short tiny-MoE run whose losses,
grad norms and final weights rank 0 writes to OUT/result.pt."""

import os
import sys

import torch

from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.train import distributed
from openr2.train.config import TrainConfig
from openr2.train.data import IGNORE_INDEX
from openr2.train.trainer import Trainer

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


def main(out_dir: str, strategy: str) -> None:
    torch.set_num_threads(1)
    dist = distributed.init()
    cfg = TrainConfig(mode="sft", steps=10, batch_size=B, seq_len=T, lr=1e-2, warmup_steps=2, grad_accum=2,
                      out_dir=out_dir, distributed=strategy, log_every=1)
    trainer = Trainer(build_model(tiny_v3(), seed=0), Batches(), cfg)
    history = trainer.train()
    model = trainer.full_model()
    if dist.is_main:
        torch.save({"loss": [r["loss"] for r in history], "mtp_loss": [r["mtp_loss"] for r in history],
                    "grad_norm": [r["grad_norm"] for r in history], "tokens": [r["tokens"] for r in history],
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   os.path.join(out_dir, "result.pt"))
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
