"""Conversion between harmony messages and the OpenAI Chat Completions shape (saved chats,
``gptoss-mlx render``), exact in both directions for what a chat produces.

One Chat Completions assistant message holds, in harmony's order, the reasoning (an
``analysis`` message, as ``reasoning``), the text (``content``: a ``final`` answer, or a
``commentary`` preamble when tool calls follow) and the tool calls. A function call
``get_weather`` is harmony's ``to=functions.get_weather`` on ``commentary`` with
``<|constrain|>json``; a built-in call (``python``, ``browser.search``) is ``to=python`` on
``analysis``; a tool's result comes back on its caller's channel. Where a message differs from
these defaults (a call on another channel, a ``code`` content type, a preamble without a call),
the difference is kept as an extra ``channel``/``content_type``/``recipient`` key, so a saved
chat renders token for token as it was.
"""

from __future__ import annotations

import itertools
import json
import re

from .messages import (
    BUILTIN_TOOLS, CONSTRAIN, CUTS, FUNCTION_NAME, FUNCTION_NAME_RULE, NOT_A_CALL, DeveloperContent, HarmonyError,
    Message, ResponseFormat, SystemContent, ToolSpec, _kind, check_schema,
)
from .render import system_message

FUNCTIONS = "functions."


# Where an assistant message may carry its chain of thought: vLLM's and OpenRouter's names, then
# the one the official HF chat template reads. The first that is set is taken.
REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")


def from_chat_completions(request: dict, date: str | None = None, browser: bool = False,
                          python: bool = False) -> list[Message]:
    """Harmony messages for a Chat Completions request: ``messages`` (system/developer/user/
    assistant with its reasoning (REASONING_KEYS) and ``tool_calls``, tool results),
    ``tools``, ``response_format`` and ``reasoning_effort``. A leading system or developer
    message becomes the developer ``# Instructions``; the harmony system message is built from
    the options. Bad input raises one HarmonyError naming the message and field."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise HarmonyError("expected a JSON object with a 'messages' list")
    effort = request.get("reasoning_effort") or "medium"
    out = [system_message(effort, date, browser, python)]
    tools = request.get("tools") or []
    if not isinstance(tools, list):
        raise HarmonyError("tools must be a list")
    functions = [_function_spec(t, j) for j, t in enumerate(tools)]
    declared = {f.name for f in functions}
    if len(declared) < len(functions):
        j = next(j for j, f in enumerate(functions) if f.name in {g.name for g in functions[:j]})
        raise HarmonyError(f"tools[{j}]: the function name {functions[j].name!r} is declared twice")
    formats = response_formats(request.get("response_format"))
    msgs = list(enumerate(request["messages"]))
    instructions = None
    if msgs and isinstance(msgs[0][1], dict) and msgs[0][1].get("role") in ("system", "developer"):
        instructions = _text_of(msgs.pop(0)[1], 0)
    if instructions is not None or functions or formats:
        out.append(Message("developer", DeveloperContent(instructions, functions, formats)))
    calls: dict[str, list[tuple[str, str | None]]] = {}  # tool_call_id -> its calls' (recipient, channel)
    for i, m in msgs:
        if not isinstance(m, dict):
            raise HarmonyError(f"messages[{i}] is not an object")
        role = m.get("role")
        if role in ("system", "developer"):
            out.append(Message("developer", DeveloperContent(_text_of(m, i))))
        elif role == "user":
            out.append(Message("user", _text_of(m, i)))
        elif role == "assistant":
            out += _assistant_messages(m, i, declared, calls)
        elif role == "tool":
            out.append(_tool_result(m, i, declared, calls))
        elif role is None:
            raise HarmonyError(f"messages[{i}] has no role")
        else:
            raise HarmonyError(f"messages[{i}]: unknown role {role!r}")
    return out


def _recipient_of(name: str, declared: set[str]) -> str:
    """The harmony recipient of a Chat Completions function name: ``python`` and dotted names
    (``browser.search``) as they are, unless declared as functions; others ``functions.NAME``."""
    builtin = name in BUILTIN_TOOLS and name not in declared
    return name if "." in name or builtin else FUNCTIONS + name


def _header_word(value: str | None, where: str) -> None:
    """A name written into a message header is one word: with whitespace in it the header would
    read back as another recipient (``f to=functions.g``) or as text."""
    if value is not None and (not value or re.search(r"\s", value)):
        raise HarmonyError(f"{where} {value[:80]!r}: a harmony header cannot carry a name that is empty "
                           "or has whitespace in it")


def _header_field(value: str | None, where: str) -> None:
    """A channel or content type: one word (:func:`_header_word`) that is no recipient either
    (``to=python`` would read back as a call) and holds no special token's text (but a content
    type's leading ``<|constrain|>``)."""
    _header_word(value, where)
    if value is not None and (value.startswith("to=") or "<|" in value.removeprefix(CONSTRAIN)):
        raise HarmonyError(f"{where} {value[:80]!r}: a channel or content type cannot be a recipient "
                           "(to=...) or hold a special token")


