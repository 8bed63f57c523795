"""DeepSeek Sparse Attention training (DeepSeek-V3.2, arXiv 2512.02556): a V3-style model becomes a V3.2 one
(`convert_to_dsa`), then `DSATrainer` runs the paper's two stages as one run of `config.steps` steps:

1. dense warm-up, steps 0 .. indexer_warmup_steps - 1: every layer attends densely whatever the context, the
   main model is frozen (no gradient reaches it, its optimizer state stays empty, the MoE correction biases
   stay), and only the indexers train, by the KL of train/dsa_loss.py, at the constant LR `indexer_lr`;
2. sparse training, the remaining steps: attention over each indexer's top-k; loss = LM loss (which trains the
   model and never the indexer) + the KL restricted to the selected keys with the indexer's input detached
   (which trains the indexer alone); the LR schedule of trainer.py, started afresh over these steps.
The stage is a function of the step, so a run interrupted in either stage resumes exactly where it stopped
(the checkpoint holds the indexers, their optimizer state and the step; trainer.py's resume).

Owns the conversion and the stages; the loss is dsa_loss.py's, the loop trainer.py's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from openr2.config import ModelConfig
from openr2.model.mla import MLA
from openr2.model.moe import update_correction_bias
from openr2.model.transformer import Transformer, build_model
from openr2.train.config import TrainConfig
from openr2.train.dsa_loss import dense_attention, indexer_loss, recorded_attention_inputs
from openr2.train.trainer import Trainer, lr_at


def to_dsa_config(config: ModelConfig, index_topk: int, index_n_heads: int = 16,
                  index_head_dim: int = 32) -> ModelConfig:
    """The V3.2 config of a V2/V3 one: model_type deepseek_v32 and the indexer's sizes; a model without a q
    latent gets one of the hidden size (the indexer's query reads it; see `convert_to_dsa`). A V3.2 config
    keeps its indexer's sizes and takes the new index_topk."""
    if config.has_indexer:
        out = dataclasses.replace(config, index_topk=index_topk)
    else:
        out = dataclasses.replace(config, model_type="deepseek_v32", index_n_heads=index_n_heads,
                                  index_head_dim=index_head_dim, index_topk=index_topk,
                                  q_lora_rank=config.q_lora_rank or config.hidden_size)
    out.validate()
    return out


def convert_to_dsa(model: Transformer, index_topk: int, index_n_heads: int = 16, index_head_dim: int = 32,
                   seed: int = 0) -> Transformer:
    """A V3.2 model with `model`'s weights and freshly initialised indexers (normal(0, initializer_range)
    projections, a unit LayerNorm), as the model's init draws them with `seed`.

    With a q latent (q_lora_rank) the conversion is exact: at contexts <= index_topk the new model computes
    the old one's logits bit for bit. Without one (q_proj straight from the hidden state, V2-Lite and the demo)
    q_proj becomes q_b_proj over a latent of the hidden size, q_a_proj the identity and q_a_layernorm's gain
    the RMS of the layer's input-norm gain: the latent is then x * rms(g) / rms(x) instead of x, equal where
    the normalised input's RMS is that of its gain, not everywhere (the RMSNorm V3.2 puts on the latent cannot
    be undone by weights); the sparse stage trains the model on with it."""
    config = to_dsa_config(model.config, index_topk, index_n_heads, index_head_dim)
    if model.config.has_indexer:
        for m in model.modules():
            if isinstance(m, MLA):
                m.indexer.index_topk = index_topk
        model.config = config
        return model
    new = build_model(config, dtype=model.dtype, device=model.device, seed=seed)
    state = model.state_dict()
    if model.config.q_lora_rank is None:
        _factor_q_proj(model, state)
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(".indexer." in k for k in missing), missing
    return new


def _factor_q_proj(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """q_proj -> (q_a_proj = I, q_a_layernorm gain rms(input-norm gain), q_b_proj = q_proj), in `state`."""
    for name, module in model.named_modules():
        if not isinstance(module, MLA):
            continue
        prefix = name + "."
        block = name.rsplit(".", 1)[0] + "."  # the decoder layer holding this attention
        w = state.pop(prefix + "q_proj.weight")
        d = w.shape[1]
        gain = state[block + "input_layernorm.weight"].float().pow(2).mean().sqrt()
        state[prefix + "q_a_proj.weight"] = torch.eye(d, dtype=w.dtype, device=w.device)
        state[prefix + "q_a_layernorm.weight"] = torch.full((d,), float(gain), dtype=w.dtype, device=w.device)
        state[prefix + "q_b_proj.weight"] = w


def is_indexer_param(name: str) -> bool:
    return ".indexer." in name


class DSATrainer(Trainer):
    """trainer.py's loop with the two stages (module docstring); the model must have indexers (V3.2)."""

    def __init__(self, model: torch.nn.Module, dataset: Any, config: TrainConfig, *args, **kwargs):
        if not model.config.has_indexer:
            raise ValueError("DSA training needs a model with indexers (deepseek_v32): convert_to_dsa first")
        if config.indexer_warmup_steps > config.steps:
            raise ValueError(f"train config: indexer_warmup_steps={config.indexer_warmup_steps} > steps={config.steps}")
        warm = config.indexer_warmup_steps
        # the sparse stage's schedule: trainer.py's, over its own steps
        sparse_steps = max(1, config.steps - warm)
        self._sparse_schedule = dataclasses.replace(config, steps=sparse_steps, indexer_warmup_steps=0,
                                                    warmup_steps=min(config.warmup_steps, sparse_steps))
        super().__init__(model, dataset, config, *args, **kwargs)
        if self.dist.enabled:  # the indexer's KL is backpropagated outside the data-parallel wrapper's forward
            raise ValueError("train: --sparse-attention dsa runs in one process for now (not under torchrun)")

    # a warm-up checkpoint holds optimizer state for the indexers only: the frozen model has none yet
    strict_optimizer_state = False

    def _resume(self, path: str) -> None:
        """trainer.py's resume; then the frozen model's parameters get back the empty optimizer state they had
        in the warm-up (the loader fills every missing entry with zeros and a step count of 1, which would
        change the first sparse steps' Adam bias correction)."""
        super()._resume(path)
        in_warmup = self.step <= self.config.indexer_warmup_steps  # no step has updated the model yet
        for name, p in self.model.named_parameters():
            if in_warmup and not is_indexer_param(name):
                self.optimizer.state.pop(p, None)
            elif p.requires_grad and self.step > 0 and p not in self.optimizer.state:
                raise ValueError(f"{path}: optimizer state lacks {name} at step {self.step}")

    @property
    def in_warmup(self) -> bool:
        return self.step < self.config.indexer_warmup_steps

    @property
    def stage(self) -> str:
        return "warmup" if self.in_warmup else "sparse"

    def lr_at(self, step: int) -> float:
        if step < self.config.indexer_warmup_steps:
            return self.config.indexer_lr
        return lr_at(self._sparse_schedule, step - self.config.indexer_warmup_steps)

    def _micro_loss(self, inputs: torch.Tensor, targets: torch.Tensor):
        warm = self.in_warmup
        with recorded_attention_inputs(self.model) as records:
            if warm:  # the frozen model's forward: its layer inputs and (logged) loss, no graph
                with dense_attention(self.model), torch.no_grad():
                    loss, parts = super()._micro_loss(inputs, targets)
            else:
                loss, parts = super()._micro_loss(inputs, targets)
        kl = indexer_loss(records)
        parts["indexer_kl"] = (kl.detach(), torch.tensor(1.0))
        return (kl if warm else loss + kl), parts

    def train_step(self) -> dict[str, Any]:
        stage = self.stage
        record = super().train_step()
        record["stage"] = stage
        return record

    def _balance(self) -> list[dict]:
        if self.in_warmup:  # the frozen model's correction biases stay; the step's loads are dropped
            update_correction_bias(self.model, 0.0)
            return []
        return super()._balance()

    def progress(self, record: dict) -> dict[str, str]:
        return {**super().progress(record), "kl": f"{record['indexer_kl']:.4f}", "stage": record["stage"]}
