"""torchrun scale-out: a 2-process gloo run (DDP and FSDP2) matches a 1-process run with the same global
batch, step by step (losses within 1e-5 relative over 10 steps), and ends with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_dist_run.py")


def _run(out_dir: Path, strategy: str, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out_dir), strategy]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(SCRIPT), str(out_dir), strategy]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_dir / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), "ddp", 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, strategy):
    multi = _run(tmp_path, strategy, 2)
    assert multi["tokens"] == single["tokens"]  # the global batch, counted over both ranks
    for key in ("loss", "mtp_loss", "grad_norm"):
        assert len(multi[key]) == 10
        for step, (a, b) in enumerate(zip(multi[key], single[key]), start=1):
            assert abs(a - b) <= 1e-5 * abs(b), (key, step, a, b)
    print(f"{strategy}: losses 2-proc {multi['loss'][-1]:.6f} vs 1-proc {single['loss'][-1]:.6f} at step 10")
    for name, ref in single["state"].items():
        torch.testing.assert_close(multi["state"][name], ref, rtol=1e-4, atol=1e-5, msg=name)
