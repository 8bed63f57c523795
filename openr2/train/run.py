"""`openr2 train`: from a TrainConfig to a trained checkpoint — tokenizer, model, data, evaluation, plots.

The loop itself is trainer.py; this module assembles its inputs:
- the tokenizer: `tokenizer` (a directory), else init_from's, else a byte-level BPE trained here on the
  data (saved as out_dir/tokenizer); a resumed run always reuses the checkpoint's tokenizer;
- the model: fresh weights of a preset or config.json (`model`), or the weights of `init_from`;
- the data: `tasks` (synthetic problems of the train split, mixture.py) and `data` files: .txt (documents
  separated by blank lines), .jsonl with "text" (pretraining), "messages" (chats) or GSM8K
  "question"/"answer" records; pretraining packs text, SFT trains on assistant tokens only;
- the evaluator (rank 0): held-out loss on test-split problems and greedy task accuracy through the engine.
At the end rank 0 writes loss/accuracy/expert-load PNG plots (plots.py) and, with `export`, a servable
model directory (weights, tokenizer, generation_config.json).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import torch

from openr2.train import distributed
from openr2.train.config import TrainConfig, read_config_file
from openr2.train.trainer import Trainer

DEMO_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "assets", "openr2-demo"))

RECIPES: dict[str, dict[str, Any]] = {
    # The bundled demo model (openr2/assets/openr2-demo): ~1.1M active of ~2.7M parameters and one MTP module,
    # SFT from scratch on the synthetic reasoning tasks and small talk (one epoch of 128k problems, 60% of them
    # asked as people ask: other wordings, system prompts, earlier turns); about an hour on 2 CPU cores.
    "demo": {
        "mode": "sft", "model": "demo", "vocab_size": 512, "seq_len": 256, "batch_size": 32, "steps": 4000,
        "lr": 3e-3, "warmup_steps": 100, "min_lr_ratio": 0.05, "weight_decay": 0.1, "grad_clip": 1.0,
        "tasks": "addition:1-5:3,subtraction:1-5:3,multiplication:1-3:2,modular:1-2:1,countdown:2-4:1,"
                 "smalltalk:1:0.3",
        "num_examples": 128_000, "chat_variety": 0.6, "eval_every": 1000,
        "eval_tasks": "addition:1-5,subtraction:1-5,multiplication:1-3,modular:1-2,countdown:2-4,smalltalk:1",
        "eval_wordings": "addition:3,subtraction:3", "eval_samples": 50, "final_eval_samples": 500,
        "save_every": 500, "out_dir": "runs/demo", "deterministic": False, "mtp_lambda": 0.3, "log_every": 10,
    },
    # A small DeepSeek-V4 (presets.v4_demo: sliding / CSA / HCA / CSA layers, 2 hyper-connection streams, hash
    # routing, MTP) from scratch on the synthetic tasks plus passkey retrieval in up to ~7K characters of
    # filler (~3.5K tokens with the demo tokenizer) in 4K-token windows; its CSA indexers learn by their KL
    # (train/csa.py). A step costs ~6.7 s of CPU time (BENCHMARKS.md): ~2 CPU-hours. Needle accuracy at
    # 32K..1M (`openr2 eval --task needle:LENGTH`) is what it is for.
    "v4-demo": {
        "mode": "sft", "model": "v4-demo", "vocab_size": 512, "seq_len": 4096, "batch_size": 1, "steps": 1000,
        "lr": 2e-3, "warmup_steps": 50, "min_lr_ratio": 0.05, "weight_decay": 0.1, "grad_clip": 1.0,
        "tasks": "addition:1-5:2,subtraction:1-5:1,multiplication:1-3:1,needle:200-7000:3",
        "num_examples": 20_000, "eval_every": 250,
        "eval_tasks": "addition:1-5,needle:2000,needle:7000", "eval_samples": 20, "final_eval_samples": 100,
        "save_every": 250, "out_dir": "runs/v4-demo", "deterministic": False, "mtp_lambda": 0.3, "log_every": 10,
    },
    # The start of the GRPO demonstration (bench/rl.py, BENCHMARKS.md): the demo model fine-tuned on sums of
    # 3-6 two-digit terms, added in a random order, stopped while 4 terms are far from saturated (held-out
    # greedy ~60-65%, maj@8 ~71-76%, pass@8 ~94-97% at temperature 0.7); ~4.5 minutes on 2 CPU cores.
    "rl-start": {
        "mode": "sft", "init_from": DEMO_DIR,
        "tasks": "sum:3-6", "num_examples": 40_000,
        "seq_len": 256, "batch_size": 32, "steps": 700, "lr": 1e-3, "warmup_steps": 20, "save_every": 100,
        "eval_tasks": "sum:3-6", "eval_samples": 100, "out_dir": "runs/rl-start",
    },
    # rl-start that can also judge: the same sums mixed 1:1 with checking a proposed total (`judge`, the
    # prompt the self-judge reward sends), so `--rewards judge` has a judge to ask (bench/rl.py self-judge).
    "rl-start-judge": {
        "mode": "sft", "init_from": DEMO_DIR,
        "tasks": "sum:3-6:1,judge:3-6:1", "num_examples": 60_000,
        "seq_len": 256, "batch_size": 32, "steps": 1400, "lr": 1e-3, "warmup_steps": 20, "save_every": 200,
        "eval_tasks": "sum:3-6,judge:3-6", "eval_samples": 100, "out_dir": "runs/rl-start-judge",
    },
}


def config_from(preset: str | None = None, config_file: str | None = None, **flags: Any) -> TrainConfig:
    """Defaults < the recipe `preset` < the config file < command-line flags; validated before any work."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in RECIPES:
            raise ValueError(f"train: unknown preset {preset!r}; known: {', '.join(RECIPES)}")
        values.update(RECIPES[preset])
    if config_file is not None:
        values.update(read_config_file(config_file))
    try:
        cfg = TrainConfig.from_dict({**values, **flags})
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}" if config_file else str(e)) from e
    check_inputs(cfg)
    return cfg


