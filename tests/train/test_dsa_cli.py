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


def test_train_dsa_cli_pretrain_mode_stages_on_contexts_past_k(tmp_path):
    """The documented recipe's form (README, BENCHMARKS.md's measurement): `--mode pretrain` on needle texts, every
    packed sequence (48 tokens) longer than k (8): the warm-up steps leave every weight but the indexers' as
    they were, the sparse steps train the rest, and the export is a V3.2 checkpoint with the indexers it trained."""
    from openr2.checkpoints import load_model
    from openr2.train.checkpoint import load_checkpoint

    save_tiny_chat_checkpoint(tmp_path / "v3")
    before = load_model(tmp_path / "v3").state_dict()
    args = ["train", "--init-from", str(tmp_path / "v3"), "--mode", "pretrain", "--tasks", "needle:60",
            "--num-examples", "32", "--batch-size", "2", "--seq-len", "48", "--lr", "3e-3", "--warmup-steps", "1",
            "--sparse-attention", "dsa", "--index-topk", "8", "--indexer-warmup-steps", "2", "--index-n-heads", "4",
            "--index-head-dim", "16", "--save-every", "1", "--out-dir", str(tmp_path / "run")]
    assert main([*args, "--steps", "4", "--export", str(tmp_path / "export")]) == 0
    assert [r["stage"] for r in _log(tmp_path / "run")] == ["warmup", "warmup", "sparse", "sparse"]
    warm = load_checkpoint(str(tmp_path / "run" / "step-0000002"))["model"].state_dict()
    final = load_model(tmp_path / "export").state_dict()
    for name, w in warm.items():
        if ".indexer." in name:
            assert not torch.equal(w, final[name]), name  # trained in both stages (KL)
        elif name in before and "q_" not in name:  # (no q latent in the tiny V3: q_proj was factored)
            assert torch.equal(w, before[name]), name  # frozen in the warm-up
    changed = [n for n in before if n in final and "q_" not in n and not torch.equal(before[n], final[n])]
    assert changed  # the sparse steps trained the model