def function_name(recipient: str) -> str:
    """The Chat Completions name of a call's recipient: ``functions.NAME`` as ``NAME``; a dotted
    one, and ``functions.`` with no name (a model's slip), as the recipient itself, which
    :func:`_recipient_of` reads back unchanged."""
    name = recipient.removeprefix(FUNCTIONS)
    return name if name and "." not in name else recipient


def _call_defaults(recipient: str) -> tuple[str, str | None]:
    """(channel, content type) of a call as harmony writes it: built-ins on analysis, plain;
    functions on commentary, JSON."""
    if recipient.split(".")[0] in BUILTIN_TOOLS:
        return "analysis", None
    return "commentary", f"{CONSTRAIN}json"


def _text_of(m: dict, i: int, key: str = "content") -> str:
    content = m.get(key)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]; bare strings too
        return "".join(_text_part(p, f"messages[{i}].{key}[{j}]") for j, p in enumerate(content))
    raise HarmonyError(f"messages[{i}].{key} must be a string or a list of text parts")


def _text_part(part, where: str) -> str:
    """A content part's text: a string, or ``{"type": "text", "text": ...}``; other parts
    (images, audio...) are an error rather than silently left out."""
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if not isinstance(part, dict):
        got = _kind(part)
    elif part.get("type", "text") == "text":
        got = f"text {_kind(part.get('text'))}"
    else:
        got = f"type {_kind(part['type'])}"
    raise HarmonyError(f"{where} must be a text part (a string or "
                       f"{{\"type\": \"text\", \"text\": \"...\"}}), got {got}")


def _override(m: dict, key: str, default, where: str):
    """``m[key]`` when present (a string or null), else ``default``."""
    if key not in m:
        return default
    if not isinstance(m[key], (str, type(None))):
        raise HarmonyError(f"{where}.{key} must be a string or null")
    return m[key]


def _function_spec(tool, j: int) -> ToolSpec:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise HarmonyError(f"tools[{j}] has no function name")
    if not FUNCTION_NAME.fullmatch(fn["name"]):
        raise HarmonyError(f"tools[{j}]: the function name {fn['name'][:80]!r} must be {FUNCTION_NAME_RULE}")
    description = fn.get("description") or ""
    params = fn.get("parameters")
    if not isinstance(description, str):
        raise HarmonyError(f"tools[{j}] ({fn['name']}): description must be a string")
    if params is not None:
        check_schema(params, f"tools[{j}] ({fn['name']})", "parameters")
    strict = fn.get("strict")  # Chat Completions' default: false
    if strict is not None and not isinstance(strict, bool):
        raise HarmonyError(f"tools[{j}] ({fn['name']}): strict must be true or false, got {strict!r}")
    return ToolSpec(fn["name"], description, params, bool(strict))


# ``{"type": "json_object"}``: any JSON object, written into the prompt as this format.
JSON_OBJECT = ResponseFormat("json_object", {"type": "object"}, "Any JSON object.")


JSON_SCHEMA_SHAPE = '{"type": "json_schema", "json_schema": {"name": str, "schema": {...}}}'


def response_format_problem(fmt, param: str = "response_format", shape: str = JSON_SCHEMA_SHAPE) -> str | None:
    """What is wrong with a ``response_format`` (``text``, ``json_object`` or a ``json_schema``
    whose schema is an object), naming ``param``; None when nothing is. ``shape``: the
    json_schema form the message shows (the Responses API's differs)."""
    if fmt is None or isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object"):
        return None
    schema = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(schema, dict) and "schema" in schema and not isinstance(schema["schema"], dict):
        return f"{param}.json_schema.schema must be a JSON Schema object, got {json.dumps(schema['schema'])[:80]}"
    if (not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(schema, dict)
            or not isinstance(schema.get("name", ""), str) or not isinstance(schema.get("schema", {}), dict)
            or not isinstance(schema.get("description", ""), str)):
        return f'{param} must be {{"type": "text"}}, {{"type": "json_object"}} or {shape}'
    if schema.get("strict") is not None and not isinstance(schema["strict"], bool):
        return f"{param}'s 'strict' must be true or false, got {schema['strict']!r}"
    return None


