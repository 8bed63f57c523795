"""Expert parallelism (openr2/train/expert_parallel.py): a 2-process gloo run with --expert-parallel 2 matches
one process on the same global batch (losses, grad norms, correction biases, final weights; float64 and
tolerances derived as in test_distributed.py), its checkpoints are the single-process format and resume across
layouts (EP2 -> 1 process and back) as they resume in their own; the same with fewer expert shards than
processes (DeviceMesh replicas x shards) and with FSDP2; bad layouts are refused with a reason."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.train import expert_parallel
from openr2.train.config import TrainConfig
from openr2.train.distributed import Dist
from tests.train.test_distributed import N_TERMS, REPO, U64, _run, _weight_bounds

STEP5 = "step-0000005"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(run directory, result) of a 1-process run and of an EP2 run (both save at steps 5 and 10)."""
    one, two = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ep2")
    return {"single": (one, _run(one, "ddp", 1)), "ep": (two, _run(two, "ep", 2))}


def _assert_steps_match(multi: dict, single: dict, first: int, weight_bounds: list[float]) -> None:
    """Per-step losses and grad norms of `multi` (steps first+1..10) against `single`'s, within the bounds
    derived in test_distributed.py: |dL_t| <= N_TERMS u L_t + G_t W_{t-1}; grad norms 1e-5 relative."""
    for key in ("loss", "mtp_loss"):
        for t, (a, b) in enumerate(zip(multi[key], single[key][first:]), start=first + 1):
            bound = N_TERMS * U64 * abs(b) + single["grad_norm"][t - 1] * weight_bounds[t - 1]
            assert abs(a - b) <= bound, (key, t, a, b, bound)
    for t, (a, b) in enumerate(zip(multi["grad_norm"], single["grad_norm"][first:]), start=first + 1):
        assert abs(a - b) <= 1e-5 * abs(b), ("grad_norm", t, a, b)


@pytest.mark.slow
def test_expert_parallel_matches_one_process(runs):
    single, multi = runs["single"][1], runs["ep"][1]
    assert multi["tokens"] == single["tokens"] and len(multi["loss"]) == 10
    assert all(b > 0 for b in multi["all_to_all_bytes"])  # the tokens did travel
    bounds = _weight_bounds(single)
    _assert_steps_match(multi, single, 0, bounds)
    # step 1 reads identical weights: only the order of sums differs
    assert abs(multi["grad_norm"][0] - single["grad_norm"][0]) <= N_TERMS * U64 * single["grad_norm"][0]
    assert set(multi["state"]) == set(single["state"])  # whole experts, single-process names
    for name, ref in single["state"].items():
        assert multi["state"][name].shape == ref.shape, name
        if name.endswith("e_score_correction_bias"):  # sign updates from the same global loads
            assert torch.equal(multi["state"][name], ref), name
            assert ref.abs().sum() > 0, name  # the bias did move
        else:
            torch.testing.assert_close(multi["state"][name], ref, rtol=0, atol=bounds[-1], msg=name)
    worst = max((multi["state"][n] - r).abs().max().item() for n, r in single["state"].items())
    print(f"ep2: weights differ by {worst:.3g} (bound {bounds[-1]:.3g}); all-to-all bytes/step "
          f"{multi['all_to_all_bytes'][0]}")


@pytest.mark.slow
def test_expert_parallel_below_the_world_size(runs, tmp_path):
    """4 processes, experts split over 2 (a DeviceMesh of 2 replicas x 2 shards: the replicas sum their expert
    gradients): the same steps and weights as one process."""
    single = runs["single"][1]
    multi = _run(tmp_path, "ep2", 4)
    assert multi["tokens"] == single["tokens"] and all(b > 0 for b in multi["all_to_all_bytes"])
    bounds = _weight_bounds(single)
    _assert_steps_match(multi, single, 0, bounds)
    for name, ref in single["state"].items():
        torch.testing.assert_close(multi["state"][name], ref, rtol=0, atol=bounds[-1], msg=name)


