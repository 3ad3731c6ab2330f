"""``POST /v1/chat/completions``: OpenAI's Chat Completions, streaming or not. The chain of
thought comes back in ``reasoning_content`` and ``reasoning`` (and is accepted back in history
under either name, or HF's ``thinking``), function calls in ``tool_calls``; ``content`` is only the final answer."""

from __future__ import annotations

import contextlib
import json
import re
import time

from starlette.responses import JSONResponse, StreamingResponse

from ..harmony.chat_completions import JSON_SCHEMA_SHAPE, REASONING_KEYS, response_format_problem
from . import params
from .errors import APIError, bad_request, generation_failed
from .output import CALL, REASONING, TEXT, Closed, Delta, Opened, Waiting
from .service import REQUIRED, WAITING_S, Reply, Service, new_id

MAX_MESSAGES = 65536  # (each message takes a few tokens at least: 131,072 hold fewer)
MAX_TOOLS = 1024  # (each function's description takes tokens of the context too)
# a json_schema's name and a function's, as OpenAI's API takes them (a dotted function name came
# back as another: the model calls functions.x.y, read back as that whole recipient)
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_function_name(name, where: str) -> None:
    if isinstance(name, str) and not SCHEMA_NAME.fullmatch(name):  # (a missing name: harmony's message)
        raise bad_request(f"'{where}' must be letters, digits, _ and - (1 to 64), got {name[:80]!r}",
                          where, code="invalid_value")


def tool_choice(body: dict, tools_key: str = "tools", nested: bool = True) -> tuple[dict, str | None]:
    """(the request with the tools the model may see, the function it must call: named, or
    REQUIRED for any of them). ``none`` hides the tools; a named function is forced by writing
    its call header, ``required`` by the constraint (gptoss_mlx/structured.py). ``nested``:
    Chat Completions' shape of ``allowed_tools`` (else the Responses API's)."""
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return body, None
    if choice == "none":
        return {**body, tools_key: []}, None
    if choice == REQUIRED:
        if not params.function_names(body.get(tools_key)):
            raise bad_request("tool_choice 'required' needs at least one function in 'tools'", "tool_choice")
        return body, REQUIRED
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return allowed_tools(body, choice, tools_key, nested)
    if isinstance(choice, dict) and choice.get("type") == "function":
        return body, named_function(body, choice, tools_key, nested)
    raise bad_request(f"tool_choice {params.shown(choice, 120)} is not supported: use auto, none, "
                      "required, name a function ({\"type\": \"function\", ...}) or list the allowed ones "
                      "({\"type\": \"allowed_tools\", ...})", "tool_choice")


def named_function(body: dict, choice: dict, tools_key: str, nested: bool) -> str:
    """The function a ``{"type": "function", ...}`` tool_choice names: in Chat Completions
    (``nested``) ``{"type": "function", "function": {"name": ...}}``, in the Responses API
    ``{"type": "function", "name": ...}``, and nothing else (the echo is what was asked)."""
    fn = choice.get("function")
    shape = '{"type": "function", "function": {"name": ...}}' if nested else '{"type": "function", "name": ...}'
    name = (fn.get("name") if isinstance(fn, dict) else None) if nested else choice.get("name")
    well_formed = set(choice) == ({"type", "function"} if nested else {"type", "name"}) and (
        not nested or (isinstance(fn, dict) and set(fn) == {"name"}))
    if not well_formed or not isinstance(name, str):
        raise bad_request(f"tool_choice naming a function must be {shape}, got "
                          f"{params.shown(choice, 120)}", "tool_choice")
    if name not in params.function_names(body.get(tools_key)):
        raise bad_request(f"tool_choice names the function {params.shown(name)}, which is not in 'tools'",
                          "tool_choice")
    return name


