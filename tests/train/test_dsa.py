"""Tests for openr2/train/dsa.py and dsa_loss.py: the V3 -> V3.2 conversion, the indexer's KL against a float64
reference, which parameters each stage's losses reach, and exact resume across the stages after a SIGKILL."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.train.checkpoint import LATEST, load_checkpoint
from openr2.train.config import TrainConfig
from openr2.train.data import PackedLMDataset
from openr2.train.dsa import DSATrainer, convert_to_dsa, is_indexer_param
from openr2.train.dsa_loss import dense_attention, indexer_loss, recorded_attention_inputs
from openr2.train.loop import LOG_FILE
from tests.hf_utils import perturb_
from tests.numerics import float64_compute, float64_copy

REPO = Path(__file__).resolve().parents[2]
B, T, K = 2, 24, 8  # T > K: the indexer decides


def _converted(config=None, seed=0):
    src = build_model(config or tiny_v3(), seed=seed)
    perturb_(src, seed)  # attention far from uniform, so the KL's target is not trivial
    return src, convert_to_dsa(src, K, index_n_heads=16, index_head_dim=16, seed=seed)


def _ids(n, seed=0):
    return torch.randint(3, 256, (B, n), generator=torch.Generator().manual_seed(seed))


def test_convert_is_exact_and_loads_in_both(tmp_path):
    import transformers

    from openr2.checkpoints import load_model, save_model

    src, model = _converted()
    cfg = model.config
    assert (cfg.model_type, cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == ("deepseek_v32", K, 16, 16)
    with torch.no_grad():
        assert torch.equal(src(_ids(K)), model(_ids(K)))  # contexts <= K: dense, bit for bit
        long = _ids(T)
        with dense_attention(model):  # the warm-up's forward is the V3 model's at any context
            assert torch.equal(src(long), model(long))
        sparse = model(long)
        assert not torch.equal(src(long), sparse)  # outside it, the selection decides
        assert all(m.indexer.index_topk == K for m in model.modules() if hasattr(m, "indexer") and m.indexer)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v32"
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(long), sparse)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():  # at contexts <= K (no selection ties to worry about): the same function
        ours, theirs = model(_ids(K)), hf(_ids(K)).logits
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()


def test_convert_without_q_latent_factors_q_proj():
    src, model = _converted(dataclasses.replace(tiny_v3(), q_lora_rank=None))
    assert model.config.q_lora_rank == model.config.hidden_size
    new = dict(model.named_modules())
    for name, a in src.named_modules():
        if name.endswith("self_attn"):
            b = new[name]
            assert torch.equal(b.q_b_proj.weight, a.q_proj.weight)
            assert torch.equal(b.q_a_proj.weight, torch.eye(a.q_proj.weight.shape[1]))
    with torch.no_grad():  # q's latent is x rescaled per token: close to the source, not equal
        a, b = src(_ids(K)), model(_ids(K))
    assert torch.isfinite(b).all() and not torch.equal(a, b)


def _kl_reference(records, sparse: bool) -> float:
    """Plain loops in float64: per query, p = head-summed attention over its keys, q = softmax of the scores."""
    layers = []
    for rec in records:
        mla, ind = rec.mla, rec.mla.indexer
        x = rec.x.double()
        xq = mla.q_a_layernorm(mla.q_a_proj(x))
        I = ind.scores(x, xq, rec.cos, rec.sin)
        n = x.shape[1]
        topk = I.topk(ind.index_topk, dim=-1).indices if sparse and n > ind.index_topk else None
        P = mla.attention_probs(x, rec.cos, rec.sin, topk)
        total = 0.0
        for b in range(x.shape[0]):
            for t in range(n):
                keys = [s for s in range(t + 1) if topk is None or s in topk[b, t].tolist()]
                p = P[b, :, t, keys].sum(0)
                p = p / p.sum()
                q = torch.softmax(I[b, t, keys], dim=0)
                total += sum(float(pi * math.log(pi / qi)) for pi, qi in zip(p, q) if pi > 0)
        layers.append(total / (x.shape[0] * n))
    return sum(layers) / len(layers)


@pytest.mark.parametrize("sparse", [False, True], ids=["warmup", "sparse"])
def test_kl_equals_float64_reference(sparse):
    _, model = _converted()
    model64 = float64_copy(model)
    attention = contextlib.nullcontext if sparse else dense_attention
    with float64_compute(), torch.no_grad():
        with recorded_attention_inputs(model64) as records, attention(model64):
            model64(_ids(T))
        assert len(records) == model.config.num_hidden_layers  # each layer once (no MTP in a plain forward)
        assert all((r.topk is not None) == sparse for r in records)  # the forward's selection, recorded
        ours64 = float(indexer_loss(records))
        ref = _kl_reference(records, sparse)
    assert ref > 1e-3  # not a trivial target
    assert abs(ours64 - ref) <= 1e-10 * ref  # the same formula: float64 rounding only
    if not sparse:  # float32 (no selection that rounding could flip): the logs' float32 rounding, T u each
        with recorded_attention_inputs(model) as records, dense_attention(model), torch.no_grad():
            model(_ids(T))
        ours32 = float(indexer_loss(records).detach())
        assert abs(ours32 - ref) <= 1e-4 * ref


def _grads(loss, model):
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {n: g for n, g in zip(names, grads)}


def test_sparse_stage_losses_reach_disjoint_parameters():
    _, model = _converted()
    ids = _ids(T + 1)
    with recorded_attention_inputs(model) as records:
        logits = model(ids[:, :-1])
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    kl = indexer_loss(records)
    g_lm, g_kl = _grads(lm, model), _grads(kl, model)
    main_indexers = [n for n in g_kl if is_indexer_param(n) and n.startswith("layers.")]
    assert main_indexers
    for n in g_kl:
        if is_indexer_param(n):
            assert g_lm[n] is None, n  # the selection runs without autograd
        else:
            assert g_kl[n] is None, n  # the indexer's input is detached, its target has no gradient
    for n in main_indexers:
        assert g_kl[n] is not None and g_kl[n].abs().sum() > 0, n
    assert g_lm["layers.0.self_attn.q_a_proj.weight"].abs().sum() > 0


def _docs(seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 40) + i for i in range(rng.randint(4, 12))] for _ in range(120)]


def _run(out_dir, steps=8, warmup=4, save_every=3, resume=None, on_step=None):
    cfg = TrainConfig(steps=steps, batch_size=B, seq_len=T, lr=1e-2, warmup_steps=2, save_every=save_every,
                      keep_last=2, out_dir=str(out_dir), resume=resume, sparse_attention="dsa", index_topk=K,
                      index_n_heads=16, index_head_dim=16, indexer_warmup_steps=warmup, indexer_lr=1e-2)
    _, model = _converted()
    ds = PackedLMDataset(_docs(), B, T, eos_id=2, shuffle=True, seed=1)
    trainer = DSATrainer(model, ds, cfg, on_step=on_step)
    return trainer, trainer.train()


def test_warmup_trains_only_the_indexers(tmp_path):
    _, before = _converted()
    trainer, hist = _run(tmp_path, steps=2, warmup=2, save_every=0)
    assert [r["stage"] for r in hist] == ["warmup", "warmup"]
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in before.named_parameters() if not torch.equal(p, after[n])}
    assert changed == {n for n in after if is_indexer_param(n)}  # the MTP layer's indexer too
    for (n, b), a in zip(before.named_buffers(), trainer.model.buffers()):
        assert torch.equal(a, b), n  # the MoE correction biases stay too
    state = trainer._optimizer_state()["state"]
    assert state and all(is_indexer_param(n) for n in state)


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from tests.train.test_dsa import _run
    def on_step(step, record):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    _run({out!r}, on_step=on_step)
""")


