"""Structured outputs: JSON Schema constrained decoding over the harmony stream.

    processors = constraints_for(tokenizer, messages, max_tokens=engine.token_budget(len(prompt), params),
                                 reasoning_budget=256)   # from the developer message's formats and functions
    engine.generate(prompt, params, logits_processors=processors)

The constraint watches the sampled tokens through harmony's StreamParser. The analysis channel
and every header stay free. Once the model opens the final channel, tokens outside the
answer's grammar are masked (llguidance computes the allowed set on the CPU while the GPU runs
the step), and when the grammar is complete only ``<|return|>`` is left. A message addressed to
``functions.NAME`` is held to that function's parameter schema and ends with ``<|call|>``.

Budgets: with ``reasoning_budget`` the engine closes the analysis itself after that many tokens
and opens the final channel (``<|end|><|start|>assistant<|channel|>final<|message|>``, forced
one token at a time through the mask); with a constrained answer it does so as well when what
is left of ``max_tokens`` is just enough for the answer. Inside the answer, when the tokens
left are just enough to close the JSON, a short closing (found greedily) is forced, so the
answer is always valid JSON within ``max_tokens`` (given room for its smallest instance at
all); the reply then ends with finish reason "length" (``cut_short``), as one cut anywhere
does: the answer is not what the model would have written. The server does not close answers
early (``close_early``): its clients' SDKs parse a valid JSON answer as whole whatever the
finish reason, so a cut answer stays cut, as OpenAI's does. A call's arguments are never
closed early: a call cut by ``max_tokens`` is cut (and not made), never a shorter valid call.

A reply that must call a function (``must_call``, tool_choice "required") reasons freely, then
its next header is one of those functions' call headers (:func:`call_header`): the model picks
which, token by token among them, and the arguments follow that function's grammar. The
reasoning budget and what is left of ``max_tokens`` end the reasoning the same way.
"""

from __future__ import annotations

import array
import json
import logging
import math
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable
try:  # Python's regex parser (pattern_hints)
    from re import _constants as re_constants, _parser as re_parser
except ImportError:  # Python 3.10
    import sre_constants as re_constants
    import sre_parse as re_parser

import llguidance
import mlx.core as mx
from llguidance.tiktoken import lltokenizer_from_encoding

from . import harmony
from .harmony import (
    ASSISTANT_ROLE_ID, CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, NOT_A_CALL, RETURN, START, DeveloperContent,
    MessageStart, Special,
)
from .harmony.parser import parse_header
from .harmony.chat_completions import FUNCTIONS
from .files import brief_number, float64_holds
from .tokenizer import NUM_BPE_TOKENS, SPECIAL_TOKENS, VOCAB_SIZE

log = logging.getLogger("gptoss_mlx")

ID = SPECIAL_TOKENS
# Whitespace between JSON tokens as models write it: none, one space (`{"a": 1}`), or a newline
# and an indentation of up to 12 spaces or tabs. Bounded, so a model can never spend its budget
# on blank lines inside the answer (carriage returns, which the terminal would mark, are out).
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"( ?|\n[ \t]{0,12})"}
# Bytes a closing may take before it is given up (a pattern the greedy closing cannot satisfy).
MAX_CLOSING_BYTES = 4096
# Preference among single bytes when closing: end what is open, then the shortest values, the
# other printable characters, a space (JSON never needs whitespace; a pattern may), the bytes
# that begin a character beyond ASCII (a pattern's [а-я] or [\u4e00-\u9fff]), and UTF-8
# continuation bytes last (only ever allowed to end a character the text so far began).
CLOSERS = b'"}],'
CONTINUATION = bytes(range(0x80, 0xC0))
CLOSING_BYTES = CLOSERS + b"10" + bytes(range(0x21, 0x7F)) + b" " + bytes(range(0xC2, 0xF5)) + CONTINUATION
# Outside strings a quote opens one (a key, never needed where the object may end: an optional
# property whose value may hold the same object again would open it for ever), so the object or
# array ends first where it may.
OUTSIDE_STRINGS = b'}]",' + CLOSING_BYTES[len(CLOSERS):]


class SchemaError(ValueError):
    """A JSON Schema the constraint cannot enforce; the message names the feature."""


@lru_cache(maxsize=2)
def ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of o200k_harmony (about a second to build, so kept per tokenizer)."""
    return lltokenizer_from_encoding(tokenizer, n_vocab=VOCAB_SIZE, eos_token=ID[RETURN])


@dataclass(frozen=True)
class Grammar:
    """A compiled JSON Schema: a fresh matcher per message, and its shortest closing's length."""
    tokenizer: object
    grammar: str
    min_tokens: int  # tokens of the schema's smallest instance, as the closing writes it
    hints: tuple[bytes, ...] = ()  # strings its patterns match (see pattern_hints)
    numbers: tuple[bytes, ...] = ()  # numbers its multipleOf ranges take (see number_hints)

    def matcher(self) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(ll_tokenizer(self.tokenizer), self.grammar, log_level=0)


