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


TORCH_NAMES = {"1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}


def simulated_bubble(schedule: str, pp: int, microbatches: int, f: float = 1.0, b: float = 2.0,
                     w: float = 0.0) -> float:
    """The idle share of a step that `schedule` leaves with chunk times f (forward), b (backward; its input
    part when w > 0 splits it: zbv and dualpipev run I and W chunks, I taking b and W taking w, a whole
    backward b + w), one core per rank and free communication: torch's own action order of each rank
    (pipelining's get_schedule_ops) played against the data dependencies (F after the previous stage's F,
    I/B after the next stage's I/B, W after its I). Averaged over ranks, against the last rank's end."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    num_stages = pp * STAGES_PER_RANK[schedule]
    cost = {"F": f, "I": b, "W": w, "B": b + w}
    if schedule == "1f1b":  # Schedule1F1B's loop (torch's table of it numbers the last rank's micro-batches from 1)
        F, B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
        queues = []
        for r in range(pp):
            warm = min(microbatches, pp - 1 - r)
            order = [(F, i) for i in range(warm)]
            order += [x for i in range(microbatches - warm) for x in ((F, warm + i), (B, i))]
            order += [(B, i) for i in range(microbatches - warm, microbatches)]
            queues.append([_Action(r, kind, i) for kind, i in order])
    else:
        ops = get_schedule_ops(TORCH_NAMES[schedule], pp, microbatches)
        queues = [[s for a in rank if a is not None for s in (a.sub_actions or [a])
                   if s.computation_type.value in cost] for rank in ops]
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, microbatch) -> end time
    free, busy = [0.0] * pp, [0.0] * pp

    def ready(kind: str, stage: int, mb: int) -> float | None:
        if kind == "F":
            deps = [("F", stage - 1, mb)] if stage else []
        elif kind == "W":
            deps = [("I", stage, mb)]
        else:
            deps = [("F", stage, mb)] + ([] if stage == num_stages - 1 else [("B", stage + 1, mb)])
        ends = [done.get(d) if d[0] != "B" else done.get(d, done.get(("I", *d[1:]))) for d in deps]
        return None if any(e is None for e in ends) else max(ends, default=0.0)

    while any(queues):
        progressed = False
        for r, queue in enumerate(queues):
            while queue:
                a = queue[0]
                kind = a.computation_type.value
                at = ready(kind, a.stage_index, a.microbatch_index)
                if at is None:
                    break
                start = max(free[r], at)
                free[r] = start + cost[kind]
                busy[r] += cost[kind]
                done[(kind, a.stage_index, a.microbatch_index)] = free[r]
                queue.pop(0)
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule}: the action order deadlocks in the simulation")
    span = max(free)
    return sum(1 - x / span for x in busy) / pp


def ideal_bubble(schedule: str, pp: int, microbatches: int) -> float:
    """The idle share of a step the schedule's design leaves, all chunks taking equal time: 1F1B
    (p-1)/(m+p-1) (B = 2F); interleaved with 2 stages per rank (p-1)/(2m+p-1); ZB-V and DualPipeV, which
    fill the bubble with weight-gradient chunks, have no closed form here: their action tables played with
    F = I = W (simulated_bubble; 0 in the limit of many micro-batches)."""
    p, m = pp, microbatches
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (2 * m + p - 1)
    return simulated_bubble(schedule, p, m, 1.0, 1.0, 1.0)
