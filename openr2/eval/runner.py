"""`openr2 eval`: run a task against a backend, grade every sample, save as it goes, summarise.

Owns `EvalConfig` (the command's options), the results file and its resume rule, and the markdown
summary. Tasks, grading, metrics and backends live in their own modules; this file wires them.

Results file (JSON, rewritten atomically at most every `save_every_s` and on exit, also on an error or
Ctrl-C, so a run that stops keeps every item scored so far):
  {"config": {...}, "summary": {...}, "items": [
     {"id", "prompt", "gold", "choices"?, "num_correct", "pass@1", "maj_answer", "maj_correct",
      "completion_tokens", "cost_pico_usd",
      "samples": [{"index", "seed", "reasoning", "content", "extracted", "correct", "finish_reason",
                   "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens",
                   "cost_pico_usd"}]}]}
`reasoning` + `content` is the raw output; only `content` was graded. Rerunning with the same --out and
the same task/model/sampling settings skips items already scored (all K samples); a different setting is
an error rather than a silent mix. Costs are exact integer pico-dollars from each response's usage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from openr2.eval import grading, metrics
from openr2.eval.backends import Completion, HTTPBackend, LocalBackend, Request
from openr2.eval.tasks import Item, load_items, resolve_data
from openr2.tasks.answers import majority

FORMAT_VERSION = 1
# settings that change what an item's samples mean: a resumed run must match them
_RESUME_KEYS = ("task", "data", "model", "samples", "temperature", "top_p", "max_tokens", "seed")


@dataclass
class EvalConfig:
    task: str
    data: str | None = None  # JSONL file; default: the task's bundled file (gsm8k, math500, arc)
    model: str | None = None  # checkpoint directory (local engine)
    base_url: str | None = None  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key: str | None = None
    model_name: str | None = None  # the endpoint's model id
    limit: int | None = None
    samples: int = 1
    temperature: float = 0.6  # DeepSeek-R1's evaluation setting (with top_p 0.95)
    top_p: float = 0.95
    max_tokens: int | None = None  # None: up to 4096, clipped to the model's context (the server's default)
    concurrency: int = 8
    seed: int = 0
    out: str | None = None  # default runs/eval/eval-<task>-<model>.json
    retries: int = 5
    prices: str | None = None  # price table file for the cost column (default: our list prices)
    dtype: str = "float32"
    device: str = "cpu"

    def validate(self) -> None:
        if (self.model is None) == (self.base_url is None):
            raise ValueError("give exactly one of --model DIR (local engine) or --base-url URL (HTTP endpoint)")
        if self.base_url is not None and not self.model_name:
            raise ValueError("--base-url needs --model-name (the endpoint's model id)")
        if self.model is not None and not os.path.isdir(self.model):
            raise FileNotFoundError(f"--model {self.model}: not a checkpoint directory")
        for name, low in (("samples", 1), ("max_tokens", 1), ("concurrency", 1), ("retries", 0)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")

    @property
    def model_label(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model or ""))

    def out_path(self) -> str:
        if self.out:
            return self.out
        # under runs/ (git-ignored) rather than the current directory, which is often a checkout
        name = f"eval-{self.task.replace(':', '-')}-{self.model_label.replace('/', '-')}.json"
        return os.path.join("runs", "eval", name)

    def header(self, data: str | None) -> dict:
        """What the results file records about the run (never the API key)."""
        return {"task": self.task, "data": data, "model": self.model_label,
                "backend": "http" if self.base_url else "local", "base_url": self.base_url,
                "samples": self.samples, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "seed": self.seed}


def sample_seed(seed: int, item_id: str, index: int) -> int:
    """Per-request seed: the same item and sample get the same seed on every backend and every rerun."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}:{index}".encode()).digest()[:4], "big") >> 1


def _read_results(path: str, header: dict) -> dict:
    """Items already scored in `path` (by id), after checking it was made with the same settings."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        old, items = previous["config"], previous["items"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: exists but is not an openr2 eval results file ({e}); use another --out") from None
    for key in _RESUME_KEYS:
        if old.get(key) != header[key]:
            raise ValueError(f"{path}: made with {key}={old.get(key)!r}, this run has {key}={header[key]!r}; "
                             f"use another --out to keep both")
    return {it["id"]: it for it in items if len(it.get("samples", [])) >= header["samples"]}


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous file


def score_item(item: Item, completions: list[tuple[Request, Completion]], prices) -> dict:
    """One item's record: every sample graded (answer text only), plus pass@1, the majority vote, totals."""
    samples = []
    for r, c in sorted(completions, key=lambda rc: rc[0].index):
        extracted, correct = grading.grade(item, c.content)
        u = c.usage
        samples.append({"index": r.index, "seed": r.seed, "reasoning": c.reasoning, "content": c.content,
                        "extracted": extracted, "correct": bool(correct), "finish_reason": c.finish_reason,
                        "prompt_tokens": u.prompt_tokens, "cached_prompt_tokens": u.cached_prompt_tokens,
                        "completion_tokens": u.completion_tokens, "reasoning_tokens": u.reasoning_tokens,
                        "cost_pico_usd": prices.cost(u)})
    flags = [s["correct"] for s in samples]
    maj_answer, maj_correct = majority([s["extracted"] for s in samples], flags)
    record = {"id": item.id, "prompt": item.prompt, "gold": item.gold}
    if item.choices:
        record["choices"] = item.choices
    record.update({"num_correct": sum(flags), "pass@1": sum(flags) / len(flags), "maj_answer": maj_answer,
                   "maj_correct": maj_correct, "completion_tokens": sum(s["completion_tokens"] for s in samples),
                   "cost_pico_usd": sum(s["cost_pico_usd"] for s in samples), "samples": samples})
    return record


