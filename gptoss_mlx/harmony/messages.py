"""Harmony messages and the special tokens that frame them (gpt-oss.md 4.1, 4.2).

The special ids themselves live in :mod:`gptoss_mlx.tokenizer`; this module names the ones the
format uses, the roles, channels and reasoning efforts, the message dataclasses, and the check
that a message can be rendered (:func:`check_message`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from ..tokenizer import SPECIAL_TOKENS

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"
ENDOFTEXT = "<|endoftext|>"
ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
# Recipients of an assistant message that make it no tool call: its text is for the user (or the
# model itself); any other recipient is a tool's.
NOT_A_CALL = (None, "all", "assistant")
BUILTIN_TOOLS = ("browser", "python")  # called on the analysis channel, declared in the system message
ID = SPECIAL_TOKENS
NAME = {i: name for name, i in SPECIAL_TOKENS.items()}

# Sampling stops only on these (gpt-oss.md 4.5, 7.7): <|end|> would cut the reply after its
# analysis message. <|endoftext|> is the checkpoint's EOS and also ends a reply.
STOP_TOKENS_FOR_SAMPLING = frozenset({ID[RETURN], ID[CALL], ID[ENDOFTEXT]})
MESSAGE_END_TOKENS = frozenset({ID[END], ID[CALL], ID[RETURN]})
ASSISTANT_ROLE_ID = 173781  # "assistant" in o200k_harmony (tests/test_harmony.py checks it)


def ends_reply(previous: int | None, token: int) -> bool:
    """Whether ``token``, sampled after ``previous``, ends the reply before it: the model opening
    a message under another role than its own (``<|start|>user``, ``<|start|>system``, or
    ``<|start|>functions.lookup`` for a tool's result), with its ``<|start|>`` or without it
    (``<|end|>user<|message|>``, which the parser reads as a header too). What it would write
    there is not the assistant's to say (a user's turn, rules, a result no tool returned), so
    the reply ends, as at a stop token; the token itself is not part of the reply. After a
    message's ``<|end|>`` only ``<|start|>`` goes on, or the assistant's role or a header
    without a role (``<|channel|>final``) with the ``<|start|>`` left out, which the parser reads
    as the assistant's."""
    if previous == ID[START]:
        return token not in (ASSISTANT_ROLE_ID, ID[CHANNEL])
    return previous == ID[END] and token not in (ID[START], ASSISTANT_ROLE_ID, ID[CHANNEL])

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_CUTOFF = "2024-06"


class HarmonyError(ValueError):
    """A conversation that cannot be rendered (bad role, bad effort, malformed tool call...)."""


@dataclass
class ToolSpec:
    """One function of a tool namespace; ``parameters`` is a JSON Schema object or None.
    ``strict``: its calls must be held to ``parameters`` (a schema the constraint cannot enforce
    is then an error); a function that is not strict (OpenAI's ``strict: false``) is called
    with any JSON object where its schema cannot be enforced."""

    name: str
    description: str = ""
    parameters: dict | None = None
    strict: bool = True


@dataclass
class ToolNamespace:
    name: str
    description: str | None = None
    tools: list[ToolSpec] = field(default_factory=list)


@dataclass
class SystemContent:
    model_identity: str | None = DEFAULT_IDENTITY
    knowledge_cutoff: str | None = DEFAULT_CUTOFF
    conversation_start_date: str | None = None
    reasoning_effort: str | None = "medium"
    tools: list[ToolNamespace] = field(default_factory=list)  # built-in: browser, python
    valid_channels: tuple[str, ...] = CHANNELS
    channel_required: bool = True

    def __post_init__(self):
        if self.reasoning_effort is not None and self.reasoning_effort not in EFFORTS:
            raise HarmonyError(
                f"reasoning effort must be one of {', '.join(EFFORTS)}, got {self.reasoning_effort!r}")


@dataclass
class ResponseFormat:
    name: str
    schema: dict
    description: str | None = None


@dataclass
class DeveloperContent:
    instructions: str | None = None
    functions: list[ToolSpec] = field(default_factory=list)
    response_formats: list[ResponseFormat] = field(default_factory=list)


CUTS = ("interrupted", "length", "context")  # stopped by the user; at max_tokens; at the context's end


