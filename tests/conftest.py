"""Suite-wide setup: compiled steps are cached in a temporary directory, never in the user's ~/.cache; a
throw-away PostgreSQL cluster for the tests that need one (pg_url)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _compile_cache_dir(tmp_path_factory):
    os.environ["OPENR2_CACHE_DIR"] = str(tmp_path_factory.mktemp("openr2-cache"))


@pytest.fixture(scope="session")
def pg_cluster():
    """A throw-away PostgreSQL cluster for the session (tests/pg_cluster.py); skipped, saying why, only where
    PostgreSQL or psycopg is not installed."""
    from tests.pg_cluster import Cluster, find_bin_dir

    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'psycopg[binary]')")
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL not found (no initdb on PATH nor in /usr/lib/postgresql/*/bin): "
                    "apt-get install postgresql, as .ci/run does")
    cluster = Cluster(bin_dir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster, request):
    """The URL of a new, empty database in the session's cluster (one per test: no state leaks between tests)."""
    import secrets

    return pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
