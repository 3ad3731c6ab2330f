"""The streaming parser: sampled token ids -> harmony messages, one token at a time."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Iterable, Union

from .messages import (
    CHANNEL, CHANNELS, CONSTRAIN, ENDOFTEXT, ID, MESSAGE, MESSAGE_END_TOKENS, NAME, ROLES, START,
    Message,
)

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

