"""The offline API and the CLI verbs on a saved tiny checkpoint with a tokenizer."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from openr2 import LLM, SamplingParams
from openr2.engine.engine import RequestError
from tests.checkpoints import save_tiny_chat_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_chat_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint, compile=False, block_size=16, num_blocks=64)


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_generate_text_and_token_prompts(llm):
    text = "What is 12+30?"
    ids = llm.tokenizer.encode(text)
    a, b = llm.generate([text, {"prompt_token_ids": ids}], GREEDY)
    assert a.prompt == text and a.prompt_token_ids == ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 12
    assert a.outputs[0].text == llm.tokenizer.decode(a.outputs[0].token_ids, skip_special_tokens=True)
    assert a.outputs[0].finish_reason == "length"


def test_stop_string_cuts_the_text(llm):
    full = llm.generate("The answer is", GREEDY)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate("The answer is", dataclasses.replace(GREEDY, stop=[stop]))[0].outputs[0]
    assert out.text == full[: full.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_chat_counts_reasoning_tokens(llm):
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}], GREEDY)[0]
    # the R1 prompt ends inside <think>: a completion without </think> is all reasoning
    think_end = llm.tokenizer.token_to_id("</think>")
    ids = out.outputs[0].token_ids
    expected = ids.index(think_end) + 1 if think_end in ids else len(ids)
    assert out.usage.reasoning_tokens == expected
    assert out.prompt_token_ids[-1] == llm.tokenizer.encode("\n")[-1]


def test_streamed_text_deltas_add_up(llm):
    engine = llm.engine
    pieces, last = [], None
    for out in engine.stream("café 你好 🎉", SamplingParams(temperature=0.8, seed=5, max_tokens=20)):
        pieces.append(out.outputs[0].text_delta)
        last = out
    assert "".join(pieces) == last.outputs[0].text


def test_bad_prompt_list_leaves_no_request(llm):
    with pytest.raises(ValueError, match="context window"):
        llm.generate(["fine", "far too long " * 400], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def _cli(*args, stdin=None):
    args = (*args, "--no-compile") if args[0] in ("generate", "chat") else args
    return subprocess.run([sys.executable, "-m", "openr2", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_cli_generate(checkpoint, llm):
    result = _cli("generate", str(checkpoint), "--prompt", "The answer is", "--raw", "--temperature", "0",
                  "--max-tokens", "12")  # --raw: the plain text, as llm.generate takes it
    assert result.returncode == 0, result.stderr
    expected = llm.generate("The answer is", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert result.stdout.rstrip("\n") == expected
    assert "prompt" in result.stderr and "completion" in result.stderr


def test_cli_chat_session(checkpoint):
    result = _cli("chat", str(checkpoint), "--max-tokens", "6", stdin="hello\n/reset\nhi again\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "(conversation cleared)" in result.stdout
    assert result.stdout.count(">>> ") == 4


def test_cli_errors_are_clear(tmp_path):
    result = _cli("generate", str(tmp_path), "--prompt", "x")
    assert result.returncode == 2 and "config.json" in result.stderr


def test_a_request_failing_in_the_engine_raises_and_leaves_nothing_behind(llm):
    bad = SamplingParams(temperature=1.0, max_tokens=8)
    bad.top_k = 2**63  # past validation: the sampler's int64 tensor overflows
    with pytest.raises(RequestError, match="failed"):
        llm.generate(["What is 1+1?", "What is 2+2?"], [GREEDY, bad])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_free == llm.engine.pool.num_blocks
    assert len(llm.generate("What is 1+1?", GREEDY)[0].outputs[0].token_ids) == 12
