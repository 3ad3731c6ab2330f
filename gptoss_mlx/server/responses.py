"""``POST /v1/responses``: OpenAI's Responses API, as ``gpt_oss.responses_api`` serves it.

``input`` (a string, or items: messages, ``reasoning``, ``function_call``,
``function_call_output``, ``mcp_call``) becomes a Chat Completions-shaped conversation, then
harmony. Output items are ``reasoning`` (the chain of thought as ``reasoning_text``),
``message``, ``function_call`` (the client's tools) and ``mcp_call`` (a tool the server ran
itself, ``serve --tools/--functions``: its name, arguments or code, and output). With
``store`` (the default) a response is kept, in memory and bounded, so a later request can
continue it with ``previous_response_id``.

Tools the client runs of other kinds than functions, ``custom`` (free text in, as Codex's
``apply_patch``) and ``local_shell``, are given to the model as functions (:func:`client_tools`)
and its calls of them come back as ``custom_tool_call`` and ``local_shell_call`` items. The
functions of a ``namespace`` group (Codex's collaboration tools, an MCP server's) are functions
named ``{namespace}__{name}`` to the model, and calls of them carry their ``namespace`` and name,
as OpenAI's do. Tools of other types (OpenAI's hosted ``web_search``...) are not given to the
model and are listed in the log: Codex sends some in every request, which still works with the
rest.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import sys
from collections import OrderedDict

from starlette.responses import JSONResponse, StreamingResponse

from . import params
from .chat_completions import MAX_MESSAGES, MAX_TOOLS, check_function_name, check_response_format, tool_choice
from .errors import APIError, bad_request, generation_failed
from .output import CALL, REASONING, SERVER_CALL, TEXT, Closed, Delta, Item, Opened, Waiting
from .service import Reply, Service, new_id

log = logging.getLogger("gptoss_mlx.server")

STORED_RESPONSES = 256
# The store's text at most (a request may bring up to 64 MB of input items, kept with it).
STORED_BYTES = 256 << 20
RESPONSES_SCHEMA_SHAPE = '{"type": "json_schema", "name": str, "schema": {...}}'


class ResponseStore:
    """The last ``size`` stored responses, within ``max_bytes`` of text: each one's conversation
    (its input and output items, for ``previous_response_id``) and the response object (for
    ``GET /v1/responses/{id}``). A response under way is shown in progress, cannot be followed
    on from yet, and deleted then is never stored."""

    def __init__(self, size: int = STORED_RESPONSES, max_bytes: int = STORED_BYTES):
        self.size, self.max_bytes = size, max_bytes
        self._kept: OrderedDict[str, tuple[list[dict], dict, int]] = OrderedDict()
        self._bytes = 0
        self._running: dict[str, "ResponseRun"] = {}
        self._deleted: set[str] = set()  # running ones deleted: not stored when they end

    def get(self, response_id, param: str = "previous_response_id") -> list[dict]:
        if response_id in self._running:
            raise APIError(400, f"response {response_id!r} is still in progress: follow on from it once "
                           "it has ended", param=param)
        return self._find(response_id, param)[0]

    def response(self, response_id: str) -> dict:
        if response_id in self._running:
            return self._running[response_id].response("in_progress")
        return self._find(response_id, "response_id")[1]

    def input_items(self, response_id) -> list[dict]:
        """The items a response was made from (the output it added left out)."""
        if response_id in self._running:
            return self._running[response_id].items
        items, response, _ = self._find(response_id, "response_id")
        return items[:len(items) - len(response.get("output") or [])]

    def items_by_id(self) -> dict[str, dict]:
        """Every kept item (input and output) by its id; the newest response's where two share one."""
        return {item["id"]: item for items, _, _ in self._kept.values() for item in items
                if isinstance(item, dict) and isinstance(item.get("id"), str)}

    def delete(self, response_id: str) -> None:
        """Forget a stored response; one under way is stopped (its client's reply ends failed)."""
        if response_id in self._running:
            self._deleted.add(response_id)
            self._running.pop(response_id).stop_deleted()
            return
        self._find(response_id, "response_id")
        self._bytes -= self._kept.pop(response_id)[2]

    def _find(self, response_id, param: str) -> tuple[list[dict], dict, int]:
        if not isinstance(response_id, str) or response_id not in self._kept:
            shown = response_id if not isinstance(response_id, str) or len(response_id) <= 80 else response_id[:80] + "…"
            raise APIError(404, f"no stored response {shown!r} (responses are kept in memory, the "
                           f"last {self.size} within {self.max_bytes >> 20} MB, and only with store=true)",
                           param=param, code="previous_response_not_found" if param == "previous_response_id"
                           else "response_not_found")
        self._kept.move_to_end(response_id)
        return self._kept[response_id]

    def begin(self, run: "ResponseRun") -> None:
        """``run``'s response is under way (until :meth:`end`)."""
        self._running[run.reply.id] = run

    def end(self, response_id: str) -> None:
        self._running.pop(response_id, None)
        self._deleted.discard(response_id)

    def put(self, response_id: str, items: list[dict], response: dict) -> None:
        """Keep ``items`` (the conversation: its input, then ``response``'s output) and ``response``."""
        if response_id in self._deleted:
            return
        size = _text_bytes(items) + _text_bytes(response)
        if size > self.max_bytes:
            log.info("%s is not stored: its items hold %d MB, more than the store's %d MB",
                     response_id, size >> 20, self.max_bytes >> 20)
            return
        self._kept[response_id] = (items, response, size)
        self._bytes += size
        while len(self._kept) > self.size or self._bytes > self.max_bytes:
            self._bytes -= self._kept.popitem(last=False)[1][2]


def _text_bytes(value) -> int:
    """About the memory ``value`` (JSON-like) holds: its strings' (1, 2 or 4 bytes a character,
    as Python stores them), and a little per item. Walked without recursion: a client's field
    nested 900 deep is echoed back and stored (the JSON parser takes up to 1,000)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += sys.getsizeof(item)
        elif isinstance(item, dict):
            total += 16 + sum(len(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            total += 16
            stack.extend(item)
        else:
            total += 8
    return total


def _text(content, where: str, field: str = "content") -> str:
    """A message's ``content`` (or a call output's ``output``): a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "refusal":  # an answer's, sent back
                if not isinstance(part.get("refusal"), str):
                    raise bad_request(f"{where}.{field}[{j}].refusal must be a string", "input")
                parts.append(part["refusal"])
                continue
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}.{field}[{j}]: {kind!r} content is not supported (text only)",
                                  "input")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.{field}[{j}].text must be a string", "input")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{where}: {field} must be a string or a list of text parts", "input")


def kind_of(item: dict) -> str | None:
    """An input item's type (a bare {"role", "content"} is a message)."""
    return item.get("type") or ("message" if "role" in item else None)


# Calls of other tools' kinds (OpenAI's custom tools, as Codex's apply_patch; its local shell)
# in a history made elsewhere: read as the function calls they are to the model (a custom tool's
# text as {"input": ...}, the form of Codex's apply_patch function); their outputs as outputs.
FOREIGN_CALLS = {  # kind: (its field, that field's type, (the function's name, its arguments))
    "custom_tool_call": ("input", str, lambda item: (item.get("name"), {"input": item["input"]})),
    "local_shell_call": ("action", dict, lambda item: ("local_shell", {
        k: v for k, v in item["action"].items() if k != "type"}))}
FOREIGN_OUTPUTS = ("custom_tool_call_output", "local_shell_call_output")
# OpenAI's built-in tools run on its side: what they found is in the answer after them; left out.
BUILT_IN_CALLS = ("web_search_call", "file_search_call", "code_interpreter_call", "image_generation_call",
                  "computer_call", "computer_call_output", "mcp_list_tools", "mcp_approval_request",
                  "mcp_approval_response")


