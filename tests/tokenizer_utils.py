"""Test helpers: a tiny byte-level BPE trained once per session on generated chat-like lines."""

from __future__ import annotations

import random
from functools import lru_cache

from openr2.tokenizer import Tokenizer, train_bpe

# Rare characters stay out of the corpus, so they are split into several byte-level tokens.
RARE_TEXTS = ["🦀🎉 emoji", "漢字テスト", "Ünïcödé ñ é ü ß", "mixed: 3×4=12 → ✓ 🇫🇷", "a\u0301 (combining accent)"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the a cat dog sat ran on mat what is plus minus answer think step so because 你好 世界 café".split()
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        lines.append(f"What is {a}+{b}? {sentence}.\nThe answer is {a + b}.")
    return lines


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    return train_bpe(corpus(), vocab_size=512)
