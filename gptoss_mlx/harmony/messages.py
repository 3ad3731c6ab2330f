"""Harmony messages and the special tokens that frame them (gpt-oss.md 4.1, 4.2).

The special ids themselves live in :mod:`gptoss_mlx.tokenizer`; this module names the ones the
format uses, the roles, channels and reasoning efforts, and the message dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..tokenizer import SPECIAL_TOKENS

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"
ENDOFTEXT = "<|endoftext|>"
ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
BUILTIN_TOOLS = ("browser", "python")  # called on the analysis channel, declared in the system message
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