def markdown_summary(header: dict, summary: dict) -> str:
    from openr2.billing import format_usd

    k = header["samples"]
    cols = ["task", "model", "items", "samples", "pass@1"] + ([f"maj@{k}", f"pass@{k}"] if k > 1 else [])
    cols += ["answered", "truncated", "mean output tokens", "mean reasoning tokens", "cost"]
    if not summary.get("items"):
        values = [header["task"], header["model"], "0", str(k)] + ["-"] * (len(cols) - 4)
    else:
        values = [header["task"], header["model"], str(summary["items"]), str(k), f"{summary['pass@1']:.1%}"]
        if k > 1:
            values += [f"{summary[f'maj@{k}']:.1%}", f"{summary[f'pass@{k}']:.1%}"]
        values += [f"{summary['answered']:.1%}", f"{summary['truncated']:.1%}",
                   f"{summary['mean_completion_tokens']:.1f}", f"{summary['mean_reasoning_tokens']:.1f}",
                   format_usd(summary["cost_pico_usd"])]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), "| " + " | ".join(values) + " |"])


def make_backend(config: EvalConfig):
    if config.base_url is not None:
        return HTTPBackend(config.base_url, config.model_name, config.api_key, config.concurrency, config.retries)
    return LocalBackend(config.model, config.dtype, config.device)


def run_eval(config: EvalConfig, backend=None, progress: bool = True, save_every_s: float = 2.0) -> dict:
    """Run (or resume) one evaluation; returns the results (also in config.out_path() and its .md)."""
    from tqdm.auto import tqdm

    from openr2.billing import PriceTable

    config.validate()
    prices = PriceTable.load(config.prices) if config.prices else PriceTable()
    data = resolve_data(config.task, config.data)
    items = load_items(config.task, data, config.limit, config.seed)
    header = config.header(os.path.abspath(data) if data else None)
    path = config.out_path()
    done = _read_results(path, header)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    wanted = {it.id for it in items}
    todo = [it for it in items if it.id not in done]
    requests = [Request(it.id, i, it.messages, config.temperature, config.top_p, config.max_tokens,
                        sample_seed(config.seed, it.id, i)) for it in todo for i in range(config.samples)]
    by_id = {it.id: it for it in todo}
    partial: dict[str, list] = {}
    if requests and backend is None:
        backend = make_backend(config)  # before the clock: wall_s times the generation, not model loading
    start, last_save = time.perf_counter(), 0.0

    def save() -> dict:
        ordered = [done[it.id] for it in items if it.id in done]
        others = [rec for key, rec in done.items() if key not in wanted]  # kept from a larger earlier run
        summary = metrics.summarize(ordered, config.samples)
        summary["wall_s"] = round(time.perf_counter() - start, 3)
        if isinstance(backend, HTTPBackend):
            summary["http_retries"] = backend.retries
        results = {"format": FORMAT_VERSION, "config": header, "summary": summary, "items": ordered + others}
        _write_json(path, results)
        return results

    bar = tqdm(total=len(todo), desc=config.task, unit="item", disable=not progress, dynamic_ncols=True)
    try:
        if requests:
            for r, completion in backend.run(requests):
                partial.setdefault(r.item_id, []).append((r, completion))
                if len(partial[r.item_id]) < config.samples:
                    continue
                done[r.item_id] = score_item(by_id[r.item_id], partial.pop(r.item_id), prices)
                bar.update(1)
                scored = [done[it.id] for it in items if it.id in done]
                bar.set_postfix(pass1=f"{sum(x['pass@1'] for x in scored) / len(scored):.3f}")
                if time.perf_counter() - last_save >= save_every_s:
                    save()
                    last_save = time.perf_counter()
    finally:
        bar.close()
        results = save()  # on success, error or Ctrl-C alike: everything scored so far is on disk
    md = markdown_summary(header, results["summary"])
    with open(os.path.splitext(path)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(md + "\n")
    results["markdown"] = md
    return results
