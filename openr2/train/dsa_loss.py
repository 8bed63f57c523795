"""The lightning indexer's training loss of DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556), applied
from outside the model: what each attention layer saw is recorded by forward pre-hooks, and the loss is computed
from it afterwards through the model's own pieces (`Indexer.scores`, differentiable; `MLA.attention_probs`).

For query t of a layer, the target p_t is the main attention's distribution summed over heads and
L1-normalised; the indexer's distribution is softmax(I_t) over the same keys. The loss is KL(p_t || softmax(I_t)),
averaged over queries, rows and layers, over the keys the forward attended to:
- dense warm-up: every visible key (the forward ran dense: `dense_attention`);
- sparse stage: the selected keys S_t only (the indexer's top-k as the forward chose them, recorded from the
  indexer's own output), where the sparse attention's distribution lives.
The differentiable scores are `train_index_scores`: the indexer's formula (model/indexer.py, `index_scores`) with
the per-head products as one [T H, D] x [D, S] matrix product per row, whose backward does not materialise a
[B, T, D, S] broadcast as the model's per-query products would (tests compare the two in float64).
In both the indexer's inputs (the layer input x and MLA's q latent) are detached and the target carries no
gradient, so this loss trains the indexer alone; the language-model loss never reaches the indexer (its
selection runs without autograd, model/indexer.py). Owns no optimisation and no stages (train/dsa.py).

Shape legend: B batch, T tokens (queries and keys: no cache), H attention heads, K selected keys.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from openr2.model.indexer import selection_mask
from openr2.model.mla import MLA


@dataclass
class LayerInputs:
    """What one attention layer was called with (a forward without a cache), and its indexer's selection."""
    mla: MLA
    x: torch.Tensor  # [B, T, D], the layer's input (after input_layernorm)
    cos: torch.Tensor  # [B, T, R/2]
    sin: torch.Tensor
    topk: torch.Tensor | None = None  # [B, T, K]; None: the layer attended densely


def _indexed_attention(model: torch.nn.Module) -> list[MLA]:
    return [m for m in model.modules() if isinstance(m, MLA) and m.indexer is not None]


@contextlib.contextmanager
def recorded_attention_inputs(model: torch.nn.Module) -> Iterator[list[LayerInputs]]:
    """Within: every call of an attention layer with an indexer and no cache appends its inputs and its indexer's
    output (the selection), in call order."""
    seen: list[LayerInputs] = []

    def selection(indexer, args, kwargs, out):
        if seen and seen[-1].mla.indexer is indexer and kwargs.get("cache", args[5] if len(args) > 5 else None) is None:
            seen[-1].topk = out

    def hook(module, args, kwargs):
        cache = args[4] if len(args) > 4 else kwargs.get("cache")
        if cache is None:
            x, _, cos, sin = (list(args) + [None] * 4)[:4]
            x = kwargs.get("x", x)
            cos, sin = kwargs.get("cos", cos), kwargs.get("sin", sin)
            seen.append(LayerInputs(module, x, cos, sin))

    layers = _indexed_attention(model)
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    handles += [m.indexer.register_forward_hook(selection, with_kwargs=True) for m in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def dense_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within: every layer attends densely whatever the context (each indexer keeps every key: an index_topk
    no context reaches, so it selects nothing away and MLA runs its dense code); restored afterwards."""
    layers = _indexed_attention(model)
    saved = [m.indexer.index_topk for m in layers]
    for m in layers:
        m.indexer.index_topk = sys.maxsize
    try:
        yield
    finally:
        for m, k in zip(layers, saved):
            m.indexer.index_topk = k


def kl_to_index_scores(p: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(scores over `support`)) per query: p [B, T, S] (a distribution on `support`, zero elsewhere),
    scores [B, T, S], support [B or 1, T, S] bool -> [B, T]. Keys off the support add nothing (0 log 0 = 0)."""
    log_q = scores.masked_fill(~support, float("-inf")).log_softmax(dim=-1)
    return (torch.xlogy(p, p) - p * log_q.masked_fill(~support, 0.0)).sum(-1)


def head_summed_target(probs: torch.Tensor) -> torch.Tensor:
    """probs [B, H, T, S] (each head's attention) -> p [B, T, S]: summed over heads, L1-normalised per query."""
    p = probs.sum(1)
    return p / p.sum(-1, keepdim=True)


def train_index_scores(indexer, x: torch.Tensor, xq: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    """The causal index scores [B, T, T] of T tokens among themselves (float32 at least), differentiable:
    I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s] / sqrt(D)), -inf for s > t."""
    q = indexer.queries(xq, cos, sin)  # [B, T, H, D]
    k = indexer.keys(x, cos, sin)  # [B, T, D]
    w = indexer.head_weights(x)  # [B, T, H]
    B, T, H, D = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    s = torch.bmm(q.reshape(B, T * H, D).to(dtype), k.transpose(1, 2).to(dtype)) * indexer.scale
    scores = torch.bmm(w.to(dtype).reshape(B * T, 1, H), torch.relu(s).view(B * T, H, T)).view(B, T, T)
    visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]
    return scores.masked_fill(~visible, float("-inf"))


def layer_loss(rec: LayerInputs) -> torch.Tensor:
    """The mean over queries and rows of one layer's KL (a scalar with gradients into its indexer only)."""
    mla = rec.mla
    x = rec.x.detach()
    T = x.shape[1]
    with torch.no_grad():
        xq = x if mla.q_lora_rank is None else mla.q_a_layernorm(mla.q_a_proj(x))
    scores = train_index_scores(mla.indexer, x, xq, rec.cos, rec.sin)
    support = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]
    if rec.topk is not None:  # the keys the forward attended to
        support = support & selection_mask(rec.topk, T)
    with torch.no_grad():
        p = head_summed_target(mla.attention_probs(x, rec.cos, rec.sin, rec.topk)).to(scores.dtype)
    return kl_to_index_scores(p, scores, support).mean()


def indexer_loss(records: list[LayerInputs]) -> torch.Tensor:
    """The mean of `layer_loss` over the recorded layers."""
    if not records:
        raise ValueError("indexer loss: no attention layer with an indexer ran without a cache")
    return torch.stack([layer_loss(r) for r in records]).mean()
