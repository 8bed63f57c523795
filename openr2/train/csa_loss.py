"""The training loss of DeepSeek-V4's CSA indexer: train/dsa_loss.py's V3.2 KL, over compressed entries.

For query t of a CSA layer, the target p_t is the main attention's probability of each compressed entry
(the layer's own 4:1 entries; its softmax also covers the window keys and the sink), summed over heads and
L1-normalised over the entries; the indexer's distribution is softmax(I_t) over the same entries, I its
scores (model/compressed.py: `compressed_index_scores` of its queries over its own compressor's entries).
The loss is KL(p_t || softmax(I_t)) over the entries the forward attended to (the indexer's top-k of the
visible ones: V3.2's sparse stage; V4 has no dense warm-up here), averaged over the queries that attended to
any entry (the first rate - 1 positions see none), rows and CSA layers.

The indexer's inputs (the layer input x and the q latent) are detached and the target carries no gradient,
so the loss trains the indexer (its query projection, head weights and its own compressor) alone; the
language-model loss never reaches it (its selection is discrete). Inputs are recorded by forward pre-hooks
of the attention layers (forwards without a cache, as training runs them).

Shape legend: B batch, T tokens, N compressed entries, H heads, S window keys of a query block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from openr2.model.compressed import WINDOW_QUERY_BLOCK, CompressedAttention, CompressorState, entry_visible
from openr2.model.topk import top_k_indices
from openr2.train.dsa_loss import kl_to_index_scores


@dataclass
class CSAInputs:
    """What one CSA layer was called with (a forward without a cache)."""
    attn: CompressedAttention
    x: torch.Tensor  # [B, T, D], the layer's input (after its input norm)
    positions: torch.Tensor  # [B, T]
    ropes: dict


def csa_layers(model: torch.nn.Module) -> list[CompressedAttention]:
    return [m for m in model.modules() if isinstance(m, CompressedAttention)
            and getattr(m.compressor, "indexer", None) is not None]


@contextlib.contextmanager
def recorded_csa_inputs(model: torch.nn.Module) -> Iterator[list[CSAInputs]]:
    """Within: every call of a CSA layer without a cache appends its inputs, in call order."""
    seen: list[CSAInputs] = []

    def hook(module, args, kwargs):
        names = ("x", "positions", "ropes", "cache")
        given = {**dict(zip(names, args)), **kwargs}
        if given.get("cache") is None:
            seen.append(CSAInputs(module, given["x"], given["positions"], given["ropes"]))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in csa_layers(model)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def index_scores(attn: CompressedAttention, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor,
                 ropes: dict) -> torch.Tensor:
    """The indexer's scores [B, T, N] (float32, -inf on entries not yet complete), differentiable in its
    parameters: the forward's `select` computation without the cache."""
    indexer = attn.compressor.indexer
    cos, sin = ropes["compress"]
    state = CompressorState(entries=indexer(x, ropes["rotary"]), rate=indexer.rate)
    return state.index_scores(*indexer.queries(x, q_latent, cos, sin), positions)


def block_probs(attn: CompressedAttention, q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor,
                positions: torch.Tensor, seen: torch.Tensor, t0: int, t1: int) -> tuple[torch.Tensor, slice]:
    """The main attention's probabilities of queries t0..t1-1 (a block: the forward's window blocks) over
    [the window keys they can see ; every entry] -> ([B, H, t1 - t0, S + N], the keys' slice of kv), the
    sink's column dropped: what the layer's softmax gives them, with entries outside `seen` [B, T, N] masked."""
    lo = max(0, t0 - (attn.window - 1))
    ahead = positions[:, t0:t1, None] - positions[:, None, lo:t1]
    mask = torch.cat(((ahead >= 0) & (ahead < attn.window), seen[:, t0:t1]), dim=-1)  # [B, t, S + N]
    keys = torch.cat((kv[:, lo:t1], entries), dim=1)
    logits = torch.einsum("bthd,bsd->bhts", q[:, t0:t1], keys) * attn.scale
    logits = logits.masked_fill(~mask[:, None], float("-inf")).float()
    sink = attn.sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    return torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1], slice(lo, t1)


@torch.no_grad()
def entry_target(attn: CompressedAttention, x: torch.Tensor, positions: torch.Tensor, ropes: dict,
                 seen: torch.Tensor) -> torch.Tensor:
    """p [B, T, N]: the main attention's probabilities of the entries (over `seen` ones), summed over heads and
    L1-normalised per query (zero rows where a query attended no entry), in query blocks of
    WINDOW_QUERY_BLOCK."""
    cos, sin = ropes["compress"]
    _, q, kv = attn.project(x, cos, sin)
    entries = attn.compressor(x, ropes["rotary"])
    N, T = entries.shape[1], x.shape[1]
    out = []
    for t0 in range(0, T, WINDOW_QUERY_BLOCK):
        probs, _ = block_probs(attn, q, kv, entries, positions, seen, t0, min(T, t0 + WINDOW_QUERY_BLOCK))
        out.append(probs[..., probs.shape[-1] - N :].sum(1))  # [B, t, N]
    p = torch.cat(out, dim=1)
    return p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)


def layer_loss(rec: CSAInputs) -> torch.Tensor | None:
    """The mean KL over the queries of one CSA layer that attended to an entry (None if none did), a scalar
    with gradients into the layer's indexer only."""
    attn, x = rec.attn, rec.x.detach()
    with torch.no_grad():
        q_latent = attn.q_a_norm(attn.q_a_proj(x))
    scores = index_scores(attn, x, q_latent, rec.positions, rec.ropes)  # [B, T, N]
    N = scores.shape[-1]
    if N == 0:
        return None
    picked = top_k_indices(scores.detach(), attn.compressor.indexer.topk)  # the forward's selection
    valid = entry_visible(rec.positions, N, attn.rate).gather(-1, picked)
    support = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picked, valid)
    p = entry_target(attn, x, rec.positions, rec.ropes, support).to(scores.dtype)
    rows = support.any(-1)  # queries with at least one entry (the others' softmax would be over nothing)
    if not rows.any():
        return None
    return kl_to_index_scores(p[rows][None], scores[rows][None], support[rows][None]).mean()


def csa_indexer_loss(records: list[CSAInputs]) -> torch.Tensor:
    """The mean of `layer_loss` over the recorded layers that have one (zero when none attended an entry yet)."""
    if not records:
        raise ValueError("CSA indexer loss: no compressed sparse attention layer ran without a cache")
    losses = [loss for loss in map(layer_loss, records) if loss is not None]
    if not losses:
        return records[0].x.new_zeros((), dtype=torch.float32)
    return torch.stack(losses).mean()

