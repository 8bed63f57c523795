"""Whole conversations in DeepSeek-V3.2's and V4's chat formats, as their reference encoders write them.

Neither release has a jinja chat template: each ships a Python encoder (`encoding/encoding_dsv32.py`,
`encoding/encoding_dsv4.py`), checked byte for byte here against the releases' own test vectors
(tests/data/dsml). Covered: system, user, assistant (content, reasoning_content, tool_calls) and tool messages,
thinking or chat mode; for V4 also its encoder's internal roles and fields (developer turns with tools and a
response_format, latest_reminder, quick-instruction tasks, wo_eos) and reasoning_effort "max", for direct
callers: the HTTP API keeps OpenAI's meaning of `developer` (the system prompt) and takes no internal roles.

Both end every user turn with the generation prompt (`<｜Assistant｜>` and `<think>` or `</think>`), so there is
no add_generation_prompt. Thinking: the reasoning of assistant turns before the last user message is dropped,
and the turns after it (the tool-calling turns of the current question) carry theirs, as DeepSeek's API asks
clients to send it back; V4 keeps every turn's reasoning when tools are given.

Messages are chat_format.normalize_messages' dicts; the calls' text is dsml.py's.
"""

from __future__ import annotations

import json

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


def _assistant(m: dict, dialect, reasoning: bool, eos: bool = True) -> str:
    calls = [(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m.get("tool_calls") or []]
    think = (m.get("reasoning_content") or "") + THINK_END if reasoning else ""
    return think + (m.get("content") or "") + (dialect.calls_text(calls) if calls else "") + (EOS if eos else "")


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


# V4's internal message fields and roles (the release's encoder): quick-instruction task tokens after a user turn,
# the latest-reminder role, and the reasoning-effort preamble of thinking mode
V4_TASKS = {name: f"<｜{name}｜>" for name in ("action", "query", "authority", "domain", "title", "read_url")}
LATEST_REMINDER = "<｜latest_reminder｜>"
V4_EFFORTS = ("high", "max")
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
_RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """V4 has no tool role: results become `<tool_result>` blocks of a user turn, in the order of the calls
    they answer; consecutive user turns and results merge into one, joined by a blank line (not into a user
    turn that carries a task)."""
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
        last = merged[-1] if merged else None
        if last is not None and last["role"] == "user" and "blocks" in last and last.get("task") is None:
            last["blocks"].append(block)  # consecutive user turns and results are one turn
        else:
            merged.append({"role": "user", "blocks": [block],
                           **{k: m[k] for k in ("task", "wo_eos") if m["role"] == "user" and k in m}})
        if block[0] == "tool":
            tools = sorted((b for b in merged[-1]["blocks"] if b[0] == "tool"), key=lambda b: order.get(b[1], 0))
            it = iter(tools)
            merged[-1]["blocks"] = [next(it) if b[0] == "tool" else b for b in merged[-1]["blocks"]]
    return merged


def _last_user_v4(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _drop_v4(messages: list[dict]) -> list[dict]:
    """Before the last user (or developer) turn: assistant turns lose their reasoning, developer turns go."""
    last = _last_user_v4(messages)
    out = []
    for i, m in enumerate(messages):
        if i >= last or m["role"] in ("user", "system", "latest_reminder"):
            out.append(m)
        elif m["role"] == "assistant":
            out.append({k: v for k, v in m.items() if k != "reasoning_content"})
    return out


def _instructions(m: dict) -> str:
    """A system or developer turn's text: its content, the tools, the response format."""
    text = (m.get("content") or "") + ("\n\n" + V4.tools_prompt(m["tools"]) if m.get("tools") else "")
    if m.get("response_format"):
        text += "\n\n" + _RESPONSE_FORMAT.format(schema=json.dumps(m["response_format"], ensure_ascii=False))
    return text


def encode_v4(messages: list[dict], tools: list[dict] | None = None, thinking: bool = True,
              reasoning_effort: str | None = None) -> str:
    """DeepSeek-V4's prompt (encoding_dsv4.encode_messages, drop_thinking on). Besides OpenAI's roles it takes
    the release's internal ones as its encoder does: `developer` (a user turn that may carry tools and a
    response_format), `latest_reminder`, a user turn's `task` (a quick-instruction token instead of a normal
    answer) and an assistant turn's `wo_eos`. reasoning_effort (thinking mode only): "max" opens the prompt
    with the release's maximum-effort instructions; "high" or None adds nothing."""
    if reasoning_effort not in (None, *V4_EFFORTS):
        raise ValueError(f"reasoning_effort: expected one of {V4_EFFORTS} or None, got {reasoning_effort!r}")
    msgs = _merge_tool_results(_with_tools(messages, tools))
    drop = not any(m.get("tools") for m in msgs)  # with tools, every turn keeps its reasoning
    if thinking and drop:
        msgs = _drop_v4(msgs)
    last = _last_user_v4(msgs)
    out = [BOS]
    if thinking and reasoning_effort == "max" and msgs:
        out.append(REASONING_EFFORT_MAX)
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            out.append(_instructions(m))
        elif role == "developer":
            if not m.get("content"):
                raise ValueError(f"messages[{i}]: a developer turn needs content")
            out.append(USER + _instructions(m))
        elif role == "user":
            out.append(USER + "\n\n".join(text for _, _, text in m["blocks"]))
        elif role == "latest_reminder":
            out.append(LATEST_REMINDER + (m.get("content") or ""))
        elif role == "assistant":
            after_task = i > 0 and msgs[i - 1].get("task") is not None  # a task's output: no thinking
            reasoning = thinking and not after_task and (not drop or i > last)
            out.append(_assistant(m, V4, reasoning, eos=not m.get("wo_eos", False)))
        else:
            raise ValueError(f"messages[{i}]: role {role!r} has no DeepSeek-V4 rendering")
        if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
            continue
        task = m.get("task")
        if task is not None:
            if task not in V4_TASKS:
                raise ValueError(f"messages[{i}].task: expected one of {sorted(V4_TASKS)}, got {task!r}")
            if task == "action":
                out.append(ASSISTANT + (THINK_START if thinking else THINK_END))
            out.append(V4_TASKS[task])
        elif role in ("user", "developer"):
            out.append(ASSISTANT + (THINK_START if thinking and (not drop or i >= last) else THINK_END))
    return "".join(out)
