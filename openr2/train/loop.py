"""The training-loop skeleton that Trainer (pretraining, SFT) and GRPOTrainer (`openr2 rl`) share.

Owns what a run does around its steps: Ctrl-C (SIGINT) finishes the current step, then the run saves and
returns (a second Ctrl-C stops at once); each step's record goes to out_dir/log.jsonl (every `log_every`
steps and the last) and to the progress bar; every `eval_every` steps an evaluation (which writes
out_dir/eval.jsonl), every `save_every` steps a checkpoint; at the end an evaluation (not after Ctrl-C)
and a checkpoint, unless that step already had them. A resumed run first drops the log lines past its
checkpoint (`truncate_logs`). The steps, evaluations and checkpoints themselves are the subclass's.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

LOG_FILE = "log.jsonl"
EVAL_FILE = "eval.jsonl"


class TrainingLoop:
    """Subclasses set `config` (out_dir, steps, eval_every, save_every), `step`, `interrupted` and
    `history`, and implement train_step() -> record, evaluate() -> record or None, save() and
    progress(record) -> the progress bar's fields."""

    desc = "train"  # the progress bar's label
    evaluate_first = False  # evaluate before the first step (GRPO: the starting policy)
    on_step = None  # on_step(step, record) after each step

    @property
    def log_every(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        """The process that writes logs and shows progress (rank 0 under torchrun)."""
        return True

    def barrier(self) -> None:
        """Wait for the other processes (data parallelism); nothing for one process."""

    def stop_requested(self) -> bool:
        """Stop before the next step (every process must agree under data parallelism)."""
        return self.interrupted

    def report_eval(self, bar, record: dict | None) -> None:
        """Show an evaluation's record (the evaluation has already written it)."""

    def train_step(self) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self) -> dict | None:
        raise NotImplementedError

    def save(self):
        raise NotImplementedError

    def progress(self, record: dict) -> dict[str, str]:
        return {}

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.interrupted = True

    def train(self) -> list[dict]:
        """Run to config.steps (or until Ctrl-C); return the log records of this call."""
        from tqdm import tqdm

        cfg, main = self.config, self.is_main
        if main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        self.barrier()
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main_thread else None
        saved_at = evaluated_at = None
        try:
            if self.evaluate_first and self.step == 0:
                self.report_eval(None, self.evaluate())
            with open(os.path.join(cfg.out_dir, LOG_FILE) if main else os.devnull, "a", encoding="utf-8") as log, \
                    tqdm(total=cfg.steps, initial=self.step, desc=self.desc, dynamic_ncols=True,
                         disable=None if main else True) as bar:
                while self.step < cfg.steps and not self.stop_requested():
                    record = self.train_step()
                    self.history.append(record)
                    if self.step % self.log_every == 0 or self.step == cfg.steps:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    bar.update(1)
                    bar.set_postfix(**self.progress(record))
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self.report_eval(bar, self.evaluate())
                        evaluated_at = self.step
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                        saved_at = self.step
                    if self.on_step is not None:
                        self.on_step(self.step, record)
            if evaluated_at != self.step and not self.interrupted:
                self.report_eval(None, self.evaluate())
            if saved_at != self.step:
                self.save()
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        return self.history


def truncate_logs(out_dir: str, step: int) -> None:
    """Drop the log and eval lines past the resumed step (written by the killed run after its last
    checkpoint)."""
    for name in (LOG_FILE, EVAL_FILE):
        _truncate(os.path.join(out_dir, name), step)


def _truncate(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)