def compile_schema(tokenizer, schema, where: str = "response_format") -> Grammar:
    """Compile ``schema`` (a JSON Schema object) or raise one SchemaError naming ``where`` and
    the feature the constraint cannot enforce (e.g. ``uniqueItems``, look-ahead patterns).
    Compiled schemas are kept (a server sees the same tools in every request)."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: the schema must be a JSON object, got {type(schema).__name__}")
    if schema.get("type") in ("json_schema", "json_object"):  # a pasted OpenAI response_format
        raise SchemaError(f"{where}: {{\"type\": \"{schema['type']}\"}} is an OpenAI response_format, "
                          "not a JSON Schema: give its json_schema.schema (for any JSON object: "
                          "{\"type\": \"object\"})")
    if isinstance(schema.get("schema"), dict) and ("name" in schema or "strict" in schema):
        raise SchemaError(f"{where}: {{\"name\", \"schema\", ...}} is an OpenAI json_schema object, not a "
                          "JSON Schema: give its 'schema'")
    try:  # what the developer message can carry (size, depth), checked before the prompt is written
        harmony.messages.check_schema(schema, where, "schema")
    except harmony.HarmonyError as e:
        raise SchemaError(str(e)) from None
    problem = unenforced_problem(schema)
    if problem:
        raise SchemaError(f"{where}: the schema cannot be enforced: {problem}")
    # key order matters: properties come in it
    return _compile(tokenizer, json.dumps(grammar_schema(schema)), where, pattern_hints(schema),
                    number_hints(schema))


# llguidance 1.9 reads a range's bounds as float64 and counts them in 64 bits: a bound beyond
# about ±9.2e18 makes it fail ("Failed to generate regex") or, for a range of integers near
# -2**63, crash the process; a range bounded on one side only fails from 1e18 on; and an integer
# bound beyond 2**53 is rounded to a float64 (either way: `exclusiveMaximum: 1e18` let 1e18
# through). So llguidance gets each range as :func:`grammar_bounds` makes it: integers' bounds
# inclusive (found with exact integer arithmetic), every bound a float64 rounded inwards, a bound
# beyond BOUND_LIMIT that only widens the range moved to it, and a one-sided range from ONE_SIDED
# on given its other side there. Answers stay inside the schema's range; a range that lies
# beyond is refused.
BOUND_LIMIT = 2**63 - 1024  # a float64 exactly
ONE_SIDED = 10**17
LOWS, HIGHS = ("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")


def unenforced_problem(schema) -> str | None:
    """What in ``schema`` the constraint would change without a word: a regular expression
    ending in a lone backslash (invalid; llguidance drops the backslash), a number range it
    cannot bound (see :func:`grammar_bounds`), a number beyond float64 (read as infinity), or a
    whole number in ``const`` or ``enum`` that llguidance, which writes numbers as float64s,
    would write as another (9007199254740993 as 9007199254740992). Keywords are read where a
    schema is, not in data or among property names."""
    def walk(node) -> str | None:
        if not isinstance(node, dict):
            return None
        patterns = [node.get("pattern")]
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            if isinstance(pattern, str) and (len(pattern) - len(pattern.rstrip("\\"))) % 2:
                return f"the pattern {pattern!r} ends in a lone backslash"
        node = draft4_bounds(node)
        for key in LOWS + HIGHS + ("multipleOf",):
            if key in node and not _is_number(node[key]):  # (said in JSON's words, before llguidance reads it)
                return f"'{key}' must be a number, got {json.dumps(node[key])[:80]}"
            if isinstance(node.get(key), float) and not math.isfinite(node[key]):
                return f"{key}: {node[key]} is beyond float64 (a number written too large reads as infinity)"
            if key == "multipleOf" and not float64_holds(node.get(key, 0)):
                return f"multipleOf: {brief_number(node[key])} is beyond float64"
        step = node.get("multipleOf")
        if isinstance(step, (int, float)) and not isinstance(step, bool) and step <= 0:
            # (JSON Schema: strictly greater than 0; llguidance took -2 as 2, and said of 0 "invalid multiple of")
            return f"multipleOf must be greater than 0, got {step}"
        for key in ("const", "enum"):
            number = _inexact_number(node.get(key)) if key in node else None
            if number is not None:
                return (f"the {key} value {brief_number(number)} is a number llguidance cannot write exactly (it "
                        f"writes float64s: {_shortest(number).normalize():f}): give it as a string")
        try:
            grammar_bounds(node)
        except ValueError as e:
            return str(e)
        return next((p for p in map(walk, _subschemas(node)) if p), None)

    return walk(schema)


def draft4_bounds(node: dict) -> dict:
    """``node`` with JSON Schema draft 4's exclusive bounds as 2020-12 writes them: ``minimum: 0,
    exclusiveMinimum: true`` is ``exclusiveMinimum: 0``, and a false flag (or one with no bound)
    says nothing. llguidance reads only 2020-12's: it ignored the flag, and let 0 through."""
    if not any(isinstance(node.get(key), bool) for key in ("exclusiveMinimum", "exclusiveMaximum")):
        return node
    out = dict(node)
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(exclusive), bool):
            flag = out.pop(exclusive)
            if flag and _is_number(out.get(bound)):
                out[exclusive] = out.pop(bound)
    return out


def _subschemas(node: dict) -> list:
    """The schemas directly inside a schema node."""
    out = []
    for key, value in node.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out += value.values()
        elif key in SCHEMA_LISTS + SCHEMAS and isinstance(value, list):
            out += value
        elif key in SCHEMAS:
            out.append(value)
    return out


def _inexact_number(value):
    """The first number in ``value`` (JSON data) that llguidance would not write as itself:
    a float beyond float64 (infinity), or a whole number its float64's shortest decimal misses."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, float):
        return value if not math.isfinite(value) else None
    if isinstance(value, int):
        return value if abs(value) > 2**53 and _shortest(value) != value else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((n for n in map(_inexact_number, items) if n is not None), None)


def _shortest(value):
    """How llguidance writes a number: its float64's shortest decimal (exact, as a Decimal)."""
    try:
        return Decimal(repr(float(value)))
    except OverflowError:
        return Decimal("Infinity")


def grammar_bounds(node: dict) -> dict:
    """The bounds (``minimum``, ``maximum``, ``exclusive...``) that llguidance gets for a schema
    node's, none beyond ±BOUND_LIMIT (see BOUND_LIMIT), or a ValueError naming what is out of its
    reach. An integer node's come inclusive. No bounds: {}."""
    given = {k: node[k] for k in LOWS + HIGHS if _is_bound(node.get(k))}
    if not given:
        return {}
    types = node["type"] if isinstance(node.get("type"), list) else [node.get("type")]
    integers = "integer" in types and "number" not in types
    if integers:  # exact arithmetic, inclusive
        inclusive = {"minimum": math.ceil, "exclusiveMinimum": lambda v: math.floor(v) + 1,
                     "maximum": math.floor, "exclusiveMaximum": lambda v: math.ceil(v) - 1}
        bounds = [(k, "minimum" if k in LOWS else "maximum", inclusive[k](v)) for k, v in given.items()]
    else:
        bounds = [(k, k, v) for k, v in given.items()]
    out: dict = {}
    for key, kind, value in bounds:
        low = kind in LOWS
        if (value > BOUND_LIMIT or (value == BOUND_LIMIT and kind == "exclusiveMinimum")) if low else \
                (value < -BOUND_LIMIT or (value == -BOUND_LIMIT and kind == "exclusiveMaximum")):
            raise ValueError(f"the bound {key}: {brief_number(given[key])} leaves only numbers beyond ±{BOUND_LIMIT}, "
                             "the largest the constraint can bound")
        if abs(value) > BOUND_LIMIT:  # beyond, widening the range: moved to the limit, inclusive
            kind, value = ("minimum", -BOUND_LIMIT) if low else ("maximum", BOUND_LIMIT)
        elif kind in ("exclusiveMinimum", "exclusiveMaximum") and abs(value) >= 2**53:
            # llguidance lets such a bound itself through (1e18 for exclusiveMaximum 1e18): the
            # float64 next inside it instead, inclusive
            f = float(value)
            kind = "minimum" if low else "maximum"
            value = f if ((f > value) if low else (f < value)) else math.nextafter(f, math.inf if low else -math.inf)
        value = _float64_inside(value, low, shortest=not integers)
        tighter = max if low else min  # of two bounds of a kind
        out[kind] = tighter(out[kind], value) if kind in out else value
    lows, highs = [out[k] for k in LOWS if k in out], [out[k] for k in HIGHS if k in out]
    if lows and not highs and max(lows) >= ONE_SIDED:
        out["maximum"] = BOUND_LIMIT
    elif highs and not lows and min(highs) <= -ONE_SIDED:
        out["minimum"] = -BOUND_LIMIT
    if _empty(out.items()) and not _empty([(kind, value) for _, kind, value in bounds]):
        described = " and ".join(f"{k} {v}" for k, v in given.items())
        raise ValueError(f"the range of {described} holds no number the constraint can bound "
                         "exactly (beyond 2**53 its bounds step as float64 numbers do)")
    return out