def foreign_item(item: dict, kind: str, where: str) -> dict | None:
    """A history item of another tool's kind as this server's function call or output, None for
    one that is left out, the item itself for one of this server's kinds (or no kind)."""
    if not isinstance(kind, str):
        return item
    # (a local shell's call and output may name the call by the item's id alone)
    call_id = item.get("call_id") if kind.startswith("custom") else item.get("call_id", item.get("id"))
    if kind in FOREIGN_CALLS:
        field, kind_of_field, made = FOREIGN_CALLS[kind]
        name, arguments = made(item) if isinstance(item.get(field), kind_of_field) else (None, None)
        if not isinstance(name, str) or not isinstance(call_id, str):
            raise bad_request(f"{where}: a {kind} needs {'its name, ' if field == 'input' else ''}its 'call_id' and "
                              f"its {field!r} ({'a string' if kind_of_field is str else 'an object'})", "input")
        command = arguments.get("command")
        if kind == "local_shell_call" and not (isinstance(command, list) and command
                                               and all(isinstance(c, str) for c in command)):
            raise bad_request(f"{where}: a local_shell_call's action needs its 'command', a list of strings "
                              f"(the program and its arguments), got {params.shown(command, 80)}", "input")
        return {"type": "function_call", "name": name, "call_id": call_id, "arguments": json.dumps(arguments),
                **({"status": item["status"]} if "status" in item else {})}
    if kind in FOREIGN_OUTPUTS:
        if not isinstance(call_id, str):
            raise bad_request(f"{where}: a {kind} needs its {'call_id' if kind.startswith('custom') else 'id'} "
                              "(the call_id of the call it answers)", "input")
        return {"type": "function_call_output", "call_id": call_id, "output": item.get("output")}
    if kind in BUILT_IN_CALLS:
        return None
    return item


def chat_messages(items: list, first_input: int = 0) -> tuple[list[dict], dict[str, str]]:
    """Responses items -> Chat Completions messages: an assistant turn's reasoning, calls and
    text are gathered into one assistant message, in order. Also where each message and each
    call came from, by its Chat Completions path (``messages[k]``, ``messages[k].tool_calls[j]``
    -> ``input[i]``, counted from ``first_input``; earlier items are the previous response's),
    for the errors that the messages' conversion raises later."""
    out: list[dict] = []
    origins: dict[str, str] = {}
    begun = 0  # messages whose origin is recorded
    assistant: dict | None = None

    def turn(*clash: str) -> dict:
        nonlocal assistant
        if assistant is None or any(assistant.get(k) for k in clash):
            assistant = {"role": "assistant", "content": None}
            out.append(assistant)
        return assistant

    for i, item in enumerate(items):
        where = f"input[{i - first_input}]" if i >= first_input else f"previous_response_id's item {i}"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", "input")
        kind = kind_of(item)
        item = foreign_item(item, kind, where)
        if item is None:
            log.info("%s: leaving out a %s item (OpenAI's built-in tools are not this server's)", where, kind)
            continue
        kind = kind_of(item)
        if kind == "message" and item.get("phase") not in (None, *PHASES):
            raise bad_request(f"{where}.phase must be one of {', '.join(map(repr, PHASES))}, got "
                              f"{params.shown(item['phase'])}", "input")
        if kind == "message" and item.get("role") == "assistant":  # (after calls: the turn goes on)
            target = turn("content", "tool_calls")
            target["content"] = _text(item.get("content"), where)
        elif kind == "message":
            if item.get("content") in (None, []):
                raise bad_request(f"{where}.content is required in a {item.get('role')} message (text, "
                                  "or a list of at least one text part)", "input")
            out.append({"role": item.get("role"), "content": _text(item.get("content"), where)})
            assistant = None
        elif kind == "reasoning":
            parts = item.get("content") or []
            if not isinstance(parts, list):
                raise bad_request(f"{where}: a reasoning item's content must be a list of "
                                  "reasoning_text parts", "input")
            text = "".join(str(p.get("text", "")) for p in parts
                           if isinstance(p, dict) and p.get("type") == "reasoning_text")
            summary = item.get("summary")
            if summary is not None and not (isinstance(summary, list) and all(
                    isinstance(p, dict) and p.get("type") == "summary_text" and isinstance(p.get("text"), str)
                    for p in summary)):  # (kept and listed back as sent: summary=[5], helper-159)
                raise bad_request(f"{where}.summary must be a list of summary_text parts "
                                  "({\"type\": \"summary_text\", \"text\": ...})", "input")
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in parts):
                raise bad_request(f"{where}: a reasoning item's content must be a list of reasoning_text "
                                  "parts with text", "input")
            # without its content (Codex, store=false): this server's encrypted_content, or its
            # summary; a damaged one of this server's is an error beside its content too (helper-154)
            sealed = unsealed_reasoning(item.get("encrypted_content"), where)
            text = text or sealed or "\n\n".join(p["text"] for p in summary or [])  # (ai-sdk's, without store)
            if text:
                target = turn("tool_calls", "content")
                target["reasoning"] = (target.get("reasoning") or "") + text
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("name", "call_id", "arguments")):
                raise bad_request(f"{where}: a function_call needs 'name', 'call_id' and 'arguments' "
                                  "(strings)", "input")
            if item.get("namespace") is not None:  # a function of a namespace group: its name to the model
                if not isinstance(item["namespace"], str):
                    raise bad_request(f"{where}: a function_call's namespace must be a string, got "
                                      f"{params.shown(item['namespace'], 80)}", "input")
                item = {**item, "name": namespaced(item["namespace"], item["name"])}
            if item.get("status") == "incomplete":  # cut short (max_output_tokens): never made
                continue
            calls = turn("content").setdefault("tool_calls", [])
            calls.append({"id": item["call_id"], "type": "function",
                          "function": {"name": item["name"], "arguments": item["arguments"]}})
            origins[f"messages[{len(out) - 1}].tool_calls[{len(calls) - 1}]"] = where
        elif kind == "mcp_call":  # a tool the server ran: its call, then its result
            if not all(isinstance(item.get(k), str) for k in ("name", "arguments")):
                raise bad_request(f"{where}: an mcp_call needs 'name' and 'arguments' (strings)", "input")
            call_id = str(item.get("id") or f"mcp_{i}")
            calls = turn("content").setdefault("tool_calls", [])
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": item["name"], "arguments": item["arguments"]}})
            origins[f"messages[{len(out) - 1}].tool_calls[{len(calls) - 1}]"] = where
            result = item.get("output") if item.get("output") is not None else mcp_error_text(item.get("error"))
            if result is not None and not isinstance(result, str):
                raise bad_request(f"{where}: an mcp_call's output is a string, and its error a string or "
                                  "an error object with 'content' or 'message' (a string)", "input")
            if result is not None:  # the result the model read (a failed call's: its error)
                out.append({"role": "tool", "tool_call_id": call_id, "content": result})
                assistant = None
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request(f"{where}: a function_call_output needs the 'call_id' of its call", "input")
            if item.get("output") is None:
                raise bad_request(f"{where}: a function_call_output needs its 'output' (a string, or a "
                                  "list of text parts)", "input")
            result = {"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"), where, "output")}
            if isinstance(item.get("name"), str):  # (not OpenAI's: the playground's, for a call without an id)
                result["name"] = item["name"]
            out.append(result)
            assistant = None
        elif kind is None:
            raise bad_request(f"{where} has neither a 'type' nor a 'role': a message is "
                              "{\"role\": ..., \"content\": ...}, another item names its type", "input")
        else:
            raise bad_request(f"{where}: items of type {kind!r} are not supported (messages, reasoning, "
                              "function_call, function_call_output and mcp_call are)", "input")
        for k in range(begun, len(out)):  # the messages this item began
            origins[f"messages[{k}]"] = where
        begun = len(out)
    for m, after in zip(out, out[1:]):
        # text the turn goes on from (a call, or reasoning then a call, after it: the model's own
        # order) is a preamble, not the answer that would end the turn and drop its reasoning
        if m["role"] == after["role"] == "assistant" and m.get("content") and not m.get("tool_calls"):
            m["channel"] = "commentary"
    return out, origins


