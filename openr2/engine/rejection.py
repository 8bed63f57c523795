"""Verifying drafted tokens (speculative decoding): `sample_with_drafts`, exact rejection sampling of point-mass
drafts, so that speculation never changes the output distribution.

Owns only the verification: the options, penalties, masks and the exponential race are sampling.py's, shared
with `sample` so that a row without drafts is drawn exactly as `sample` draws it.

Shape legend: B rows, M positions (each row's drafts + 1, consecutive), V vocab.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from openr2.engine.sampling import (
    SamplingParams,
    TokenIds,
    TokenSample,
    apply_blocked,
    or_empty,
    penalise,
    race,
    shaped_logits,
)


def sample_with_drafts(
    logits: torch.Tensor,  # [M, V]: row i's len(drafts[i]) + 1 positions, consecutive
    drafts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    prompt_token_ids: Sequence[TokenIds | None] | None = None,
    output_token_ids: Sequence[TokenIds | None] | None = None,
    blocked: Sequence[torch.Tensor | None] | None = None,
    scratch: bool = False,
) -> list[list[TokenSample]]:
    """Each row's tokens: the prefix of its drafts the target distribution accepts, then one sampled token.

    Position j of row i holds the model's logits after the row's tokens and drafts[i][:j]. Rejection
    sampling with a point-mass draft (the drafter proposes one token, q = delta_d): d is accepted with
    probability p(d), else a token is drawn from p with d removed, renormalised; after all drafts are
    accepted one more token is drawn from the last position. Every committed token is thereby distributed
    exactly as sampling one token at a time would draw it. Greedy rows accept d iff it is p's argmax.
    A row without drafts is drawn exactly as `sample` draws it (same generator use), and each row draws
    len(drafts) uniforms and then one race from its own generator, so seeded runs reproduce.
    Penalties see each position's history: the output so far plus the drafts before it.
    `blocked`: per row None or its grammar masks of len(drafts) + 1 rows (a TokenMask, or bool [n, V], True:
    refused), row j for the
    position after drafts[:j] (engine/grammar.py); a blocked draft has p = 0 there and is rejected.
    `logits` is not modified unless `scratch`: the caller hands it over (the engine's own concatenation of the
    rows) and the masks are written into it, saving a copy of [M, V].
    """
    B = len(drafts)
    if len(params) != B:
        raise ValueError(f"params has {len(params)} entries for {B} rows")
    sizes = [len(d) + 1 for d in drafts]
    starts = list(itertools.accumulate(sizes, initial=0))
    M, V = logits.shape
    if M != starts[-1]:
        raise ValueError(f"logits has {M} rows for {starts[-1]} positions")
    generators = [None] * B if generators is None else list(generators)
    device = logits.device
    x = logits.float()
    raw_logprobs = torch.log_softmax(x, dim=-1) if any(p.logprobs is not None for p in params) else None

    pos_row = [i for i in range(B) for _ in range(sizes[i])]
    pos_params = [params[i] for i in pos_row]
    pen_positions = [m for m, p in enumerate(pos_params) if p.has_penalties]
    if pen_positions:
        outputs = [None] * M
        prompts = [None] * M
        for m in pen_positions:
            i = pos_row[m]
            outputs[m] = list(or_empty(output_token_ids[i] if output_token_ids else None)) + drafts[i][: m - starts[i]]
            prompts[m] = prompt_token_ids[i] if prompt_token_ids is not None else None
        x = penalise(x, pos_params, pen_positions, prompts if prompt_token_ids is not None else None, outputs)
    if blocked is not None:
        x = apply_blocked(x, [(starts[i], b) for i, b in enumerate(blocked) if b is not None],
                          inplace=scratch or x is not logits)

    targets = x.argmax(dim=-1).tolist()  # the greedy rows' choices
    rand_rows = [i for i in range(B) if not params[i].greedy]
    shaped = None
    if rand_rows:
        rand_pos = [m for i in rand_rows for m in range(starts[i], starts[i + 1])]
        shaped = torch.full_like(x, float("-inf"))
        index = torch.tensor(rand_pos, device=device)
        shaped[index] = shaped_logits(x[index], [pos_params[m] for m in rand_pos])
        draft_pos = [m for i in rand_rows for m in range(starts[i], starts[i + 1] - 1)]
        draft_ids = [t for i in rand_rows for t in drafts[i]]
        p_draft = dict(zip(draft_pos, shaped[draft_pos].softmax(-1)[range(len(draft_pos)), draft_ids].tolist())) \
            if draft_pos else {}

    chosen: list[tuple[int, int | None]] = []  # per row: (position of its last token, its id if greedy)
    race_rows, race_pos, race_masked = [], [], []
    for i in range(B):
        d, s = drafts[i], starts[i]
        if params[i].greedy:
            a = next((j for j, t in enumerate(d) if targets[s + j] != t), len(d))
            chosen.append((s + a, targets[s + a]))
            continue
        gen = generators[i]
        u = torch.rand(len(d), generator=gen, device=gen.device if gen is not None else device).tolist()
        a = next((j for j, t in enumerate(d) if not u[j] < p_draft[s + j]), len(d))
        chosen.append((s + a, None))
        race_rows.append(i)
        race_pos.append(s + a)
        race_masked.append(d[a] if a < len(d) else None)
    tokens = [c[1] for c in chosen]
    if race_rows:
        z = shaped[race_pos]
        for r, t in enumerate(race_masked):
            if t is not None:  # the rejected draft: p with d removed
                z[r, t] = float("-inf")
        for i, t in zip(race_rows, race(z, [generators[i] for i in race_rows]).tolist()):
            tokens[i] = t

    out = []
    for i in range(B):
        s, (last, _) = starts[i], chosen[i]
        ids = drafts[i][: last - s] + [tokens[i]]
        out.append(_token_samples(ids, range(s, last + 1), params[i].logprobs, raw_logprobs))
    return out


def _token_samples(ids: list[int], positions, num_top: int | None, raw_logprobs) -> list[TokenSample]:
    if num_top is None or raw_logprobs is None:
        return [TokenSample(t, None, None) for t in ids]
    rows = raw_logprobs[list(positions)]
    chosen = rows[range(len(ids)), ids].tolist()
    if not num_top:
        return [TokenSample(t, lp, []) for t, lp in zip(ids, chosen)]
    top_lps, top_ids = torch.topk(rows, min(num_top, rows.shape[-1]), dim=-1)
    return [TokenSample(t, lp, list(zip(ti, tl))) for t, lp, ti, tl in
            zip(ids, chosen, top_ids.tolist(), top_lps.tolist())]