def _empty(bounds) -> bool:
    """Whether no number meets ``bounds`` ((keyword, value) pairs)."""
    bounds = list(bounds)
    lows = [(v, k == "exclusiveMinimum") for k, v in bounds if k in LOWS]
    highs = [(v, k == "exclusiveMaximum") for k, v in bounds if k in HIGHS]
    if not lows or not highs:
        return False
    low = max(lows, key=lambda b: (b[0], b[1]))
    high = min(highs, key=lambda b: (b[0], not b[1]))
    return low[0] > high[0] or (low[0] == high[0] and (low[1] or high[1]))


def _float64_inside(value, low: bool, shortest: bool = False):
    """``value`` as the nearest float64 inside the range (an exact int where whole). ``shortest``
    (a number's bound, which llguidance writes with 15 significant digits: 2**62 as
    4611686018427380000, -9007199254740169 as -9007199254740170, letting -9007199254740169.5
    through): rounded inwards to 15 significant digits, which a float64 holds exactly."""
    if shortest:
        exact = Decimal(value)
        inside = _significant(exact, 15, up=low)
        return value if inside == exact else float(inside)
    f = float(value)
    if (f < value) if low else (f > value):
        f = math.nextafter(f, math.inf if low else -math.inf)
    return int(f) if f == int(f) and abs(f) >= 2**53 else (value if f == value else f)


def _significant(d: Decimal, digits: int, up: bool) -> Decimal:
    """``d`` rounded up (or down) to ``digits`` significant digits."""
    if not d:
        return d
    return d.quantize(Decimal(1).scaleb(d.adjusted() - digits + 1), rounding=ROUND_CEILING if up else ROUND_FLOOR)