CALL_STATUSES = (None, "completed", "incomplete", "in_progress")  # a function_call item's, as OpenAI's


def check_call_outputs(items: list, first_input: int = 0) -> None:
    """As OpenAI's API: the calls of the conversation's last turn (a previous response's, or
    sent whole) get their outputs before anything else is said (the model would read a call with
    no result), and a call has one output, after it. A call left open in an earlier turn (a reply
    stopped at it) is history, and a call cut short (``incomplete``: by max_output_tokens, or a
    stream closed in it) is not made: neither takes an output."""
    pending: dict[str, tuple[str, int]] = {}  # call_id -> (where, index): the open calls of the last turn
    closed: dict[str, str] = {}  # call_id -> why no output can answer it now
    answered: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i - first_input}]" if i >= first_input else f"previous_response_id's item {i}"
        kind = kind_of(item) if isinstance(item, dict) else None
        said = kind  # (the kind named in messages: the client's)
        if kind in FOREIGN_CALLS or kind in FOREIGN_OUTPUTS:  # a custom tool's or local shell's: as a function's
            item = foreign_item(item, kind, where)
            kind = item["type"]
        call_id = item.get("call_id") if isinstance(item, dict) else None
        if kind in ("function_call", "function_call_output") and call_id is not None and (
                not isinstance(call_id, str) or not call_id.strip()):
            raise bad_request(f"{where}: a {kind}'s call_id must be a non-empty string, got {call_id!r:.80}", "input")
        if kind == "function_call" and item.get("status") not in CALL_STATUSES:
            raise bad_request(f"{where}: a {said}'s status must be one of {', '.join(map(str, CALL_STATUSES[1:]))}, "
                              f"got {json.dumps(item.get('status'))[:80]}", "input")
        if kind == "function_call" and call_id:
            if call_id in pending:  # (its output would answer which?)
                raise bad_request(f"{where}: a second {said} with call_id {call_id[:80]!r} "
                                  f"before the first's output ({pending[call_id][0]})", "input")
            answered.discard(call_id)  # (a later turn's call may reuse an id: its own output)
            closed.pop(call_id, None)
            if item.get("status") == "incomplete":
                closed[call_id] = f"its call ({where}) was cut short (incomplete): it is not made and takes no output"
            else:
                pending[call_id] = (where, i, said)
        elif kind == "function_call_output" and call_id:
            if call_id in answered:
                raise bad_request(f"{where}: a second {said} for call_id "
                                  f"{call_id[:80]!r}: a call has one output", "input")
            # (one with a name answers the function by its name: the playground's, for a result
            # a saved chat holds without its call)
            if call_id not in pending and i >= first_input and not isinstance(item.get("name"), str):
                if call_id in closed:
                    raise bad_request(f"{where}: call_id {call_id[:80]!r}: {closed[call_id]}", "input")
                open_calls = ", ".join(pending) or "none"
                raise bad_request(f"{where}: no {said.removesuffix('_output')} before it has call_id {call_id[:80]!r} "
                                  f"(the calls waiting for an output: {open_calls[:200]})", "input")
            answered.add(call_id)
            pending.pop(call_id, None)
        elif kind == "message" and item.get("role") != "assistant":
            if i >= first_input and any(at < first_input for _, at, _ in pending.values()):
                break  # the previous response's calls, unanswered before the conversation goes on
            for left, (call_where, *_) in pending.items():  # a turn went on past its open calls: history
                closed[left] = (f"its call ({call_where}) was left unanswered when the conversation went "
                                f"on ({where}): an output comes before the next message")
            pending.clear()
    if pending:
        call_id, (where, _, said) = next(iter(pending.items()))
        raise bad_request(f"No tool output found for {'function call' if said == 'function_call' else said} "
                          f"{call_id[:80]} ({where}): send its {said}_output before the conversation goes on", "input")


# What the Responses API's ``include`` may ask for. Of these only reasoning.encrypted_content is
# made here (its text, which Codex sends back without the content); the rest (hosted tools,
# images, logprobs) is accepted and left out.
INCLUDABLE = ("code_interpreter_call.outputs", "computer_call_output.output.image_url",
              "file_search_call.results", "message.input_image.image_url", "message.output_text.logprobs",
              "reasoning.encrypted_content", "web_search_call.action.sources", "web_search_call.results")


def mcp_error_text(error):
    """An mcp_call's error as the text the model read: OpenAI's error object (its ``content``, or
    its ``message``) or a plain string. Anything else is returned as is (and refused)."""
    if isinstance(error, dict):
        text = error.get("content") if error.get("content") is not None else error.get("message")
        return text if isinstance(text, str) else error
    return error


def check_include(include) -> None:
    if include is None:
        return
    if not isinstance(include, list) or not all(isinstance(v, str) for v in include):
        raise bad_request("'include' must be a list of strings", "include")
    unknown = [v for v in include if v not in INCLUDABLE]
    if unknown:
        raise bad_request(f"'include' has {unknown[0]!r}, which is not one of: {', '.join(INCLUDABLE)}",
                          "include")


SUMMARIES = ("auto", "concise", "detailed")  # reasoning.summary's values (OpenAI's)
PHASES = ("commentary", "final_answer")  # an assistant message's phase: a preamble, or the answer (OpenAI's)
# Parameters whose effect the answer would silently lack: refused, saying what to do instead.
UNSUPPORTED = {
    "conversation": "conversations are not kept by this server: send the earlier turns in 'input', or "
                    "continue a stored response with 'previous_response_id'",
    "background": "background responses are not supported by this server: leave 'background' out "
                  "(the response comes when done, or as it is made with 'stream': true)",
    "prompt": "stored prompt templates are not supported by this server: send the instructions and "
              "input themselves",
    "top_logprobs": "'top_logprobs' is not supported by this server",
    # Chat Completions' own, which the Responses API does not have (OpenAI's: "Unknown parameter");
    # taken and ignored, an answer ran past its stop string
    "stop": "'stop' is a Chat Completions parameter; the Responses API has none (this server would not stop at it)",
    "max_tokens": "'max_tokens' is a Chat Completions parameter; the Responses API's is 'max_output_tokens'",
    "n": "'n' is a Chat Completions parameter; the Responses API makes one response a request",
    "frequency_penalty": "'frequency_penalty' is not supported by this server",
    "presence_penalty": "'presence_penalty' is not supported by this server",
    "logit_bias": "'logit_bias' is not supported by this server",
}


def check_unsupported(body: dict) -> None:
    for key, message in UNSUPPORTED.items():
        if body.get(key) not in (None, False, 0, [], {}):  # (those ask for nothing)
            raise bad_request(message, key)


# A local_shell tool as the function the model calls (its arguments: the call's ``action``, as
# FOREIGN_CALLS takes a local_shell_call back).
LOCAL_SHELL = {
    "type": "function", "name": "local_shell", "strict": False,
    "description": "Runs a command on the user's machine and returns its output.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["command"], "properties": {
        "command": {"type": "array", "items": {"type": "string"},
                    "description": "The program and its arguments, e.g. [\"bash\", \"-lc\", \"ls\"]"},
        "working_directory": {"type": "string"}, "timeout_ms": {"type": "integer"},
        "env": {"type": "object", "additionalProperties": {"type": "string"}}}}}


def namespaced(namespace: str, name: str) -> str:
    """The name the model knows a namespace group's function by."""
    return f"{namespace}__{name}"


