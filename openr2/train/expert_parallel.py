"""Expert parallelism (`--expert-parallel N`) applied from outside the pure model, under torchrun.

`apply(model, n, dist)` replaces each MoE layer's `RoutedExperts` by an `EPExperts` holding this rank's
contiguous 1/N of the experts (the others are never allocated here) and returns an `ExpertParallel`
that the Trainer asks for what changes under EP: which parameters DDP must leave alone, the global grad
norm, and whole (single-process format) model and optimizer state for checkpoints and evaluation.

Forward of one MoE layer on every rank (the router, shared expert and attention stay data-parallel):
the count of (token, slot) pairs per expert is exchanged, the pairs' rows of x, sorted by expert, are sent
to their expert's rank with one all-to-all, each rank runs its experts over the rows of all ranks, the outputs come back
with the reverse all-to-all and each token sums its K rows with its routing weights (as the model's
fused path does). The all-to-all is torch's differentiable functional collective (its backward is the
reverse all-to-all; it works on gloo too), so the gradient of an expert collects every rank's tokens; the Trainer scales each rank's loss by the
world size for DDP's average, so expert gradients, which nothing averages, are divided by it here.

N may be below the world size: the processes form a DeviceMesh (mesh.py) of world/N expert replicas x N
expert shards; the replicas of a shard sum their expert gradients. Under FSDP2 the experts are its
`ignored_params` (this rank's slices, never sharded or reduced by it) and the rest is sharded.
What it does not own: the routing math (model/moe.py), the load all-reduce (trainer.py does it for DDP).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from openr2.model.moe import MoE, RoutedExperts, _fused_ok, _GroupedExperts
from openr2.train import mesh
from openr2.train.distributed import Dist

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single with split sizes; differentiable (the gradient goes back by the reverse exchange)."""
    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