def allowed_tools(body: dict, choice: dict, tools_key: str, nested: bool) -> tuple[dict, str | None]:
    """tool_choice ``allowed_tools``: the model sees and may call only the functions listed
    (the server's own tools are not among them), freely (mode ``auto``) or at least one
    (``required``). In Chat Completions (``nested``) ``mode`` and ``tools`` sit under the
    choice's ``allowed_tools`` and a tool is ``{"type": "function", "function": {"name": ...}}``;
    in the Responses API they sit in the choice and a tool is ``{"type": "function", "name": ...}``.
    Each listed tool names a function of the request's; other fields are refused (one shape, one
    meaning: the echo is what was asked)."""
    if nested:
        spec, where, entry = choice.get("allowed_tools"), "tool_choice.allowed_tools", \
            '{"type": "function", "function": {"name": ...}}'
    else:
        spec, where, entry = choice, "tool_choice", '{"type": "function", "name": ...}'
    shape = f'{{"mode": "auto" or "required", "tools": [{entry}, ...]}}'
    if nested and spec is None and {"mode", "tools"} & set(choice):
        raise bad_request(f"in Chat Completions, tool_choice of type allowed_tools holds 'mode' and 'tools' "
                          f"under 'allowed_tools': {{\"type\": \"allowed_tools\", \"allowed_tools\": {shape}}}",
                          where)
    if not isinstance(spec, dict):
        raise bad_request(f"'{where}' must be an object like {shape}, got {params.shown(spec)}", where)
    extra = [f"tool_choice.{key}" for key in sorted(set(choice) - {"type", "allowed_tools"})] if nested else []
    extra += [f"{where}.{key}" for key in sorted(set(spec) - {"mode", "tools"} - (set() if nested else {"type"}))]
    if extra:
        raise bad_request(f"'{extra[0]}' is not a field of tool_choice of type allowed_tools: "
                          f"{'its allowed_tools is ' if nested else 'it is '}{shape}", extra[0])
    mode = spec.get("mode")
    if mode not in ("auto", REQUIRED):
        raise bad_request(f"'{where}.mode' must be \"auto\" or \"required\", got {params.shown(mode)}", f"{where}.mode")
    listed = spec.get("tools")
    if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_TOOLS:
        raise bad_request(f"'{where}.tools' must be a list of 1 to {MAX_TOOLS:,} tools like {entry}, got "
                          + (f"{len(listed):,}" if isinstance(listed, list) else params.shown(listed)), f"{where}.tools")
    declared, names = params.function_names(body.get(tools_key)), set()
    for j, tool in enumerate(listed):
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = (fn.get("name") if isinstance(fn, dict) else None) if nested else \
            (tool.get("name") if isinstance(tool, dict) else None)
        keys = {"type", "function"} if nested else {"type", "name"}
        if (not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) != keys
                or not isinstance(name, str) or (nested and set(fn) != {"name"})):
            raise bad_request(f"'{where}.tools[{j}]' must be {entry} naming a function of 'tools', "
                              f"got {params.shown(tool)}", f"{where}.tools[{j}]")
        if name not in declared:
            raise bad_request(f"'{where}.tools[{j}]' names the function {params.shown(name)}, which is not in 'tools'",
                              f"{where}.tools[{j}]")
        names.add(name)
    kept = [t for t in body.get(tools_key) or [] if params.function_names([t]) & names]
    body = {**body, tools_key: kept, "tool_choice": mode, "server_tools": False}
    return body, REQUIRED if mode == REQUIRED else None


