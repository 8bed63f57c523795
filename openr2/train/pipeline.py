"""Pipeline parallelism (`--pipeline-parallel N --pp-schedule ...`) from outside the pure model, with
`torch.distributed.pipelining` (its PipelineStage and schedules: no home-made pipeline runtime).

The model is split by decoder layer into stages (`split_layers`): the first stage also holds the token
embedding, the last the final norm, the head and the MTP modules. A stage is a `StageModule` whose
submodules are the model's own (same parameter objects, same names: `layers.3.mlp...`), so a stage's
state dict is a part of the single-process one. Between stages travel three tensors per micro-batch:
    x [b, T, D]   the residual stream;
    e [b, T, D]   the token embeddings (MTP depth k reads Emb(t_{i+k}) on the last stage, where the
                  embedding table is not: they come from the first stage, and their gradient goes back);
    aux [1]       the sum of the stages' sequence-wise balance losses so far (the MoE aux loss).
The last stage returns (logits, drafts..., aux) and the schedule's loss function turns them into the
micro-batch's loss.

Schedules and their stages per rank (`stage_indices`):
    1f1b         one stage per rank (Schedule1F1B); needs microbatches >= stages;
    interleaved  two per rank, looped: rank r holds r and r + N (ScheduleInterleaved1F1B);
    zbv          two per rank, V: rank r holds r and 2N - 1 - r (ScheduleZBVZeroBubble, backward split
                 into input and weight parts);
    dualpipev    two per rank, V (ScheduleDualPipeV, DeepSeek's DualPipe in its V form); microbatches >=
                 stages.
What it does not own: the loss (pipeline_trainer.py), the mesh (mesh.py), the experts (expert_parallel.py).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from openr2.model.moe import MoE

SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipev")
STAGES_PER_RANK = {"1f1b": 1, "interleaved": 2, "zbv": 2, "dualpipev": 2}


def stage_indices(schedule: str, pp: int, rank: int) -> list[int]:
    """The stages pipeline rank `rank` of `pp` holds under `schedule`."""
    if schedule == "1f1b":
        return [rank]
    if schedule == "interleaved":
        return [rank, rank + pp]
    if schedule in ("zbv", "dualpipev"):
        return [rank, 2 * pp - 1 - rank]
    raise ValueError(f"pp_schedule={schedule!r}: expected one of {SCHEDULES}")


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Decoder layers of each stage, contiguous and as even as the count allows (a stage may hold none:
    the first then holds only the embedding, the last only the head)."""
    return [range(s * num_layers // num_stages, (s + 1) * num_layers // num_stages) for s in range(num_stages)]


class StageModule(nn.Module):
    """Stage `index` of `num_stages`: the model's layers `layers` (and the embedding on the first stage, the
    final norm, head and MTP on the last); see the module docstring for what travels between stages."""

    def __init__(self, model: nn.Module, index: int, num_stages: int, layers: range, mtp: bool,
                 moe_impl: str = "fused"):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == num_stages - 1
        self.with_mtp, self.moe_impl = mtp, moe_impl
        self._model = [model]  # not a submodule: its method forward_mtp and its rotary (no parameters)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if self.first:
            self.embed_tokens = model.embed_tokens
        if self.last:
            self.norm, self.lm_head = model.norm, model.lm_head
            if mtp:
                self.mtp = model.mtp
        self.moe = [m for m in self.modules() if isinstance(m, MoE)]  # the MTP layers' too
        self.timeline: list[tuple[str, float, float]] | None = None  # (kind, start, end) when recording

    def forward(self, *args: torch.Tensor):
        model = self._model[0]
        if self.first:
            (input_ids,) = args
            x = e = self.embed_tokens(input_ids)
            aux = None
        else:
            x, e, aux = args
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = model.rotary(positions, x.dtype)
        for layer in self.layers.values():
            x = layer(x, positions, cos, sin, None, "naive", self.moe_impl)
        if aux is None:  # nothing balanced yet: a zero (a leaf taking its gradient), so every stage passes
            aux = x.new_zeros(1, dtype=aux_dtype(x.dtype)).requires_grad_(torch.is_grad_enabled())
        if not self.last:
            return x, e, self._add_aux(aux)
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        drafts = model.forward_mtp(hidden, None, positions, self.moe_impl, embeds=e) if self.with_mtp else []
        return (logits, *drafts, self._add_aux(aux))

    def _add_aux(self, aux: torch.Tensor) -> torch.Tensor:
        """aux plus the balance losses of this stage's MoE layers (set by their forwards)."""
        for m in self.moe:
            if m.aux_loss is not None:
                aux = aux + m.aux_loss.to(aux.dtype)
        return aux

    def example_io(self, rows: int, seq: int, dtype: torch.dtype, device) -> tuple[tuple, tuple]:
        """Meta tensors of this stage's (inputs, outputs) for a micro-batch of rows x seq tokens: the shapes
        PipelineStage is built with (static: no shape-inference forward, which would route garbage tokens,
        count them as expert load and run the all-to-alls on them)."""
        cfg = self._model[0].config
        meta = dict(device="meta")
        hidden = torch.empty(rows, seq, cfg.hidden_size, dtype=dtype, **meta).requires_grad_()
        aux = torch.empty(1, dtype=aux_dtype(dtype), **meta).requires_grad_()
        inputs = (torch.empty(rows, seq, dtype=torch.long, **meta),) if self.first else (hidden, hidden, aux)
        if not self.last:
            return inputs, (hidden, hidden, aux)
        depths = min(len(self.mtp), seq - 1) if self.with_mtp else 0
        logits = [torch.empty(rows, seq - k, cfg.vocab_size, dtype=dtype, **meta) for k in range(depths + 1)]
        return inputs, (*logits, aux)


def aux_dtype(dtype: torch.dtype) -> torch.dtype:
    """The balance loss travels in float32 at least (bf16 would round a 1e-4-sized loss away)."""
    return torch.promote_types(dtype, torch.float32)


def check_model(model: nn.Module, pp: int, schedule: str) -> None:
    """Refuse what the stages cannot split, with the reason."""
    cfg = model.config
    if cfg.is_v4:
        raise ValueError("pipeline_parallel: DeepSeek-V4 models (residual streams, hyper-connections) are not "
                         "split into pipeline stages yet")
    if cfg.tie_word_embeddings:
        raise ValueError("pipeline_parallel: tied embeddings (tie_word_embeddings) would put one weight on the "
                         "first and the last stage")
    if cfg.has_indexer:
        raise ValueError("pipeline_parallel: sparse attention (V3.2's indexer) is not split into stages yet")
    stages = pp * STAGES_PER_RANK[schedule]
    if stages > cfg.num_hidden_layers + 2:
        raise ValueError(f"pipeline_parallel={pp} with pp_schedule={schedule}: {stages} stages for "
                         f"{cfg.num_hidden_layers} layers (at most layers + 2: one with the embedding alone, one "
                         "with the head alone)")


def build_schedule(stages: list, schedule: str, microbatches: int, loss_fn):
    """The torch.distributed.pipelining schedule over this rank's PipelineStages. Gradients are not
    divided by the micro-batch count (the loss function normalises by the global token count)."""
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleDualPipeV,
        ScheduleInterleaved1F1B,
        ScheduleZBVZeroBubble,
    )

    kind = {"1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble,
            "dualpipev": ScheduleDualPipeV}[schedule]
    if schedule == "1f1b":
        return kind(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    return kind(stages, microbatches, loss_fn=loss_fn, scale_grads=False)


def record_timeline(stage, log: list) -> None:
    """Append (stage index, kind, start, end) to `log` for every forward, backward (input part or whole)
    and weight-backward chunk the schedule runs on `stage` (a PipelineStage): the per-stage timeline the
    bubble fraction is measured from (bench/parallel.py)."""
    for method, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                         ("backward_weight_one_chunk", "W")):
        inner = getattr(stage, method)

        def timed(*a, _inner=inner, _kind=kind, **k):
            t0 = time.perf_counter()
            out = _inner(*a, **k)
            log.append((stage.stage_index, _kind, t0, time.perf_counter()))
            return out

        setattr(stage, method, timed)


def ideal_bubble(schedule: str, pp: int, microbatches: int) -> float:
    """The idle share of a step the schedule's design leaves, all chunks taking equal time (forward F,
    backward B = 2F, split backward I = W = F): 1F1B (p-1)/(m+p-1); interleaved with v = 2 stages per
    rank (p-1)/(v m + p-1); ZB-V and DualPipeV fill the bubble with weight-gradient chunks: 0 in the limit
    (their warm-up and cool-down still leave some when m is small; see bench/parallel.py's measured)."""
    p, m = pp, microbatches
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (2 * m + p - 1)
    return 0.0
