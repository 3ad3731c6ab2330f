"""The streaming parser: sampled token ids -> harmony messages, one token at a time."""

from __future__ import annotations

import codecs
import operator
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Union

from .messages import (
    BUILTIN_TOOLS, CALL, CHANNEL, CHANNELS, CONSTRAIN, ENDOFTEXT, ID, MESSAGE, MESSAGE_END_TOKENS, NAME,
    ROLES, START, Message,
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

_TOOL_NAME = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)+$")  # functions.get_weather, browser.search
_MAX_HEADER_TOKENS = 32


def parse_header(text: str, role: str | None, complete: bool = True) -> tuple[MessageStart, str]:
    """A message header's text (between ``<|start|>`` and ``<|message|>``) -> (the header, the
    words it does not account for, which the caller keeps as text).

    ``role`` is the role already given (the prompt ended with ``<|start|>assistant``), else the
    header's first word names it: a role, or a tool's name for a tool result. A recipient needs
    ``to=``, and only one: a stray word never turns a message into a tool call, and two ``to=``
    stay text rather than one being picked. With ``complete=False`` (a header cut short by a
    stop token or the end of the stream) only the role and channel are taken and the rest is
    returned verbatim, as the message's text (e.g. a refusal written without ``<|message|>``).
    """
    channel, text = _take_channel(text.replace(CONSTRAIN, " " + CONSTRAIN))
    role, name, rest = _take_role(text, role)
    if not complete:
        return MessageStart(role, channel, None, None, name), rest
    words = rest.split()
    for i, w in enumerate(words[:-1]):  # "<|constrain|> json": the space is the model's slip
        if w == CONSTRAIN and not words[i + 1].startswith(("to=", CONSTRAIN)):
            words[i:i + 2] = [w + words[i + 1]]
            break
    to = [w for w in words if w.startswith("to=")]  # (one holding another special token: text)
    recipient = content_type = None
    if len(to) == 1 and len(to[0]) > len("to=") and _plain(to[0]) and not to[0].startswith("to=to="):
        recipient = to[0][len("to="):]
        words.remove(to[0])
    constrained = [w for w in words if w.startswith(CONSTRAIN)]
    if len(constrained) == 1 and _plain(constrained[0].removeprefix(CONSTRAIN)):
        content_type = constrained[0]
        words.remove(content_type)
    elif recipient and len(words) == 1 and words[0] not in CHANNELS and _plain(words[0]):  # "to=x json"
        content_type = words.pop()
    if channel is None and len(words) == 1 and words[0] in CHANNELS:  # "assistant final"
        channel = words.pop()
    return MessageStart(role, channel, recipient, content_type, name), " ".join(words)


def _plain(word: str) -> bool:
    """A recipient or content type holds no other special token (``to=f <|reserved_200017|>``):
    it would be written back into the next prompt's header, and a saved chat with it would not
    load (nor could a tool's result name it)."""
    return "<|" not in word


def _take_channel(text: str) -> tuple[str | None, str]:
    """The word after the first ``<|channel|>`` (up to whitespace or ``<``), and the rest. A
    ``to=`` word there is a recipient, not a channel (``<|channel|>to=x``): left in the rest."""
    before, marker, after = text.partition(CHANNEL)
    if not marker:
        return None, text
    word = re.match(r"[^\s<]*", after).group(0)
    if word.startswith("to="):
        return None, f"{before} {after}"
    return word or None, f"{before} {after[len(word):]}"


