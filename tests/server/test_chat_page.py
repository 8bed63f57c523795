"""The chat page (server/pages.py + server/static/index.html): served self-contained, prices exact, example
prompts from the model card, and driven end to end in headless Chromium against a live server with the tiny
checkpoint, the first message sent with the page exactly as it loads."""

from __future__ import annotations

import importlib
import json
import operator
import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import openr2
from openr2 import billing
from openr2.engine.usage import Usage
from openr2.server.app import ServerConfig
from openr2.server.pages import add_page_routes, chat_page_html, example_prompts
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import run_app, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_COPY = "/tmp/openr2_chat_page.png"
DEMO = os.path.join(os.path.dirname(openr2.__file__), "assets", "openr2-demo")

# A price table unlike the defaults, so a page or route that ignored the server's table would show.
PRICES = billing.PriceTable(input_miss_micro_usd_per_mtok=270_000, input_hit_micro_usd_per_mtok=70_000,
                            output_micro_usd_per_mtok=1_100_000, batch_discount_percent=50)


def _page_client(prices=PRICES, examples=()) -> TestClient:
    app = FastAPI()
    config = SimpleNamespace(model_name="tiny", example_prompts=list(examples))
    add_page_routes(app, SimpleNamespace(prices=prices, config=config))
    return TestClient(app)


def _page_examples(html: str) -> list[str]:
    block = re.search(r'<script id="example-prompts" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(block.group(1))


# ------------------------------------------------------------------------------------------------ fast

def test_page_is_self_contained():
    r = _page_client().get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert html == chat_page_html() and "<textarea" in html and "/v1/chat/completions" in html
    assert not re.findall(r"(?i)\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html), "the page must not name other hosts"
    for url in re.findall(r"""(?i)\b(?:src|href|action)\s*=\s*["']([^"']*)["']""", html):
        assert url.startswith("data:") or url.startswith("/") or "://" not in url, url
    assert "@import" not in html and "url(" not in html
    # the browser is told to refuse any other origin, too
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_example_prompts_come_from_the_model_card(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# m\n\n- not an example\n\n## Example prompts ##\n\nQuestions it answers:\n\n"
                    "- `What is 2+2?`\n* Count to three.\n-   `` a `quoted` word ``  \n- `x` or `y`\n-\n"
                    "### More\n- Spell cat.\n```\n# a comment, not a heading\n- code, not a bullet\n```\n"
                    "## Use\n- `openr2 chat`\n", encoding="utf-8")
    assert example_prompts(tmp_path) == ["What is 2+2?", "Count to three.", "a `quoted` word", "`x` or `y`",
                                         "Spell cat."]
    card.write_text("# m\n\n## Use\n- `openr2 chat`\n", encoding="utf-8")
    assert example_prompts(tmp_path) == []  # no section
    card.write_bytes(b"## Example prompts\n- \xff\n")
    assert example_prompts(tmp_path) == []  # not UTF-8: no examples, no error
    assert example_prompts(tmp_path / "missing") == []
    # the bundled demo's card offers questions it answers (checked by test_bundled_demo_answers_its_examples)
    assert "What is 347+589?" in example_prompts(DEMO)


def test_page_carries_the_examples_as_data():
    examples = ["What is 2+2?", "</script><script>alert(1)</script>", "<!-- é"]
    html = _page_client(examples=examples).get("/").text
    assert _page_examples(html) == examples  # the text cannot close the data block early
    assert "alert(1)</script>" not in html
    assert _page_examples(_page_client().get("/").text) == []


@pytest.mark.slow
def test_bundled_demo_answers_its_examples():
    from openr2 import LLM, SamplingParams

    # the `What is a+b?` ones, which this test can check
    sums = [(q, m.groups()) for q in example_prompts(DEMO) if (m := re.fullmatch(r"What is (\d+)([-+*])(\d+)\?", q))]
    assert sums
    outs = LLM(DEMO, compile=False, num_blocks=32).chat([[{"role": "user", "content": q}] for q, _ in sums],
                                          SamplingParams(temperature=0, max_tokens=200))  # greedy, as it is served
    for (question, (a, op, b)), out in zip(sums, outs):
        right = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(a), int(b))
        assert out.outputs[0].text.rsplit("</think>", 1)[-1].strip() == str(right), (question, out.outputs[0].text)


def test_prices_match_the_table():
    body = _page_client().get("/v1/prices").json()
    exact = PRICES.to_dict()
    for key, value in exact.items():
        assert body[key] == value
    for key, name in [("input_miss", "input_miss_micro_usd_per_mtok"), ("input_hit", "input_hit_micro_usd_per_mtok"),
                      ("output", "output_micro_usd_per_mtok")]:
        micro = getattr(PRICES, name)
        assert body["micro_usd_per_mtok"][key] == micro
        assert Decimal(body["usd_per_mtok"][key]) * 10**6 == micro  # exact decimal string
        assert body["usd_per_mtok_number"][key] == micro / 10**6
        assert body[f"{key}_usd_per_mtok"] == body["usd_per_mtok"][key]
    assert body["usd_per_mtok"] == {"input_miss": "0.27", "input_hit": "0.07", "output": "1.10"}
    assert body["batch_discount_percent"] == 50 and body["currency"] == "USD" and body["model"] == "tiny"
    default = _page_client(billing.PriceTable()).get("/v1/prices").json()
    assert default["usd_per_mtok"] == {"input_miss": "0.14", "input_hit": "0.014", "output": "0.28"}


# ------------------------------------------------------------------------------------------------ browser

def _ensure_chromium() -> str | None:
    """The path of Debian's chromium, installing it when missing and we may; None if impossible."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=True,
                           capture_output=True, timeout=1200)
        except (subprocess.SubprocessError, OSError):
            return None
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else None


def _ensure_playwright():
    """playwright.sync_api, pip-installing the package into this interpreter when missing; None if impossible.
    Never `playwright install`: we drive the system chromium, no browser download."""
    try:
        return importlib.import_module("playwright.sync_api")
    except ImportError:
        pass
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], check=True,
                       capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError):
        return None
    importlib.invalidate_caches()
    try:
        return importlib.import_module("playwright.sync_api")
    except ImportError:
        return None


TINY_EXAMPLES = ["What is 2+2?", "Count to three."]


@pytest.fixture(scope="module")
def live_with_page(tmp_path_factory):
    """(base_url, Server) of a running server whose app has the page routes; stopped after the module.
    The server keeps its default max_tokens (as `openr2 serve` does) and offers the model card's examples."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny_chat_checkpoint(ckpt)
    (ckpt / "README.md").write_text("# tiny\n\n## Example prompts\n\n" + "".join(f"- `{q}`\n" for q in TINY_EXAMPLES),
                                    encoding="utf-8")
    config = ServerConfig(model_name="tiny", example_prompts=example_prompts(ckpt))
    with serve(ckpt, tmp_path_factory.mktemp("data"), config=config, prices=PRICES) as running:
        yield running


_STATS = re.compile(r"prompt (\d+) · cached (\d+) · completion (\d+) · reasoning (\d+) · (\$\d+\.\d+)")


def _browser_or_skip():
    """(chromium path, playwright.sync_api), or skip saying what is missing."""
    chromium = _ensure_chromium()
    if chromium is None:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get: "
                    "apt-get install chromium)")
    sync_api = _ensure_playwright()
    if sync_api is None:
        pytest.skip("the playwright package is missing and `pip install playwright` failed")
    return chromium, sync_api


