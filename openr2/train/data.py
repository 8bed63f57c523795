"""Training data: problems as chats and text, corpora readers, LM packing and SFT batches.

Turns synthetic problems (openr2/tasks) into SFT examples and running text; reads JSONL / text /
GSM8K files; `PackedLMDataset` (pretraining windows) and `SFTDataset` (padded, shifted, masked batches)
are deterministic and resumable from `state_dict()`. It does not own the chat format (chat_format.py),
the tasks (openr2/tasks) nor the training loop (trainer.py).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from openr2.tasks.jsonl import jsonl_records
from openr2.tasks.synthetic import Problem, to_messages

if TYPE_CHECKING:
    import torch

    from openr2.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value that torch's cross_entropy skips


# ---------------------------------------------------------------------------------------------- chat / text

def sft_example(problem: Problem, tokenizer: Tokenizer, system: str | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of the problem's chat, mask 1 on the assistant's completion only."""
    from openr2.chat_format import encode_chat_for_training

    return encode_chat_for_training(to_messages(problem, system), tokenizer)


def to_text(problem: Problem) -> str:
    """Plain running text for a pretraining corpus (no chat markers): question, working, answer."""
    return f"{problem.prompt}\n{problem.reasoning}\nThe answer is {problem.answer}."


def read_jsonl(path: str | os.PathLike, field: str | None = None) -> Iterator[Any]:
    """Records of a JSONL file (blank lines skipped), or the `field` of each; errors name path and line."""
    for lineno, record in jsonl_records(path):
        if field is None:
            yield record
        elif not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{lineno}: no field {field!r}")
        else:
            yield record[field]


_CALC = re.compile(r"<<[^>]*>>")


def read_gsm8k(path: str | os.PathLike) -> list[Problem]:
    """GSM8K-format records {"question", "answer": "working\\n#### 72"} as problems; the `<<48/2=24>>`
    calculator annotations are dropped and the final answer loses its thousands commas."""
    out = []
    for i, rec in enumerate(read_jsonl(path)):
        if not isinstance(rec, dict) or "question" not in rec or "####" not in rec.get("answer", ""):
            raise ValueError(f"{path}: record {i + 1}: expected 'question' and an 'answer' with '####'")
        working, final = rec["answer"].rsplit("####", 1)
        q = rec["question"].strip()
        out.append(Problem("gsm8k", 0, q, _CALC.sub("", working).strip(), final.strip().replace(",", ""),
                           "gsm8k:" + q))
    return out


def read_text(path: str | os.PathLike, sep: str | None = "\n\n") -> list[str]:
    """Documents of a text file split on `sep` (blank lines by default; None: the whole file), non-empty."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = [text] if sep is None else text.split(sep)
    return [d.strip("\n") for d in docs if d.strip()]


# ---------------------------------------------------------------------------------------------- batching

class _Resumable:
    """Shared by the two datasets: epochs of `batches_per_epoch` batches over items in a seeded per-epoch
    order (or as given); the position is (epoch, index of the next batch), all that a resume needs."""
    batch_size: int
    batches_per_epoch: int
    shuffle: bool
    seed: int
    epoch: int = 0
    index: int = 0

    def _next_items(self, num_items: int) -> list[int]:
        order = list(range(num_items))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        items = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return items

    def __iter__(self):
        return self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class PackedLMDataset(_Resumable):
    """Pretraining batches [B, T+1] cut from one token stream (documents each followed by EOS).

    Window k is stream[k*T : k*T+T+1] (consecutive windows share one token, so every token is a target
    once); batch i holds windows i*B..i*B+B-1 in order (or a seeded per-epoch permutation with
    shuffle=True); the remainder of an epoch is dropped and iteration wraps forever. Inputs are
    batch[:, :-1], targets batch[:, 1:]. `state_dict()` is {"epoch", "index"} (the next batch).
    """

    def __init__(self, documents: Iterable[Sequence[int]], batch_size: int, seq_len: int, eos_id: int,
                 bos_id: int | None = None, shuffle: bool = False, seed: int = 0):
        stream: list[int] = []
        for doc in documents:
            stream += ([bos_id] if bos_id is not None else []) + list(doc) + [eos_id]
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.shuffle, self.seed = shuffle, seed
        self.num_windows = (len(stream) - 1) // seq_len if seq_len > 0 else 0
        self.batches_per_epoch = self.num_windows // batch_size if batch_size > 0 else 0
        if self.batches_per_epoch < 1:
            raise ValueError(f"PackedLMDataset: {len(stream)} tokens cannot fill one batch of "
                             f"{batch_size} x {seq_len}+1")

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer: Tokenizer, batch_size: int, seq_len: int, **kw: Any
                   ) -> PackedLMDataset:
        return cls((tokenizer.encode(t) for t in texts), batch_size, seq_len, tokenizer.eos_token_id, **kw)

    def __next__(self) -> torch.Tensor:
        import torch

        T = self.seq_len
        return torch.tensor([self.stream[k * T:k * T + T + 1] for k in self._next_items(self.num_windows)],
                            dtype=torch.long)


class SFTDataset(_Resumable):
    """SFT batches (input_ids [B, L], labels [B, L]) from (ids, loss_mask) examples, L <= max_len.

    labels[t] = ids[t+1] where loss_mask[t+1] is 1, else -100 (also on padding); inputs are right-padded
    with pad_id to the longest example of the batch (or max_len with pad_to_max). Examples longer than
    max_len+1 tokens are dropped, not truncated (a cut answer would teach the model to stop mid-way);
    `num_dropped` counts them. Order: a seeded shuffle per epoch (shuffle=False: as given); `epochs=None`
    repeats forever. `state_dict()` is {"epoch", "index"} (the next batch).
    """

    def __init__(self, examples: Iterable[tuple[Sequence[int], Sequence[int]]], batch_size: int, max_len: int,
                 pad_id: int, seed: int = 0, shuffle: bool = True, epochs: int | None = None,
                 drop_last: bool = True, pad_to_max: bool = False):
        self.examples, self.num_dropped = [], 0
        for ids, mask in examples:
            if len(ids) != len(mask):
                raise ValueError(f"SFT example {len(self.examples) + self.num_dropped}: ids and loss_mask "
                                 f"differ in length ({len(ids)} vs {len(mask)})")
            if 2 <= len(ids) <= max_len + 1:
                self.examples.append((list(ids), list(mask)))
            else:
                self.num_dropped += 1
        self.batch_size, self.max_len, self.pad_id = batch_size, max_len, pad_id
        self.seed, self.shuffle, self.epochs, self.pad_to_max = seed, shuffle, epochs, pad_to_max
        n = len(self.examples)
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"SFTDataset: {n} usable examples ({self.num_dropped} longer than "
                             f"max_len={max_len} dropped) cannot fill one batch of {batch_size}")

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        rows = [self.examples[k] for k in self._next_items(len(self.examples))]
        L = self.max_len if self.pad_to_max else max(len(ids) - 1 for ids, _ in rows)
        inputs = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            inputs[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            labels[r, :len(ids) - 1] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])])
        return inputs, labels


def sft_batches(examples: Iterable[tuple[Sequence[int], Sequence[int]]], batch_size: int, max_len: int,
                pad_id: int, **kw: Any) -> SFTDataset:
    """Shorthand for SFTDataset(examples, batch_size, max_len, pad_id, **kw)."""
    return SFTDataset(examples, batch_size, max_len, pad_id, **kw)