def response_format_json(fmt: ResponseFormat) -> dict:
    """A ResponseFormat as Chat Completions' ``response_format`` (what :func:`response_formats`
    reads back)."""
    schema = {"name": fmt.name, "schema": fmt.schema}
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def response_formats(fmt, param: str = "response_format") -> list[ResponseFormat]:
    """Chat Completions' ``response_format`` (None, text, json_object or json_schema) as the
    developer message's formats: none or one. HarmonyError names what is wrong (as ``param``)."""
    problem = response_format_problem(fmt, param)
    if problem:
        raise HarmonyError(problem)
    if fmt is None or fmt.get("type") == "text":
        return []
    if fmt.get("type") == "json_object":
        return [JSON_OBJECT]
    js = fmt["json_schema"]
    check_schema(js.get("schema", {}), param, "json_schema.schema")
    return [ResponseFormat(js.get("name", "response"), js.get("schema", {}), js.get("description"))]


def _assistant_messages(m: dict, i: int, declared: set[str], calls: dict) -> list[Message]:
    out = []
    key = next((k for k in REASONING_KEYS if m.get(k) is not None), None)
    if key is not None:
        out.append(Message("assistant", _text_of(m, i, key), channel="analysis"))
    tool_calls = m.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise HarmonyError(f"messages[{i}].tool_calls must be a list")
    content = _text_of(m, i)
    if m.get("content") is None and isinstance(m.get("refusal"), str):  # OpenAI's refusal field
        content = m["refusal"]
    # Empty text beside tool calls is no preamble (clients send "" or null alike) unless its
    # channel is given.
    present = content or m.get("content") is not None and (not tool_calls or "channel" in m)
    if present or not (out or tool_calls):
        where = f"messages[{i}]"
        channel = "commentary" if tool_calls else "final"  # a preamble comes before its calls
        channel, recipient, content_type = (_override(m, key, default, where) for key, default in
                                            (("channel", channel), ("recipient", None), ("content_type", None)))
        _header_word(recipient, f"{where}.recipient")
        for key, value in (("channel", channel), ("content_type", content_type)):
            _header_field(value, f"{where}.{key}")
        if recipient not in NOT_A_CALL:
            raise HarmonyError(f"{where}.recipient {recipient[:80]!r}: a call goes in tool_calls")
        out.append(Message("assistant", content, channel=channel, recipient=recipient, content_type=content_type))
    for j, call in enumerate(tool_calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise HarmonyError(f"{where} has no function name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            try:
                args = json.dumps(args)
            except (TypeError, ValueError):
                raise HarmonyError(f"{where}.function.arguments must be a JSON string") from None
            except RecursionError:
                raise HarmonyError(f"{where}.function.arguments is nested too deeply") from None
        _header_word(fn["name"], f"{where}.function.name")
        recipient = _override(call, "recipient", None, where) or _recipient_of(fn["name"], declared)
        channel, content_type = _call_defaults(recipient)
        channel = _override(call, "channel", channel, where)
        content_type = _override(call, "content_type", content_type, where)
        _header_word(recipient, f"{where}.recipient")
        for key, value in (("channel", channel), ("content_type", content_type)):
            _header_field(value, f"{where}.{key}")
        calls.setdefault(str(call.get("id", f"call_{i}_{j}")), []).append((recipient, channel))
        out.append(Message("assistant", args, channel=channel, recipient=recipient,
                           content_type=content_type))
    if m.get("cut") is not None:  # (our saved chats' own field: the reply was cut short here)
        if m["cut"] not in CUTS or not out:
            raise HarmonyError(f"messages[{i}].cut must be one of {', '.join(CUTS)}, got {str(m['cut'])[:40]!r}")
        out[-1].cut = m["cut"]
    return out


def _tool_result(m: dict, i: int, declared: set[str], calls: dict) -> Message:
    call_id, name = m.get("tool_call_id"), m.get("name")
    if isinstance(call_id, str) and call_id in calls:
        # one id given to several calls (a client's slip): results come in the calls' order
        same = calls[call_id]
        recipient, channel = same.pop(0) if len(same) > 1 else same[0]
    elif isinstance(name, str) and name:
        _header_word(name, f"messages[{i}].name")
        recipient = _recipient_of(name, declared)
        channel = _call_defaults(recipient)[0]
    elif call_id is None and name is None and calls:  # the last call's, as the HF chat template reads it
        recipient, channel = list(calls.values())[-1][-1]
    else:
        raise HarmonyError(f"messages[{i}]: tool result without a name or a known tool_call_id")
    channel = _override(m, "channel", channel, f"messages[{i}]")
    _header_field(channel, f"messages[{i}].channel")
    return Message("tool", _text_of(m, i), channel=channel, recipient="assistant", name=recipient)


def to_chat_completions(messages: list[Message]) -> dict:
    """The inverse of :func:`from_chat_completions`: ``from_chat_completions(to_chat_completions(
    ms))`` renders exactly as ``ms`` does, for the messages a chat produces."""
    out: list[dict] = []
    result: dict = {"messages": out, "reasoning_effort": "medium"}
    declared: set[str] = set()
    calls: dict[str, list[tuple[str, str | None]]] = {}  # recipient -> (id, channel) of its unanswered calls
    answered: dict[str, tuple[str, str | None]] = {}  # recipient -> its last answered call's
    group: list[Message] = []  # assistant messages that fit in one Chat Completions message
    ids = itertools.count(1)

    def flush():
        if group:
            out.append(_assistant_to_chat(group, declared, calls, ids))
            group.clear()

    for m in messages:
        if m.role == "assistant":
            if group and (_slot(m) < _slot(group[-1]) or _slot(m) == _slot(group[-1]) < 2):
                flush()
            group.append(m)
            continue
        flush()
        if m.role != "tool":  # a new turn: calls left unanswered stay so
            calls.clear()
        if m.role == "system" and isinstance(m.content, SystemContent):
            result["reasoning_effort"] = m.content.reasoning_effort or "medium"
        elif m.role == "developer":
            dev = m.content if isinstance(m.content, DeveloperContent) else DeveloperContent(m.text)
            _developer_to_chat(dev, out, result, declared)
        elif m.role == "tool":
            out.append(_tool_to_chat(m, declared, calls, answered))
        else:
            out.append({"role": m.role, "content": m.text})
    flush()
    return result


def _slot(m: Message) -> int:
    """Where a message goes in a Chat Completions assistant message: 0 reasoning, 1 content,
    2 tool calls (harmony's order). Reasoning with a recipient or a content type (``analysis
    <|constrain|>json``, ``analysis to=assistant``) is content, which keeps both."""
    if m.is_tool_call:
        return 2
    return 0 if m.channel == "analysis" and m.recipient is None and m.content_type is None else 1


def _assistant_to_chat(group: list[Message], declared: set[str], calls: dict, ids) -> dict:
    """One Chat Completions assistant message from harmony messages in ``_slot`` order."""
    msg: dict = {"role": "assistant", "content": None}
    tool_calls = []
    if group[-1].cut:
        msg["cut"] = group[-1].cut
    for m in group:
        if _slot(m) == 0:
            msg["reasoning"] = m.text
        elif _slot(m) == 1:
            msg["content"] = m.text
            # the channel is kept where it does not follow from the calls (or empty text would hide it)
            if m.channel != ("commentary" if group[-1].is_tool_call else "final") or not m.text:
                msg["channel"] = m.channel
            for key in ("recipient", "content_type"):  # (``to=assistant``, ``<|constrain|>json``)
                if getattr(m, key) is not None:
                    msg[key] = getattr(m, key)
        else:
            call_id = f"call_{next(ids)}"
            calls.setdefault(m.recipient, []).append((call_id, m.channel))
            tool_calls.append(_call_to_chat(m, call_id, declared))
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def _call_to_chat(m: Message, call_id: str, declared: set[str]) -> dict:
    name = function_name(m.recipient)
    call: dict = {"id": call_id, "type": "function", "function": {"name": name, "arguments": m.text}}
    if _recipient_of(name, declared) != m.recipient:
        call["recipient"] = m.recipient
    channel, content_type = _call_defaults(m.recipient)
    if m.channel != channel:
        call["channel"] = m.channel
    if m.content_type != content_type:
        call["content_type"] = m.content_type
    return call


def _tool_to_chat(m: Message, declared: set[str], calls: dict, answered: dict) -> dict:
    """A tool's result, with the id of the oldest unanswered call to it (results come in the calls'
    order), else of the last one answered."""
    name = function_name(m.name)
    if calls.get(m.name):
        answered[m.name] = calls[m.name].pop(0)
    call_id, channel = answered.get(m.name, ("", _call_defaults(_recipient_of(name, declared))[0]))
    msg = {"role": "tool", "tool_call_id": call_id, "name": name, "content": m.text}
    if m.channel != channel:
        msg["channel"] = m.channel
    return msg


def _developer_to_chat(dev: DeveloperContent, out: list, result: dict, declared: set[str]) -> None:
    if dev.instructions is not None:
        out.append({"role": "system", "content": dev.instructions})
    for fn in dev.functions:
        spec = {"name": fn.name, "description": fn.description}
        if fn.parameters is not None:
            spec["parameters"] = fn.parameters
        if fn.strict:  # (Chat Completions' default is not)
            spec["strict"] = True
        result.setdefault("tools", []).append({"type": "function", "function": spec})
        declared.add(fn.name)
    if dev.response_formats:  # Chat Completions has room for one
        result["response_format"] = response_format_json(dev.response_formats[0])
