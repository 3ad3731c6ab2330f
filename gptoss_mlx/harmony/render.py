"""Rendering a conversation into harmony, exactly as openai/harmony's ``encoding.rs`` does.

A rendered prompt is a list of *segments*, each either ordinary text or a special token, so one
rendering gives both the token ids and the human-readable text of ``gptoss-mlx render``. All
message text is encoded as ordinary text: a user who types ``<|start|>`` never produces the
control token.
"""

from __future__ import annotations

import datetime as _dt
from typing import Iterable, Union

from .messages import (
    CALL, CHANNEL, CONSTRAIN, DEFAULT_IDENTITY, END, ID, MESSAGE, START, DeveloperContent, HarmonyError,
    Message, SystemContent, ToolNamespace, check_message,
)
from .namespaces import PYTHON_DESCRIPTION, browser_namespace, json_compact, python_namespace, tools_section


class Special(str):
    """A special token inside a rendered prompt (its name, e.g. "<|start|>")."""


Segment = Union[str, Special]


def segments_to_text(segments: Iterable[Segment]) -> str:
    return "".join(segments)


def instructions_length(messages: list[Message], tokens: list[int]) -> int:
    """The tokens of the leading system and developer messages in ``tokens``, the rendering of
    ``messages``: where the first other message starts (0: no such messages, or none after them)."""
    k = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))
    starts = [i for i, t in enumerate(tokens) if t == ID[START]]
    return starts[k] if 0 < k < len(starts) else 0


def segments_to_tokens(segments: Iterable[Segment], tokenizer) -> list[int]:
    out: list[int] = []
    for seg in segments:
        if isinstance(seg, Special):
            out.append(ID[seg])
        elif seg:
            out.extend(tokenizer.encode_ordinary(seg))
    return out



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
            body = (f"// {fmt.description}\n" if fmt.description else "") + json_compact(fmt.schema)
            formats.append(f"## {fmt.name}\n\n{body}")
        sections.append("\n\n".join(formats))
    return "\n\n".join(sections)


def render_message(msg: Message, has_functions: bool = False, where: str = "message") -> list[Segment]:
    """``<|start|>{role}[ to=R][<|channel|>C][ type]<|message|>{content}<|end|> or <|call|>``.
    A message that cannot be rendered raises one HarmonyError naming ``where`` and the field."""
    check_message(msg, where)
    return _segments(msg, has_functions)


def _segments(msg: Message, has_functions: bool) -> list[Segment]:
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
    """Drop the chain of thought of every completed turn: the analysis messages before the last
    ``final`` message (harmony's docs and OpenAI's "handle raw CoT" guide). The turn under way,
    still calling tools after the last final, keeps its reasoning. Built-in tool calls and their
    results are on the analysis channel too, so they go together; function calls (commentary)
    stay. (openai-harmony's ``auto_drop_analysis`` drops only before the *first* final, which
    keeps stale reasoning from the second turn on.)"""
    last_final = max((i for i, m in enumerate(messages)
                      if m.role == "assistant" and m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


def render_conversation(messages: list[Message], for_completion: bool = True,
                        auto_drop_analysis: bool = True) -> list[Segment]:
    """The prompt for a conversation; for completion it ends with ``<|start|>assistant``.
    Invalid input raises one HarmonyError naming the message (``messages[i]``) and field."""
    if not isinstance(messages, (list, tuple)):
        raise HarmonyError(f"messages must be a list of harmony Messages, got {type(messages).__name__}")
    for i, msg in enumerate(messages):
        check_message(msg, f"messages[{i}]")
    has_functions = any(
        isinstance(m.content, DeveloperContent) and m.content.functions for m in messages)
    kept = drop_earlier_analysis(messages) if auto_drop_analysis else list(messages)
    segs: list[Segment] = []
    for msg in kept:
        segs += _segments(msg, has_functions)
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

