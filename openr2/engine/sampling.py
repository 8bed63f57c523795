"""SamplingParams and batched next-token sampling: penalties, temperature, top-k / top-p / min-p, seeds.

Owns: the per-request sampling options (vLLM's names and defaults, validated at construction) and one
function, `sample`, that the engine calls once per step for every row that needs a token. It does not
own stop strings (stop.py), EOS / stop-token / max_tokens checks, detokenisation (the engine) or the
verification of drafted tokens (rejection.py, which shares the penalties, shaping and race below). It also
owns the generation defaults every front end applies alike (server, eval, the engine itself): the one
max_tokens rule (`max_tokens_for`, `DEFAULT_MAX_TOKENS`) and a checkpoint's generation_config.json
(`generation_defaults`).

Order of operations per row (vLLM's):
  1. logprobs, when asked, from log_softmax of the raw model logits (vLLM's default "raw_logprobs":
     before penalties, temperature and masks, so they describe the model, not the sampler);
  2. repetition penalty over prompt + output tokens, then frequency and presence penalties over output;
  2b. grammar masks (constrained decoding, engine/grammar.py): tokens a row's grammar does not allow -> -inf;
  3. greedy rows (temperature < 1e-5) take the argmax of the penalised logits and stop here;
  4. random rows: divide by temperature, mask with top-k, top-p, min-p, then sample.

Sampling uses the exponential race: argmax_v p_v / E_v with E_v ~ Exp(1) draws token v with probability
p_v. We compute it in log space, argmax(logits - log E), which needs no softmax. Each row draws its E
from its own torch.Generator, so a seeded request gets the same tokens alone or in any batch.

Masks keep every token tied with the last kept one, so the kept set never depends on sort order.

Shape legend: B rows (requests this step), V vocab, K number of top logprobs returned.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from openr2.engine.grammar import StructuredOutputsParams
from openr2.engine.token_mask import TokenMask

MAX_LOGPROBS = 20  # OpenAI's top_logprobs cap; vLLM's default --max-logprobs
GREEDY_EPS = 1e-5  # temperatures below this sample greedily (as vLLM does), avoiding overflow in x / T
_NEG_INF = float("-inf")

DEFAULT_MAX_TOKENS = 4096  # a served request that names no max_tokens gets this much, or the room left

TokenIds = Sequence[int] | torch.Tensor


def max_tokens_for(asked: int | None, max_model_len: int, num_prompt_tokens: int | None = None,
                   default: int | None = DEFAULT_MAX_TOKENS) -> int | None:
    """The max_tokens rule of the server, eval and the engine: what the request asked for; without it,
    `default` (None: until the context is full) clipped to the room the prompt leaves in the context,
    max_model_len - num_prompt_tokens. Without a prompt count the context bounds the default; with neither
    a default nor a count the answer is None (the engine decides once it has the prompt). Whether an asked
    value fits is the caller's check: each says so in its own words (an HTTP 400, a CLI hint)."""
    if asked is not None:
        return asked
    if default is not None:
        return min(default, max_model_len - (num_prompt_tokens or 0))
    return None if num_prompt_tokens is None else max_model_len - num_prompt_tokens


