"""The `openr2` command line: parses `openr2 <verb>` and dispatches. Imports lazily so --help is instant (the
train and rl flags come from openr2/train/config.py, which is torch-free; the engine flags of generate, chat
and serve come from EngineConfig, whose module imports torch, so they are added only when one of those verbs
is parsed)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _resolve_config(target: str):
    """A checkpoint directory (its config.json) or a preset name -> ModelConfig."""
    from openr2.config import ModelConfig
    from openr2.presets import PRESETS, get_preset

    if os.path.isdir(target) or target.endswith(".json"):
        return ModelConfig.from_pretrained(target)
    if target in PRESETS:
        return get_preset(target)
    raise ValueError(f"{target!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def cmd_info(args: argparse.Namespace) -> int:
    from openr2.model.accounting import model_stats

    config = _resolve_config(args.model)
    if args.ep > 1 or args.pp > 1:
        return _info_parallel(args, config)
    stats = model_stats(config)
    if args.json:
        print(json.dumps({"model": args.model, "model_type": config.model_type, **stats.to_dict()}))
        return 0
    if config.is_v4:
        return _info_v4(args.model, config, stats)
    layers = stats.num_layers
    rows = [
        ("model", f"{args.model} ({config.model_type}, {layers} layers, {config.n_routed_experts} routed experts "
                  f"top-{config.num_experts_per_tok}" + (f", dynamic: top-p {config.routing_top_p} keeping "
                  f"{config.routing_min_k}..{config.num_experts_per_tok} per token, active parameters below at "
                  f"the most" if config.routing_top_p else "") + ")"),
        ("total parameters", f"{stats.total_params:,}"),
        ("active parameters", f"{stats.active_params:,} per token ({_short(stats.active_params)}; head counted, "
                              f"input embedding not, MTP excluded)"),
    ]
    if stats.mtp_params:
        rows.append(("MTP parameters", f"{stats.mtp_params:,} (not in the totals above)"))
    if config.has_indexer:
        per_layer = stats.indexer_params // layers
        rows.append(("indexer parameters", f"{stats.indexer_params:,} (in the totals above; {per_layer:,} per "
                                           f"layer: {config.index_n_heads} heads x {config.index_head_dim} dims, "
                                           f"top-{config.index_topk} keys per query)"))
    rows += [
        ("KV cache, bf16", f"MLA {stats.kv_bytes_per_token_mla:,} B vs MHA {stats.kv_bytes_per_token_mha:,} B "
                           f"per token per layer: {stats.kv_ratio:.1f}x smaller"),
        ("KV cache per token", f"MLA {stats.kv_bytes_per_token_mla * layers:,} B vs MHA "
                               f"{stats.kv_bytes_per_token_mha * layers:,} B over {layers} layers"),
    ]
    if config.has_indexer:
        dense = stats.kv_bytes_per_token_mla * layers
        rows += [
            ("indexer keys, bf16", f"{stats.index_bytes_per_token:,} B per token per layer, beside the latent: "
                                   f"{stats.kv_bytes_per_token_mla + stats.index_bytes_per_token:,} B"),
            ("cache per token", f"{stats.cache_bytes_per_token:,} B (latent + indexer key over {layers} layers) "
                                f"vs {dense:,} B for dense MLA (V3): "
                                f"+{100 * (stats.cache_bytes_per_token / dense - 1):.1f}%"),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _info_parallel(args: argparse.Namespace, config) -> int:
    """`openr2 info MODEL --ep E --pp P [--dp D]`: training memory per rank (train/memory.py)."""
    from openr2.train.memory import per_rank

    ep, pp, dp = args.ep, args.pp, args.dp or args.ep
    if dp % ep:
        raise ValueError(f"--dp {dp} must be a multiple of --ep {ep} (expert parallelism inside data parallelism)")
    ranks = per_rank(config, ep, pp)
    if args.json:
        print(json.dumps({"model": args.model, "ep": ep, "pp": pp, "dp": dp,
                          "stages": [{"stage": r.stage, "layers": [r.layers.start, r.layers.stop],
                                      "dense_params": r.dense_params, "expert_params": r.expert_params,
                                      **r.bytes(ep, dp)} for r in ranks]}))
        return 0
    print(f"{args.model}: {config.num_hidden_layers} layers in {pp} pipeline stages, {config.n_routed_experts} routed "
          f"experts over {ep} ranks, {dp} data-parallel ranks per stage ({pp * dp} ranks); bf16 weights, fp32 "
          f"gradients, fp32 master weights and AdamW moments sharded over data parallelism (ZeRO-1); "
          "activations not counted")
    print(f"{'stage':>5} {'layers':>9} {'dense params':>14} {'expert params':>14} {'weights':>10} {'grads':>10} "
          f"{'master+moments':>14} {'total':>10}")
    rows = []
    for r in ranks:
        b = r.bytes(ep, dp)
        total = sum(b.values())
        rows.append(total)
        span = f"{r.layers.start}-{r.layers.stop - 1}" if len(r.layers) else "-"
        extra = " +embed" if r.stage == 0 else " +head,MTP" if r.stage == pp - 1 else ""
        print(f"{r.stage:>5} {span:>9} {r.dense_params:>14,} {r.expert_params:>14,} {_mib(b['weights']):>10} "
              f"{_mib(b['gradients']):>10} {_mib(b['master'] + b['moments']):>14} {_mib(total):>10}{extra}")
    print(f"busiest rank: {_mib(max(rows))}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _info_v4(name: str, config, stats) -> int:
    """`openr2 info` for DeepSeek-V4: attention kinds per layer, and cache sizes at 4K / 128K / 1M tokens
    against DeepSeek-V3's MLA (its preset, bf16 latents in all 61 layers)."""
    from openr2.model.accounting import CONTEXTS, model_stats
    from openr2.presets import deepseek_v3

    kinds = [config.layer_types.count(k) for k in ("sliding_attention", "compressed_sparse_attention",
                                                    "heavily_compressed_attention")]
    rates = config.compress_rates
    v3 = model_stats(deepseek_v3())
    rows = [
        ("model", f"{name} ({config.model_type}, {stats.num_layers} layers: {kinds[0]} sliding-window, {kinds[1]} "
                  f"CSA {rates['compressed_sparse_attention']}:1, {kinds[2]} HCA "
                  f"{rates['heavily_compressed_attention']}:1; {config.n_routed_experts} routed experts "
                  f"top-{config.num_experts_per_tok}, {config.mlp_layer_types.count('hash_moe')} hash-routed layers)"),
        ("total parameters", f"{stats.total_params:,} ({_short(stats.total_params)}; MTP not counted)"),
        ("MTP parameters", f"{stats.mtp_params:,} ({config.num_nextn_predict_layers} depth(s); embedding and head "
                           f"shared)"),
        ("active parameters", f"{stats.active_params:,} per token ({_short(stats.active_params)}; head counted, "
                              f"input embedding not)"),
        ("indexer parameters", f"{stats.indexer_params:,} (in the totals above; {config.index_n_heads} heads x "
                               f"{config.index_head_dim} dims, top-{config.index_topk} entries per query)"),
        ("cache growth, bf16", f"{stats.cache_bytes_per_token:,} B per token (compressed entries and indexer keys) "
                               f"vs {v3.cache_bytes_per_token:,} B for V3's MLA"),
        ("window, bf16", f"{_mib(stats.window_bytes)} ({config.sliding_window} tokens x {config.head_dim} dims x "
                         f"{stats.num_layers} layers)"),
        ("compressor state", f"{_mib(stats.compressor_state_bytes)} per sequence, float32"),
    ]
    for n in CONTEXTS:
        ours, theirs = stats.cache_bytes(n), v3.cache_bytes(n)
        beyond = f" (past V3's {v3_max:,} tokens)" if n > (v3_max := deepseek_v3().max_position_embeddings) else ""
        rows.append((f"cache at {f'{n // 1024}K' if n < 2**20 else f'{n // 2**20}M'}",
                     f"{_mib(ours)} vs V3 MLA {_mib(theirs)}{beyond}: {100 * ours / theirs:.1f}%"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _model_dir(args: argparse.Namespace) -> str:
    """The checkpoint of `generate` / `chat`: the positional MODEL or --model (the model card writes the
    flag, as `serve` and `eval` take it); both are accepted when they name the same directory."""
    given = [m for m in (args.model, args.model_flag) if m is not None]
    if not given:
        raise ValueError("no checkpoint given: name its directory, as MODEL or --model MODEL")
    if len({os.path.abspath(m) for m in given}) > 1:
        raise ValueError(f"two checkpoints given: {args.model!r} and --model {args.model_flag!r}; name one")
    return given[0]


def _sampling_params(args: argparse.Namespace):
    from openr2.engine.sampling import SamplingParams

    return SamplingParams(n=getattr(args, "n", 1), temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, max_tokens=args.max_tokens)


def _engine_config(args: argparse.Namespace):
    """EngineConfig from its defaults and the engine flags given (see _add_engine_flags)."""
    from openr2.engine.engine import EngineConfig

    given = {k[len("engine_"):]: v for k, v in vars(args).items() if k.startswith("engine_")}
    return EngineConfig(**(CLI_DEFAULTS | given))


def _load_engine(args: argparse.Namespace):
    import torch

    from openr2.engine.engine import LLMEngine

    engine = LLMEngine.from_pretrained(args.model, _engine_config(args), getattr(torch, args.dtype), args.device)
    if engine.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.json, so text cannot be encoded")
    return engine


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer one prompt as a user message through the model's chat template or its release's encoder (the
    plain text with --raw, or when the checkpoint has neither), streaming the text as it is generated."""
    from openr2.chat_format import ENCODERS, encode_chat

    args.model = _model_dir(args)
    engine = _load_engine(args)
    params = _sampling_params(args)
    model_type = engine.model.config.model_type
    chat = not args.raw and (bool(engine.tokenizer.chat_templates) or model_type in ENCODERS)
    prompt = {"prompt_token_ids": encode_chat([{"role": "user", "content": args.prompt}], engine.tokenizer,
                                              model_type=model_type)} if chat else args.prompt
    final = None
    for out in engine.stream(prompt, params):
        if params.n == 1:
            print(out.outputs[0].text_delta, end="", flush=True)
        final = out
    if params.n > 1:
        for o in final.outputs:
            print(f"--- sample {o.index} ({o.finish_reason})\n{o.text}")
    else:
        print()
    u = final.usage
    print(f"[{u.prompt_tokens} prompt ({u.cached_prompt_tokens} cached), {u.completion_tokens} completion, "
          f"{u.reasoning_tokens} reasoning tokens; finish: {final.outputs[0].finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: reasoning streams dimmed, the answer plain; /reset forgets, /exit or Ctrl-D quits
    (exit code 0), Ctrl-C too (130, the shell's code for an interrupt)."""
    args.model = _model_dir(args)
    engine = _load_engine(args)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    dim, plain = ("\x1b[2m", "\x1b[0m") if color else ("", "")
    print("openr2 chat: /reset clears the conversation, /exit or Ctrl-D quits.")
    try:
        return _chat_loop(engine, _sampling_params(args), dim, plain)
    except KeyboardInterrupt:
        print(plain)  # leave the terminal undimmed and on a fresh line
        return 130


def _chat_loop(engine, params, dim: str, plain: str) -> int:
    """Read a line, answer it, until /exit or end of input."""
    from openr2.chat_format import ReasoningParser, prompt_opens_reasoning, render_chat

    history: list[dict] = []
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        text = render_chat(history, engine.tokenizer, model_type=engine.model.config.model_type)
        parser = ReasoningParser(starts_in_reasoning=prompt_opens_reasoning(text))
        prompt = {"prompt_token_ids": engine.tokenizer.encode(text)}
        answer = _stream_turn(engine, prompt, params, parser, dim, plain)
        history.append({"role": "assistant", "content": answer})


def _stream_turn(engine, prompt, params, parser, dim: str, plain: str) -> str:
    """Print one reply as it streams (reasoning dimmed, answer plain); return the answer."""
    answer: list[str] = []
    in_reasoning = False

    def show(reasoning: str, content: str) -> None:
        nonlocal in_reasoning
        if reasoning:
            print(("" if in_reasoning else dim) + reasoning, end="", flush=True)
            in_reasoning = True
        if content:
            print((plain + "\n" if in_reasoning else "") + content, end="", flush=True)
            in_reasoning = False
            answer.append(content)

    for out in engine.stream(prompt, params):
        show(*parser.feed(out.outputs[0].text_delta))
    show(*parser.finish())
    print(plain)
    return "".join(answer)


def _data_dir(args: argparse.Namespace) -> str:
    path = os.path.expanduser(args.data_dir)
    os.makedirs(path, exist_ok=True)
    return path


def _ledger(args: argparse.Namespace):
    from openr2.server.ledger import Ledger

    log_content = getattr(args, "log_content", False)
    if args.database_url:  # PostgreSQL, shared by replicas: nothing of the ledger is kept in --data-dir
        if not args.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"--database-url must be a postgresql:// URL, got {args.database_url.split('://')[0]}://...")
        return Ledger(args.database_url, log_content=log_content, lease_s=getattr(args, "lease_s", 30.0))
    path = _data_dir(args)
    return Ledger(os.path.join(path, "ledger.sqlite"), data_dir=path, log_content=log_content)


def _add_database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=os.environ.get("OPENR2_DATABASE_URL") or None,
                        help="a PostgreSQL ledger shared by replicas, postgresql://USER@HOST/DB (default: "
                             "$OPENR2_DATABASE_URL, which keeps a password out of the process list); without "
                             "it, the SQLite ledger in --data-dir")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a checkpoint with the OpenAI-compatible API on host:port (127.0.0.1 by default)."""
    import gc

    import uvicorn

    from openr2 import billing
    from openr2.engine.async_engine import AsyncEngine
    from openr2.engine.sampling import generation_defaults
    from openr2.server.app import Server, ServerConfig, create_app, parse_model_aliases
    from openr2.server.pages import example_prompts
    from openr2.server.policy import Policy

    if args.upstream or args.config:
        return _serve_gateway(args)
    aliases = parse_model_aliases(args.model_aliases)
    policy = Policy.load(args.policy) if args.policy else None  # a bad rules file fails before the model loads
    ledger = _ledger(args)  # first: a bad database URL fails before minutes of loading
    engine = _load_engine(args)
    prices = billing.PriceTable.load(args.prices) if args.prices else billing.PriceTable()
    config = ServerConfig(model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
                          require_auth=args.require_auth, log_content=args.log_content,
                          requests_per_min=args.requests_per_min, tokens_per_min=args.tokens_per_min,
                          default_sampling=generation_defaults(args.model),
                          example_prompts=example_prompts(args.model), docs=args.docs, model_aliases=aliases,
                          policy=policy)
    if engine.config.compile:
        print("openr2: preparing the compiled decode step (the first start compiles it, for minutes; later ones "
              "load it from disk)...")
        engine.warm_up()
    server = Server(AsyncEngine(engine), ledger, prices, config)
    where = "ledger in PostgreSQL" if args.database_url else f"data in {args.data_dir}"
    print(f"openr2: serving {config.model_name!r} on http://{args.host}:{args.port} ({where})")
    http = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning"))
    server.engine.on_failure = lambda: setattr(http, "should_exit", True)  # a dead engine: exit, to be restarted
    # What is loaded now (torch, the model, the tokenizer) lives as long as the process: frozen out of the cyclic
    # GC's reach, so that a full collection walks only what requests allocate (in bench/server.py one took
    # ~200 ms, holding the GIL and so stalling the engine thread mid-step).
    gc.collect()
    gc.freeze()
    http.run()
    server.engine.shutdown()
    if server.engine.failure is not None:
        print(f"openr2: {server.engine.failure}", file=sys.stderr)
        return 1
    return 0 if http.started else 3  # uvicorn.run's status when it could not start (a port in use...)


def _serve_gateway(args: argparse.Namespace) -> int:
    """`serve --upstream URL ... | --config gateway.toml`: the same server, generation done by upstream servers;
    --model names the checkpoint (or tokenizer) directory whose tokenizer and chat template the gateway uses."""
    import uvicorn

    from openr2 import billing
    from openr2.engine.sampling import generation_defaults
    from openr2.server.app import Server, ServerConfig, create_app, parse_model_aliases
    from openr2.server.gateway import UpstreamBackend
    from openr2.server.pages import example_prompts
    from openr2.server.upstreams import Upstream, UpstreamPool, check_prices, load_upstreams
    from openr2.tokenizer import Tokenizer

    upstreams, settings = load_upstreams(args.config) if args.config else ([], {})
    upstreams += [Upstream(url) for url in args.upstream or []]
    unknown = set(settings) - {"max_model_len", "probe_interval_s", "affinity_tokens"}
    if unknown:
        raise ValueError(f"{args.config}: unknown top-level key(s) {sorted(unknown)}")
    pool = UpstreamPool(upstreams, **{k: v for k, v in settings.items() if k != "max_model_len"})
    backend = UpstreamBackend(pool, Tokenizer.from_pretrained(args.model),
                              getattr(args, "engine_max_model_len", None) or settings.get("max_model_len"))
    prices = billing.PriceTable.load(args.prices) if args.prices else billing.PriceTable()
    check_prices(upstreams, prices)
    config = ServerConfig(model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
                          require_auth=args.require_auth, log_content=args.log_content,
                          requests_per_min=args.requests_per_min, tokens_per_min=args.tokens_per_min,
                          default_sampling=generation_defaults(args.model), example_prompts=example_prompts(args.model),
                          docs=args.docs, model_aliases=parse_model_aliases(args.model_aliases))
    server = Server(backend, _ledger(args), prices, config)
    where = "ledger in PostgreSQL" if args.database_url else f"data in {args.data_dir}"
    print(f"openr2: gateway for {config.model_name!r} over {len(upstreams)} upstream(s) on "
          f"http://{args.host}:{args.port} ({where})")
    http = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning"))
    http.run()
    return 0 if http.started else 3


def cmd_keys(args: argparse.Namespace) -> int:
    from openr2.billing import format_usd, parse_usd

    if args.action != "topup" and args.amount is not None:
        raise ValueError(f"keys {args.action}: unexpected argument {args.amount!r}")
    if args.balance is not None and args.action != "create":
        raise ValueError("--balance goes with `keys create` (use `keys topup KEY_ID AMOUNT` for a key that exists)")
    balance = None if args.balance is None else parse_usd(args.balance, "--balance")
    ledger = _ledger(args)
    if args.action == "create":
        key_id, secret = ledger.create_key(args.name or "")
        if balance is not None:
            ledger.set_balance(key_id, balance)
        print(f"{key_id}\n{secret}\n(store the key now: only its hash is kept)")
    elif args.action == "topup":
        if not args.name or args.amount is None:
            raise ValueError("usage: openr2 keys topup KEY_ID AMOUNT (dollars, e.g. 5.00)")
        amount = parse_usd(args.amount, "AMOUNT")
        if amount == 0:
            raise ValueError("AMOUNT must be more than zero")
        print(f"{args.name}: balance {format_usd(ledger.top_up(args.name, amount))}")
    elif args.action == "list":
        keys = ledger.list_keys()
        for key in keys:
            print(json.dumps(key))
        if not keys:
            print("no keys")
    else:
        if not args.name or not ledger.revoke_key(args.name):
            raise ValueError(f"no active key {args.name!r} to revoke")
        print(f"revoked {args.name}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    rows = _ledger(args).usage_report(args.start, args.end, args.group_by)
    for row in rows:
        print(json.dumps(row))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (local engine) or an OpenAI-compatible endpoint on a task; print the summary."""
    import dataclasses

    from openr2.eval.runner import EvalConfig, run_eval

    config = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    results = run_eval(config, progress=not args.no_progress)
    print(results["markdown"])
    print(f"results: {config.out_path()}", file=sys.stderr)
    return 0


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    from openr2.eval.runner import EvalConfig
    from openr2.eval.tasks import TASK_NAMES

    d = EvalConfig(task="")
    p.add_argument("--task", required=True, help=" | ".join(TASK_NAMES))
    p.add_argument("--data", default=None, help="JSONL file (required for aime and gpqa; format in the README)")
    p.add_argument("--model", default=None, help="checkpoint directory: run it here with the engine")
    p.add_argument("--base-url", default=None, help="or an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="for --base-url (default $OPENAI_API_KEY)")
    p.add_argument("--model-name", default=None, help="the endpoint's model id (with --base-url)")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--samples", type=int, default=d.samples, help="K samples per item: pass@1 over K, maj@K, pass@k")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default 0.6, top-p 0.95)")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="per sample, reasoning included (default: up to 4096, clipped to the model's context)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="HTTP requests in flight")
    p.add_argument("--retries", type=int, default=d.retries, help="HTTP retries on 429/5xx/connection errors")
    p.add_argument("--seed", type=int, default=d.seed, help="per-request seeds and the GPQA choice order derive from it")
    p.add_argument("--out", default=None, help="results JSON (rerun with it to resume; default "
                   "runs/eval/eval-TASK-MODEL.json); a .md summary beside it")
    p.add_argument("--prices", default=None, help="price table for the cost column (JSON or TOML)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _demo_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Reasoning-shaped text to train the placeholder's tokenizer on (digits, operators, think tags)."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        op, result = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(f"What is {a} {op} {b}?<think>\nLet me work it out step by step: {a} {op} {b} = {result}.\n"
                     f"</think>\n\nThe answer is {result}.")
    return lines


def cmd_init_demo(args: argparse.Namespace) -> int:
    """Write an UNTRAINED small-moe checkpoint with a tokenizer, so the server has something to serve
    before the trained demo model exists (its answers are noise)."""
    import dataclasses

    from openr2.checkpoints import save_model
    from openr2.model.transformer import build_model
    from openr2.presets import small_moe
    from openr2.tokenizer import train_bpe

    tokenizer = train_bpe(_demo_corpus(), vocab_size=4096)
    config = dataclasses.replace(small_moe(), vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    save_model(build_model(config, seed=args.seed), args.out)
    tokenizer.save_pretrained(args.out)
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write("# openr2 placeholder (untrained)\n\nRandom small-moe weights and a BPE tokenizer, written by "
                "`openr2 init-demo` so that `make run` has a model to serve. Its answers are noise; the "
                "trained demo model replaces it.\n")
    print(f"wrote an untrained small-moe placeholder to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from openr2.train.run import config_from, train

    flags = {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_")}
    config = config_from(args.preset, args.config, **flags)  # rejects bad options before any work
    summary = train(config, export=args.export, command=" ".join(["openr2", *sys.argv[1:]]))
    if summary.get("export") or "plots" in summary:
        print(json.dumps(summary))
    return 130 if summary.get("interrupted") else 0


def cmd_rl(args: argparse.Namespace) -> int:
    from openr2.train.grpo import config_from, run

    flags = {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_")}
    summary = run(config_from(args.config, **flags))  # the config is validated before any work
    print(json.dumps(summary))
    return 130 if summary.get("interrupted") else 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from openr2.tokenizer import train_bpe
    from openr2.train.config import TrainConfig
    from openr2.train.run import tokenizer_corpus

    cfg = TrainConfig(data=args.data or [], tasks=args.tasks, num_examples=args.num_examples, seed=args.seed)
    tokenizer = train_bpe(tokenizer_corpus(cfg, max_task_texts=args.num_examples), vocab_size=args.vocab_size,
                          min_frequency=args.min_frequency)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json ({tokenizer.vocab_size} tokens)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write an int8 / int4 weight-only copy of a float checkpoint (checked before anything is written)."""
    from openr2.checkpoints import quantize_checkpoint

    print(json.dumps(quantize_checkpoint(args.model, args.out, args.scheme, args.group_size, args.symmetric)))
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """Write a checkpoint as one GGUF file for llama.cpp / Ollama (architecture deepseek2)."""
    from openr2.export.gguf import export_gguf

    print(json.dumps(export_gguf(args.model, args.out, args.type, args.name, args.pre_tokenizer)))
    return 0


def _add_config_flags(p: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of a config dataclass (--batch-size, --lr, ...); only the flags given override."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag, hint, kw = "--" + f.name.replace("_", "-"), hints[f.name], {"dest": "opt_" + f.name,
                                                                          "default": argparse.SUPPRESS}
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "betas":
            p.add_argument(flag, nargs=2, type=float, metavar=("B1", "B2"), **kw)
        elif f.name == "data":
            p.add_argument(flag, nargs="+", metavar="FILE", **kw)
        else:
            base = next((t for t in (int, float) if hint is t or hint == t | None), str)
            p.add_argument(flag, type=base, metavar=f.name.upper(), **kw)


COMPILE_HELP = ("compile the decode step (batch-1 decode ~4-7x faster on CPU): minutes the first time, then "
                "loaded from ~/.cache/openr2 in under a second")
SPECULATIVE_HELP = ("speculative decoding: mtp:K drafts K tokens with the checkpoint's MTP module(s), ngram:K by "
                    "prompt lookup; outputs are unchanged (exact rejection sampling)")
CLI_DEFAULTS = {"compile": True}  # where the command line's default differs from EngineConfig's (compiled by default)
ENGINE_HELP = {  # what a user needs to pick a value; a field not listed here gets a generic line
    "block_size": "tokens per KV-cache block (default 64; DeepSeek-V4: the smallest multiple of its compression "
                  "rates >= 4 x its window)",
    "kv_cache_bytes": "memory for the KV cache, e.g. 512MiB, 2GiB or bytes (K/M/G = KiB/MiB/GiB)",
    "num_blocks": "exact number of KV-cache blocks (overrides --kv-cache-bytes)",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "tokens per step; longer prompts are prefilled in chunks",
    "max_model_len": "context length, prompt + completion (default: the model's max_position_embeddings)",
    "enable_prefix_caching": "reuse the KV cache of prompt prefixes seen before",
    "cache_dir": "keep complete prefix-cache blocks in this directory too (the disk tier): they outlive the memory "
                 "pool and restarts; files are checksummed, owner-only, scoped by model and tenant",
    "cache_dir_bytes": "size cap of --cache-dir, e.g. 64GiB (least recently used blocks go first)",
    "compile": COMPILE_HELP,
    "index_cache_dtype": "DeepSeek-V3.2: the cached indexer keys' dtype, bfloat16 for half their bytes and a faster "
                         "scan (AMX where the CPU has it; scores from bf16-rounded keys and queries; default: the "
                         "model's dtype)",
}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
               "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '4096' -> bytes (KB/MB/GB are powers of 1000, K/M/G and KiB/MiB/GiB of 1024)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not unit or int(float(match.group(1)) * unit) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes, such as 512MiB, 2GiB or 1000000")
    return int(float(match.group(1)) * unit)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _scalar_type(annotation) -> type | None:
    """bool, int, float or str for an annotation `X` or `X | None` (a class or, under `from __future__ import
    annotations`, its text); None for anything else (dicts, objects), which takes a parser of its own."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = {part.strip() for part in text.split("|")} - {"None"}
    return {"bool": bool, "int": int, "float": float, "str": str}.get(names.pop()) if len(names) == 1 else None


def _add_engine_flags(p: argparse.ArgumentParser, config_class=None) -> None:
    """One flag per EngineConfig field of a scalar type, so a new field is a new flag: bool -> --x / --no-x,
    int (a count or size: at least 1; *_bytes also as 512MiB), float, str. Only the flags given override."""
    import dataclasses

    if config_class is None:
        from openr2.engine.engine import EngineConfig as config_class
    defaults = config_class()
    group = p.add_argument_group("engine options", f"{config_class.__name__} fields; only the flags given override")
    for f in dataclasses.fields(config_class):
        kind = _scalar_type(f.type)
        if kind is None:
            continue
        default = CLI_DEFAULTS.get(f.name, getattr(defaults, f.name))
        if f.name.endswith("_bytes") and default and not default % (1 << 20):
            default = f"{default >> 20}MiB"
        text = ENGINE_HELP.get(f.name, f"{config_class.__name__}.{f.name}")
        kw = {"dest": "engine_" + f.name, "default": argparse.SUPPRESS,
              "help": text if default is None else f"{text} (default {default})"}  # None: the help says what
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is int:
            group.add_argument(flag, type=parse_size if f.name.endswith("_bytes") else _positive_int,
                               metavar="SIZE" if f.name.endswith("_bytes") else "N", **kw)
        else:
            group.add_argument(flag, type=kind, metavar=f.name.upper(), **kw)
    group.add_argument("--speculative", dest="engine_speculative_config", default=argparse.SUPPRESS,
                       metavar="METHOD:K", help=SPECULATIVE_HELP)


class _VerbParser(argparse.ArgumentParser):
    """A verb's parser whose `late_flags` (a function adding flags from a module that is slow to import) run
    only when that verb is parsed, its --help included, so `openr2 --help` and the other verbs stay instant."""

    def __init__(self, *args, late_flags=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._late_flags = late_flags

    def parse_known_args(self, args=None, namespace=None):
        if self._late_flags is not None:
            add, self._late_flags = self._late_flags, None
            add(self)
        return super().parse_known_args(args, namespace)


def _add_sampling_flags(p: argparse.ArgumentParser, n: bool = False) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same, as a flag")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, DeepSeek's advice)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    if n:
        p.add_argument("--n", type=int, default=1, help="number of samples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openr2", description="Open, private DeepSeek-style reasoning models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_VerbParser)
    info = sub.add_parser("info", help="parameter counts and KV-cache size of a checkpoint or preset")
    info.add_argument("model", help="checkpoint directory or preset name (deepseek-v3, deepseek-v2-lite, ...)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--ep", type=int, default=1, help="training memory per rank with the routed experts split "
                                                         "over this many ranks (with --pp)")
    info.add_argument("--pp", type=int, default=1, help="... and the layers over this many pipeline stages")
    info.add_argument("--dp", type=int, default=0, help="data-parallel ranks per stage, sharding the optimizer "
                                                         "state (ZeRO-1; default: --ep)")
    info.set_defaults(func=cmd_info)
    gen = sub.add_parser("generate", help="complete one prompt, streaming", late_flags=_add_engine_flags)
    _add_sampling_flags(gen, n=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as plain text, not as a user message through the chat template")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive terminal chat", late_flags=_add_engine_flags)
    _add_sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server", late_flags=_add_engine_flags)
    serve.add_argument("--model", required=True, help="checkpoint directory (with --upstream: its tokenizer is used)")
    serve.add_argument("--upstream", action="append", default=None, metavar="URL",
                       help="gateway mode: generate on this OpenAI-compatible server (openr2, vLLM, SGLang, "
                            "llama.cpp) instead of in process; repeat for several")
    serve.add_argument("--config", default=None, metavar="TOML",
                       help="gateway mode: a file of [[upstreams]] tables (url, model, weight, api_key, prices)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default="~/.openr2", help="SQLite ledger and stored files")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--model-aliases", default="deepseek-chat=non-thinking,deepseek-reasoner=thinking",
                       help="other names of the served model, NAME[=thinking|non-thinking|default] separated by "
                            "commas ('' for none); the mode is the default of requests that name it")
    serve.add_argument("--prices", default=None, help="price table (JSON or TOML, dollars per million tokens)")
    serve.add_argument("--require-auth", action="store_true", help="require an API key even before one exists")
    serve.add_argument("--log-content", action="store_true", help="store prompt and completion text in the ledger")
    serve.add_argument("--policy", default=None, metavar="RULES.toml",
                       help="the operator's content rules (patterns or a judge prompt; README: Content policy); "
                            "none by default")
    serve.add_argument("--docs", action="store_true",
                       help="serve FastAPI's /docs and /redoc (their pages load Swagger UI / ReDoc from a CDN)")
    serve.add_argument("--requests-per-min", type=int, default=None, help="per-key request limit (429 past it)")
    serve.add_argument("--tokens-per-min", type=int, default=None, help="per-key prompt + max output token limit")
    _add_database_flag(serve)
    serve.add_argument("--lease-s", type=float, default=30.0,
                       help="with --database-url: how long this replica's batch lines and balance reservations "
                            "stay its own without its heartbeat (another replica takes them over after that)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--device", default="cpu")
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("init-demo", help="write an untrained placeholder checkpoint for the server")
    demo.add_argument("out", help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_init_demo)
    train = sub.add_parser("train", help="pretrain or SFT a model (one process, or under torchrun)",
                           description="Options: defaults < --preset recipe < --config file < flags.")
    train.add_argument("--preset", default=None, help="a recipe, e.g. demo (the bundled demo model)")
    train.add_argument("--config", default=None, help="a JSON or TOML file of TrainConfig options")
    train.add_argument("--export", default=None, help="also write the final model (servable) to this directory")
    from openr2.train.config import GRPOConfig, TrainConfig

    _add_config_flags(train, TrainConfig)
    train.set_defaults(func=cmd_train)
    rl = sub.add_parser("rl", help="GRPO from an SFT checkpoint with verifiable, majority-vote or self-judged rewards",
                        description="Options: defaults < --config file < flags.")
    rl.add_argument("--config", default=None, help="a JSON or TOML file of GRPOConfig options")
    _add_config_flags(rl, GRPOConfig)
    rl.set_defaults(func=cmd_rl)
    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    tok_train = tok_sub.add_parser("train", help="train a byte-level BPE with DeepSeek's chat tokens")
    tok_train.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    tok_train.add_argument("--vocab-size", type=int, default=512)
    tok_train.add_argument("--min-frequency", type=int, default=2)
    tok_train.add_argument("--data", nargs="+", metavar="FILE", help=".txt or .jsonl files")
    tok_train.add_argument("--tasks", default=None, help="synthetic task mixture, e.g. addition:1-5,countdown")
    tok_train.add_argument("--num-examples", type=int, default=20_000, help="synthetic problems to sample")
    tok_train.add_argument("--seed", type=int, default=0)
    tok_train.set_defaults(func=cmd_tokenizer)
    keys = sub.add_parser("keys", help="API keys: create, list, revoke, topup (prepaid balances)")
    keys.add_argument("action", choices=["create", "list", "revoke", "topup"])
    keys.add_argument("name", nargs="?", help="a label (create) or key id (revoke, topup)")
    keys.add_argument("amount", nargs="?", help="topup: dollars to add to the key's balance, e.g. 5.00")
    keys.add_argument("--balance", default=None,
                      help="create: a prepaid balance in dollars (e.g. 5.00); requests it cannot pay get a 402. "
                           "Without it the key has no balance and is never refused for money")
    keys.add_argument("--data-dir", default="~/.openr2")
    _add_database_flag(keys)
    keys.set_defaults(func=cmd_keys)
    usage = sub.add_parser("usage", help="token and cost totals from the ledger")
    usage.add_argument("--start", type=int, default=None, help="unix seconds, inclusive")
    usage.add_argument("--end", type=int, default=None, help="unix seconds, exclusive")
    usage.add_argument("--group-by", choices=["day", "key", "model", "source"], default=None,
                       help="source: where the token counts came from (engine, upstream, local)")
    usage.add_argument("--data-dir", default="~/.openr2")
    _add_database_flag(usage)
    usage.set_defaults(func=cmd_usage)
    quant = sub.add_parser("quantize", help="int8 / int4 weight-only copy of a checkpoint (load_model, LLM, serve run it)")
    quant.add_argument("model", help="float checkpoint directory")
    quant.add_argument("--scheme", required=True, help="int8 (per output channel) | int4 (group-wise)")
    quant.add_argument("--group-size", type=int, default=64, help="int4 columns per scale: 32 | 64 | 128")
    quant.add_argument("--symmetric", action="store_true", help="int4 without zero points")
    quant.add_argument("--out", required=True, help="new output directory")
    quant.set_defaults(func=cmd_quantize)
    gguf = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp / Ollama")
    gguf.add_argument("model", help="checkpoint directory with tokenizer.json (float or FP8)")
    gguf.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    gguf.add_argument("--type", default="f16", help="f32 | f16 | bf16 | q8_0 | q4_0 (default f16)")
    gguf.add_argument("--name", default=None, help="general.name (default: the directory name)")
    gguf.add_argument("--pre-tokenizer", default=None,
                      help="llama.cpp pre-tokenizer name; default: derived from tokenizer.json's regexes")
    gguf.set_defaults(func=cmd_export_gguf)
    ev = sub.add_parser("eval", help="score a checkpoint or an OpenAI-compatible endpoint on a benchmark")
    _add_eval_flags(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"openr2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: stop quietly, as a shell expects
        print(file=sys.stderr)
        return 130