def _log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / LOG_FILE).read_text().splitlines()]


def test_exact_resume_across_the_stages_after_sigkill(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _, ref = _run(ref_dir)
    assert [r["stage"] for r in ref] == ["warmup"] * 4 + ["sparse"] * 4
    # checkpoints at 3 (warm-up) and 6 (sparse); killed at 5, in the sparse stage, resumed from step 3
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(tests=str(REPO), kill_at=5, out=str(run_dir))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run_dir / LATEST).read_text().strip() == "step-0000003"
    trainer, resumed = _run(run_dir, resume=str(run_dir))
    assert [r["step"] for r in resumed] == list(range(4, 9))
    for key in ("loss", "indexer_kl", "grad_norm", "lr", "stage"):
        assert [r[key] for r in resumed] == [r[key] for r in ref[3:]], key  # bitwise
    assert [(r["step"], r["loss"]) for r in _log(run_dir)] == [(r["step"], r["loss"]) for r in ref]
    ref_state = load_checkpoint(ref_dir)["model"].state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_config_checks():
    with pytest.raises(ValueError, match="index_topk"):
        TrainConfig(sparse_attention="dsa")
    with pytest.raises(ValueError, match="sparse_attention"):
        TrainConfig(sparse_attention="nsa", index_topk=4)
    with pytest.raises(ValueError, match="indexer_warmup_steps"):
        TrainConfig(sparse_attention="dsa", index_topk=4, steps=3, indexer_warmup_steps=5)
    with pytest.raises(ValueError, match="indexers"):
        DSATrainer(build_model(tiny_v3()), None, TrainConfig(sparse_attention="dsa", index_topk=4))