def check_messages(messages) -> None:
    """The shapes the harmony conversion relies on, with one message naming the field."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"'messages' has {len(messages):,} messages: at most {MAX_MESSAGES:,} (more than "
                          "any context holds)", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", "messages")
        if m.get("function_call") is not None or m.get("role") == "function":
            raise bad_request(f"{where}: {'function_call' if m.get('role') != 'function' else 'role function'} "
                              "is the deprecated form of function calling: give calls as 'tool_calls' and "
                              "their results as 'tool' messages", "messages")
        if m.get("role") in ("system", "developer", "user", "tool") and m.get("content") is None:
            raise bad_request(f"{where}.content is required in a {m['role']} message", "messages")
        if m.get("content") == []:
            raise bad_request(f"{where}.content is an empty list: give at least one text part", "messages")
        if m.get("role") == "assistant" and m.get("content") is None and not m.get("tool_calls") \
                and not any(isinstance(m.get(k), str) for k in REASONING_KEYS):  # (a reasoning-only turn is one)
            raise bad_request(f"{where}: an assistant message needs content, reasoning or tool_calls", "messages")
        for key in ("name", "tool_call_id", *REASONING_KEYS):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise bad_request(f"{where}.{key} must be a string", "messages")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise bad_request(f"{where}.tool_calls must be a list", "messages")
        for j, call in enumerate(calls or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                    or not isinstance(call.get("id", ""), str)
                    or not isinstance(fn.get("arguments", ""), (str, dict))):
                raise bad_request(f"{where}.tool_calls[{j}] must be {{\"id\": str, \"function\": "
                                  "{\"name\": str, \"arguments\": str}}", "messages")
    check_call_ids(messages)
    check_last_calls_answered(messages)


def check_call_ids(messages: list) -> None:
    """Call ids are non-empty, and a tool message answers a call of its own turn: after a user
    (or system, or developer) message the calls before it are history, unanswerable (as the
    Responses API here)."""
    open_ids: set[str] = set()
    closed: set[str] = set()
    has_result: dict[str, bool] = {}  # by call id: its latest call has its result (a second was taken, helper-154)
    for i, m in enumerate(messages):
        declared: set[str] = set()
        for j, call in enumerate(m.get("tool_calls") or []):
            if "id" in call and not (isinstance(call["id"], str) and call["id"].strip()):
                raise bad_request(f"messages[{i}].tool_calls[{j}].id must be a non-empty string", "messages")
            if call.get("id"):
                if call["id"] in declared:
                    raise bad_request(f"messages[{i}].tool_calls[{j}].id {call['id'][:80]!r} is also an earlier "
                                      "call's of this message: a call's id is its own", "messages")
                declared.add(call["id"])
                open_ids.add(call["id"])
                has_result[call["id"]] = False  # (a client may number each round's calls alike: call_0 again)
        if m.get("role") == "tool" and "tool_call_id" in m:
            answered = m["tool_call_id"]
            if not (isinstance(answered, str) and answered.strip()):
                raise bad_request(f"messages[{i}].tool_call_id must be a non-empty string", "messages")
            if answered in closed and answered not in open_ids:
                raise bad_request(f"messages[{i}]: the call {answered[:80]!r} it answers was left unanswered when "
                                  "the conversation went on: a tool message comes before the next message", "messages")
            if has_result.get(answered):
                raise bad_request(f"messages[{i}]: a second tool message for tool_call_id {answered[:80]!r}: a "
                                  "call has one result", "messages")
            has_result[answered] = True
        if m.get("role") in ("user", "system", "developer"):
            closed |= open_ids
            open_ids = set()


def check_last_calls_answered(messages: list) -> None:
    """As OpenAI's API (and the Responses API here): the calls the conversation ends with each
    have their tool message (by tool_call_id; a call without an id, one of its own), else the
    model would go on after a call it has no result of. (Calls a later user message follows are
    history: a reply stopped at them.)"""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("tool_calls")),
               default=None)
    if last is None or any(m.get("role") in ("user", "system", "developer") for m in messages[last + 1:]):
        return
    results = [m for m in messages[last + 1:] if m.get("role") == "tool"]
    answered = {m.get("tool_call_id") for m in results}
    calls = messages[last]["tool_calls"]
    missing = [c.get("id") for c in calls if c.get("id") and c["id"] not in answered]
    if missing or len(results) < len(calls):
        named = f" (no tool message has tool_call_id {missing[0][:80]!r})" if missing else ""
        raise bad_request(f"messages[{last}]: an assistant message with 'tool_calls' must be followed by a tool "
                          f"message answering each call{named}", "messages")


def check_response_format(fmt, param: str = "response_format", shape: str = JSON_SCHEMA_SHAPE) -> None:
    """``text``, ``json_object`` (any JSON object) or a ``json_schema``: given to the model as
    harmony's response format, and enforced while decoding (gptoss_mlx/structured.py).
    ``shape``: the json_schema form the error message shows (the Responses API's differs)."""
    problem = response_format_problem(fmt, param, shape)
    if problem:
        raise bad_request(problem, param)
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # as OpenAI's API: a name, and a word
        where = f"{param}.json_schema.name" if param == "response_format" else f"{param}.name"
        name = fmt["json_schema"].get("name")
        if name is None:
            raise bad_request(f"'{where}' is missing: the schema's name (letters, digits, _ and -, at most "
                              "64)", where, code="missing_required_parameter")
        if not SCHEMA_NAME.fullmatch(name):
            raise bad_request(f"'{where}' must be letters, digits, _ and - (at most 64), got {name[:80]!r}",
                              where, code="invalid_value")


def check_request(body: dict) -> None:
    check_messages(body.get("messages"))
    params.typed(body, "tools", list, "a list of tools")
    if len(body.get("tools") or []) > MAX_TOOLS:
        raise bad_request(f"'tools' has {len(body['tools']):,} tools: at most {MAX_TOOLS:,}", "tools")
    for j, t in enumerate(body.get("tools") or []):
        if isinstance(t, dict) and isinstance(t.get("function"), dict):
            check_function_name(t["function"].get("name"), f"tools[{j}].function.name")
    params.typed(body, "stream", bool, "true or false")
    params.typed(body, "stream_options", dict, "an object")
    # fields this server keeps nothing of (no stored completions) or gives one answer to, checked
    # as OpenAI checks them (and the Responses API here)
    params.typed(body, "store", bool, "true or false")
    params.typed(body, "parallel_tool_calls", bool, "true or false")
    params.check_metadata(body.get("metadata"))
    params.check_identifiers(body)
    params.one_of(body.get("verbosity"), params.VERBOSITIES, "verbosity")
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or any(m != "text" for m in modalities)):
        raise bad_request(f"'modalities' must be [\"text\"]: this server answers in text only, got "
                          f"{modalities!r:.80}", "modalities")
    if not isinstance((body.get("stream_options") or {}).get("include_usage", False), bool):
        raise bad_request("'stream_options.include_usage' must be true or false", "stream_options")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    if body.get("n") is not None and (type(body["n"]) is not int or body["n"] != 1):
        raise bad_request(f"'n' must be 1 (one choice per request), got {body['n']!r}", "n")
    check_response_format(body.get("response_format"))
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad_request(f"'{key}' is not supported", key)
    for key in ("logit_bias", "logprobs", "top_logprobs", "audio", "prediction"):
        if body.get(key) not in (None, False) and not (key == "logit_bias" and body[key] == {}):  # (asks for nothing)
            raise bad_request(f"'{key}' is not supported by this server", key)
    for key, instead in (("functions", "tools"), ("function_call", "tool_choice")):
        if body.get(key) not in (None, []):  # ignored, the model would never see the functions
            raise bad_request(f"'{key}' is the deprecated form of '{instead}': give '{instead}'", key)