def client_tools(tools) -> tuple[list[dict], dict[str, str], dict[str, tuple[str, str]]]:
    """(the function tools the model is given, ``{name: "custom" or "local_shell"}`` for those
    that stand for a tool of another kind, ``{name: (namespace, its name there)}`` for a
    namespace group's functions). A custom tool takes one string, ``{"input": ...}`` (its
    grammar, if any, is told in its description: not held to). Tools of other types are left
    out (the module's docstring)."""
    if tools is None:
        return [], {}, {}
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list", "tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' has {len(tools):,} tools: at most {MAX_TOOLS:,}", "tools")
    functions, kinds, spaces, others = [], {}, {}, []
    for j, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise bad_request(f"tools[{j}] must be an object with a 'type', got {params.shown(t, 80)}", f"tools[{j}]")
        kind = t["type"]
        if kind == "function":
            check_function_name(t.get("name"), f"tools[{j}].name")
            if isinstance(t.get("name"), str) and t["name"] in kinds:
                raise bad_request(f"tools[{j}]: the name {t['name']!r} is already a tool's in 'tools' (a "
                                  f"{kinds[t['name']]} tool's)", f"tools[{j}].name")
            functions.append(t if t.get("strict") is not None else {**t, "strict": True})  # (the API's default)
        elif kind in ("custom", "local_shell"):
            if kind == "local_shell" and set(t) != {"type"}:
                field = sorted(set(t) - {"type"})[0]
                raise bad_request(f"tools[{j}]: a local_shell tool has no field {field!r}", f"tools[{j}].{field}")
            function = custom_function(t, j) if kind == "custom" else LOCAL_SHELL
            if function["name"] in kinds or any(f.get("name") == function["name"] for f in functions):
                raise bad_request(f"tools[{j}]: the name {function['name']!r} is already a tool's in 'tools' "
                                  f"(a {kind} tool's name is the model's for it, as a function's)", f"tools[{j}].name")
            functions.append(function)
            kinds[function["name"]] = kind
        elif kind == "namespace":
            for k, inner, function in namespace_functions(t, j):
                if any(f.get("name") == function["name"] for f in functions):
                    raise bad_request(f"tools[{j}].tools[{k}]: the name the model calls it by, {function['name']!r}, "
                                      "is already a tool's in 'tools'", f"tools[{j}].tools[{k}].name")
                functions.append(function)
                spaces[function["name"]] = (t["name"], t["tools"][k]["name"])
                if inner == "custom":
                    kinds[function["name"]] = inner
        else:
            others.append(kind)
    if others:
        log.info("left out tools of types %s: the model is given function, custom and local_shell tools",
                 ", ".join(sorted(set(others))))
    return functions, kinds, spaces


def namespace_functions(group: dict, j: int) -> list[tuple[int, str, dict]]:
    """A namespace group's tools (``{"type": "namespace", "name", "description", "tools": [function
    and custom tools]}``), each as (its index, its type, the function the model calls by its
    ``namespaced`` name); the group's description leads its first tool's."""
    name = group.get("name")
    if not isinstance(name, str):
        raise bad_request(f"tools[{j}]: a namespace needs its 'name' (a string)", f"tools[{j}].name")
    check_function_name(name, f"tools[{j}].name")
    if not isinstance(group.get("description") or "", str):
        raise bad_request(f"tools[{j}].description must be a string, got {params.shown(group['description'], 80)}",
                          f"tools[{j}].description")
    if not isinstance(group.get("tools"), list):
        raise bad_request(f"tools[{j}]: a namespace needs its 'tools' (a list)", f"tools[{j}].tools")
    out = []
    for k, t in enumerate(group["tools"]):
        where = f"tools[{j}].tools[{k}]"
        kind = t.get("type", "function") if isinstance(t, dict) else None
        if kind not in ("function", "custom"):
            raise bad_request(f"{where}: a namespace holds function and custom tools, got "
                              f"{params.shown(t, 80)}", f"{where}.type")
        if not isinstance(t.get("name"), str):
            raise bad_request(f"{where}: a namespace's {kind} tool needs its 'name' (a string)", f"{where}.name")
        check_function_name(t["name"], f"{where}.name")
        flat = namespaced(name, t["name"])
        if len(flat) > 64:
            raise bad_request(f"{where}: the namespace and the name together are the name the model calls, "
                              f"{flat[:80]!r}: at most 64 characters, got {len(flat)}", f"{where}.name")
        function = custom_function({**t, "name": flat}, j) if kind == "custom" else {
            **t, "type": "function", "name": flat, **({} if t.get("strict") is not None else {"strict": True})}
        if not out and group.get("description") and isinstance(function.get("description") or "", str):
            function["description"] = (f"{name}: {group['description']}\n\n"
                                       + (function.get("description") or "")).strip()
        out.append((k, kind, function))
    return out


def custom_function(tool: dict, j: int) -> dict:
    """A custom tool (``{"type": "custom", "name", "description"?, "format"?}``) as a function
    of one string."""
    unknown = set(tool) - {"type", "name", "description", "format"}
    if unknown:
        raise bad_request(f"tools[{j}]: a custom tool has no field {sorted(unknown)[0]!r}",
                          f"tools[{j}].{sorted(unknown)[0]}")
    if not isinstance(tool.get("name"), str):
        raise bad_request(f"tools[{j}]: a custom tool needs its 'name' (a string)", f"tools[{j}].name")
    check_function_name(tool["name"], f"tools[{j}].name")
    if not isinstance(tool.get("description") or "", str):
        raise bad_request(f"tools[{j}].description must be a string, got {params.shown(tool['description'], 80)}",
                          f"tools[{j}].description")
    fmt = tool.get("format") or {"type": "text"}
    grammar = isinstance(fmt, dict) and fmt.get("type") == "grammar"
    if not (isinstance(fmt, dict) and (fmt == {"type": "text"} or grammar and isinstance(fmt.get("definition"), str)
                                       and fmt.get("syntax") in ("lark", "regex"))):
        raise bad_request(f"tools[{j}].format must be {{\"type\": \"text\"}} or {{\"type\": \"grammar\", "
                          f"\"syntax\": \"lark\" or \"regex\", \"definition\": str}}, got {params.shown(fmt, 120)}",
                          f"tools[{j}].format")
    description = tool.get("description") or ""
    if grammar:
        description += f"\n\nThe input follows this {fmt['syntax']} grammar:\n{fmt['definition']}"
    return {"type": "function", "name": tool["name"], "description": description.strip(), "strict": True,
            "parameters": {"type": "object", "additionalProperties": False, "required": ["input"],
                           "properties": {"input": {"type": "string", "description": "The tool's input, as text"}}}}


def as_function_choice(choice, kinds: dict[str, str]):
    """A tool_choice naming a custom tool (``{"type": "custom", "name": ...}``, alone or among
    allowed_tools, where ``{"type": "local_shell"}`` may be listed too) or a namespace group's
    tool (with its ``namespace``), as the function that stands for it; a tool named with the other
    kind's type is a 400 (tool_choice checks the rest). ``kinds``: :func:`client_tools`'."""
    def named(entry, where: str, listed: bool):
        if not isinstance(entry, dict):
            return entry
        if listed and entry == {"type": "local_shell"}:
            if "local_shell" not in kinds.values():
                raise bad_request(f"{where} lists local_shell, which is not in 'tools'", where)
            return {"type": "function", "name": "local_shell"}
        if isinstance(entry.get("namespace"), str) and isinstance(entry.get("name"), str):  # a group's tool
            entry = {k: v for k, v in entry.items() if k != "namespace"} | {
                "name": namespaced(entry["namespace"], entry["name"])}
        name = entry.get("name") if isinstance(entry.get("name"), str) else None
        if entry.get("type") == "custom":
            if set(entry) != {"type", "name"} or not isinstance(name, str):
                raise bad_request(f"{where} naming a custom tool must be {{\"type\": \"custom\", \"name\": ...}}, "
                                  f"got {params.shown(entry, 120)}", where)
            if kinds.get(name) != "custom":
                raise bad_request(f"{where} names the custom tool {params.shown(name)}, which is not a custom tool "
                                  "in 'tools'", where)
            return {**entry, "type": "function"}
        if entry.get("type") == "function" and kinds.get(name) == "custom":
            raise bad_request(f"{where} names {params.shown(name)} as a function: it is a custom tool "
                              f"({{\"type\": \"custom\", \"name\": {params.shown(name)}}})", where)
        return entry

    if isinstance(choice, dict) and choice.get("type") == "allowed_tools" and isinstance(choice.get("tools"), list):
        return {**choice, "tools": [named(t, f"tool_choice.tools[{k}]", True) for k, t in enumerate(choice["tools"])]}
    return named(choice, "tool_choice", False)


