"""Greedy accuracy on held-out problems through the model's own contiguous cache (model/mla.py's LatentCache;
DeepSeek-V4: model/compressed.py's CompressedCache), one
problem at a time: the plain generation loop, for what the engine does not serve yet (DeepSeek-V3.2's sparse
attention until the engine's indexer cache lands) and for comparing one set of weights attended densely and
sparsely (train/dsa_loss.dense_attention around the call). evaluate.py's `task_accuracy` is the engine's path.

A prompt is the problem's chat with the generation prompt (chat_format.encode_chat); the prefill and every
decode step run the model's plain (naive) attention over the cache, so V3.2 models select their keys exactly
as in training. The answer is the text after `</think>` (tasks.answers.answer_of), checked with
tasks.synthetic.verify, as evaluate.py does.
"""

from __future__ import annotations

import torch

from openr2.chat_format import encode_chat
from openr2.model.compressed import CompressedCache
from openr2.model.mla import LatentCache
from openr2.tasks.answers import answer_of
from openr2.tasks.synthetic import Problem, to_messages, verify


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The greedy continuation of prompt_ids (at most max_tokens, stopping at EOS), batch 1."""
    device = model.device
    if model.config.is_v4:  # windows and compressor state, no latent
        cache = CompressedCache.for_model(model.config)
    else:
        cache = LatentCache.for_model(model.config, 1, len(prompt_ids) + max_tokens, model.dtype, device)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[:, -1]
    out: list[int] = []
    while len(out) < max_tokens:
        token = int(logits.argmax(-1))
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache)[:, -1]
    return out


def greedy_accuracy(model, tokenizer, problems: list[Problem], max_tokens: int = 64) -> tuple[float, list[dict]]:
    """(share of problems answered correctly, one row per problem: expected, output, correct)."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for p in problems:
            ids = encode_chat(to_messages(p)[:-1], tokenizer)
            text = tokenizer.decode(greedy_completion(model, tokenizer, ids, max_tokens))
            answer = answer_of(text)
            rows.append({"expected": p.answer, "output": text, "correct": answer is not None and verify(p, answer)})
    finally:
        model.train(was_training)
    return (sum(r["correct"] for r in rows) / len(rows) if rows else 0.0), rows