def _take_role(text: str, role: str | None) -> tuple[str, str | None, str]:
    """(role, tool name or None, the text after the role word). A tool message is headed by
    the tool's name; one without it (``role="tool"`` given, the name missing) has no tool to
    answer for, so it is kept as assistant text, as ``<|start|>tool`` is."""
    first = re.match(r"\s*(\S*)\s*", text)
    word, rest = first.group(1), text[first.end():]
    if role in (None, "tool") and (_TOOL_NAME.match(word) or word in BUILTIN_TOOLS):
        return "tool", word, rest
    if role is None and word in ROLES and word != "tool":
        return word, None, rest
    if word == role != "tool":  # the given role written out again
        return role, None, rest
    return role if role not in (None, "tool") else "assistant", None, text.strip()


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
        # Messages whose content a constraint holds to a grammar (structured.constrained_messages):
        # their header's stray words are not kept as their text, which would break the JSON.
        self.drops_header_words: Callable[[MessageStart], bool] | None = None

    # -- public
    @property
    def current(self) -> MessageStart | None:
        return self._current

    @property
    def state(self) -> str:
        return self._state

    @property
    def pending_header(self) -> str:
        """The text of a header begun and not yet ended by ``<|message|>`` ('' when none)."""
        return self._header_text(self._header) if self._state == "header" else ""

    def feed(self, token: int) -> list[Event]:
        try:  # (a str or float was kept, and broke every later feed)
            token = operator.index(token)
        except TypeError:
            raise TypeError(f"feed() takes one token id (an int), got {type(token).__name__}") from None
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
            return self._open(parse_header(self._header_text(self._header), self._role))
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
        except (KeyError, OverflowError):  # not an id of this vocabulary
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

    def _open(self, parsed) -> list[Event]:
        start, leftover = parsed if isinstance(parsed, tuple) else (parsed, "")
        self._state, self._header, self._role = "content", [], None
        self._implied_start = False
        self._current, self._text = start, []
        self._decoder.reset()
        events: list[Event] = [start]
        # unparseable header words are kept as text, unless the text must be the grammar's alone
        if leftover and not (self.drops_header_words is not None and self.drops_header_words(start)):
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
        """A header that ended without <|message|>: keep its metadata, the rest becomes text.
        Two slips are read as the message meant (harmony#80): a call's header ended by
        ``<|call|>``, with ``to=`` first after the role and channel, is that call, with what
        follows its content type as arguments (``to=functions.f<|call|>``: none; ``to=functions.f
        <|constrain|>json{"a": 1}<|call|>``, ``to=python print(1)<|call|>``); and a header of
        only a channel and ``<|constrain|>json``, ended by any stop token, is that message, with
        the rest as its text. Nothing else becomes a call: text ended by ``<|return|>`` or
        ``<|end|>`` stays text, whatever ``to=`` it holds."""
        text = self._header_text(self._header)
        loose = parse_header(text, self._role, complete=False)  # (role and channel; the rest as text)
        start, leftover = loose
        if not (start.channel or leftover.strip() or start.role == "tool" and start.name):
            # a header of nothing but a role (<|start|> written twice, <|start|>assistant<|end|>,
            # a reply's first token <|end|>): no message, or an empty one without a channel would
            # be kept and written into every later prompt
            self._state, self._header, self._role, self._implied_start = "expect_start", [], None, False
            return []
        if stop is not None:
            header, body = _split_body(text)
            start, leftover = parse_header(header, self._role)
            words = _take_role(_take_channel(header.replace(CONSTRAIN, " " + CONSTRAIN))[1], self._role)[2]
            call = stop == CALL and start.recipient and words.startswith("to=")
            constrained = not start.recipient and (start.content_type or "").startswith(CONSTRAIN)
            if not leftover and (call or constrained):
                return self._open((start, "")) + self._emit(body) + self._end(stop)
        start, leftover = loose
        events = self._open((start, ""))
        events += self._emit(leftover.replace(CONSTRAIN, ""))  # the model's words, not markup
        return events + self._end(stop)


def _split_body(text: str) -> tuple[str, str]:
    """A header's text that never got its ``<|message|>`` -> (the header, the message's text
    written after it): after a ``<|constrain|>json`` content type (``<|constrain|>json{"a": 1}``),
    or from a JSON value after ``to=`` (``to=functions.f {"a": 1}``), or after ``to=python``
    (and a ``code`` content type). Else the whole text is the header."""
    constrain = re.search(re.escape(CONSTRAIN) + r"\s*json", text)
    if constrain:
        return text[:constrain.end()], text[constrain.end():].lstrip()
    python = re.search(r"(?:^|\s)to=python(?:<\|channel\|>[^\s<]*)?(?:\s+code)?(?=\s|$)", text)
    if python:
        return text[:python.end()], text[python.end():].lstrip()
    value = re.search(r"[{\[]", text)
    if value and "to=" in text[:value.start()]:
        return text[:value.start()], text[value.start():]
    return text, ""


def parse_completion(tokens: Iterable[int], tokenizer, role: str | None = "assistant") -> list[Message]:
    parser = StreamParser(tokenizer, role)
    for t in tokens:
        parser.feed(t)
    parser.finish()
    return parser.messages

