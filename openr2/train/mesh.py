"""The process layout of a torchrun job as a DeviceMesh: pipeline stages x data parallelism, with expert
parallelism inside the data-parallel ranks.

    world = pp * dp,  dp = edp * ep     mesh dims ("pp", "edp", "ep"), ranks row-major (pp outermost)

- "pp": the ranks that hold the stages of one pipeline (same data-parallel index): stage activations travel
  between them (point to point).
- "dp" (= "edp" x "ep" flattened): the data-parallel replicas of one stage: each trains on its rows of the
  global batch; replicated gradients are summed over it.
- "ep": the ranks that split one stage's routed experts between them (all-to-all dispatch and combine);
  "edp": the replicas of one expert shard (their expert gradients are summed over it).

Every process group is a sub-mesh's group; nothing here is a home-made cluster layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from openr2.train.distributed import Dist


@dataclass
class Layout:
    """This process's place in the mesh; groups are None on one process."""

    pp: int
    dp: int
    ep: int
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    mesh: DeviceMesh | None = None

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def group(self, dim: str):
        """The process group of mesh dimension `dim` ("pp", "dp", "ep", "edp") that holds this rank."""
        if self.mesh is None:
            return None
        if dim == "dp":
            return self.mesh["edp", "ep"]._flatten("dp").get_group()
        return self.mesh[dim].get_group()


def build(dist: Dist, pp: int = 1, ep: int = 1, device: str | torch.device = "cpu") -> Layout:
    """The layout of `dist.world_size` processes into pp stages x dp replicas (ep of them splitting the
    experts); refused with the reason when the numbers do not fit."""
    world = dist.world_size
    for name, n in (("pipeline_parallel", pp), ("expert_parallel", ep)):
        if n < 1:
            raise ValueError(f"{name}={n}: must be at least 1")
    if world % pp:
        raise ValueError(f"pipeline_parallel={pp} does not divide the world size {world} "
                         f"(torchrun --nproc-per-node must be a multiple of it)")
    dp = world // pp
    if dp % ep:
        raise ValueError(f"expert_parallel={ep} does not divide the {dp} data-parallel ranks of each pipeline "
                         f"stage (world size {world} / pipeline_parallel {pp})")
    if world == 1:
        return Layout(1, 1, 1)
    mesh = init_device_mesh(torch.device(device).type, (pp, dp // ep, ep), mesh_dim_names=("pp", "edp", "ep"))
    coords = mesh.get_coordinate()
    pp_rank, edp_rank, ep_rank = coords
    return Layout(pp, dp, ep, pp_rank, edp_rank * ep + ep_rank, ep_rank, mesh)