def response_format(body: dict) -> dict | None:
    """``text.format`` as Chat Completions' ``response_format`` (the schema's fields sit one
    level up in the Responses API)."""
    text = body.get("text") or {}
    fmt = text.get("format") if isinstance(text, dict) else text
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if "json_schema" in fmt or "schema" not in fmt:
            # Chat Completions' nesting, or no schema: either would leave the answer unconstrained
            raise bad_request("text.format of type json_schema needs its 'schema' (an object) beside "
                              "'name', not nested in 'json_schema': " + RESPONSES_SCHEMA_SHAPE, "text.format")
        if not isinstance(fmt["schema"], dict):
            raise bad_request(f"'text.format.schema' must be a JSON Schema object, got "
                              f"{json.dumps(fmt['schema'])[:80]}", "text.format.schema")
        fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    check_response_format(fmt, "text.format", RESPONSES_SCHEMA_SHAPE)
    return fmt


def input_items(body: dict, store: ResponseStore) -> tuple[list[dict], int]:
    """The whole conversation's items: the previous response's, then this request's input (and
    where that starts)."""
    given = body.get("input")
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    elif not isinstance(given, list):
        raise bad_request("'input' must be a string or a list of items", "input")
    if len(given) > MAX_MESSAGES:  # (an item is a message, or part of one)
        raise bad_request(f"'input' has {len(given):,} items: at most {MAX_MESSAGES:,} (more than any "
                          "context holds)", "input")
    previous_id = params.typed(body, "previous_response_id", str, "a response id")
    if previous_id == "":  # (taken as absent, the earlier turns were silently left out)
        raise bad_request("'previous_response_id' is empty: give a response's id, or leave it out",
                          "previous_response_id")
    previous = store.get(previous_id) if previous_id else []
    if any(isinstance(item, dict) and item.get("type") == "item_reference" for item in given):
        given = referenced(given, store)
    taken = {item.get("id") for item in previous if isinstance(item, dict)}
    seen: dict[str, int] = {}
    for j, item in enumerate(given):  # the previous response's own items sent again: the model would read them twice
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] in taken:
            raise bad_request(f"Duplicate item found with id {item['id'][:80]}: it is already in the "
                              f"conversation of previous_response_id; remove it from the input", "input")
        if isinstance(item, dict) and item.get("id") is not None and item.get("type") != "item_reference":
            if not (isinstance(item["id"], str) and item["id"].strip()):  # (5 was taken, "" twice a duplicate)
                raise bad_request(f"input[{j}].id must be a non-empty string, got {json.dumps(item['id'])[:80]}", "input")
            if item["id"] in seen:  # (two items of one id were both taken: a tester's, helper-154)
                raise bad_request(f"Duplicate item found with id {item['id'][:80]}: input[{seen[item['id']]}] and "
                                  f"input[{j}] (an item's id is its own)", "input")
            seen[item["id"]] = j
    return previous + [_with_id(item, taken) for item in given], len(previous)


def referenced(given: list, store: ResponseStore) -> list:
    """``input`` with each ``item_reference`` replaced by the stored item it names (what ai-sdk
    sends for the earlier turns' output under store=true); a 404 naming one not kept."""
    kept = store.items_by_id()
    out, seen = [], set()
    for j, item in enumerate(given):
        if isinstance(item, dict) and item.get("type") == "item_reference":
            if not isinstance(item.get("id"), str):  # (a 404 said "no stored item 'None'": a tester's)
                raise bad_request(f"input[{j}]: an item_reference needs the 'id' of a stored item, got "
                                  f"{str(item.get('id'))[:80]!r}", "input")
            found = kept.get(item["id"])
            if found is None:
                shown = str(item.get("id"))[:80]
                raise APIError(404, f"input[{j}]: no stored item {shown!r} (items are kept with their "
                               f"responses: the last {store.size}, and only with store=true)", param="input")
            if item["id"] in seen:  # (the model would read it twice, out of its place)
                raise bad_request(f"input[{j}]: Duplicate item found with id {item['id'][:80]}", "input")
            item = found
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            seen.add(item["id"])
        out.append(item)
    return out


ITEM_PREFIXES = {"message": "msg", "reasoning": "rs", "function_call": "fc", "function_call_output": "fco",
                 "mcp_call": "mcp"}


def _with_id(item, taken: set):
    """An input item with an id of its own (as the API gives one; one given twice in the
    conversation is replaced in the second, as pages of the list go on from an id), for listing
    it later. ``taken``: the ids before it, this one's added."""
    if not isinstance(item, dict):
        return item
    if kind_of(item) == "local_shell_call_output" and "call_id" not in item and not isinstance(item.get("id"), str):
        return item  # (its id names its call: none given is refused by name, foreign_item)
    if not isinstance(item.get("id"), str) or item["id"] in taken:
        kind = kind_of(item)  # (any JSON value here: a list or object is refused later, by name)
        item = {**item, "id": new_id(ITEM_PREFIXES.get(kind, "item") if isinstance(kind, str) else "item")}
    taken.add(item["id"])
    return item


def retrieved(store: ResponseStore, response_id: str, query) -> dict:
    """GET /v1/responses/{id}: the stored response, its reasoning sealed where this request's
    ``include`` asks (OpenAI's: what the create call asked for does not decide it).
    ``stream=true`` (the SDK's way back into a stream) is OpenAI's for background responses
    only: answered with the JSON, the SDK read an empty stream and said nothing until
    get_final_response() failed."""
    response = store.response(response_id)  # (an unknown id: a 404 first)
    stream = query.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise bad_request(f"'stream' must be true or false, got {query.get('stream')!r:.40}", "stream")
    if stream == "true":
        raise bad_request("stream=true on GET /v1/responses/{id} resumes a background response, and this server "
                          "makes none: GET it without stream (a response under way shows in_progress), or "
                          "stream a response as it is made (POST /v1/responses with stream: true)", "stream")
    include = query.getlist("include") + query.getlist("include[]")
    check_include(include)
    sealed = "reasoning.encrypted_content" in include
    output = [_sealed(item, sealed) if item.get("type") == "reasoning" else item for item in response.get("output") or []]
    return {**response, "output": output}


def _sealed(item: dict, sealed: bool) -> dict:
    """A reasoning item as ``include`` asks: with its ``encrypted_content`` (once whole), or without."""
    item = {k: v for k, v in item.items() if k != "encrypted_content"}
    if sealed and item.get("status") != "in_progress":
        item["encrypted_content"] = sealed_reasoning("".join(p.get("text", "") for p in item.get("content") or []))
    return item


