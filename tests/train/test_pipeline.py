"""Pipeline parallelism (openr2/train/pipeline.py, pipeline_trainer.py, mesh.py): the stages chained in one
process are the model (outputs and gradients, float64); 2-process gloo runs with each schedule (1f1b,
interleaved, zbv, dualpipev) and 4-process EP2 x PP2 runs (with FSDP2 too) log the per-step losses, grad norms and expert loads
of one process on the same global batch and end with its weights (float64, bounds derived in
test_distributed.py); checkpoints written by EP2 x PP2 resume on one process and back as they resume in
their own layout; impossible layouts are refused with the reason."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.train import mesh, pipeline
from openr2.train.config import TrainConfig
from openr2.train.distributed import Dist
from openr2.train.trainer import _ce_sum
from tests.numerics import float64_compute
from tests.train._dist_run import Batches
from tests.train.test_distributed import N_TERMS, REPO, U64, _weight_bounds

SCRIPT = REPO / "tests/train/_pp_run.py"
STEP3 = "step-0000003"


def _launch(out, nproc: int, *jobs: str) -> dict[str, dict]:
    """_pp_run.py's results, one launch for all `jobs` (NAME=LAYOUT[@CHECKPOINT])."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(SCRIPT), str(out), *jobs] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT),
         str(out), *jobs]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {j.split("=")[0]: torch.load(out / j.split("=")[0] / "result.pt", weights_only=True) for j in jobs}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp-single")
    return out, _launch(out, 1, "single=single")["single"]


def _assert_matches(multi: dict, ref: dict, bounds: list[float], first: int = 0, what: str = "") -> None:
    """multi's steps first+1.. against ref's (ref padded to start at step 1): losses within the bound of
    test_distributed.py (reordered sums of N_TERMS terms plus the weights' distance times the gradient),
    grad norms 1e-5 relative (exactly the order of the sums at the first step), expert loads and token
    counts equal (the same routing), weights within the last step's bound."""
    assert multi["step"] == list(range(first + 1, first + 1 + len(multi["loss"]))), what
    assert multi["tokens"] == ref["tokens"][first:] and multi["expert_load"] == ref["expert_load"][first:], what
    for key in ("loss", "mtp_loss", "aux_loss"):
        for t, (a, b) in enumerate(zip(multi[key], ref[key][first:]), start=first + 1):
            bound = N_TERMS * U64 * abs(b) + ref["grad_norm"][t - 1] * bounds[t - 1]
            assert abs(a - b) <= bound, (what, key, t, a, b, bound)
    for t, (a, b) in enumerate(zip(multi["grad_norm"], ref["grad_norm"][first:]), start=first + 1):
        assert abs(a - b) <= (N_TERMS * U64 if t == first + 1 else 1e-5) * abs(b), (what, "grad_norm", t, a, b)
    assert set(multi["state"]) == set(ref["state"]), what
    for name, want in ref["state"].items():
        torch.testing.assert_close(multi["state"][name], want, rtol=0, atol=bounds[len(ref["loss"])],
                                   msg=f"{what}: {name}")
    worst = max((multi["state"][n] - r).abs().max().item() for n, r in ref["state"].items())
    print(f"{what}: weights differ by {worst:.3g} (bound {bounds[len(ref['loss'])]:.3g})")


@pytest.mark.slow
def test_each_schedule_matches_one_process(single, tmp_path):
    _, ref = single
    runs = _launch(tmp_path, 2, *(f"{s}={s}" for s in pipeline.SCHEDULES))
    bounds = _weight_bounds(ref)
    assert bounds[-1] < 1e-5  # the bound itself says something
    for schedule, multi in runs.items():
        _assert_matches(multi, ref, bounds, what=f"pp2 {schedule}")


