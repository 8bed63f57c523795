"""Tests for openr2/train/trainer.py and openr2/train/checkpoint.py: learning, exact resume after a real
SIGKILL, config errors naming the key, missing/corrupt checkpoint errors naming the file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.train.checkpoint import LATEST, TRAINER_STATE, list_checkpoints, load_checkpoint
from openr2.train.config import TrainConfig
from openr2.train.data import IGNORE_INDEX, PackedLMDataset
from openr2.train.loop import LOG_FILE
from openr2.train.trainer import Trainer, lr_at

REPO = Path(__file__).resolve().parents[2]
B, T = 4, 16


def _docs(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # a learnable stream: short runs of consecutive tokens from a small alphabet
    docs = []
    for _ in range(120):
        start = rng.randrange(3, 40)
        docs.append([start + i for i in range(rng.randint(4, 12))])
    return docs


def _run(out_dir, steps=12, save_every=4, resume=None, on_step=None, **kw):
    cfg = TrainConfig(steps=steps, batch_size=B, seq_len=T, lr=1e-2, warmup_steps=2, save_every=save_every,
                      keep_last=2, out_dir=str(out_dir), resume=resume, **kw)
    model = build_model(tiny_v3(), seed=0)
    ds = PackedLMDataset(_docs(), B, T, eos_id=2, shuffle=True, seed=1)
    trainer = Trainer(model, ds, cfg, on_step=on_step)
    return trainer, trainer.train()


def _log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / LOG_FILE).read_text().splitlines()]


def test_loss_decreases_and_log(tmp_path):
    trainer, hist = _run(tmp_path, steps=30, save_every=0)
    first, last = sum(r["loss"] for r in hist[:3]) / 3, sum(r["loss"] for r in hist[-3:]) / 3
    assert last < first - 1.0, (first, last)
    log = _log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 31))
    rec = log[-1]
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "mtp_loss"):
        assert key in rec and rec[key] == rec[key]  # present, not NaN
    if "expert_load" in rec:  # MoE balancing landed: one entry per MoE layer (2 main + 1 MTP)
        assert len(rec["expert_load"]) == 3
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30]  # final save only
    # the correction bias moved (a buffer, updated outside the optimizer)
    biases = [b for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases)
    assert not any(p is b for b in biases for g in trainer.optimizer.param_groups for p in g["params"])


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 99) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 99))


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from tests.train.test_trainer import _run
    def on_step(step, record):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    _run({out!r}, on_step=on_step)
""")


def test_exact_resume_after_sigkill(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _, ref = _run(ref_dir)
    # checkpoints at 4 and 8; killed at step 6, after the step-4 checkpoint and before step 8's
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(tests=str(REPO), kill_at=6, out=str(run_dir))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run_dir / LATEST).read_text().strip() == "step-0000004"
    assert [r["step"] for r in _log(run_dir)] == list(range(1, 7))
    trainer, resumed = _run(run_dir, resume=str(run_dir))
    assert [r["step"] for r in resumed] == list(range(5, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref[4:]]  # bitwise
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in ref[4:]]
    # the log is continuous: the killed run's steps 5-6 were dropped and rewritten
    assert [(r["step"], r["loss"]) for r in _log(run_dir)] == [(r["step"], r["loss"]) for r in ref]
    assert [s for s, _ in list_checkpoints(run_dir)] == [8, 12]  # keep_last=2
    # the final weights are bitwise equal too
    ref_state = load_checkpoint(ref_dir)["model"].state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_sigint_saves_and_exits(tmp_path):
    def on_step(step, record):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    trainer, hist = _run(tmp_path, steps=50, save_every=0, on_step=on_step)
    assert trainer.interrupted and len(hist) == 3
    assert (tmp_path / LATEST).read_text().strip() == "step-0000003"
    assert load_checkpoint(tmp_path, load_weights=False)["step"] == 3


@pytest.mark.parametrize("values, key", [
    ({"stepz": 3}, "stepz"),
    ({"lr": -1.0}, "lr"),
    ({"mode": "rl"}, "mode"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"betas": [0.9]}, "betas"),
    ({"steps": 2.5}, "steps"),
    ({"min_lr_ratio": 2}, "min_lr_ratio"),
    ({"balance_gamma": float("nan")}, "balance_gamma"),
])
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ValueError, match=key):
        TrainConfig.from_dict(values)


