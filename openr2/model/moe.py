"""DeepSeekMoE: the router (softmax / sigmoid gates, group-limited top-k, correction bias) and the experts.

Routed experts are stored stacked: gate_up_proj [E, 2I, D] (rows [0, I) gate, [I, 2I) up) and
down_proj [E, D, I], the layout transformers keeps in memory. The expert path is the caller's choice
(`moe_impl`, MOE_IMPLS; nothing here asks torch whether it is compiling or recording gradients):
- `looped`: for each expert, gather its tokens, run it, add back (the reference);
- `grouped` (the default): sort (token, slot) pairs by expert once, one matmul per expert over contiguous
  rows, one activation over all rows, one scatter-add back (the fast path); up to 8 pairs whose routing
  weights need no gradient (decode) run each pair directly instead. Differentiable (autograd over it).
  When autograd records nothing (prefill) it runs in chunks of experts with small temporaries, the
  activation in place, and one weighted embedding_bag back (`_grouped_inference`): same products, same
  numbers to rounding, fewer passes over memory.
- `fused`: `grouped` as one autograd Function with a hand-written backward (`_GroupedExperts`): the
  training path (Trainer, GRPO), same numbers, fewer copies (the K rows of a token summed by one
  embedding_bag, forward and backward); one dtype and no autocast, else `grouped`.
- `decode`: the compiled decode step's path (engine/compiled.py): no host sync, decode-sized batches.
The router computes in float32 from float32 weights whatever the model dtype (as transformers does), so
near-ties pick the same experts.

Shape legend: N tokens (B*T flattened), D hidden, I moe_intermediate_size, E routed experts, K experts
per token, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from openr2.config import ModelConfig
from openr2.model.layers import MLP, linear, records_grad, silu_mul

MOE_IMPLS = ("looped", "grouped", "fused", "decode")


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.method = config.topk_method
        self.num_groups, self.topk_groups = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        # dynamic sparsity (see _keep_top_p): 0 = fixed top-k; `extra` is the last forward's smooth count
        self.top_p, self.min_k = float(config.routing_top_p), config.routing_min_k
        self.extra: torch.Tensor | None = None
        if self.method == "noaux_tc":
            # Aux-loss-free balancing bias: selection only, never in the weights; updated outside the optimizer.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, kernel_impl: str = "eager") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] float32, expert ids [N, K], scores [N, E] float32)."""
        x, w = (t if t.dtype == torch.float32 else t.float() for t in (x, self.weight))  # a float32 router
        logits = linear(x, w, kernel_impl=kernel_impl)
        scores = logits.sigmoid() if self.method == "noaux_tc" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
        if self.method != "greedy" and self.topk_groups < self.num_groups:
            grouped = choice.view(-1, self.num_groups, self.num_experts // self.num_groups)
            if self.method == "noaux_tc":  # V3: a group scores the sum of its two best experts
                # the best, plus the best of the rest (its position masked: a tie counts twice, as with
                # topk(2)); the same sum as topk(2).values.sum(-1), a third faster on CPU
                best, at = grouped.max(dim=-1, keepdim=True)
                group_scores = (best + grouped.scatter(-1, at, float("-inf")).amax(dim=-1, keepdim=True))[..., 0]
            else:  # V2 group_limited_greedy: a group scores its best expert
                group_scores = grouped.amax(dim=-1)
            kept = group_scores.topk(self.topk_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            # in place unless `choice` is `scores` itself (softmax gates: the weights are read from scores)
            choice = (grouped.masked_fill_ if choice is not scores else grouped.masked_fill)(
                dropped[:, :, None], float("-inf")).flatten(1)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.top_p:
            weights, ids = self._keep_top_p(weights, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids, scores


    def _keep_top_p(self, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic sparsity: of the top_k candidates, best gate first, keep each one while the normalised gates
        before it sum to less than top_p (and the first min_k whatever they sum to); the others get weight 0
        (MoE.forward runs only the kept pairs). `extra` = per token, sum over the slots past min_k of
        relu(top_p - mass before the slot) / top_p: each term in [0, 1], > 0 exactly when its slot is kept,
        so its mean is a differentiable stand-in for the experts kept beyond min_k (the compute penalty)."""
        weights, at = weights.sort(dim=-1, descending=True)
        ids = ids.gather(1, at)
        share = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        before = share.cumsum(dim=-1) - share
        kept = before < self.top_p
        kept[:, : self.min_k] = True
        if weights.requires_grad:  # training only (no module attribute written in compiled or exported steps)
            self.extra = ((self.top_p - before[:, self.min_k:]).clamp(min=0).sum(-1) / self.top_p).mean()
        return weights * kept, ids


class RoutedExperts(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.intermediate = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, impl: str = "grouped"):
        """x [N, D], weights [N, K], ids [N, K] -> sum_k weights[:, k] * expert_{ids[:, k]}(x)  [N, D]."""
        if impl in ("grouped", "fused"):
            return self._grouped(x, weights, ids, fused=impl == "fused")
        if impl == "looped":
            return self._looped(x, weights, ids)
        if impl == "decode":
            return self._tensor_only(x, weights, ids)
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def _looped(self, x, weights, ids):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(ids == e)
            if token.numel():
                y = self._expert(e, x[token]) * weights[token, slot, None]
                out.index_add_(0, token, y.to(x.dtype))
        return out

    def _few(self, x, weights, ids):
        """Decode-sized batches: run each token's chosen experts directly (no sort, no scatter)."""
        out = torch.empty_like(x)
        for n, (experts, gains) in enumerate(zip(ids.tolist(), weights.tolist())):
            row = x[n : n + 1]
            acc = self._expert(experts[0], row) * gains[0]
            for e, g in zip(experts[1:], gains[1:]):
                acc += self._expert(e, row) * g
            out[n] = acc[0]
        return out

    def _tensor_only(self, x, weights, ids):
        """The path for compiled decode: no host sync (no counts as Python ints), decode-sized N only.

        Up to E (token, slot) pairs, each pair multiplies by its expert's weights indexed by expert id
        (inductor fuses the index into the product, so nothing is copied); beyond that, every expert runs
        on every token and a [N, E] gain matrix keeps the chosen ones (reads each expert once).
        """
        N, K = ids.shape
        if N * K <= self.num_experts:
            flat = ids.flatten()
            if x.device.type == "cpu":
                return experts_per_pair(x, weights, ids, self.gate_up_proj[flat], self.down_proj[flat])
            h = torch.bmm(x.repeat_interleave(K, 0)[:, None], self.gate_up_proj.index_select(0, flat).transpose(1, 2))
            gate, up = h.chunk(2, dim=-1)
            y = torch.bmm(F.silu(gate) * up, self.down_proj.index_select(0, flat).transpose(1, 2))[:, 0]
            return (y * weights.flatten()[:, None]).view(N, K, -1).sum(1).to(x.dtype)
        h = torch.matmul(x[None], self.gate_up_proj.transpose(1, 2))  # [E, N, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch.matmul(F.silu(gate) * up, self.down_proj.transpose(1, 2))  # [E, N, D]
        gains = torch.zeros(N, self.num_experts, dtype=weights.dtype, device=x.device).scatter_(1, ids, weights)
        return torch.einsum("end,ne->nd", y.to(gains.dtype), gains).to(x.dtype)

    def _grouped(self, x, weights, ids, fused: bool = False):
        N, K = ids.shape
        if N * K <= _FEW_PAIRS and not weights.requires_grad:  # _few reads the weights as Python floats
            return self._few(x, weights, ids)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        token = order // K  # the token each sorted (token, slot) pair came from
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        if fused and _fused_ok(x, weights, self.gate_up_proj, self.down_proj):
            return _GroupedExperts.apply(x, weights, self.gate_up_proj, self.down_proj, token, order, counts)
        if not records_grad(x, weights, self.gate_up_proj, self.down_proj):
            return _grouped_inference(x, weights, self.gate_up_proj, self.down_proj, token, order, counts)
        # index_select, not x[token]: the same gather, but advanced indexing is ~5x slower on CPU.
        h = _segment_mm(x.index_select(0, token), self.gate_up_proj, counts)
        gate, up = h.chunk(2, dim=-1)
        y = _segment_mm(F.silu(gate) * up, self.down_proj, counts)
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def _grouped_inference(x, weights, gate_up, down, token, order, counts):
    """The grouped path when autograd records nothing (prefill): the same products with fewer and smaller
    temporaries. Experts go in chunks of whole experts whose first product fits _CHUNK_BYTES: the chunk's
    rows gathered, each expert's first product into its rows, the activation written over the gate half,
    each expert's second product straight into its rows of y. A [N*K, 2I] tensor for all experts at once
    costs page faults at every forward (glibc hands such sizes back to the OS) and a pass through memory
    for the activation; an expert at a time costs a dispatch and a thread wake-up per small operation. The
    K rows of each token are then summed with their routing weights by one embedding_bag (gather, weigh
    and add in one pass: the bags are the tokens, the "embeddings" the expert outputs) instead of a
    weighting pass and a scatter-add into zeros (about 3x slower on CPU)."""
    (N, K), E, inter = weights.shape, len(counts), down.shape[2]
    y = x.new_empty(order.numel(), down.shape[1])  # [P, D], unweighted expert outputs, pairs sorted by expert
    w_gu, w_d = gate_up.transpose(1, 2).unbind(0), down.transpose(1, 2).unbind(0)
    max_rows = max(1, _CHUNK_BYTES // (2 * inter * x.element_size()))
    first = e = 0  # the chunk's first row and first expert
    while e < E:
        stop, rows = e, 0
        while stop < E and (rows == 0 or rows + counts[stop] <= max_rows):  # whole experts, at least one
            rows, stop = rows + counts[stop], stop + 1
        if rows:
            part = counts[e:stop]
            xs = x.index_select(0, token[first : first + rows])
            h = xs.new_empty(rows, 2 * inter)
            for x_e, h_e, w, n in zip(xs.split(part), h.split(part), w_gu[e:stop], part):
                if n:
                    torch.mm(x_e, w, out=h_e)
            act = silu_mul(h[:, :inter], h[:, inter:])  # [rows, I], in h
            for a_e, y_e, w, n in zip(act.split(part), y[first : first + rows].split(part), w_d[e:stop], part):
                if n:
                    torch.mm(a_e, w, out=y_e)
        first, e = first + rows, stop
    inverse = _inverse_permutation(order)  # where each token's k-th pair sits among the sorted rows
    return F.embedding_bag(inverse.view(N, K), y, mode="sum",
                           per_sample_weights=weights if weights.dtype == y.dtype else weights.to(y.dtype))


def experts_per_pair(x, weights, ids, gate_up, down):
    """Compiled decode: token n's k-th expert applied with that pair's own weights, gate_up [N*K, 2I, D] and
    down [N*K, D, I] (indexed by expert id, or dequantized: inductor fuses either into the loads), each as a
    product and a sum (one fused reduction reading the weights once, see layers.linear) -> [N, D]."""
    N, K = ids.shape
    h = (x.repeat_interleave(K, 0)[:, None, :] * gate_up).sum(-1)
    gate, up = h.chunk(2, dim=-1)
    y = ((F.silu(gate) * up)[:, None, :] * down).sum(-1)
    return (y * weights.flatten()[:, None].to(y.dtype)).view(N, K, -1).sum(1).to(x.dtype)


_CHUNK_BYTES = 4 << 20  # prefill experts: the first product of a chunk of experts fits this (see above)
_FEW_PAIRS = 8  # up to this many (token, expert) pairs, sorting and scattering cost more than they save


def _segment_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x sorted by expert, counts[e] rows each -> concat_e x_e @ w[e]^T  (w [E, out, in]).
    The same products either way; written in place unless autograd records them (it cannot record out=)."""
    if not records_grad(x, w):
        out = x.new_empty(x.shape[0], w.shape[1])  # write in place: no concat copy at inference
        # one split and one unbind for all experts (a dispatcher call per expert and operand adds up)
        for x_e, w_e, out_e, n in zip(x.split(counts), w.transpose(1, 2).unbind(0), out.split(counts), counts):
            if n:
                torch.mm(x_e, w_e, out=out_e)
        return out
    parts, start = [], 0
    for e, n in enumerate(counts):
        if n:
            parts.append(x[start : start + n] @ w[e].t())
            start += n
    return torch.cat(parts) if parts else x.new_empty(0, w.shape[1])


def _fused_ok(x, weights, gate_up, down) -> bool:
    """The training path's hand-written backward covers one dtype throughout and no autocast."""
    return (x.dtype == weights.dtype == gate_up.dtype == down.dtype
            and not torch.is_autocast_enabled(x.device.type))


class _GroupedExperts(torch.autograd.Function):
    """The grouped expert path with a hand-written backward (training).

    Autograd over the plain grouped code records per-expert slices of the rows and of the stacked
    weights; the backward of each slice allocates a zero tensor of the whole operand and the partial
    gradients are summed (E full-size fills and adds per matmul), and chunk/cat add copies. Here each
    expert's forward and backward matmuls write straight into their rows of preallocated outputs.

    x [N, D], weights [N, K], gate_up [E, 2I, D], down [E, D, I], token/order [N*K] (pairs sorted by
    expert: pair p came from token[p], flat slot order[p]), counts[e] pairs per expert -> [N, D].
    """

    @staticmethod
    def forward(ctx, x, weights, gate_up, down, token, order, counts):
        N, K = weights.shape
        inter = down.shape[2]
        xs = x.index_select(0, token)  # [P, D]
        h = _segment_mm(xs, gate_up, counts)  # [P, 2I] (grad is off here: written in place)
        act = F.silu(h[:, :inter]).mul_(h[:, inter:])  # [P, I]
        y = _segment_mm(act, down, counts)  # [P, D], unweighted
        # each token's K rows summed with their weights in one pass (see _grouped_inference)
        inverse = _inverse_permutation(order)
        out = F.embedding_bag(inverse.view(N, K), y, mode="sum", per_sample_weights=weights)
        ctx.save_for_backward(xs, h, act, y, weights, gate_up, down, token, order, inverse)
        ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xs, h, act, y, weights, gate_up, down, token, order, inverse = ctx.saved_tensors
        counts, inter = ctx.counts, down.shape[2]
        N, K = weights.shape
        need_x, need_w, need_gu, need_down = ctx.needs_input_grad[:4]
        gy = grad_out.index_select(0, token)  # [P, D]: d loss / d (w * y)
        grad_weights = None
        if need_w:
            per_pair = (gy * y).sum(-1)
            grad_weights = per_pair.index_select(0, inverse).view(N, K)
        gy.mul_(weights.reshape(-1).index_select(0, order)[:, None])  # d loss / d y
        grad_down = _segment_mm_grad_w(gy, act, counts, down) if need_down else None
        g_act = _segment_mm(gy, down.transpose(1, 2), counts)  # [P, I]
        del gy
        gate, up = h[:, :inter], h[:, inter:]
        g_h = torch.empty_like(h)  # [d gate | d up], each written in place
        g_gate, g_up = g_h[:, :inter], g_h[:, inter:]
        torch.ops.aten.silu.out(gate, out=g_up).mul_(g_act)  # d up = g_act * silu(gate)
        torch.mul(g_act, up, out=g_gate)
        torch.ops.aten.silu_backward.grad_input(g_gate, gate, grad_input=g_gate)  # d gate
        del g_act
        grad_gate_up = _segment_mm_grad_w(g_h, xs, counts, gate_up) if need_gu else None
        grad_x = None
        if need_x:  # each token's K rows summed, as in the forward
            g_xs = _segment_mm(g_h, gate_up.transpose(1, 2), counts)  # [P, D]
            grad_x = F.embedding_bag(inverse.view(N, K), g_xs, mode="sum")
        return grad_x, grad_weights, grad_gate_up, grad_down, None, None, None


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[order[p]] = p: where each (token, slot) pair sits among the pairs sorted by expert."""
    return torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))


def _segment_mm_grad_w(g: torch.Tensor, x: torch.Tensor, counts: list[int], w: torch.Tensor) -> torch.Tensor:
    """Gradient of the stacked weight w [E, out, in] of a segment mm: grad[e] = g_e^T @ x_e (zero if empty)."""
    grad = torch.empty_like(w)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(g[start : start + n].t(), x[start : start + n], out=grad[e])
            start += n
        else:
            grad[e].zero_()
    return grad


class MoE(nn.Module):
    """y = sum_{i in TopK} g_i E_i(x) + shared(x).

    While training it also keeps what balancing needs: `expert_load` counts the tokens routed to each
    expert since the last `update_correction_bias`, and `aux_loss` is the last forward's sequence-wise
    balance loss (DeepSeek-V3's L_Bal, weight aux_loss_alpha) plus, with dynamic sparsity, the compute
    penalty (routing_compute_penalty times Gate.extra); None when both are off or not training.

    Dynamic sparsity (config.routing_top_p > 0): the gate gives dropped candidates weight 0 and the experts
    run on the kept pairs only (each a row: every expert path, EP included, sees K = 1); the compiled
    decode path ("decode", no host sync) runs all top_k candidates, the dropped ones with weight 0.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = RoutedExperts(config)
        n_shared = config.n_shared_experts
        self.shared_experts = MLP(config.hidden_size, n_shared * config.moe_intermediate_size) if n_shared else None
        self.aux_loss_alpha = config.aux_loss_alpha
        self.compute_penalty = config.routing_compute_penalty
        # not a buffer (never saved or cast); on the CPU explicitly, also when the model is built on "meta"
        self.expert_load = torch.zeros(config.n_routed_experts, device="cpu")
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, moe_impl: str = "grouped", kernel_impl: str = "eager") -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids, scores = self.gate(flat, kernel_impl)
        if self.training:
            self._balance_stats(ids, scores, shape[0], weights if self.gate.top_p else None)
        if self.gate.top_p and moe_impl != "decode":
            out = self._kept_pairs_only(flat, weights, ids, moe_impl).view(shape)
        else:  # fixed top-k; or the compiled decode step (no host sync): dropped pairs run with weight 0
            out = self.experts(flat, weights, ids, moe_impl).view(shape)
        if self.shared_experts is not None:
            shared = self.shared_experts(x, kernel_impl)
            out = out + shared if records_grad(out, shared) else out.add_(shared)
        return out

    def _kept_pairs_only(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, moe_impl: str):
        """Dynamic sparsity: the experts run on the kept (token, expert) pairs only, one pair a row."""
        token, slot = (weights != 0).nonzero(as_tuple=True)
        y = self.experts(x.index_select(0, token), weights[token, slot, None], ids[token, slot, None], moe_impl)
        return torch.zeros_like(x).index_add(0, token, y)

    def _balance_stats(self, ids: torch.Tensor, scores: torch.Tensor, batch: int,
                       weights: torch.Tensor | None = None) -> None:
        """Loads and the aux loss; `weights` (dynamic sparsity) tells the kept pairs (weight != 0)."""
        E, K = self.gate.num_experts, self.gate.top_k
        kept = None if weights is None else weights != 0
        counts = torch.bincount(ids.flatten() if kept is None else ids[kept], minlength=E)
        self.expert_load = self.expert_load.to(counts.device) + counts.float()
        terms = []
        if self.aux_loss_alpha:
            # per sequence: f_i = E / (K T) * #tokens choosing i, P_i = mean_t s'_i,t (s' normalised per token)
            T = ids.shape[0] // batch
            chosen = torch.zeros(batch * T, E, device=ids.device).scatter_(
                1, ids, 1.0 if kept is None else kept.float()).view(batch, T, E)
            f = chosen.sum(1) * (E / (K * T))
            p = (scores / scores.sum(-1, keepdim=True)).view(batch, T, E).mean(1)
            terms.append(self.aux_loss_alpha * (f * p).sum(-1).mean())
        if kept is not None and self.compute_penalty and weights.requires_grad:  # extra: this forward's
            terms.append(self.compute_penalty * self.gate.extra)  # fewer experts per token (dynamic sparsity)
        self.aux_loss = sum(terms) if terms else None


@torch.no_grad()
def update_correction_bias(model: nn.Module, gamma: float) -> list[dict]:
    """Auxiliary-loss-free balancing, after an optimizer step: b_i += gamma * sign(mean load - load_i) for
    every noaux_tc gate, from the load accumulated since the last call (reset here). Returns per MoE layer
    {"max_over_mean": ..., "tokens": ...}. Under data parallelism, all-reduce `expert_load` first."""
    stats = []
    for module in model.modules():
        if isinstance(module, MoE) or getattr(module, "counts_expert_load", False):  # V4MoE too (moe_v4.py)
            load = module.expert_load
            mean = load.mean()
            if load.sum() > 0:
                stats.append({"max_over_mean": (load.max() / mean).item(), "tokens": int(load.sum().item() /
                                                                                         module.gate.top_k)})
                if hasattr(module.gate, "e_score_correction_bias") and gamma:
                    bias = module.gate.e_score_correction_bias
                    bias += gamma * torch.sign(mean - load).to(bias)
            module.expert_load = torch.zeros_like(load)
    return stats
