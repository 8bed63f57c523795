"""The sparse-attention selection's top-k over long score rows, exact and faster than one torch.topk there.

A decode step's indexer scores N keys (V3.2) or compressed entries (V4's CSA) and keeps the best k (2048 /
512 in the releases; N up to 1M / 256K). `top_k_indices` finds them in two stages, both exact:

1. the maximum of each group of GROUP consecutive scores (a memory-bound pass), and the k groups whose
   maxima are largest (a top-k over N / GROUP values);
2. the top k among those k groups' k * GROUP scores (and the N % GROUP trailing ones, grouped with none).

Why nothing is lost: a score x outside the candidate groups has k groups ranked above its own, each holding
a score >= x (its maximum), so at least k candidates are >= x: x is never needed to make up the top k (at
most it ties with the k-th). Hence the selected *values* are torch.topk's, as a multiset, in the same
descending order, and every score above the k-th value is selected, as there. Tie rule: where several scores
equal the k-th value (-inf ones included: a masked score or one a query cannot see yet), which of the tied
indices are taken may differ from torch.topk's pick (each is a valid top-k), and tied selected scores may
come in another order. Indices are always in [0, N), none twice.

Rows shorter than TWO_STAGE_MIN_RATIO * k * GROUP, and k >= N, go to torch.topk directly: the two stages
only pay when the candidate groups are a small part of the row.
"""

from __future__ import annotations

import torch

GROUP = 32  # scores per group of the first stage
TWO_STAGE_MIN_RATIO = 4  # rows of at least this many times the candidates' k * GROUP scores use two stages


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [..., N] -> indices [..., min(k, N)] (int64) of the largest scores along the last dimension,
    in descending order of score: the values torch.topk selects (see the module docstring's tie rule)."""
    if k < 0:
        raise ValueError(f"top-k needs k >= 0, got {k}")
    n = scores.shape[-1]
    k = min(k, n)
    lead, groups = scores.shape[:-1], n // GROUP
    if k == 0 or groups <= k or n < TWO_STAGE_MIN_RATIO * k * GROUP:  # every group would be a candidate
        return scores.topk(k, dim=-1).indices
    body = scores[..., : groups * GROUP].reshape(*lead, groups, GROUP)
    best_groups = body.amax(dim=-1).topk(k, dim=-1).indices  # [..., k]
    candidates = body.gather(-2, best_groups[..., None].expand(*lead, k, GROUP))  # [..., k, GROUP]
    index = best_groups[..., None] * GROUP + torch.arange(GROUP, device=scores.device)  # their indices
    candidates, index = candidates.reshape(*lead, k * GROUP), index.reshape(*lead, k * GROUP)
    if n > groups * GROUP:  # the trailing scores that fill no group are always candidates
        tail = torch.arange(groups * GROUP, n, device=scores.device)
        candidates = torch.cat((candidates, scores[..., groups * GROUP :]), dim=-1)
        index = torch.cat((index, tail.expand(*lead, -1)), dim=-1)
    return index.gather(-1, candidates.topk(k, dim=-1).indices)
