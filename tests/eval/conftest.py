"""tests/eval read the bundled excerpts in tests/data/eval, never a checkout outside the repository."""

from pathlib import Path

import pytest

EXCERPTS = Path(__file__).resolve().parents[1] / "data" / "eval"


@pytest.fixture(autouse=True)
def _eval_data(monkeypatch):
    monkeypatch.setenv("OPENR2_EVAL_DATA", str(EXCERPTS))