def list_input_items(items: list, query) -> dict:
    """GET /v1/responses/{id}/input_items: a page of the items the response was made from (the
    previous responses' and its own input), newest first unless ``order=asc``; ``after`` or
    ``before`` an item's id (the page that follows it, or ends just before it), ``limit`` 1 to
    100 (20)."""
    limit = query.get("limit", "20")
    digits = limit.lstrip("0")  # ASCII, 3 digits: "²" and "٥" are str.isdigit()'s, int() takes no 4,301
    count = int(digits or "0") if limit.isascii() and limit.isdigit() and len(digits) <= 3 else 0
    if not 1 <= count <= 100:
        raise bad_request(f"limit must be a whole number from 1 to 100, got {limit[:40]!r}", "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order[:40]!r}", "order")
    listed = [_listed(item) for item in items if isinstance(item, dict)]
    if order == "desc":
        listed.reverse()
    start, end = 0, len(listed)
    ids = [item.get("id") for item in listed]
    for key in ("after", "before"):  # (before was ignored: a tester's)
        if key in query and query[key] not in ids:
            raise bad_request(f"{key}: no item {query[key][:80]!r} in this response's input", key)
    if "after" in query:
        start = ids.index(query["after"]) + 1
    if "before" in query:
        end = ids.index(query["before"])
        start = max(start, end - count) if "after" not in query else start
    page = listed[start:min(end, start + count)]
    more = start + count < end if "before" not in query else start > 0
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": more}


def _listed(item: dict) -> dict:
    """An input item as the API lists it: a message's text as a list of text parts."""
    if kind_of(item) != "message":
        return item
    content = item.get("content")
    if isinstance(content, str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        content = [{"type": part, "text": content}]
    return {**item, "type": "message", "content": content}


SERVER_LABEL = "gptoss-mlx"  # the "MCP server" of the tools a server runs itself


ENCRYPTED_PREFIX = "gptoss-mlx.reasoning.v1:"


def sealed_reasoning(text: str) -> str:
    """A reasoning item's ``encrypted_content`` (include ``reasoning.encrypted_content``): its
    text, base64, not encrypted (the client has the text anyway). Clients that keep no state
    (Codex with store=false) send reasoning back as this alone, without its content."""
    return ENCRYPTED_PREFIX + base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


def unsealed_reasoning(sealed, where: str = "input") -> str:
    """The text of this server's ``encrypted_content``; "" for another's (OpenAI's is
    encrypted with their key: nothing a local model can read). One of this server's that does
    not decode is a 400 (it was left out without a word: the chain of thought lost)."""
    if sealed is not None and not isinstance(sealed, str):
        raise bad_request(f"{where}.encrypted_content must be a string, got {json.dumps(sealed)[:80]}", "input")
    if sealed is None or not sealed.startswith(ENCRYPTED_PREFIX):
        return ""
    try:
        return base64.b64decode(sealed[len(ENCRYPTED_PREFIX):], validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise bad_request(f"{where}.encrypted_content is this server's ({ENCRYPTED_PREFIX}...) but damaged: "
                          "it does not decode to the reasoning's text; send it as it was given", "input") from None


def output_item(item: Item, ids: dict, status: str = "completed", sealed: bool = False,
                kinds: dict | None = None, spaces: dict | None = None) -> dict:
    """A server call's output is its result (None while it runs, or when it never ran); an
    error result is its ``error`` too, and the call ``failed``. ``sealed``: reasoning carries
    its ``encrypted_content`` (once whole). ``kinds``: the functions that stand for a custom
    tool or local_shell (:func:`client_tools`), whose calls come back as those tools' calls;
    ``spaces``: the functions of namespace groups, whose calls carry their namespace."""
    item_id, call_id = ids[id(item)]
    if item.cut and status == "completed":
        status = "incomplete"
    if item.kind == SERVER_CALL:
        done = "incomplete" if item.result is None else "failed" if item.failed else "completed"
        return {"id": item_id, "type": "mcp_call", "server_label": SERVER_LABEL, "name": item.name,
                "arguments": item.text, "output": item.result,
                "error": {"type": "mcp_tool_execution_error", "content": item.result} if item.failed else None,
                "status": "in_progress" if status == "in_progress" else done}
    if item.kind == REASONING:
        out = {"id": item_id, "type": "reasoning", "summary": [], "status": status,
               "content": [{"type": "reasoning_text", "text": item.text}]}
        if sealed and status != "in_progress":
            out["encrypted_content"] = sealed_reasoning(item.text)
        return out
    if item.kind == CALL and (kinds or {}).get(item.name):
        out = foreign_call(item, kinds[item.name], item_id, call_id, status)
        if (spaces or {}).get(item.name):  # a custom tool of a namespace group
            out["namespace"], out["name"] = spaces[item.name]
        return out
    if item.kind == CALL and (spaces or {}).get(item.name):
        namespace, name = spaces[item.name]
        return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "namespace": namespace,
                "arguments": item.text, "status": status}
    if item.kind == CALL:
        return {"id": item_id, "type": "function_call", "call_id": call_id, "name": item.name,
                "arguments": item.text, "status": status}
    # phase: a preamble (commentary, before tool calls) told from the final answer, as OpenAI's
    # own messages are (a tester saw two messages a client could not tell apart, helper-154)
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "phase": PHASES[0] if item.channel == "commentary" else PHASES[1],
            "content": [] if status == "in_progress" else [_text_part(item.text)]}


def foreign_call(item: Item, kind: str, item_id: str, call_id: str, status: str) -> dict:
    """The model's call of a function standing for a custom tool or local_shell, as that tool's
    call item (its arguments, cut short, give an empty input or command: incomplete)."""
    try:
        arguments = json.loads(item.text) if status != "in_progress" else {}
    except ValueError:
        arguments = {}
    if not isinstance(arguments, dict):
        arguments = {}
    if kind == "custom":
        text = arguments.get("input")
        if not isinstance(text, str) and status == "completed":
            status = "incomplete"
        return {"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": item.name,
                "input": paired(text) if isinstance(text, str) else partial_input(item.text), "status": status}
    command = arguments.get("command")
    if not (isinstance(command, list) and command) and status == "completed":
        status = "incomplete"
    action = {"type": "exec", "command": command if isinstance(command, list) else [],
              "env": arguments.get("env") if isinstance(arguments.get("env"), dict) else {},
              **{key: arguments.get(key) for key in ("timeout_ms", "working_directory", "user")}}
    return {"id": item_id, "type": "local_shell_call", "call_id": call_id, "action": action, "status": status}


def partial_input(arguments: str) -> str:
    """A custom tool's text so far, from the arguments of the function standing for it as the
    model writes them (``{"input": "...``): the string's whole characters, to its closing quote
    (an escape still being written waits for its end)."""
    start = re.match(r'\s*\{\s*"input"\s*:\s*"', arguments)
    if not start:
        return ""
    body, i = arguments[start.end():], 0
    while i < len(body) and body[i] != '"':  # its closing quote, if written (what follows it: not text)
        i += 2 if body[i] == "\\" else 1
    if i < len(body):
        body = body[:i]
    for end in range(len(body), max(-1, len(body) - 13), -1):  # (an unfinished escape: 12 characters at most)
        try:
            text = json.loads(f'"{body[:end]}"')
        except ValueError:
            continue
        return paired(text[:-1] if text and "\ud800" <= text[-1] <= "\udbff" else text)  # (its pair's half to come)
    return ""


