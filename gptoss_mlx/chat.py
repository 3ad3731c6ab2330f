"""A conversation with gpt-oss: the API shared by the CLI, the TUI and library users.

    chat = Chat(model, tokenizer, reasoning_effort="low")
    for event in chat.send("Why is the sky blue?"):
        if isinstance(event, ReasoningDelta): ...   # chain of thought, live
        elif isinstance(event, AnswerDelta): ...    # the user-visible answer, live
        elif isinstance(event, Done): print(event.stats.summary())
    chat.save("chat.json")                          # Chat Completions JSON, reasoning included
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import harmony
from .generate import Engine, SamplingParams, Stats
from .harmony import ContentDelta, DeveloperContent, Message, MessageEnd, MessageStart


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class AnswerDelta:
    text: str


@dataclass
class ToolCall:
    recipient: str  # e.g. "functions.get_weather", "python", "browser.search"
    arguments: str
    channel: str | None = None


@dataclass
class Done:
    stats: Stats
    finish_reason: str | None
    messages: list[Message] = field(default_factory=list)  # what this reply added to history


@dataclass
class ContextTrimmed:
    """The conversation no longer fit: its oldest turns were dropped before this reply."""
    dropped_messages: int
    dropped_tokens: int


ChatEvent = ReasoningDelta | AnswerDelta | ToolCall | Done


class ChatFileError(ValueError):
    """A saved chat that cannot be read."""


class Chat:
    def __init__(self, model, tokenizer, *, instructions: str | None = None,
                 reasoning_effort: str = "medium", functions: list[harmony.ToolSpec] | None = None,
                 browser: bool = False, python: bool = False, python_description: str | None = None,
                 sampling: SamplingParams | None = None, max_context: int | None = None,
                 date: str | None = None, engine: Engine | None = None):
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, max_context=max_context)
        self.instructions = instructions
        self.functions = list(functions or [])
        self.browser, self.python = browser, python
        self.python_description = python_description  # what this python tool really does
        self.sampling = sampling or SamplingParams()
        self.date = date or harmony.today()
        self.messages: list[Message] = []  # user, assistant and tool messages, reasoning included
        self.reasoning_effort = reasoning_effort
        self._stop = False

    # -- settings
    @property
    def reasoning_effort(self) -> str:
        return self._effort

    @reasoning_effort.setter
    def reasoning_effort(self, effort: str) -> None:
        if effort not in harmony.EFFORTS:
            raise ValueError(f"reasoning effort must be low, medium or high, got {effort!r}")
        self._effort = effort  # applies from the next reply

    def reset(self) -> None:
        self.messages = []

    def stop(self) -> None:
        """Ask the reply being generated to stop after the current token."""
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    # -- prompt
    def conversation(self) -> list[Message]:
        prefix = [harmony.system_message(self._effort, self.date, self.browser, self.python,
                                         python_description=self.python_description)]
        if self.instructions is not None or self.functions:
            prefix.append(Message("developer", DeveloperContent(self.instructions, self.functions)))
        return prefix + self.messages

    def prompt_tokens(self) -> list[int]:
        segments = harmony.render_conversation(self.conversation())
        return harmony.segments_to_tokens(segments, self.tokenizer)

    @property
    def history(self) -> list[Message]:
        """The conversation as the model will see it next: earlier reasoning dropped."""
        return harmony.drop_earlier_analysis(self.messages)

    # -- turns
    def send(self, text: str) -> Iterator[ChatEvent]:
        """Add a user message and stream the reply."""
        self.messages.append(Message("user", text))
        yield from self.reply()

    def add_tool_result(self, name: str, content: str, channel: str = "commentary") -> None:
        self.messages.append(Message("tool", content, channel=channel, recipient="assistant",
                                     name=name))

    def reply(self) -> Iterator[ChatEvent]:
        """Generate the assistant's next messages; stops at a final answer or a tool call.
        If interrupted (``stop()``, Ctrl-C, or the consumer closing the stream), the partial
        answer is kept and the session goes on."""
        self._stop = False
        self._channel = self._recipient = None
        parser = harmony.StreamParser(self.tokenizer, role="assistant")
        stream = self.engine.generate(self.prompt_tokens(), self.sampling)
        finish = None
        try:
            for token in stream:
                yield from self._chat_events(parser.feed(token))
                if self._stop:
                    finish = "interrupted"
                    break
        except (KeyboardInterrupt, GeneratorExit):
            stream.close()
            self._keep(parser, interrupted=True)
            raise
        stream.close()
        yield from self._chat_events(parser.finish())
        new = self._keep(parser, interrupted=finish == "interrupted")
        stats = self.engine.stats
        yield Done(stats, finish or stats.finish_reason, new)

    def _chat_events(self, events) -> Iterator[ChatEvent]:
        """Parser events -> chat events: reasoning, answer text, tool calls."""
        for event in events:
            if isinstance(event, MessageStart):
                self._channel, self._recipient = event.channel, event.recipient
            elif isinstance(event, ContentDelta) and self._recipient is None:
                yield (ReasoningDelta if self._channel == "analysis" else AnswerDelta)(event.text)
            elif isinstance(event, MessageEnd) and event.message.is_tool_call:
                m = event.message
                yield ToolCall(m.recipient, m.text, m.channel)

    def _keep(self, parser: harmony.StreamParser, interrupted: bool) -> list[Message]:
        """Add the reply's messages to the history. An interrupted reply keeps its answer text
        but not a half-written chain of thought."""
        parser.finish()
        new = []
        for m in parser.messages:
            if m.role != "assistant":
                continue
            if interrupted and m.channel == "analysis" and not m.is_tool_call:
                continue
            if m.channel is None:  # recovered text without a channel: show it as the answer
                m.channel = "final"
            new.append(m)
        self.messages.extend(new)
        return new

    # -- persistence
    def to_json(self) -> dict:
        data = harmony.to_chat_completions(self.conversation())
        data["date"] = self.date
        return data

    def save(self, path: str | os.PathLike, **metadata) -> Path:
        """Write the chat as Chat Completions JSON (reasoning included), atomically.
        ``metadata`` (e.g. a title) is stored beside it and ignored by :meth:`load`."""
        return write_json_atomic(path, {**self.to_json(), **metadata})

    def load(self, path: str | os.PathLike) -> None:
        """Replace this chat's history, instructions, tools and effort with a saved one."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
            messages = harmony.from_chat_completions(data, date=data.get("date"))
        except OSError as e:
            raise ChatFileError(f"{path}: {e.strerror or e}") from None
        except (json.JSONDecodeError, harmony.HarmonyError, AttributeError) as e:
            raise ChatFileError(f"{path}: not a saved chat ({e})") from None
        system, rest = messages[0], messages[1:]
        self.reasoning_effort = system.content.reasoning_effort or "medium"
        self.date = data.get("date") or self.date
        if rest and rest[0].role == "developer" and isinstance(rest[0].content, DeveloperContent):
            dev = rest.pop(0).content
            self.instructions, self.functions = dev.instructions, list(dev.functions)
        else:
            self.instructions, self.functions = None, []
        self.messages = rest


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write through a temporary file and a rename: a crash never leaves half a file (the
    store removes temporary files that a killed save left behind)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
