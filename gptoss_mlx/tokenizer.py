"""The o200k_harmony tokenizer as a tiktoken ``Encoding``.

o200k_harmony = the o200k_base BPE ranks (ids 0..199997) + the harmony special tokens at
199998..200012 + ``<|reserved_N|>`` padding up to the 201088-row vocabulary (gpt-oss.md 4.1, 4.8).
The special ids below are the single source of truth for the whole package.

Sources, in order: a checkpoint's ``tokenizer.json`` (byte-level BPE vocabulary), or an
``o200k_base.tiktoken`` file given explicitly, through ``$GPTOSS_MLX_TIKTOKEN_FILE``, in
``$TIKTOKEN_ENCODINGS_BASE`` (the variable openai-harmony reads), or in tiktoken's own cache.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import tiktoken

from .files import json_from_bytes, read_file_bytes, read_json_file

# Harmony special tokens (gpt-oss.md 4.1).
SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
NUM_BPE_TOKENS = 199998
VOCAB_SIZE = 201088

# The o200k regex (identical for o200k_base and o200k_harmony).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
TIKTOKEN_FILE_ENV = "GPTOSS_MLX_TIKTOKEN_FILE"


class TokenizerError(ValueError):
    """No usable tokenizer vocabulary."""


def harmony_special_tokens() -> dict[str, int]:
    """All 1090 special tokens: the harmony ones plus ``<|reserved_N|>`` for every other id."""
    named = set(SPECIAL_TOKENS.values())
    specials = dict(SPECIAL_TOKENS)
    for i in range(NUM_BPE_TOKENS, VOCAB_SIZE):
        if i not in named:
            specials[f"<|reserved_{i}|>"] = i
    return specials


class HarmonyEncoding(tiktoken.Encoding):
    """o200k_harmony. ``encode`` treats all text as ordinary text: a user who types ``<|start|>``
    gets the BPE tokens for those characters, never the control token (gpt-oss.md 7.11).
    Use :meth:`special` or ``allowed_special`` to produce control tokens on purpose."""

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special=()):  # noqa: D401
        return super().encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def special(self, name: str) -> int:
        """Id of a special token, by name with or without the ``<|...|>`` brackets."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        try:
            return self._special_tokens[key]
        except KeyError:
            raise KeyError(f"no special token {key} in o200k_harmony") from None


@lru_cache(maxsize=None)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@lru_cache(maxsize=None)
def _byte_table() -> dict[int, int | None]:
    """``str.translate`` table from each stand-in character to the byte it stands for (as a
    latin-1 character); the other characters below 256 are deleted, so that a token holding one
    comes out shorter than it went in."""
    table: dict[int, int | None] = {c: None for c in range(256)}
    table.update({ord(ch): b for ch, b in _byte_decoder().items()})
    return table


def ranks_from_tokenizer_json(path: str | Path, raw: bytes | None = None) -> tuple[dict[bytes, int], str]:
    """BPE ranks and the split regex from a Hugging Face ``tokenizer.json`` (optionally .gz; its
    bytes ``raw`` if they were read already)."""
    path = Path(path)
    data = read_json_file(path, TokenizerError) if raw is None else json_from_bytes(path, raw, TokenizerError)
    vocab = _field(path, data, "model", dict)
    vocab = _field(path, vocab, "vocab", dict, "model.vocab")
    table = _byte_table()
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise TokenizerError(f"{path}: model.vocab[{token!r:.100}] must be a token id, got {rank!r:.100}")
        if rank >= NUM_BPE_TOKENS:
            continue
        try:
            raw = token.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            raw = b""
        if len(raw) != len(token):  # a character outside the 256 stand-ins: dropped or not encodable
            raise TokenizerError(f"{path}: token {token!r:.100} is not byte-level BPE")
        ranks[raw] = rank
    specials = harmony_special_tokens()
    for added in _field(path, data, "added_tokens", list, default=[]):
        if not isinstance(added, dict):
            raise TokenizerError(f"{path}: added_tokens holds {added!r:.100}, not an object")
        if not isinstance(added.get("content", ""), str):
            raise TokenizerError(f"{path}: an added token's content must be a string, got "
                                 f"{added['content']!r:.100}")
        expected = specials.get(added.get("content"))
        if added.get("id") in SPECIAL_TOKENS.values() and expected != added.get("id"):
            raise TokenizerError(
                f"{path}: special token {added.get('content')!r} has id {added.get('id')}, "
                "which does not match o200k_harmony"
            )
    pattern = O200K_PATTERN
    pre_tokenizer = _field(path, data, "pre_tokenizer", dict, default={})
    for pre in _field(path, pre_tokenizer, "pretokenizers", list, "pre_tokenizer.pretokenizers", []):
        split = pre.get("pattern") if isinstance(pre, dict) and pre.get("type") == "Split" else None
        regex = split.get("Regex") if isinstance(split, dict) else None
        if isinstance(regex, str) and regex:
            pattern = regex
    return ranks, pattern


def _field(path: Path, data, key: str, kind: type, name: str | None = None, default=None):
    """``data[key]`` of JSON type ``kind`` (absent: ``default``, or an error without one)."""
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: not a tokenizer.json (expected a JSON object, got "
                             f"{type(data).__name__})")
    value = data.get(key, default)
    if not isinstance(value, kind):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise TokenizerError(f"{path}: {name or key} must be a JSON {_JSON_NAMES[kind]}, "
                             f"but it is {what}")
    return value


_JSON_NAMES = {dict: "object", list: "array"}


