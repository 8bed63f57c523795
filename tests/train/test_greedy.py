"""Tests for openr2/train/greedy.py: the cached greedy loop equals greedy decoding by full forwards (a V3.2 model
past index_topk, so the cached sparse selection is exercised), and accuracy rows."""

from __future__ import annotations

import dataclasses

import torch

from openr2.model.transformer import build_model, greedy_full_forward
from openr2.presets import tiny_v4, tiny_v32
from openr2.tasks.synthetic import held_out_problems
from openr2.train.greedy import greedy_accuracy, greedy_completion
from tests.hf_utils import perturb_
from tests.tokenizer_utils import tiny_tokenizer


class _Tok:
    eos_token_id = -1  # never: run to max_tokens


def test_cached_greedy_equals_full_forward_greedy():
    config = dataclasses.replace(tiny_v32(), index_n_heads=48)  # 48 heads: no ReLU ties (reference notes)
    model = build_model(config, seed=1).eval()
    perturb_(model, 1)
    prompt = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()  # 20 > k = 8
    ours = greedy_completion(model, _Tok(), prompt, 6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert ours == ids[len(prompt):]


def test_cached_greedy_v4_equals_full_forward_greedy():
    """DeepSeek-V4 through its CompressedCache: a prompt past the window and several CSA/HCA blocks."""
    model = build_model(tiny_v4(), seed=1).eval()
    perturb_(model, 3)
    prompt = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = greedy_completion(model, _Tok(), prompt, 6)
    with torch.no_grad():
        seq = greedy_full_forward(model, torch.tensor([prompt]), 6)
        top2 = model(seq)[0, len(prompt) - 1 : -1].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-tie decides a step
    assert ours == seq[0, len(prompt):].tolist()


def test_greedy_accuracy_rows():
    tok = tiny_tokenizer()
    model = build_model(dataclasses.replace(tiny_v32(), vocab_size=tok.vocab_size), seed=0)
    model.train()
    acc, rows = greedy_accuracy(model, tok, held_out_problems("needle", 40, 2), max_tokens=4)
    assert len(rows) == 2 and 0 <= acc <= 1 and all(r["expected"] for r in rows)
    assert model.training  # restored
