"""Owner-only modes (server/private_files.py): whatever the umask, the data dir is 0700 and every file the
server writes in it 0600, an existing looser data dir is tightened, a shared one is left alone."""

from __future__ import annotations

import logging
import os
import stat

import httpx
import pytest

from openr2.server.app import ServerConfig
from openr2.server.private_files import private_dir
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import serve
from tests.server.test_app import _batch_file, _client, _wait_for_batch


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o002)  # the laxest common umask: new files 0664, dirs 0775
    yield
    os.umask(old)


def test_data_dir_and_everything_in_it_are_owner_only(tmp_path, loose_umask):
    ckpt = tmp_path / "ckpt"
    save_tiny_chat_checkpoint(ckpt)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # as an older version left it
    with serve(ckpt, data, ServerConfig(model_name="tiny", default_max_tokens=2)) as (base_url, _):
        client = _client(base_url)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        upload = client.files.create(file=("batch.jsonl", _batch_file(2, max_tokens=1)), purpose="batch")
        batch = _wait_for_batch(client, client.batches.create(input_file_id=upload.id,
                                                              endpoint="/v1/chat/completions",
                                                              completion_window="24h").id)
        assert batch.status == "completed"
        written = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
        assert {"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", f"files/{upload.id}",
                f"files/{batch.output_file_id}"} <= set(written)
        assert {name: _mode(data / name) for name in written} == {name: 0o600 for name in written}
        assert _mode(data) == _mode(data / "files") == 0o700
        assert httpx.get(base_url + "/v1/models").status_code == 200


def test_a_shared_directory_is_left_alone_with_a_warning(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: chmod-ing it would lock other users out
    with caplog.at_level(logging.WARNING, logger="openr2.server"):
        private_dir(shared)
    assert _mode(shared) == 0o1777
    assert "open to other users" in caplog.text
    private_dir(shared / "own")
    assert _mode(shared / "own") == 0o700
