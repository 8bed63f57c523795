"""DeepSeek-V4's MoE: the same stacked experts as moe.py, with V4's routers and a clipped SwiGLU.

- `ScoreGate` (`moe` layers): scores s = sqrt(softplus(W x)) (`sqrtsoftplus`; or sigmoid), the top-k of
  s + e_score_correction_bias (no groups), weights s[top-k] renormalised to sum 1, times
  routed_scaling_factor.
- `HashGate` (`hash_moe` layers, the first ones): the experts are a frozen table lookup tid2eid[token id]
  ([vocab, k], a buffer: never trained); the learned W still weights them as above.
- Experts and the shared expert: down(silu(min(gate, L)) * clamp(up, -L, L)), L = swiglu_limit.
`ClippedExperts` keeps moe.RoutedExperts' names and layout; its `looped` path is the reference, `grouped`
(sorted by expert, one product per expert over contiguous rows) the fast path, tested equal.

Shape legend: N tokens (B*T flattened), D hidden, I moe_intermediate_size, E routed experts, K per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openr2.config import ModelConfig
from openr2.model.layers import MLP
from openr2.model.moe import RoutedExperts, _segment_mm


def clipped_swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """[..., 2I] (gate, up halves) -> silu(min(gate, limit)) * clamp(up, -limit, limit)  [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


def _scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    return F.softplus(logits).sqrt() if scoring_func == "sqrtsoftplus" else logits.sigmoid()


def _weights(scores: torch.Tensor, ids: torch.Tensor, scaling: float) -> torch.Tensor:
    w = scores.gather(1, ids)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scaling


class ScoreGate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.scoring_func = config.num_experts_per_tok, config.scoring_func
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] float32, expert ids [N, K])."""
        scores = _scores(F.linear(x.float(), self.weight.float()), self.scoring_func)
        ids = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
        return _weights(scores, ids, self.routed_scaling_factor), ids


class HashGate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.scoring_func = config.num_experts_per_tok, config.scoring_func
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids is None:
            raise ValueError("a hash-routed MoE layer needs the token ids")
        scores = _scores(F.linear(x.float(), self.weight.float()), self.scoring_func)
        ids = self.tid2eid[input_ids.reshape(-1)]
        return _weights(scores, ids, self.routed_scaling_factor), ids


class ClippedExperts(RoutedExperts):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.limit = config.swiglu_limit

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(clipped_swiglu(F.linear(x, self.gate_up_proj[e]), self.limit), self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, impl: str = "grouped"):
        """x [N, D], weights [N, K], ids [N, K] -> [N, D]; impl `looped` (reference) or `grouped` (`fused`,
        the trainer's choice, runs `grouped` too: autograd over it; no hand-written backward for the clip yet)."""
        if impl == "looped":
            return self._looped(x, weights, ids)
        if impl not in ("grouped", "fused"):
            raise ValueError(f"DeepSeek-V4 experts run moe_impl 'looped', 'grouped' or 'fused', got {impl!r}")
        K = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        h = _segment_mm(x.index_select(0, token), self.gate_up_proj, counts)
        y = _segment_mm(clipped_swiglu(h, self.limit), self.down_proj, counts) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class ClippedMLP(MLP):
    def __init__(self, hidden_size: int, intermediate_size: int, limit: float):
        super().__init__(hidden_size, intermediate_size)
        self.limit = limit

    def forward(self, x: torch.Tensor, kernel_impl: str = "eager") -> torch.Tensor:
        gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)
        return self.down_proj(clipped_swiglu(gate_up, self.limit))


class V4MoE(nn.Module):
    """y = sum_k g_k E_k(x) + shared(x), routed by hash (`hash_moe`) or by score (`moe`).

    While training it counts the tokens routed to each expert (`expert_load`), which moe.update_correction_bias
    turns into auxiliary-loss-free balancing of the score-routed layers' correction bias (hash layers have
    none: their table is frozen)."""

    counts_expert_load = True

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hashed = config.mlp_layer_types[layer_idx] == "hash_moe"
        self.gate = HashGate(config) if hashed else ScoreGate(config)
        self.experts = ClippedExperts(config)
        n_shared = config.n_shared_experts
        self.shared_experts = ClippedMLP(config.hidden_size, n_shared * config.moe_intermediate_size,
                                         config.swiglu_limit) if n_shared else None
        # not a buffer (never saved or cast); on the CPU explicitly, also when the model is built on "meta"
        self.expert_load = torch.zeros(config.n_routed_experts, device="cpu")

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None, moe_impl: str = "grouped") -> torch.Tensor:
        """x [B, T, D], input_ids [B, T] -> [B, T, D]."""
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat, input_ids)
        if self.training:
            counts = torch.bincount(ids.flatten(), minlength=self.expert_load.numel())
            self.expert_load = self.expert_load.to(counts.device) + counts.float()
        out = self.experts(flat, weights, ids, moe_impl).view(x.shape)
        return out if self.shared_experts is None else out + self.shared_experts(x)
