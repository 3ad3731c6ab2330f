"""A conversation with gpt-oss: the API shared by the CLI, the TUI and library users.

    chat = Chat(model, tokenizer, reasoning_effort="low")
    for event in chat.send("Why is the sky blue?"):
        if isinstance(event, ReasoningDelta): ...   # chain of thought, live
        elif isinstance(event, AnswerDelta): ...    # the user-visible answer, live
        elif isinstance(event, Done): print(event.stats.summary())
    chat.save("chat.json")                          # Chat Completions JSON, reasoning included

Any thread may call ``send``/``reply``: the reply is generated on the engine thread
(gptoss_mlx/engine_thread.py) and its events come back to the caller as they are made.

A conversation longer than the context window is fitted before each reply: with
``context_overflow="truncate"`` (the default) the oldest turns are left out of the prompt and a
:class:`ContextTrimmed` event says so; with ``"error"`` a :class:`ContextLengthError` names the
limit and the history is left as it was. Either way :meth:`Chat.reply_reserve` tokens stay free
for the reply. The history itself (``chat.messages``, saved chats) keeps every message.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from . import harmony
from .chat_file import (  # noqa: F401 - ChatFileError: public here
    CHAT_FIELDS, DATE_SHAPE, ChatFileError, chat_file_problem, check_chat_file, is_one_line_date, write_json_atomic,
)
from .engine_thread import engine_thread
from .files import expand_user, valid_text
from .generate import RAISE_CONTEXT, ContextLengthError, Engine, SamplingParams, Stats, check_model, sampling_params
from .harmony.chat_completions import (
    _call_defaults, _header_field, _recipient_of, response_format_json, response_formats,
)
from .harmony import ContentDelta, DeveloperContent, Message, MessageEnd, MessageStart, ResponseFormat
from .structured import SchemaError, compile_schema, constrained_messages, constraints_for, final_header, grammars


@dataclass
class ReasoningDelta:
    text: str
    channel: str | None = "analysis"  # or, while the answer is held to a format, commentary (a preamble) or none
    message: int | None = None  # its message's index in the reply


# Text on these channels is the answer; on commentary, without a recipient, it is a preamble
# (text to the user before a call), shown with the answer's text.
ANSWER_CHANNELS = ("final", None)
TOOL_RESULT_CHANNELS = ("commentary", "analysis")  # a tool's result comes back on its call's


UNRUN_CALL = "Error: not run: the conversation ended before this call ran"


def result_channel(call: "ToolCall") -> str:
    """The channel a call's result goes on: its call's, or where harmony puts the call when the
    model wrote it on another (final, an unknown word, none): analysis for the built-in tools,
    commentary for functions."""
    return call.channel if call.channel in TOOL_RESULT_CHANNELS else _call_defaults(call.recipient)[0]


@dataclass
class AnswerDelta:
    text: str
    channel: str | None = None  # its message's channel (ANSWER_CHANNELS, or commentary: a preamble)
    message: int | None = None  # its message's index in the reply: a new message is a new paragraph


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
    """The conversation did not fit: this reply's prompt leaves out its oldest messages, and
    (``cut_result``: characters kept, of how many) shows the tool results it answers cut short."""
    dropped_messages: int
    dropped_tokens: int
    cut_result: tuple[int, int] | None = None
    repeated: bool = False  # the chat's last reply left out the same messages (said already)

    def __str__(self) -> str:
        parts = []
        if self.dropped_messages:
            parts.append(f"dropped the {self.dropped_messages} oldest messages")
        if self.cut_result:
            parts.append("cut the tool results to {} of their {} characters".format(*self.cut_result))
        return f"context full: {' and '.join(parts)} ({self.dropped_tokens} tokens) to make room"


ChatEvent = ReasoningDelta | AnswerDelta | ToolCall | ContextTrimmed | Done

CONTEXT_OVERFLOW = ("truncate", "error")
# Tokens kept free for the reply when fitting a long conversation into the context: room for a
# medium-effort chain of thought and its answer. Never more than max_tokens (when set) or a
# quarter of the context window (see Chat.reply_reserve).
REPLY_RESERVE = 2048


def check_schemas(tokenizer, functions: list[harmony.ToolSpec] = (),
                  response_format: ResponseFormat | dict | None = None) -> ResponseFormat | None:
    """The functions' parameters and the answer's format (a ResponseFormat, or a JSON Schema for
    one named "response") compiled, as a Chat compiles them when it is made: a SchemaError names
    what cannot be enforced. A front end calls this before the model loads. Returns the format."""
    grammars(tokenizer, DeveloperContent(functions=list(functions)))
    if response_format is None:
        return None
    fmt = response_format if isinstance(response_format, ResponseFormat) else ResponseFormat("response", response_format)
    compile_schema(tokenizer, fmt.schema, f"response format {fmt.name!r}")
    return fmt


class Chat:
    """A conversation with the model: ``send(text)`` streams the reply's events (the chain of
    thought, the answer, tool calls) and keeps the turn; tools, effort, instructions and the
    answer's format hold for every reply until ``apply()`` changes them; ``save()``/``load()``
    keep it in a file (the README's "Library")."""

    def __init__(self, model, tokenizer, *, instructions: str | None = None,
                 reasoning_effort: str = "medium", functions: list[harmony.ToolSpec] | None = None,
                 browser: bool = False, python: bool = False, python_description: str | None = None,
                 sampling: SamplingParams | dict | None = None, max_context: int | None = None,
                 context_overflow: str = "truncate", date: str | None = None,
                 engine: Engine | None = None, response_format: ResponseFormat | dict | None = None,
                 reasoning_budget: int | None = None):
        if context_overflow not in CONTEXT_OVERFLOW:
            raise ValueError(f"context_overflow must be truncate or error, got {context_overflow!r}")
        if engine is None:
            check_model(model)
        if engine is None and not hasattr(tokenizer, "encode_ordinary"):
            raise TypeError(f"tokenizer must be the loaded model's (model, tokenizer = gptoss_mlx.load(...)), "
                            f"got {type(tokenizer).__name__}")
        if engine is not None:  # (a model given beside it was ignored: the engine's model answered)
            if not hasattr(engine, "max_context"):
                raise TypeError(f"engine must be an Engine (gptoss_mlx.Engine(model)), got {type(engine).__name__}")
            if model is not None and getattr(engine, "model", model) is not model:
                raise ValueError("engine runs another model than the one given: give this model's engine "
                                 "(Engine(model)), or leave engine out")
            if max_context is not None and max_context != engine.max_context:
                raise ValueError(f"max_context is {max_context} but the engine's is {engine.max_context}: set it "
                                 "on the engine (Engine(model, max_context=...)), or leave engine out")
        if python_description is not None and not isinstance(python_description, str):
            raise TypeError(f"python_description must be a string or None, got {type(python_description).__name__}")
        self.sampling = sampling
        self.context_overflow = context_overflow
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, max_context=max_context)
        self.instructions = instructions
        self.functions = functions or []
        for name, value in (("browser", browser), ("python", python)):
            if value not in (True, False, None):  # "no" would declare the tool
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.browser, self.python = bool(browser), bool(python)
        self.python_description = python_description  # what this python tool really does
        if date is not None and not is_one_line_date(date):  # (a saved chat with it would not load)
            raise ValueError(f"date must be {DATE_SHAPE}, like \"2025-08-05\", got {date!r:.80}")
        self.date = date or harmony.today()
        self.messages: list[Message] = []  # user, assistant and tool messages, reasoning included
        self.reasoning_effort = reasoning_effort
        self.response_format = response_format
        self._turn_format = self._format  # the turn under way's
        if reasoning_budget is not None and (not isinstance(reasoning_budget, int) or isinstance(reasoning_budget, bool)
                                             or reasoning_budget < 0):
            raise ValueError(f"reasoning_budget must be a whole number >= 0 or None, got {reasoning_budget!r}")
        self.reasoning_budget = reasoning_budget  # tokens before the answer, at most
        self._stop = False
        self._open_stream = lambda: None  # the last reply stream handed out, weakly
        self._last_trim: tuple = ()  # the last trimmed prompt's conversation (its first message) and cut

    # -- settings
    @property
    def functions(self) -> list[harmony.ToolSpec]:
        """The functions the model is told of (ToolSpec objects)."""
        return self._functions

    @functions.setter
    def functions(self, functions) -> None:
        """Checked here, a TypeError, HarmonyError or SchemaError naming what is wrong, not when
        the next prompt is written (apply() and this setter took any list, and the chat could
        then neither send nor be saved)."""
        if not isinstance(functions, (list, tuple)):  # one, not a list of them
            one = isinstance(functions, (harmony.ToolSpec, dict, str))
            raise TypeError(f"functions must be a list of ToolSpec objects, got {'one ' if one else ''}"
                            f"{type(functions).__name__}" + (": [ToolSpec(**it)]" if isinstance(functions, dict) else ""))
        functions = list(functions)
        for f in functions:
            if not isinstance(f, harmony.ToolSpec):
                raise TypeError(f"functions must be ToolSpec(name, description, parameters) objects, got "
                                f"{type(f).__name__}" + (" (a dict: ToolSpec(**it))" if isinstance(f, dict) else ""))
            if not isinstance(f.name, str):
                raise TypeError(f"a function's name must be a string, got {f.name!r:.80}")
        check_schemas(self.tokenizer, functions)  # (its errors for a name or a schema first: SchemaError)
        harmony.messages.check_functions(functions, "functions", "functions")
        self._functions = functions

    @property
    def reasoning_effort(self) -> str:
        return self._effort

    @reasoning_effort.setter
    def reasoning_effort(self, effort: str) -> None:
        if effort not in harmony.EFFORTS:
            raise ValueError(f"reasoning effort must be one of {', '.join(harmony.EFFORTS)}, got {effort!r}")
        self._effort = effort  # applies from the next reply

    @property
    def response_format(self) -> ResponseFormat | None:
        """The shape every answer must have (a JSON Schema, enforced while decoding), or None."""
        return self._format

    @response_format.setter
    def response_format(self, value: ResponseFormat | dict | None) -> None:
        self._format = self._checked_format(value)  # applies from the next turn

    def _checked_format(self, value) -> ResponseFormat | None:
        """``value`` (a ResponseFormat, or a JSON Schema for one named "response"), compiled
        once here so that SchemaError names what cannot be enforced before anything is sent."""
        return check_schemas(self.tokenizer, response_format=value)

    def settings(self) -> dict:
        """What a conversation starts from besides its messages: the instructions, the effort,
        the functions and the answers' format (:meth:`apply` puts them back)."""
        return {"instructions": self.instructions, "reasoning_effort": self.reasoning_effort,
                "functions": list(self.functions), "response_format": self._format}

    def apply(self, settings: dict) -> None:
        """Put back what :meth:`settings` gave (any of its keys): all of it or, where a value is
        wrong (its error raised), none of it."""
        if not isinstance(settings, dict):
            raise TypeError(f"apply() takes a dict of settings (as settings() gives), got {type(settings).__name__}")
        unknown = sorted(set(settings) - set(self.settings()))
        if unknown:
            raise ValueError(f"apply(): {', '.join(map(str, unknown))} {'is' if len(unknown) == 1 else 'are'} no "
                             f"setting of a chat (those are {', '.join(self.settings())})")
        before = self.settings()
        try:
            for name, value in settings.items():
                setattr(self, name, value)
        except Exception:
            for name, value in before.items():  # (each valid: it was set)
                setattr(self, name, value)
            raise

    def keep_functions(self, functions: list[harmony.ToolSpec]) -> str | None:
        """After :meth:`load`: the model is told of ``functions`` (those that can run here: a
        front end's --functions) in place of those the saved chat declared; what changed, as a
        note, or None."""
        saved = {f.name for f in self.functions}
        self.functions = list(functions)
        here = {f.name for f in functions}
        if saved == here:
            return None
        parts = []
        if saved - here:
            parts.append(f"it was saved with {_names(saved - here)}, not loaded now (--functions FILE): "
                         "the model is no longer told of them")
        if here - saved:
            parts.append(f"{_names(here - saved)} from --functions {'are' if len(here - saved) > 1 else 'is'} "
                         "offered now")
        return "; ".join(parts)

    def reset(self) -> None:
        """Start over: no messages (the settings stay). A reply stream still open is closed
        first, so that nothing of it reaches the new conversation; one being taken on another
        thread makes this a RuntimeError (stop() it, or wait for its end, first)."""
        self._close_open_stream()
        self.messages = []

    def stop(self) -> None:
        """Ask the reply being generated to stop after the current token."""
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    # -- prompt
    def conversation(self) -> list[Message]:
        return self._prefix() + self.messages

    def _prefix(self) -> list[Message]:
        """The system message, and the developer message when there are instructions or tools."""
        prefix = [harmony.system_message(self._effort, self.date, self.browser, self.python,
                                         python_description=self.python_description)]
        formats = [self._turn_format] if self._turn_format else []
        if self.instructions is not None or self.functions or formats:
            prefix.append(Message("developer", DeveloperContent(self.instructions, self.functions, formats)))
        return prefix

    def prompt_tokens(self, messages: list[Message] | None = None) -> list[int]:
        """The prompt for the next reply, from ``messages`` (default: the whole history)."""
        messages = self.messages if messages is None else messages
        segments = harmony.render_conversation(self._prefix() + messages)
        return harmony.segments_to_tokens(segments, self.tokenizer)

    @property
    def reply_reserve(self) -> int:
        """Tokens that must stay free for the reply: REPLY_RESERVE, or max_tokens when that is
        smaller, and never more than a quarter of the context window."""
        return min(REPLY_RESERVE, self.sampling.max_tokens or REPLY_RESERVE,
                   self.engine.max_context // 4)

    def fitted_prompt(self) -> tuple[list[int], ContextTrimmed | None]:
        """The prompt for the next reply with room for it, and what was left out to make room.
        Raises ContextLengthError (naming the limit) when it does not fit and may not be trimmed,
        or when even the last user message alone is too long."""
        room = self.engine.max_context - self.reply_reserve
        prompt = self.prompt_tokens()
        if len(prompt) <= room:
            return prompt, None
        limit = (f"the context limit is {self.engine.max_context} tokens, "
                 f"{self.reply_reserve} of them kept free for the reply")
        if self.context_overflow == "error":
            raise ContextLengthError(
                f"the conversation is {len(prompt)} tokens and {limit}: start a new chat, "
                f"or {RAISE_CONTEXT}")
        # dropping more and more, whole turns where a quarter of the room's tokens is passed
        candidates = trimmed_histories(self.messages, lambda m: message_tokens(m, self.tokenizer), room // 4)
        index, kept = first_fitting(candidates, self.prompt_tokens, room)
        if index < len(candidates):
            return kept, ContextTrimmed(len(self.messages) - len(candidates[index]), len(prompt) - len(kept))
        if self.messages[-1].role == "tool":  # the results the reply answers: cut to fit
            cut = fit_by_cutting([self.messages] + candidates, self.tokenizer, self.prompt_tokens, room)
            if cut is not None:
                kept_messages, kept, chars = cut
                return kept, ContextTrimmed(len(self.messages) - len(kept_messages), len(prompt) - len(kept), chars)
            raise ContextLengthError(
                f"the instructions, the last user message and the tool calls it is answering are "
                f"more than {room} tokens even with their results cut to nothing, and {limit}: "
                f"start a new chat, or {RAISE_CONTEXT}")
        raise ContextLengthError(
            f"the instructions and the last user message alone are "
            f"{len(kept or prompt)} tokens and {limit}: shorten the message, "
            f"or {RAISE_CONTEXT}")

    @property
    def history(self) -> list[Message]:
        """The conversation as the model will see it next: earlier reasoning dropped."""
        return harmony.drop_earlier_analysis(self.messages)

    # -- turns
    def send(self, text: str, response_format: ResponseFormat | dict | None = None) -> Iterator[ChatEvent]:
        """Add a user message and stream the reply. If anything fails before any reply (it does
        not fit the context: ContextLengthError; NaN logits; a checkpoint file that fails while
        experts stream from it; a bad sampling setting), or the reply is stopped before any of it
        is kept (during the prompt's prefill, or in its chain of thought, which an interrupted
        reply drops), the message is taken back out: the chat goes on as before, and the caller
        may offer the text again to be edited or resent. Lone surrogates in ``text`` (bytes that were not UTF-8) become U+FFFD. ``response_format`` (a JSON Schema, or a
        ResponseFormat) shapes this turn's answer, over :attr:`response_format`; a schema that
        cannot be enforced raises SchemaError before anything is sent."""
        if not isinstance(text, str):
            raise TypeError(f"send() takes the user's message as a string, got {type(text).__name__}")
        turn_format = self._checked_format(response_format) if response_format is not None else self._format
        text = valid_text(text)  # what the chat keeps is what its file can hold
        return self._stream(lambda ledger: self._send(text, turn_format, ledger))

    def _send(self, text: str, turn_format, ledger: "_Ledger") -> Iterator[ChatEvent]:
        self._turn_format = turn_format  # also for the replies after tool results
        message = Message("user", text)
        self.messages.append(message)
        ledger.asked = message
        try:
            yield from self._reply(ledger)
        except Exception:  # the context, NaN logits, a checkpoint file, a bad setting...
            if self.messages and self.messages[-1] is message:  # nothing came after it
                self.messages.pop()
            raise

    @property
    def instructions(self) -> str | None:
        """The developer message's instructions (the system prompt), or None."""
        return self._instructions

    @instructions.setter
    def instructions(self, text: str | None) -> None:
        if text is not None and not isinstance(text, str):
            raise TypeError(f"instructions must be a string or None, got {type(text).__name__}")
        self._instructions = None if text is None else valid_text(text)

    def answer_unrun_call(self) -> Message | None:
        """Where the history ends at a call with no result (a front end saved the turn before
        the call ran, and the process ended then), answer it for the model with UNRUN_CALL;
        the call, or None. (Neither shown nor answered, the model never learnt it had not run:
        a tester's, helper-157.)"""
        last = self.messages[-1] if self.messages else None
        if last is None or not last.is_tool_call:
            return None
        self.add_tool_result(last.recipient, UNRUN_CALL, channel=result_channel(last))
        return last

    def add_tool_result(self, name: str, content: str, channel: str = "commentary") -> None:
        """A tool's result for the model: ``name`` as the model called the tool
        (``functions.get_weather``, ``python``, ``browser.search``; a bare function name is
        ``functions.NAME``, as a saved chat reads it back), on the call's ``channel``
        (commentary, or analysis for a built-in tool called there)."""
        if not isinstance(content, str) or not isinstance(name, str):
            raise TypeError(f"add_tool_result takes the tool's name and its result as strings, got "
                            f"{type(name).__name__} and {type(content).__name__} (json.dumps a value first)")
        if channel not in TOOL_RESULT_CHANNELS:  # (any word went into the prompt and the saved chat)
            raise ValueError(f"add_tool_result's channel must be {' or '.join(TOOL_RESULT_CHANNELS)} (the "
                             f"call's), got {channel!r:.80}")
        try:  # each is a word of the result's header (as a saved chat's are checked)
            _header_field(name, "add_tool_result's name")
            _header_field(channel, "add_tool_result's channel")
        except harmony.HarmonyError as e:
            raise ValueError(str(e)) from None
        last = self.messages[-1] if self.messages else None
        if not (last is not None and last.is_tool_call and last.recipient == name
                and name not in harmony.ROLES + harmony.NOT_A_CALL):  # ("user" would head a user turn)
            # (the call just made is answered under its own recipient, whatever the model wrote:
            # "functions." or "python" beside a function named python)
            if name.startswith(".") or name.endswith(".") or ".." in name:  # ("functions." names no function)
                raise ValueError(f"add_tool_result's name {name[:80]!r}: a part of the name is empty")
            if "<|" in name:  # (a content type may start with <|constrain|>; a name may not)
                raise ValueError(f"add_tool_result's name {name[:80]!r}: a tool's name cannot hold a special token")
            # as a saved chat's tool message is read back ("get_weather" came back functions.get_weather)
            name = _recipient_of(name, {f.name for f in self.functions})
        self.messages.append(Message("tool", valid_text(content), channel=channel, recipient="assistant",
                                     name=name))

    @property
    def sampling(self) -> SamplingParams:
        return self._sampling

    @sampling.setter
    def sampling(self, value: SamplingParams | dict | None) -> None:
        """A SamplingParams, or a dict of its fields (None: the defaults), checked when set."""
        self._sampling = sampling_params(value, "sampling") or SamplingParams()

    def mark_stopped(self) -> None:
        """The reply was stopped after its last message (while a tool ran for it, or its user was
        asked about it): that message is marked so, as a reply stopped while written is, and
        the mark is saved and shown again when the chat is reopened (reply_cut)."""
        last = _last_reply_message(self.messages)
        if last is not None and last.cut is None:
            last.cut = "interrupted"

    def reply(self, answer: bool = False) -> Iterator[ChatEvent]:
        """Generate the assistant's next messages; stops at a final answer or a tool call.
        If interrupted (``stop()``, Ctrl-C, or the consumer closing the stream), the partial
        answer is kept and the session goes on: closing the stream keeps what the consumer took,
        not what the engine made after it. ``answer``: the reply is the final answer (its header
        is written for the model: the last round of a tool loop)."""
        return self._stream(lambda ledger: self._reply(ledger, answer))

    def _stream(self, reply: Callable[["_Ledger"], Iterator[ChatEvent]]) -> Iterator[ChatEvent]:
        """``reply(ledger)`` run on the engine thread, its events watched by a ledger. A reply
        stream of this chat still open (its consumer stopped taking events but kept it) is
        closed first: the history keeps what was taken from it, and the new turn follows that."""
        self._close_open_stream()
        ledger = _Ledger(self.messages, on_take_back=self._forget_cut)
        events = _ReplyStream(ledger.watch(engine_thread().stream(reply(ledger))))
        self._open_stream = weakref.ref(events)
        return events

    def _close_open_stream(self) -> None:
        """Close the last reply stream handed out if its consumer left it open: the history then
        holds what was taken from it, no more."""
        previous = self._open_stream()
        if previous is not None:
            previous.close()

    def _reply(self, ledger: "_Ledger", answer: bool = False) -> Iterator[ChatEvent]:
        """The reply, on the engine thread: ``stop()`` is honoured at the next token."""
        self._stop = False
        self._channel = self._recipient = None
        self._others = False  # the message under way is not the assistant's (its text is not shown)
        self._ended = 0  # the parser's messages ended so far: which one an event belongs to
        self._started = False  # whether the message under way has its header (MessageStart)
        parser = harmony.StreamParser(self.tokenizer, role="assistant")
        prompt, trimmed = self.fitted_prompt()
        # the last reply's cut, in this conversation (its first message); none if it left nothing out
        last, self._last_trim = self._last_trim, (self.messages[0], trimmed.dropped_messages,
                                                  trimmed.cut_result) if trimmed else ()
        if trimmed:
            trimmed.repeated = bool(last) and last[0] is self._last_trim[0] and last[1:] == self._last_trim[1:]
            yield ledger.note(trimmed)
        forced = final_header(self.tokenizer) if answer else []
        for token in forced:  # the header as if the model had written it
            list(self._chat_events(parser.feed(token)))
        prompt = prompt + forced
        constraints = self._constraints(prompt, forced)
        parser.drops_header_words = constrained_messages(constraints)
        stream = self.engine.generate(prompt, self.sampling, logits_processors=constraints,
                                      instructions=harmony.instructions_length(self._prefix(), prompt),
                                      stop=lambda: self._stop)
        finish = None
        try:
            for token in stream:
                for event, message in self._chat_events(parser.feed(token)):
                    yield ledger.note(event, message)
                if self._stop:
                    finish = "interrupted"
                    break
        except GeneratorExit:  # the consumer closed the stream (Ctrl-C, quit)
            stream.close()
            self._keep(parser, "interrupted", self._ended, self._started, ledger)
            raise
        stream.close()
        # the parser's messages whole before the reply stopped, and whether the next had begun
        ended, started = self._ended, self._started
        if finish is None and self.engine.stats.finish_reason == "interrupted":  # the engine saw stop()
            finish = "interrupted"  # first: in the prefill, or between two tokens
        elif finish is None and self.engine.stats.finish_reason in ("length", "context"):
            finish = "cut"
        for event, message in self._chat_events(parser.finish()):
            # cut short, a message's header or a tool call is never shown as if whole (text
            # without any header, which the parser recovers as the answer, is)
            whole_header = started or self._channel is None
            if finish is None or message < ended or whole_header and not isinstance(event, ToolCall):
                yield ledger.note(event, message)
        new = self._keep(parser, finish, ended, started, ledger)
        if finish == "interrupted":
            ledger.take_back_unanswered()
        finish = None if finish == "cut" else finish
        stats = self.engine.stats
        yield ledger.note(Done(stats, finish or stats.finish_reason, new))

    def _forget_cut(self) -> None:
        """The reply that said the last cut was taken back (its notice with it): say it again."""
        self._last_trim = ()

    def _constraints(self, prompt: list[int], forced: list[int] = ()) -> list:
        """The reply's logits processor: the answer's shape, valid function calls, the
        reasoning budget (none when there is nothing to enforce); ``forced``: the header the
        prompt ends with."""
        return constraints_for(self.tokenizer, self._prefix(), reasoning_budget=self.reasoning_budget,
                               max_tokens=self.engine.token_budget(len(prompt), self.sampling),
                               prefix=forced)

    def _chat_events(self, events) -> Iterator[tuple[ChatEvent, int]]:
        """Parser events -> chat events (reasoning, answer text, tool calls), each with the
        index of the parser's message it comes from."""
        for event in events:
            if isinstance(event, MessageStart):
                self._channel, self._recipient = event.channel, event.recipient
                self._others = event.role != "assistant"  # a user or system message the model wrote
                self._started = True
            elif isinstance(event, ContentDelta) and self._recipient in harmony.NOT_A_CALL and not self._others:
                if self._is_answer(self._channel):
                    yield AnswerDelta(event.text, self._channel, self._ended), self._ended
                else:
                    yield ReasoningDelta(event.text, self._channel, self._ended), self._ended
            elif isinstance(event, MessageEnd):
                m = event.message
                if m.is_tool_call:
                    yield ToolCall(m.recipient, m.text, m.channel), self._ended
                self._ended += 1
                self._started = False

    def _is_answer(self, channel: str | None) -> bool:
        """Text on ``channel`` is the answer: any but analysis; with a response format only the
        final channel's (constrained) text, so the answer is exactly the JSON."""
        return channel == "final" if self._turn_format else channel != "analysis"

    def _keep(self, parser: harmony.StreamParser, finish: str | None, ended: int, started: bool,
              ledger: "_Ledger") -> list[Message]:
        """Add the reply's messages to the history. The first ``ended`` of the parser's messages
        are whole. A reply cut short (``finish``: "interrupted" by stop() or the consumer,
        "cut" at max_tokens or the context) keeps the answer text of the message it was cut in,
        but not that message if its header was begun and not whole (``started``; text with no
        header at all is recovered as the answer), nor a tool call cut
        short, nor an empty message; interrupted, not a half-written chain of thought either."""
        parser.finish()
        new = []
        last = len(parser.messages) - 1
        for index, m in enumerate(parser.messages):
            if m.role != "assistant":
                continue
            if finish is not None and index >= ended and (
                    not started and m.channel is not None or m.is_tool_call or not m.text
                    or finish == "interrupted" and m.channel == "analysis"):
                continue
            if m.channel is None and index == last:  # the reply ends in text without a channel:
                m.channel = "final" if self._is_answer(None) else "analysis"  # the answer, if it may be
            new.append(m)  # a message without a channel before others (a call) stays as written
            ledger.kept[index] = m
        if finish is not None and new:  # saved with the chat: a reloaded reply says it was cut short
            new[-1].cut = "interrupted" if finish == "interrupted" else self.engine.stats.finish_reason
        self.messages.extend(new)
        return new

    # -- persistence
    def to_json(self) -> dict:
        self._close_open_stream()  # what a reply stream left open made past its consumer goes
        data = harmony.to_chat_completions(self.conversation())
        data["date"] = self.date
        if self._format != self._turn_format:  # the last turn's format was that turn's alone
            data["chat_response_format"] = self._format and response_format_json(self._format)
        return data

    def save(self, path: str | os.PathLike, **metadata) -> Path:
        """Write the chat as Chat Completions JSON (reasoning included), atomically.
        ``metadata`` (e.g. a title) is stored beside it and ignored by :meth:`load`; a key that
        names one of the chat's own fields is a ValueError (the file would not load)."""
        clash = sorted(set(metadata) & set(CHAT_FIELDS))
        if clash:
            raise ValueError(f"save(): {', '.join(clash)} {'is' if len(clash) == 1 else 'are'} the chat's own "
                             f"(its file would not load); give the metadata other names")
        problem = chat_file_problem({"messages": [], **metadata})  # (a title that is no string, a newer format)
        if problem:
            raise ValueError(f"save(): {problem}")
        for key, value in metadata.items():  # (json's own TypeError named no argument; inf was written)
            try:
                same = json.loads(json.dumps(value, allow_nan=False)) == value
            except (TypeError, ValueError):
                same = False
            if not same:
                raise ValueError(f"save(): {key} must be JSON data (strings, finite numbers, booleans, None, "
                                 "and lists and dicts with string keys of them)")
        return write_json_atomic(path, {**self.to_json(), **metadata})

    def load(self, path: str | os.PathLike) -> dict:
        """Replace this chat's history, instructions, tools and effort with a saved one; returns
        the file's JSON (its title and other metadata too). A file that is not a saved chat (or
        is damaged, or from a newer version) raises ChatFileError naming the file and the field,
        and the chat stays as it was."""
        path = expand_user(path, ChatFileError)
        data = check_chat_file(path)
        self._close_open_stream()  # as reset(): nothing of a reply under way joins the loaded chat
        messages = harmony.from_chat_completions(data, date=data.get("date"))
        system, rest = messages[0], messages[1:]
        dev = rest.pop(0).content if rest and rest[0].role == "developer" and isinstance(
            rest[0].content, DeveloperContent) else DeveloperContent(None, [])
        try:  # the answers' shape, as its last reply had it: the next prompt is the same
            answer_format = self._checked_format(dev.response_formats[0] if dev.response_formats else None)
            chat_format = answer_format  # and the chat's own, where that was the last turn's alone
            if "chat_response_format" in data:
                chat_format = self._checked_format(next(iter(response_formats(data["chat_response_format"],
                                                                              "chat_response_format")), None))
            grammars(self.tokenizer, DeveloperContent(functions=list(dev.functions)))  # its tools' too
        except SchemaError as e:
            raise ChatFileError(f"{path}: {e}") from None
        self.reasoning_effort = system.content.reasoning_effort or "medium"
        self.date = data.get("date") or self.date
        self.instructions, self.functions = dev.instructions, list(dev.functions)
        self._format, self._turn_format = chat_format, answer_format
        self.messages = rest
        return data


def _last_reply_message(messages: list[Message]) -> Message | None:
    return next((m for m in reversed(messages) if m.role == "assistant"), None)


def reply_cut(messages: list[Message]) -> str | None:
    """How a reply (its messages: reasoning, calls, results, answer) was cut short when it was
    made, None if not: the mark on its last message of the assistant's (a stop at a tool call
    marks the call, which its result follows)."""
    last = _last_reply_message(messages)
    return last.cut if last is not None else None


def _names(names: set[str]) -> str:
    return ", ".join(sorted(names)[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


class _ReplyStream:
    """A reply's events, which one thread at a time takes (a generator taken by two threads
    raises a bare "generator already executing" in one of them). Closing it while another
    thread is taking an event is refused; an event asked for while it closes waits, then ends
    the iteration."""

    def __init__(self, events: Iterator[ChatEvent]):
        self._events = events
        self._lock = threading.Lock()

    def __iter__(self) -> "_ReplyStream":
        return self

    def __next__(self) -> ChatEvent:
        with self._lock:
            return next(self._events)

    def close(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a reply of this chat is still streaming on another thread: "
                               "stop() it, or wait for its end, first")
        try:
            self._events.close()
        finally:
            self._lock.release()


class _Ledger:
    """One reply stream's events as the engine thread made them, and the history's messages
    they belong to, so that a consumer closing the stream early (Ctrl-C) leaves in the history
    only what it took: the engine runs ahead of the consumer by an event or two, and may even
    have finished the reply."""

    def __init__(self, messages: list[Message], on_take_back: Callable[[], None] = lambda: None):
        self.messages = messages  # the chat's history
        self.on_take_back = on_take_back  # called when the user message leaves the history again
        self.made: list[tuple[ChatEvent, int | None]] = []  # (event, parser message index)
        self.kept: dict[int, Message] = {}  # parser message index -> the message in the history
        self.asked: Message | None = None  # the user message a send() added

    def take_back_unanswered(self) -> None:
        """A stopped send() with nothing of its reply kept: its message leaves the history."""
        if self.asked is not None and self.messages and self.messages[-1] is self.asked:
            self.messages.pop()
            self.on_take_back()

    def note(self, event: ChatEvent, message: int | None = None) -> ChatEvent:
        """On the engine thread: ``event``, from the parser's ``message``, is being yielded."""
        self.made.append((event, message))
        return event

    def watch(self, events: Iterator[ChatEvent]) -> Iterator[ChatEvent]:
        """On the consumer's side: ``events``, counted as taken."""
        taken, complete = 0, False
        try:
            for event in events:
                taken += 1
                yield event
            complete = True
        finally:
            if not complete:
                try:
                    events.close()  # waits until the engine thread has kept the reply's messages
                finally:  # (a second Ctrl-C is raised only once they are kept)
                    self._forget(taken)

    def _forget(self, taken: int) -> None:
        """Cut the kept messages back to the first ``taken`` events: a message's text to the
        deltas taken (none: the message goes), as an interrupted reply keeps it (Chat._keep): a
        chain of thought or a tool call not wholly taken goes."""
        for index in sorted({i for _, i in self.made[taken:] if i is not None}):
            m = self.kept.get(index)
            if m is None:
                continue
            text = "".join(e.text for e, i in self.made[:taken]
                           if i == index and isinstance(e, (AnswerDelta, ReasoningDelta)))
            if m.is_tool_call or m.channel == "analysis" or not text:
                self.messages[:] = [x for x in self.messages if x is not m]
            else:
                m.content = text
        if not any(isinstance(e, Done) for e, _ in self.made[:taken]):  # stopped before its end
            self.take_back_unanswered()


def first_fitting(candidates: list, tokens_of: Callable[[list], list[int]], room: int) -> tuple[int, list[int] | None]:
    """(index, tokens) of the first of ``candidates`` (longer to shorter) whose ``tokens_of``
    are at most ``room`` long, found by bisection. When none fits: (len(candidates), the last
    one's tokens, or None when there are no candidates)."""
    tokens: dict[int, list[int]] = {}
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        tokens[mid] = tokens_of(candidates[mid])
        lo, hi = (lo, mid) if len(tokens[mid]) <= room else (mid + 1, hi)
    return lo, tokens.get(min(lo, len(candidates) - 1))


def trimmed_histories(messages: list[Message], size: Callable[[Message], int] | None = None,
                      quantum: int = 0) -> list[list[Message]]:
    """Shorter and shorter histories, the oldest messages dropped first: whole turns (a user
    message and what followed it; the latest system or developer message among them stays,
    until only the last turn is left: then it goes too), then, inside the last turn, the
    assistant's and tools' messages after its user message, but for the last calls and their
    results when the history ends with them (the reply answers them: results too long are cut
    instead, :func:`cut_results`). Calls and their results are dropped together.

    With ``size`` (a message's tokens) and ``quantum``, whole turns are dropped at first only
    where the tokens dropped pass a multiple of ``quantum``: the history's start then stays put
    while it grows by about that much, and each prompt shares the prompt cache's up to its end
    (dropping just enough each turn moved the start every turn: every turn read the whole
    context again)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    last = users[-1] if users else -1
    starts = [i for i in users if i > 0]
    if size is not None and quantum > 0:
        stable, dropped, k, done = [], 0, 1, 0
        for start in starts:
            dropped += sum(map(size, messages[done:start]))
            done = start
            if dropped >= k * quantum:
                stable.append(start)
                k = dropped // quantum + 1
        if stable:
            starts = stable + [i for i in starts if i > stable[-1]]
    latest, instructions = None, {}  # each start's: the latest given among the turns left out
    for i, m in enumerate(messages):
        instructions[i] = [latest] if latest is not None else []
        latest = m if m.role in ("system", "developer") else latest
    whole_turns = [instructions[i] + messages[i:] for i in starts]
    fewer = [messages[last:]] if starts and instructions[last] else []
    pinned = messages[last:last + 1] if users else []
    end = answered_calls(messages, last + 1)
    inside = [pinned + [m for m in messages[last + 1:j] if m.role in ("system", "developer")] + messages[j:]
              for j in range(last + 2, end + 1) if j == len(messages) or _round_starts(messages, j)]
    return whole_turns + fewer + inside


def _round_starts(messages: list[Message], j: int) -> bool:
    """Whether ``messages[j:]`` starts a round of its own: not a result, nor the second of
    parallel calls (their results would be left without their calls), nor instructions."""
    m = messages[j]
    return (m.role not in ("tool", "system", "developer")
            and not (m.is_tool_call and j > 0 and messages[j - 1].is_tool_call))


def answered_calls(messages: list[Message], first: int = 0) -> int:
    """Where the calls the history ends answering begin (their results end it; parallel calls
    come one after another, then their results), not before ``first``; len(messages) when the
    history does not end with results."""
    end = len(messages)
    while end > first and messages[end - 1].role == "tool":
        end -= 1
    if end == len(messages):
        return end
    while end > first and messages[end - 1].is_tool_call:
        end -= 1
    return end


def message_tokens(message: Message, tokenizer) -> int:
    """About the tokens ``message`` takes in a prompt (reasoning: none; earlier turns' is left
    out): what :func:`trimmed_histories` counts to keep its cuts in place."""
    if message.channel == "analysis":
        return 0
    return len(harmony.segments_to_tokens(harmony.render_message(message), tokenizer))


def fit_by_cutting(candidates: list[list[Message]], tokenizer, prompt_for: Callable[[list[Message]], list[int]],
                   room: int) -> tuple[list[Message], list[int], tuple[int, int]] | None:
    """The first of ``candidates`` (:func:`trimmed_histories`' order) that keeps only the last
    turn and fits once the results it ends with are cut (:func:`cut_results`): the older turns
    go first, then the results are cut before the last turn's instructions or earlier rounds go."""
    for candidate in candidates:
        users = [m for m in candidate if m.role == "user"]
        if len(users) <= 1 and candidate[-1].role == "tool":
            cut = cut_results(candidate, tokenizer, prompt_for, room)
            if cut is not None:
                return cut
    return None


def cut_results(messages: list[Message], tokenizer, prompt_for: Callable[[list[Message]], list[int]],
                room: int) -> tuple[list[Message], list[int], tuple[int, int]] | None:
    """``messages`` with the results they end with (see :func:`answered_calls`) cut, each with a
    note saying so, the longest first, until ``prompt_for`` them is at most ``room`` tokens:
    (the messages, their prompt, (characters kept, of how many) in the results cut); None when
    not even their notes fit."""
    messages = list(messages)
    results = [i for i in range(answered_calls(messages), len(messages)) if messages[i].role == "tool"]
    total = 0
    for i in sorted(results, key=lambda i: -len(messages[i].text)):
        original = messages[i]

        def prompt(text: str, i=i, original=original) -> list[int]:
            return prompt_for(messages[:i] + [replace(original, content=text)] + messages[i + 1:])
        cut = cut_result(original.text, tokenizer, prompt, room)
        total += len(original.text)
        if cut is not None:
            messages[i] = replace(original, content=cut[0])
            return messages, cut[1], (len(cut[0].rsplit(CUT_NOTE, 1)[0]), total)  # (the others: none kept)
        messages[i] = replace(original, content=_cut_note("", original.text))  # nothing of it fits
    return None


CUT_NOTE = "\n[cut to fit the context: "


def _cut_note(kept: str, content: str) -> str:
    return f"{kept}{CUT_NOTE}the first {len(kept)} of {len(content)} characters]"


def cut_result(content: str, tokenizer, prompt_for: Callable[[str], list[int]],
               room: int) -> tuple[str, list[int]] | None:
    """A tool result ``content`` cut, with a note saying so, so that ``prompt_for`` it is at most
    ``room`` tokens: (the text, the prompt's tokens); None when not even the note fits. The
    cut ends at a whole character (never inside one, as a token can)."""
    tokens = prompt_for(_cut_note("", content))
    if len(tokens) > room:
        return None
    body = tokenizer.encode_ordinary(content)
    keep = len(body) - (len(prompt_for(content)) - room)
    for _ in range(4):  # a cut can tokenize a little longer than it counted
        keep -= 32
        text = _cut_note(tokenizer.decode_bytes(body[:max(keep, 0)]).decode("utf-8", errors="ignore"), content)
        tokens = prompt_for(text)
        if len(tokens) <= room:
            return text, tokens
        keep -= len(tokens) - room
    return None
