"""Data-parallel training with torch.distributed, as launched by `torchrun` (never a home-made cluster layer).

`init()` joins the process group that torchrun's environment describes (gloo on CPU, nccl on GPU) and
returns this process's `Dist` (rank 0 of 1 when not launched by torchrun). `wrap(model, strategy, dist)`
makes the module that the training step calls: the model itself (one process), DistributedDataParallel
("ddp"), or FSDP2's `fully_shard` applied per decoder layer and then to the root ("fsdp").

Every rank sees the same global batch and trains on its own contiguous slice of rows (`shard_rows`); losses
are normalised by the *global* count of target tokens, so N processes compute the same gradient as one
process on the whole batch. MoE expert loads are all-reduced before the correction-bias update, so every
rank applies the same update (DDP is told not to broadcast buffers over it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from openr2.train.config import STRATEGIES


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str | torch.device = "cpu") -> Dist:
    """Join torchrun's process group (once); a single plain process gets Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        torch_dist.init_process_group(backend)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Dist:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def shard_rows(batch: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's contiguous slice of the global batch's rows."""
    if not dist.enabled:
        return batch
    rows = batch.shape[0]
    if rows % dist.world_size:
        raise ValueError(f"batch_size={rows} is not divisible by the world size {dist.world_size}")
    per = rows // dist.world_size
    return batch[dist.rank * per:(dist.rank + 1) * per]


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def shutdown(dist: Dist) -> None:
    """Leave the process group once every rank is done: a rank that tears gloo down while a peer is still
    working (rank 0 saving, say) can abort the whole job with "terminate called without an active exception"."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, dist: Dist, local_params: list[str] = ()) -> torch.nn.Module:
    """The module the training step calls. FSDP shards `model` in place (its parameters become DTensors).
    DDP and FSDP leave `local_params` (names) alone: each rank holds its own (expert parallelism's experts;
    FSDP's `ignored_params`: neither sharded nor reduced)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy {strategy!r}: expected one of {STRATEGIES}")
    if not dist.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model.device.index] if model.device.type == "cuda" else None
        if local_params:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(local_params))
        # Correction biases are updated identically on every rank from all-reduced loads: no broadcast.
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    named = dict(model.named_parameters())
    ignored = {named[n] for n in local_params} or None
    for layer in list(model.layers) + list(model.mtp):
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
