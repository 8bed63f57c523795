"""`openr2 train --sparse-attention dsa` end to end: a V3 checkpoint in, a V3.2 checkpoint out (both loaders),
the two stages in the log, and exact resume from a warm-up checkpoint across the stage change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openr2.cli import main
from tests.checkpoints import save_tiny_chat_checkpoint


def _train(tmp_path: Path, *extra: str) -> int:
    return main(["train", "--init-from", str(tmp_path / "v3"), "--mode", "sft", "--tasks", "needle:60",
                 "--num-examples", "64", "--steps", "4", "--batch-size", "2", "--seq-len", "192", "--lr", "3e-3",
                 "--warmup-steps", "1", "--sparse-attention", "dsa", "--index-topk", "8",
                 "--indexer-warmup-steps", "2", "--index-n-heads", "8", "--index-head-dim", "16",
                 "--out-dir", str(tmp_path / "run"), *extra])


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_dsa_cli_converts_trains_exports_and_resumes(tmp_path):
    import transformers

    from openr2.checkpoints import load_model

    save_tiny_chat_checkpoint(tmp_path / "v3")
    export = tmp_path / "export"
    assert _train(tmp_path, "--export", str(export), "--save-every", "1") == 0
    run = tmp_path / "run"
    log = _log(run)
    assert [r["stage"] for r in log] == ["warmup", "warmup", "sparse", "sparse"]
    assert all(r["indexer_kl"] >= 0 for r in log)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (config["index_topk"], config["index_n_heads"], config["index_head_dim"]) == (8, 8, 16)
    ours = load_model(export)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad():  # the context is k: dense, no ties to break
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4 * ours(ids).abs().max()
    # resume from the last warm-up checkpoint: the sparse stage repeats exactly
    assert _train(tmp_path, "--resume", str(run / "step-0000002"), "--save-every", "1") == 0
    log2 = _log(run)
    assert [(r["step"], r["stage"], r["loss"], r["indexer_kl"]) for r in log2] == \
        [(r["step"], r["stage"], r["loss"], r["indexer_kl"]) for r in log]
