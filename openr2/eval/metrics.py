"""Scores over sampled answers: unbiased pass@k, maj@k, and the per-run summary.

Owns the arithmetic only (no I/O, no grading). pass@k is the unbiased estimator of Chen et al. (2021):
with n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), computed as a running product
so large n does not overflow floats. pass@1 is its k=1 case, c/n: accuracy averaged over the samples.
maj@k takes the most common extracted answer among the first k samples (ties: the one seen first;
unanswered samples do not vote: tasks.answers.majority, which GRPO's evaluation shares) and scores
whether it is correct.
"""

from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def ks_for(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(items: list[dict], samples: int) -> dict:
    """Run-level scores from scored result items (each with its `samples` list); see runner.py for the shape."""
    done = [it for it in items if len(it.get("samples", [])) >= samples]
    out: dict = {"items": len(done), "samples": samples}
    if not done:
        return out
    ks = ks_for(samples)
    for k in ks:
        total = 0.0
        for it in done:
            flags = [s["correct"] for s in it["samples"][:samples]]
            total += pass_at_k(len(flags), sum(flags), k)
        out[f"pass@{k}"] = total / len(done)
    if samples > 1:
        out[f"maj@{samples}"] = sum(it["maj_correct"] for it in done) / len(done)
    num_samples = len(done) * samples
    for key in ("prompt_tokens", "completion_tokens", "reasoning_tokens"):
        out[f"mean_{key}"] = sum(s[key] for it in done for s in it["samples"][:samples]) / num_samples
    out["answered"] = sum(s["extracted"] is not None for it in done for s in it["samples"][:samples]) / num_samples
    out["truncated"] = sum(s["finish_reason"] == "length" for it in done for s in it["samples"][:samples]) / num_samples
    out["cost_pico_usd"] = sum(it["cost_pico_usd"] for it in done)
    return out
