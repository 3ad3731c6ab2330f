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
        # The longest tail that may still grow into a stop string starts at `start`; a complete
        # stop string ends the answer only if none could still complete earlier than it.
        keep = max((k for s in self.stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        start = len(pending) - keep
        cut = self._earliest_stop(pending)
        if 0 <= cut <= start:
            return self._stop_at(item, pending, cut)
        self._held = pending[start:]
        head = pending[:start]
        item.text += head
        return [Delta(item, head)] if head else []

    def _earliest_stop(self, text: str) -> int:
        return min((text.find(s) for s in self.stops if s in text), default=-1)

    def _stop_at(self, item: Item, pending: str, cut: int) -> list[OutputEvent]:
        self.stopped = True
        self._held = ""
        head = pending[:cut]
        item.text += head
        return ([Delta(item, head)] if head else []) + [Closed(item)]

    def _close(self) -> list[OutputEvent]:
        item, self._current = self._current, None
        held, self._held = self._held, ""
        cut = self._earliest_stop(held)  # the text ended: what is held is all there is
        if cut >= 0:
            return self._stop_at(item, held, cut)
        item.text += held
        return ([Delta(item, held)] if held else []) + [Closed(item)]
