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

With `redundant` R > 0 (`--redundant-experts`, EPLB) each layer has E + R physical slots, (E + R)/N per
rank, placed by eplb.rebalance from the measured loads (at the start: uniform loads) and re-placed every
`rebalance_every` steps (`after_step`): the weights and optimizer moments move into their new slots. A
replicated expert's pairs split round-robin over its replicas (Placement.to_physical); before the grad
norm its replicas' gradients are summed (an all-reduce of the replicated experts only) into every replica,
so replicas stay copies of one logical expert (same weights, gradient and moments: the same AdamW
update), the norm counts each logical expert once, and checkpoints read each expert's primary slot.

Redundant experts only with N == world size, without FSDP and without pipeline parallelism for now
(TrainConfig refuses the other combinations).

What it does not own: the routing math (model/moe.py), the load all-reduce (trainer.py does it for DDP).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from openr2.model.moe import MoE, RoutedExperts, _fused_ok, _GroupedExperts
from openr2.train import eplb, mesh
from openr2.train.distributed import Dist
from openr2.train.eplb import Placement

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single with split sizes; differentiable (the gradient goes back by the reverse exchange)."""
    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


class EPExperts(RoutedExperts):
    """This rank's physical expert slots of a RoutedExperts: [first, first + E/N) without redundant experts,
    else the slots its `placement` (eplb.py) gives this rank (replicas of hot experts included). Same forward
    signature (logical expert ids in), same parameter names (gate_up_proj, down_proj: the local slots), so
    the model around it is unchanged."""

    def __init__(self, full: RoutedExperts, rank: int, size: int, group, placement: Placement | None = None):
        nn.Module.__init__(self)
        self.group = group  # its own process group: never interleaved with DDP's gradient all-reduces
        self.placement = placement or Placement.identity(full.num_experts)
        self.logical_experts = full.num_experts
        local = self.placement.phy2log.numel() // size
        self.num_experts, self.intermediate = local, full.intermediate
        self.rank, self.size = rank, size
        part = self.local_logical()
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[part].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[part].clone())
        self.sent_bytes = 0  # what this rank sent to others through all-to-all in forwards, since reset
        self.rows_run = 0  # (token, slot) rows this rank's slots ran in forwards, since reset
        self.load = torch.zeros(full.num_experts, dtype=torch.long)  # this rank's pairs per logical expert

    def local_logical(self) -> torch.Tensor:
        """The logical expert of each of this rank's slots."""
        return self.placement.phy2log[self.rank * self.num_experts:(self.rank + 1) * self.num_experts]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, impl: str = "grouped"):
        """x [N, D], weights [N, K], ids [N, K] (global expert ids) -> [N, D], as RoutedExperts.forward."""
        N, K = ids.shape
        self.load += torch.bincount(ids.flatten(), minlength=self.logical_experts).cpu()
        flat = self.placement.to_physical(ids, self.rank).flatten()  # a physical slot per pair
        order = flat.argsort(stable=True)  # pairs sorted by slot, hence by the rank that holds it
        # rows per expert, exchanged: each rank learns how many rows of each of its experts every rank sends
        sent = torch.bincount(flat, minlength=self.num_experts * self.size)
        received = torch.empty_like(sent)  # [source rank, local expert]
        torch_dist.all_to_all_single(received, sent, group=self.group)
        received = received.view(self.size, self.num_experts)
        in_splits = sent.view(self.size, self.num_experts).sum(1).tolist()
        out_splits = received.sum(1).tolist()
        self.rows_run += sum(out_splits)
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

    def __init__(self, model: nn.Module, rank: int, size: int, group, loss_scale: int, replicas=None,
                 rebalance_every: int = 0, groups: int = 1, nodes: int = 1):
        """rank and size within the expert-parallel `group`; loss_scale: the data-parallel replicas' loss
        factor (the world size under DDP, the pipeline's data-parallel size under pipeline parallelism);
        replicas: the group of the ranks holding the same experts (None when each shard is held once);
        rebalance_every, groups, nodes: EPLB's (after_step, eplb.rebalance)."""
        self.model, self.rank, self.size, self.group, self.replicas = model, rank, size, group, replicas
        self.rebalance_every, self.groups, self.nodes = rebalance_every, groups, nodes
        self.owner = {f"{name}.{p}": m for name, m in model.named_modules() if isinstance(m, EPExperts)
                      for p in EXPERT_PARAMS}
        self.expert_names = list(self.owner)
        self.expert_params = {id(p) for name, p in model.named_parameters() if name in self.expert_names}
        # the loss is scaled by the data-parallel size for DDP's average; nothing averages the experts' gradients
        for name, p in model.named_parameters():
            if name in self.expert_names:
                p.register_hook(lambda g, w=loss_scale: g / w)

    def experts(self) -> list[EPExperts]:
        return [m for m in self.model.modules() if isinstance(m, EPExperts)]

    @property
    def redundant(self) -> int:
        """Physical slots beyond the logical experts, per MoE layer."""
        m = self.experts()[0]
        return m.num_experts * m.size - m.logical_experts

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
        (after summing the expert-data-parallel replicas' gradients, and giving the EPLB replicas of each
        expert their summed gradient: each logical expert counted once; call once per step, after the backward)."""
        from torch.distributed.tensor import DTensor

        self.sum_replica_grads(params)
        self._sum_replica_grads()
        primary = {id(p): m.placement.replica[m.num_experts * m.rank:m.num_experts * (m.rank + 1)] == 0
                   for m in self.experts() for p in (m.gate_up_proj, m.down_proj)}
        shared = [p.grad for p in params if p.grad is not None and id(p) not in self.expert_params]
        local = [p.grad for p in params if p.grad is not None and id(p) in self.expert_params]
        counted = [p.grad[primary[id(p)].to(p.device)] for p in params
                   if p.grad is not None and id(p) in self.expert_params]
        sq = lambda gs: sum((g.double().pow(2).sum() for g in gs), torch.zeros((), dtype=torch.float64))  # noqa: E731
        expert_sq = sq(counted)
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

    def _sum_replica_grads(self) -> None:
        """Each replicated expert's gradient = the sum of its replicas' (every rank, one all-reduce of the
        replicated experts only), written back into every replica: replicas stay copies of one expert."""
        for m in self.experts():
            hot = (m.placement.count > 1).nonzero().flatten()
            if not hot.numel():
                continue
            index = torch.full((m.logical_experts,), -1, dtype=torch.long)
            index[hot] = torch.arange(hot.numel())
            mine = index[m.local_logical()]
            slots = (mine >= 0).nonzero().flatten()
            for p in (m.gate_up_proj, m.down_proj):
                at, into = slots.to(p.device), mine[slots].to(p.device)
                total = p.grad.new_zeros(hot.numel(), *p.shape[1:]).index_add_(0, into, p.grad[at])
                torch_dist.all_reduce(total, group=self.group)
                p.grad[at] = total[into]

    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> dict:
        """After optimizer step `step` (1-based): per MoE layer, the largest rank's rows over the mean
        (`ep_rows_max_over_mean`, what the step's experts ran per rank), and every rebalance_every steps
        with redundant experts, a new placement from the loads since the last one (`ep_rebalanced`)."""
        experts = self.experts()
        rows = torch.zeros(self.size, len(experts), dtype=torch.float64)
        rows[self.rank] = torch.tensor([float(m.rows_run) for m in experts], dtype=torch.float64)
        torch_dist.all_reduce(rows, group=self.group)
        for m in experts:
            m.rows_run = 0
        record = {"ep_rows_max_over_mean": (rows.max(0).values / rows.mean(0).clamp(min=1e-30)).tolist()}
        if self.redundant and self.rebalance_every and step % self.rebalance_every == 0:
            self.rebalance(optimizer)
            record["ep_rebalanced"] = True
        return record

    @torch.no_grad()
    def rebalance(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Place every layer's slots anew (eplb.rebalance) from the logical loads of all ranks since the
        last call, and move the experts' weights and optimizer moments into their new slots (each rank
        gathers the whole experts, then keeps its slots: simple, and as many bytes as a checkpoint)."""
        experts = self.experts()
        load = torch.stack([m.load for m in experts]).to(torch.float64)
        torch_dist.all_reduce(load, group=self.group)
        slots = experts[0].num_experts * self.size
        phy2log, replica, count = eplb.rebalance(load, slots, self.groups, self.nodes, self.size)
        for i, m in enumerate(experts):
            moved = []
            for p in (m.gate_up_proj, m.down_proj):
                state = optimizer.state.get(p, {}) if optimizer is not None else {}
                for t in [p.data] + [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]:
                    moved.append((t, self._gather(t, m)))
            m.placement = Placement.build(phy2log[i], replica[i], count[i])
            for t, whole in moved:
                t.copy_(whole[m.local_logical().to(whole.device)])
            m.load.zero_()

    @torch.no_grad()
    def replicas_agree(self) -> bool:
        """Whether every replica of every expert holds its primary's weights bitwise (collective)."""
        ok = True
        for m in self.experts():
            for p in (m.gate_up_proj, m.down_proj):
                parts = [torch.empty_like(p) for _ in range(self.size)]
                torch_dist.all_gather(parts, p.data.contiguous(), group=self.group)
                slots = torch.cat(parts)
                ok &= torch.equal(slots, slots[m.placement.primary.to(p.device)][m.placement.phy2log.to(p.device)])
        return ok

    # -------------------------------------------------------------- whole state <-> this rank's slots
    def _gather(self, t: torch.Tensor, m: EPExperts) -> torch.Tensor:
        """This rank's slots of one expert tensor -> the whole logical tensor [E, ...] (collective)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        torch_dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)[m.placement.primary.to(t.device)]

    def _slice(self, t: torch.Tensor, m: EPExperts) -> torch.Tensor:
        return t[m.local_logical().to(t.device)].clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with whole expert tensors, and whole FSDP-sharded ones (collective: every rank
        calls it)."""
        return {k: self._gather(v, self.owner[k]) if k in self.owner else v.full_tensor()
                if hasattr(v, "full_tensor") else v for k, v in self.model.state_dict().items()}

    def local_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self._slice(v, self.owner[k]) if k in self.owner else v for k, v in state.items()}

    def _map_optimizer(self, state: dict, fn) -> dict:
        per_param = {}
        for k, s in state["state"].items():
            per_param[k] = {n: fn(v, self.owner[k]) if torch.is_tensor(v) and v.dim() else v
                            for n, v in s.items()} if k in self.owner else s
        return {**state, "state": per_param}

    def full_optimizer_state(self, state: dict) -> dict:
        """Name-keyed optimizer state with whole expert moments (collective)."""
        return self._map_optimizer(state, self._gather)

    def local_optimizer_state(self, state: dict) -> dict:
        return self._map_optimizer(state, self._slice)


