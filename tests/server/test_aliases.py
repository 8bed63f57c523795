"""DeepSeek's base URLs (no /v1, /beta) and fill-in-the-middle, through HTTP with the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest
from tokenizers import AddedToken

from openr2.server.aliases import canonical_path
from openr2.server.app import ServerConfig
from openr2.tokenizer import BOS, FIM_BEGIN, FIM_END, FIM_HOLE, train_bpe
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import serve
from tests.tokenizer_utils import corpus


def _client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, _strict_response_validation=True)


@pytest.fixture(scope="module")
def fim_live(tmp_path_factory):
    """A server over the tiny model whose tokenizer has DeepSeek's FIM tokens."""
    tok = train_bpe(corpus(), vocab_size=512)
    tok.backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)])
    ckpt = tmp_path_factory.mktemp("fim-ckpt")
    save_tiny_chat_checkpoint(ckpt, tok)
    with serve(ckpt, tmp_path_factory.mktemp("fim-data"), ServerConfig(model_name="tiny", default_max_tokens=8)) as s:
        yield s


def test_canonical_paths():
    assert canonical_path("/beta/completions") == "/v1/completions"
    assert canonical_path("/anthropic/v1/messages") == "/v1/messages"
    assert canonical_path("/chat/completions") == "/v1/chat/completions"
    assert canonical_path("/models/deepseek-ai/DeepSeek-R1") == "/v1/models/deepseek-ai/DeepSeek-R1"
    assert canonical_path("/user/balance") == "/v1/user/balance"
    for path in ("/", "/health", "/metrics", "/openapi.json", "/v1/models", "/chatter", "/betas/x"):
        assert canonical_path(path) == path


def test_a_base_url_without_v1_reaches_the_same_routes(live):
    base_url, _ = live
    client = _client(base_url)  # DeepSeek's style: http://host:port, no /v1
    assert client.models.list().data[0].id == "tiny"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.usage.completion_tokens <= 2
    assert client.completions.create(model="tiny", prompt="The answer is", max_tokens=2).choices[0].text is not None
    beta = _client(base_url + "/beta")
    assert beta.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2).id
    assert httpx.get(base_url + "/").headers["content-type"].startswith("text/html")  # the chat page stays
    r = httpx.get(base_url + "/chatter")
    assert r.status_code == 404 and "/chatter" in r.json()["error"]["message"]


def test_fim_on_a_model_without_fim_tokens_is_a_clear_400(live):
    base_url, _ = live
    with pytest.raises(openai.BadRequestError) as err:
        _client(base_url + "/beta").completions.create(model="tiny", prompt="def f(", suffix="):", max_tokens=2)
    assert err.value.body["param"] == "suffix" and "FIM" in err.value.message


def test_fim_through_beta_completions_is_the_models_fim_prompt(fim_live):
    base_url, server = fim_live
    beta = _client(base_url + "/beta")
    prefix, suffix = "What is 2+", " The answer is 4."
    fim = beta.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=6, temperature=0)
    rendered = BOS + FIM_BEGIN + prefix + FIM_HOLE + suffix + FIM_END
    plain = _client(base_url + "/v1").completions.create(model="tiny", prompt=rendered, max_tokens=6, temperature=0)
    assert fim.choices[0].text == plain.choices[0].text  # the same prompt ids, so the same greedy middle
    assert fim.usage.prompt_tokens == plain.usage.prompt_tokens == len(server.tokenizer.encode(rendered))
    assert fim.object == "text_completion" and fim.choices[0].finish_reason in ("stop", "length")
    # lenient for the stream: the client's Completion type has no null finish_reason for the chunks before the
    # last, which OpenAI's own stream sends too
    lenient = openai.OpenAI(base_url=base_url + "/beta", api_key="unused", max_retries=0)
    chunks = list(lenient.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=6,
                                             temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == fim.choices[0].text
    for bad, param in (({"prompt": [1, 2, 3]}, "suffix"), ({"echo": True}, "echo")):
        with pytest.raises(openai.BadRequestError) as err:
            beta.completions.create(model="tiny", **{"prompt": prefix, "suffix": suffix, "max_tokens": 2, **bad})
        assert err.value.body["param"] == param
