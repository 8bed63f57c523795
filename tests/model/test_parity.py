"""Logit parity with the transformers reference, both directions, and our fast paths vs plain paths.

Tolerances (tests/numerics.py): ours and transformers' float32 logits are each within a small factor of
the other's error against a float64 run of our model (with its float32 steps lifted to float64; transformers'
own float64 run keeps its router and norms in float32, so it is no reference); our fast paths are within a
small factor of our plain path's error against that float64 run.

The configs together cover q LoRA on/off, YaRN on/off (with and without mscale), greedy / group-limited /
noaux_tc routing, softmax and sigmoid gates, and several dense layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

from openr2.checkpoints import load_model, save_model
from openr2.model.mla import LatentCache
from openr2.presets import tiny_v2, tiny_v3
from tests.hf_utils import hf_model
from tests.numerics import assert_close_to_reference, assert_same_function, reference64

YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}

CASES = {
    # q LoRA, YaRN (mscale 1.0), sigmoid + bias, 4 groups keep 2, one dense layer
    "v3-qlora-yarn-groups": tiny_v3(),
    # plain q_proj, no YaRN, sigmoid without renormalisation, two dense layers, 2 groups keep 1
    "v3-noqlora-plainrope": dataclasses.replace(
        tiny_v3(), q_lora_rank=None, rope_scaling=None, first_k_dense_replace=2, num_hidden_layers=4,
        n_group=2, topk_group=1, norm_topk_prob=False, num_nextn_predict_layers=0),
    # YaRN without mscale keys: transformers then scales cos/sin by 0.1 ln(factor) + 1 and not the softmax
    "v3-yarn-no-mscale": dataclasses.replace(tiny_v3(), rope_scaling=dict(YARN), num_nextn_predict_layers=0),
    # V2-Lite shape: plain q_proj, softmax greedy, two dense layers, no YaRN
    "v2-greedy": tiny_v2(),
    # V2 shape: q LoRA, softmax group-limited greedy, YaRN mscale 0.707, routed scaling 16
    "v2-group-limited-yarn": dataclasses.replace(
        tiny_v2(), q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=16.0, first_k_dense_replace=1,
        rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, openr2 model loaded from its save_pretrained, case name)."""
    config = CASES[request.param]
    config.validate()
    hf = hf_model(config, seed=sorted(CASES).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    # transformers saves no MTP tensors: a config announcing MTP loads with it off, and says so
    announces_mtp = config.num_nextn_predict_layers > 0
    with pytest.warns(UserWarning, match="MTP") if announces_mtp else contextlib.nullcontext():
        ours = load_model(path)
    assert len(ours.mtp) == 0
    return hf, ours, request.param


def _ids(config, batch=2, tokens=24, seed=0):
    return torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_hf_checkpoint_loads_with_parity(pair):
    hf, ours, name = pair
    ids = _ids(ours.config)
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert ref.abs().max() > 0.1  # a model that says something
    assert_same_function(out, ref, reference64(ours, ids), what=f"logits, loaded from transformers' save ({name})")


def test_our_save_loads_in_transformers_with_parity(pair, tmp_path):
    hf, ours, name = pair
    save_model(ours, tmp_path)
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    ids = _ids(ours.config, seed=1)
    with torch.no_grad():
        theirs, out = back(ids).logits, ours(ids)
    assert_same_function(out, theirs, reference64(ours, ids), what=f"logits, our save in transformers ({name})")


def test_absorbed_and_grouped_match_naive_and_looped(pair):
    _, ours, name = pair
    ids = _ids(ours.config, seed=2)
    with torch.no_grad():
        plain = ours(ids, attn_impl="naive", moe_impl="looped")
        absorbed = ours(ids, attn_impl="absorbed", moe_impl="looped")
        grouped = ours(ids, attn_impl="naive", moe_impl="grouped")
    ref = reference64(ours, ids, attn_impl="naive", moe_impl="looped")
    assert_close_to_reference(absorbed, plain, ref, what=f"absorbed vs naive ({name})")
    assert_close_to_reference(grouped, plain, ref, what=f"grouped vs looped ({name})")


@pytest.mark.parametrize("attn_impl", ["naive", "absorbed"])
def test_cached_decode_matches_full_forward(pair, attn_impl):
    """Prefill 10 tokens, then decode the rest one by one through the latent cache."""
    _, ours, _ = pair
    ids = _ids(ours.config, tokens=16, seed=3)
    with torch.no_grad():
        full = ours(ids)
        cache = LatentCache.for_model(ours.config, batch_size=2, max_tokens=16)
        steps = [ours(ids[:, :10], cache=cache, attn_impl="naive")]
        for t in range(10, 16):
            steps.append(ours(ids[:, t : t + 1], cache=cache, attn_impl=attn_impl))
    assert cache.length == 16
    assert_close_to_reference(torch.cat(steps, dim=1), full, reference64(ours, ids),
                              what=f"cached {attn_impl} decode vs one pass")


def test_hf_legacy_rope_scaling_key(tmp_path):
    """An older config.json (top-level rope_theta + rope_scaling) reads the same as transformers reads it."""
    config = dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0)
    hf = hf_model(config, seed=7)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_model(tmp_path)
    assert ours.config.rope_scaling["factor"] == 4
    ids = _ids(config, seed=4)
    with torch.no_grad():
        out, theirs = ours(ids), hf(ids).logits
    assert_same_function(out, theirs, reference64(ours, ids), what="logits, legacy rope_scaling key")