def check_inputs(cfg: TrainConfig) -> None:
    """What the config names must exist and parse: task mixtures, data files, the model, init_from."""
    from openr2.presets import PRESETS
    from openr2.train.mixture import parse_mixture

    for key in ("tasks", "eval_tasks", "eval_wordings"):
        if getattr(cfg, key):
            try:
                parse_mixture(getattr(cfg, key))
            except ValueError as e:
                raise ValueError(f"train config: {key}: {e}") from None
    for path in cfg.data:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"train config: data: {path}: no such file")
    if not cfg.init_from and cfg.model not in PRESETS and not os.path.exists(cfg.model):
        raise ValueError(f"train config: model={cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a path")
    for key in ("init_from", "tokenizer"):
        if getattr(cfg, key) and not os.path.isdir(getattr(cfg, key)):
            raise FileNotFoundError(f"train config: {key}: {getattr(cfg, key)}: no such directory")
    if not cfg.tasks and not cfg.data:
        raise ValueError("train config: no data: give tasks and/or data files")


# ---------------------------------------------------------------------------------------------- pieces

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_tokenizer(cfg: TrainConfig, dist: distributed.Dist):
    from openr2.tokenizer import Tokenizer, train_bpe

    if cfg.resume:
        from openr2.train.checkpoint import resolve_checkpoint

        return Tokenizer.from_pretrained(resolve_checkpoint(cfg.resume))
    if cfg.tokenizer:
        return Tokenizer.from_pretrained(cfg.tokenizer)
    if cfg.init_from and os.path.isfile(os.path.join(cfg.init_from, "tokenizer.json")):
        return Tokenizer.from_pretrained(cfg.init_from)
    path = os.path.join(cfg.out_dir, "tokenizer")
    if dist.is_main:
        tokenizer = train_bpe(tokenizer_corpus(cfg), vocab_size=cfg.vocab_size)
        tokenizer.save_pretrained(path)
    distributed.barrier(dist)
    return Tokenizer.from_pretrained(path)


def tokenizer_corpus(cfg: TrainConfig, max_task_texts: int = 20_000) -> list[str]:
    """Text to train a tokenizer on: the data files' text and a sample of the task problems."""
    from openr2.tasks.wordings import SYSTEM_PROMPTS, reword
    from openr2.train.data import to_text
    from openr2.train.mixture import mixture_problems, parse_mixture

    texts = [t for path in cfg.data for t in _file_texts(path)]
    if cfg.tasks:
        n = min(cfg.num_examples, max_task_texts)
        problems = list(mixture_problems(parse_mixture(cfg.tasks), n, cfg.seed + 1))
        texts += [to_text(p) + "\n" + p.answer for p in problems]
        if cfg.chat_variety:  # the words people ask with get tokens of their own too
            rng = random.Random(cfg.seed)
            texts += [reword(p, rng).prompt for p in problems] + SYSTEM_PROMPTS
    if not texts:
        raise ValueError("train: no data: give tasks and/or data files")
    return texts


