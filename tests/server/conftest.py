"""The live server most server test modules share: one per module, over the tiny chat checkpoint (modules that
need another ServerConfig define their own `live` with tests.server._live.serve_tiny)."""

import pytest

from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import serve_tiny


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(base_url, Server) of a running server; stopped after the module."""
    with serve_tiny(tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny chat checkpoint on disk (for modules that start `openr2 serve` themselves or an upstream)."""
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_chat_checkpoint(path)
    return path