def generation_defaults(model_dir: str) -> dict:
    """Default sampling options from a checkpoint's generation_config.json, as vLLM applies them:
    temperature, top_p, top_k, min_p, repetition_penalty (`do_sample: false` means greedy)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    out = {k: config[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
           if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)}
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """How to pick each next token of one request. Field names and defaults follow vLLM."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = -1  # -1 or 0 = off (0 is stored as -1)
    min_p: float = 0.0  # in [0, 1]; 0 = off
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 = off
    seed: int | None = None
    max_tokens: int | None = 16  # None = until the context is full (the engine decides)
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token; 0 = only the chosen token's
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # the answer's grammar (engine/grammar.py)

    def __post_init__(self):
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k < 2**63:  # the sampler holds it in an int64 tensor
            raise ValueError(f"top_k must be an integer in [-1, 2**63) (-1 or 0 disables it), got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        # torch.Generator.manual_seed accepts [-2**63, 2**64)
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(stop)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def make_generator(seed: int | None, device: torch.device | str = "cpu", index: int = 0) -> torch.Generator | None:
    """The generator for sample `index` (0..n-1) of a request: None (global RNG) without a seed.

    Sample i of a seeded request uses seed + i (vLLM's rule for n > 1), so the n samples differ but each
    is reproducible. The generator must live on the logits' device (a CUDA generator for CUDA logits).
    """
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    return gen.manual_seed((seed + index) % 2**64)  # torch reads a negative seed modulo 2**64 too


# ---------------------------------------------------------------------------------------------------
# Mask and penalty helpers. Each takes logits [B, V] and per-row parameters [B] and returns new logits
# (inputs are never modified). Masked tokens become -inf; a row whose option is off is returned as is.
# ---------------------------------------------------------------------------------------------------


def token_counts(token_ids: Sequence[TokenIds], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """counts [B, V] int64: how often each token id occurs in each row's list. Ids must be < vocab_size."""
    rows = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in token_ids]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if int(lengths.sum()) == 0:
        return torch.zeros(len(rows), vocab_size, dtype=torch.long, device=device)
    ids = torch.cat(rows).to(device)
    row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths.to(device))
    # one flat bincount over (row, id) pairs: no Python loop over tokens or vocabulary
    flat = torch.bincount(row_of * vocab_size + ids, minlength=len(rows) * vocab_size)
    return flat.view(len(rows), vocab_size)


def apply_penalties(
    logits: torch.Tensor,  # [B, V]
    output_counts: torch.Tensor,  # [B, V] occurrences of each token in the row's output so far
    seen: torch.Tensor,  # [B, V] bool: token occurs in the prompt or the output
    repetition_penalty: torch.Tensor,  # [B]
    frequency_penalty: torch.Tensor,  # [B]
    presence_penalty: torch.Tensor,  # [B]
) -> torch.Tensor:
    """vLLM's penalties: repetition (CTRL-style, over prompt + output), then frequency and presence (output)."""
    rep = repetition_penalty.to(logits)[:, None]
    # dividing a positive logit and multiplying a negative one both make the token less likely
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    logits = logits - frequency_penalty.to(logits)[:, None] * counts
    return logits - presence_penalty.to(logits)[:, None] * (counts > 0).to(logits.dtype)


