"""Conversion between harmony messages and the OpenAI Chat Completions shape (saved chats,
``gptoss-mlx render``)."""

from __future__ import annotations

import json

from .messages import (
    CONSTRAIN, DeveloperContent, HarmonyError, Message, ResponseFormat, SystemContent, ToolSpec,
)
from .render import system_message

def from_chat_completions(request: dict, date: str | None = None, browser: bool = False,
                          python: bool = False) -> list[Message]:
    """Harmony messages for a Chat Completions request: ``messages`` (system/developer/user/
    assistant with ``reasoning``/``reasoning_content`` and ``tool_calls``, tool results),
    ``tools`` and ``reasoning_effort``. A leading system or developer message becomes the
    developer ``# Instructions``; the harmony system message is built from the options."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise HarmonyError("expected a JSON object with a 'messages' list")
    effort = request.get("reasoning_effort") or "medium"
    out = [system_message(effort, date, browser, python)]
    functions = [_function_spec(t) for t in request.get("tools") or []]
    formats = _response_formats(request.get("response_format"))
    msgs = list(request["messages"])
    instructions = None
    if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") in ("system", "developer"):
        instructions = _text_of(msgs.pop(0), 0)
    if instructions is not None or functions or formats:
        out.append(Message("developer", DeveloperContent(instructions, functions, formats)))
    call_names: dict[str, str] = {}
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise HarmonyError(f"messages[{i}] is not an object")
        role = m.get("role")
        if role in ("system", "developer"):
            out.append(Message("developer", DeveloperContent(_text_of(m, i))))
        elif role == "user":
            out.append(Message("user", _text_of(m, i)))
        elif role == "assistant":
            out += _assistant_messages(m, i, call_names)
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if not name:
                raise HarmonyError(f"messages[{i}]: tool result without a name or a known tool_call_id")
            name = name if "." in name else f"functions.{name}"
            out.append(Message("tool", _text_of(m, i), channel="commentary",
                               recipient="assistant", name=name))
        else:
            raise HarmonyError(f"messages[{i}]: unknown role {role!r}")
    return out


def _text_of(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise HarmonyError(f"messages[{i}]: content must be a string or a list of text parts")


def _function_spec(tool: dict) -> ToolSpec:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise HarmonyError(f"tool {tool!r} has no function name")
    params = fn.get("parameters")
    if isinstance(params, dict) and not params.get("properties") and params.get("type") == "object":
        params = None  # no arguments: `() => any`
    return ToolSpec(fn["name"], fn.get("description") or "", params)


def _response_formats(fmt) -> list[ResponseFormat]:
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return []
    js = fmt.get("json_schema") or {}
    return [ResponseFormat(js.get("name", "response"), js.get("schema", {}), js.get("description"))]


def _assistant_messages(m: dict, i: int, call_names: dict) -> list[Message]:
    out = []
    reasoning = m.get("reasoning") or m.get("reasoning_content")
    if reasoning:
        out.append(Message("assistant", reasoning, channel="analysis"))
    for j, call in enumerate(m.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise HarmonyError(f"messages[{i}].tool_calls[{j}] has no function name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args)
        name = fn["name"] if "." in fn["name"] else f"functions.{fn['name']}"
        call_names[call.get("id", f"call_{i}_{j}")] = name
        builtin = name.split(".")[0] in ("browser", "python")
        out.append(Message("assistant", args, channel="analysis" if builtin else "commentary",
                           recipient=name, content_type=None if builtin else f"{CONSTRAIN}json"))
    content = _text_of(m, i)
    if content or not out:
        out.append(Message("assistant", content, channel="final"))
    return out


def to_chat_completions(messages: list[Message]) -> dict:
    """The inverse of :func:`from_chat_completions` (reasoning kept as ``reasoning``)."""
    out: list[dict] = []
    effort = "medium"
    tools: list[dict] = []
    pending: dict | None = None
    counter = 0
    last_call_ids: dict[str, str] = {}

    def assistant() -> dict:
        nonlocal pending
        if pending is None:
            pending = {"role": "assistant", "content": None}
            out.append(pending)
        return pending

    for m in messages:
        if m.role == "system" and isinstance(m.content, SystemContent):
            effort = m.content.reasoning_effort or effort
            continue
        if m.role == "developer":
            dev = m.content if isinstance(m.content, DeveloperContent) else DeveloperContent(m.text)
            if dev.instructions is not None:
                out.append({"role": "system", "content": dev.instructions})
            for fn in dev.functions:
                spec = {"name": fn.name, "description": fn.description}
                spec["parameters"] = fn.parameters or {"type": "object", "properties": {}}
                tools.append({"type": "function", "function": spec})
            pending = None
            continue
        if m.role == "assistant":
            target = assistant()
            if m.is_tool_call:
                counter += 1
                call_id = f"call_{counter}"
                name = m.recipient.removeprefix("functions.")
                last_call_ids[m.recipient] = call_id
                target.setdefault("tool_calls", []).append(
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": m.text}})
            elif m.channel == "analysis":
                target["reasoning"] = (target.get("reasoning") or "") + m.text
            else:
                target["content"] = (target.get("content") or "") + m.text
                if m.channel == "final":
                    pending = None
            continue
        pending = None
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": last_call_ids.get(m.name, ""),
                        "name": m.name.removeprefix("functions."), "content": m.text})
        else:
            out.append({"role": m.role, "content": m.text})
    result: dict = {"messages": out, "reasoning_effort": effort}
    if tools:
        result["tools"] = tools
    return result