@dataclass
class Message:
    role: str
    content: Union[str, SystemContent, DeveloperContent] = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None  # for role "tool": the tool's name, e.g. "functions.get_weather"
    # On a reply's last message when the reply was cut short there: one of CUTS (saved with the
    # chat, so a reloaded conversation shows it; never rendered into a prompt).
    cut: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise HarmonyError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if self.role == "tool" and not self.name:
            raise HarmonyError("a tool message needs the tool's name (e.g. functions.get_weather)")
        if isinstance(self.content, SystemContent) and self.role != "system":
            raise HarmonyError("SystemContent may only appear in system messages")
        if isinstance(self.content, DeveloperContent) and self.role != "developer":
            raise HarmonyError("DeveloperContent may only appear in developer messages")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else ""

    @property
    def is_tool_call(self) -> bool:
        return self.role == "assistant" and self.recipient not in NOT_A_CALL



# Limits on a tool's JSON Schema: the TypeScript rendering recurses once per level, and a
# schema is a few hundred values in practice (harmony's own are under 50).
# A function's name: one word of at most 64 characters (it is written into the tools section's
# lines and into call headers, where whitespace or a line break would end it early).
FUNCTION_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,64}")
FUNCTION_NAME_RULE = "1 to 64 characters, none of them whitespace or control characters"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a property name with one would break its line
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_VALUES = 10_000


def check_message(msg: Message, where: str = "message") -> None:
    """Raise one :class:`HarmonyError` naming the message (``where``) and the field when
    ``msg`` cannot be rendered: wrong types, None content, recursive or huge JSON schemas."""
    if not isinstance(msg, Message):
        raise HarmonyError(f"{where}: expected a harmony Message, got {_kind(msg)}")
    _need(msg.role in ROLES, where, "role", f"one of {', '.join(ROLES)}", msg.role)
    role = msg.role
    where = f"{where} ({role})"
    for name in ("channel", "recipient", "content_type", "name"):
        _need(isinstance(getattr(msg, name), (str, type(None))), where, name, "a string or None",
              getattr(msg, name))
    if role == "tool":
        _need(bool(msg.name), where, "name", "the tool's name (e.g. functions.get_weather)", msg.name)
    content = msg.content
    if isinstance(content, SystemContent) and role == "system":
        _check_system(content, where)
    elif isinstance(content, DeveloperContent) and role == "developer":
        _check_developer(content, where)
    else:
        _need(isinstance(content, str), where, "content", "a string", content)


def _check_system(sys: SystemContent, where: str) -> None:
    for name in ("model_identity", "knowledge_cutoff", "conversation_start_date"):
        _need(isinstance(getattr(sys, name), (str, type(None))), where, name, "a string or None",
              getattr(sys, name))
    _need(sys.reasoning_effort in EFFORTS + (None,), where, "reasoning_effort",
          f"one of {', '.join(EFFORTS)}", sys.reasoning_effort)
    _need(isinstance(sys.valid_channels, (tuple, list))
          and all(isinstance(c, str) for c in sys.valid_channels),
          where, "valid_channels", "a list of strings", sys.valid_channels)
    _need(isinstance(sys.tools, list), where, "tools", "a list of tool namespaces", sys.tools)
    for i, ns in enumerate(sys.tools):
        _check_named(ns, ToolNamespace, where, f"tools[{i}]")
        check_functions(ns.tools, where, f"tools[{i}].tools")


def _check_developer(dev: DeveloperContent, where: str) -> None:
    _need(isinstance(dev.instructions, (str, type(None))), where, "instructions", "a string or None",
          dev.instructions)
    check_functions(dev.functions, where, "functions")
    _need(isinstance(dev.response_formats, list), where, "response_formats", "a list",
          dev.response_formats)
    for i, fmt in enumerate(dev.response_formats):
        _check_named(fmt, ResponseFormat, where, f"response_formats[{i}]")
        check_schema(fmt.schema, where, f"response_formats[{i}].schema")


def _check_named(value, cls, where: str, field_: str) -> None:
    """A ToolNamespace or ResponseFormat: its name a string, its description a string or None."""
    _need(isinstance(value, cls), where, field_, f"a {cls.__name__}", value)
    _need(isinstance(value.name, str), where, f"{field_}.name", "a string", value.name)
    _need(isinstance(value.description, (str, type(None))), where, f"{field_}.description",
          "a string or None", value.description)