@pytest.mark.slow
def test_ep_x_pp_matches_one_process_and_resumes_across_layouts(single, tmp_path):
    """4 processes: experts split over the 2 data-parallel ranks of each of 2 stages (DeviceMesh pp x ep),
    the rest replicated (dualpipev, zbv) or FSDP2-sharded over them (interleaved, 1f1b: 3D). Then the step-3
    checkpoints: EP2 x PP2's resumed on one process and one process's under EP2 x PP2 x FSDP equal each file
    resumed in its own layout (steps 4..6 and the final weights)."""
    single_dir, ref = single
    runs = _launch(tmp_path, 4, "ep-dualpipev=dualpipev:2", "ep-interleaved-fsdp=interleaved:2:fsdp",
                   f"from-single=1f1b:2:fsdp@{single_dir / 'single' / STEP3}",
                   f"own-ep=zbv:2@{tmp_path / 'ep-dualpipev' / STEP3}")
    bounds = _weight_bounds(ref)
    for name in ("ep-dualpipev", "ep-interleaved-fsdp"):
        assert all(b > 0 for b in runs[name]["all_to_all_bytes"])  # the tokens did travel
        _assert_matches(runs[name], ref, bounds, what=name)
    resumed = _launch(tmp_path, 1, f"own-single=single@{single_dir / 'single' / STEP3}",
                      f"from-ep=single@{tmp_path / 'ep-dualpipev' / STEP3}")
    # resumed runs are compared with each other (loading rounds the router to float32): from the same file,
    # steps 4..6 reorder sums as above, starting from equal weights
    from_step3 = [0.0] * 4 + [b - bounds[3] for b in bounds[4:]]
    for got, own in (("from-single", resumed["own-single"]), ("from-ep", runs["own-ep"])):
        other = runs.get(got) or resumed[got]
        padded = {k: [0.0] * 3 + v if isinstance(v, list) else v for k, v in own.items()}
        padded["expert_load"] = [None] * 3 + own["expert_load"]
        padded["tokens"] = [None] * 3 + own["tokens"]
        _assert_matches(other, padded, from_step3, first=3, what=f"{got} vs its own layout")


def test_stages_chained_in_one_process_are_the_model():
    """The stages (each schedule's split: 2 and 4 stages, one with the embedding alone) run one after the
    other on micro-batches give the model's loss gradient: every parameter's, to float64 rounding, the
    balance losses and the MTP drafts (their embeddings come from the first stage) included."""
    with float64_compute():
        model = build_model(tiny_v3(), seed=0).to(torch.float64).train()
        for m in model.modules():
            if hasattr(m, "aux_loss_alpha"):
                m.aux_loss_alpha = 1e-3
        ids, labels = next(Batches())
        counts = [(labels[:, k:] != -100).sum() for k in (0, 1)]
        logits, (draft,) = model(ids, with_mtp=True, moe_impl="fused")
        aux = sum(m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None)
        (_ce_sum(logits, labels) / counts[0] + 0.3 * _ce_sum(draft, labels[:, 1:]) / counts[1] + aux).backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        for num_stages in (2, 4):
            model.zero_grad()
            layers = pipeline.split_layers(3, num_stages)
            stages = [pipeline.StageModule(model, i, num_stages, layers[i], True) for i in range(num_stages)]
            assert {k for s in stages for k in s.state_dict()} == set(model.state_dict())
            for rows in (slice(0, 4), slice(4, 8)):
                out = ids[rows]
                for s in stages:
                    out = s(*(out if isinstance(out, tuple) else (out,)))
                lo, d, a = out
                (_ce_sum(lo, labels[rows]) / counts[0] + 0.3 * _ce_sum(d, labels[rows, 1:]) / counts[1]
                 + a.sum() / 2).backward()
            for n, p in model.named_parameters():
                # float64: the same sums in another grouping (two halves of the rows); a lost term is O(1)
                err = (p.grad - ref[n]).abs().max() / ref[n].abs().max()
                assert err < 1e-12, (num_stages, n, err.item())