@pytest.mark.slow
def test_chat_page_in_headless_chromium(live_with_page, tmp_path):
    chromium, sync_api = _browser_or_skip()
    base_url, server = live_with_page

    requests, problems, bodies = [], [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.set_default_timeout(60_000)
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            def on_request(r):
                if r.url.endswith("/v1/chat/completions"):
                    bodies.append(json.loads(r.post_data))

            page.on("request", on_request)
            page.goto(base_url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'")

            # a new user's first message: an example from the model card, every setting as the page loads
            examples = page.locator(".empty .examples button")
            assert examples.all_text_contents() == TINY_EXAMPLES
            examples.nth(0).click()
            first = page.locator(".msg.assistant").nth(0)
            first.locator(".stats").wait_for(state="visible")
            page.wait_for_selector(".msg.assistant:not(.streaming)")
            assert first.locator(".error").count() == 0
            assert bodies[0]["messages"] == [{"role": "user", "content": TINY_EXAMPLES[0]}]
            assert "max_tokens" not in bodies[0] and "temperature" not in bodies[0]  # the server's defaults apply
            assert "response_format" not in bodies[0]
            m = _STATS.search(first.locator(".stats").text_content())
            prompt, completion = int(m.group(1)), int(m.group(3))
            assert completion > 0 and prompt + completion <= server.engine.engine.max_model_len

            page.click("#new-chat")
            page.fill("#max-tokens", "12")
            page.fill("#temperature", "0")

            # Shift+Enter is a newline, Enter sends
            page.click("#prompt")
            page.keyboard.type("What is 2+2?")
            page.keyboard.press("Shift+Enter")
            page.keyboard.type("Think step by step.")
            assert page.input_value("#prompt") == "What is 2+2?\nThink step by step."
            assert len(bodies) == 1
            page.keyboard.press("Enter")

            turn = page.locator(".msg.assistant").nth(0)
            turn.locator(".stats").wait_for(state="visible")
            page.wait_for_selector(".msg.assistant:not(.streaming)")
            reasoning = turn.locator("details.thinking .reasoning").text_content()
            answer = turn.locator(".answer").text_content()
            # the R1 prompt ends inside <think>: the tiny model's output is (at least at first) reasoning
            assert reasoning.strip(), "the thinking block shows the streamed reasoning"
            assert turn.locator("details.thinking").is_visible()
            if not answer:  # still thinking when max_tokens ran out: the block stays open
                assert turn.locator("details.thinking").get_attribute("open") is not None
            else:  # the answer started: the block folded away
                assert turn.locator("details.thinking").get_attribute("open") is None

            stats = turn.locator(".stats").text_content()
            m = _STATS.search(stats)
            assert m, stats
            prompt, cached, completion, reasoning_tokens = map(int, m.groups()[:4])
            assert 0 < completion <= 12 and reasoning_tokens <= completion and cached <= prompt
            cost = PRICES.cost(Usage(prompt, cached, completion, reasoning_tokens))
            assert m.group(5) == billing.format_usd(cost)  # exact, at the server's own prices
            assert bodies[1]["stream"] is True and bodies[1]["stream_options"] == {"include_usage": True}
            assert bodies[1]["max_tokens"] == 12 and bodies[1]["temperature"] == 0 and bodies[1]["model"] == "tiny"
            assert bodies[1]["messages"] == [{"role": "user", "content": "What is 2+2?\nThink step by step."}]

            # a second turn sends the whole conversation (answers only; reasoning is not sent back)
            page.fill("#prompt", "And 3+3?")
            page.click("#send")
            page.locator(".msg.assistant").nth(1).locator(".stats").wait_for(state="visible")
            page.wait_for_function("document.querySelectorAll('.msg.assistant.streaming').length === 0")
            msgs = bodies[2]["messages"]
            assert [x["role"] for x in msgs] == ["user", "assistant", "user"]
            assert msgs[1] == {"role": "assistant", "content": answer} and msgs[2]["content"] == "And 3+3?"

            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            shutil.copyfile(shot, SCREENSHOT_COPY)

            # errors show the OpenAI error message
            page.fill("#temperature", "-1")
            page.fill("#prompt", "x")
            page.press("#prompt", "Enter")
            err = page.locator(".msg.assistant").nth(2).locator(".error")
            err.wait_for(state="visible")
            assert "temperature" in err.text_content() and "HTTP 400" in err.text_content()
            assert page.input_value("#prompt") == "x"  # kept for a retry

            # new chat forgets the history
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0
            page.fill("#temperature", "0")
            page.fill("#prompt", "Hello")
            page.press("#prompt", "Enter")
            page.locator(".msg.assistant .stats").wait_for(state="visible")
            assert bodies[-1]["messages"] == [{"role": "user", "content": "Hello"}]

            # JSON mode asks for a JSON object (constrained decoding; the thinking stays free)
            page.check("#json-mode")
            page.fill("#prompt", "As JSON")
            page.press("#prompt", "Enter")
            page.locator(".msg.assistant").nth(1).locator(".stats").wait_for(state="visible")
            assert bodies[-1]["response_format"] == {"type": "json_object"}
            assert page.locator(".msg.assistant").nth(1).locator(".error").count() == 0
        finally:
            browser.close()

    assert all(u.startswith(base_url) or u.startswith("data:") for u in requests), requests
    # the only console errors allowed are the deliberate 400's own "Failed to load resource" line
    assert all("400" in x for x in problems), problems


def _fake_stream_app():
    """The page routes plus a scripted /v1/chat/completions that streams reasoning, then an answer (or an
    error event), as CRLF-framed SSE cut into 7-byte reads: lines, line breaks and UTF-8 characters split."""
    import asyncio

    from fastapi.responses import StreamingResponse

    app = FastAPI()
    add_page_routes(app, SimpleNamespace(prices=PRICES, config=SimpleNamespace(model_name="fake", example_prompts=[])))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "me"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        fail = body["messages"][-1]["content"] == "fail"
        refuse = body["messages"][-1]["content"] == "refuse"

        def chunk(delta=None, finish=None, usage=None):
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                    "choices": choices, "usage": usage}

        events = [chunk({"role": "assistant", "content": None, "reasoning_content": ""})]
        events += [chunk({"content": None, "reasoning_content": t}) for t in ["Two plus ", "two… ", "is 4 ✓."]]
        if fail:
            events.append({"error": {"message": "The engine ran out of cache blocks.", "type": "server_error",
                                     "param": None, "code": None}})
        else:
            events += [chunk({"content": t, "reasoning_content": None}) for t in ["The answer ", "is 4. 你好"]]
            events.append(chunk({"content": ""}, "content_filter" if refuse else "stop"))
            if refuse:  # the policy's rule, on the choice beside finish_reason (policy.py)
                events[-1]["choices"][0]["content_filter"] = {"rule": "no-<b>-tags", "on": "answer"}
            events.append(chunk(usage={"prompt_tokens": 1000, "completion_tokens": 30, "total_tokens": 1030,
                                       "prompt_cache_hit_tokens": 640, "prompt_cache_miss_tokens": 360,
                                       "prompt_tokens_details": {"cached_tokens": 640},
                                       "completion_tokens_details": {"reasoning_tokens": 12}}))
        text = ": keep-alive\r\n\r\n" + "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events)
        if not fail:
            text += "data: [DONE]\r\n\r\n"
        raw = text.encode()

        async def pieces():
            for i in range(0, len(raw), 7):
                yield raw[i:i + 7]
                await asyncio.sleep(0.002)

        return StreamingResponse(pieces(), media_type="text/event-stream")

    return app


@pytest.mark.slow
def test_chat_page_splits_thinking_from_the_answer_across_split_reads(tmp_path):
    chromium, sync_api = _browser_or_skip()
    with run_app(_fake_stream_app()) as base_url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.set_default_timeout(30_000)
            page.goto(base_url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'fake'")
            page.fill("#prompt", "What is 2+2?")
            page.press("#prompt", "Enter")
            turn = page.locator(".msg.assistant").nth(0)
            turn.locator(".stats").wait_for(state="visible")
            page.wait_for_selector(".msg.assistant:not(.streaming)")
            thinking = turn.locator("details.thinking")
            assert thinking.locator(".reasoning").text_content() == "Two plus two… is 4 ✓."
            assert thinking.get_attribute("open") is None  # folded once the answer started
            assert thinking.locator("summary").text_content().startswith("Thought for")
            assert turn.locator(".answer").text_content() == "The answer is 4. 你好"
            cost = PRICES.cost(Usage(1000, 640, 30, 12))  # 360 x 0.27 + 640 x 0.07 + 30 x 1.10 per M
            assert turn.locator(".stats").text_content() == (
                f"prompt 1000 · cached 640 · completion 30 · reasoning 12 · {billing.format_usd(cost)}")
            page.screenshot(path=str(tmp_path / "answer.png"), full_page=True)

            page.fill("#prompt", "fail")  # an error event after the 200 headers
            page.press("#prompt", "Enter")
            err = page.locator(".msg.assistant").nth(1).locator(".error")
            err.wait_for(state="visible")
            assert err.text_content() == "The engine ran out of cache blocks."
            assert page.locator(".msg.assistant").nth(1).locator(".reasoning").text_content().startswith("Two")

            page.fill("#prompt", "refuse")  # the content policy ended the answer: said, with its rule, as text
            page.press("#prompt", "Enter")
            note = page.locator(".msg.assistant").nth(2).locator(".note")
            note.wait_for(state="visible")
            assert note.text_content() == 'This server\'s content policy stopped the answer here (rule "no-<b>-tags").'
            assert page.locator(".msg.assistant").nth(2).locator(".answer").text_content() == "The answer is 4. 你好"
        finally:
            browser.close()



@pytest.mark.slow
def test_chat_page_shows_tool_calls_and_the_balance(tmp_path):
    """With tools typed into the page, a scripted DeepSeek-V3.2 server's call is shown as a call (streamed
    tool_calls deltas), with a note that the page runs no tools; a key with a prepaid balance shows it in the
    header, and the balance goes down after an answer."""
    from tests.server._scripted import serve_scripted
    from tests.server.test_dsml_tools import WEATHER, _bare_tokenizer, script

    chromium, sync_api = _browser_or_skip()
    with serve_scripted(_bare_tokenizer(), script, tmp_path, model_type="deepseek_v32") as (base_url, server, _):
        key_id, secret = server.ledger.create_key("page")
        server.ledger.set_balance(key_id, 5 * 10**12)  # $5.00
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                problems = []
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.goto(base_url + "/")
                page.fill("#api-key", secret)
                page.dispatch_event("#api-key", "change")
                page.locator("#balance", has_text="balance $5.00").wait_for()  # (the page's CSP forbids eval)
                page.click("#tools-box summary")
                page.fill("#tools", json.dumps([WEATHER]))
                page.dispatch_event("#tools", "change")
                page.fill("#prompt", "Weather in Paris?")
                page.keyboard.press("Enter")
                page.wait_for_selector(".msg.assistant:not(.streaming)")
                turn = page.locator(".msg.assistant").nth(0)
                assert turn.locator(".answer").text_content() == "Let me check."
                call = turn.locator(".toolcall").text_content()
                assert call.startswith("tool call get_weather ")
                assert json.loads(call.removeprefix("tool call get_weather ")) == {"city": "Paris", "days": 2}
                assert "does not run tools" in turn.locator(".note").text_content()
                page.locator("#balance", has_text="balance $4.99").wait_for()  # refreshed after the answer
                assert not problems, problems
            finally:
                browser.close()
