"""`openr2 eval` end to end: the same 10 GSM8K items, greedy, through the local engine and through a live
`openr2 serve` (uvicorn on 127.0.0.1) give the same results item by item; bad input exits non-zero with a
clear message and keeps the results so far."""

from __future__ import annotations

import json

import pytest

from openr2.cli import main
from openr2.engine.sampling import generation_defaults
from openr2.server.app import ServerConfig
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import free_port, serve

pytestmark = pytest.mark.slow

# what must match between backends; cache hits (and so cost) depend on request order, not on the model
COMPARED = ("index", "seed", "reasoning", "content", "extracted", "correct", "finish_reason", "prompt_tokens",
            "completion_tokens", "reasoning_tokens")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_tiny_chat_checkpoint(ckpt)
    # defaults the eval does not send: both sides must apply them
    (ckpt / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.3, "top_k": 20}))
    config = ServerConfig(model_name="tiny", default_sampling=generation_defaults(str(ckpt)))
    with serve(ckpt, tmp_path_factory.mktemp("data"), config) as (base_url, server):
        yield ckpt, base_url + "/v1", server


def _eval(*args) -> int:
    return main(["eval", "--task", "gsm8k", "--temperature", "0", "--max-tokens", "24", "--no-progress", *args])


def _items(path):
    return json.loads(path.read_text())["items"]


def test_local_and_http_agree_item_by_item(live, tmp_path, capsys):
    ckpt, url, _ = live
    assert _eval("--model", str(ckpt), "--limit", "10", "--out", str(tmp_path / "local.json")) == 0
    assert _eval("--base-url", url, "--model-name", "tiny", "--limit", "10", "--concurrency", "4",
                 "--out", str(tmp_path / "http.json")) == 0
    assert "| gsm8k | tiny | 10 | 1 |" in capsys.readouterr().out
    local, http = _items(tmp_path / "local.json"), _items(tmp_path / "http.json")
    assert [it["id"] for it in local] == [it["id"] for it in http] == [f"gsm8k-{i}" for i in range(10)]
    for a, b in zip(local, http):
        assert [{k: s[k] for k in COMPARED} for s in a["samples"]] == [{k: s[k] for k in COMPARED} for s in b["samples"]]
        assert (a["num_correct"], a["maj_answer"]) == (b["num_correct"], b["maj_answer"])
    assert any(s["reasoning"] for it in local for s in it["samples"])  # real text was compared, not empty strings


def test_bad_input_exits_nonzero_with_a_clear_message(live, tmp_path, capsys):
    ckpt, url, server = live
    assert _eval("--task", "gsm9k", "--model", str(ckpt)) == 2
    assert "unknown task 'gsm9k'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q2", "answer": \n')
    assert _eval("--data", str(bad), "--model", str(ckpt)) == 2
    assert f"{bad}:3: invalid JSON" in capsys.readouterr().err

    out = tmp_path / "r.json"
    assert _eval("--base-url", url, "--model-name", "tiny", "--limit", "2", "--out", str(out)) == 0
    kept = _items(out)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert _eval("--base-url", dead, "--model-name", "tiny", "--limit", "4", "--retries", "0", "--out", str(out)) == 2
    assert "cannot reach the endpoint" in capsys.readouterr().err
    assert _items(out) == kept
    server.ledger.create_key("eval-test")  # from now on the server wants a key
    assert _eval("--base-url", url, "--model-name", "tiny", "--limit", "4", "--api-key", "sk-wrong",
                 "--out", str(out)) == 2
    assert "HTTP 401" in capsys.readouterr().err
    assert _items(out) == kept
