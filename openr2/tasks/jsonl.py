"""JSONL files of tasks and benchmarks: records with their line numbers, errors naming file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; bad JSON names file:line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
