"""DeepSeek-V4 training with its CSA indexers learning: trainer.py's loop, the loss the language-model loss plus
the indexers' KL (train/csa_loss.py), which trains the indexers alone (their inputs detached) while the LM loss
trains the rest (the indexer's selection is discrete: no LM gradient reaches it). Hash routing stays frozen
(its table is a buffer), hyper-connections and the MTP module train as any other parameter.

`openr2 train` picks it for every V4 model with a CSA layer (train/run.py); the `v4-demo` recipe trains one.
"""

from __future__ import annotations

from typing import Any

import torch

from openr2.train.config import TrainConfig
from openr2.train.csa_loss import csa_indexer_loss, csa_layers, recorded_csa_inputs
from openr2.train.trainer import Trainer


class CSATrainer(Trainer):
    """trainer.py's loop plus the CSA indexers' KL (module docstring)."""

    def __init__(self, model: torch.nn.Module, dataset: Any, config: TrainConfig, *args, **kwargs):
        if not csa_layers(model):
            raise ValueError("CSA training needs a DeepSeek-V4 model with compressed sparse attention layers")
        super().__init__(model, dataset, config, *args, **kwargs)
        if self.dist.enabled:  # the KL is backpropagated outside the data-parallel wrapper's forward
            raise ValueError("train: DeepSeek-V4 models with CSA indexers train in one process for now "
                             "(not under torchrun)")

    def _micro_loss(self, inputs: torch.Tensor, targets: torch.Tensor):
        with recorded_csa_inputs(self.model) as records:
            loss, parts = super()._micro_loss(inputs, targets)
        kl = csa_indexer_loss(records)
        parts["indexer_kl"] = (kl.detach(), torch.tensor(1.0))
        return loss + kl, parts

    def progress(self, record: dict) -> dict[str, str]:
        return {**super().progress(record), "kl": f"{record['indexer_kl']:.4f}"}