def apply_blocked(logits: torch.Tensor, blocked: Sequence[tuple[int, torch.Tensor | TokenMask]],
                  inplace: bool = False) -> torch.Tensor:
    """Grammar masks: (first row, masks) pairs, the masks a bool [n, V] tensor (True: refused) or a packed
    engine/token_mask.TokenMask of n rows; the rows' blocked tokens become -inf. Rows not listed are untouched.
    One copy of the logits (none with inplace), then in place: at a 128K vocabulary every temporary [B, V]
    tensor costs a millisecond or more on a small CPU. The engine passes TokenMasks (applied by one C pass
    over the packed words on CPU); bool masks take masked_fill, the reference."""
    if not blocked:
        return logits
    x = logits if inplace else logits.clone()
    for start, rows in blocked:
        if isinstance(rows, TokenMask):
            rows.apply_(x[start : start + rows.num_rows])
            continue
        view = x[start : start + rows.shape[0]]
        view.masked_fill_(rows.to(view.device), _NEG_INF)
    return x


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k largest logits (and any tied with the k-th); top_k <= 0 or >= V is off.

    Pass top_k on the CPU: its maximum sizes the torch.topk call, and reading it there costs no sync.
    """
    V = logits.size(-1)
    k = top_k.cpu().long()
    on = (k > 0) & (k < V)
    if not bool(on.any()):
        return logits
    max_k = int(k[on].max())
    top = torch.topk(logits, max_k, dim=-1).values  # [B, max_k], descending
    k_idx = torch.where(on, k - 1, 0).to(logits.device)[:, None]
    cutoff = top.gather(-1, k_idx)
    cutoff = cutoff.masked_fill(~on.to(logits.device)[:, None], _NEG_INF)
    return logits.masked_fill(logits < cutoff, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the fewest most likely tokens whose probability sums to >= top_p (plus ties).

    A token is kept when the mass of the tokens ranked above it is still below top_p; the top token is
    always kept. Rows with top_p >= 1 are untouched (a float cumsum could otherwise drop a tiny tail).
    """
    p = top_p.to(logits)[:, None]
    sorted_logits = logits.sort(dim=-1, descending=True).values
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    mass_above = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    num_kept = (mass_above < p).sum(dim=-1, keepdim=True).clamp_min(1)
    cutoff = sorted_logits.gather(-1, num_kept - 1)
    cutoff = cutoff.masked_fill(p >= 1, _NEG_INF)
    return logits.masked_fill(logits < cutoff, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with probability >= min_p * (the row's top probability); min_p = 0 is off.

    Compared in log space (logit >= max logit + log min_p), which equals the probability rule without a
    softmax; log 0 = -inf keeps every token of rows with min_p = 0.
    """
    log_min_p = torch.log(min_p.to(logits))[:, None]
    cutoff = logits.max(dim=-1, keepdim=True).values + log_min_p
    return logits.masked_fill(logits < cutoff, _NEG_INF)


# ---------------------------------------------------------------------------------------------------
# The batched sampler.
# ---------------------------------------------------------------------------------------------------


class TokenSample(NamedTuple):
    token_id: int
    logprob: float | None  # log p(token) under the raw model logits; None when logprobs were not asked
    top: list[tuple[int, float]] | None  # the row's `logprobs` most likely (id, logprob), best first


@dataclass
class SampleResult:
    """Outputs of one step, on the logits' device. Logprob fields are None when no row asked for them."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32, log p(chosen token) from the raw logits
    top_token_ids: torch.Tensor | None = None  # [B, K] int64, K = max logprobs asked in the batch
    top_logprobs: torch.Tensor | None = None  # [B, K] float32, descending; row i uses its first logprobs_i
    num_top: list[int | None] = field(default_factory=list)  # per row: params.logprobs

    def tolist(self) -> list[TokenSample]:
        """Per-row Python values with one device-to-host copy per tensor (not one per row)."""
        ids = self.token_ids.tolist()
        lps = self.logprobs.tolist() if self.logprobs is not None else None
        top_ids = self.top_token_ids.tolist() if self.top_token_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        out = []
        for i, tok in enumerate(ids):
            k = self.num_top[i] if self.num_top else None
            if k is None or lps is None:
                out.append(TokenSample(tok, None, None))
                continue
            top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids is not None else []
            out.append(TokenSample(tok, lps[i], top))
        return out


def sample(
    logits: torch.Tensor,  # [B, V]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    prompt_token_ids: Sequence[TokenIds | None] | None = None,
    output_token_ids: Sequence[TokenIds | None] | None = None,
    blocked: Sequence[torch.Tensor | None] | None = None,
) -> SampleResult:
    """Pick one token per row, each row with its own params and generator (None = global RNG).

    Token histories are read only for rows with penalties (others may be None); the repetition penalty
    needs both, frequency and presence need only the output. `blocked`: per row None (free), a bool [V]
    grammar mask (True where the token is refused) or a one-row TokenMask; a row never gets a blocked token. `logits` is not modified.
    """
    B, V = logits.shape
    if len(params) != B:
        raise ValueError(f"params has {len(params)} entries for {B} logits rows")
    generators = [None] * B if generators is None else list(generators)
    if len(generators) != B:
        raise ValueError(f"generators has {len(generators)} entries for {B} logits rows")
    device = logits.device
    x = logits.float()

    num_top = [p.logprobs for p in params]
    raw_logprobs = torch.log_softmax(x, dim=-1) if any(k is not None for k in num_top) else None

    pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
    if pen_rows:
        x = penalise(x, params, pen_rows, prompt_token_ids, output_token_ids)
    if blocked is not None:
        x = apply_blocked(x, [(i, b if isinstance(b, TokenMask) else b.reshape(1, -1))
                              for i, b in enumerate(blocked) if b is not None])

    token_ids = x.argmax(dim=-1)  # right for greedy rows; random rows are overwritten below
    rand_rows = [i for i, p in enumerate(params) if not p.greedy]
    if rand_rows:
        token_ids[_index(rand_rows, B, device)] = _sample_random(
            x if len(rand_rows) == B else x[_index(rand_rows, B, device)],
            [params[i] for i in rand_rows], [generators[i] for i in rand_rows])

    result = SampleResult(token_ids=token_ids, num_top=num_top)
    if raw_logprobs is not None:
        result.logprobs = raw_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
        max_k = max(k or 0 for k in num_top)
        if max_k > 0:
            result.top_logprobs, result.top_token_ids = torch.topk(raw_logprobs, min(max_k, V), dim=-1)
    return result


def _index(rows: list[int], B: int, device) -> torch.Tensor | slice:
    return slice(None) if len(rows) == B else torch.tensor(rows, device=device)


def penalise(x, params, rows, prompt_token_ids, output_token_ids) -> torch.Tensor:
    """x [B, V] with penalties applied to the listed rows only (penalty-free rows cost nothing); params,
    prompt_token_ids and output_token_ids are per row of x."""
    B, V = x.shape
    device = x.device
    if output_token_ids is None:
        raise ValueError("output_token_ids is required when a row has a penalty")
    if prompt_token_ids is None and any(params[i].repetition_penalty != 1 for i in rows):
        raise ValueError("prompt_token_ids is required when a row has a repetition_penalty")
    out_counts = token_counts([or_empty(output_token_ids[i]) for i in rows], V, device)
    seen = out_counts > 0
    if prompt_token_ids is not None:
        seen |= token_counts([or_empty(prompt_token_ids[i]) for i in rows], V, device) > 0

    def per_row(name: str) -> torch.Tensor:
        return torch.tensor([getattr(params[i], name) for i in rows], dtype=torch.float32, device=device)

    idx = _index(rows, B, device)
    penalised = apply_penalties(x[idx], out_counts, seen, per_row("repetition_penalty"),
                                per_row("frequency_penalty"), per_row("presence_penalty"))
    x = x.clone()
    x[idx] = penalised
    return x


def or_empty(ids: TokenIds | None) -> TokenIds:
    return [] if ids is None else ids


def _sample_random(x: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """x [R, V] penalised logits of the random rows -> token ids [R]."""
    return race(shaped_logits(x, params), generators)


def shaped_logits(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """x [R, V] penalised logits -> the logits of the distribution each row samples from: temperature,
    then top-k, top-p and min-p masks (-inf)."""
    device = x.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    x = x / temperature[:, None]
    # each mask runs only when some row uses it; per-row values leave the other rows unchanged
    if any(p.top_k > 0 for p in params):
        x = apply_top_k(x, torch.tensor([p.top_k for p in params]))
    nucleus = [r for r, p in enumerate(params) if p.top_p < 1]
    if nucleus:  # top-p sorts the vocabulary, the costliest step: only for the rows that use it
        idx = _index(nucleus, len(params), device)
        x[idx] = apply_top_p(x[idx], torch.tensor([params[r].top_p for r in nucleus], device=device))
    if any(p.min_p > 0 for p in params):
        x = apply_min_p(x, torch.tensor([p.min_p for p in params], device=device))
    return x


def race(x: torch.Tensor, generators: list) -> torch.Tensor:
    """One draw per row of softmax(x) [R, V], by exponential race."""
    # Exponential race. Each row fills its own V draws from its own generator, so its noise does not
    # depend on its position in the batch or on the other rows. Clamping keeps log E finite (a 0 draw
    # would make -log E = +inf and could pick a masked token).
    noise = torch.empty_like(x)
    for r, gen in enumerate(generators):
        noise[r].exponential_(generator=gen)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (x - noise.log()).argmax(dim=-1)
