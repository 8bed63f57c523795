"""A speculative engine's warm-up builds (or loads) every compiled step its drafts may need, so that its first
requests compile nothing: the shapes it asks for (fast), and an end-to-end warm-up after which serving builds
no package (slow: it builds two)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.engine.sampling import SamplingParams
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3


def _model(num_mtp: int, num_layers: int = 3):
    config = dataclasses.replace(tiny_v3(), num_nextn_predict_layers=num_mtp, num_hidden_layers=num_layers)
    return build_model(config, seed=0).eval()


@pytest.mark.parametrize(("spec", "num_mtp", "max_drafts", "want"), [
    ("ngram:2", 0, 3, [("decode", 1), ("decode", 2), ("decode", 3)]),
    ("ngram:5", 0, 3, [("decode", w) for w in (1, 2, 3, 4)]),  # a compiled step carries at most 3 drafts
    ("mtp:1", 1, 3, [("decode", 1), ("decode-draft", 1), ("decode-draft", 2), ("draft-0", 1), ("draft-0", 2)]),
    # drafts 2 and 3 chain one-position steps: module (j - 1) mod 2, so module 1 too
    ("mtp:3", 2, 3, [("decode", 1)] + [("decode-draft", w) for w in (1, 2, 3, 4)] +
     [("draft-0", w) for w in (1, 2, 3, 4)] + [("draft-1", 1)]),
    ("mtp:3", 1, 1, [("decode", 1), ("decode-draft", 1), ("decode-draft", 2), ("draft-0", 1), ("draft-0", 2)]),
])
def test_compiled_shapes_of_a_speculative_config(spec, num_mtp, max_drafts, want):
    engine = LLMEngine(_model(num_mtp), config=EngineConfig(num_blocks=8, speculative_config=spec))
    assert engine.speculator.compiled_shapes(max_drafts) == want


@pytest.mark.slow
def test_warm_up_builds_the_speculative_widths_before_the_first_request(tmp_path):
    """ngram:1 on one row: the decode step 1 and 2 tokens wide are built by warm_up; a request that drafts (its
    prompt holds every token of the vocabulary once, so every last token has a successor to propose) then
    builds nothing, and its greedy output equals the eager engine's."""
    model = _model(0, num_layers=1)
    prompt = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def run(engine):
        engine.add_request("r", prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    return out.outputs[0].token_ids

    config = EngineConfig(block_size=8, num_blocks=40, max_num_seqs=1, speculative_config="ngram:1", compile=True,
                          compile_cache_dir=str(tmp_path))
    engine = LLMEngine(model, config=config)
    engine.warm_up()
    step = engine.runner._compiled_decode
    assert step.covers(1, 1, 8) and step.covers(1, 2, 8)
    built = step.num_built + step.num_loaded
    with torch.inference_mode():
        got = run(engine)
    assert engine.spec_stats.num_drafts > 0  # steps 2 tokens wide ran
    assert step.num_built + step.num_loaded == built  # and found their packages ready
    want = run(LLMEngine(model, config=dataclasses.replace(config, compile=False)))
    assert got == want
