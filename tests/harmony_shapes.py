"""Harmony-shaped token sequences for property tests and the fuzz run (tests/fuzz_harmony.py),
and the accounting that says whether a parse lost or invented text.

A sequence is a few "messages", each an optional ``<|start|>``, header words (roles, tool names,
channels, ``to=`` recipients, ``<|constrain|>`` types, stray words), an optional ``<|message|>``,
content (real text, random ordinary ids, split UTF-8) and an optional stop token; then special
tokens are inserted at random positions, so every special token turns up in every position.
"""

from __future__ import annotations

import re
from collections import Counter

from hypothesis import strategies as st

from gptoss_mlx.tokenizer import NUM_BPE_TOKENS, SPECIAL_TOKENS

NAMED = sorted(SPECIAL_TOKENS)  # "<|start|>", ...
ALL_SPECIAL_IDS = sorted(SPECIAL_TOKENS.values()) + [NUM_BPE_TOKENS + 15, 201087]  # + 2 reserved
HEADER_WORDS = [
    "assistant", "user", "system", "developer", "tool", "functions.get_weather", "python",
    "browser.search", " to=functions.get_weather", " to=python", " to=assistant", " to=", "to=x",
    " json", " <|constrain|>json", "<|constrain|>", "<|channel|>analysis", "<|channel|>final",
    "<|channel|>commentary", "<|channel|>", " analysis", " final", " hello", " ––commentary",
    ":", "assistant:bob", " ", "\n", " code",
]
STOPS = ["<|end|>", "<|call|>", "<|return|>", "<|endoftext|>"]


def harmony_sequences(tok):
    """A strategy of (tokens, role) over harmony-shaped sequences, with the real tokenizer."""
    encode = lambda s: tok.encode(s, allowed_special="all")  # noqa: E731
    header_word = st.sampled_from([encode(w) for w in HEADER_WORDS])
    text = st.text(max_size=12).map(encode)
    ordinary = st.lists(st.integers(0, NUM_BPE_TOKENS - 1), max_size=4)
    utf8_bytes = st.sampled_from(["é", "日本", "🙂"]).map(
        lambda s: [tok.encode_single_token(bytes([b])) for b in s.encode()])
    content = st.lists(st.one_of(text, ordinary, utf8_bytes), max_size=4)

    @st.composite
    def message(draw):
        out = [SPECIAL_TOKENS["<|start|>"]] if draw(st.booleans()) else []
        for piece in draw(st.lists(header_word, max_size=5)):
            out += piece
        if draw(st.integers(0, 4)):  # mostly well formed
            out.append(SPECIAL_TOKENS["<|message|>"])
        for piece in draw(content):
            out += piece
        if draw(st.integers(0, 4)):
            out += encode(draw(st.sampled_from(STOPS)))
        return out

    @st.composite
    def sequence(draw):
        tokens = [t for m in draw(st.lists(message(), min_size=1, max_size=4)) for t in m]
        for _ in range(draw(st.integers(0, 3))):  # specials anywhere
            tokens.insert(draw(st.integers(0, len(tokens))), draw(st.sampled_from(ALL_SPECIAL_IDS)))
        return tokens, draw(st.sampled_from(["assistant", "tool", None]))

    return sequence()


_NOT_TEXT = re.compile("|".join(re.escape(n) for n in NAMED) + r"|\s|\ufffd")


def _chars(text: str) -> Counter:
    return Counter(_NOT_TEXT.sub("", text))


def account(tok, tokens: list[int], messages) -> tuple[str, str]:
    """(lost, invented): the characters of the input's text that no message holds, and those
    the messages hold that the input never said. Special-token names, whitespace and U+FFFD
    are not counted; a message's role word may come from the input or from the grammar, and
    a header of a role alone (followed by <|start|> again, a stop token or the end) is no message."""
    given = b"".join(_bytes(tok, t) for t in tokens).decode("utf-8", errors="replace")
    headers_of_a_role = re.sub(r"(<\|[a-z_]+\|>|^)[ \t]*(?:assistant|user|system|developer)[ \t]*"
                               r"(?=(?:<\|channel\|>)?(?:<\|(?:start|end|return|call|endoftext)\|>|$))", r"\1", given)
    said = "".join((m.name or "") + (f"to={m.recipient}" if m.recipient else "") + (m.channel or "")
                   + (m.content_type or "") + m.content for m in messages)
    roles = _chars("".join(m.role for m in messages))
    lost = _chars(headers_of_a_role) - _chars(said) - roles
    invented = _chars(said) - _chars(given)
    for m in messages:  # metadata must be what the input said, not a guess
        if m.recipient and f"to={m.recipient}" not in given:
            invented[f"to={m.recipient}"] += 1
    return "".join(lost.elements()), "".join(invented.elements())


def _bytes(tok, token: int) -> bytes:
    try:
        return tok.decode_single_token_bytes(token)
    except (KeyError, OverflowError):
        return b""
