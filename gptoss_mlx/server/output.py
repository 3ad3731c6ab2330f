"""Sampled tokens -> the reply's output items, as both APIs describe them: reasoning, text, and
function calls, each opened, streamed in deltas and closed.

Built on the harmony StreamParser (which never raises). Two things are done here for HTTP
clients: a control token the model writes inside a message never reaches their text, and stop
strings cut the answer text (the tail that could begin a stop string is held back meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .. import harmony
from ..harmony import ContentDelta, MessageEnd, MessageStart
from ..harmony.chat_completions import function_name
from ..tokenizer import NUM_BPE_TOKENS, SPECIAL_TOKENS

# The control tokens that end a message's content (the parser flushes it as text on them).
ENDS_CONTENT = harmony.MESSAGE_END_TOKENS | {SPECIAL_TOKENS[harmony.START], SPECIAL_TOKENS[harmony.ENDOFTEXT]}

# What only a message header holds.
HEADER_MARKS = (harmony.CHANNEL, harmony.CONSTRAIN, harmony.START)
# SERVER_CALL: a call the server answers itself: to one of its own tools (gptoss_mlx/server/tools.py)
# or to a tool the request does not give the model (an error result).
REASONING, TEXT, CALL, SERVER_CALL = "reasoning", "text", "call", "server_call"


@dataclass
class Item:
    kind: str  # REASONING, TEXT, CALL or SERVER_CALL
    name: str | None = None  # a call's function name ("get_weather"; "browser.search")
    text: str = ""  # so far; the whole of it once ended
    tokens: int = 0
    recipient: str | None = None  # a call's recipient ("functions.get_weather")
    channel: str | None = None
    cut: bool = False  # the generation ended inside it (max tokens, the context, the client gone)
    result: str | None = None  # SERVER_CALL: the result the model was given, once it was
    failed: bool = False  # SERVER_CALL: that result is an error


@dataclass
class Opened:
    item: Item


@dataclass
class Delta:
    item: Item
    text: str


@dataclass
class Closed:
    item: Item


@dataclass
class Waiting:
    """A call the server answers is still running (sent every WAITING_S while it runs, so that
    a stream is never silent for long)."""
    item: Item


OutputEvent = Opened | Delta | Closed | Waiting


def item_kind(start: MessageStart) -> tuple[str, str | None]:
    """An assistant message's kind: a tool call when it has a recipient (on any channel), the
    chain of thought on the analysis channel, else text the user sees (final, preambles)."""
    if start.recipient not in harmony.NOT_A_CALL:
        return CALL, function_name(start.recipient)
    return (REASONING if start.channel == "analysis" else TEXT), None


class StopMatcher:
    """A request's stop strings matched in an answer's text as it streams: for each, the longest
    of its prefixes the text ends with, updated a character at a time (Knuth-Morris-Pratt), so
    a step costs its own text's length, not the stop strings' (checking every prefix of every
    stop string against the text's end made a client's 100,000-character stop string cost
    seconds a step, for every sequence of the batch: a tester's). Positions count the
    characters of the item's text since :meth:`reset`."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._fail = [_prefix_function(s) for s in stops]
        self.reset()

    def reset(self) -> None:
        self.seen = 0  # characters fed
        self.cut: int | None = None  # where the earliest complete stop string starts
        self._matched = [0] * len(self.stops)  # each one's longest prefix the text ends with

    def feed(self, text: str) -> int | None:
        """Where the answer stops, once a stop string is complete and none under way could still
        complete earlier; else None."""
        for ch in text:
            self.seen += 1
            for i, (stop, fail) in enumerate(zip(self.stops, self._fail)):
                k = self._matched[i]
                if k == len(stop):
                    k = fail[k - 1]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                k += stop[k] == ch
                self._matched[i] = k
                if k == len(stop) and (self.cut is None or self.seen - k < self.cut):
                    self.cut = self.seen - k
            if self.cut is not None and self.seen - max(self._matched) >= self.cut:
                return self.cut
        return None

    def held_from(self) -> int:
        """Where the text that may still be part of a stop string starts (``seen``: none)."""
        start = self.seen - max(self._matched, default=0)
        return start if self.cut is None else min(start, self.cut)


def _prefix_function(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        k += s[i] == s[k]
        fail[i] = k
    return fail


@dataclass
class ReplyStream:
    tokenizer: object
    stops: list[str] = field(default_factory=list)
    server_answers: Callable[[str], bool] = lambda recipient: False  # a call the client does not get?
    final_only: bool = False  # only the final channel's text is the answer (a response format)
    constrained: Callable | None = None  # messages held to a grammar (structured.constrained_messages)
    items: list[Item] = field(default_factory=list)
    stopped: bool = False  # a stop string ended the answer

    def __post_init__(self):
        self.next_round()

    def next_round(self) -> None:
        """Parse a new generation (after a tool result), continuing the same items."""
        self._parser = harmony.StreamParser(self.tokenizer, role="assistant")
        self._parser.drops_header_words = self.constrained
        self._current: Item | None = None
        self._unowned = 0  # tokens fed since a message ended, none open
        self._held = ""  # answer text that may be the start of a stop string
        self._stops = StopMatcher(self.stops)
        self._others = False  # the message under way is not the assistant's (the model wrote another role's)

    @property
    def messages(self) -> list[harmony.Message]:
        """This round's assistant messages, as harmony messages (for the next round's prompt)."""
        return [m for m in self._parser.messages if m.role == "assistant"]

    def feed(self, token: int) -> list[OutputEvent]:
        if self._current is not None:
            self._current.tokens += 1
        else:  # a header's, or (without <|message|>) a message's own text
            self._unowned += 1
        # A control token inside a message (<|channel|> in the text) is not text; what one that
        # ends a message or a header flushes is (the end of a character cut short, the words of
        # a final header written without <|message|>: a model's "<|channel|>final Sorry<|return|>").
        literal = (token >= NUM_BPE_TOKENS and self._parser.state == "content"
                   and token not in ENDS_CONTENT)
        events = self._parser.feed(token)
        if literal:
            events = [e for e in events if not isinstance(e, ContentDelta)]
        return self._convert(events, salvaged=token != SPECIAL_TOKENS[harmony.MESSAGE])

    def finish(self) -> list[OutputEvent]:
        """The generation ended (max tokens, the context, a stop): close what is open. A header
        it ended inside is markup, not text (``<|channel|>commentary to=functions.f``): dropped;
        text the model wrote without any header is kept."""
        header = self._parser.pending_header
        if any(mark in header for mark in HEADER_MARKS) or any(w.startswith("to=") for w in header.split()):
            return []
        events = self._convert(self._parser.finish(), salvaged=True)
        for event in events:  # what only the end of the generation closes was cut short
            if isinstance(event, Closed):
                event.item.cut = True
        return events

    @property
    def reasoning_tokens(self) -> int:
        return sum(i.tokens for i in self.items if i.kind == REASONING)

    def _convert(self, events, salvaged: bool = False) -> list[OutputEvent]:
        """``salvaged``: a message opened here by anything but ``<|message|>`` is text the model
        wrote without a header (reasoning closed by a budget, say): the tokens since the last
        message are its own, and count (reasoning_tokens)."""
        out: list[OutputEvent] = []
        for event in events:
            if self.stopped:
                break
            if isinstance(event, MessageStart) and event.role != "assistant":
                self._others = True  # a user's turn or a tool's result the model wrote: not the assistant's
                self._unowned = 0
                continue
            if isinstance(event, MessageStart):
                self._others = False
                kind, name = item_kind(event)
                if kind == CALL and self.server_answers(event.recipient):
                    kind = SERVER_CALL
                elif kind == TEXT and self.final_only and event.channel != "final":
                    kind = REASONING  # a preamble beside JSON would break it for the client
                self._current = Item(kind, name, recipient=event.recipient, channel=event.channel,
                                     tokens=self._unowned if salvaged else 0)
                self._unowned = 0
                self.items.append(self._current)
                out.append(Opened(self._current))
            elif self._others:
                continue
            elif isinstance(event, ContentDelta):
                out += self._text(event.text)
            elif isinstance(event, MessageEnd) and self._current is not None:
                out += self._close()
        return out

    def _text(self, text: str) -> list[OutputEvent]:
        item = self._current
        if item.kind != TEXT or not self.stops:
            item.text += text
            return [Delta(item, text)]
        pending = self._held + text
        at = self._stops.seen - len(self._held)  # where pending starts in the item's text
        cut = self._stops.feed(text)
        if cut is not None:
            return self._stop_at(item, pending, cut - at)
        # What may still be (or complete before) a stop string is held back.
        start = self._stops.held_from() - at
        self._held = pending[start:]
        head = pending[:start]
        item.text += head
        return [Delta(item, head)] if head else []

    def _stop_at(self, item: Item, pending: str, cut: int) -> list[OutputEvent]:
        self.stopped = True
        self._held = ""
        self._stops.reset()
        head = pending[:cut]
        item.text += head
        return ([Delta(item, head)] if head else []) + [Closed(item)]

    def _close(self) -> list[OutputEvent]:
        item, self._current = self._current, None
        held, self._held = self._held, ""
        cut = self._stops.cut  # the text ended: a stop string found is where it stops
        if cut is not None:
            return self._stop_at(item, held, cut - (self._stops.seen - len(held)))
        self._stops.reset()
        item.text += held
        return ([Delta(item, held)] if held else []) + [Closed(item)]