@pytest.mark.slow
def test_expert_parallel_with_fsdp(runs, tmp_path):
    """EP2 x FSDP2 (the experts FSDP's ignored parameters, the rest sharded): the same steps and weights as one
    process, its checkpoint in the single-process format, and one process's checkpoint resumed under it
    equal to that checkpoint resumed on one process."""
    (one_dir, single) = runs["single"]
    multi = _run(tmp_path / "fsdp-ep", "fsdp-ep", 2)
    bounds = _weight_bounds(single)
    _assert_steps_match(multi, single, 0, bounds)
    for name, ref in single["state"].items():
        torch.testing.assert_close(multi["state"][name], ref, rtol=0, atol=bounds[-1], msg=name)
    written = load_file(str(tmp_path / "fsdp-ep" / STEP5 / "model.safetensors"))
    assert set(written) == set(load_file(str(one_dir / STEP5 / "model.safetensors")))
    ref = _run(tmp_path / "own", "ddp", 1, "float64", str(one_dir / STEP5))
    got = _run(tmp_path / "other", "fsdp-ep", 2, "float64", str(one_dir / STEP5))
    resumed_bounds = [0.0] * 6 + [b - bounds[5] for b in bounds[6:]]
    padded = {k: [0.0] * 5 + ref[k] for k in ("loss", "mtp_loss", "grad_norm")}
    _assert_steps_match(got, {**single, **padded}, 5, resumed_bounds)
    for name, want in ref["state"].items():
        torch.testing.assert_close(got["state"][name], want, rtol=0, atol=resumed_bounds[-1], msg=name)


@pytest.mark.slow
def test_checkpoints_resume_across_layouts(runs, tmp_path):
    (one_dir, single), (ep_dir, _) = runs["single"], runs["ep"]
    bounds = _weight_bounds(single)
    # the step-5 checkpoint written under EP2 holds whole tensors, as one process writes them
    ep_file, one_file = (load_file(str(d / STEP5 / "model.safetensors")) for d in (ep_dir, one_dir))
    assert set(ep_file) == set(one_file)
    for name, ref in one_file.items():
        torch.testing.assert_close(ep_file[name], ref, rtol=0, atol=bounds[5], msg=name)
    # each checkpoint resumed in the other layout == resumed in its own (the same file: the same start),
    # within the rounding of steps 6..10 (loading a checkpoint rounds the router to float32, so runs
    # resumed from it are compared with each other, not with the uninterrupted run)
    resumed_bounds = [0.0] * 6 + [b - bounds[5] for b in bounds[6:]]
    for source, own, other in ((one_dir, ("ddp", 1), ("ep", 2)), (ep_dir, ("ep", 2), ("ddp", 1))):
        ref = _run(tmp_path / f"{source.name}-own", *own, "float64", str(source / STEP5))
        got = _run(tmp_path / f"{source.name}-other", *other, "float64", str(source / STEP5))
        assert ref["step"] == got["step"] == list(range(6, 11))
        padded = {k: [0.0] * 5 + ref[k] for k in ("loss", "mtp_loss", "grad_norm")}
        _assert_steps_match(got, {**single, **padded}, 5, resumed_bounds)
        for name, want in ref["state"].items():
            torch.testing.assert_close(got["state"][name], want, rtol=0, atol=resumed_bounds[-1], msg=name)


def test_experts_match_the_whole_module_on_every_path(tmp_path):
    """EPExperts on 2 ranks == RoutedExperts on all tokens: outputs and gradients (x, routing weights, the
    rank's experts), for the fused, grouped and looped paths, and when one rank receives no token at all
    (its experts then get zero gradients and it still takes part in the backward all-to-alls)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests/train/_ep_experts_run.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "experts.pt", weights_only=True)
    assert len(results) == 6
    # float64: both sides form the same products and sum at most 64 of them per stage (D = 64, 2 x 24 pairs
    # per expert) over three chained stages, so 3 * 64 * u ~ 2e-14 relative to the terms' magnitudes;
    # 1e-12 against the largest value leaves room for cancellation, while a wrong expert, a lost rank or an
    # unscaled gradient is off by O(1)
    for case, worst in results.items():
        assert worst <= 1e-12, (case, worst)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="expert_parallel.*at least 1"):
        TrainConfig(expert_parallel=0)
    model = build_model(tiny_v3(), seed=0)  # 8 routed experts
    with pytest.raises(ValueError, match="no MoE layer"):
        expert_parallel.apply(nn.Sequential(nn.Linear(2, 2)), 2, Dist(0, 2))
    with pytest.raises(ValueError, match="does not divide the model's 8 routed experts"):
        expert_parallel.apply(model, 3, Dist(0, 3))
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        expert_parallel.apply(model, 2, Dist(0, 3))
    with pytest.raises(ValueError, match="needs 2 processes: launch with torchrun --nproc-per-node 2"):
        expert_parallel.apply(model, 2, Dist())
    assert expert_parallel.apply(model, 1, Dist()) is None


def test_flag(capsys):
    from openr2.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--expert-parallel" in capsys.readouterr().out