def test_layout_helpers():
    assert pipeline.split_layers(3, 4) == [range(0, 0), range(0, 1), range(1, 2), range(2, 3)]
    assert pipeline.split_layers(61, 16)[0] == range(0, 3) and pipeline.split_layers(61, 16)[-1] == range(57, 61)
    assert [pipeline.stage_indices("1f1b", 4, r) for r in range(4)] == [[0], [1], [2], [3]]
    assert pipeline.stage_indices("interleaved", 4, 1) == [1, 5]
    assert pipeline.stage_indices("zbv", 4, 0) == pipeline.stage_indices("dualpipev", 4, 0) == [0, 7]
    assert pipeline.ideal_bubble("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert pipeline.ideal_bubble("interleaved", 4, 8) == pytest.approx(3 / 19)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16)])
def test_replayed_schedules_give_the_formulas(pp, m):
    """Playing each schedule's action order against the data dependencies (pipeline.simulated_bubble)
    reproduces the closed forms of 1F1B (B = 2F) and interleaved 1F1B, whatever F; the zero-bubble schedules
    (F = I = W) leave less than 1F1B, and less again with more micro-batches."""
    for f in (1.0, 0.37):
        assert pipeline.simulated_bubble("1f1b", pp, m, f, 2 * f) == pytest.approx((pp - 1) / (m + pp - 1))
        assert pipeline.simulated_bubble("interleaved", pp, m, f, 2 * f) == \
            pytest.approx((pp - 1) / (2 * m + pp - 1))
    for s in ("zbv", "dualpipev"):
        assert pipeline.ideal_bubble(s, pp, m) < pipeline.ideal_bubble("1f1b", pp, m)
        assert pipeline.ideal_bubble(s, pp, 2 * m) < pipeline.ideal_bubble(s, pp, m)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="pp_schedule"):
        TrainConfig(pp_schedule="gpipe")
    with pytest.raises(ValueError, match="pipeline_parallel.*at least 1"):
        TrainConfig(pipeline_parallel=0)
    with pytest.raises(ValueError, match="zbv with distributed=fsdp is not supported yet"):
        TrainConfig(pipeline_parallel=2, distributed="fsdp", pp_schedule="zbv")
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        mesh.build(Dist(0, 3), pp=2)
    with pytest.raises(ValueError, match="expert_parallel=4 does not divide the 2 data-parallel ranks"):
        mesh.build(Dist(0, 4), pp=2, ep=4)
    model = build_model(tiny_v3(), seed=0)
    with pytest.raises(ValueError, match="6 stages for 3 layers"):
        pipeline.check_model(model, 3, "zbv")
    tied = build_model(dataclasses.replace(tiny_v3(), tie_word_embeddings=True), seed=0)
    with pytest.raises(ValueError, match="tied embeddings"):
        pipeline.check_model(tied, 2, "1f1b")
    from openr2.train.pipeline_trainer import PipelineTrainer

    with pytest.raises(ValueError, match="needs 2 processes or a multiple: launch with torchrun"):
        PipelineTrainer(model, Batches(), TrainConfig(mode="sft", pipeline_parallel=2, batch_size=8, seq_len=16))


def test_flags(capsys):
    from openr2.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--pipeline-parallel" in out and "--pp-schedule" in out and "--microbatches" in out


def test_memory_per_rank_adds_up_to_the_model(capsys):
    """`openr2 info --ep --pp`: the stages' dense parameters plus ep times their expert shares are the whole
    model (MTP included), and the busiest rank of V3 at EP64 x PP16 is printed."""
    from openr2.cli import main
    from openr2.model.transformer import Transformer
    from openr2.presets import deepseek_v3
    from openr2.train.memory import per_rank

    config = deepseek_v3()
    with torch.device("meta"):
        total = sum(p.numel() for p in Transformer(config).parameters())
    ranks = per_rank(config, 64, 16)
    assert [len(r.layers) for r in ranks].count(4) == 13 and sum(len(r.layers) for r in ranks) == 61
    assert sum(r.dense_params + 64 * r.expert_params for r in ranks) == total
    b = ranks[1].bytes(ep=64, dp=64)
    assert b["weights"] == 2 * (ranks[1].dense_params + ranks[1].expert_params)
    assert b["moments"] == int((ranks[1].dense_params / 64 + ranks[1].expert_params) * 8)
    assert main(["info", "deepseek-v3", "--ep", "64", "--pp", "16"]) == 0
    assert "busiest rank: 27.41 GiB" in capsys.readouterr().out
    with pytest.raises(ValueError, match="does not divide the 256 routed experts"):
        per_rank(config, 48, 16)
