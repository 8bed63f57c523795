"""DeepSeek-V4 against transformers' DeepseekV4ForCausalLM, float32: logits both directions (openr2 loads what
transformers saved; transformers loads what openr2 saved) and greedy generation (ours: full forward per token
and through CompressedCache; theirs: `generate` with its compressor caches).

The prompts (160 tokens, tiny_v4: window 16, CSA 4:1 with top-8, HCA 16:1) are long enough that each piece
decides the logits: checked by switching it off in a copy (a window as long as the prompt, no compressed
entries, a dense indexer) and seeing the logits move by far more than the parity bound. Before comparing,
the indexer's selection is checked to be decided by the model and not by rounding (tests/dsa.py's rule on
the recorded scores). Logits are compared as in test_parity.py (each side within a small factor of the
other's error against a float64 run of our model), and max |ours - theirs| <= 1e-4 besides.
"""

from __future__ import annotations

import copy

import pytest
import torch

from openr2.checkpoints import load_model, save_model
from openr2.model.transformer import greedy_cached, greedy_full_forward
from openr2.presets import tiny_v4
from tests.hf_utils import hf_model
from tests.numerics import FACTOR, assert_same_function, max_abs_diff, reference64
from tests.v4 import assert_decided

PARITY = 1e-4  # issue 18: max abs logit difference in float32
TOKENS = 160
GEN_SEED = 4


def _ids(config, tokens=TOKENS, batch=2, seed=0):
    return torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, openr2 model loaded from its save_pretrained)."""
    config = tiny_v4()
    config.validate()
    hf = hf_model(config, seed=3)
    path = tmp_path_factory.mktemp("v4-hf")
    hf.save_pretrained(path)
    return hf, load_model(path)


def _check_parity(ours, theirs, ref64, what):
    assert_same_function(ours, theirs, ref64, what=what)
    diff = max_abs_diff(ours, theirs)
    print(f"{what}: max |ours - transformers| = {diff:.3g}")
    assert diff <= PARITY, f"{what}: logits differ by {diff:.3g} > {PARITY}"


def _attentions(model):
    return [layer.self_attn for layer in model.layers]


def test_every_piece_decides(pair):
    """A window as long as the prompt, no compressed entries, or a dense indexer: each moves the logits far
    beyond the parity bound, so the comparisons below test all three."""
    _, ours = pair
    ids = _ids(ours.config)
    with torch.no_grad():
        base = ours(ids)
        for what, change in [
            ("window", lambda a: setattr(a, "window", 10**6)),
            ("compressed entries", lambda a: setattr(a, "compressor", None)),
            ("indexer top-k", lambda a: a.compressor is not None and hasattr(a.compressor, "indexer")
             and setattr(a.compressor.indexer, "topk", 10**6)),
        ]:
            other = copy.deepcopy(ours)
            for attn in _attentions(other):
                change(attn)
            moved = max_abs_diff(other(ids), base)
            print(f"switching off the {what} moves the logits by {moved:.3g}")
            assert moved > 100 * PARITY, f"{what}: switching it off moves the logits by only {moved:.3g}"
        kinds = {a.kind for a in _attentions(ours)}
        assert kinds == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}


def test_openr2_loads_transformers_save(pair):
    hf, ours = pair
    ids = _ids(ours.config)
    assert_decided(ours, ids)
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids)
    _check_parity(mine, theirs, reference64(ours, ids), "openr2 <- transformers")


def test_transformers_loads_openr2_save(pair, tmp_path):
    import transformers

    _, ours = pair
    save_model(ours, tmp_path)
    theirs_model = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = _ids(ours.config, seed=1)
    assert_decided(ours, ids)
    with torch.no_grad():
        theirs = theirs_model(ids).logits
        mine = ours(ids)
    _check_parity(mine, theirs, reference64(ours, ids), "transformers <- openr2")
    # and what openr2 reloads from its own save is the same model, bit for bit
    assert torch.equal(load_model(tmp_path)(ids), mine)


def test_greedy_generation_equals_transformers_generate(pair):
    """Greedy tokens equal transformers' cached `generate` (which crosses window, CSA and HCA block boundaries
    as it goes). Each step's top-2 logit margin is checked to exceed the logits' difference, so a near-tie
    cannot decide the comparison; the selection guard on the final sequence covers every prefix (a query's
    scores depend only on tokens up to it)."""
    hf, ours = pair
    new = 20
    prompt = _ids(ours.config, tokens=TOKENS - new + 3, seed=GEN_SEED)  # ends past an HCA block boundary mid-way
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
    mine = greedy_full_forward(ours, prompt, new)
    assert (mine[:, prompt.shape[1]:] != ours.config.eos_token_id).all(), "EOS generated: choose another seed"
    assert_decided(ours, mine)
    with torch.no_grad():
        logits = ours(mine)[:, prompt.shape[1] - 1 : -1]
        top2 = logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    assert margin > 10 * PARITY, f"a greedy step is a near-tie (margin {margin:.3g}); choose another seed"
    assert torch.equal(mine, theirs), (mine[:, prompt.shape[1]:], theirs[:, prompt.shape[1]:])
    assert torch.equal(greedy_cached(ours, prompt, new), theirs)  # and through openr2's CompressedCache


def test_bfloat16_keeps_transformers_float32_parameters(pair, tmp_path):
    """Loaded in bfloat16, the parameters transformers keeps float32 (`_keep_in_fp32_modules_strict`: norms,
    sinks, position biases, hyper-connections) stay float32 here too; the router's weight also does (DeepSeek's
    inference code routes in float32; transformers' V4 rounds it to the model dtype). A bfloat16 forward is as
    far from the float64 run as transformers' bfloat16 forward is (both move discrete choices, top-k entries
    and experts, so the errors are large; their sizes still agree within the usual factor)."""
    import transformers

    hf, ours = pair
    hf.save_pretrained(tmp_path)
    mine16 = load_model(tmp_path, dtype=torch.bfloat16)
    theirs16 = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    kept = {n for n, p in mine16.named_parameters() if p.dtype == torch.float32}
    theirs_kept = {n.removeprefix("model.") for n, p in theirs16.named_parameters() if p.dtype == torch.float32}
    assert kept - theirs_kept == {n for n in kept if n.endswith("mlp.gate.weight")}
    assert theirs_kept <= kept
    ids = _ids(ours.config)
    with torch.no_grad():
        mine, theirs = mine16(ids), theirs16(ids).logits
    assert mine.dtype == torch.bfloat16
    ref = reference64(ours, ids)
    err_mine, err_theirs = max_abs_diff(mine, ref), max_abs_diff(theirs, ref)
    print(f"bfloat16: max |ours - float64| = {err_mine:.3g}, transformers' {err_theirs:.3g}")
    assert err_mine <= FACTOR * err_theirs and err_theirs <= FACTOR * err_mine
