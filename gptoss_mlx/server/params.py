"""Reading a request's common fields: sampling, token limits, reasoning effort, stop strings."""

from __future__ import annotations

import json
import math

from ..generate import SamplingParams
from ..harmony import EFFORTS
from .errors import bad_request

# Efforts other clients send, mapped to gpt-oss's three (its system message knows only these).
EFFORT_ALIASES = {"minimal": "low", "none": "low", "xhigh": "high"}
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 10_000  # a stop string's length (its matching table is built per request)


def number(body: dict, key: str, default, lo: float, hi: float, *, lo_open: bool = False,
           hi_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{key}' must be a number, got {value!r}", key)
    if not (lo < value if lo_open else lo <= value) or not (value < hi if hi_open else value <= hi):
        low, high = f"> {lo}" if lo_open else f">= {lo}", f"< {hi}" if hi_open else f"<= {hi}"
        raise bad_request(f"'{key}' must be {low} and {high}, got {value!r}", key)
    return value


def shown(value, limit: int = 80) -> str:
    """A client's value in an error message: as JSON (not Python's repr), cut to ``limit``."""
    return json.dumps(value, default=str)[:limit]


def function_names(tools) -> set[str]:
    """The names a request's ``tools`` declare (Chat Completions' ``{"function": {"name"}}`` or the
    Responses API's ``{"name"}``); entries of another shape name nothing here."""
    names = set()
    for t in tools if isinstance(tools, list) else []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def integer(body: dict, key: str, lo: int = 1, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise bad_request(f"'{key}' must be a whole number {bound}, got {value!r}", key)
    return value


def sampling(body: dict, default: SamplingParams, max_tokens_keys: tuple[str, ...],
             max_context: int | None = None) -> SamplingParams:
    """The request's sampling parameters over the server's defaults; ``max_tokens_keys`` are
    the fields that cap the reply (the first one given wins), at most ``max_context``."""
    max_tokens = next((integer(body, k, hi=max_context) for k in max_tokens_keys if body.get(k) is not None),
                      default.max_tokens)
    return SamplingParams(
        temperature=number(body, "temperature", default.temperature, 0, 2),
        # 0 (OpenAI takes 0 to 1): the likeliest token alone, as the smallest nucleus that holds one
        top_p=number(body, "top_p", default.top_p, 0, 1) or math.ulp(0.0),
        # top_k and min_p: not OpenAI's, but what vLLM and llama.cpp servers take (-1: no limit)
        top_k=max(0, integer(body, "top_k", lo=-1)) if body.get("top_k") is not None else default.top_k,
        min_p=number(body, "min_p", default.min_p, 0, 1, hi_open=True),
        seed=integer(body, "seed", lo=0, hi=2**64 - 1) if body.get("seed") is not None else default.seed,
        max_tokens=max_tokens)


def reasoning_budget(body: dict, default: int | None) -> int | None:
    """``reasoning_budget`` (an extension): tokens of reasoning before the model must answer."""
    given = integer(body, "reasoning_budget", lo=0)
    return default if given is None else given


def effort(value, default: str, param: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or EFFORT_ALIASES.get(value, value) not in EFFORTS:
        taken = ", ".join(f"{name} (as {effort})" for name, effort in EFFORT_ALIASES.items())
        raise bad_request(f"'{param}' must be one of {', '.join(EFFORTS)} (or {taken}), got {value!r:.80}", param)
    return EFFORT_ALIASES.get(value, value)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        shown = repr(stop) if len(repr(stop)) <= 200 else repr(stop)[:200] + "…"  # (a 1 MB list came back whole)
        raise bad_request(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} "
                          f"of them, got {shown}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"'stop' strings may be up to {MAX_STOP_CHARS:,} characters long, got one of "
                          f"{max(map(len, stops)):,}", "stop")
    return stops


def typed(body: dict, key: str, kind: type | tuple[type, ...], what: str):
    """``body[key]`` when it is None or of ``kind``; else a 400 saying it must be ``what``."""
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise bad_request(f"'{key}' must be {what}, got {value!r}", key)
    return value


def one_of(value, allowed: tuple[str, ...], param: str) -> None:
    """A field OpenAI takes from a fixed list (and this server takes, whether or not it acts on it:
    ``text.verbosity``, ``reasoning.summary``), checked as OpenAI checks it."""
    if value is not None and value not in allowed:
        raise bad_request(f"'{param}' must be one of {', '.join(allowed)}, got {value!r:.80}", param)


# What a request may say about who sends it (OpenAI's end-user fields): strings, taken and echoed.
IDENTIFIERS = ("user", "safety_identifier", "prompt_cache_key")
VERBOSITIES = ("low", "medium", "high")


def check_identifiers(body: dict) -> None:
    for key in IDENTIFIERS:
        typed(body, key, str, "a string")


def check_metadata(metadata) -> None:
    """OpenAI's limits: up to 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items()):
        raise bad_request("'metadata' must be an object of up to 16 string values (keys up to 64 "
                          "characters, values up to 512)", "metadata")
