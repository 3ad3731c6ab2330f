"""Sampled tokens -> the reply's output items, as both APIs describe them: reasoning, text, and
function calls, each opened, streamed in deltas and closed.

Built on the harmony StreamParser (which never raises). Two things are done here for HTTP
clients: a control token the model writes inside a message never reaches their text, and stop
strings cut the answer text (the tail that could begin a stop string is held back meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import harmony
from ..harmony import ContentDelta, MessageEnd, MessageStart
from ..tokenizer import NUM_BPE_TOKENS

REASONING, TEXT, CALL = "reasoning", "text", "call"


@dataclass
class Item:
    kind: str  # REASONING, TEXT or CALL
    name: str | None = None  # a call's function name ("get_weather"; "browser.search")
    text: str = ""  # so far; the whole of it once ended
    tokens: int = 0


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


OutputEvent = Opened | Delta | Closed


def item_kind(start: MessageStart) -> tuple[str, str | None]:
    """An assistant message's kind: a tool call when it has a recipient (on any channel), the
    chain of thought on the analysis channel, else text the user sees (final, preambles)."""
    if start.recipient not in (None, "all", "assistant"):
        return CALL, start.recipient.removeprefix("functions.")
    return (REASONING if start.channel == "analysis" else TEXT), None


@dataclass
class ReplyStream:
    tokenizer: object
    stops: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    stopped: bool = False  # a stop string ended the answer

    def __post_init__(self):
        self._parser = harmony.StreamParser(self.tokenizer, role="assistant")
        self._current: Item | None = None
        self._held = ""  # answer text that may be the start of a stop string

    def feed(self, token: int) -> list[OutputEvent]:
        if self._current is not None:
            self._current.tokens += 1
        events = self._parser.feed(token)
        if token >= NUM_BPE_TOKENS:  # a control token inside a message is not text
            events = [e for e in events if not isinstance(e, ContentDelta)]
        return self._convert(events)

    def finish(self) -> list[OutputEvent]:
        return self._convert(self._parser.finish())

    @property
    def reasoning_tokens(self) -> int:
        return sum(i.tokens for i in self.items if i.kind == REASONING)

    def _convert(self, events) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        for event in events:
            if self.stopped:
                break
            if isinstance(event, MessageStart):
                kind, name = item_kind(event)
                self._current = Item(kind, name)
                self.items.append(self._current)
                out.append(Opened(self._current))
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
        cut = min((pending.find(s) for s in self.stops if s in pending), default=-1)
        if cut >= 0:  # the earliest stop string ends the answer
            self.stopped = True
            self._held = ""
            head = pending[:cut]
            item.text += head
            return ([Delta(item, head)] if head else []) + [Closed(item)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        self._held = pending[len(pending) - keep:] if keep else ""
        head = pending[:len(pending) - keep]
        item.text += head
        return [Delta(item, head)] if head else []

    def _close(self) -> list[OutputEvent]:
        item, self._current = self._current, None
        out: list[OutputEvent] = []
        if self._held:
            item.text += self._held
            out.append(Delta(item, self._held))
            self._held = ""
        return out + [Closed(item)]
