"""The README.md model card written next to an exported model: what it is, how it was trained, how well it
does (the final evaluation's held-out accuracy per task and difficulty), and the curves."""

from __future__ import annotations

import os
import shutil
from typing import Any

from openr2.model.accounting import model_stats
from openr2.tasks.synthetic import TASKS


def _accuracy_table(accuracy: dict[str, dict]) -> list[str]:
    lines = ["| task | " + "difficulty | " + "held-out problems | greedy exact accuracy |",
             "|---|---|---|---|"]
    for name, r in accuracy.items():
        task, difficulty = name.split(":")
        knob = TASKS[task].knob if task in TASKS else "difficulty"
        lines.append(f"| {task} | {knob}={difficulty} | {r['n']} | {100 * r['accuracy']:.1f}% |")
    return lines


_SETTINGS = {"worded": "held-out wording", "system": "held-out wording after a held-out system prompt",
             "turn2": "held-out wording as the second turn (after another held-out exchange)"}


def _wordings_table(wordings: dict[str, dict]) -> list[str]:
    lines = ["| task | difficulty | asked as | held-out problems | greedy exact accuracy |", "|---|---|---|---|---|"]
    for name, r in wordings.items():
        task, difficulty, setting = name.split(":")
        knob = TASKS[task].knob if task in TASKS else "difficulty"
        lines.append(f"| {task} | {knob}={difficulty} | {_SETTINGS.get(setting, setting)} | {r['n']} | "
                     f"{100 * r['accuracy']:.1f}% |")
    return lines


def _example_prompts(tasks: str | None) -> list[str]:
    """Questions worth trying, in wordings the card's model was trained to take (the chat page lists them)."""
    names = {part.split(":")[0].strip() for part in (tasks or "").split(",")}
    examples = [("addition", "What is 347+589?"), ("addition", "add 512 and 199"),
                ("subtraction", "Subtract 199 from 512."), ("subtraction", "What's 804 - 367?"),
                ("multiplication", "What is 3*45?"),
                ("smalltalk", "Who are you?")]
    return [f"- `{text}`" for task, text in examples if task in names]


def write_model_card(path: str, config, train_config, summary: dict[str, Any], final_eval: dict | None,
                     command: str, run_dir: str) -> str:
    """Write path/README.md (and copy the run's loss/accuracy/expert-load PNGs beside it); return its path."""
    stats = model_stats(config)
    tc = train_config
    lines = [
        f"# {os.path.basename(os.path.normpath(path))}",
        "",
        "A small DeepSeek-V3-architecture reasoning model trained from scratch by openr2 on synthetic",
        "arithmetic and search tasks. It writes its working inside `<think>...</think>` and the bare answer",
        "after it. It knows nothing beyond these tasks: it is a demonstration that the whole pipeline (tokenizer,",
        "MLA + DeepSeekMoE training with auxiliary-loss-free balancing, the engine, the server) works end to end.",
        *(["It takes a question however it is worded, after a system prompt and in any turn of a conversation, "
           "and answers anything else with what it can do."] if tc.chat_variety and tc.tasks and "smalltalk" in tc.tasks
          else []),
        "",
        "## Model",
        "",
        f"- architecture: `{config.model_type}`, {config.num_hidden_layers} layers (first "
        f"{config.first_k_dense_replace} dense), hidden {config.hidden_size}, {config.num_attention_heads} heads",
        f"- MLA: kv_lora_rank {config.kv_lora_rank}, q_lora_rank {config.q_lora_rank}, "
        f"qk_nope/rope/v head dims {config.qk_nope_head_dim}/{config.qk_rope_head_dim}/{config.v_head_dim}",
        f"- MoE: {config.n_routed_experts} routed experts top-{config.num_experts_per_tok} + "
        f"{config.n_shared_experts} shared, {config.scoring_func} routing ({config.topk_method})",
        f"- parameters: {stats.total_params:,} total, {stats.active_params:,} active per token",
        *([f"- multi-token prediction: {config.num_nextn_predict_layers} MTP module(s) ({stats.mtp_params:,} "
           f"parameters, not in the totals above), trained with weight {tc.mtp_lambda:g}: a draft of the token "
           "after next for speculative decoding"] if config.num_nextn_predict_layers else []),
        f"- vocabulary: {config.vocab_size} byte-level BPE tokens (digits are single tokens) with DeepSeek's chat "
        "tokens",
        "",
        "## Training",
        "",
        f"- command: `{command}`",
        f"- mode: {tc.mode}; {summary.get('steps')} steps of {tc.batch_size} sequences (max {tc.seq_len} tokens), "
        f"AdamW lr {tc.lr:g} (warmup {tc.warmup_steps}, cosine to {tc.lr * tc.min_lr_ratio:g}), "
        f"weight decay {tc.weight_decay:g}, clip {tc.grad_clip:g}, bias-update gamma {tc.balance_gamma:g}, "
        f"sequence aux loss alpha {tc.aux_loss_alpha:g}",
        f"- data: {tc.num_examples:,} problems drawn from the train split of `{tc.tasks}` "
        "(task:difficulties:weight); loss on the assistant's tokens only"
        + (f"; {100 * tc.chat_variety:.0f}% of them asked as people ask (train-split question templates, system "
           "prompts, 0-2 earlier exchanges: openr2/tasks/wordings.py)" if tc.chat_variety else ""),
        "- held-out split: a sha256 hash of each canonical problem puts ~5% of all problems in the test split; "
        "the training stream never contains one (openr2/tasks/synthetic.py)",
        f"- wall time: {summary.get('wall_time_s', 0) / 60:.1f} minutes (training, periodic evaluation and "
        "the final evaluation) on the machine described below",
        f"- machine: {summary.get('machine', 'unknown')}",
        "",
    ]
    if final_eval and final_eval.get("accuracy"):
        lines += ["## Held-out accuracy", "",
                  "Greedy decoding through the openr2 engine on fresh test-split problems (distinct, never "
                  "trained on); a reply counts only if the text after `</think>` is exactly right "
                  "(countdown: any expression that reaches the target using the given numbers). Small "
                  "difficulties may have fewer distinct test-split problems than asked for; all of them are used.",
                  ""]
        lines += _accuracy_table(final_eval["accuracy"])
        if final_eval.get("wordings"):
            lines += ["", "The same held-out problems asked as people ask: in question templates that training never "
                      "used (`Subtract {b} from {a}.`, `{a} plus {b} = ?`, ... : a sha256 of each template puts ~20% "
                      "of them in a held-out split, openr2/tasks/wordings.py), also after a held-out system prompt "
                      "and as the second turn of a conversation:", ""]
            lines += _wordings_table(final_eval["wordings"])
        if "eval_loss" in final_eval:
            lines += ["", f"Held-out loss (assistant tokens): {final_eval['eval_loss']:.4f} nats/token."]
        lines.append("")
    plots = [n for n in ("loss.png", "accuracy.png", "expert_load.png") if os.path.isfile(os.path.join(run_dir, n))]
    if plots:
        lines += ["## Curves", ""]
        for name in plots:
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(path, name))
            lines.append(f"![{name[:-4]}]({name})")
        lines.append("")
    examples = _example_prompts(tc.tasks)
    if examples:
        lines += ["## Example prompts", ""] + examples + [""]
    lines += ["## Use", "", "```", "make run                                  # serves it (chat page + API)",
              f"openr2 chat --model {path}", "```", ""]
    card = os.path.join(path, "README.md")
    with open(card, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return card