def _file_texts(path: str) -> list[str]:
    """Plain text of a data file, whatever its kind (for the tokenizer and pretraining)."""
    from openr2.chat_format import render_chat
    from openr2.train.data import read_jsonl, read_text

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    if not path.endswith(".jsonl"):
        return read_text(path)
    out = []
    for i, rec in enumerate(read_jsonl(path), 1):
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            out.append(rec["text"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            out.append(render_chat(rec["messages"], add_generation_prompt=False))
        elif isinstance(rec, dict) and "question" in rec and "answer" in rec:
            out.append(f"{rec['question']}\n{rec['answer']}")
        else:
            raise ValueError(f"{path}: record {i}: expected a 'text', 'messages' or GSM8K 'question'/'answer' field")
    return out


def _file_sft_examples(path: str, tokenizer) -> list[tuple[list[int], list[int]]]:
    from openr2.chat_format import encode_chat_for_training
    from openr2.train.data import read_gsm8k, read_jsonl, sft_example

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    if not path.endswith(".jsonl"):
        raise ValueError(f"{path}: SFT data must be .jsonl with 'messages' or GSM8K 'question'/'answer' records")
    first = next(iter(read_jsonl(path)), None)
    if isinstance(first, dict) and "question" in first:
        return [sft_example(p, tokenizer) for p in read_gsm8k(path)]
    out = []
    for i, rec in enumerate(read_jsonl(path), 1):
        if not (isinstance(rec, dict) and isinstance(rec.get("messages"), list)):
            raise ValueError(f"{path}: record {i}: expected a 'messages' list (or GSM8K records)")
        try:
            out.append(encode_chat_for_training(rec["messages"], tokenizer))
        except ValueError as e:
            raise ValueError(f"{path}: record {i}: {e}") from e
    return out


def build_dataset(cfg: TrainConfig, tokenizer):
    from openr2.train.data import PackedLMDataset, SFTDataset, to_text
    from openr2.train.mixture import mixture_examples, mixture_problems, parse_mixture

    items = parse_mixture(cfg.tasks) if cfg.tasks else []
    if cfg.mode == "pretrain":
        texts = [t for path in cfg.data for t in _file_texts(path)]
        texts += [to_text(p) for p in mixture_problems(items, cfg.num_examples, cfg.seed)] if items else []
        if not texts:
            raise ValueError("train: no data: give tasks and/or data files")
        return PackedLMDataset.from_texts(texts, tokenizer, cfg.batch_size, cfg.seq_len, shuffle=True, seed=cfg.seed)
    examples = [e for path in cfg.data for e in _file_sft_examples(path, tokenizer)]
    examples += mixture_examples(items, cfg.num_examples, tokenizer, cfg.seed, cfg.chat_variety) if items else []
    if not examples:
        raise ValueError("train: no data: give tasks and/or data files")
    # pipeline stages exchange fixed shapes: every batch padded to seq_len
    return SFTDataset(examples, cfg.batch_size, cfg.seq_len, tokenizer.pad_token_id, seed=cfg.seed,
                      pad_to_max=cfg.pipeline_parallel > 1)


def build_model(cfg: TrainConfig, tokenizer, device: torch.device):
    import dataclasses

    from openr2.checkpoints import load_model
    from openr2.config import ModelConfig
    from openr2.model.transformer import build_model as fresh
    from openr2.presets import PRESETS, get_preset

    if cfg.init_from:
        model = load_model(cfg.init_from, device=device)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{cfg.init_from}: vocab_size {model.config.vocab_size} < the tokenizer's "
                             f"{tokenizer.vocab_size}")
        return model
    if cfg.model in PRESETS:
        config = get_preset(cfg.model)
    elif os.path.exists(cfg.model):
        config = ModelConfig.from_pretrained(cfg.model)
    else:
        raise ValueError(f"train: model={cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a path")
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, quantization_config=None,
                                 torch_dtype="float32")
    config.validate()
    return fresh(config, device=device, seed=cfg.seed)