def ranks_from_tiktoken_file(path: str | Path, check_hash: bool = True, raw: bytes | None = None) -> dict[bytes, int]:
    path = Path(path)
    data = read_file_bytes(path, TokenizerError, what="a vocabulary") if raw is None else raw
    if check_hash and hashlib.sha256(data).hexdigest() != O200K_SHA256:
        raise TokenizerError(
            f"{path}: sha256 does not match o200k_base ({O200K_SHA256[:12]}...); "
            "the file is corrupt or a different vocabulary"
        )
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # binascii.Error is a ValueError
                raise TokenizerError(f"{path}: line {number} is not 'base64-token rank'") from None
    return ranks


def _tiktoken_cache_candidates() -> list[Path]:
    """Where o200k_base.tiktoken may already be on disk, without any network access."""
    out = []
    if os.environ.get(TIKTOKEN_FILE_ENV):
        out.append(Path(os.environ[TIKTOKEN_FILE_ENV]))
    if os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        out.append(Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / "o200k_base.tiktoken")
    cache_key = hashlib.sha1(O200K_URL.encode()).hexdigest()
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            out.append(Path(os.environ[var]) / cache_key)
    out.append(Path(tempfile.gettempdir()) / "data-gym-cache" / cache_key)
    return out


def load_tokenizer(path: str | Path | None = None) -> HarmonyEncoding:
    """o200k_harmony from a checkpoint directory, a tokenizer.json, or an o200k_base.tiktoken.

    With no path, look in ``$GPTOSS_MLX_TIKTOKEN_FILE``, ``$TIKTOKEN_ENCODINGS_BASE`` and
    tiktoken's cache.
    """
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"load_tokenizer takes a path (a str or os.PathLike), got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            if path.name in ("tokenizer.json", "tokenizer.json.gz", "o200k_base.tiktoken"):  # (one named so)
                raise TokenizerError(f"{path}: is a directory, not a tokenizer file")
            for name in ("tokenizer.json", "tokenizer.json.gz", "o200k_base.tiktoken"):
                if os.path.lexists(path / name):
                    return load_tokenizer(path / name)
            raise TokenizerError(
                f"{path}: no tokenizer.json or o200k_base.tiktoken in this directory"
            )
        return _parsed_once(path)
    for candidate in _tiktoken_cache_candidates():
        if candidate.exists():
            return _parsed_once(candidate)
    raise TokenizerError(
        "no o200k_base vocabulary found: pass a checkpoint with tokenizer.json, or set "
        f"{TIKTOKEN_FILE_ENV} to an o200k_base.tiktoken file (sha256 {O200K_SHA256[:12]}...)"
    )


_VERIFIED: set[str] = set()  # sha256 of each file read here as o200k_harmony's
_ENCODING: list[HarmonyEncoding] = []  # the one encoding they all give, built once
_LOCK = threading.Lock()


def _check_o200k(ranks: dict[bytes, int], pattern: str, path: Path) -> None:
    """A tokenizer.json's vocabulary must be o200k_base's, as an o200k_base.tiktoken file's is (a
    swapped id is garbage the model reads without a word), and its split regex o200k's (another
    splits text into tokens the model never saw; one that can match nothing made tiktoken panic
    on the first prompt)."""
    if len(ranks) != NUM_BPE_TOKENS or len(set(ranks.values())) != NUM_BPE_TOKENS:
        raise TokenizerError(f"{path}: expected the {NUM_BPE_TOKENS} distinct BPE ranks "
                             f"0..{NUM_BPE_TOKENS - 1}, found {len(set(ranks.values()))}")
    listed = b"".join(base64.b64encode(token) + b" %d\n" % rank
                      for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    digest = hashlib.sha256(listed).hexdigest()
    if digest != O200K_SHA256:
        raise TokenizerError(f"{path}: the vocabulary is not o200k_base's (its ranks' sha256 is {digest[:12]}..., "
                             f"o200k_base's {O200K_SHA256[:12]}...): a token's id was changed, or this is "
                             "another tokenizer; gpt-oss reads o200k_harmony")
    if pattern != O200K_PATTERN:
        raise TokenizerError(f"{path}: its split regex (pre_tokenizer) is not o200k's: text would become "
                             f"other tokens than the model was trained on (got {pattern!r:.80})")


def _parsed_once(path: Path) -> HarmonyEncoding:
    """o200k_harmony from a tokenizer.json or an o200k_base.tiktoken file, each checked to hold
    o200k_base's vocabulary. Every file that passes gives the same encoding: it is built once a
    process, and a file read before (the same bytes: a second ``load``, a copy) is not parsed
    again (2 s on a CPU)."""
    raw = read_file_bytes(path, TokenizerError, what="a tokenizer")  # read once: the bytes hashed are the bytes parsed
    digest = hashlib.sha256(raw).hexdigest()
    with _LOCK:
        if digest in _VERIFIED:
            return _ENCODING[0]
    if path.name.endswith((".json", ".json.gz")):
        ranks, pattern = ranks_from_tokenizer_json(path, raw)
        _check_o200k(ranks, pattern, path)
    else:
        ranks = ranks_from_tiktoken_file(path, raw=raw)  # checked against o200k_base's sha256
    with _LOCK:
        if not _ENCODING:
            _ENCODING.append(HarmonyEncoding(name="o200k_harmony", pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                                             special_tokens=harmony_special_tokens(), explicit_n_vocab=VOCAB_SIZE))
        _VERIFIED.add(digest)
        return _ENCODING[0]