def _effort(body: dict, default: str) -> str:
    """``reasoning_effort``, or where a client sends the Responses API's shape instead
    (OpenRouter's and LiteLLM's clients do) ``reasoning.effort``: it was ignored unchecked."""
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise bad_request("'reasoning' must be an object like {\"effort\": \"low\"}", "reasoning")
    effort = params.effort((reasoning or {}).get("effort"), default, "reasoning.effort")  # checked either way
    if body.get("reasoning_effort") is None:
        return effort
    return params.effort(body["reasoning_effort"], default, "reasoning_effort")


async def chat_completions(service: Service, body: dict, request):
    service.check_model(body)
    check_request(body)
    body, forced_name = tool_choice(body)
    body = {**body, "reasoning_effort": _effort(body, service.reasoning_effort),
            "reasoning_budget": params.reasoning_budget(body, service.reasoning_budget)}
    sampling = params.sampling(body, service.sampling, ("max_completion_tokens", "max_tokens"),
                               service.max_context)
    stops = params.stop_strings(body)
    if stops and (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
        raise bad_request("'stop' cannot be used with a JSON response_format: a stop string would "
                          "cut the JSON answer, which then would not parse", "stop")
    reply = await service.new_reply("chatcmpl", body, forced_name, sampling, stops)
    if body.get("stream"):
        options = body.get("stream_options") or {}
        chunks = stream_chunks(service, reply, request, bool(options.get("include_usage")))
        return StreamingResponse(chunks, media_type="text/event-stream")
    async with contextlib.aclosing(service.generate(reply, request)) as events:
        async for _ in events:
            pass
    return JSONResponse(completion(service, reply))


def usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.output_tokens,
            "total_tokens": reply.prompt_tokens + reply.output_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reply.stream.reasoning_tokens}}


