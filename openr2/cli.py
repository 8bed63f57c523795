"""The `openr2` command line: parses `openr2 <verb>` and dispatches. Imports lazily so --help is instant."""

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


def cmd_info(args: argparse.Namespace) -> int:
    from openr2.model.accounting import model_stats

    config = _resolve_config(args.model)
    stats = model_stats(config)
    if args.json:
        print(json.dumps({"model": args.model, "model_type": config.model_type, **stats.to_dict()}))
        return 0
    layers = stats.num_layers
    rows = [
        ("model", f"{args.model} ({config.model_type}, {layers} layers, {config.n_routed_experts} routed experts "
                  f"top-{config.num_experts_per_tok})"),
        ("total parameters", f"{stats.total_params:,}"),
        ("active parameters", f"{stats.active_params:,} per token ({stats.active_params / 1e9:.2f}B; head counted, "
                              f"input embedding not, MTP excluded)"),
    ]
    if stats.mtp_params:
        rows.append(("MTP parameters", f"{stats.mtp_params:,} (not in the totals above)"))
    rows += [
        ("KV cache, bf16", f"MLA {stats.kv_bytes_per_token_mla:,} B vs MHA {stats.kv_bytes_per_token_mha:,} B "
                           f"per token per layer: {stats.kv_ratio:.1f}x smaller"),
        ("KV cache per token", f"MLA {stats.kv_bytes_per_token_mla * layers:,} B vs MHA "
                               f"{stats.kv_bytes_per_token_mha * layers:,} B over {layers} layers"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openr2", description="Open, private DeepSeek-style reasoning models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts and KV-cache size of a checkpoint or preset")
    info.add_argument("model", help="checkpoint directory or preset name (deepseek-v3, deepseek-v2-lite, ...)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"openr2 {args.command}: error: {e}", file=sys.stderr)
        return 2