def pattern_hints(schema) -> tuple[bytes, ...]:
    """For the closing: a short string each of the schema's regular expressions (``pattern``,
    ``patternProperties``' names) matches, as JSON string content. The closing writes strings a
    byte at a time and cannot guess a literal such as ``foo`` in ``foo.*`` or the ``@`` and
    the dot of an email pattern; with these it tries the whole string first."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found.append(node["pattern"])
            if isinstance(node.get("patternProperties"), dict):
                found.extend(k for k in node["patternProperties"] if isinstance(k, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    examples = (regex_example(p) for p in dict.fromkeys(found))
    return tuple(json.dumps(e, ensure_ascii=False)[1:-1].encode() for e in examples if e is not None)


def number_hints(schema) -> tuple[bytes, ...]:
    """For the closing: numbers that a ``multipleOf`` with bounds allows (0, and the first
    multiple from the lower bound), which the closing's digit by digit search can miss
    (``{"multipleOf": 25, "minimum": 1}``: "1", "11", "111"... never 25)."""
    found: list[bytes] = []
    for node in map(draft4_bounds, _schema_nodes(schema)):
        step = node.get("multipleOf")
        if not _is_bound(step) or step <= 0:
            continue
        step = Decimal(repr(step)) if isinstance(step, float) else Decimal(step)
        for key, exclusive in (("minimum", False), ("exclusiveMinimum", True)):
            low = node.get(key)
            if _is_bound(low):
                low = Decimal(repr(low)) if isinstance(low, float) else Decimal(low)
                k = (low / step).to_integral_value(ROUND_CEILING)
                k += 1 if exclusive and k * step == low else 0
                found.append(f"{(k * step).normalize():f}".encode())
        found.append(b"0")
    return tuple(dict.fromkeys(found))


def _schema_nodes(schema) -> list[dict]:
    """``schema`` and the schemas inside it."""
    out, todo = [], [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            out.append(node)
            todo += _subschemas(node)
    return out


# Characters an example prefers, where a class or "." lets it choose.
EXAMPLE_CHARS = "a0A _-.@" + "".join(chr(c) for c in range(0x21, 0x7F)) + "\n\t" + "".join(map(chr, range(32)))


def regex_example(pattern: str) -> str | None:
    """A short string in which ``pattern`` is found (a JSON Schema pattern is a search, so
    anchors are met at the string's ends), or None for a construct this does not follow."""
    try:
        return _example(re_parser.parse(pattern))
    except Exception:  # noqa: BLE001 - a hint is a help to the closing, never a failure
        return None


def _example(items) -> str:
    out = []
    for op, av in items:
        if op is re_constants.LITERAL:
            out.append(chr(av))
        elif op is re_constants.ANY:
            out.append("a")
        elif op in (re_constants.IN, re_constants.NOT_LITERAL):
            members = [(re_constants.NEGATE, None), (re_constants.LITERAL, av)] if op is re_constants.NOT_LITERAL else av
            out.append(next(c for c in EXAMPLE_CHARS if _in_class(c, members)))  # StopIteration: none
        elif op in (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT):
            low, _, sub = av
            part = _example(sub)
            if low * len(part) > MAX_CLOSING_BYTES:  # longer than any closing
                raise ValueError("a long repeat")
            out.append(part * low)
        elif op is re_constants.SUBPATTERN:
            out.append(_example(av[-1]))
        elif op is re_constants.BRANCH:
            out.append(min((_example(b) for b in av[1]), key=len))
        elif op is re_constants.AT and av in (re_constants.AT_BEGINNING, re_constants.AT_END,
                                              re_constants.AT_BEGINNING_STRING, re_constants.AT_END_STRING):
            continue
        else:  # look-arounds, backreferences, word boundaries...
            raise ValueError(f"no example for {op}")
    return "".join(out)


def _in_class(c: str, members) -> bool:
    """Whether ``c`` is in a character class (sre's IN items)."""
    negate, found = False, False
    for op, av in members:
        if op is re_constants.NEGATE:
            negate = True
        elif op is re_constants.LITERAL:
            found |= ord(c) == av
        elif op is re_constants.RANGE:
            found |= av[0] <= ord(c) <= av[1]
        elif op is re_constants.CATEGORY:
            found |= CATEGORY_TEST[av](c)
        else:
            raise ValueError(f"no example for {op} in a class")
    return found != negate


CATEGORY_TEST = {
    re_constants.CATEGORY_DIGIT: str.isdigit, re_constants.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    re_constants.CATEGORY_SPACE: str.isspace, re_constants.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    re_constants.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    re_constants.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_")}


# Where a schema holds schemas: maps of them, lists of them, one.
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMAS = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")
MAX_REPEAT = 2**32 - 1  # the longest string length llguidance's regexes can count to
# How far inside an exclusive bound the inclusive one replacing it lies.
EXCLUSIVE_MARGIN = 1e-9
# (exclusive bound, the inclusive one, the other side's bounds, the direction of inside)
BOUNDS = (("exclusiveMinimum", "minimum", ("maximum", "exclusiveMaximum"), 1),
          ("exclusiveMaximum", "maximum", ("minimum", "exclusiveMinimum"), -1))


def grammar_schema(schema):
    """``schema`` as llguidance gets it: each number range's bounds as :func:`grammar_bounds`
    makes them (after :func:`unenforced_problem`), and each exclusive whole-number bound within 1 of its other
    bound (``exclusiveMinimum: 0, maximum: 0.5``) made inclusive, EXCLUSIVE_MARGIN inside:
    llguidance 1.9.1 lets such a bound itself through ("0" above). Data (``const``, ``enum``) is
    left alone. The answers stay inside the schema's range; the prompt shows the schema as given."""
    if not isinstance(schema, dict):
        return schema
    if isinstance(schema.get("items"), list) and "prefixItems" not in schema:
        # the tuple form of drafts before 2020-12 (zod, MCP tools): items [A, B] and additionalItems
        # are 2020-12's prefixItems and items, which llguidance reads (more items allowed unless said)
        schema = {k: v for k, v in schema.items() if k not in ("items", "additionalItems")} | {
            "prefixItems": schema["items"], **({"items": schema["additionalItems"]} if "additionalItems" in schema else {})}
    out = {}
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            value = {name: grammar_schema(s) for name, s in value.items()}
        elif key in SCHEMA_LISTS + SCHEMAS and isinstance(value, list):  # items may be a list
            value = [grammar_schema(s) for s in value]
        elif key in SCHEMAS:
            value = grammar_schema(value)
        out[key] = value
    out = draft4_bounds(out)
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        # llguidance writes these as a regex repeat, which stops at 2**32 - 1 ("regex parse
        # error: ... decimal literal invalid" beyond; the counts of items and properties, "number
        # out of range" past 64 bits): no answer is that long, so the same
        if type(out.get(key)) is int and out[key] > MAX_REPEAT:
            out[key] = MAX_REPEAT
    bounds = grammar_bounds(out)
    if bounds:
        out = {key: value for key, value in out.items() if key not in LOWS + HIGHS} | bounds
    if out.get("type") == "integer":
        return out
    for exclusive, inclusive, others, sign in BOUNDS:
        bound = out.get(exclusive)
        if not (_is_bound(bound) and bound == int(bound)):
            continue
        near = any(_is_number(out.get(k)) and abs(out[k] - bound) <= 1 for k in others)
        given = out.get(inclusive, bound)
        if near and _is_number(given):
            del out[exclusive]
            inside = bound + sign * EXCLUSIVE_MARGIN
            if inside == bound:  # the margin is below a float64's step here (from about 1.6e7)
                inside = math.nextafter(bound, sign * math.inf)
            out[inclusive] = max(inside, given) if sign > 0 else min(inside, given)
    return out


def _reworded(reason: str) -> str:
    """llguidance's reason for refusing a schema, in a client's terms: its advice names its own
    option, which no client can set, and its number keywords' messages name Rust's types."""
    reason = reason.replace("Enable 'coerce_one_of' option to approximate oneOf with anyOf",
                            "use anyOf (a value that matches several of them is accepted)")
    reason = re.sub(r"^Expected f64 for '(\w+)', got (.*)$", r"'\1' must be a number, got \2", reason, flags=re.S)
    reason = re.sub(r"^Expected string for '(\w+)', got (.*)$", r"'\1' must be a string, got \2", reason, flags=re.S)
    reason = re.sub(r"^Expected positive integer for '(\w+)', got (.*)$", r"'\1' must be a whole number, 0 or more, got \2",
                    reason, flags=re.S)
    # the regex crate's error, a pattern and a line of carets under the part it refuses: one line
    found = re.match(r"regex parse error:\n {4}(.*)\n( *)(\^+)\nerror: (.*)$", reason, flags=re.S)
    if found and "\n" not in found[1]:
        # (the crate shows a tab or a line break in the pattern otherwise than it is: no position)
        pattern, at, part, why = found[1], len(found[2]) - 4, found[3], found[4].strip()
        reason = f"its pattern {pattern!r:.200}: {why} (at {pattern[at:at + len(part)]!r:.80})"
    return re.sub(r"^Value for 'multipleOf' has too many digits: \d+$",
                  "'multipleOf' has more significant digits than the constraint can enforce", reason, flags=re.S)


def _is_bound(value) -> bool:
    """A number that bounds: not infinity (a whole number is exact however long: 10**400 is a
    bound beyond the limit, which widens the range and moves to it)."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@lru_cache(maxsize=256)
def _compile(tokenizer, schema: str, where: str, hints: tuple[bytes, ...] = (),
             numbers: tuple[bytes, ...] = ()) -> Grammar:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise SchemaError(f"{where}: not a JSON Schema the constraint can read ({_reworded(str(e))})") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, ll_tokenizer(tokenizer))
    if is_error:
        raise SchemaError(f"{where}: the schema cannot be enforced: {_reworded(messages[0])}")
    errors: list[str] = []
    closing = closing_tokens(tokenizer, llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0),
                             hints=hints, numbers=numbers, errors=errors)
    too_complex = next((e for e in errors if "ParserTooComplex" in e or "max is" in e), None)
    if closing is None and too_complex:
        found = re.search(r"has (\d+) items; max is (\d+)", too_complex)
        size = f" ({found[1]} alternatives open at once, at most {found[2]})" if found else ""
        raise SchemaError(f"{where}: the schema is too large for the constraint{size}: give it fewer "
                          "properties, anyOf branches or enum values")
    if closing is None:
        loop = ", or $refs that lead only to one another" if '"$ref"' in schema else ""
        raise SchemaError(f"{where}: the schema cannot be enforced: no instance of it was found "
                          f"within {MAX_CLOSING_BYTES} bytes (an answer must be closable within that: a "
                          f"minLength, minItems or minProperties asking for more{loop} is refused)")
    return Grammar(tokenizer, grammar, len(closing), hints, numbers)


def grammars(tokenizer, dev: DeveloperContent | None) -> tuple[Grammar | None, dict[str, Grammar]]:
    """The grammars a developer message asks for: the answer's (its first response format)
    and each function's parameters' (a function without parameters takes an object)."""
    if dev is None:
        return None, {}
    answer = None
    if dev.response_formats:
        fmt = dev.response_formats[0]
        answer = compile_schema(tokenizer, fmt.schema, f"response format {fmt.name!r}")
    functions, names = {}, set()
    for f in dev.functions:
        if f.name in names:
            raise SchemaError(f"function {f.name!r} is declared twice: which parameters its calls "
                              "are held to would be a guess")
        names.add(f.name)
        check_callable(tokenizer, f.name)
        where = f"function {f.name!r} parameters"
        try:
            functions[f.name] = compile_schema(tokenizer, object_schema(f.parameters, where), where)
        except SchemaError as e:
            if f.strict or str(e).endswith(OBJECT_ROOT):
                raise
            # Its calls are JSON objects still: left wholly free, a forced call's arguments were
            # any text ("ҳороъд&M ...", a tester's tool_choice "required", helper-157), which no
            # client can parse.
            functions[f.name] = compile_schema(tokenizer, {"type": "object"}, where)
            log.info("%s: its calls are held to a JSON object only, not to its parameters (strict is false)", e)
    return answer, functions


OBJECT_ROOT = "(a call's arguments are an object)"


def object_schema(parameters: dict | None, where: str) -> dict:
    """A function's parameters as its calls' grammar: a JSON object (OpenAI's rule); a schema
    that names no type (MCP tools' ``{"properties": ...}``) is one. Another type is an error:
    calls answered '"474000160058331941038896"' for one without a type."""
    if parameters is None:
        return {"type": "object"}
    if not isinstance(parameters, dict) or "type" not in parameters:
        return {"type": "object", **(parameters if isinstance(parameters, dict) else {})}
    if parameters["type"] not in ("object", ["object"]):
        raise SchemaError(f"{where}: the schema's type must be \"object\", got {json.dumps(parameters['type'])} "
                          + OBJECT_ROOT)
    return parameters


def check_callable(tokenizer, name: str) -> None:
    """A call to function ``name``, its header as the model writes it, must read back as a
    call to it; else its arguments would go unconstrained (a name with a space reads as another
    function, one with a newline or too long as no header at all)."""
    header = harmony.segments_to_tokens([Special(START), "assistant"], tokenizer) + call_header(tokenizer, name)
    parser = harmony.StreamParser(tokenizer, role=None)
    starts = [e for token in header for e in parser.feed(token) if isinstance(e, MessageStart)]
    if [start.recipient for start in starts] != [FUNCTIONS + name]:
        raise SchemaError(f"function {name[:80]!r}: a harmony header cannot carry this name, so its "
                          "calls cannot be held to its parameters: use a short name of letters, digits, "
                          "_ and - (no whitespace)")


def constraints_for(tokenizer, messages: list[harmony.Message], *, max_tokens: int | None,
                    reasoning_budget: int | None = None, prefix: list[int] = (),
                    must_call: tuple[str, ...] = (), close_early: bool = True) -> list:
    """The logits processors for a reply to ``messages``: a HarmonyConstraint when their
    developer message has a response format or functions, or there is a reasoning budget;
    none otherwise. ``must_call``: functions (declared there) one of which the reply must call.
    ``close_early``: see HarmonyConstraint. SchemaError names a schema that cannot be enforced."""
    dev = next((m.content for m in messages if isinstance(m.content, DeveloperContent)), None)
    answer, functions = grammars(tokenizer, dev)
    declared = {f.name for f in dev.functions} if dev is not None else set()
    if answer is None and not declared and reasoning_budget is None:
        return []
    return [HarmonyConstraint(tokenizer, answer, functions, reasoning_budget, max_tokens, prefix,
                              must_call=must_call, declared=declared, close_early=close_early)]


def call_header(tokenizer, name: str) -> list[int]:
    """The header of a call to the function ``name`` with JSON arguments, as the model writes
    it after ``<|start|>assistant``: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>``."""
    return harmony.segments_to_tokens([Special(CHANNEL), f"commentary to={FUNCTIONS}{name} ",
                                       Special(CONSTRAIN), "json", Special(MESSAGE)], tokenizer)


def final_header(tokenizer) -> list[int]:
    """The header of the answer, as the model writes it after ``<|start|>assistant``:
    ``<|channel|>final<|message|>``."""
    return [ID[CHANNEL], *tokenizer.encode_ordinary("final"), ID[MESSAGE]]


@lru_cache(maxsize=2)
def _byte_tokens(tokenizer) -> tuple[int, ...]:
    """The token of each single byte (o200k has one for every byte)."""
    return tuple(tokenizer.encode_single_token(bytes([b])) for b in range(256))


@dataclass
class JSONScan:
    """Whether JSON text so far ends inside a string (its quotes and escapes, nothing more)."""
    in_string: bool = False
    escaped: bool = False

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.escaped:
                self.escaped = False
            elif self.in_string and b == BACKSLASH:
                self.escaped = True
            elif b == QUOTE:
                self.in_string = not self.in_string


QUOTE, BACKSLASH = ord('"'), ord("\\")


def closing_tokens(tokenizer, matcher: llguidance.LLMatcher, scan: JSONScan = JSONScan(),
                   hints: tuple[bytes, ...] = (), numbers: tuple[bytes, ...] = (),
                   errors: list[str] | None = None) -> list[int] | None:
    """The tokens of a short text that completes the JSON from ``matcher``'s state (``scan``:
    whether the text so far ends inside a string), found greedily on a copy, byte by byte (see
    :func:`_next_byte`; ``hints``: whole strings to try first, ``numbers``: whole numbers);
    None when none was found within MAX_CLOSING_BYTES (``errors`` gets the matcher's error, if it
    failed)."""
    m = matcher.deep_copy()
    scan = JSONScan(scan.in_string, scan.escaped)
    byte_token = _byte_tokens(tokenizer)
    text = bytearray()
    used: dict[int, int] = {}  # bytes written into the string under way
    while not m.is_accepting():
        if m.is_error() or len(text) > MAX_CLOSING_BYTES:
            return _failed(m, errors)
        forced = (m.compute_ff_bytes() or _hint(m, byte_token, scan, hints)
                  or (_number_hint(m, byte_token, scan, numbers) if not text or text[-1] not in NUMBER_BYTES else None)
                  or _null(m, byte_token, scan) or _next_byte(m, byte_token, scan, used))
        if forced is None or not m.consume_tokens([byte_token[b] for b in forced]):
            return _failed(m, errors)
        text += forced
        scan.feed(forced)
        if scan.in_string:
            for b in forced:
                used[b] = used.get(b, 0) + 1
        else:
            used.clear()
    ends = len(text) - len(text.lstrip(CONTINUATION))  # the bytes that end a character begun before
    try:
        return ([byte_token[b] for b in text[:ends]]
                + tokenizer.encode_ordinary(text[ends:].decode("utf-8")))
    except UnicodeDecodeError:
        return [byte_token[b] for b in text]


def _failed(m: llguidance.LLMatcher, errors: list[str] | None) -> None:
    if errors is not None and m.is_error():
        errors.append(m.get_error())


def _hint(m: llguidance.LLMatcher, byte_token, scan: JSONScan, hints: tuple[bytes, ...]) -> bytes | None:
    """Inside a string that may not end yet: the shortest end of a hint after which it may (a
    whole hint at the string's start, its end where the text so far began it)."""
    if not scan.in_string or scan.escaped or m.validate_tokens([byte_token[QUOTE]]) == 1:
        return None
    for hint in hints:
        for start in sorted(_characters(hint), reverse=True):  # never inside an escape (`\\"` is one)
            tokens = [byte_token[b] for b in hint[start:] + b'"']
            if m.validate_tokens(tokens) == len(tokens):
                return hint[start:]
    return None


NUMBER_BYTES = b"0123456789.eE+-"  # after one of these, the closing is writing a number


def _number_hint(m: llguidance.LLMatcher, byte_token, scan: JSONScan, hints: tuple[bytes, ...]) -> bytes | None:
    """Outside strings: the first hint (:func:`number_hints`) the grammar takes here, after
    which the value may end."""
    if scan.in_string:
        return None
    for hint in hints:
        tokens = [byte_token[b] for b in hint]
        taken = m.try_consume_tokens(tokens) if hint else 0
        if taken != len(tokens) or not hint:
            m.rollback(taken)
            continue
        ends = m.is_accepting() or any(m.validate_tokens([byte_token[c]]) == 1 for c in CLOSERS if c != QUOTE)
        m.rollback(len(tokens))
        if ends:
            return hint
    return None


def _null(m: llguidance.LLMatcher, byte_token, scan: JSONScan) -> bytes | None:
    """A value where one must come (nothing open may end here) that may be null: null, one
    token, where the first byte allowed would open a string (a nullable date-time: 20 tokens)."""
    if scan.in_string or any(m.validate_tokens([byte_token[b]]) == 1 for b in b"}]"):
        return None
    tokens = [byte_token[b] for b in b"null"]
    return b"null" if m.validate_tokens(tokens) == len(tokens) else None


def _characters(escaped: bytes) -> list[int]:
    """Where each character of a JSON string's escaped bytes begins (an escape is one)."""
    starts, i = [], 0
    while i < len(escaped):
        starts.append(i)
        i += (6 if escaped[i + 1: i + 2] == b"u" else 2) if escaped[i] == BACKSLASH else 1
    return starts


def _next_byte(m: llguidance.LLMatcher, byte_token, scan: JSONScan, used: dict[int, int]) -> bytes | None:
    """The closing's next byte among those the grammar allows, in CLOSING_BYTES's order
    (OUTSIDE_STRINGS's outside strings). Outside strings, the first (end what is open, else the
    shortest value). Inside one, the first after
    which the string may end; failing that, the one written least so far in it, so that a
    pattern needing some later character (an email's @) gets it instead of one byte forever."""
    best = first = None
    for b in OUTSIDE_STRINGS if not scan.in_string else CLOSING_BYTES:
        if m.try_consume_tokens([byte_token[b]]) != 1:
            continue
        after = JSONScan(scan.in_string, scan.escaped)
        after.feed(bytes([b]))
        if not scan.in_string:
            # a byte after which the value may end (a number's digits: "1" then "0" for a
            # multipleOf 2.5, rather than "1" for ever), else the first allowed
            ends = b in CLOSERS or m.is_accepting() or any(
                m.validate_tokens([byte_token[c]]) == 1 for c in CLOSERS if c != QUOTE)
            m.rollback(1)
            if ends:
                return bytes([b])
            first = b if first is None else first
            continue
        # b closes the string, or a quote after it would (not after a backslash: an escape)
        ends = not after.in_string or not after.escaped and m.validate_tokens([byte_token[QUOTE]]) == 1
        m.rollback(1)
        if ends:
            return bytes([b])
        if best is None or used.get(b, 0) < used.get(best, 0):
            best = b
    if first is not None:
        return bytes([first])
    return None if best is None else bytes([best])


class HarmonyConstraint:
    """A logits processor (mlx-lm's convention: ``processor(tokens, logits) -> logits``, with
    ``tokens`` the sequence so far and ``logits`` of shape (1, V)) for one generation.

    ``answer``: the final channel's grammar (None: the answer is free). ``functions``: grammars
    of the functions the model may call. ``reasoning_budget``: tokens before the answer after
    which the final channel is opened. ``max_tokens``: the generation's token budget (what the
    engine will generate at most), so that a constrained message completes within it.
    ``prefix``: tokens of the reply the prompt already ends with (a forced call's header).
    ``must_call``: names among ``functions``, one of which the reply must call (then the answer
    is never opened). ``declared``: every function the reply may call (those not strict have
    no grammar; their headers, too, cannot end before their arguments). ``close_early``: close
    the answer's JSON when the tokens left are just enough for it (else it may be cut).
    """

    def __init__(self, tokenizer, answer: Grammar | None = None,
                 functions: dict[str, Grammar] | None = None, reasoning_budget: int | None = None,
                 max_tokens: int | None = None, prefix: list[int] = (), must_call: tuple[str, ...] = (),
                 declared: set[str] = frozenset(), close_early: bool = True):
        self.tokenizer = tokenizer
        self.answer, self.functions = answer, dict(functions or {})
        self.declared = set(declared) | set(self.functions)  # (those not strict have no grammar)
        self.close_early = close_early
        self.reasoning_budget, self.max_tokens = reasoning_budget, max_tokens
        self.parser = harmony.StreamParser(tokenizer, role="assistant")
        self._role = tokenizer.encode_ordinary("assistant")
        self._final_header = final_header(tokenizer)
        self._analysis_header = [ID[CHANNEL], *tokenizer.encode_ordinary("analysis"), ID[MESSAGE]]
        # must_call: each function's call header, and the tokens its smallest call takes
        self._calls = {name: call_header(tokenizer, name) for name in must_call}
        self._call_room = max((len(header) + (margin(g) + g.min_tokens if (g := self.functions.get(name)) else 16)
                               for name, header in self._calls.items()), default=0)
        self.headers: list[list[int]] = []  # must_call: the headers the reply may go on with
        self._last: int | None = None  # the last token of the reply so far
        self.generated = -1  # tokens seen; -1 until the first call (the prompt)
        self.reasoning_tokens = 0  # tokens before the final channel opened
        self.forced: list[int] = []  # tokens to force, in order
        self.matcher: llguidance.LLMatcher | None = None  # the constrained message's
        self.grammar: Grammar | None = None
        self.end_token: int | None = None  # what ends the constrained message
        self.in_final = False
        self._free_tokens = 0
        self.cut_short = False  # the answer was closed early to fit max_tokens (finish "length")
        self._closing_due = 0  # when (self.generated) to compute the closing next
        self._scan = JSONScan()  # the constrained message's text: inside a string?
        self.mask_s = 0.0  # CPU time spent computing masks
        self._bits = no_tokens()  # llguidance's mask
        for token in prefix:
            self._observe(token)

    # -- the processor
    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.generated < 0:
            self.generated, self._seen = 0, tokens.size
        else:  # read in place: a slice of `tokens` would wait for the step's forward
            for token in memoryview(tokens)[self._seen:].tolist():
                self._advance(token)
            self._seen = tokens.size
        return self._mask(logits)

    @property
    def remaining(self) -> int | None:
        """Tokens the engine may still generate, this one included."""
        return None if self.max_tokens is None else self.max_tokens - self.generated

    def _advance(self, token: int) -> None:
        self.generated += 1
        if self.forced:  # the forced token was sampled (anything else: decide again)
            self.forced = self.forced[1:] if self.forced[0] == token else []
        if self.headers:  # those that go on with the token, past it
            self.headers = [h[1:] for h in self.headers if h[0] == token and len(h) > 1]
        if self.matcher is not None:
            if token == self.end_token:
                self.matcher = self.grammar = self.end_token = None
            else:
                self.matcher.consume_token(token)
                self._scan.feed(self.tokenizer.decode_single_token_bytes(token))
        elif self._free_call() is not None:
            self._free_tokens += 1
        elif not self.in_final:
            self.reasoning_tokens += 1
        self._observe(token)

    def _observe(self, token: int) -> None:
        self._last = token
        for event in self.parser.feed(token):
            if isinstance(event, MessageStart):
                self._start(event)

    def _start(self, start: MessageStart) -> None:
        """A message's content begins: constrain it when it is the answer or a function call."""
        self.in_final = self.in_final or _is_answer(start)
        self.grammar, self.end_token = self._grammar_of(start)
        self.matcher = self.grammar.matcher() if self.grammar else None
        self._free_tokens = 0  # of a free call's arguments (_free_call)
        self._scan = JSONScan()
        self._closing_due = 0

    def _grammar_of(self, start: MessageStart) -> tuple[Grammar | None, int | None]:
        """The grammar a message is held to, and the token that ends it: the answer's (a final
        message to no tool: ``to=all`` is the user's answer too) or a function call's."""
        function = (start.recipient or "").removeprefix(FUNCTIONS)
        if _is_answer(start):
            return self.answer, ID[RETURN]
        if start.recipient != function and function in self.functions:  # functions.NAME
            return self.functions[function], ID[CALL]
        return None, None

    def constrains(self, start: MessageStart) -> bool:
        """Whether a message's content is held to a grammar here: its header's stray words
        (``Sure<|channel|>final``, ``<|constrain|>json args``) are then not its text, which a
        parser of the output keeps otherwise (StreamParser.drops_header_words)."""
        return self._grammar_of(start)[0] is not None

    # -- masks
    def _mask(self, logits: mx.array) -> mx.array:
        allowed = self._allowed()
        return logits if allowed is None else apply_bitmask(logits, mx.array(allowed))

    def _allowed(self) -> array.array | None:
        """The bitmask of the tokens allowed next (None: any)."""
        if not self.forced:
            self.forced = self._to_force()
        if self.forced:
            return only(self.forced[0])
        if self.matcher is not None:
            return self._grammar_bits()
        if self._free_call() is not None:  # only <|call|> ends it, and not before its arguments
            ends = (ID[RETURN], ID[ENDOFTEXT], ID[END]) + (() if self._free_tokens else (ID[CALL],))
            return all_but(*ends)
        if self._calls:
            return self._call_bits()
        if self._function_header_under_way():
            return all_but(ID[END], ID[CALL], ID[RETURN], ID[ENDOFTEXT])
        if self.answer is not None and not self.in_final and self._final_header_under_way():
            return only(ID[MESSAGE])
        if self.answer is not None and not self.in_final:
            return self._no_stop()
        return None

    def _free_call(self) -> str | None:
        """The declared function without a grammar (not strict) whose call's arguments are under
        way: they are not reasoning, and no budget cuts them (a cut call is never made)."""
        current = self.parser.current if self.parser.state == "content" else None
        name = (current.recipient or "").removeprefix(FUNCTIONS) if current is not None else ""
        if current is None or current.recipient == name or name not in self.declared or name in self.functions:
            return None
        return name

    def _function_header_under_way(self) -> bool:
        """A header under way calls one of ``functions``: nothing ends it before its
        ``<|message|>`` and arguments (``to=functions.f<|call|>`` would be a call without them)."""
        if self.parser.state != "header" or not self.declared:
            return False
        header = self.parser.pending_header.replace(CONSTRAIN, " ").replace(CHANNEL, " ")
        found = re.search(r"to=" + re.escape(FUNCTIONS) + r"(\S+)", header)
        return found is not None and found.group(1) in self.declared

    def _final_header_under_way(self) -> bool:
        """A header under way names the final channel (however spelt: ``<|channel|> final``, a
        bare ``final``, after ``to=all``): its ``<|message|>`` comes next. (A final header that
        ends without one, ``<|channel|>final Sorry<|return|>``, or goes on, ``<|channel|> final
        <|constrain|>json{...}<|end|>``, is read as a final message whose text the grammar never held.)"""
        if self.parser.state != "header":
            return False
        start, _ = parse_header(self.parser.pending_header, "assistant")  # (as if it ended here)
        return _is_answer(start)

    def _to_force(self) -> list[int]:
        """Tokens the budgets require from here: a closing of the constrained message, or the
        final channel's opening."""
        if self.matcher is not None:
            return self._closing_if_due()
        if self.in_final or self._calls or self._free_call() is not None:
            return []
        opening = self._opening()
        if self.reasoning_budget is not None and self.reasoning_tokens >= self.reasoning_budget:
            return opening
        if (self.answer is not None and self.remaining is not None
                and self.remaining <= len(opening) + self.answer.min_tokens + margin(self.answer) + 1):
            return opening
        return []

    def _opening(self) -> list[int]:
        """The tokens that open the final channel from here."""
        return self._before_header() + self._final_header

    def _before_header(self) -> list[int]:
        """What comes before a new header from here: nothing right after ``<|start|>assistant``;
        else the message under way ends and a new one starts."""
        if self.parser.state == "header" and self._last is None:  # the prompt's <|start|>assistant
            return []
        if self.parser.state == "header" and self._last == ID[START]:
            return list(self._role)
        start = [ID[START], *self._role]
        return start if self.parser.state == "expect_start" else [ID[END], *start]

    def _call_bits(self) -> array.array:
        """A reply that must call a function: where a header is due (the reply's first, one
        after the reasoning, or the reasoning's budgets spent), one of the call headers (or, as
        the first, the analysis header); nothing ends the reply meanwhile."""
        if not self.headers:
            self.headers = self._call_headers()
        return only(*{h[0] for h in self.headers}) if self.headers else self._no_stop()

    def _call_headers(self) -> list[list[int]]:
        """The headers the reply may go on with from here, or [] while it reasons on."""
        first = self.parser.state == "header" and self._last is None
        spent = ((self.reasoning_budget is not None and self.reasoning_tokens >= self.reasoning_budget)
                 or (self.remaining is not None and self.remaining <= self._call_room + len(self._role) + 3))
        if self.parser.state == "content" and not spent:
            return []
        before = self._before_header()
        headers = [before + header for header in self._calls.values()]
        return headers + [self._analysis_header] if first and not spent else headers

    def _closing_if_due(self) -> list[int]:
        """The closing and the end token once the tokens left are just enough for them, with
        a margin for what the next token could commit the JSON to."""
        remaining, extra = self.remaining, margin(self.grammar)
        if (remaining is None or self.generated < self._closing_due or self.end_token != ID[RETURN]
                or not self.close_early):
            return []  # (a call's arguments are never closed early: a call cut short is not made)
        closing = closing_tokens(self.tokenizer, self.matcher, self._scan, self.grammar.hints,
                                 self.grammar.numbers)
        if closing is None:
            return []
        if len(closing) + 1 + extra >= remaining:
            # (the answer may still be what the model would write: nothing but its end allowed)
            self.cut_short = self.cut_short or bool(closing) or not self.matcher.is_stopped()
            return closing + [self.end_token]
        # Each token lengthens the closing by at most `extra`: no need to look again before
        self._closing_due = self.generated + (remaining - len(closing) - 2 - extra) // (extra + 1)
        return []

    def _grammar_bits(self) -> array.array:
        """The grammar's text tokens (llguidance's mask), and the end token once it is complete."""
        t0 = time.perf_counter()
        bits = self._bits
        self.matcher.unsafe_compute_mask_ptr(bits.buffer_info()[0], MASK_WORDS * 4)
        # text tokens only: clear the bits from NUM_BPE_TOKENS on (specials, reserved ids)
        first = NUM_BPE_TOKENS // 32
        bits[first] &= (1 << NUM_BPE_TOKENS % 32) - 1
        bits[first + 1:] = _NO_SPECIAL_WORDS
        if self.matcher.is_accepting():
            bits[self.end_token // 32] |= 1 << self.end_token % 32
        self.mask_s += time.perf_counter() - t0
        return bits

    def _no_stop(self) -> array.array:
        """Before the answer nothing may end the reply: no <|return|> or end of text, no message
        under another role (after <|end|>, <|start|>assistant comes), and <|call|> only to end a call (calls to declared functions are constrained messages; a
        call to any other tool ends, and whoever runs the tools answers it, an error for a
        tool it does not have: held open, it ran on to the budget)."""
        if self._last == ID[START]:  # another role's message would end the reply (harmony.ends_reply)
            return only(ASSISTANT_ROLE_ID)
        if self._last == ID[END]:
            return only(ID[START])
        current = self.parser.current if self.parser.state == "content" else None
        if current is None or current.recipient in NOT_A_CALL:
            return all_but(ID[RETURN], ID[ENDOFTEXT], ID[CALL])
        return all_but(ID[RETURN], ID[ENDOFTEXT])


def _is_answer(start: MessageStart) -> bool:
    """A message on the final channel to no tool: the answer."""
    return start.channel == "final" and start.recipient in NOT_A_CALL


def constrained_messages(processors: list) -> Callable[[MessageStart], bool] | None:
    """Which messages ``processors`` (constraints_for's) hold to a grammar, for a parser of the
    output (StreamParser.drops_header_words); None when none does."""
    return next((p.constrains for p in processors if isinstance(p, HarmonyConstraint)), None)


def margin(grammar: Grammar) -> int:
    """Tokens kept free beyond a closing: what one sampled token may commit the JSON to (a key
    whose value is a nested object, say), bounded by the schema's smallest instance."""
    return grammar.min_tokens + 8


# llguidance's bitmask: bit i of word w is token 32w + i.
MASK_WORDS = (VOCAB_SIZE + 31) // 32
# The words past the last text token's: special and reserved ids only (cleared from every grammar
# mask; one zero array, not one per token)
_NO_SPECIAL_WORDS = array.array("I", bytes(4 * (MASK_WORDS - NUM_BPE_TOKENS // 32 - 1)))


def no_tokens() -> array.array:
    """An empty bitmask, (MASK_WORDS,) uint32."""
    return array.array("I", bytes(4 * MASK_WORDS))


def only(*tokens: int) -> array.array:
    """The bitmask of ``tokens``."""
    bits = no_tokens()
    for token in tokens:
        bits[token // 32] |= 1 << token % 32
    return bits


@lru_cache(maxsize=16)
def all_but(*tokens: int) -> array.array:
    """The bitmask of every token but ``tokens`` (kept: never changed in place)."""
    bits = array.array("I", [0xFFFFFFFF]) * MASK_WORDS
    for token in tokens:
        bits[token // 32] &= ~(1 << token % 32) & 0xFFFFFFFF
    return bits


@mx.compile
def apply_bitmask(logits: mx.array, words: mx.array) -> mx.array:
    """``logits`` (1, V) where the bitmask ``words`` (MASK_WORDS,) has the token's bit, -inf
    elsewhere: 25 KB go to the device, where one fused kernel expands them."""
    bits = (words[:, None] >> mx.arange(32, dtype=mx.uint32)) & 1  # (MASK_WORDS, 32)
    return mx.where(bits.reshape(-1)[: logits.shape[-1]] == 1, logits, float("-inf"))
