"""The harmony chat format (gpt-oss.md section 4): rendering, a streaming parser, stop tokens,
and conversion to and from the OpenAI Chat Completions shape.

Rendering follows openai/harmony's ``encoding.rs`` exactly (system and developer sections, the
TypeScript-like tool namespaces, ``<|call|>`` after tool calls, analysis dropping). A rendered
prompt is a list of *segments*, each either ordinary text or a special token, so one rendering
gives both the token ids and the human-readable text of ``gptoss-mlx render``. All message text
is encoded as ordinary text: a user who types ``<|start|>`` never produces the control token.
"""

from __future__ import annotations

import codecs
import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

from .tokenizer import SPECIAL_TOKENS

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"
ENDOFTEXT = "<|endoftext|>"
ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
ID = SPECIAL_TOKENS
NAME = {i: name for name, i in SPECIAL_TOKENS.items()}

# Sampling stops only on these (gpt-oss.md 4.5, 7.7): <|end|> would cut the reply after its
# analysis message. <|endoftext|> is the checkpoint's EOS and also ends a reply.
STOP_TOKENS_FOR_SAMPLING = frozenset({ID[RETURN], ID[CALL], ID[ENDOFTEXT]})
MESSAGE_END_TOKENS = frozenset({ID[END], ID[CALL], ID[RETURN]})

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_CUTOFF = "2024-06"


class HarmonyError(ValueError):
    """A conversation that cannot be rendered (bad role, bad effort, malformed tool call...)."""


# ----------------------------------------------------------------------------- messages
@dataclass
class ToolSpec:
    """One function of a tool namespace; ``parameters`` is a JSON Schema object or None."""

    name: str
    description: str = ""
    parameters: dict | None = None


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


@dataclass
class Message:
    role: str
    content: Union[str, SystemContent, DeveloperContent] = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None  # for role "tool": the tool's name, e.g. "functions.get_weather"

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
        return self.role == "assistant" and self.recipient not in (None, "all", "assistant")


# ----------------------------------------------------------------------------- segments
class Special(str):
    """A special token inside a rendered prompt (its name, e.g. "<|start|>")."""


Segment = Union[str, Special]


def segments_to_text(segments: Iterable[Segment]) -> str:
    return "".join(segments)


def segments_to_tokens(segments: Iterable[Segment], tokenizer) -> list[int]:
    out: list[int] = []
    for seg in segments:
        if isinstance(seg, Special):
            out.append(ID[seg])
        elif seg:
            out.extend(tokenizer.encode_ordinary(seg))
    return out


# ----------------------------------------------------------------------------- JSON Schema -> TS
def _is_enum(schema: dict) -> bool:
    return isinstance(schema.get("enum"), list) and bool(schema["enum"])


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _default_comment(schema: dict) -> str:
    default = schema["default"]
    if isinstance(default, str):
        return f"default: {default}" if _is_enum(schema) else f'default: "{default}"'
    return f"default: {_json(default)}"