def check_functions(functions, where: str, field_: str) -> None:
    """A list of ToolSpecs a developer message can declare: names, descriptions, schemas."""
    _need(isinstance(functions, list), where, field_, "a list of tools", functions)
    names = set()
    for i, fn in enumerate(functions):
        f = f"{field_}[{i}]"
        _need(isinstance(fn, ToolSpec), where, f, "a ToolSpec", fn)
        _need(isinstance(fn.name, str) and FUNCTION_NAME.fullmatch(fn.name), where, f"{f}.name",
              FUNCTION_NAME_RULE, fn.name)
        _need(fn.name not in names, where, f"{f}.name", "a name no other function has", fn.name)
        names.add(fn.name)
        _need(isinstance(fn.description, str), where, f"{f}.description", "a string", fn.description)
        if fn.parameters is not None:
            check_schema(fn.parameters, where, f"{f}.parameters")


def check_schema(schema, where: str, field_: str) -> None:
    """A JSON Schema object of JSON values, at most MAX_SCHEMA_DEPTH deep (a schema that
    contains itself is reported as too deep) and MAX_SCHEMA_VALUES values in all, its keywords
    in the shapes the TypeScript writer handles (``_check_shape``)."""
    _need(isinstance(schema, dict), where, field_, "a JSON Schema object", schema)
    stack, count = [(schema, 1)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if depth > MAX_SCHEMA_DEPTH and isinstance(value, (dict, list)):  # (levels of objects and lists)
            raise HarmonyError(f"{where}: {field_}: the JSON Schema is nested deeper than "
                               f"{MAX_SCHEMA_DEPTH} levels of JSON objects and lists (a property's "
                               "schema is two: its 'properties' and itself), or contains itself")
        if count > MAX_SCHEMA_VALUES:
            raise HarmonyError(f"{where}: {field_}: the JSON Schema has more than "
                               f"{MAX_SCHEMA_VALUES:,} JSON values in all (each object, list, "
                               "string, number and list item counts one)")
        if isinstance(value, dict):
            for key, item in value.items():
                _need(isinstance(key, str), where, f"{field_} key", "a string", key)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        else:
            _need(value is None or isinstance(value, (str, int, float, bool)), where, field_,
                  "made of JSON values", value)
    _check_shape(schema, where, field_)


def _check_shape(schema, where: str, path: str) -> None:
    """The keywords the TypeScript writer reads, in shapes it can write: a schema is an object
    (or a JSON Schema boolean), ``type`` a string or list of strings, ``properties`` an object of
    schemas, ``required`` and ``enum`` lists, ``items`` a schema, ``anyOf``/``oneOf``/``allOf``
    lists of schemas. Recurses at most MAX_SCHEMA_DEPTH deep (``check_schema`` checked that)."""
    if isinstance(schema, bool):
        return
    _need(isinstance(schema, dict), where, path, "a JSON Schema object", schema)
    if "type" in schema:
        kind = schema["type"]
        _need(isinstance(kind, str) or isinstance(kind, list) and all(isinstance(t, str) for t in kind),
              where, f"{path}.type", "a string or a list of strings", kind)
    if "properties" in schema:
        _need(isinstance(schema["properties"], dict), where, f"{path}.properties", "an object",
              schema["properties"])
        for key, prop in schema["properties"].items():
            _need(not CONTROL.search(key), where, f"{path}.properties key",
                  "a name without line breaks or other control characters", key)
            _check_shape(prop, where, f"{path}.properties.{key}")
    if "required" in schema:
        required = schema["required"]
        _need(isinstance(required, list) and all(isinstance(r, str) for r in required),
              where, f"{path}.required", "a list of strings", required)
    if "enum" in schema:
        _need(isinstance(schema["enum"], list), where, f"{path}.enum", "a list", schema["enum"])
    if isinstance(schema.get("items"), list):  # the tuple form of drafts before 2020-12 (zod, MCP tools)
        for j, item in enumerate(schema["items"]):
            _check_shape(item, where, f"{path}.items[{j}]")
    elif "items" in schema:
        _check_shape(schema["items"], where, f"{path}.items")
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            _need(isinstance(schema[key], list), where, f"{path}.{key}", "a list of schemas", schema[key])
            for j, variant in enumerate(schema[key]):
                _check_shape(variant, where, f"{path}.{key}[{j}]")


def _need(ok: bool, where: str, field_: str, expected: str, value) -> None:
    if not ok:
        raise HarmonyError(f"{where}: {field_} must be {expected}, got {_kind(value)}")


def _kind(value) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40])
    return type(value).__name__
