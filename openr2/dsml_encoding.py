"""Whole conversations in DeepSeek-V3.2's and V4's chat formats, as their reference encoders write them.

Neither release has a jinja chat template: each ships a Python encoder (`encoding/encoding_dsv32.py`,
`encoding/encoding_dsv4.py`), checked byte for byte here against the releases' own test vectors
(tests/data/dsml). Covered: system, user, assistant (content, reasoning_content, tool_calls) and tool messages,
thinking or chat mode; not V4's internal roles and tasks (latest_reminder, quick-instruction task tokens).

Both end every user turn with the generation prompt (`<｜Assistant｜>` and `<think>` or `</think>`), so there is
no add_generation_prompt. Thinking: the reasoning of assistant turns before the last user message is dropped,
and the turns after it (the tool-calling turns of the current question) carry theirs, as DeepSeek's API asks
clients to send it back; V4 keeps every turn's reasoning when tools are given.

Messages are chat_format.normalize_messages' dicts; the calls' text is dsml.py's.
"""

from __future__ import annotations

from openr2.dsml import V4, V32
from openr2.tokenizer import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER


def _last_user(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)


def _with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The tools ride on the leading system message (a new, empty one if there is none), as the releases do."""
    messages = [dict(m) for m in messages]
    if tools:
        if not messages or messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        messages[0]["tools"] = tools
    return messages


def _drop_reasoning(messages: list[dict]) -> list[dict]:
    last = _last_user(messages)
    return [{k: v for k, v in m.items() if k != "reasoning_content"} if m["role"] == "assistant" and i < last else m
            for i, m in enumerate(messages)]


def _system(m: dict, dialect) -> str:
    text = m.get("content") or ""
    return text + ("\n\n" + dialect.tools_prompt(m["tools"]) if m.get("tools") else "")


def _assistant(m: dict, dialect, reasoning: bool) -> str:
    calls = [(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m.get("tool_calls") or []]
    think = (m.get("reasoning_content") or "") + THINK_END if reasoning else ""
    return think + (m.get("content") or "") + (dialect.calls_text(calls) if calls else "") + EOS


def encode_v32(messages: list[dict], tools: list[dict] | None = None, thinking: bool = True) -> str:
    """DeepSeek-V3.2's prompt (encoding_dsv32.encode_messages, drop_thinking on)."""
    msgs = _with_tools(messages, tools)
    if thinking:
        msgs = _drop_reasoning(msgs)
    last = _last_user(msgs)
    out = [BOS]
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            out.append(_system(m, V32))
        elif role == "user":
            out.append(USER + m["content"] + ASSISTANT + (THINK_START if thinking and i == last else THINK_END))
        elif role == "assistant":
            if thinking and i > last and not (m.get("reasoning_content") or m.get("tool_calls")):
                raise ValueError(f"messages[{i}]: in thinking mode an assistant turn after the last user message "
                                 f"needs reasoning_content or tool_calls")
            out.append(_assistant(m, V32, thinking and i > last))
        elif role == "tool":
            j = i - 1
            while j >= 0 and msgs[j]["role"] == "tool":
                j -= 1
            order, calls = i - j, (msgs[j].get("tool_calls") or []) if j >= 0 and msgs[j]["role"] == "assistant" else []
            if order > len(calls):
                raise ValueError(f"messages[{i}]: a tool result with no tool call of the assistant before it")
            out.append(("\n\n<function_results>" if order == 1 else "") + f"\n<result>{m['content']}</result>")
            if order == len(calls):
                out.append("\n</function_results>\n\n" + (THINK_START if thinking and i >= last else THINK_END))
        else:
            raise ValueError(f"messages[{i}]: role {role!r} has no DeepSeek-V3.2 rendering")
    return "".join(out)


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """V4 has no tool role: results become `<tool_result>` blocks of a user turn, in the order of the calls
    they answer; consecutive user turns and results merge into one, joined by a blank line."""
    merged: list[dict] = []
    order: dict[str, int] = {}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {c.get("id", ""): k for k, c in enumerate(m["tool_calls"])}
        if m["role"] == "tool":
            block = ("tool", m.get("tool_call_id", ""), f"<tool_result>{m['content']}</tool_result>")
        elif m["role"] == "user":
            block = ("text", "", m["content"])
        else:
            merged.append(m)
            continue
        if merged and merged[-1]["role"] == "user":  # consecutive user turns and results are one turn
            merged[-1]["blocks"].append(block)
        else:
            merged.append({"role": "user", "blocks": [block]})
        if block[0] == "tool":
            tools = sorted((b for b in merged[-1]["blocks"] if b[0] == "tool"), key=lambda b: order.get(b[1], 0))
            it = iter(tools)
            merged[-1]["blocks"] = [next(it) if b[0] == "tool" else b for b in merged[-1]["blocks"]]
    return merged


def encode_v4(messages: list[dict], tools: list[dict] | None = None, thinking: bool = True) -> str:
    """DeepSeek-V4's prompt (encoding_dsv4.encode_messages, drop_thinking on, no reasoning_effort)."""
    msgs = _merge_tool_results(_with_tools(messages, tools))
    drop = not tools  # with tools, every turn keeps its reasoning
    if thinking and drop:
        msgs = _drop_reasoning(msgs)
    last = _last_user(msgs)
    out = [BOS]
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            out.append(_system(m, V4))
        elif role == "user":
            out.append(USER + "\n\n".join(text for _, _, text in m["blocks"]))
        elif role == "assistant":
            out.append(_assistant(m, V4, thinking and (not drop or i > last)))
        else:
            raise ValueError(f"messages[{i}]: role {role!r} has no DeepSeek-V4 rendering")
        if role == "user" and (i + 1 == len(msgs) or msgs[i + 1]["role"] == "assistant"):
            out.append(ASSISTANT + (THINK_START if thinking and (not drop or i >= last) else THINK_END))
    return "".join(out)
