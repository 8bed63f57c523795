"""Thinking control (`thinking`, `reasoning_effort`) and DeepSeek's model names, through HTTP with the openai client.

The tiny model's template is the built-in format's twin, which has both modes: thinking ends the prompt with
`<｜Assistant｜><think>\\n`, non-thinking with `<｜Assistant｜>`, so the prompt's token count tells them apart.
An R1 template (always thinking) shows what happens where a mode is missing.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from openr2.server.app import ServerConfig, parse_model_aliases
from openr2.tokenizer import train_bpe
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import serve
from tests.tokenizer_utils import corpus

R1_TEMPLATE = (Path(__file__).parents[1] / "data" / "deepseek_r1_chat_template.jinja").read_text(encoding="utf-8")
HI = [{"role": "user", "content": "What is 2+2?"}]


def _client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, _strict_response_validation=True)


def _prompt_tokens(client, model="tiny", **extra) -> int:
    return client.chat.completions.create(model=model, messages=HI, max_tokens=1, **extra).usage.prompt_tokens


@pytest.fixture(scope="module")
def r1_live(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("r1-ckpt")
    save_tiny_chat_checkpoint(ckpt, train_bpe(corpus(), vocab_size=512, chat_template=R1_TEMPLATE))
    with serve(ckpt, tmp_path_factory.mktemp("r1-data"), ServerConfig(model_name="r1", default_max_tokens=4)) as s:
        yield s


def test_thinking_and_reasoning_effort_switch_the_template(live):
    client = _client(live[0])
    thinking = _prompt_tokens(client)  # the built-in format thinks by default
    assert _prompt_tokens(client, extra_body={"thinking": {"type": "enabled"}}) == thinking
    off = _prompt_tokens(client, extra_body={"thinking": {"type": "disabled"}})
    assert off == thinking - 2  # no `<think>` `\n`
    assert _prompt_tokens(client, reasoning_effort="none") == off
    assert _prompt_tokens(client, reasoning_effort="high") == thinking
    assert _prompt_tokens(client, reasoning_effort="none", extra_body={"thinking": {"type": "enabled"}}) == thinking
    answer = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, temperature=0,
                                            extra_body={"thinking": {"type": "disabled"}})
    assert answer.choices[0].message.reasoning_content is None  # not thinking: nothing is reasoning
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HI, reasoning_effort="extreme")
    assert err.value.body["param"] == "reasoning_effort"


def test_deepseek_model_names_are_the_served_model_in_their_mode(live):
    client = _client(live[0])
    assert [m.id for m in client.models.list().data] == ["tiny", "deepseek-chat", "deepseek-reasoner"]
    assert client.models.retrieve("deepseek-chat").model_extra["root"] == "tiny"
    thinking, off = _prompt_tokens(client), _prompt_tokens(client, reasoning_effort="none")
    chat = client.chat.completions.create(model="deepseek-chat", messages=HI, max_tokens=1)
    assert chat.model == "deepseek-chat" and chat.usage.prompt_tokens == off
    assert _prompt_tokens(client, "deepseek-reasoner") == thinking
    assert _prompt_tokens(client, "deepseek-chat", extra_body={"thinking": {"type": "enabled"}}) == thinking
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="deepseek-coder", messages=HI, max_tokens=1)


def test_a_template_with_one_mode_refuses_the_other_by_name(r1_live):
    client = _client(r1_live[0])
    thinking = _prompt_tokens(client, "r1")
    for extra, param in (({"extra_body": {"thinking": {"type": "disabled"}}}, "thinking"),
                         ({"reasoning_effort": "none"}, "reasoning_effort")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="r1", messages=HI, max_tokens=1, **extra)
        assert err.value.body["param"] == param and "always thinks" in err.value.message
    # an alias only sets a default: deepseek-chat still answers, in the one mode the template has
    assert _prompt_tokens(client, "deepseek-chat") == thinking == _prompt_tokens(client, "r1", reasoning_effort="low")


def test_parse_model_aliases():
    assert parse_model_aliases("deepseek-chat=non-thinking, deepseek-reasoner=thinking,mine") == {
        "deepseek-chat": False, "deepseek-reasoner": True, "mine": None}
    assert parse_model_aliases("") == {} and parse_model_aliases("a=default") == {"a": None}
    for bad in ("a=sometimes", "=thinking"):
        with pytest.raises(ValueError, match="--model-aliases"):
            parse_model_aliases(bad)
