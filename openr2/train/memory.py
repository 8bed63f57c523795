"""Training memory per rank under expert x pipeline x data parallelism (`openr2 info MODEL --ep E --pp P`).

The model is built on the meta device and split as pipeline.py splits it (one stage per rank, layers as
even as their count allows; the embedding on the first stage, the final norm, head and MTP modules on the
last); a rank holds its stage's dense parameters and 1/E of its routed experts. Bytes per parameter, the
mixed-precision AdamW recipe: bf16 weights (2) and gradients in fp32 (4) on every rank; fp32 master weights
(4) and AdamW's two fp32 moments (8), which ZeRO-1 shards over the stage's data-parallel ranks (dense
parameters over all D of them, experts over their D/E replicas). Activations (micro-batch size, sequence
length, recomputation) and communication buffers come on top and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openr2.model.moe import RoutedExperts

WEIGHT, GRAD, MASTER, MOMENTS = 2, 4, 4, 8  # bytes per parameter


@dataclass(frozen=True)
class RankMemory:
    stage: int
    layers: range
    dense_params: int  # this rank's (everything but routed experts)
    expert_params: int  # this rank's share of its stage's routed experts

    def bytes(self, ep: int, dp: int) -> dict[str, int]:
        params = self.dense_params + self.expert_params
        sharded = self.dense_params / dp + self.expert_params / max(1, dp // ep)  # ZeRO-1 shards
        return {"weights": params * WEIGHT, "gradients": params * GRAD, "master": int(sharded * MASTER),
                "moments": int(sharded * MOMENTS)}


def per_rank(config, ep: int, pp: int) -> list[RankMemory]:
    """One RankMemory per pipeline stage (a rank of each stage holds it, experts split over ep)."""
    from openr2.model.transformer import Transformer
    from openr2.train.pipeline import StageModule, split_layers

    if ep < 1 or pp < 1:
        raise ValueError("--ep and --pp must be at least 1")
    if config.is_v4:
        raise ValueError("memory per rank: DeepSeek-V4 is not split into pipeline stages yet")
    if config.n_routed_experts % ep:
        raise ValueError(f"--ep {ep} does not divide the {config.n_routed_experts} routed experts")
    if pp > config.num_hidden_layers:
        raise ValueError(f"--pp {pp} is more stages than the {config.num_hidden_layers} layers")
    with torch.device("meta"):
        model = Transformer(config)
    out = []
    for i, layers in enumerate(split_layers(config.num_hidden_layers, pp)):
        stage = StageModule(model, i, pp, layers, mtp=True)
        experts = sum(p.numel() for m in stage.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
        total = sum(p.numel() for p in stage.parameters())
        out.append(RankMemory(i, layers, total - experts, experts // ep))
    return out
