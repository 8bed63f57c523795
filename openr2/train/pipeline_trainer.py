"""The Trainer under pipeline parallelism (`pipeline_parallel` > 1), alone or with expert parallelism and
FSDP2, on the DeviceMesh of mesh.py: pp stages x dp data-parallel replicas (ep of them splitting the
experts; with distributed=fsdp the rest of each stage is sharded over the dp ranks, which then
reduce-scatter its gradients themselves).

Each step, for each of grad_accum batches: every rank reads the same global batch, takes its data-parallel
rows and runs them through its pipeline's schedule in `microbatches` micro-batches (pipeline.py). The loss
of a micro-batch is its cross-entropy sum over the *global* count of target tokens (counted on the whole
global batch, which every rank has: no communication), times dp, plus its balance loss over the micro-batch
count; replicated gradients are then summed over the dp group and divided by dp, expert gradients come
whole out of the all-to-all (divided by dp by expert_parallel's hook) and are summed over the expert
replicas. So the update is the one process's on the whole batch, to the order of the sums.

The grad norm sums the squares of each stage's parameters over the pipeline ranks (expert slices over the
ep group first); expert loads are summed over the dp group before the correction-bias update; logged
losses are summed from the last stage's ranks. A rank keeps only its stages' layers (the model is built whole,
then the other layers are freed; the embedding and head stay on every rank). Checkpoints gather each
stage's tensors (experts first over the ep group) into the single-process format, so a run resumes under
any layout.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from openr2.model.moe import update_correction_bias
from openr2.train import distributed as dist_utils
from openr2.train import expert_parallel, mesh, pipeline
from openr2.train.config import TrainConfig
from openr2.train.data import IGNORE_INDEX
from openr2.train.trainer import Trainer, _ce_sum


class PipelineTrainer(Trainer):
    """Trainer whose model runs as pipeline stages; see the module docstring."""

    def _parallelize(self, model: nn.Module, config: TrainConfig) -> None:
        pp, schedule = config.pipeline_parallel, config.pp_schedule
        if not self.dist.enabled:
            raise ValueError(f"pipeline_parallel={pp} needs {pp} processes or a multiple: launch with torchrun "
                             f"--nproc-per-node {pp * config.expert_parallel}")
        pipeline.check_model(model, pp, schedule)
        self.layout = mesh.build(self.dist, pp, config.expert_parallel, model.device)
        self.ep = expert_parallel.apply(model, config.expert_parallel, self.dist, self.layout)
        num_stages = pp * pipeline.STAGES_PER_RANK[schedule]
        self.microbatch_count = config.microbatches or num_stages
        rows = config.batch_size // self.layout.dp
        if config.batch_size % self.layout.dp or rows % self.microbatch_count:
            raise ValueError(f"batch_size={config.batch_size} over {self.layout.dp} data-parallel ranks does not "
                             f"split into microbatches={self.microbatch_count} of equal rows")
        if schedule in ("1f1b", "dualpipev") and self.microbatch_count < num_stages:
            raise ValueError(f"pp_schedule={schedule} needs microbatches >= its {num_stages} stages "
                             f"(got {self.microbatch_count})")
        layers = pipeline.split_layers(model.config.num_hidden_layers, num_stages)
        self.stage_ids = pipeline.stage_indices(schedule, pp, self.layout.pp_rank)
        self.stages = nn.ModuleList(pipeline.StageModule(model, i, num_stages, layers[i], self.has_mtp)
                                    for i in self.stage_ids)
        self.holds_first, self.holds_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        self.full_keys = list(model.state_dict())  # the single-process order of a checkpoint's tensors
        own_layers = {i for s in self.stages for i in s.layers}
        for i in range(len(model.layers)):  # free the other stages' layers (the embedding and head stay)
            if str(i) not in own_layers:
                model.layers[i] = nn.Identity()
        self.fsdp = config.distributed == "fsdp" and self.layout.dp > 1
        if self.fsdp:
            self._shard(self.layout.mesh["edp", "ep"]._flatten("dp"))
        from torch.distributed.pipelining import PipelineStage

        group = self.layout.group("pp")
        self.micro_rows = rows // self.microbatch_count
        self.pipe_stages = []
        for s in self.stages:
            inputs, outputs = s.example_io(self.micro_rows, config.seq_len, model.dtype, model.device)
            self.pipe_stages.append(PipelineStage(s, s.index, num_stages, model.device, inputs, outputs,
                                                  group=group))
        self.schedule = pipeline.build_schedule(self.pipe_stages, schedule, self.microbatch_count, self._loss)
        self.module, self.sharded = self.stages, False
        self.optimizer = self._adamw(self.stages)
        self.own_names = {k for s in self.stages for k in s.state_dict()}
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        expert_ids = self.ep.expert_params if self.ep else set()
        self.replicated = [p for p in self.params if id(p) not in expert_ids]
        self.expert_local = [p for p in self.params if id(p) in expert_ids]
        self.timeline: list | None = None

    def _shard(self, dp_mesh) -> None:
        """FSDP2 over each stage's data-parallel ranks: every decoder / MTP layer, then the stage's rest
        (embedding, norm, head); the experts are its ignored parameters (expert parallelism's)."""
        from torch.distributed.fsdp import fully_shard

        ignored = {p for p in self.model.parameters() if self.ep and id(p) in self.ep.expert_params} or None
        for stage in self.stages:
            blocks = list(stage.layers.values()) + (list(stage.mtp) if hasattr(stage, "mtp") else [])
            for block in blocks:
                fully_shard(block, mesh=dp_mesh, ignored_params=ignored)
            fully_shard(stage, mesh=dp_mesh, ignored_params=ignored)

    # ------------------------------------------------------------------ one step
    def record_timeline(self) -> list:
        """Start recording (stage, kind, start, end) of every chunk this rank runs (bench/parallel.py)."""
        self.timeline = []
        for s in self.pipe_stages:
            pipeline.record_timeline(s, self.timeline)
        return self.timeline

    def _loss(self, output: tuple, target: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss on the last stage (see the module docstring); its parts go to self._parts."""
        logits, *drafts, aux = output
        dp, cfg = self.layout.dp, self.config
        ce = _ce_sum(logits, target)
        loss = ce * (dp / self._counts[0])
        part = {"loss": ce.detach()}
        if drafts:
            terms = torch.stack([_ce_sum(d, target[:, k:]) / self._counts[k] for k, d in enumerate(drafts, 1)])
            loss = loss + cfg.mtp_lambda * dp * terms.mean()
            part["mtp_loss"] = terms.detach().mean()
        aux = aux.sum() / self.microbatch_count
        loss = loss + aux
        part["aux_loss"] = aux.detach()
        self._parts.append(part)
        return loss / cfg.grad_accum

    def _global_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.mode == "pretrain":
            if not isinstance(batch, torch.Tensor):
                raise ValueError("mode=pretrain expects [B, T+1] token tensors")
            return batch[:, :-1], batch[:, 1:]
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("mode=sft expects (input_ids, labels) batches")
        return batch[0], batch[1]

    def train_step(self) -> dict[str, Any]:
        cfg, layout = self.config, self.layout
        t0 = time.perf_counter()
        self.stages.train()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        dp_dist = dist_utils.Dist(layout.dp_rank, layout.dp)
        sums = torch.zeros(3, dtype=torch.float64)  # loss, mtp_loss, aux_loss (this rank's part)
        tokens = 0
        for _ in range(cfg.grad_accum):
            inputs, targets = self._global_batch(next(self.dataset))
            depths = len(self.model.mtp) if self.has_mtp else 0
            # as the Trainer counts them (float32, exact below 2^24 tokens; its scale dp / count rounds alike)
            self._counts = [(targets[:, k:] != IGNORE_INDEX).sum().float().clamp(min=1) for k in range(depths + 1)]
            tokens += int((targets != IGNORE_INDEX).sum())
            if inputs.shape != (cfg.batch_size, cfg.seq_len):
                raise ValueError(f"pipeline_parallel: batches must be batch_size x seq_len = {cfg.batch_size} x "
                                 f"{cfg.seq_len} (the stages exchange fixed shapes), got {tuple(inputs.shape)}")
            device = self.model.device
            inputs = dist_utils.shard_rows(inputs, dp_dist).to(device)
            targets = dist_utils.shard_rows(targets, dp_dist).to(device)
            self._parts = []
            args = (inputs,) if self.holds_first else ()
            kwargs = {"target": targets} if self.holds_last else {}
            self.schedule.step(*args, **kwargs)
            if self.holds_last:
                sums[0] += sum(p["loss"].double() for p in self._parts) / self._counts[0]
                if "mtp_loss" in self._parts[0]:
                    sums[1] += sum(p["mtp_loss"].double() for p in self._parts)
                sums[2] += sum(p["aux_loss"].double() for p in self._parts) / layout.dp
        dist_utils.all_reduce_sum(sums, self.dist)  # only the last stage's ranks hold a part
        sums /= cfg.grad_accum
        self._reduce_gradients()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self._clip_grad_norm(max_norm)
        self.optimizer.step()
        loads = self._balance()
        self.step += 1
        dt = time.perf_counter() - t0
        record = {"step": self.step, "loss": sums[0].item()}
        if self.has_mtp:
            record["mtp_loss"] = sums[1].item()
        if any(m.aux_loss_alpha for m in self.moe):
            record["aux_loss"] = sums[2].item()
        record.update({"lr": lr, "tokens_per_s": tokens / dt if dt > 0 else 0.0, "grad_norm": float(grad_norm),
                       "tokens": tokens})
        if loads:
            record["expert_load"] = loads
        if self.ep:  # the busiest rank's, forward and backward (a stage without MoE layers sends none)
            sent = torch.tensor(float(2 * self.ep.take_sent_bytes()))
            torch_dist.all_reduce(sent, op=torch_dist.ReduceOp.MAX)
            record["all_to_all_bytes"] = int(sent.item())
        return record

    def _reduce_gradients(self) -> None:
        """Replicated gradients: summed over the dp group, divided by dp (the loss was scaled by it); expert
        gradients: summed over the expert replicas (edp)."""
        layout = self.layout
        if layout.dp > 1 and not self.fsdp:  # FSDP reduce-scatters (and averages) its own
            group = layout.group("dp")
            for p in self.replicated:
                if p.grad is not None:
                    torch_dist.all_reduce(p.grad, group=group)
                    p.grad /= layout.dp
        if self.ep:
            self.ep.sum_replica_grads(self.expert_local)

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole model: each stage's squares summed over the pipeline ranks."""
        def sq(params):
            return sum((p.grad.double().pow(2).sum() for p in params if p.grad is not None),
                       torch.zeros((), dtype=torch.float64))

        experts = sq(self.expert_local)
        if self.ep:
            torch_dist.all_reduce(experts, group=self.layout.group("ep"))
        sharded = [p for p in self.replicated if p.grad is not None and hasattr(p.grad, "to_local")]
        shards = sum((p.grad.to_local().double().pow(2).sum() for p in sharded), torch.zeros((), dtype=torch.float64))
        if sharded:  # FSDP: each data-parallel rank holds a shard of these
            torch_dist.all_reduce(shards, group=self.layout.group("dp"))
        total = sq([p for p in self.replicated if not hasattr(p.grad, "to_local")]) + shards + experts
        torch_dist.all_reduce(total, group=self.layout.group("pp"))
        norm = total.sqrt()
        if max_norm != float("inf"):
            scale = min(1.0, max_norm / (norm.item() + 1e-6))
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    def _balance(self) -> list[dict]:
        """Correction-bias update of this rank's MoE layers from loads summed over the dp group; the
        max/mean load of every layer, in layer order (gathered over the pipeline)."""
        stats = {}
        for stage in self.stages:
            if self.layout.dp > 1:
                for m in stage.moe:
                    torch_dist.all_reduce(m.expert_load, group=self.layout.group("dp"))
            stats[stage.index] = update_correction_bias(stage, self.config.balance_gamma)
        parts: list = [None] * self.layout.pp
        torch_dist.all_gather_object(parts, stats, group=self.layout.group("pp"))
        merged = {k: v for part in parts for k, v in part.items()}
        return [s for k in sorted(merged) for s in merged[k]]

    # ------------------------------------------------------------------ whole state (single-process format)
    def _pp_gather(self, part: dict) -> list[dict]:
        parts: list = [None] * self.layout.pp
        torch_dist.all_gather_object(parts, part, group=self.layout.group("pp"))
        return parts

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state: this rank's stages (experts gathered over the ep group), gathered over
        the pipeline (collective: every rank calls it)."""
        state = self.ep.full_state_dict() if self.ep else \
            {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.model.state_dict().items()}
        own = {k: v.detach().cpu() for k, v in state.items() if k in self.own_names}
        merged = {k: v for part in self._pp_gather(own) for k, v in part.items()}
        device = self.model.device
        return {k: merged[k].to(device) for k in self.full_keys}

    def _optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))
        if self.ep:
            state = self.ep.full_optimizer_state(state)
        parts = self._pp_gather(state)
        merged = {"state": {}, "param_groups": [dict(g, params=[]) for g in parts[0]["param_groups"]]}
        for part in parts:
            merged["state"].update(part["state"])
            for group, theirs in zip(merged["param_groups"], part["param_groups"]):
                group["params"] += theirs["params"]
        return merged

    def _own_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = self.model.state_dict()  # this rank's layers, the embedding and the head
        return {k: v for k, v in super()._own_model_state(state).items() if k in keep}

    def _own_optimizer_state(self, state: dict) -> dict:
        state = super()._own_optimizer_state(state)
        params = self.own_names
        return {"state": {k: v for k, v in state["state"].items() if k in params},
                "param_groups": [dict(g, params=[n for n in g["params"] if n in params])
                                 for g in state["param_groups"]]}
