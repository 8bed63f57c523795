"""Suite-wide setup: compiled steps are cached in a temporary directory, never in the user's ~/.cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _compile_cache_dir(tmp_path_factory):
    os.environ["OPENR2_CACHE_DIR"] = str(tmp_path_factory.mktemp("openr2-cache"))