def _nullable(schema: dict, type_str: str) -> str:
    if schema.get("nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """harmony's ``json_schema_to_typescript``, quirks included (the model was trained on it)."""
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | "
            out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
            trailing = []
            if isinstance(variant, dict) and isinstance(variant.get("description"), str):
                trailing.append(variant["description"])
            if isinstance(variant, dict) and "default" in variant:
                trailing.append(_default_comment(variant))
            if trailing:
                out += " // " + " ".join(trailing)
        return out
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        enum = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
        return " | ".join(enum) if enum else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        items = schema.get("items")
        return f"{schema_to_typescript(items, indent)}[]" if items is not None else "Array<any>"
    return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = ""
    if isinstance(schema.get("description"), str):
        out += f"{indent}// {schema['description']}\n"
    out += "{\n"
    required = set(r for r in schema.get("required") or [] if isinstance(r, str))
    for key, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        optional = "" if key in required else "?"
        if isinstance(prop.get("title"), str):
            out += f"{indent}// {prop['title']}\n{indent}//\n"
        one_of = prop.get("oneOf")
        if not isinstance(one_of, list) and isinstance(prop.get("description"), str):
            out += f"{indent}// {prop['description']}\n"
        examples = prop.get("examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n"
            for ex in examples:
                if isinstance(ex, str):
                    out += f'{indent}// - "{ex}"\n'
        if isinstance(one_of, list):
            out += _one_of_property(key, optional, prop, one_of, indent)
            continue
        type_str = _nullable(prop, schema_to_typescript(prop, indent + "    "))
        out += f"{indent}{key}{optional}: {type_str},"
        if "default" in prop:
            out += " // " + _default_comment(prop)
        out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key, optional, prop, variants, indent) -> str:
    out = ""
    desc = prop.get("description") if isinstance(prop.get("description"), str) else None
    first = variants[0] if variants and isinstance(variants[0], dict) else {}
    above = desc is not None and first.get("description") != desc
    if above:
        out += f"{indent}// {desc}\n"
    if "default" in prop:
        out += f"{indent}// {_default_comment(prop)}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        variant = variant if isinstance(variant, dict) else {}
        out += f"{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
        trailing = []
        if not (i == 0 and above):
            vdesc = variant.get("description")
            if isinstance(vdesc, str) and vdesc != desc:
                trailing.append(vdesc)
        if "default" in variant:
            trailing.append(_default_comment(variant))
        if trailing:
            out += " // " + " ".join(trailing)
        out += "\n"
    return out + f"{indent},\n"


def tools_section(namespaces: list[ToolNamespace]) -> str:
    """``# Tools`` with one ``## name`` section per namespace (harmony ``template_tools_section``)."""
    sections = ["# Tools"]
    for ns in namespaces:
        lines = [f"## {ns.name}\n"]
        for line in (ns.description or "").splitlines() if ns.description else []:
            lines.append(f"// {line}" if ns.tools else line)
        if ns.tools:
            lines.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                lines.extend(f"// {line}" for line in tool.description.splitlines())
                if tool.parameters is not None:
                    lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
                else:
                    lines.append(f"type {tool.name} = () => any;\n")
            lines.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


# ----------------------------------------------------------------------------- built-in tools
BROWSER_DESCRIPTION = """Tool for browsing.
The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
Cite information from the tool using the following format:
`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
Do not quote more than 10 words directly from the tool output.
sources=web (default: web)"""

BROWSER_TOOLS = [
    ToolSpec("search", "Searches for information related to `query` and displays `topn` results.", {
        "type": "object",
        "properties": {"query": {"type": "string"}, "topn": {"type": "number", "default": 10},
                       "source": {"type": "string"}},
        "required": ["query"],
    }),
    ToolSpec("open", (
        "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
        "showing `num_lines` lines.\n"
        "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
        "If `cursor` is not provided, the most recent page is implied.\n"
        "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
        "If `loc` is not provided, the viewport will be positioned at the beginning of the "
        "document or centered on the most relevant passage, if available.\n"
        "Use this function without `id` to scroll to a new location of an opened page."), {
        "type": "object",
        "properties": {
            "id": {"type": ["number", "string"], "default": -1},
            "cursor": {"type": "number", "default": -1},
            "loc": {"type": "number", "default": -1},
            "num_lines": {"type": "number", "default": -1},
            "view_source": {"type": "boolean", "default": False},
            "source": {"type": "string"},
        },
    }),
    ToolSpec("find", "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.", {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "cursor": {"type": "number", "default": -1}},
        "required": ["pattern"],
    }),
]

PYTHON_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown "
    "to the user. This tool should be used for internal reasoning, but not for code that is "
    "intended to be visible to the user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a "
    "stateful Jupyter notebook environment. python will respond with the output of the "
    "execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save "
    "and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster."
)


def browser_namespace() -> ToolNamespace:
    return ToolNamespace("browser", BROWSER_DESCRIPTION, list(BROWSER_TOOLS))


def python_namespace(description: str = PYTHON_DESCRIPTION) -> ToolNamespace:
    return ToolNamespace("python", description, [])


