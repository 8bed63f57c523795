"""Run by tests/train/test_expert_parallel.py under torchrun (2 processes): EPExperts on each rank's half of
the tokens against the whole RoutedExperts on all of them, for every expert path and for a routing that sends
every pair to rank 0's experts (rank 1 receives nothing). Rank 0 writes the largest relative differences of
the outputs and of the gradients (x, routing weights, experts) to OUT/experts.pt. Float64 throughout."""

import os
import sys

import torch

from openr2.model.moe import RoutedExperts
from openr2.presets import tiny_v3
from openr2.train import distributed
from openr2.train.expert_parallel import EPExperts

N, K = 24, 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist = distributed.init()
    rank, world = dist.rank, dist.world_size
    group = torch.distributed.new_group(list(range(world)))
    g = torch.Generator().manual_seed(0)
    full = RoutedExperts(tiny_v3()).double()
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    E = full.num_experts
    x = torch.randn(N, full.gate_up_proj.shape[2], generator=g, dtype=torch.float64)
    w = torch.rand(N, K, generator=g, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    routings = {"random": torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]),
                "all to rank 0": torch.stack([torch.randperm(E // world, generator=g)[:K] for _ in range(N)])}
    mine = slice(rank * N // world, (rank + 1) * N // world)
    results = {}
    for routing, ids in routings.items():
        for impl in ("fused", "grouped", "looped"):
            ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
            full.zero_grad()
            ref = full(ref_x, ref_w, ids, "looped")  # the reference path on all tokens
            ref.backward(grad_out)
            ep = EPExperts(full, rank, world, group)
            ep_x, ep_w = x[mine].clone().requires_grad_(), w[mine].clone().requires_grad_()
            out = ep(ep_x, ep_w, ids[mine], impl)
            out.backward(grad_out[mine])
            part = slice(rank * E // world, (rank + 1) * E // world)
            diffs = [rel(out, ref[mine]), rel(ep_x.grad, ref_x.grad[mine]), rel(ep_w.grad, ref_w.grad[mine]),
                     rel(ep.gate_up_proj.grad, full.gate_up_proj.grad[part]),
                     rel(ep.down_proj.grad, full.down_proj.grad[part])]
            worst = torch.tensor(max(diffs), dtype=torch.float64)
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            results[(routing, impl)] = worst.item()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "experts.pt"))
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1])
