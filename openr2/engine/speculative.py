"""Speculative decoding: who proposes draft tokens, and how many. The engine verifies them in its next step
(rejection.sample_with_drafts: exact rejection sampling, so the output distribution does not change).

`SpeculativeConfig` is vLLM's `speculative_config`:
    {"method": "mtp", "num_speculative_tokens": k}   the checkpoint's own MTP module(s) draft (DeepSeek-V3)
    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}
                                                      prompt lookup: any checkpoint, no extra forward
or the CLI's short form "mtp:2" / "ngram:4".

MTP drafting keeps the MTP layer's own cache (the pool's layer L + depth) filled for every committed position:
after each step it runs over the positions the step committed, fed the main model's final-normed hidden there
and the token after each, and its logits at the last position give the first draft (Transformer.draft_at:
the keys of every position, the rest of the block at the last one only). With the compiled engine the
decode step runs this first draft step in the same call for greedy rows (compiled.decode_draft_step), and
the policy keeps a step's width within the compiled shapes (runner.max_drafts). For k > 1 the step is
chained as DeepSeek and vLLM do: step j runs module (j - 1) mod D at the next position, fed the previous
step's block output and draft. Chained steps write cache entries past the committed tokens; the next round
overwrites them (they are never read as committed). Drafts are the MTP's argmax (a point-mass proposal).

Shape legend: B rows, D hidden, V vocab.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from openr2.engine.sequence import Sequence

METHODS = ("mtp", "ngram")


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up in the sequence's earlier tokens
    prompt_lookup_min: int = 1  # ngram: the shortest

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo}, {hi}")

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, vLLM's dict, or "method:k" (the CLI's --speculative)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            method, _, k = value.partition(":")
            if not k.isdigit():
                raise ValueError(f"--speculative: expected METHOD:K such as mtp:2 or ngram:4, got {value!r}")
            return cls(method, int(k))
        if isinstance(value, dict):
            unknown = set(value) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
            if unknown or "method" not in value or "num_speculative_tokens" not in value:
                raise ValueError("speculative_config: needs 'method' and 'num_speculative_tokens' "
                                 f"(and for ngram optionally 'prompt_lookup_max/min'); unknown keys {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"speculative_config: expected a dict or 'method:k', got {type(value).__name__}")


@dataclass
class SpecStats:
    """Counters since the engine started (vLLM's spec_decode metrics)."""

    num_drafts: int = 0  # rows that carried drafts into a step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class SpecPolicy:
    """How many drafts the next decode step carries, chosen from measured throughput.

    Drafting pays only while a step k + 1 tokens wide (plus the drafting) costs little more than a step of
    one token; how much more depends on the batch, the model and the machine, so the engine measures it:
    for each batch size class (1, 2, 3-4, 5-8, ...) and each k in 0..num_speculative_tokens it keeps the
    last `window` pure decode steps and rates k by their mean committed tokens over the lower quartile of
    their seconds (other processes delay a step, nothing makes one faster than it costs: a moving average
    of per-step rates followed such delays and, after a few, stayed with the worse k), runs the best k,
    tries a k it has measured fewer than `min_samples` times (one slow step, such as the first after a
    stretch without drafts, which drafts outside the fused step, would otherwise shut a k out until the next
    probe), and every `probe_every` steps retries another so the rates stay current.
    On CPU, steps are timed in this process's CPU seconds (the engine passes them), not wall time: on a machine other
    processes load, a step's wall time is mostly when the scheduler let it run, and the policy switched
    speculation off against its better rate (demo model, mtp:1, batch 1, load ~20 on 2 vCPUs: k = 0 on 44% of
    steps with wall time and one sample per width, 18% with CPU time, 6% with CPU time and min_samples 3, where
    one step in probe_every is a probe); the CPU seconds a width costs are what it changes, and on an idle
    machine they follow wall time.
    The caller may cap k for a step (`choose(rows, max_k)`: the engine keeps a compiled step from growing
    past what its compiled shapes take, where an eager step would lose anyway).
    Seeded random rows always carry the configured k: their random draws depend on it, and a choice made
    from wall-clock time would make them irreproducible (greedy outputs do not depend on k at all).
    """

    def __init__(self, max_k: int, probe_every: int = 64, window: int = 16, min_samples: int = 3):
        self.max_k, self.probe_every, self.window, self.min_samples = max_k, probe_every, window, min_samples
        self.rate: dict[tuple[int, int], float] = {}  # (batch class, k) -> committed tokens per second
        self.samples: dict[tuple[int, int], collections.deque] = {}  # the same -> its last (tokens, seconds)
        self.steps = 0

    @staticmethod
    def batch_class(num_rows: int) -> int:
        return max(0, num_rows - 1).bit_length()

    def choose(self, num_rows: int, max_k: int | None = None) -> int:
        c = self.batch_class(num_rows)
        top = self.max_k if max_k is None else max(0, min(self.max_k, max_k))
        self.steps += 1
        for k in range(top, -1, -1):  # every k measured a few times first, widest first
            if len(self.samples.get((c, k), ())) < self.min_samples:
                return k
        best = max(range(top + 1), key=lambda k: self.rate[c, k])
        if top and self.steps % self.probe_every == 0:
            return (best + 1 + (self.steps // self.probe_every) % top) % (top + 1)
        return best

    def record(self, num_rows: int, k: int, num_tokens: int, seconds: float) -> None:
        key = (self.batch_class(num_rows), k)
        window = self.samples.setdefault(key, collections.deque(maxlen=self.window))
        if window and seconds < 0.5 * min(s for _, s in window):
            window.clear()  # the steps before included compiling this width: this one is what it costs
        window.append((num_tokens, seconds))
        quartile = sorted(s for _, s in window)[len(window) // 4]
        self.rate[key] = sum(t for t, _ in window) / len(window) / max(quartile, 1e-9)


def ngram_propose(token_ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix (max_n down
    to min_n tokens) of token_ids; [] if no suffix occurred before."""
    L = len(token_ids)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = token_ids[L - n :]
        first = suffix[0]
        for start in range(L - n - 1, -1, -1):  # most recent first; a match must leave a token after it
            if token_ids[start] == first and token_ids[start : start + n] == suffix:
                return token_ids[start + n : start + n + k]
    return []


class Speculator:
    """The engine's speculative decoding: after each step, the drafts each live row carries into the next
    one (how many: SpecPolicy, within each row's room and the compiled shapes; who drafts: the MTP modules
    or n-gram lookup), and, for the MTP, its cache at the positions the step committed."""

    def __init__(self, config: SpeculativeConfig, runner, scheduler, num_mtp_modules: int):
        self.config, self.runner, self.scheduler = config, runner, scheduler
        self.policy = SpecPolicy(config.num_speculative_tokens)
        self.mtp = MTPDrafter(runner, num_mtp_modules) if config.method == "mtp" else None
        self.k = 0  # drafts the policy chose for the current step's decode rows

    def compiled_shapes(self, max_drafts: int) -> list[tuple[str, int]]:
        """The compiled steps (runner.prepare's names) and widths this speculation may run with up to max_drafts
        drafts per row in a compiled step (runner.max_drafts of one row): n-gram drafts widen the decode step;
        the MTP verifies in the decode step fused with its first draft step (a step choosing no drafts runs
        the plain decode step), redoes that draft step over a step's positions for rows whose committed tokens
        are not the argmax ones, and chains one-position draft steps for drafts 2..k."""
        k = min(self.config.num_speculative_tokens, max_drafts)
        if self.mtp is None:
            return [("decode", w) for w in range(1, k + 2)]
        chained = sorted({(j - 1) % self.mtp.num_modules for j in range(2, k + 1)})
        return [("decode", 1)] + [("decode-draft", w) for w in range(1, k + 2)] + \
            [("draft-0", w) for w in range(1, k + 2)] + [(f"draft-{d}", 1) for d in chained if d]

    def propose(self, rows: list[tuple[Sequence, int]], starts: dict[int, int], out, prefilling: set[int]) -> None:
        """rows: (live sequence, the most drafts its limits leave room for); starts: seq_id -> the first
        position the step fed it; out: the step's runner.StepOutput; prefilling: seq_ids whose prompt the step
        fed. Sets every row's draft_token_ids (and frees the blocks it no longer needs)."""
        decoding = [seq for seq, _ in rows if seq.num_computed == seq.num_tokens - 1]  # next token not computed
        self.k = self.policy.choose(len(decoding), self.runner.max_drafts(len(decoding))) if decoding else 0
        self.runner.fused_draft = self.mtp is not None and self.k > 0  # off costs nothing
        wanted = []
        for seq, room in rows:
            k = 0
            if seq.num_computed == seq.num_tokens - 1:
                seeded = seq.generator is not None and not seq.params.greedy  # see SpecPolicy
                k = max(0, min(self.config.num_speculative_tokens if seeded else self.k, room))
                if k > 1 and self.mtp is not None and not self.scheduler.reserve(seq, seq.num_tokens + k):
                    k = 1  # chained MTP steps write past the committed tokens: no blocks for that now
            wanted.append((seq, k))
        if self.mtp is not None:
            # Turned off, drafting costs nothing: decode rows skip the MTP cache too (a later draft attends
            # over stale entries there, which costs acceptance, never correctness). Prompts always fill it.
            drafts = self.mtp.propose([(seq, starts[seq.seq_id], out.hidden[seq.seq_id], k) for seq, k in wanted
                                       if k or self.k or seq.seq_id in prefilling], out.drafts)
        else:
            c = self.config
            drafts = {seq.seq_id: ngram_propose(seq.token_ids, k, c.prompt_lookup_max, c.prompt_lookup_min)
                      for seq, k in wanted if k}
        for seq, k in wanted:
            seq.draft_token_ids = drafts.get(seq.seq_id, [])[:k]
            self.scheduler.trim(seq)


class MTPDrafter:
    """Runs the model's MTP module(s) through the runner over the engine's pool (see the module docstring)."""

    def __init__(self, runner, num_modules: int):
        self.runner, self.num_modules = runner, num_modules

    def propose(self, rows: list[tuple[Sequence, int, torch.Tensor, int]], fused: dict | None = None) -> dict[int, list[int]]:
        """rows: (sequence, first position its last step computed, hidden [n, D] of the n positions that step
        fed, drafts wanted k >= 0). Fills the MTP cache at the committed ones; returns seq_id -> k drafts.

        A row whose drafts were partly rejected is still fed all n positions (one shape for every row of a
        step, so the compiled draft step serves it): past the committed ones the next token is a filler and
        the cache entries land past the sequence's length, to be overwritten; its draft is read at the last
        committed position. `fused`: the runner's StepOutput.drafts (runner.FusedDraft); rows whose committed
        tokens are the ones the fused step fed (the argmax ones) skip the first step."""
        if not rows:
            return {}
        max_k = max(k for *_, k in rows)
        first, drafts, h = [], {}, [None] * len(rows)
        for b, (seq, start, hidden, k) in enumerate(rows):
            committed = seq.num_computed - start
            done = fused.get(seq.seq_id) if fused else None
            if done is not None and done.next_ids[:committed] == seq.token_ids[start + 1 : start + 1 + committed]:
                drafts[seq.seq_id] = [done.draft] if k else []
                if max_k > 1:
                    h[b] = done.hidden[done.row]
                continue
            next_ids = seq.token_ids[start + 1 : start + 1 + committed]
            first.append((b, (seq, start, hidden, next_ids + next_ids[-1:] * (hidden.shape[0] - committed),
                              committed - 1)))
        if first:
            logits, h_first = self.runner.draft([row for _, row in first], depth=0)
            for (b, (seq, *_)), t, hb in zip(first, logits.argmax(-1).tolist(), h_first):
                drafts[seq.seq_id] = [t] if rows[b][3] else []
                h[b] = hb
        if max_k < 2:
            return drafts
        h = torch.stack(h)
        live = [(b, seq, k) for b, (seq, *_, k) in enumerate(rows) if k > 1]
        for j in range(2, max_k + 1):
            live = [(b, seq, k) for b, seq, k in live if k >= j]
            if not live:
                break
            step = [(seq, seq.num_computed + j - 2, h[b : b + 1], drafts[seq.seq_id][-1:], 0) for b, seq, _ in live]
            logits, h_step = self.runner.draft(step, depth=(j - 1) % self.num_modules)
            for (_, seq, _), t in zip(live, logits.argmax(-1).tolist()):
                drafts[seq.seq_id].append(t)
            h = h.clone()
            h[[b for b, *_ in live]] = h_step
        return drafts
