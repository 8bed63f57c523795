"""Passkey retrieval (needle in a haystack): a passkey sentence hidden at some depth of filler text, then the
question. The long-context task family of the shared tasks package (synthetic.py registers it as `needle`,
its difficulty knob the haystack's length).

`needle_problem(passkey, length, depth, filler_seed)`: about `length` characters of filler (whole sentences
drawn from FILLER by a generator seeded with `filler_seed`), the sentence "The passkey is P. Remember it."
inserted at the sentence boundary nearest `depth` percent of the way in (0: first, 100: last), then "What is
the passkey?". The answer is the passkey (five digits); the reasoning quotes the needle's sentence, so a model
learns to find it rather than to guess. `needle(rng, length)` draws the passkey, the depth and the filler.
The prompt's length is in characters, not tokens, so the tasks package needs no tokenizer; a token is ~1-4 of
them depending on the tokenizer (openr2's demo tokenizer: ~2 on this filler).

Deterministic by seed like every task (synthetic.generate); the held-out split hashes the key, which names the
length, depth, passkey and filler, as for the other tasks. Owns the text, not the grading (an integer answer:
synthetic.verify) nor the evaluation (eval/tasks.py: `needle:LENGTH[:DEPTH]`).
"""

from __future__ import annotations

import random

FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "A bird sings in the tree.", "The road is long and quiet.",
    "Clouds drift over the hills.", "The wind is soft today.", "Snow falls in the north.", "The town sleeps.",
)
QUESTION = "What is the passkey?"
MIN_LENGTH, MAX_LENGTH = 16, 1_000_000


def needle_sentence(passkey: str) -> str:
    return f"The passkey is {passkey}. Remember it."


def filler_sentences(length: int, filler_seed: int) -> list[str]:
    """Whole filler sentences totalling about `length` characters (with a space between sentences)."""
    rng = random.Random(f"needle-filler:{filler_seed}")
    out, total = [], 0
    while total < length:
        s = rng.choice(FILLER)
        out.append(s)
        total += len(s) + 1
    return out


def needle_problem(passkey: int, length: int, depth: int, filler_seed: int):
    """The problem (a synthetic.Problem with task "needle", difficulty `length`); depth in percent 0..100."""
    from openr2.tasks.synthetic import Problem

    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"needle: length={length} outside [{MIN_LENGTH}, {MAX_LENGTH}]")
    if not 0 <= depth <= 100:
        raise ValueError(f"needle: depth={depth} outside [0, 100] (percent)")
    if not 0 <= passkey <= 99_999:
        raise ValueError(f"needle: passkey={passkey} must have at most five digits")
    key_text = f"{passkey:05d}"
    sentences = filler_sentences(length, filler_seed)
    starts = [0]  # the character offset of each sentence boundary (sentences joined by one space)
    for s in sentences:
        starts.append(starts[-1] + len(s) + 1)
    total = starts[-1] - 1
    at = min(range(len(starts)), key=lambda i: abs(starts[i] - depth / 100 * total))
    needle = needle_sentence(key_text)
    haystack = " ".join(sentences[:at] + [needle] + sentences[at:])
    return Problem("needle", length, f"{haystack}\n{QUESTION}", needle, key_text,
                   f"needle:{length}:{depth}:{key_text}:{filler_seed}")


def needle(rng: random.Random, length: int, depth: int | None = None):
    """A random needle problem of haystack `length`: passkey, filler and (unless given) depth drawn from rng."""
    passkey = rng.randrange(100_000)
    d = rng.randint(0, 100) if depth is None else depth
    return needle_problem(passkey, length, d, rng.randrange(1 << 30))
