"""Tests for openr2/train/data.py: SFT examples, GSM8K parsing, corpora, packing and SFT batches with
exact resume."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest
import torch

from openr2.tasks.synthetic import addition_problem, generate, split_of, to_messages, verify
from openr2.tokenizer import EOS
from openr2.train import data
from openr2.train.data import (
    IGNORE_INDEX,
    PackedLMDataset,
    read_gsm8k,
    read_jsonl,
    read_text,
    sft_batches,
    sft_example,
)
from tests.tokenizer_utils import tiny_tokenizer

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k_train.jsonl"


def test_sft_example_matches_chat_format():
    tok = tiny_tokenizer()
    p = addition_problem(347, 589)
    msgs = to_messages(p)
    assert msgs[0] == {"role": "user", "content": "What is 347+589?"}
    ids, mask = sft_example(p, tok)
    completion = tok.decode([t for t, m in zip(ids, mask) if m])
    assert completion == p.reasoning + "\n</think>\n\n936" + EOS
    assert tok.decode([t for t, m in zip(ids, mask) if not m]).endswith("What is 347+589?<｜Assistant｜><think>\n")


def test_sft_batches_labels_and_resume():
    tok = tiny_tokenizer()
    examples = [sft_example(p, tok) for p in generate("addition", 3, "train", 23, seed=1)]
    examples.append(([1] * 500, [1] * 500))  # too long: dropped, not truncated
    ds = sft_batches(examples, batch_size=4, max_len=200, pad_id=tok.pad_token_id, seed=7)
    assert ds.num_dropped == 1 and ds.batches_per_epoch == 5
    by_input = {tuple(ids[:-1]): (ids, mask) for ids, mask in examples[:-1]}
    for _ in range(3):
        inputs, labels = next(ds)
        assert inputs.shape == labels.shape and inputs.dtype == labels.dtype == torch.long
        for row_in, row_lab in zip(inputs.tolist(), labels.tolist()):
            key = next(k for k in by_input if tuple(row_in[:len(k)]) == k and
                       all(t == tok.pad_token_id for t in row_in[len(k):]))
            ids, mask = by_input[key]
            n = len(ids) - 1
            expect = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX] * (len(row_in) - n)
            assert row_lab == expect
    state = ds.state_dict()
    nxt = [next(ds) for _ in range(7)]  # crosses an epoch boundary
    fresh = sft_batches(examples, batch_size=4, max_len=200, pad_id=tok.pad_token_id, seed=7)
    fresh.load_state_dict(state)
    for (a, b), (c, d) in zip(nxt, (next(fresh) for _ in range(7))):
        assert torch.equal(a, c) and torch.equal(b, d)
    once = sft_batches(examples[:-1], 5, 200, 0, shuffle=False, epochs=1, drop_last=False)
    assert sum(x.shape[0] for x, _ in once) == 23


def test_packing_contiguous_and_resume():
    rng = random.Random(0)
    docs, counter = [], 10
    for _ in range(40):
        n = rng.randint(1, 30)
        docs.append(list(range(counter, counter + n)))
        counter += n
    eos = 1
    stream = [t for d in docs for t in d + [eos]]
    ds = PackedLMDataset(docs, batch_size=3, seq_len=16, eos_id=eos)
    per_epoch = ds.batches_per_epoch
    assert per_epoch == (len(stream) - 1) // 16 // 3
    batches = [next(ds) for _ in range(per_epoch + 2)]
    flat = [b for batch in batches[:per_epoch] for b in batch.tolist()]
    for k, row in enumerate(flat):
        assert batches[0].shape == (3, 17) and row == stream[k * 16:k * 16 + 17]
    assert torch.equal(batches[per_epoch], batches[0])  # wraps to the start
    for shuffle in (False, True):
        a = PackedLMDataset(docs, 2, 8, eos, shuffle=shuffle, seed=5)
        for _ in range(5):
            next(a)
        state = a.state_dict()
        expect = [next(a) for _ in range(2 * a.batches_per_epoch)]
        b = PackedLMDataset(docs, 2, 8, eos, shuffle=shuffle, seed=5)
        b.load_state_dict(state)
        assert all(torch.equal(x, next(b)) for x in expect)
    with pytest.raises(ValueError):
        PackedLMDataset([[5, 6]], batch_size=2, seq_len=16, eos_id=eos)
    tok = tiny_tokenizer()
    texts = [data.to_text(p) for p in generate("addition", 2, "train", 30)]
    assert next(PackedLMDataset.from_texts(texts, tok, 2, 32)).shape == (2, 33)


def test_corpora(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert list(read_jsonl(path, "text")) == ["a", "b"]
    path.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=":2:"):
        list(read_jsonl(path, "text"))
    txt = tmp_path / "c.txt"
    txt.write_text("doc one\nline\n\n\ndoc two\n")
    assert read_text(txt) == ["doc one\nline", "doc two"] and read_text(txt, sep=None) == ["doc one\nline\n\n\ndoc two"]


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not present")
def test_gsm8k(tmp_path):
    head = tmp_path / "gsm8k_head.jsonl"
    with open(GSM8K, encoding="utf-8") as f:
        head.write_text("".join(itertools.islice(f, 50)))
    problems = read_gsm8k(head)
    assert len(problems) == 50
    first = problems[0]
    assert first.prompt.startswith("Natalia sold clips") and first.answer == "72"
    assert first.reasoning == ("Natalia sold 48/2 = 24 clips in May.\n"
                               "Natalia sold 48+24 = 72 clips altogether in April and May.")
    for p in problems:
        assert re.fullmatch(r"-?\d+", p.answer), p.answer
        assert "<<" not in p.reasoning and "####" not in p.reasoning and verify(p, p.answer)
        assert split_of(p) in ("train", "test")
