"""Constrained decoding (engine/grammar.py, the masks in sampling/rejection, the engine's per-sequence state):
the sampler never picks a masked token and greedy picks the argmax over the allowed ones; on the demo model
constrained greedy output equals a plain reference loop (full forward, its own matcher, argmax over allowed),
validates against the schema, is unchanged by free rows beside it, by speculative drafts (MTP and n-gram) and
by preemption; free rows are unchanged by constrained ones; reasoning stays free until </think>."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.engine.grammar import GrammarCompiler, StructuredOutputsParams, check
from openr2.engine.rejection import sample_with_drafts
from openr2.engine.sampling import SamplingParams, sample

DEMO = Path(__file__).resolve().parents[2] / "openr2" / "assets" / "openr2-demo"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 999},
                         "ok": {"type": "boolean"}, "tags": {"type": "array", "maxItems": 2,
                                                             "items": {"enum": ["a", "bb"]}}},
          "required": ["name", "n", "ok", "tags"], "additionalProperties": False}
JSON = StructuredOutputsParams(json=SCHEMA)


def test_the_sampler_never_picks_a_masked_token_and_greedy_is_the_allowed_argmax():
    gen = torch.Generator().manual_seed(0)
    B, V = 6, 40
    logits = torch.randn(B, V, generator=gen) * 4
    allowed = [torch.rand(V, generator=gen) < 0.2 for _ in range(B)]
    allowed[3] = None  # a free row beside constrained ones
    for a in allowed:
        if a is not None:
            a[int(torch.randint(0, V, (1,), generator=gen))] = True
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=2.0, top_p=0.9),
              SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.5)]
    for trial in range(30):
        gens = [torch.Generator().manual_seed(trial * 10 + i) for i in range(B)]
        ids = sample(logits, params, gens, blocked=[None if a is None else ~a for a in allowed]).token_ids.tolist()
        for i, (t, a) in enumerate(zip(ids, allowed)):
            if a is not None:
                assert a[t], (trial, i)
        masked = logits[0].masked_fill(~allowed[0], float("-inf"))
        assert ids[0] == int(masked.argmax()) and ids[3] == int(logits[3].argmax())
    # with drafts: each position's own mask; a draft outside it is rejected even where the model prefers it
    x = torch.randn(3, V, generator=gen)
    d = int(x[0].argmax())
    mask = torch.ones(3, V, dtype=torch.bool)
    mask[0, d] = False
    before = x.clone()
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=1.0)):
        for trial in range(20):
            out = sample_with_drafts(x, [[d, d]], [p], [torch.Generator().manual_seed(trial)], blocked=[~mask])[0]
            assert len(out) == 1 and out[0].token_id != d
    assert torch.equal(x, before)  # not the caller's scratch: untouched
    sample_with_drafts(x, [[d, d]], [SamplingParams(temperature=0)], blocked=[~mask], scratch=True)
    assert x[0, d] == float("-inf")  # handed over: masked in place


@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 0.99, 1.0])
def test_apply_blocked_equals_masked_fill(density):
    from openr2.engine.sampling import apply_blocked

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, generator=gen)
    before = x.clone()
    blocked = torch.rand(2, 300, generator=gen) < density  # rows 1 and 2; rows 0 and 3 stay free
    out = apply_blocked(x, [(1, blocked)])
    expected = x.clone()
    expected[1:3] = expected[1:3].masked_fill(blocked, float("-inf"))
    assert torch.equal(out, expected) and torch.equal(x, before)


@pytest.mark.parametrize("n_tok,vocab", [(300, 300), (300, 320), (301, 333), (64, 64), (330, 300)])
def test_packed_masks_applied_in_place_equal_the_unpacked_reference(n_tok, vocab):
    """The C pass over the packed words (token_mask.c) against numpy's unpackbits + masked_fill: words all
    allowed, all blocked and mixed, a partial last word, model vocabularies padded past the tokenizer's (and
    one smaller than it), free rows before the first constrained one; a non-contiguous logits view too."""
    import numpy as np

    from openr2.engine import token_mask
    from openr2.engine.token_mask import TokenMask

    assert token_mask._kernel() is not None  # a C compiler is part of the build environment (as for the
    rng = np.random.default_rng(n_tok + vocab)  # paged attention kernel): the fast path is what runs here
    words = (n_tok + 31) // 32
    for trial in range(20):
        bits = rng.integers(-2**31, 2**31, size=(3, words), dtype=np.int64).astype(np.int32)
        bits[:, rng.integers(0, words, size=3)] = -1  # whole words allowed
        bits[:, rng.integers(0, words, size=3)] = 0  # whole words blocked
        if trial % 4 == 0:
            bits[1:] = 0
            bits[1:, words // 2] = 1 << (trial % 32)  # one token allowed
        mask = TokenMask(bits, first=trial % 3, n_tok=n_tok)
        x = torch.randn(3, vocab + 5, dtype=torch.float32)[:, 2 : 2 + vocab]  # a view with a row stride
        expected = x.masked_fill(mask.blocked(vocab), float("-inf"))
        mask.apply_(x)
        assert torch.equal(x, expected), trial
        y = torch.randn(3, vocab)
        reference = TokenMask(bits, mask.first, n_tok, use_kernel=False)
        reference.apply_(y_ref := y.clone())
        mask.apply_(y)
        assert torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="3 rows"):
        mask.apply_(torch.zeros(2, vocab))


def test_prefetched_masks_equal_masks_computed_in_the_step():
    """The next position's mask computed ahead on the compiler's thread equals the one computed in place,
    with drafts after it, along a whole constrained answer."""
    from openr2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(str(DEMO))
    text = json.dumps({"name": "ab", "n": 12, "ok": True, "tags": ["a", "bb"]}, separators=(",", ":"))
    ids = tok.encode(text)
    states = {}
    for prefetch in (True, False):
        compiler = GrammarCompiler(tok, tok.vocab_size, prefetch=prefetch)
        states[prefetch] = compiler.state(compiler.compile(JSON), [])
    for i, t in enumerate(ids):
        drafts = ids[i + 1 : i + 3]
        a, b = (states[p].masks(drafts) for p in (True, False))
        assert torch.equal(a.blocked(tok.vocab_size), b.blocked(tok.vocab_size)), i
        assert not a.blocked(tok.vocab_size)[0, t]
        for p in (True, False):
            states[p].advance(t)
            states[p].prefetch()
    assert states[True].matcher.is_accepting()


def _allowed(state, drafts):
    """The complement of GrammarState.masks (which gives the blocked tokens), None for free rows."""
    mask = state.masks(drafts)
    return None if mask is None else ~mask.blocked(state.vocab_size)


def test_masks_with_drafts_roll_back_and_refuse_a_bad_draft():
    from openr2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(str(DEMO))
    compiler = GrammarCompiler(tok, tok.vocab_size + 8)  # a model vocabulary padded past the tokenizer's
    state = compiler.state(compiler.compile(StructuredOutputsParams(json={"type": "object"})), [])
    first = _allowed(state, [])
    brace = tok.encode("{")[0]
    assert first.shape == (1, tok.vocab_size + 8) and first[0, brace] and int(first[0].sum()) == 1
    quote = tok.encode('"')[0]
    rows = _allowed(state, [brace, brace, quote])  # the second brace is refused: its row and the rest mask it
    assert rows[0, brace] and not rows[1, brace] and torch.equal(rows[2], rows[1]) and torch.equal(rows[3], rows[1])
    assert torch.equal(_allowed(state, []), first)  # drafts were rolled back
    whole = tok.encode("{}") + [tok.eos_token_id, brace]  # a drafted EOS (llguidance cannot roll a stop back)
    rows = _allowed(state, whole)
    assert all(rows[j, t] for j, t in enumerate(whole[:3])) and not state.matcher.is_error()
    assert torch.equal(_allowed(state, []), first)
    free = compiler.state(compiler.compile(StructuredOutputsParams(json={"type": "object"})), [502])
    assert _allowed(free, [7]) is None  # before the trigger: free
    rows = _allowed(free, [502, brace])
    assert rows[0].all() and int(rows[1].sum()) == 1 and rows[1, brace]


def test_a_matcher_in_error_fails_its_request_only(demo):
    model, tok = demo
    engine = LLMEngine(model, tok, EngineConfig(num_blocks=64, block_size=16))
    engine.add_request("bad", PROMPTS[0], _constrained())
    engine.add_request("good", PROMPTS[1], _constrained())
    engine.requests["bad"].seqs[0].grammar.matcher.consume_token(tok.encode("x")[0])  # refused: error state
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["bad"].error is not None and "grammar" in str(done["bad"].error)
    assert done["good"].error is None and done["good"].outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done["good"].outputs[0].text), SCHEMA)


def test_bad_grammars_are_value_errors():
    with pytest.raises(ValueError, match="objectx"):
        check(StructuredOutputsParams(json={"type": "objectx"}))
    with pytest.raises(ValueError):
        check(StructuredOutputsParams(json="{not json"))
    with pytest.raises(ValueError):
        StructuredOutputsParams(json={}, json_object=True)


@pytest.fixture(scope="module")
def demo():
    from openr2.checkpoints import load_model
    from openr2.tokenizer import Tokenizer

    return load_model(str(DEMO)), Tokenizer.from_pretrained(str(DEMO))


def _run(demo, prompts, params, **config):
    model, tok = demo
    engine = LLMEngine(model, tok, EngineConfig(**{"num_blocks": 64, "block_size": 16, **config}))
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[f"r{i}"] for i in range(len(prompts))], engine


PROMPTS = ["The weather", "A list of", "Hello there, my name", "{"]


def _constrained(max_tokens=80, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=JSON, **kw)


def test_constrained_greedy_equals_a_plain_reference_loop_and_validates(demo):
    import llguidance
    import llguidance.torch

    model, tok = demo
    outs, _ = _run(demo, PROMPTS[:2], [_constrained()] * 2)
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    for prompt, out in zip(PROMPTS, outs):
        matcher, ids, expected = llguidance.LLMatcher(lltok, grammar), tok.encode(prompt), []
        bits = llguidance.torch.allocate_token_bitmask(1, tok.vocab_size)
        while len(expected) < 80 and tok.eos_token_id not in expected:
            with torch.no_grad():
                logits = model(torch.tensor([ids + expected]))[0, -1]
            llguidance.torch.fill_next_token_bitmask(matcher, bits)
            ok = torch.tensor([(int(bits[0, t // 32]) >> (t % 32)) & 1 for t in range(tok.vocab_size)], dtype=torch.bool)
            token = int(logits.masked_fill(~ok, float("-inf")).argmax())
            expected.append(token)
            assert token == tok.eos_token_id or matcher.consume_token(token)
        assert out.token_ids == expected
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_constrained_and_free_rows_share_a_batch(demo):
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=80, structured_outputs=JSON)
    alone_c, _ = _run(demo, [PROMPTS[0], PROMPTS[1]], [_constrained(), seeded])
    alone_f, _ = _run(demo, [PROMPTS[2]], [free])
    mixed, _ = _run(demo, [PROMPTS[0], PROMPTS[2], PROMPTS[1]], [_constrained(), free, seeded])
    assert [o.token_ids for o in mixed] == [alone_c[0].token_ids, alone_f[0].token_ids, alone_c[1].token_ids]
    for out in (mixed[0], mixed[2]):
        jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("spec", ["mtp:2", "ngram:3"])
def test_speculative_constrained_equals_non_speculative(demo, spec):
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=80, structured_outputs=JSON)
    params = [_constrained(), _constrained(), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), seeded]
    plain, _ = _run(demo, PROMPTS, params)
    drafted, engine = _run(demo, PROMPTS, params, speculative_config=spec)
    assert [o.token_ids for o in drafted[:3]] == [o.token_ids for o in plain[:3]]  # greedy: token for token
    assert engine.spec_stats.num_draft_tokens > 0
    assert drafted[3].finish_reason == "stop"  # a sampled row verified by rejection sampling keeps the grammar too
    jsonschema.validate(json.loads(drafted[3].text), SCHEMA)


def test_preemption_keeps_the_grammar_state(demo):
    params = [_constrained(max_tokens=60)] * 4
    roomy, _ = _run(demo, PROMPTS, params)
    tight, engine = _run(demo, PROMPTS, params, num_blocks=12, block_size=8)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_n_samples_each_follow_the_grammar(demo):
    model, tok = demo
    engine = LLMEngine(model, tok, EngineConfig(num_blocks=64, block_size=16))
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=80, structured_outputs=JSON)
    outs = [out for out in engine.stream(PROMPTS[0], params) if out.finished][-1].outputs
    assert len({o.text for o in outs}) > 1  # forked samples, each with its own grammar state
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_reasoning_is_free_until_think_end(demo):
    model, tok = demo
    engine = LLMEngine(model, tok, EngineConfig(num_blocks=32, block_size=16))
    think = tok.token_to_id("<think>")
    engine.add_request("r", tok.encode("Q") + [think], _constrained())
    seq = engine.requests["r"].seqs[0]
    assert seq.grammar.pending == [tok.token_to_id("</think>")] and seq.grammar.masks([]) is None
    engine.add_request("q", tok.encode("Q"), _constrained())
    assert engine.requests["q"].seqs[0].grammar.masks([]) is not None


def test_a_bad_schema_is_refused_at_add_request(demo):
    model, tok = demo
    engine = LLMEngine(model, tok, EngineConfig(num_blocks=32, block_size=16))
    with pytest.raises(ValueError, match="structured_outputs"):
        engine.add_request("r", "x", SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": 3})))
    assert not engine.has_unfinished_requests()


def test_a_strict_tool_call_block_is_constrained_after_the_model_opens_it():
    from openr2.tokenizer import TOOL_CALL_BEGIN, TOOL_CALLS_BEGIN, Tokenizer
    from openr2.tool_calls import V3

    tok = Tokenizer.from_pretrained(str(DEMO))
    params = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
              "additionalProperties": False}
    begin = tok.token_to_id(TOOL_CALLS_BEGIN)
    grammar = V3.calls_grammar([("get_weather", params)], tok.token_to_id, after_begin=True)
    compiler = GrammarCompiler(tok, tok.vocab_size)
    state = compiler.state(compiler.compile(StructuredOutputsParams(grammar=grammar, trigger_token_ids=(begin,))),
                           [begin])
    text = tok.encode("Let me look.")
    assert _allowed(state, text) is None  # free text before the block
    good = tok.encode(V3.calls_text([("get_weather", '{"city":"Oslo"}')])) + [tok.eos_token_id]
    rows = _allowed(state, good)
    assert all(rows[j, t] for j, t in enumerate(good))
    assert int(rows[1].sum()) == 1 and rows[1, tok.token_to_id(TOOL_CALL_BEGIN)]  # nothing but a call
    bad = tok.encode(V3.calls_text([("get_weather", '{"city":"Rome"}')]))
    rows = _allowed(state, bad)
    assert not all(rows[j, t] for j, t in enumerate(bad))
    for t in text + good:
        state.advance(t)
    assert state.matcher.is_stopped()