# ----------------------------------------------------------------------------- rendering
def _system_text(sys: SystemContent, has_functions: bool) -> str:
    sections = []
    top = [sys.model_identity] if sys.model_identity else []
    if sys.knowledge_cutoff:
        top.append(f"Knowledge cutoff: {sys.knowledge_cutoff}")
    if sys.conversation_start_date:
        top.append(f"Current date: {sys.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    if sys.reasoning_effort:
        sections.append(f"Reasoning: {sys.reasoning_effort}")
    if sys.tools:
        sections.append(tools_section(sorted(sys.tools, key=lambda ns: ns.name)))
    if sys.valid_channels:
        header = f"# Valid channels: {', '.join(sys.valid_channels)}."
        if sys.channel_required:
            header += " Channel must be included for every message."
        if has_functions:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def _developer_text(dev: DeveloperContent) -> str:
    sections = []
    if dev.instructions is not None:
        sections += ["# Instructions", dev.instructions]
    if dev.functions:
        sections.append(tools_section([ToolNamespace("functions", None, dev.functions)]))
    if dev.response_formats:
        formats = ["# Response Formats"]
        for fmt in dev.response_formats:
            body = (f"// {fmt.description}\n" if fmt.description else "") + _json(fmt.schema)
            formats.append(f"## {fmt.name}\n\n{body}")
        sections.append("\n\n".join(formats))
    return "\n\n".join(sections)


def render_message(msg: Message, has_functions: bool = False) -> list[Segment]:
    """``<|start|>{role}[ to=R][<|channel|>C][ type]<|message|>{content}<|end|> or <|call|>``."""
    segs: list[Segment] = [Special(START)]
    header = msg.name if msg.role == "tool" else msg.role
    if msg.role != "tool" and msg.name:
        header += f":{msg.name}"
    if msg.recipient and msg.recipient != "all":
        header += f" to={msg.recipient}"
    segs.append(header)
    if msg.channel:
        segs += [Special(CHANNEL), msg.channel]
    if msg.content_type:
        if msg.content_type.startswith(CONSTRAIN):
            segs += [" ", Special(CONSTRAIN)]
            if msg.content_type[len(CONSTRAIN):]:
                segs.append(msg.content_type[len(CONSTRAIN):])
        else:
            segs.append(f" {msg.content_type}")
    segs.append(Special(MESSAGE))
    if isinstance(msg.content, SystemContent):
        segs.append(_system_text(msg.content, has_functions))
    elif isinstance(msg.content, DeveloperContent):
        segs.append(_developer_text(msg.content))
    else:
        segs.append(msg.content)
    segs.append(Special(CALL if msg.role == "assistant" and msg.recipient else END))
    return segs


def drop_earlier_analysis(messages: list[Message]) -> list[Message]:
    """harmony's auto_drop_analysis: once the last assistant message is ``final``, drop the
    analysis messages that come before the first ``final`` message. A turn still doing tool
    calls (last assistant message not final) keeps all of its reasoning."""
    last_assistant = next((m for m in reversed(messages) if m.role == "assistant"), None)
    if last_assistant is None or last_assistant.channel != "final":
        return list(messages)
    first_final = next(i for i, m in enumerate(messages) if m.channel == "final")
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


def render_conversation(messages: list[Message], for_completion: bool = True,
                        auto_drop_analysis: bool = True) -> list[Segment]:
    """The prompt for a conversation; for completion it ends with ``<|start|>assistant``."""
    has_functions = any(
        isinstance(m.content, DeveloperContent) and m.content.functions for m in messages)
    kept = drop_earlier_analysis(messages) if auto_drop_analysis else list(messages)
    segs: list[Segment] = []
    for msg in kept:
        segs += render_message(msg, has_functions)
    if for_completion:
        segs += [Special(START), "assistant"]
    return segs


def system_message(reasoning_effort: str = "medium", date: str | None = None,
                   browser: bool = False, python: bool = False,
                   model_identity: str = DEFAULT_IDENTITY, python_description: str | None = None) -> Message:
    python_tool = python_namespace(python_description or PYTHON_DESCRIPTION)
    tools = ([browser_namespace()] if browser else []) + ([python_tool] if python else [])
    return Message("system", SystemContent(
        model_identity=model_identity, conversation_start_date=date,
        reasoning_effort=reasoning_effort, tools=tools))


def today() -> str:
    return _dt.date.today().isoformat()


# ----------------------------------------------------------------------------- parsing
@dataclass
class MessageStart:
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    name: str | None = None


@dataclass
class ContentDelta:
    text: str


@dataclass
class MessageEnd:
    message: Message
    stop: str | None  # "<|end|>", "<|call|>", "<|return|>", or None (stream ended/recovered)


Event = Union[MessageStart, ContentDelta, MessageEnd]

_RECIPIENT_RE = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*$")
_MAX_HEADER_TOKENS = 32


class StreamParser:
    """Turns sampled token ids into message events, one token at a time, and never raises.

    Starts inside an assistant header (the prompt ended with ``<|start|>assistant``) unless
    ``role=None``. Malformed output is recovered as text: a missing ``<|message|>``, control-token
    names written as plain text, a stop token or end of stream inside a header, special tokens
    inside content. Content deltas are always valid UTF-8 text (multi-byte characters split
    over tokens are held back until complete; invalid bytes become U+FFFD).
    """

    def __init__(self, tokenizer, role: str | None = "assistant"):
        self.tokenizer = tokenizer
        self.messages: list[Message] = []
        self.tokens: list[int] = []
        self._role = role
        self._state = "header" if role else "expect_start"
        self._implied_start = False
        self._header: list[int] = []
        self._current: MessageStart | None = None
        self._text: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    # -- public
    @property
    def current(self) -> MessageStart | None:
        return self._current

    @property
    def state(self) -> str:
        return self._state

    def feed(self, token: int) -> list[Event]:
        self.tokens.append(token)
        return getattr(self, f"_in_{self._state}")(token)

    def finish(self) -> list[Event]:
        """End of stream: close whatever is open, keeping every byte as text."""
        if self._state == "content":
            return self._end(None)
        if self._state == "header" and self._header:
            return self._salvage_header(None)
        self._state = "expect_start"
        return []

    # -- states
    def _in_expect_start(self, token: int) -> list[Event]:
        if token == ID[START]:
            self._state, self._header, self._role = "header", [], None
            self._implied_start = False
            return []
        if token in MESSAGE_END_TOKENS or token == ID[ENDOFTEXT]:
            return []  # a stray stop token carries no text
        # Text without <|start|>: often "assistant<|channel|>final<|message|>..." written out.
        self._state, self._header, self._role = "header", [token], None
        self._implied_start = True
        return self._check_header()

    def _in_header(self, token: int) -> list[Event]:
        if token == ID[MESSAGE]:
            return self._open(self._parse_header(self._header))
        if token in MESSAGE_END_TOKENS or token == ID[ENDOFTEXT]:
            return self._salvage_header(NAME.get(token))
        if token == ID[START]:  # a header that never got its <|message|>
            events = self._salvage_header(None)
            self._state, self._header, self._role = "header", [], None
            return events
        self._header.append(token)
        return self._check_header()

    def _in_content(self, token: int) -> list[Event]:
        if token in MESSAGE_END_TOKENS:
            return self._end(NAME[token])
        if token == ID[ENDOFTEXT]:
            return self._end(ENDOFTEXT)
        if token == ID[START]:  # the model forgot <|end|>
            events = self._end(None)
            self._state, self._header, self._role = "header", [], None
            return events
        text = self._decoder.decode(self._token_bytes(token))
        return self._emit(text)

    # -- helpers
    def _token_bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.decode_single_token_bytes(token)
        except KeyError:
            return f"<|unknown_{token}|>".encode()

    def _header_text(self, tokens: list[int]) -> str:
        return b"".join(self._token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def _check_header(self) -> list[Event]:
        """Plain text that is clearly not a header becomes an assistant message's content:
        too long, several lines, or (without a <|start|>) not starting with a role."""
        text = self._header_text(self._header)
        looks_like_header = len(self._header) <= _MAX_HEADER_TOKENS and "\n" not in text
        if self._implied_start:
            looks_like_header &= text.lstrip().split(" ")[0].split("<|")[0] in ROLES + ("",)
        if looks_like_header:
            return []
        tokens, self._header = self._header, []
        events = self._open(MessageStart("assistant", None, None, None))
        return events + self._emit(self._decoder.decode(b"".join(self._token_bytes(t) for t in tokens)))

    def _parse_header(self, tokens: list[int], metadata: bool = True) -> tuple[MessageStart, str]:
        """(header, leftover text that was not header metadata). With ``metadata=False`` (a
        header that never reached ``<|message|>``) only the role and channel are taken; the
        rest is text."""
        text = self._header_text(tokens)
        channel = None
        if CHANNEL in text:
            idx = text.index(CHANNEL)
            rest = text[idx + len(CHANNEL):]
            m = re.match(r"[^\s<]*", rest)
            channel = m.group(0) or None
            text = text[:idx] + rest[m.end():]
        text = text.replace(CONSTRAIN, " " + CONSTRAIN).strip()
        parts = text.split()
        role, name = self._role, None
        if role is None:
            first = parts[0] if parts else "assistant"
            if first in ROLES:
                role = first
            elif _RECIPIENT_RE.match(first):
                role, name = "tool", first
            else:
                role = "assistant"
        if parts and (parts[0] == role or parts[0] == name):
            parts.pop(0)
        if not metadata:
            return MessageStart(role, channel, None, None, name if role == "tool" else None), " ".join(parts)
        recipient = content_type = None
        leftover = []
        for part in parts:
            if part.startswith("to="):
                recipient = part[3:]
            elif part.startswith(CONSTRAIN) or (recipient and content_type is None
                                                and part in ("json", "code", "text")):
                content_type = part
            elif recipient is None and _RECIPIENT_RE.match(part) and part not in CHANNELS:
                recipient = part
            elif channel is None and part in CHANNELS:
                channel = part
            else:
                leftover.append(part)
        if role == "tool" and name is None:
            name = recipient or "tool"
        return MessageStart(role, channel, recipient, content_type, name), " ".join(leftover)

    def _open(self, parsed) -> list[Event]:
        start, leftover = parsed if isinstance(parsed, tuple) else (parsed, "")
        self._state, self._header, self._role = "content", [], None
        self._implied_start = False
        self._current, self._text = start, []
        self._decoder.reset()
        events: list[Event] = [start]
        if leftover:  # unparseable header words are kept as text, never dropped
            events += self._emit(leftover + " ")
        return events

    def _emit(self, text: str) -> list[Event]:
        if not text:
            return []
        self._text.append(text)
        return [ContentDelta(text)]

    def _end(self, stop: str | None) -> list[Event]:
        events = self._emit(self._decoder.decode(b"", final=True))
        start = self._current
        message = Message(
            role=start.role, content="".join(self._text), channel=start.channel,
            recipient=start.recipient, content_type=start.content_type,
            name=start.name if start.role == "tool" else None)
        self.messages.append(message)
        self._state, self._current, self._text = "expect_start", None, []
        return events + [MessageEnd(message, stop)]

    def _salvage_header(self, stop: str | None) -> list[Event]:
        """A header that ended without <|message|>: keep its metadata, the rest becomes text."""
        start, leftover = self._parse_header(self._header, metadata=False)
        events = self._open((start, ""))
        events += self._emit(leftover)
        return events + self._end(stop)


def parse_completion(tokens: Iterable[int], tokenizer, role: str | None = "assistant") -> list[Message]:
    parser = StreamParser(tokenizer, role)
    for t in tokens:
        parser.feed(t)
    parser.finish()
    return parser.messages


# ----------------------------------------------------------------------------- Chat Completions
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
