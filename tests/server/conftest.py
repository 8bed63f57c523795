"""The live server most server test modules share: one per module, over the tiny chat checkpoint (modules that
need another ServerConfig define their own `live` with tests.server._live.serve_tiny)."""

import pytest

from tests.server._live import serve_tiny


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(base_url, Server) of a running server; stopped after the module."""
    with serve_tiny(tmp_path_factory) as running:
        yield running