# Between the texts of two messages the user sees in one reply (a preamble, then the answer):
# joined as they were, their words ran together ("scholarsторов", a tester's, helper-154).
PARAGRAPH = "\n\n"


def completion(service: Service, reply: Reply) -> dict:
    items = reply.stream.items
    reasoning = "".join(i.text for i in items if i.kind == REASONING)
    content = PARAGRAPH.join(i.text for i in items if i.kind == TEXT and i.text)
    calls = [{"id": new_id("call"), "type": "function",
              "function": {"name": i.name, "arguments": i.text}} for i in items if i.kind == CALL]
    # null only beside calls, as OpenAI's: a reply with no answer (max_tokens in the reasoning)
    # is "", which a client can send back as history
    message = {"role": "assistant", "content": None if calls and not content else content}
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return {"id": reply.id, "object": "chat.completion", "created": reply.created,
            "model": service.model_name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": reply.finish_reason}],
            "usage": usage(reply)}


async def stream_chunks(service: Service, reply: Reply, request, include_usage: bool):
    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]
        data = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                "model": service.model_name, "system_fingerprint": None, "choices": choices, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    calls, sent, texts = 0, time.monotonic(), set()  # texts: the TEXT items that have sent text
    try:
        async with contextlib.aclosing(service.generate(reply, request)) as events:
            async for event in events:
                item, out = event.item, None
                if isinstance(event, Opened) and item.kind == CALL:
                    out = chunk({"tool_calls": [{"index": calls, "id": new_id("call"), "type": "function",
                                                 "function": {"name": item.name, "arguments": ""}}]})
                elif isinstance(event, Delta) and item.kind == CALL:
                    out = chunk({"tool_calls": [{"index": calls, "function": {"arguments": event.text}}]})
                elif isinstance(event, Delta) and item.kind == REASONING:
                    out = chunk({"reasoning_content": event.text, "reasoning": event.text})
                elif isinstance(event, Delta) and item.kind == TEXT and event.text:
                    # (a second message's text, a preamble's then the answer's: apart, as in completion())
                    out = chunk({"content": (PARAGRAPH if texts and id(item) not in texts else "") + event.text})
                    texts.add(id(item))
                elif isinstance(event, Closed) and item.kind == CALL:
                    calls += 1
                if out is None and (isinstance(event, Waiting) or time.monotonic() - sent >= WAITING_S):
                    # A server tool runs, or its call is written (not streamed here): an SSE
                    # comment, which clients skip, so the stream is not silent for long.
                    out = ": a tool is running\n\n"
                if out is not None:
                    sent = time.monotonic()
                    yield out
    except Exception as e:  # noqa: BLE001 - the stream has begun: report it in the stream
        error = generation_failed(e, reply.id)
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    yield chunk({}, reply.finish_reason)
    if include_usage:
        yield chunk(None, usage=usage(reply))
    yield "data: [DONE]\n\n"
