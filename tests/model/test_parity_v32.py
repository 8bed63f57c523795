"""DeepSeek-V3.2 against transformers' DeepseekV32ForCausalLM, float32: logits both directions (openr2 loads
what transformers saved; transformers loads what openr2 saved), greedy generation, our fast paths and cache.

Prompts are several times index_topk long, so that the indexer's selection decides the logits (checked: they
differ from a dense run), and every comparison first checks that rounding cannot change that selection
(tests/dsa.py). Logits are compared as in test_parity.py (tests/numerics.py: each side within a small factor
of the other's error against a float64 run of our model), and the issue's bound, max |ours - theirs| <= 1e-4,
is asserted besides.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.checkpoints import load_model, save_model
from openr2.model.mla import LatentCache
from openr2.model.transformer import build_model
from openr2.presets import tiny_v32
from tests.dsa import assert_selection_decided, dense_indexers, index_scores64_of, index_scores_of
from tests.hf_utils import hf_model, perturb_
from tests.numerics import FACTOR, assert_close_to_reference, assert_same_function, max_abs_diff, reference64

PARITY = 1e-4  # issue 17: max abs logit difference in float32
YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}

CASES = {
    # tiny_v32: YaRN with mscale = mscale_all_dim (cos/sin unscaled), 16 indexer heads x 32 (8 rotated), top-8
    "v32-top8": (dataclasses.replace(tiny_v32(), num_nextn_predict_layers=0), 48),
    # YaRN without mscale keys: cos/sin scaled by 0.1 ln(4) + 1, in the indexer's rope too; 24 heads x 24, top-16,
    # two dense layers
    "v32-top16-yarn-factor": (dataclasses.replace(
        tiny_v32(), rope_scaling=dict(YARN), index_n_heads=24, index_head_dim=24, index_topk=16,
        num_hidden_layers=4, first_k_dense_replace=2, num_nextn_predict_layers=0), 64),
}


def _ids(config, tokens, batch=2, seed=0):
    return torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, openr2 model loaded from its save_pretrained, prompt length, case name)."""
    config, tokens = CASES[request.param]
    config.validate()
    hf = hf_model(config, seed=sorted(CASES).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path), tokens, request.param


def _check_parity(ours, theirs, ref64, what):
    assert_same_function(ours, theirs, ref64, what=what)
    diff = max_abs_diff(ours, theirs)
    print(f"{what}: max |ours - transformers| = {diff:.3g}")
    assert diff <= PARITY, f"{what}: logits differ by {diff:.3g} > {PARITY}"


def test_hf_checkpoint_loads_with_parity(pair):
    hf, ours, tokens, name = pair
    config = ours.config
    assert config.model_type == "deepseek_v32" and config.index_topk * 4 <= tokens
    ids = _ids(config, tokens)
    assert_selection_decided(index_scores_of(ours, ids), index_scores64_of(ours, ids), config.index_topk, what=name)
    with torch.no_grad():
        theirs, out = hf(ids).logits, ours(ids)
        with dense_indexers(ours):
            dense = ours(ids)
    assert theirs.abs().max() > 0.1
    assert max_abs_diff(out, dense) > 100 * PARITY  # the sparse selection decides the logits
    _check_parity(out, theirs, reference64(ours, ids), f"logits, loaded from transformers' save ({name})")


def test_our_save_loads_in_transformers_with_parity(pair, tmp_path):
    """A model openr2 built and initialised itself (not weights that came from transformers)."""
    _, _, tokens, name = pair
    config = CASES[name][0]
    model = build_model(config, seed=14)
    perturb_(model, seed=14)
    model.eval()
    save_model(model, tmp_path)
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is transformers.DeepseekV32ForCausalLM
    assert back.model.layers[1].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    ids = _ids(config, tokens, seed=1)
    assert_selection_decided(index_scores_of(model, ids), index_scores64_of(model, ids), config.index_topk, what=name)
    with torch.no_grad():
        theirs, out = back(ids).logits, model(ids)
    _check_parity(out, theirs, reference64(model, ids), f"logits, our save in transformers ({name})")


def test_fast_paths_and_cached_decode_match_the_plain_path(pair):
    """absorbed (gathered latents) vs naive (selection as a mask), one pass; prefill then decode one token
    at a time through the contiguous cache, both decode paths."""
    _, ours, tokens, name = pair
    config = ours.config
    ids = _ids(config, tokens, seed=2)
    assert_selection_decided(index_scores_of(ours, ids), index_scores64_of(ours, ids), config.index_topk, what=name)
    prefill = config.index_topk + 3
    with torch.no_grad():
        plain = ours(ids, attn_impl="naive", moe_impl="looped")
        absorbed = ours(ids, attn_impl="absorbed", moe_impl="looped")
        cached = {}
        for impl in ("naive", "absorbed"):
            cache = LatentCache.for_model(config, batch_size=2, max_tokens=tokens)
            steps = [ours(ids[:, :prefill], cache=cache, attn_impl="naive")]
            for t in range(prefill, tokens):
                steps.append(ours(ids[:, t : t + 1], cache=cache, attn_impl=impl))
            assert cache.length == tokens
            cached[impl] = torch.cat(steps, dim=1)
    ref = reference64(ours, ids, attn_impl="naive", moe_impl="looped")
    assert_close_to_reference(absorbed, plain, ref, what=f"absorbed vs naive ({name})")
    for impl, out in cached.items():
        assert_close_to_reference(out, plain, ref, what=f"cached {impl} decode vs one pass ({name})")


def _greedy(model, prompt, new_tokens, cached):
    """Greedy continuation: the whole sequence again every step, or a prefill then absorbed decode steps."""
    seq = prompt
    with torch.no_grad():
        if not cached:
            for _ in range(new_tokens):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            return seq
        cache = LatentCache.for_model(model.config, prompt.shape[0], prompt.shape[1] + new_tokens)
        logits = model(prompt, cache=cache, attn_impl="naive")[:, -1]
        for _ in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache=cache, attn_impl="absorbed")[:, -1]
    return seq


def test_greedy_generation_equals_transformers_generate(pair):
    hf, ours, _, name = pair
    config = ours.config
    prompt, new = _ids(config, config.index_topk + 8, seed=3), 3 * config.index_topk
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert want.shape == (2, prompt.shape[1] + new)
    # well posed: the selection along the whole sequence, and each greedy choice, are far from rounding
    assert_selection_decided(index_scores_of(ours, want), index_scores64_of(ours, want), config.index_topk,
                             what=f"{name}, generated")
    with torch.no_grad():
        logits, theirs = ours(want), hf(want).logits
    top2 = logits[:, prompt.shape[1] - 1 : -1].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > FACTOR * max_abs_diff(logits, theirs)
    for cached in (False, True):
        got = _greedy(ours, prompt, new, cached)
        assert torch.equal(got, want), f"greedy ({'cache' if cached else 'no cache'}) differs from transformers"