def test_config_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "betas": [0.8, 0.9], "mode": "sft"}))
    cfg = TrainConfig.from_file(tmp_path / "c.json")
    assert (cfg.steps, cfg.betas, cfg.mode) == (7, (0.8, 0.9), "sft")
    (tmp_path / "c.toml").write_text('steps = 5\nlr = 1e-3\nwarmup_stepz = 1\n')
    with pytest.raises(ValueError, match="warmup_stepz") as e:
        TrainConfig.from_file(tmp_path / "c.toml")
    assert "c.toml" in str(e.value)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_dataset_mismatch_names_key(tmp_path):
    cfg = TrainConfig(batch_size=B + 1, seq_len=T, out_dir=str(tmp_path))
    ds = PackedLMDataset(_docs(), B, T, eos_id=2)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(build_model(tiny_v3(), seed=0), ds, cfg)


def test_sft_mode(tmp_path):
    class Batches:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            g = torch.Generator().manual_seed(self.i)
            ids = torch.randint(3, 50, (B, T), generator=g)
            labels = ids.roll(-1, 1)
            labels[:, : T // 2] = IGNORE_INDEX
            labels[:, -1] = IGNORE_INDEX
            return ids, labels

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    cfg = TrainConfig(mode="sft", steps=3, batch_size=B, seq_len=T, grad_accum=2, out_dir=str(tmp_path))
    hist = Trainer(build_model(tiny_v3(), seed=0), Batches(), cfg).train()
    assert len(hist) == 3 and all(r["tokens"] == 2 * B * (T // 2 - 1) for r in hist)
    assert load_checkpoint(tmp_path, load_weights=False)["data"] == {"i": 6}


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=LATEST):
        load_checkpoint(tmp_path)  # an empty run directory
    _run(tmp_path, steps=2, save_every=0)
    step_dir = tmp_path / "step-0000002"
    state_file = step_dir / TRAINER_STATE
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=TRAINER_STATE):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=TRAINER_STATE):  # also when resuming a run
        _run(tmp_path, steps=4, resume=str(tmp_path))
    state_file.write_bytes(data)
    assert load_checkpoint(tmp_path)["step"] == 2
    (step_dir / "model.safetensors").rename(step_dir / "moved.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    (step_dir / "moved.bin").rename(step_dir / "model.safetensors")
    weights = (step_dir / "model.safetensors").read_bytes()
    (step_dir / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    (step_dir / "model.safetensors").write_bytes(weights)
    os.remove(state_file)
    with pytest.raises(FileNotFoundError, match=TRAINER_STATE):
        load_checkpoint(step_dir)
    (tmp_path / LATEST).write_text("step-0000099\n")
    with pytest.raises(FileNotFoundError, match="step-0000099"):
        load_checkpoint(tmp_path)


def _held_out_load(gamma: float, steps: int = 80) -> list[float]:
    """Train with correction-bias updates of size gamma (aux loss off), then max/mean expert load per MoE
    layer on a held-out batch."""
    from openr2.model.moe import update_correction_bias

    model = build_model(tiny_v3(), seed=0)
    data = PackedLMDataset(_docs(), 8, 32, eos_id=2, shuffle=True, seed=1)
    trainer = Trainer(model, data, TrainConfig(steps=steps, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2,
                                               balance_gamma=gamma, aux_loss_alpha=0.0, out_dir="unused"))
    for _ in range(steps):
        trainer.train_step()
    held_out = next(PackedLMDataset(_docs(7) + _docs(8) + _docs(9), 64, 16, eos_id=2, seed=3))
    model.train()  # loads are counted in training mode; no_grad keeps the weights as they are
    with torch.no_grad():
        model(held_out[:, :-1])
    return [s["max_over_mean"] for s in update_correction_bias(model, 0.0)]


def test_aux_loss_free_balancing_during_training():
    on, off = _held_out_load(1e-2), _held_out_load(0.0)
    print(f"held-out max/mean expert load per MoE layer: bias updates on {on}, off {off}")
    assert max(on) <= 1.3 and max(off) > 1.5 and sum(off) > sum(on) + 0.5
