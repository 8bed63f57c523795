"""The whole model: default positions, dtypes (router stays float32), MTP shapes, training-mode gradients."""

from __future__ import annotations

import pytest
import torch

from openr2.model.moe import Gate
from openr2.model.transformer import build_model
from openr2.presets import tiny_v2, tiny_v3
from tests.numerics import assert_close_to_reference, reference64


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_v3(), seed=0).eval()


def _ids(config, batch=2, tokens=12, seed=0):
    return torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_default_positions_are_zero_based(model):
    ids = _ids(model.config)
    with torch.no_grad():
        plain = model(ids)
        assert torch.equal(plain, model(ids, positions=torch.arange(12).expand(2, 12)))  # the same call
        shifted = model(ids, positions=torch.arange(5, 17).expand(2, 12))
    # attention sees relative positions only: a uniform shift changes logits by rounding alone (its float32
    # rope angles round differently), so the shifted logits are as close to a float64 run of the unshifted
    # ones as the unshifted float32 logits are
    assert_close_to_reference(shifted, plain, reference64(model, ids), what="positions shifted by 5")


def test_bfloat16_model_keeps_router_in_float32():
    model = build_model(tiny_v3(), dtype=torch.bfloat16, seed=0).eval()
    reference = build_model(tiny_v3(), seed=0).eval()
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert gates and all(g.weight.dtype == torch.float32 for g in gates)
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in gates)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ids = _ids(model.config)
    with torch.no_grad():
        low, high = model(ids), reference(ids)
    assert low.dtype == torch.bfloat16
    # bf16 rounding (and the odd near-tie routing flip) stays small on average: bfloat16 keeps 8 significant
    # bits (unit roundoff 2^-9), and the logits come out of ~19 matrix products in sequence (per layer: q
    # down, q up, scores, output, MLP up, MLP down; then the head), each rounding its inputs and its output
    # to bf16 (~2 x 2^-9 relative); as a random walk, sqrt(19) x 2 x 2^-9 = 0.017 relative on average
    # (measured 0.016); 0.05 leaves 3x for another machine's bf16 kernels
    assert (low.float() - high).abs().mean() < 0.05 * high.abs().mean()


def test_mtp_drafts_shapes(model):
    ids = _ids(model.config)
    with torch.no_grad():
        logits, hidden = model(ids, return_hidden=True)
        drafts = model.forward_mtp(hidden, ids)
    assert len(drafts) == 1 and drafts[0].shape == (2, 11, model.config.vocab_size)


def test_training_step_reaches_every_parameter():
    model = build_model(tiny_v2(), seed=1).train()
    ids = _ids(model.config, tokens=32)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.05)  # fresh model: ~uniform
    silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # routed experts that no token picked get no gradient; every other parameter must
    assert all(".experts." in n for n in silent)


def test_tied_embeddings_share_one_tensor():
    import dataclasses

    model = build_model(dataclasses.replace(tiny_v2(), tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_draft_at_one_position_equals_draft_there(model):
    """Transformer.draft_at (the MTP keys written at every position, the rest of its block at one position
    per row) gives `draft`'s logits and block output at that position and the same cache."""
    from openr2.model.mla import LatentCache
    from tests.numerics import float64_compute, float64_copy

    config, L = model.config, model.config.num_hidden_layers
    ids, index = _ids(config, tokens=10), torch.tensor([1, 2])

    def run(m, at: bool):
        dtype = m.embed_tokens.weight.dtype
        cache = LatentCache(L + 1, 2, 10, config.kv_lora_rank, config.qk_rope_head_dim, dtype)  # layer L: the MTP's
        with torch.no_grad():
            _, hidden = m(ids, return_hidden=True)
            positions = torch.arange(10).expand(2, 10)
            m.draft(hidden[:, :6], ids[:, 1:7], positions[:, :6], cache)  # six earlier positions
            cache.advance(6)
            args = (hidden[:, 6:9], ids[:, 7:10], positions[:, 6:9], cache)
            if at:
                logits, h = m.draft_at(*args, index)
            else:
                logits, h = m.draft(*args, logits_index=index)
                h = h[torch.arange(2), index]
        return logits, h, torch.cat((cache.c_kv[L], cache.k_rope[L]), -1)

    with float64_compute():
        ref = run(float64_copy(model), at=False)
    for fast, plain, r, what in zip(run(model, at=True), run(model, at=False), ref, ("logits", "block output", "cache")):
        assert_close_to_reference(fast, plain, r, what=what)
