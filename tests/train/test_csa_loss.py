"""train/csa_loss.py: the V4 CSA indexer's KL loss (its target is the layer's own softmax, it trains the
indexer alone and lowers under its gradient) and train/csa.py's trainer on the v4-demo recipe's shape."""

import pytest
import torch

from openr2.model.compressed import rope_tail
from openr2.model.topk import top_k_indices
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3, tiny_v4
from openr2.train import csa_loss
from openr2.train.csa_loss import (
    block_probs,
    csa_indexer_loss,
    entry_target,
    index_scores,
    recorded_csa_inputs,
)


@pytest.fixture(scope="module")
def model_and_ids():
    model = build_model(tiny_v4(), dtype=torch.float64, seed=0)
    ids = torch.randint(2, 256, (2, 120), generator=torch.Generator().manual_seed(0))
    return model, ids


def _selection(rec):
    attn = rec.attn
    with torch.no_grad():
        q_latent = attn.q_a_norm(attn.q_a_proj(rec.x))
        scores = index_scores(attn, rec.x, q_latent, rec.positions, rec.ropes)
    picked = top_k_indices(scores, attn.compressor.indexer.topk)
    valid = torch.isfinite(scores.gather(-1, picked))
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picked, valid)


def test_target_is_the_layers_own_attention(model_and_ids, monkeypatch):
    model, ids = model_and_ids
    with torch.no_grad(), recorded_csa_inputs(model) as records:
        model(ids)
    assert len(records) == 2  # tiny_v4's two CSA layers
    for rec in records:
        attn, x, T = rec.attn, rec.x, rec.x.shape[1]
        seen = _selection(rec)
        with torch.no_grad():
            cos, sin = rec.ropes["compress"]
            _, q, kv = attn.project(x, cos, sin)
            entries = attn.compressor(x, rec.ropes["rotary"])
            probs, ks = block_probs(attn, q, kv, entries, rec.positions, seen, 0, T)  # one block: every query
            keys = torch.cat((kv[:, ks], entries), dim=1)
            out = rope_tail(torch.einsum("bhts,bsd->bthd", probs.to(keys.dtype), keys), cos[:, :, None], -sin[:, :, None])
            # the probabilities rebuild the layer's output: they are its softmax over the entries it selected
            # (a float32 softmax there and here, as the layer computes it: float32 rounding)
            torch.testing.assert_close(attn.o_b_proj(attn._grouped_out(out)), attn(x, rec.positions, rec.ropes),
                                       rtol=1e-5, atol=1e-6)
            whole = probs[..., -entries.shape[1]:].sum(1)
            want = whole / whole.sum(-1, keepdim=True).clamp(min=torch.finfo(whole.dtype).tiny)
            monkeypatch.setattr(csa_loss, "WINDOW_QUERY_BLOCK", 16)  # blocks of queries give the same target
            torch.testing.assert_close(entry_target(attn, x, rec.positions, rec.ropes, seen), want,
                                       rtol=1e-5, atol=1e-7)
            assert torch.equal(entry_target(attn, x, rec.positions, rec.ropes, seen) > 0, seen & (want > 0))


def test_loss_trains_the_indexers_alone_and_falls(model_and_ids):
    model, ids = model_and_ids
    model = build_model(tiny_v4(), dtype=torch.float64, seed=0)
    params = {n: p for n, p in model.named_parameters() if ".indexer." in n}
    with recorded_csa_inputs(model) as records:
        model(ids)
    loss = csa_indexer_loss(records)
    assert loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        if name in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    first = loss.item()
    for _ in range(15):
        opt.zero_grad()
        with recorded_csa_inputs(model) as records:
            with torch.no_grad():
                model(ids)
        loss = csa_indexer_loss(records)
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_no_csa_layer_ran():
    with pytest.raises(ValueError, match="no compressed sparse attention layer"):
        csa_indexer_loss([])


def test_csa_trainer_steps_train_the_indexers_by_their_kl(tmp_path):
    from openr2.presets import v4_demo
    from openr2.train.config import TrainConfig
    from openr2.train.csa import CSATrainer
    from openr2.train.data import PackedLMDataset
    from openr2.train.run import config_from

    assert config_from("v4-demo").model == "v4-demo" and v4_demo().is_v4  # the recipe names a V4 preset
    model = build_model(tiny_v4(), seed=0)
    docs = [torch.randint(2, 256, (150,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=96, lr=1e-2, warmup_steps=1, save_every=0,
                      out_dir=str(tmp_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = CSATrainer(model, PackedLMDataset(docs, 2, 96, eos_id=1, shuffle=True, seed=1), cfg).train()
    assert len(history) == 2 and all(r["indexer_kl"] > 0 for r in history)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".indexer." in n for n in moved) and any(".indexer." not in n for n in moved)
    with pytest.raises(ValueError, match="compressed sparse attention"):
        CSATrainer(build_model(tiny_v3()), None, cfg)
