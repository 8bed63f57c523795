"""The exported GGUF runs in llama.cpp (llama-cpp-python, installed by `make bench-deps`; skipped without it):
same tokenization, F32 logits and greedy output equal to ours; Q8_0 logits of a whole sequence close to ours
(the product llama.cpp's AMX kernels crashed on); with the bundled demo model, greedy output on 10 prompts
equal in F32 and top-1 agreement >= 95% in Q8_0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openr2.export.gguf import export_gguf, gguf_state_dict
from openr2.model.transformer import Transformer
from openr2.tokenizer import Tokenizer
from tests.export.test_gguf import save_checkpoint

pytest.importorskip("llama_cpp")
from openr2.export import llama_cpp as lc  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "openr2" / "assets" / "openr2-demo"
TEXTS = ["What is 347+589?", "12345 + 678 = 13023\n\nok", "  leading spaces and\ttabs\n\n\nnewlines",
         "<think>\nstep 1: carry the 1</think>\n\nThe answer is 936.", "don't You'LL we've", "你好 世界 café 🦀",
         "<｜User｜>hi<｜Assistant｜>", "a\u0301 ÜBER 3×4=12 → ✓"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return path, save_checkpoint(path)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    path, model = tiny_dir
    out = path / "m-f32.gguf"
    export_gguf(path, out, "f32")
    return model, Tokenizer.from_pretrained(path), lc.load(out, n_ctx=256)


def test_tokenization_matches(tiny):
    _, tok, llm = tiny
    for text in TEXTS:
        assert lc.tokenize(llm, text) == tok.encode(text), text


@torch.no_grad()
def test_f32_logits_and_greedy_match(tiny):
    model, _, llm = tiny
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(2))[0].tolist()
    ours = model(torch.tensor([ids]))[0].numpy()
    theirs = lc.logits(llm, ids)
    assert np.abs(ours - theirs).max() < 1e-3 and (ours.argmax(-1) == theirs.argmax(-1)).all()  # F32 KV cache
    out = []
    seq = list(ids[:8])
    for _ in range(16):
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
    assert lc.greedy(llm, ids[:8], 16) == out


@torch.no_grad()
def test_q8_0_sequence_logits(tiny_dir):
    """48 tokens at once: llama.cpp's multi-row Q8_0 products (on AMX_INT8 builds these crashed in
    ggml_backend_amx_mul_mat until load() turned the AMX buffers off). Reference: our model with the file's
    dequantized weights, so what is left is llama.cpp's Q8_0 rounding of activations; bound: test_gguf's
    q8_0 bound of 0.1, relative to the mean |logit|."""
    path, model = tiny_dir
    export_gguf(path, path / "m-q8.gguf", "q8_0")
    back = Transformer(model.config)
    back.load_state_dict(gguf_state_dict(str(path / "m-q8.gguf"), model.config))
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(2))[0].tolist()
    ref = back.eval()(torch.tensor([ids]))[0].numpy()
    theirs = lc.logits(lc.load(path / "m-q8.gguf", n_ctx=256), ids)
    assert np.abs(theirs - ref).mean() <= 0.1 * np.abs(ref).mean()


def _prompts(tok):
    from openr2.chat_format import encode_chat

    questions = ["What is 347+589?", "What is 12+30?", "What is 905-78?", "What is 64*7?", "What is 1000-1?",
                 "What is 58+67?", "What is 123+456?", "What is 99*9?", "What is 250-125?", "What is 808+192?"]
    return [encode_chat([{"role": "user", "content": q}], tok) for q in questions]


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="the bundled demo model is not there yet")
def test_demo_model_in_llama_cpp(tmp_path):
    from openr2 import LLM, SamplingParams

    llm = LLM(str(DEMO), compile=False)
    tok = llm.tokenizer
    prompts = _prompts(tok)
    params = SamplingParams(temperature=0, max_tokens=96)
    ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    export_gguf(DEMO, tmp_path / "f32.gguf", "f32")
    f32 = lc.load(tmp_path / "f32.gguf")
    for text in TEXTS:
        assert lc.tokenize(f32, text) == tok.encode(text), text
    for prompt, expected in zip(prompts, ours):
        assert lc.greedy(f32, prompt, len(expected)) == expected  # as many tokens as ours (EOS or max_tokens)
    export_gguf(DEMO, tmp_path / "q8.gguf", "q8_0")
    q8 = lc.load(tmp_path / "q8.gguf")
    agree = total = 0
    for prompt, expected in zip(prompts, ours):
        seq = prompt + expected
        theirs = lc.logits(q8, seq).argmax(-1)[len(prompt) - 1 : -1]
        agree += int((theirs == np.array(expected)).sum())
        total += len(expected)
    print(f"demo q8_0 top-1 agreement with openr2 greedy: {agree}/{total}")
    assert agree / total >= 0.95