def make_evaluator(cfg: TrainConfig, tokenizer, final_step: int):
    """Held-out loss (test-split problems of the training tasks) and greedy accuracy on eval_tasks."""
    from openr2.tasks.synthetic import held_out_problems
    from openr2.train.data import SFTDataset, sft_example
    from openr2.train.evaluate import held_out_loss, task_accuracy
    from openr2.train.mixture import parse_mixture

    eval_items = parse_mixture(cfg.eval_tasks) if cfg.eval_tasks else []
    wording_items = parse_mixture(cfg.eval_wordings) if cfg.eval_wordings else []
    loss_batches = None
    if cfg.tasks and cfg.mode == "sft":
        problems = [p for it in parse_mixture(cfg.tasks) for p in held_out_problems(it.task, it.difficulty, 16,
                                                                                      seed=cfg.seed + 7)]
        if problems:
            ds = SFTDataset([sft_example(p, tokenizer) for p in problems], min(32, len(problems)), cfg.seq_len,
                            tokenizer.pad_token_id, shuffle=False, epochs=1, drop_last=False)
            loss_batches = list(ds)
    if not eval_items and not wording_items and loss_batches is None:
        return None

    def evaluate(model, step: int) -> dict:
        record: dict[str, Any] = {}
        if loss_batches is not None:
            record["eval_loss"] = held_out_loss(model, loss_batches)
        n = cfg.eval_samples
        if step == final_step and cfg.final_eval_samples:
            n = cfg.final_eval_samples
        accuracy = {}
        for it in eval_items:
            result = task_accuracy(model, tokenizer, it.task, it.difficulty, n, seed=cfg.seed,
                                   max_tokens=cfg.eval_max_tokens)
            accuracy[f"{it.task}:{it.difficulty}"] = {"accuracy": result.accuracy, "n": result.total}
        if accuracy:
            record["accuracy"] = accuracy
        wordings = {}
        for it in wording_items:
            for setting in ("worded", "system", "turn2"):
                result = task_accuracy(model, tokenizer, it.task, it.difficulty, n, seed=cfg.seed,
                                       max_tokens=cfg.eval_max_tokens, setting=setting)
                wordings[f"{it.task}:{it.difficulty}:{setting}"] = {"accuracy": result.accuracy, "n": result.total}
        if wordings:
            record["wordings"] = wordings
        return record

    return evaluate


# ---------------------------------------------------------------------------------------------- run

def machine_description() -> str:
    import platform

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} vCPUs ({cpu}), {threads} torch threads, torch {torch.__version__}"


def train(cfg: TrainConfig, export: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Train as configured (one process or one rank of torchrun); returns a summary (rank 0's is complete)."""
    dist = distributed.init(resolve_device(cfg.device))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    tokenizer = build_tokenizer(cfg, dist)
    dataset = build_dataset(cfg, tokenizer)
    model = build_model(cfg, tokenizer, device)
    trainer_class = Trainer
    if cfg.sparse_attention == "dsa":  # V3 -> V3.2: indexers, then the warm-up and sparse stages (dsa.py)
        from openr2.train.dsa import DSATrainer, convert_to_dsa

        model = convert_to_dsa(model, cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim, seed=cfg.seed)
        trainer_class = DSATrainer
    elif model.config.is_v4 and "compressed_sparse_attention" in model.config.layer_types:
        from openr2.train.csa import CSATrainer

        trainer_class = CSATrainer  # the CSA indexers learn by their KL beside the LM loss
    if cfg.pipeline_parallel > 1:  # stages over ranks (pipeline_trainer.py; it refuses V3.2's indexers)
        from openr2.train.pipeline_trainer import PipelineTrainer

        trainer_class = PipelineTrainer
    trainer = trainer_class(model, dataset, cfg, tokenizer, evaluator=make_evaluator(cfg, tokenizer, cfg.steps))
    history = trainer.train()
    wall = time.time() - start
    summary: dict[str, Any] = {"steps": trainer.step, "wall_time_s": round(wall, 1), "interrupted": trainer.interrupted,
                               "machine": machine_description()}
    if history:
        summary["final_loss"] = history[-1]["loss"]
    if dist.is_main:
        from openr2.train.plots import plot_run

        summary["plots"] = plot_run(cfg.out_dir)
        if export and not trainer.interrupted:
            from openr2.train.model_card import write_model_card

            final = trainer.full_model()
            export_model(final, tokenizer, export)
            write_model_card(export, final.config, cfg, summary, trainer.evals[-1] if trainer.evals else None,
                             command or "openr2 train", cfg.out_dir)
            summary["export"] = export
        with open(os.path.join(cfg.out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    elif export and not trainer.interrupted:
        trainer.full_model()  # the collective gather needs every rank
    distributed.shutdown(dist)
    return summary


def export_model(model, tokenizer, path: str) -> None:
    """A servable directory: HF-layout weights, tokenizer, generation_config.json."""
    from openr2.checkpoints import save_model

    save_model(model, path)
    tokenizer.save_pretrained(path)
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "do_sample": False, "max_new_tokens": 512}
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