def apply(model: nn.Module, n: int, dist: Dist, layout=None, redundant: int = 0, rebalance_every: int = 0
          ) -> ExpertParallel | None:
    """Keep 1/n of every MoE layer's routed experts on this rank, plus `redundant` replica slots per layer
    placed by EPLB (re-placed every `rebalance_every` steps); None when n is 1. The experts are split over
    the "ep" sub-mesh of `layout` (mesh.Layout; by default the world as world/n replicas x n shards)."""
    if n == 1:
        if redundant:
            raise ValueError(f"redundant_experts={redundant} needs expert parallelism (expert_parallel > 1)")
        return None
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    if not moe:
        raise ValueError(f"expert_parallel={n}: the model has no MoE layer (no routed experts to distribute)")
    experts = moe[0].experts.num_experts
    if experts % n:
        raise ValueError(f"expert_parallel={n} does not divide the model's {experts} routed experts "
                         "(n_routed_experts)")
    if (experts + redundant) % n:
        raise ValueError(f"redundant_experts={redundant}: {experts} experts + {redundant} replicas do not split "
                         f"over {n} ranks (make n_routed_experts + redundant_experts a multiple of {n})")
    if redundant and n != dist.world_size:
        # the placement comes from the loads of one expert-parallel group: its replicas (edp) or the other
        # pipeline stages would each place their slots differently
        raise ValueError(f"redundant_experts={redundant} needs expert parallelism over all processes "
                         f"(expert_parallel={n}, world size {dist.world_size}): --redundant-experts with "
                         "--expert-parallel below the world size or with --pipeline-parallel is not supported yet")
    if layout is None:
        if dist.world_size == 1:
            raise ValueError(f"expert_parallel={n} needs {n} processes: launch with torchrun --nproc-per-node {n}")
        if dist.world_size % n:
            raise ValueError(f"expert_parallel={n} does not divide the world size {dist.world_size}")
        layout = mesh.build(dist, 1, n, model.device)
    group = layout.group("ep")
    groups = moe[0].gate.num_groups
    nodes = max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", n)))
    placement = [None] * len(moe)
    if redundant:  # the first placement before any load is known: every expert equally loaded
        phy2log, replica, count = eplb.rebalance(torch.ones(len(moe), experts), experts + redundant, groups,
                                                 nodes, n)
        placement = [Placement.build(*t) for t in zip(phy2log, replica, count)]
    for m, where in zip(moe, placement):
        m.experts = EPExperts(m.experts, layout.ep_rank, n, group, where)
    return ExpertParallel(model, layout.ep_rank, n, group, layout.dp,
                          layout.group("edp") if layout.edp > 1 else None, rebalance_every, groups, nodes)