class EPExperts(RoutedExperts):
    """This rank's experts [first, first + E/N) of a RoutedExperts; same forward signature, same parameter
    names (gate_up_proj, down_proj: the local slices), so the model around it is unchanged."""

    def __init__(self, full: RoutedExperts, rank: int, size: int, group):
        nn.Module.__init__(self)
        self.group = group  # its own process group: never interleaved with DDP's gradient all-reduces
        local = full.num_experts // size
        self.num_experts, self.intermediate = local, full.intermediate
        self.rank, self.size = rank, size
        part = slice(rank * local, (rank + 1) * local)
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[part].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[part].clone())
        self.sent_bytes = 0  # what this rank sent to others through all-to-all in forwards, since reset

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, impl: str = "grouped"):
        """x [N, D], weights [N, K], ids [N, K] (global expert ids) -> [N, D], as RoutedExperts.forward."""
        N, K = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # pairs sorted by expert, hence by the rank that holds it
        # rows per expert, exchanged: each rank learns how many rows of each of its experts every rank sends
        sent = torch.bincount(flat, minlength=self.num_experts * self.size)
        received = torch.empty_like(sent)  # [source rank, local expert]
        torch_dist.all_to_all_single(received, sent, group=self.group)
        received = received.view(self.size, self.num_experts)
        in_splits = sent.view(self.size, self.num_experts).sum(1).tolist()
        out_splits = received.sum(1).tolist()
        rows = _exchange(x.index_select(0, order // K), out_splits, in_splits, self.group)
        local_ids = torch.arange(self.num_experts, device=x.device).repeat(self.size).repeat_interleave(
            received.flatten())  # the rows arrive by source rank, each source's sorted by expert
        y = self._run_local(rows, local_ids, impl)
        back = _exchange(y, in_splits, out_splits, self.group)  # [N*K, D] in the order sent
        # to the other ranks only: rows out, expert outputs back, and the counts
        to_others, back_to_others = sum(in_splits) - in_splits[self.rank], sum(out_splits) - out_splits[self.rank]
        self.sent_bytes += (to_others + back_to_others) * x.shape[1] * x.element_size() + \
            (self.size - 1) * self.num_experts * sent.element_size()
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        # each token's K rows summed with their routing weights in one pass, as the model's fused path does
        w = weights if weights.dtype == back.dtype else weights.to(back.dtype)
        return F.embedding_bag(inverse.view(N, K), back, mode="sum", per_sample_weights=w).to(x.dtype)

    def _run_local(self, rows: torch.Tensor, local_ids: torch.Tensor, impl: str) -> torch.Tensor:
        """Unweighted outputs of this rank's experts for the received rows [R, D] (one expert each)."""
        if rows.shape[0] == 0:
            # nothing routed here: an empty output that still depends on the rows and the experts, so every
            # rank runs the reverse all-to-alls in backward and the experts get zero gradients, as in one
            # process (None would skip their AdamW update: no decay, no moment decay)
            return rows + 0 * (self.gate_up_proj.sum() + self.down_proj.sum())
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        if impl == "fused" and _fused_ok(rows, ones, self.gate_up_proj, self.down_proj):
            order = local_ids.argsort(stable=True)
            counts = torch.bincount(local_ids, minlength=self.num_experts).tolist()
            return _GroupedExperts.apply(rows, ones, self.gate_up_proj, self.down_proj, order, order, counts)
        return self._looped(rows, ones, local_ids[:, None])  # the reference path, any impl but fused


class ExpertParallel:
    """What the Trainer needs to know about the expert-parallel model (see the module docstring)."""

    def __init__(self, model: nn.Module, rank: int, size: int, group, loss_scale: int, replicas=None):
        """rank and size within the expert-parallel `group`; loss_scale: the data-parallel replicas' loss
        factor (the world size under DDP, the pipeline's data-parallel size under pipeline parallelism);
        replicas: the group of the ranks holding the same experts (None when each shard is held once)."""
        self.model, self.rank, self.size, self.group, self.replicas = model, rank, size, group, replicas
        self.expert_names = [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, EPExperts)
                             for p in EXPERT_PARAMS]
        self.expert_params = {id(p) for name, p in model.named_parameters() if name in self.expert_names}
        # the loss is scaled by the data-parallel size for DDP's average; nothing averages the experts' gradients
        for name, p in model.named_parameters():
            if name in self.expert_names:
                p.register_hook(lambda g, w=loss_scale: g / w)

    def experts(self) -> list[EPExperts]:
        return [m for m in self.model.modules() if isinstance(m, EPExperts)]

    def take_sent_bytes(self) -> int:
        """All-to-all bytes this rank sent in forwards since the last call (backward sends as much again)."""
        total = 0
        for m in self.experts():
            total, m.sent_bytes = total + m.sent_bytes, 0
        return total

    def sum_replica_grads(self, params: list[torch.Tensor]) -> None:
        """Expert gradients summed over the ranks that hold the same experts (each saw its own tokens)."""
        if self.replicas is None:
            return
        for p in params:
            if p.grad is not None and id(p) in self.expert_params:
                torch_dist.all_reduce(p.grad, group=self.replicas)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole model: replicated gradients counted once, expert slices summed
        (after summing the expert replicas' gradients: call once per step, after the backward)."""
        from torch.distributed.tensor import DTensor

        self.sum_replica_grads(params)
        shared = [p.grad for p in params if p.grad is not None and id(p) not in self.expert_params]
        local = [p.grad for p in params if p.grad is not None and id(p) in self.expert_params]
        sq = lambda gs: sum((g.double().pow(2).sum() for g in gs), torch.zeros((), dtype=torch.float64))  # noqa: E731
        expert_sq = sq(local)
        torch_dist.all_reduce(expert_sq, group=self.group)
        sharded = [g for g in shared if isinstance(g, DTensor)]  # FSDP: each rank holds a shard of these
        shard_sq = sq([g.to_local() for g in sharded])
        if sharded:
            torch_dist.all_reduce(shard_sq)
        norm = (sq([g for g in shared if not isinstance(g, DTensor)]) + shard_sq + expert_sq).sqrt()
        if math.isfinite(max_norm):
            scale = min(1.0, max_norm / (norm.item() + 1e-6))
            for g in shared + local:
                g.mul_(scale)
        return norm

    # -------------------------------------------------------------- whole state <-> this rank's slices
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        torch_dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        local = t.shape[0] // self.size
        return t[self.rank * local:(self.rank + 1) * local].clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with whole expert tensors, and whole FSDP-sharded ones (collective: every rank
        calls it)."""
        return {k: self._gather(v) if k in self.expert_names else v.full_tensor() if hasattr(v, "full_tensor")
                else v for k, v in self.model.state_dict().items()}

    def local_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self._slice(v) if k in self.expert_names else v for k, v in state.items()}

    def _map_optimizer(self, state: dict, fn) -> dict:
        per_param = {}
        for k, s in state["state"].items():
            per_param[k] = {n: fn(v) if k in self.expert_names and torch.is_tensor(v) and v.dim() else v
                            for n, v in s.items()} if k in self.expert_names else s
        return {**state, "state": per_param}

    def full_optimizer_state(self, state: dict) -> dict:
        """Name-keyed optimizer state with whole expert moments (collective)."""
        return self._map_optimizer(state, self._gather)

    def local_optimizer_state(self, state: dict) -> dict:
        return self._map_optimizer(state, self._slice)


def apply(model: nn.Module, n: int, dist: Dist, layout=None) -> ExpertParallel | None:
    """Keep 1/n of every MoE layer's routed experts on this rank; None when n is 1. The experts are split
    over the "ep" sub-mesh of `layout` (mesh.Layout; by default the world as world/n replicas x n shards)."""
    if n == 1:
        return None
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    if not moe:
        raise ValueError(f"expert_parallel={n}: the model has no MoE layer (no routed experts to distribute)")
    experts = moe[0].experts.num_experts
    if experts % n:
        raise ValueError(f"expert_parallel={n} does not divide the model's {experts} routed experts "
                         "(n_routed_experts)")
    if layout is not None:
        group = layout.group("ep")
        for m in moe:
            m.experts = EPExperts(m.experts, layout.ep_rank, n, group)
        return ExpertParallel(model, layout.ep_rank, n, group, layout.dp,
                              layout.group("edp") if layout.edp > 1 else None)
    if dist.world_size == 1:
        raise ValueError(f"expert_parallel={n} needs {n} processes: launch with torchrun --nproc-per-node {n}")
    if dist.world_size % n:
        raise ValueError(f"expert_parallel={n} does not divide the world size {dist.world_size}")
    return apply(model, n, dist, mesh.build(dist, 1, n, model.device))
