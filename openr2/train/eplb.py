"""Expert-parallel load balancing (EPLB): where the physical expert slots go, from the logical experts' loads.

With `--redundant-experts R` an expert-parallel run over N ranks holds P = E + R physical expert slots, P/N
per rank: every logical expert once, and R replicas of the hottest ones. A replica is a copy of its logical
expert (same weights, optimizer moments and summed gradient, see expert_parallel.py), so where the slots go
changes how many rows each rank runs, never the math. `rebalance(load, P, groups, nodes, ranks)` is the
hierarchical greedy policy DeepSeek published (github.com/deepseek-ai/EPLB, eplb.py), written again here:

1. whole expert groups (the router's `n_group`) are packed onto nodes, each node the same number of groups,
   heaviest group first onto the lightest node with room (`balanced_packing`), so that group-limited routing
   keeps a token's experts on few nodes;
2. within each node, the R/nodes redundant slots go one at a time to the expert whose per-replica load
   (load / replicas) is the highest (`replicate`);
3. the node's physical slots (each carrying load / replicas of its expert) are packed onto the node's ranks,
   P/N each, again heaviest first onto the lightest rank with room.

When the groups do not divide over the nodes, the whole thing runs as one node of one group (the global
policy, as DeepSeek's does). `Placement` is one layer's result with the maps the dispatch needs
(`to_physical`: the (token, slot) pairs of a logical expert split round-robin over its replicas).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def balanced_packing(weight: torch.Tensor, packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [X, n] -> (pack [X, n], rank in pack [X, n]): each row's n items into `packs` packs of exactly
    n/packs items, greedily (heaviest item first, onto the lightest pack that still has room)."""
    rows, n = weight.shape
    if packs < 1 or n % packs:
        raise ValueError(f"balanced_packing: {n} items do not split into {packs} equal packs")
    per_pack = n // packs
    pack = torch.empty(rows, n, dtype=torch.long)
    slot = torch.empty(rows, n, dtype=torch.long)
    for r in range(rows):
        totals, sizes = [0.0] * packs, [0] * packs
        for item in weight[r].double().sort(descending=True, stable=True).indices.tolist():
            p = min((q for q in range(packs) if sizes[q] < per_pack), key=totals.__getitem__)
            pack[r, item], slot[r, item] = p, sizes[p]
            totals[p] += float(weight[r, item])
            sizes[p] += 1
    return pack, slot


def replicate(weight: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [X, n] logical loads -> (phy2log [X, slots], replica index [X, slots], count [X, n]): slots
    [0, n) are the logical experts themselves, each further slot replicates the expert whose load per
    replica is then the highest (minimising the largest load a slot carries)."""
    rows, n = weight.shape
    if slots < n:
        raise ValueError(f"replicate: {slots} slots cannot hold {n} experts")
    phy2log = torch.arange(slots).repeat(rows, 1)
    replica = torch.zeros(rows, slots, dtype=torch.long)
    count = torch.ones(rows, n, dtype=torch.long)
    every = torch.arange(rows)
    w = weight.double()
    for s in range(n, slots):
        hottest = (w / count).argmax(dim=-1)
        phy2log[:, s], replica[:, s] = hottest, count[every, hottest]
        count[every, hottest] += 1
    return phy2log, replica, count


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())


def rebalance(load: torch.Tensor, slots: int, groups: int, nodes: int, ranks: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """load [L, E] (tokens per logical expert, per MoE layer) -> (phy2log [L, slots], replica [L, slots],
    count [L, E]); rank r holds slots [r * slots/ranks, (r+1) * slots/ranks). See the module docstring."""
    layers, experts = load.shape
    if groups < 1 or experts % groups:
        raise ValueError(f"rebalance: {groups} groups do not divide {experts} experts")
    if ranks < 1 or slots % ranks:
        raise ValueError(f"rebalance: {slots} physical slots do not split over {ranks} ranks")
    if nodes < 1 or ranks % nodes:
        raise ValueError(f"rebalance: {ranks} ranks do not split over {nodes} nodes")
    if groups % nodes:
        groups = nodes = 1  # the global policy (slots % nodes == 0 follows from the checks above)
    load = load.double().cpu()
    group_size, per_node = experts // groups, experts // nodes
    # 1. groups onto nodes; experts renumbered node by node ("node-logical" ids)
    gpack, gslot = balanced_packing(load.view(layers, groups, group_size).sum(-1), nodes)
    log2mlog = (((gpack * (groups // nodes) + gslot) * group_size)[..., None] + torch.arange(group_size)).flatten(1)
    mlog2log = _inverse(log2mlog)
    # 2. redundant slots within each node
    node_load = load.gather(1, mlog2log).view(layers * nodes, per_node)
    phy2mlog, replica, mcount = replicate(node_load, slots // nodes)
    # 3. the node's slots onto its ranks, each slot carrying its expert's load / replicas
    slot_load = (node_load / mcount).gather(1, phy2mlog)
    pack, in_pack = balanced_packing(slot_load, ranks // nodes)
    order = _inverse(pack * (slots // ranks) + in_pack)  # packed position -> the node's slot
    phy2mlog = phy2mlog.gather(1, order).view(layers, nodes, -1) + (torch.arange(nodes) * per_node)[None, :, None]
    phy2log = mlog2log.gather(1, phy2mlog.flatten(1))
    replica = replica.gather(1, order).view(layers, -1)
    count = mcount.view(layers, -1).gather(1, log2mlog)
    return phy2log, replica, count


@dataclass(frozen=True)
class Placement:
    """One MoE layer's physical slots: phy2log [P] (slot -> logical expert; rank r holds the r-th P/N slots),
    replica [P] (0: the expert's primary slot, the one checkpoints read), count [E] replicas per expert,
    log2phy [E, max count] (an expert's slots by replica index, -1 beyond its count)."""

    phy2log: torch.Tensor
    replica: torch.Tensor
    count: torch.Tensor
    log2phy: torch.Tensor

    @classmethod
    def build(cls, phy2log: torch.Tensor, replica: torch.Tensor, count: torch.Tensor) -> Placement:
        log2phy = torch.full((count.numel(), int(count.max())), -1, dtype=torch.long)
        log2phy[phy2log, replica] = torch.arange(phy2log.numel())
        return cls(phy2log.clone(), replica.clone(), count.clone(), log2phy)

    @classmethod
    def identity(cls, experts: int) -> Placement:
        """No redundant slot: slot e holds expert e."""
        e = torch.arange(experts)
        return cls.build(e, torch.zeros_like(e), torch.ones_like(e))

    @property
    def primary(self) -> torch.Tensor:
        """[E]: the slot of each expert's first replica."""
        return self.log2phy[:, 0]

    def to_physical(self, ids: torch.Tensor, rank: int) -> torch.Tensor:
        """Logical expert ids [N, K] -> physical slots [N, K]: the pairs of an expert, in row order, take its
        replicas in turn (starting at replica `rank`, so that every rank does not load the same first one)."""
        log2phy, count = self.log2phy.to(ids.device), self.count.to(ids.device)
        if log2phy.shape[1] == 1:
            return log2phy[ids, 0]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=count.numel())
        starts = counts.cumsum(0) - counts
        nth = torch.empty_like(flat)
        nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # among its expert's
        return log2phy[flat, (nth + rank) % count[flat]].view_as(ids)
