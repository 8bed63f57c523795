"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4): the residual is `hc_mult` streams instead of
one, and each sublayer reads a weighted sum of them and writes back into all of them.

Per token, from the RMS-normalised (unweighted) concatenation of the n streams, one linear map `fn` gives
three sets of logits, each with its own scalar `scale` and a bias from `base`:
- pre  = sigmoid(.) + eps          [n]: the sublayer's input is sum_k pre_k X_k;
- post = 2 sigmoid(.)              [n]: the sublayer's output is added to stream k times post_k;
- comb = softmax_rows(.) + eps     [n, n]: projected towards a doubly-stochastic matrix by Sinkhorn (columns
  first, then hc_sinkhorn_iters - 1 rounds of rows and columns, each dividing by sum + eps); the streams
  are mixed as X'_k = sum_j comb[j, k] X_j (comb transposed: it is not symmetric).
Projection and Sinkhorn run in float32. `HyperHead` collapses the streams before the final norm with
sigmoid weights alone.

Shape legend: B batch, T tokens, n streams (hc_mult), D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openr2.config import ModelConfig


def _normed_streams(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, T, n, D] -> float32 [B, T, n*D] divided by its RMS (no weight)."""
    flat = x.flatten(2).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] positive -> near doubly-stochastic: columns normalised, then iters - 1 x (rows, columns)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.n, self.iters, self.hc_eps, self.norm_eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, n, D] -> (sublayer input [B, T, D], post [B, T, n], comb [B, T, n, n]) in float32 weights."""
        n = self.n
        mixes = F.linear(_normed_streams(x, self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s = self.scale.float()
        pre = torch.sigmoid(pre_w * s[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s[1] + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * s[2] + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
        return collapsed, post, comb


def hyper_residual(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k out + sum_j comb[j, k] X_j: x [B, T, n, D], out [B, T, D] -> [B, T, n, D]."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


class HyperHead(nn.Module):
    """The final collapse of the streams: sum_k (sigmoid(scale . fn x + base)_k + eps) X_k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(_normed_streams(x, self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