def paired(text: str) -> str:
    """``text`` with a surrogate escape that has no pair (``"\\ud83d x"``: JSON takes it, UTF-8
    cannot hold it) as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseRun:
    """One /v1/responses request: its reply, the ids of its output items, its response object."""

    def __init__(self, service: Service, store: ResponseStore, body: dict, request):
        service.check_model(body)
        self.service, self.store, self.body, self.request = service, store, body, request
        params.typed(body, "instructions", str, "a string")
        params.typed(body, "stream", bool, "true or false")
        params.typed(body, "store", bool, "true or false")
        params.typed(body, "stream_options", dict, "an object")
        if body.get("stream_options") is not None and not body.get("stream"):  # (as Chat Completions)
            raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
        params.typed(body, "text", dict, "an object ({\"format\": {...}})")
        params.typed(body, "reasoning", dict, "an object ({\"effort\": ...})")
        check_include(body.get("include"))
        params.check_metadata(body.get("metadata"))
        params.check_identifiers(body)
        params.typed(body, "parallel_tool_calls", bool, "true or false")
        check_unsupported(body)
        self.items, first_input = input_items(body, store)
        messages, self.origins = chat_messages(self.items, first_input)
        check_call_outputs(self.items, first_input)
        self.shift = 0  # messages before the items' (the instructions')
        if body.get("instructions"):
            messages, self.shift = [{"role": "system", "content": body["instructions"]}, *messages], 1
        reasoning = body.get("reasoning") or {}
        if not isinstance(reasoning, dict):
            raise bad_request("'reasoning' must be an object like {\"effort\": \"low\"}", "reasoning")
        self.effort = params.effort(reasoning.get("effort"), service.reasoning_effort, "reasoning.effort")
        # taken (Codex sends summary "auto") and checked; no summary is made, so none comes back
        for key in ("summary", "generate_summary"):
            params.one_of(reasoning.get(key), SUMMARIES, f"reasoning.{key}")
        params.one_of((body.get("text") or {}).get("verbosity"), params.VERBOSITIES, "text.verbosity")
        functions, self.kinds, self.spaces = client_tools(body.get("tools"))
        chat = {"messages": messages, "tools": functions, "tool_choice": as_function_choice(body.get("tool_choice"), self.kinds),
                "reasoning_effort": self.effort,
                "reasoning_budget": params.reasoning_budget(body, service.reasoning_budget)}
        chat["response_format"] = response_format(body)
        # calls the server answers itself (its tools: --browser, --python, --functions), at most
        chat["max_tool_calls"] = params.integer(body, "max_tool_calls", lo=0)
        if body.get("truncation") not in (None, "auto", "disabled"):
            raise bad_request(f"'truncation' must be \"auto\" or \"disabled\", got {body['truncation']!r}",
                              "truncation")
        chat["truncation"] = body.get("truncation") or "disabled"
        chat, forced_name = tool_choice(chat, nested=False)
        if not chat["messages"]:
            raise bad_request("'input' is empty", "input")
        sampling = params.sampling(body, service.sampling, ("max_output_tokens",), service.max_context)
        self._request = (chat, forced_name, sampling)
        self.reply: Reply | None = None  # made by prepare()
        self.ids: dict[int, tuple[str, str | None]] = {}
        self.error: APIError | None = None
        self.answered: set[int] = set()  # id(server tool call) whose result was reported
        self.sent: dict[int, str] = {}  # id(item) -> its text in the deltas streamed so far
        self.whole: set[int] = set()  # id(item) of the items whose done event was streamed

    async def prepare(self) -> None:
        """The reply (its prompt rendered and tokenized: see Service.new_reply)."""
        chat, forced_name, sampling = self._request
        try:
            self.reply = await self.service.new_reply("resp", chat, forced_name, sampling, [])
        except APIError as e:  # this API's names: text.format for the schema, input for messages
            e.param = {"response_format": "text.format", "messages": "input"}.get(e.param, e.param)
            e.message = re.sub(r"messages\[(\d+)\](\.tool_calls\[\d+\](?:\.function\b)?)?", self._origin, e.message)
            e.message = re.sub(r"^response format\b", "text.format", e.message)
            e.message = re.sub(r"^response_format: json_schema\.", "text.format.", e.message)
            raise

    def _origin(self, found: re.Match) -> str:
        """A message's or a call's path in the input items (a call's function.name: its name)."""
        k = int(found.group(1)) - self.shift
        if k < 0:
            return "instructions"
        call = re.sub(r"\.function$", "", found.group(2) or "")
        where = self.origins.get(f"messages[{k}]{call}")
        if where is None:  # not a call of the items' (or no call): the message's own path
            return self.origins.get(f"messages[{k}]", found.group(0)) + (found.group(2) or "")
        return where

    def open(self, item: Item) -> int:
        prefix = {REASONING: "rs", CALL: "fc", SERVER_CALL: "mcp"}.get(item.kind, "msg")
        prefix = {"custom": "ctc", "local_shell": "lsh"}.get(self._foreign(item), prefix)
        self.ids[id(item)] = (new_id(prefix), new_id("call") if item.kind == CALL else None)
        return len(self.ids) - 1

    def response(self, status: str) -> dict:
        reply, body = self.reply, self.body
        done = [i for i in reply.stream.items if id(i) in self.ids]
        output = [self._output(i) for i in done]
        out = {"id": reply.id, "object": "response", "created_at": reply.created, "status": status,
               "model": self.service.model_name, "output": output,
               "error": self.error.body()["error"] if self.error else None,
               "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
               "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
               "previous_response_id": body.get("previous_response_id"),
               "reasoning": {"effort": self.effort, "summary": (body.get("reasoning") or {}).get("summary")},
               "store": self.stored, "temperature": reply.run.params.temperature,
               "top_p": body["top_p"] if body.get("top_p") is not None else reply.run.params.top_p,
               "tool_choice": body.get("tool_choice") or "auto",
               "tools": body.get("tools") or [],
               # as OpenAI's: what was asked (true by default); the model makes one call a turn
               "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
               "max_tool_calls": body.get("max_tool_calls"),
               "truncation": body.get("truncation") or "disabled",
               "text": {"format": {"type": "text"}, **(body.get("text") or {})}, "metadata": body.get("metadata") or {},
               "usage": None, **{key: body.get(key) for key in params.IDENTIFIERS}}
        if status != "in_progress":
            out["usage"] = {"input_tokens": reply.prompt_tokens,
                            "input_tokens_details": {"cached_tokens": reply.cached_tokens,
                                                     "cache_write_tokens": self._cache_written(reply)},
                            "output_tokens": reply.output_tokens,
                            "output_tokens_details": {"reasoning_tokens": reply.stream.reasoning_tokens},
                            "total_tokens": reply.prompt_tokens + reply.output_tokens}
        return out

    def _cache_written(self, reply: Reply) -> int:
        """The prompt tokens this request read in and the server keeps for the conversation's
        next turn (none with --prompt-cache-gb 0)."""
        return reply.prompt_tokens - reply.cached_tokens if self.service.scheduler.pool.max_bytes > 0 else 0

    def _output(self, item: Item, status: str = "completed") -> dict:
        return output_item(item, self.ids, status, self.sealed, self.kinds, self.spaces)

    def _foreign(self, item: Item) -> str | None:
        """"custom" or "local_shell" for a call of the function standing for one, else None."""
        return self.kinds.get(item.name) if item.kind == CALL else None

    @property
    def sealed(self) -> bool:
        """Reasoning items carry ``encrypted_content`` (asked for by ``include``)."""
        return "reasoning.encrypted_content" in (self.body.get("include") or [])

    def answered_calls(self) -> list[Item]:
        """The server's tool calls whose results have come back since last asked."""
        new = [i for i in self.reply.stream.items
               if i.kind == SERVER_CALL and i.result is not None and id(i) not in self.answered]
        self.answered.update(id(i) for i in new)
        return new

    @property
    def stored(self) -> bool:
        return self.body.get("store") is not False

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        return "incomplete" if self.reply.finish_reason == "length" else "completed"

    def stop_deleted(self) -> None:
        """DELETE /v1/responses/{id} came while this response ran: its generation stops at the
        engine's next step, and the reply (the stream's last event, or the response) says so."""
        self.error = APIError(409, f"response {self.reply.id!r} was deleted while it ran "
                              "(DELETE /v1/responses/{id})", code="response_deleted")
        self.reply.deleted = True
        self.reply.stop()

    def finish(self) -> dict:
        response = self.response(self.status)
        if self.stored and not self.error:
            self.store.put(self.reply.id, self.items + response["output"], response)
        return response

    def keep_sent(self) -> None:
        """The client left mid-stream: store what was streamed to it (a cancelled response), so
        that ``previous_response_id`` can follow on from what it saw. An item of which nothing was
        streamed goes."""
        if not self.stored:
            return
        output = []
        for item in self.reply.stream.items:
            if id(item) in self.whole:
                output.append(self._output(item))
            elif id(item) in self.ids and self._foreign(item) == "custom":
                output.append({**self._output(item, "incomplete"), "input": self.sent.get(id(item), "")})
            elif id(item) in self.ids and item.kind == CALL and not self._foreign(item):
                # the client has its ids: it is kept as far as it went, incomplete, which a
                # previous_response_id goes on from without (no output can answer half a call)
                output.append({**self._output(item, "incomplete"), "arguments": self.sent.get(id(item), "")})
            elif id(item) in self.ids and self.sent.get(id(item)) and item.kind in (REASONING, TEXT):
                part = self._part(item, self.sent[id(item)])
                kept = {**self._output(item, "incomplete"), "content": [part]}
                if "encrypted_content" in kept:  # what was sent of it
                    kept["encrypted_content"] = sealed_reasoning(self.sent[id(item)])
                output.append(kept)
        self.store.put(self.reply.id, self.items + output, {**self.response("cancelled"), "output": output})

    async def events(self):
        """The streamed events, as (type, payload) pairs, in OpenAI's order."""
        finished = False
        if self.stored:
            self.store.begin(self)
        try:
            yield "response.created", {"response": self.response("in_progress")}
            yield "response.in_progress", {"response": self.response("in_progress")}
            try:
                async with contextlib.aclosing(self.service.generate(self.reply, self.request)) as events:
                    async for event in events:
                        for pair in self._server_call_results():
                            yield pair
                        for pair in self._item_events(event):
                            yield pair
            except APIError as e:  # the server shutting down: the stream has begun, it fails in it
                log.info("%s failed: %s", self.reply.id, e.message)
                self.error = e
            except Exception as e:  # noqa: BLE001 - the stream has begun: it fails in the stream
                self.error = generation_failed(e, self.reply.id)
            if self.error:
                for pair in self._unfinished():
                    yield pair
            for pair in self._server_call_results(final=True):
                yield pair
            response = self.finish()
            finished = True
            yield f"response.{response['status']}", {"response": response}
        finally:
            if not finished and not self.error:  # the client went away (the stream was closed)
                self.keep_sent()
            self.store.end(self.reply.id)

    def _unfinished(self):
        """After a failure mid-stream (the server shutting down): the done events of the items
        opened and not ended, each incomplete as far as it went (a client that follows items by
        their added and done events had one that never ended, which the response listed)."""
        for item in self.reply.stream.items:
            if id(item) in self.ids and id(item) not in self.whole and item.kind != SERVER_CALL:
                item.cut = True
                yield from self._item_events(Closed(item))

    def _server_call_results(self, final: bool = False):
        """``mcp_call.completed`` (or ``failed``) and ``output_item.done`` of each server tool call
        answered since the last event (and, at the end, ``output_item.done`` of those that never
        ran)."""
        for item in self.answered_calls():
            where = self._where(item)
            del where["content_index"]
            yield f"response.mcp_call.{'failed' if item.failed else 'completed'}", where
            yield self._item_done(item)
        if final:
            for item in self.reply.stream.items:
                if item.kind == SERVER_CALL and id(item) in self.ids and id(item) not in self.answered:
                    yield self._item_done(item)

    def _item_done(self, item: Item):
        self.whole.add(id(item))
        return "response.output_item.done", {"output_index": self._where(item)["output_index"],
                                             "item": self._output(item)}

    def _item_events(self, event):
        item = event.item
        if item.kind == SERVER_CALL:  # a call the server answers: added, its arguments, done once answered
            if isinstance(event, Opened):
                index = self.open(item)
                yield "response.output_item.added", {"output_index": index,
                                                     "item": self._output(item, "in_progress")}
                return
            where = self._where(item)
            del where["content_index"]
            if isinstance(event, Waiting):  # still running: said again, so the stream is not silent
                yield "response.mcp_call.in_progress", where
            elif isinstance(event, Delta):
                yield "response.mcp_call_arguments.delta", {**where, "delta": event.text}
            else:
                yield "response.mcp_call_arguments.done", {**where, "arguments": item.text}
                if not item.cut:  # to be answered
                    yield "response.mcp_call.in_progress", where
            return
        if isinstance(event, Opened):
            index = self.open(item)
            yield "response.output_item.added", {"output_index": index,
                                                 "item": self._output(item, "in_progress")}
            if item.kind != CALL:
                yield "response.content_part.added", {**self._where(item), "part": self._part(item, "")}
            return
        if isinstance(event, Delta) and self._foreign(item) == "custom":  # its text as it comes
            yield from self._custom_input(item, partial_input(item.text))
            return
        if isinstance(event, Delta) and self._foreign(item):
            return  # (a local shell's action is said whole, in its item)
        if isinstance(event, Delta):
            kind = {REASONING: "reasoning_text", CALL: "function_call_arguments"}.get(item.kind, "output_text")
            extra = {"logprobs": []} if kind == "output_text" else {}
            where = self._where(item)
            if item.kind == CALL:
                del where["content_index"]
            self.sent[id(item)] = self.sent.get(id(item), "") + event.text
            yield f"response.{kind}.delta", {**where, "delta": event.text, **extra}
            return
        where = self._where(item)
        if self._foreign(item) == "custom":
            del where["content_index"]
            text = self._output(item)["input"]
            yield from self._custom_input(item, text)
            yield "response.custom_tool_call_input.done", {**where, "input": text}
        elif self._foreign(item):  # local_shell: its action in the item alone
            del where["content_index"]
        elif item.kind == CALL:
            del where["content_index"]
            yield "response.function_call_arguments.done", {**where, "name": self.spaces.get(item.name, (None, item.name))[1],
                                                             "arguments": item.text}
        else:
            kind = "reasoning_text" if item.kind == REASONING else "output_text"
            yield f"response.{kind}.done", {**where, "text": item.text,
                                             **({"logprobs": []} if kind == "output_text" else {})}
            yield "response.content_part.done", {**where, "part": self._part(item, item.text)}
        self.whole.add(id(item))
        yield "response.output_item.done", {"output_index": where["output_index"],
                                            "item": self._output(item)}

    def _custom_input(self, item: Item, text: str):
        """The delta event of a custom tool's text beyond what was sent (none where it is not
        what was sent, continued: what went stays the input)."""
        sent = self.sent.get(id(item), "")
        if len(text) > len(sent) and text.startswith(sent):
            self.sent[id(item)] = text
            where = self._where(item)
            del where["content_index"]
            yield "response.custom_tool_call_input.delta", {**where, "delta": text[len(sent):]}

    def _where(self, item: Item) -> dict:
        index = list(self.ids).index(id(item))
        return {"item_id": self.ids[id(item)][0], "output_index": index, "content_index": 0}

    @staticmethod
    def _part(item: Item, text: str) -> dict:
        if item.kind == REASONING:
            return {"type": "reasoning_text", "text": text}
        return _text_part(text)


async def responses(service: Service, store: ResponseStore, body: dict, request):
    run = ResponseRun(service, store, body, request)
    await run.prepare()
    if body.get("stream"):
        return StreamingResponse(sse(run), media_type="text/event-stream")
    if run.stored:
        store.begin(run)
    try:
        async with contextlib.aclosing(service.generate(run.reply, request)) as events:
            async for event in events:
                if isinstance(event, Opened):
                    run.open(event.item)
        run.answered_calls()
        return JSONResponse(run.finish())
    finally:
        store.end(run.reply.id)


async def sse(run: ResponseRun):
    sequence = 0
    async for kind, payload in run.events():
        data = {"type": kind, "sequence_number": sequence, **payload}
        sequence += 1
        yield f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
