"""Structured outputs (gptoss_mlx/structured.py): JSON Schema constrained answers and tool calls.

Random weights make this strict: the tiny random model never ends its reasoning by itself and
writes noise, so only the constraint (and its budgets) can make the answer complete and valid."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import jsonschema
import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gptoss_mlx import harmony, load
from gptoss_mlx.chat import AnswerDelta, Chat, Done, ReasoningDelta
from gptoss_mlx.generate import Engine, SamplingParams
from gptoss_mlx.harmony import CALL, CHANNEL, CONSTRAIN, MESSAGE, RETURN, Special, ToolSpec
from gptoss_mlx.store import ConversationStore
from gptoss_mlx.structured import (
    HarmonyConstraint, JSONScan, SchemaError, closing_tokens, compile_schema, constraints_for,
)
from gptoss_mlx.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE

# Enums, a nested object, bounded arrays, optional and required fields, limited numbers/strings.
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number", "minimum": 0.5, "maximum": 80},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "owner": {"type": "object", "properties": {"email": {"type": "string", "maxLength": 16},
                                                   "vip": {"type": "boolean"}},
                  "required": ["email"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
WEATHER = ToolSpec("get_weather", "Current weather", {
    "type": "object",
    "properties": {"location": {"type": "string", "minLength": 2, "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["location", "unit"], "additionalProperties": False})


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(model, tokenizer): the tiny random model with the real tokenizer."""
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def pet(tok):
    return compile_schema(tok, PET)


def prompt_for(tok, *, formats=(), functions=()) -> list[int]:
    developer = harmony.Message("developer", harmony.DeveloperContent(
        "Describe a pet.", list(functions), list(formats)))
    messages = [harmony.system_message("low"), developer, harmony.Message("user", "A pet, please.")]
    return harmony.segments_to_tokens(harmony.render_conversation(messages), tok)


def generate(tiny, prompt, constraint, seed, max_tokens) -> tuple[list[int], str]:
    model, _ = tiny
    engine = Engine(model, max_context=2048)
    out = list(engine.generate(prompt, SamplingParams(seed=seed, max_tokens=max_tokens),
                               logits_processors=[constraint]))
    return out, engine.stats.finish_reason


def final_text(tok, tokens) -> str:
    finals = [m for m in harmony.parse_completion(tokens, tok) if m.channel == "final"]
    assert len(finals) == 1, f"expected one final message in {tok.decode(tokens)!r}"
    return finals[0].text


@pytest.mark.parametrize("seed", range(8))
def test_random_model_answers_validate_over_seeds(tok, tiny, pet, seed):
    """Reasoning cut by the budget, the answer sampled inside the grammar and closed in time
    (then the finish reason is "length": the answer is valid, but not the model's whole)."""
    budget = [0, 3, 9, 20][seed % 4]
    max_tokens = 70 + 7 * seed
    constraint = HarmonyConstraint(tok, answer=pet, reasoning_budget=budget, max_tokens=max_tokens)
    out, finish = generate(tiny, prompt_for(tok), constraint, seed, max_tokens)
    assert finish == ("length" if constraint.cut_short else "stop")
    assert out[-1] == SPECIAL_TOKENS[RETURN] and len(out) <= max_tokens
    jsonschema.validate(json.loads(final_text(tok, out)), PET)


@pytest.mark.parametrize("seed", range(3))
def test_endless_reasoning_is_closed_in_time_for_the_answer(tok, tiny, pet, seed):
    """No reasoning budget: the model would reason forever; what is left of max_tokens opens
    the final channel, and the answer still validates within max_tokens."""
    constraint = HarmonyConstraint(tok, answer=pet, max_tokens=120)
    out, finish = generate(tiny, prompt_for(tok), constraint, seed, 120)
    assert finish == ("length" if constraint.cut_short else "stop") and len(out) <= 120
    messages = harmony.parse_completion(out, tok)
    assert messages[0].channel != "final" and messages[0].text  # reasoning came first
    jsonschema.validate(json.loads(final_text(tok, out)), PET)


def test_analysis_is_unconstrained(tok, tiny, pet):
    """The reasoning's tokens are the model's own: outside the answer's grammar."""
    constraint = HarmonyConstraint(tok, answer=pet, reasoning_budget=15, max_tokens=100)
    out, _ = generate(tiny, prompt_for(tok), constraint, 5, 100)
    first_final = next(i for i, t in enumerate(out) if t == SPECIAL_TOKENS["<|channel|>"] and
                       tok.decode(out[i + 1:i + 2]) == "final")
    reasoning = [t for t in out[:first_final] if t < 199998]
    assert len(reasoning) >= 10
    assert pet.matcher().validate_tokens(reasoning) < len(reasoning)


@pytest.mark.parametrize("seed", range(4))
def test_tool_call_arguments_validate(tok, tiny, seed):
    """A call to functions.get_weather (its header in the prompt, as a forced tool_choice
    writes it) gets arguments that parse and validate, then <|call|>."""
    functions = {WEATHER.name: compile_schema(tok, WEATHER.parameters)}
    header = harmony.segments_to_tokens(
        [Special(CHANNEL), "commentary to=functions.get_weather ", Special(CONSTRAIN), "json",
         Special(MESSAGE)], tok)
    prompt = prompt_for(tok, functions=[WEATHER]) + header
    constraint = HarmonyConstraint(tok, functions=functions, max_tokens=60, prefix=header)
    out, finish = generate(tiny, prompt, constraint, seed, 60)
    assert finish == "stop" and out[-1] == SPECIAL_TOKENS[CALL]
    jsonschema.validate(json.loads(tok.decode(out[:-1])), WEATHER.parameters)


@pytest.mark.parametrize("header", ["<|channel|>commentary to=functions.get_weather",
                                    "<|channel|>commentary to=functions.get_weather <|constrain|>json",
                                    " to=functions.get_weather<|channel|>commentary"])
def test_a_call_header_cannot_end_before_its_arguments(tok, header):
    """``to=functions.get_weather<|call|>`` would be a call without arguments: once a header
    names a declared function, no stop token may end it before its <|message|>."""
    functions = {WEATHER.name: compile_schema(tok, WEATHER.parameters)}
    written = tok.encode(header, allowed_special="all")
    constraint = HarmonyConstraint(tok, functions=functions, max_tokens=60, prefix=written)
    masked = constraint(mx.array(prompt_for(tok, functions=[WEATHER]) + written), mx.zeros((1, VOCAB_SIZE)))
    allowed = mx.isfinite(masked[0])
    for name in (CALL, "<|end|>", RETURN):
        assert not allowed[SPECIAL_TOKENS[name]].item(), name
    assert allowed[SPECIAL_TOKENS[MESSAGE]].item() and allowed[SPECIAL_TOKENS[CONSTRAIN]].item()
    other = HarmonyConstraint(tok, functions=functions, max_tokens=60,
                              prefix=tok.encode("<|channel|>commentary to=functions.other", allowed_special="all"))
    masked = other(mx.array(prompt_for(tok, functions=[WEATHER])), mx.zeros((1, VOCAB_SIZE)))
    assert mx.isfinite(masked[0, SPECIAL_TOKENS[CALL]]).item()  # not a declared function: not held


@pytest.mark.parametrize("written, allowed", [("<|channel|>analysis<|message|>Think.<|end|>", "<|start|>"),
                                              ("<|channel|>analysis<|message|>Think.<|end|><|start|>", "assistant")])
def test_before_the_answer_the_model_cannot_open_another_roles_message(tok, pet, written, allowed):
    """A re-attack: the reply now ends where the model opens a message under another role
    (harmony.ends_reply), and under a response format that ended it with no answer, reported as
    a normal stop. Before the answer only the assistant's next header goes on."""
    ids = tok.encode(written, allowed_special="all")
    constraint = HarmonyConstraint(tok, answer=pet, max_tokens=400, prefix=ids)
    masked = constraint(mx.array(prompt_for(tok) + ids), mx.zeros((1, VOCAB_SIZE)))
    assert mx.isfinite(masked[0]).sum().item() == 1
    assert mx.isfinite(masked[0, tok.encode(allowed, allowed_special="all")[0]]).item()


def test_a_call_header_of_a_function_without_a_grammar_cannot_end_before_its_arguments(tok):
    """A function that is not strict and whose schema cannot be enforced has no grammar: its
    header could end with <|call|>, a call with arguments "" the server sent as complete."""
    written = tok.encode("<|channel|>commentary to=functions.run_shell", allowed_special="all")
    constraint = HarmonyConstraint(tok, max_tokens=60, prefix=written, declared={"run_shell"})
    masked = constraint(mx.array(prompt_for(tok) + written), mx.zeros((1, VOCAB_SIZE)))
    assert not mx.isfinite(masked[0, SPECIAL_TOKENS[CALL]]).item()
    assert mx.isfinite(masked[0, SPECIAL_TOKENS[MESSAGE]]).item()
    odd = harmony.ToolSpec("run_shell", "Run.", {"type": "object", "properties": {"x": {"not": {}}}}, strict=False)
    messages = [harmony.Message("developer", harmony.DeveloperContent("Be brief.", [odd], []))]
    (built,) = constraints_for(tok, messages, max_tokens=60)  # its calls held to an object alone
    assert built.declared == {"run_shell"} and set(built.functions) == {"run_shell"}


def test_a_free_calls_arguments_are_neither_reasoning_nor_cut_by_its_budget(tok):
    """A function without a grammar (not strict, its schema unenforceable): its arguments were
    counted as reasoning, so the reasoning budget forced the answer's opening into them and a
    cut call came back finished (`{"command": "rm -rf /`, finish stop); right after its
    <|message|>, <|call|> made a call with arguments ""."""
    header = tok.encode("<|channel|>commentary to=functions.run_shell <|constrain|>json<|message|>",
                        allowed_special="all")
    constraint = HarmonyConstraint(tok, max_tokens=200, reasoning_budget=2, prefix=header, declared={"run_shell"})
    prompt = prompt_for(tok) + header
    masked = constraint(mx.array(prompt), mx.zeros((1, VOCAB_SIZE)))
    allowed = mx.isfinite(masked[0])
    assert not allowed[SPECIAL_TOKENS[CALL]].item() and not allowed[SPECIAL_TOKENS["<|end|>"]].item()
    for token in tok.encode('{"command": "rm -rf /tmp/x'):  # past the budget, inside the call
        prompt.append(token)
        masked = constraint(mx.array(prompt), mx.zeros((1, VOCAB_SIZE)))
        allowed = mx.isfinite(masked[0])
        assert allowed[SPECIAL_TOKENS[CALL]].item() and not allowed[SPECIAL_TOKENS["<|end|>"]].item()
        assert allowed[token].item() and not constraint.forced and constraint.reasoning_tokens == 0


def test_a_number_answer_closed_early_is_reported_cut(tok, tiny):
    """A number is valid JSON at every digit: forcing its end to fit max_tokens shortened it
    with nothing to close, and the reply said "stop"."""
    grammar = compile_schema(tok, {"type": "integer"})
    for seed in range(3):
        constraint = HarmonyConstraint(tok, answer=grammar, reasoning_budget=2, max_tokens=16)
        out, finish = generate(tiny, prompt_for(tok), constraint, seed, 16)
        assert out[-1] == SPECIAL_TOKENS[RETURN] and constraint.cut_short and finish == "length"


@pytest.mark.parametrize("schema", [{"type": "integer", "multipleOf": 25, "minimum": 1},
                                    {"type": "number", "multipleOf": 12.5, "minimum": 7},
                                    {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 3.7,
                                                                            "exclusiveMinimum": 5}}, "required": ["n"]}])
def test_a_multiple_with_a_lower_bound_is_found(tok, schema):
    """`{"multipleOf": 25, "minimum": 1}` was refused as having no instance: the closing wrote
    "1", "11", "111"... digit by digit. It tries the first multiple from the bound."""
    grammar = compile_schema(tok, schema)
    closing = closing_tokens(tok, grammar.matcher(), hints=grammar.hints, numbers=grammar.numbers)
    jsonschema.validate(json.loads(tok.decode(closing)), schema)


@pytest.mark.parametrize("schema", [
    {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "additionalProperties": False}},
     "$ref": "#/$defs/n"},  # a linked list
    {"type": "object", "properties": {"p": {"$ref": "#"}}, "additionalProperties": False},
    {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}},
])
def test_a_schema_that_may_recurse_through_an_optional_property_is_closed_without_it(tok, schema):
    """A tester's linked list and self-referencing object (both with {} as an instance) were
    refused as having no instance: the closing opened the optional key, whose value opened it
    again, for ever. Outside strings it ends the object or array first where it may."""
    grammar = compile_schema(tok, schema)
    closing = tok.decode(closing_tokens(tok, grammar.matcher(), hints=grammar.hints, numbers=grammar.numbers))
    assert json.loads(closing) == {} and grammar.min_tokens == 1


def test_a_schema_too_large_for_the_constraint_is_named_as_such(tok):
    """800 optional properties: llguidance stops at 2000 Earley items in a row. It was refused
    as having no instance within 4096 bytes, which {} is."""
    schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(800)},
              "additionalProperties": False}
    with pytest.raises(SchemaError, match=r"too large for the constraint \(\d+ alternatives open at once, "
                                          r"at most 2000\): give it fewer properties"):
        compile_schema(tok, schema)


def test_answers_in_the_declared_key_order_are_accepted(tok, pet):
    """Properties come in the schema's order (as the prompt shows it), whatever its sorting."""
    answer = {"name": "Rex", "kind": "dog", "age": 3, "weight": 9.5, "tags": ["good"],
              "owner": {"email": "a@b.c", "vip": True}}
    for text in (json.dumps(answer), json.dumps(answer, indent=2), json.dumps(answer, separators=(",", ":"))):
        matcher = pet.matcher()
        assert matcher.consume_tokens(tok.encode_ordinary(text)) and matcher.is_accepting(), text


def test_an_unenforceable_schema_is_named(tok, tiny):
    with pytest.raises(SchemaError, match="uniqueItems"):
        compile_schema(tok, {"type": "array", "uniqueItems": True})
    with pytest.raises(SchemaError, match="(?s)text.format: .*look-around"):
        compile_schema(tok, {"type": "string", "pattern": "a(?=b)"}, "text.format")
    assert compile_schema(tok, {"type": "string", "pattern": "^a+b$"}).min_tokens <= 3
    with pytest.raises(SchemaError, match="oneOf.*use anyOf") as e:  # not llguidance's own option
        compile_schema(tok, {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 2}]})
    assert "coerce_one_of" not in str(e.value)
    chat = Chat(*tiny, sampling=SamplingParams(max_tokens=8))
    with pytest.raises(SchemaError, match="response format 'response'.*not"):
        chat.send("hi", response_format={"not": {"type": "string"}})
    assert chat.messages == []  # nothing was sent


@pytest.mark.parametrize("schema, says", [
    ({"type": "integer", "minimum": 10**20, "maximum": 10**20 + 5}, "minimum: 100000000000000000000 leaves only"),
    # a number of 400 digits shown by its length, not in full (the re-attack, helper-153)
    ({"type": "number", "multipleOf": 10**400}, "multipleOf: a number of 401 digits is beyond float64"),
    ({"const": 10**400}, "the const value a number of 401 digits is a number llguidance cannot write"),
    # refs that go round in a circle were sent to look for a minLength (helper-149)
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
     r"no instance .* or \$refs that lead only to one another is refused"),
    ({"type": ["integer", "null"], "exclusiveMaximum": -2.0**70}, "exclusiveMaximum: .* leaves only numbers"),
    # llguidance crashed the process (a segfault) on these two
    ({"type": ["integer", "null"], "minimum": -2**63, "maximum": -2**63}, "maximum: -9223372036854775808 leaves only"),
    ({"type": "integer", "minimum": -2**63 + 512, "maximum": -2**63 + 512}, "leaves only numbers beyond ±9223372036854774784"),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}], "minimum": -1e300, "maximum": -1e300}, "maximum: -1e"),
    ({"type": "number", "minimum": 1e19}, "minimum: 1e\\+19 leaves only numbers beyond"),  # llguidance's raw error
    ({"type": "number", "maximum": -9.223372036854774e18}, "the range of maximum -9.223372036854774e"),  # was StopIteration
    ({"type": "integer", "exclusiveMinimum": 2**53, "maximum": 2**53 + 1}, "the range of exclusiveMinimum "
     "9007199254740992 and maximum 9007199254740993 holds no number the constraint can bound exactly"),
    # whole numbers llguidance would write as others (it writes float64s)
    ({"type": "object", "properties": {"id": {"enum": [9007199254740993]}}},
     "the enum value 9007199254740993 is a number llguidance cannot write exactly .*9007199254740992\\): give it as a string"),
    ({"const": {"a": [1, 2**60 + 1]}}, "the const value 1152921504606846977"),
    ({"type": "number", "minimum": float("inf")}, "minimum: inf is beyond float64"),  # 1e400 in a request
    # a property named like a keyword hid what was inside it from these checks (a raw ValueError, a 500)
    ({"type": "object", "properties": {"const": {"type": "integer", "minimum": -2**63, "maximum": -2**63 + 5}}},
     "leaves only numbers beyond"),
    ({"properties": {"default": {"type": "string", "pattern": "a\\"}}}, "ends in a lone backslash"),
    # no float64 between the bounds: llguidance would round them outwards
    ({"type": "integer", "exclusiveMinimum": 999999999999999935, "exclusiveMaximum": 10**18},
     "the range of exclusiveMinimum 999999999999999935 and exclusiveMaximum 1000000000000000000 holds no "
     "number the constraint can bound exactly"),
    ({"type": "string", "pattern": "^xyz\\"}, "the pattern '\\^xyz\\\\\\\\' ends in a lone backslash"),
    ({"type": "object", "patternProperties": {"a\\\\\\": {}}}, "ends in a lone backslash"),
    ({"name": "n", "schema": {"type": "integer"}, "strict": True}, "is an OpenAI json_schema object")])
def test_a_schema_the_constraint_would_change_without_a_word_is_refused(tok, schema, says):
    """An integer range beyond 64 bits was clamped (the answer 9223372036854775807 for a minimum
    of 1e20), a pattern's trailing backslash dropped, and OpenAI's json_schema object taken as a
    schema with no keywords: answers the schema refuses, each without an error."""
    with pytest.raises(SchemaError, match=says):
        compile_schema(tok, schema)


def test_integer_bounds_beyond_64_bits_that_only_widen_the_range_are_kept(tok):
    assert compile_schema(tok, {"type": "integer", "maximum": 1e30})
    # a property named like a keyword is a property (it was read as the keyword: a TypeError)
    assert compile_schema(tok, {"type": "object", "properties": {"patternProperties": True, "enum": {"type": "string"}}})
    assert compile_schema(tok, {"type": "object", "properties": {"pattern": {"type": "string"}, "name": {},
                                                               "schema": {"type": "object"}}})

@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "integer", "minimum": -2**63, "maximum": 2**63 - 1}, ["0", "-42", "9000000000000000000"], ["1.5"]),
    ({"type": "integer", "minimum": 2**63 - 1024}, ["9223372036854774784"], ["0", "9223372036854774783"]),
    ({"type": "integer", "minimum": 1_600_000_000_000_000_000}, ["1700000000000000000"], ["5", "-1700000000000000000"]),
    ({"type": "integer", "maximum": -10**18}, ["-1000000000000000000", "-5000000000000000000"], ["0", "-999"]),
    ({"type": "number", "minimum": 0, "maximum": 1e300}, ["0", "2.5", "1000000"], ["-1"]),
    # a whole number too large for a float64 (valid JSON) was an OverflowError's traceback (helper-148)
    ({"type": "integer", "maximum": 10**400, "exclusiveMinimum": -10**400}, ["0", "-42", "9000000000000000000"], ["1.5"]),
    ({"type": "number", "exclusiveMaximum": 10**400}, ["0", "-2.5"], ["a"]),
    # counts of 400 digits were llguidance's "number out of range at line 1 column 431" (the re-attack)
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 10**400}, ["[]", "[1, 2]"], ["{}"]),
    ({"type": "object", "maxProperties": 10**400, "additionalProperties": {"type": "integer"}}, ['{"a": 1}'], ["[]"]),
    ({"type": "number", "exclusiveMinimum": -1e19, "exclusiveMaximum": 1e19}, ["0", "-3.25"], ["20000000000000000000"]),
    ({"type": "number", "minimum": 10**18}, ["1000000000000000000", "2000000000000000000.5"], ["5"]),
    # bounds beyond 2**53 were rounded to float64 either way: these let the bound through
    ({"type": "integer", "minimum": 10**17, "exclusiveMaximum": 10**18},
     ["999999999999999872", "100000000000000000"], ["1000000000000000000"]),
    ({"type": "integer", "minimum": 2**53 + 1, "maximum": 2**60}, ["9007199254740994"], ["9007199254740992"]),
    # llguidance writes a number's bound with 15 significant digits (4611686018427390000 for 2**62): rounded inwards
    ({"type": "number", "minimum": 0, "maximum": 2**62}, ["4611686018427380000", "5"],
     ["4611686018427387905", "4611686018427388000"]),
    ({"type": "number", "minimum": -4.611686018427388e18}, ["-4611686018427380000", "7"], ["-4611686018427387905"]),
    # ... with 15 significant digits: -9007199254740169 as -9007199254740170 (a sweep of random bounds)
    ({"type": "number", "minimum": -9007199254740169.0}, ["-9007199254740160", "0.5"],
     ["-9007199254740169.5", "-9007199254740170"]),
    # an exclusive bound made inclusive 1e-9 inside: from about 1.6e7 that is the bound itself
    ({"type": "number", "exclusiveMinimum": 20000000, "maximum": 20000000.5}, ["20000000.25"], ["20000000"]),
    ({"type": "number", "minimum": -20000000.5, "exclusiveMaximum": -20000000}, ["-20000000.25"], ["-20000000"]),
    # an exclusive bound this large was let through by llguidance itself
    ({"type": "number", "minimum": 0, "exclusiveMaximum": 10**18}, ["999999999999999000"], ["1000000000000000000"])])
def test_number_ranges_at_the_edges_of_64_bits_are_enforced(tok, schema, good, bad):
    """llguidance counts bounds in 64 bits: beyond about ±9.2e18, or one-sided from 1e18 on,
    it refused with its raw "Failed to generate regex" (the int64 range [-2**63, 2**63-1] that
    OpenAPI gives every int64 among them). Each now compiles, and holds the answers to the range."""
    grammar = compile_schema(tok, schema)
    for text in good:
        matcher = grammar.matcher()
        assert matcher.consume_tokens(tok.encode_ordinary(text)) and matcher.is_accepting(), text
    for text in bad:
        matcher = grammar.matcher()
        assert not (matcher.consume_tokens(tok.encode_ordinary(text)) and matcher.is_accepting()), text



@pytest.mark.parametrize("pattern", ["x", "abc", "abc$", "a|b", "foo.*", "\\d{3}", "[aeiou]{3}", "ook",
                                     "hello world", "^[^@]+@[^@]+\\.[a-z]{2,}$", '"', "\\\\", "[\\n\\t]",
                                     "[\\x00-\\x1f]", "a{80}", "[ab]{100}",
                                     "a\\\\", "x\\\\\\\\",  # these two: the closing wrote `\\"` (an escape) as the end
                                     # ranges whose characters begin with several bytes (α is CE B1, ω CF 89):
                                     # refused as having no instance (the closing tried no byte beyond ASCII; helper-149)
                                     "^[α-ω]$", "^[а-я]+$", "^[\u4e00-\u9fff]+$", "^[😀-🙏]{2}$"])
def test_patterns_are_searches_and_their_answers_match(tok, pattern):
    """A JSON Schema pattern is found anywhere in the string (unanchored unless it says ^ or $):
    such schemas were refused as having no instance (the closing wrote escaped quotes forever,
    or never came on a literal), and the smallest answer the closing writes matches."""
    schema = {"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}, "required": ["p"]}
    grammar = compile_schema(tok, schema)
    closing = closing_tokens(tok, grammar.matcher(), hints=grammar.hints)
    answer = json.loads(tok.decode(closing))
    assert re.search(pattern, answer["p"]) and len(closing) <= 12 + len(answer["p"]) // 6, answer


@pytest.mark.parametrize("schema", [
    {"type": "number", "multipleOf": 2.5}, {"type": "integer", "multipleOf": 2.5},
    {"type": "number", "multipleOf": 0.37}, {"type": "number", "multipleOf": 1.25, "minimum": 3},
    {"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.05}}, "required": ["price"]},
    {"type": "array", "items": {"type": "number", "multipleOf": 0.7}, "minItems": 2},
])
def test_a_multiple_of_a_fraction_is_enforced(tok, schema):
    """A number in steps of 2.5 (prices in 0.05) was refused as having no instance: the closing
    wrote "1" for ever, each a prefix of some multiple. It now prefers a digit after which the
    value may end, and answers are held to the multiple."""
    grammar = compile_schema(tok, schema)
    closing = closing_tokens(tok, grammar.matcher(), hints=grammar.hints)
    jsonschema.validate(json.loads(tok.decode(closing)), schema)
    if schema.get("multipleOf") == 2.5:
        for text, ok in (("5", True), ("10", True), ("12", False), ("7", False)):
            matcher = grammar.matcher()
            assert (matcher.consume_tokens(tok.encode_ordinary(text)) and matcher.is_accepting()) == ok, text


def test_the_tuple_form_of_items_is_held_as_prefix_items(tok):
    """zod and MCP tools write a tuple as draft-07's ``items: [A, B]`` (2020-12's prefixItems):
    it was a 400 ("items must be a JSON Schema object"), and an agent with one such tool could
    make no request at all."""
    schema = {"type": "object", "properties": {"point": {"type": "array", "items": [{"type": "number"}, {"enum": ["m", "km"]}],
                                                         "additionalItems": False, "minItems": 2}},
              "required": ["point"], "additionalProperties": False}
    grammar = compile_schema(tok, schema, "function 'f' parameters")
    closed = json.loads(tok.decode(closing_tokens(tok, grammar.matcher())))
    jsonschema.Draft7Validator(schema).validate(closed)
    for text, ok in (('{"point": [1.5, "km"]}', True), ('{"point": ["km", 1]}', False), ('{"point": [1, "m", 2]}', False)):
        matcher = grammar.matcher()
        assert (matcher.consume_tokens(tok.encode_ordinary(text)) and matcher.is_accepting()) == ok, text
    assert "point: any[]," in harmony.schema_to_typescript(schema)  # (the prompt: an array)


@pytest.mark.parametrize("schema, closed", [
    ({"type": "object", "properties": {"when": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}},
      "required": ["when"], "additionalProperties": False}, '{"when":null}'),
    ({"type": ["string", "null"], "minLength": 30}, "null"),
])
def test_a_value_that_may_be_null_is_closed_with_null(tok, schema, closed):
    """The closing (what the answer is completed with when its tokens run out, and what sizes
    the budget kept for it) opened a nullable date-time's string: 17 tokens where null takes one,
    so with --max-tokens room for '{"when":null}' the answer was still cut, invalid."""
    grammar = compile_schema(tok, schema)
    assert tok.decode(closing_tokens(tok, grammar.matcher())) == closed
    assert grammar.min_tokens == len(tok.encode_ordinary(closed))


@pytest.mark.parametrize("schema, says", [
    ({"type": "integer", "minimum": True}, "'minimum' must be a number, got true"),
    ({"type": "number", "maximum": "5"}, "'maximum' must be a number, got \"5\""),
    ({"type": "number", "multipleOf": 1e-30}, "'multipleOf' has more significant digits than"),
    # -2 was taken as 2 (a client validating with jsonschema refuses its own schema); 0 was "invalid multiple of"
    ({"type": "integer", "multipleOf": -2}, "multipleOf must be greater than 0, got -2"),
    ({"type": "number", "multipleOf": 0}, "multipleOf must be greater than 0, got 0"),
    ({"type": "string", "maxLength": -1}, "'maxLength' must be a whole number, 0 or more, got -1"),
    ({"type": "array", "minItems": 1.5}, "'minItems' must be a whole number, 0 or more, got 1.5"),
    ({"type": "string", "pattern": True}, "'pattern' must be a string, got true"),
    ({"type": "integer", "exclusiveMinimum": "yes"}, "'exclusiveMinimum' must be a number, got \"yes\""),  # (ignored)
])
def test_a_number_keyword_llguidance_refuses_is_named_in_a_clients_terms(tok, schema, says):
    """llguidance's messages named Rust's types ("Expected f64 for 'minimum', got true") and its
    digits ("too many digits: 10000000000000008")."""
    with pytest.raises(SchemaError) as refused:
        compile_schema(tok, schema)
    assert says in str(refused.value) and "f64" not in str(refused.value)


def test_string_lengths_beyond_what_a_regex_counts(tok):
    """A maxLength from 2**32 on (valid JSON Schema) was a 400 quoting llguidance's internal
    regex ("(?s:.{0,1000000000000}) ... decimal literal invalid"): no answer is that long, so it
    is taken; a minLength as long cannot be met, and says so."""
    assert compile_schema(tok, {"type": "string", "maxLength": 10**12})
    with pytest.raises(SchemaError) as refused:
        compile_schema(tok, {"type": "string", "minLength": 10**12})
    assert "no instance of it was found" in str(refused.value) and "regex" not in str(refused.value)


def test_a_schema_the_prompt_cannot_carry_is_a_schema_error(tok, tiny):
    """Too many values or too deep for the developer message: refused when compiled (the CLI
    and Chat report it as the schema's error), not when the prompt is written."""
    with pytest.raises(SchemaError, match="more than 10,000 JSON values"):
        compile_schema(tok, {"enum": [f"v{i}" for i in range(20_000)]})
    deep = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(SchemaError, match="nested deeper"):
        compile_schema(tok, deep)
    # the limit as the README and the message give it: 32 levels of objects and lists (a tester's,
    # helper-127: 32 nested arrays were refused, the strings inside them counted as a level)
    nested = {"type": "string"}
    for _ in range(31):
        nested = {"type": "array", "items": nested}
    assert compile_schema(tok, nested)
    with pytest.raises(SchemaError, match="nested deeper than 32 levels of JSON objects and lists"):
        compile_schema(tok, {"type": "array", "items": nested})
    chat = Chat(*tiny, sampling=SamplingParams(max_tokens=8))
    with pytest.raises(SchemaError, match="response format 'response'"):
        chat.send("hi", response_format={"enum": list(range(20_000))})
    assert chat.messages == []


def test_a_cut_answer_is_reported_as_truncated(tok, tiny):
    """max_tokens below the smallest answer: the reply ends with finish reason length."""
    chat = Chat(*tiny, sampling=SamplingParams(seed=0, max_tokens=12), response_format=PET)
    events = list(chat.send("A pet."))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "length"
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer)


def test_chat_send_with_response_format(tok, tiny):
    """The developer message carries the schema (harmony's # Response Formats), the answer is
    exactly the JSON and the reasoning stays apart; the next turn without a format is free."""
    chat = Chat(*tiny, sampling=SamplingParams(seed=3, max_tokens=90), reasoning_budget=10)
    events = list(chat.send("A pet.", response_format=PET))
    assert "# Response Formats\n\n## response\n\n" in tok.decode(chat.prompt_tokens())
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    jsonschema.validate(json.loads(answer), PET)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert chat.messages[-1].channel == "final" and chat.messages[-1].text == answer
    list(chat.send("again"))  # no format this turn
    assert "# Response Formats" not in tok.decode(chat.prompt_tokens())


def test_chat_function_calls_are_constrained(tok, tiny):
    """A Chat with functions constrains every call it makes to the function's parameters."""
    chat = Chat(*tiny, functions=[WEATHER])
    [constraint] = chat._constraints(chat.prompt_tokens())
    assert set(constraint.functions) == {"get_weather"} and constraint.answer is None
    with pytest.raises(SchemaError, match="function 'bad' parameters"):
        Chat(*tiny, functions=[ToolSpec("bad", "", {"type": "array", "uniqueItems": True})])


def test_reasoning_budget_without_a_schema(tok, tiny):
    """Runaway reasoning ends after the budget: the final channel is opened by the engine."""
    constraint = HarmonyConstraint(tok, reasoning_budget=12, max_tokens=40)
    out, _ = generate(tiny, prompt_for(tok), constraint, 1, 40)
    messages = harmony.parse_completion(out, tok)
    assert any(m.channel == "final" for m in messages)
    before = out[:next(i for i, t in enumerate(out) if t == SPECIAL_TOKENS["<|end|>"])]
    assert len(before) <= 12


def test_a_final_header_written_without_its_message_token_is_held_to_the_schema(tok):
    """A model's "<|channel|>final I cannot help<|return|>" (no <|message|>) was read as a final
    message the grammar never held: with --reasoning-budget, generate --json-schema printed
    "I cannot help" and then the JSON. Once a header names the final channel, <|message|> is
    the only token allowed, and the answer is the schema's."""
    from scripted import ScriptedModel

    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    for budget in (None, 2, 10):
        model = ScriptedModel([tok.encode("<|channel|>final I cannot help<|return|>", allowed_special="all")])
        chat = Chat(model, tok, sampling=SamplingParams(max_tokens=60), response_format=schema,
                    reasoning_budget=budget, date="2025-08-05")
        answer = "".join(e.text for e in chat.send("hi") if isinstance(e, AnswerDelta))
        jsonschema.validate(json.loads(answer), schema)


@pytest.mark.parametrize("written", [
    '<|channel|> final<|constrain|>json{"b": "x"}<|end|><|start|>assistant<|channel|>final<|message|>{"a": "y"}<|return|>',
    ' final<|message|>{"a": "y"}<|return|>',
    ' Sure<|channel|>final<|message|>{"a": "y"}<|return|>',
    ' to=all<|channel|>final<|message|>Sure! Here:<|end|><|start|>assistant<|channel|>final<|message|>{"a": "y"}<|return|>',
    '<|channel|>final json now<|message|>{"a": "y"}<|return|>',
])
def test_however_the_model_spells_the_answers_header_the_answer_is_the_schemas(tok, written):
    """The grammar began only at a clean <|message|> after "<|channel|>final": a header with a
    space (``<|channel|> final``), words before the channel (``Sure<|channel|>final``) or after
    it, or an answer addressed ``to=all`` gave the user text the schema never held: "Sure
    {...}", ``{"b": "x"}`` from a header that ended without <|message|>. Any final header to no
    tool takes <|message|> next, its stray words are not the answer's text, and the answer is
    held to the schema."""
    from scripted import ScriptedModel

    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    model = ScriptedModel([tok.encode(written, allowed_special="all")])
    chat = Chat(model, tok, sampling=SamplingParams(max_tokens=60), response_format=schema, date="2025-08-05")
    answer = "".join(e.text for e in chat.send("hi") if isinstance(e, AnswerDelta))
    jsonschema.validate(json.loads(answer), schema)
    assert chat.messages[-1].channel == "final" and json.loads(chat.messages[-1].text) == json.loads(answer)


def test_a_strict_calls_header_words_are_not_its_arguments(tok):
    """``to=functions.get_weather <|constrain|>json args<|message|>{...}``: the stray word was
    kept as the start of the call's arguments, which then did not parse."""
    from scripted import ScriptedModel

    arguments = '{"location": "Oslo", "unit": "celsius"}'
    for header in ("<|channel|>commentary to=functions.get_weather <|constrain|>json args",
                   "<|channel|>commentary to=functions.get_weather two words"):
        model = ScriptedModel([tok.encode(f"{header}<|message|>{arguments}<|call|>", allowed_special="all")])
        chat = Chat(model, tok, sampling=SamplingParams(max_tokens=60), functions=[WEATHER], date="2025-08-05")
        list(chat.send("weather?"))
        call = chat.messages[-1]
        assert call.recipient == "functions.get_weather" and json.loads(call.text) == json.loads(arguments)


def test_engine_passes_the_sequence_to_processors(tiny):
    """mlx-lm's convention: processor(tokens so far, logits (1, V)) before each sample."""
    model, _ = tiny
    seen, script = [], [11, 22, 33]

    def force(tokens, logits):
        seen.append(tokens.tolist())
        allowed = mx.arange(logits.shape[-1]) == script[len(seen) - 1]
        return mx.where(allowed, logits, float("-inf"))

    out = list(Engine(model, max_context=256).generate([1, 2, 3], SamplingParams(max_tokens=3),
                                                       logits_processors=[force]))
    assert out == script
    assert seen == [[1, 2, 3], [1, 2, 3, 11], [1, 2, 3, 11, 22]]


def pending_ops(a: mx.array) -> int:
    """How many ops of ``a``'s graph are neither evaluated nor queued (mx.async_eval)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, a)
    return dot.getvalue().count("label =")


def test_processors_run_while_the_forward_does(tok, tiny, pet):
    """The pipelining a constraint relies on: when a processor runs, its step's forward is
    already queued on the device, and the ids it reads need nothing more computed, so the
    host reads the last token and builds the mask while the forward runs (an op on the ids
    would queue behind the forward and wait for it)."""
    constraint = HarmonyConstraint(tok, answer=pet, reasoning_budget=4, max_tokens=40)
    seen = []

    def watch(tokens, logits):
        seen.append((pending_ops(tokens), pending_ops(logits)))
        return constraint(tokens, logits)

    out, finish = generate(tiny, prompt_for(tok), watch, 2, 40)
    assert finish == "stop" and len(seen) >= len(out) > 4
    assert set(seen) == {(0, 0)}


# -- the closing, fuzzed over schemas and where the text is cut
@st.composite
def schema_and_instance(draw, depth=0):
    """A schema from the kinds above, and a valid instance of it."""
    kind = draw(st.sampled_from(["enum", "int", "num", "str", "fmt", "bool", "array", "object"][:8 if depth < 2 else 6]))
    if kind == "enum":
        values = draw(st.lists(st.text("abcxyz", min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
        return {"enum": values}, draw(st.sampled_from(values))
    if kind == "int":
        lo = draw(st.integers(-50, 50))
        hi = draw(st.integers(lo, lo + 500))
        return {"type": "integer", "minimum": lo, "maximum": hi}, draw(st.integers(lo, hi))
    if kind == "num":
        return {"type": "number", "minimum": 0.25, "maximum": 9.5}, draw(st.sampled_from([0.25, 1, 3.75, 9.5]))
    if kind == "str":
        lo = draw(st.integers(0, 3))
        value = draw(st.text("abc xyz\"\\é", min_size=lo, max_size=lo + 5))
        return {"type": "string", "minLength": lo, "maxLength": lo + 5}, value
    if kind == "fmt":  # formats and patterns: the closing must find their special characters
        return draw(st.sampled_from([
            ({"type": "string", "format": "email"}, "ann@example.com"),
            ({"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z"),
            ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000"),
            ({"type": "string", "format": "ipv4"}, "10.0.0.1"),
            ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,4}$"}, "AB-123"),
            ({"type": "string", "pattern": "foo.*"}, "a foo b"),  # a search, not anchored
            ({"type": "string", "pattern": "^[^@]+@[^@]+\\.[a-z]{2,}$"}, "ann@b.cd"),
            ({"type": "string", "pattern": "\\$\\d+\\.\\d\\d"}, "it is $12.50"),
            ({"type": "string", "pattern": 'say "hi"'}, 'we say "hi"')]))
    if kind == "bool":
        return {"type": "boolean"}, draw(st.booleans())
    if kind == "array":
        item, value = draw(schema_and_instance(depth + 1))
        lo = draw(st.integers(0, 2))
        n = draw(st.integers(lo, lo + 2))
        return {"type": "array", "items": item, "minItems": lo, "maxItems": lo + 2}, [value] * n
    props = draw(st.lists(st.sampled_from(["a", "b", "cc", "d_d"]), min_size=1, max_size=3, unique=True))
    pairs = {p: draw(schema_and_instance(depth + 1)) for p in props}
    required = [p for p in props if draw(st.booleans())]
    present = {p: v for p, (_, v) in pairs.items() if p in required or draw(st.booleans())}
    return ({"type": "object", "properties": {p: s for p, (s, _) in pairs.items()}, "required": required,
             "additionalProperties": False}, present)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=schema_and_instance(), cut=st.floats(0, 1))
def test_closing_completes_any_prefix(tok, data, cut):
    """Cut a valid answer anywhere: the forced closing makes it valid JSON of the schema."""
    schema, instance = data
    jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())
    tokens = tok.encode_ordinary(json.dumps(instance, separators=(",", ":"), ensure_ascii=False))
    grammar = compile_schema(tok, schema)
    matcher = grammar.matcher()
    prefix = tokens[:int(cut * len(tokens))]
    assert matcher.consume_tokens(prefix), matcher.get_error()
    scan = JSONScan()
    scan.feed(tok.decode_bytes(prefix))
    closing = closing_tokens(tok, matcher, scan, grammar.hints)
    assert closing is not None
    assert matcher.consume_tokens(closing) and matcher.is_accepting()  # the grammar takes it
    jsonschema.validate(json.loads(tok.decode(prefix + closing)), schema,
                        format_checker=jsonschema.FormatChecker())


# -- the CLI
def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "gptoss_mlx", *args, "--no-memory-check"],
                          input=stdin, capture_output=True, text=True, timeout=180)


def test_cli_generate_json_schema(tiny_checkpoint, tmp_path):
    """The answer on standard output is exactly the JSON; the reasoning on standard error. An
    answer closed early to fit --max-tokens (a random model's strings never end) is valid JSON,
    and said to be shorter than the model's own, exit status 1; one the model ends, 0."""
    schema = tmp_path / "pet.json"
    schema.write_text(json.dumps(PET))
    proc = run_cli("generate", "-m", str(tiny_checkpoint), "-p", "A pet?", "--json-schema", str(schema),
                   "--reasoning-budget", "8", "--max-tokens", "90", "--seed", "3")
    assert proc.returncode == 1, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), PET)
    assert "Generation:" in proc.stderr
    assert "the JSON answer was closed early to fit: it is valid, but shorter than the model's own" in proc.stderr
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
    schema.write_text(json.dumps(flag))
    proc = run_cli("generate", "-m", str(tiny_checkpoint), "-p", "OK?", "--json-schema", str(schema),
                   "--reasoning-budget", "8", "--max-tokens", "90", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), flag)


def test_cli_json_answer_with_controls_is_the_json_the_model_wrote(tiny_checkpoint, tmp_path):
    """A JSON string may hold C1 controls and bidi characters: they were printed as the markers
    terminal text gets (``"<U+0080>À"``), a value that no longer matched its pattern; now as JSON's
    own escapes (the re-attack, helper-153)."""
    schema = tmp_path / "p.json"
    schema.write_text(json.dumps({"type": "string", "pattern": "^[\u0080-\u009f\u202e][^\u0000-\u007f]$"}))
    proc = run_cli("generate", "-m", str(tiny_checkpoint), "-p", "hi", "--json-schema", str(schema),
                   "--max-tokens", "60", "--seed", "1")
    assert proc.returncode in (0, 1), proc.stderr
    assert "<U+" not in proc.stdout and re.search("^[\u0080-\u009f\u202e][^\u0000-\u007f]$", json.loads(proc.stdout))


def test_cli_chat_piped_json_object_and_truncation(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(tmp_path))
    proc = run_cli("chat", "-m", str(tiny_checkpoint), "--json-object", "--max-tokens", "40", "--seed", "1",
                   stdin="Anything, as JSON.")
    # exit status 1, as generate's (it was 2 and "error:", as for a command that failed: helper-152)
    assert proc.returncode == 1 and "closed early to fit: it is valid" in proc.stderr, proc.stderr
    assert "gptoss-mlx: error" not in proc.stderr
    assert isinstance(json.loads(proc.stdout), dict)
    proc = run_cli("chat", "-m", str(tiny_checkpoint), "--json-object", "--max-tokens", "3",
                   stdin="Anything, as JSON.")
    assert proc.returncode == 1 and "the JSON answer is truncated" in proc.stderr


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"type":', "not valid JSON"),
    ('{"type": "array", "uniqueItems": true}', 'cannot be enforced: Unimplemented keys: ["uniqueItems"]'),
    ('{"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}', "is an OpenAI response_format, "
                                                                         "not a JSON Schema: give its json_schema.schema"),
    # one line, not the regex crate's pattern and carets (a tester's, helper-132)
    ('{"type": "string", "pattern": "a(?=b)"}', "cannot be enforced: its pattern 'a(?=b)': look-around, including "
                                                 "look-ahead and look-behind, is not supported (at '(?=')"),
])
def test_cli_bad_schema_files_are_named(tiny_checkpoint, tmp_path, content, message):
    """Each in one message naming the file, before the model loads (a tester's, helper-132: a
    schema the grammar cannot hold was reported once the weights had loaded: minutes on a Mac)."""
    schema = tmp_path / "s.json"
    if content is not None:
        schema.write_text(content)
    proc = run_cli("generate", "-m", str(tiny_checkpoint), "-p", "hi", "--json-schema", str(schema))
    assert proc.returncode == 2 and message in proc.stderr and str(schema) in proc.stderr
    assert "Traceback" not in proc.stderr and "Loading" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_piped_resumed_chat_reports_a_truncated_answer(tiny, tiny_checkpoint, tmp_path, monkeypatch):
    """``chat --resume`` piped with --json-object: a cut answer is reported as in a new chat
    (it printed nothing and exited 0); the turn is still saved."""
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(tmp_path))
    chat = Chat(*tiny, sampling=SamplingParams(max_tokens=4))
    list(chat.send("hi"))
    saved = ConversationStore().save(chat, "c1", "earlier")
    proc = run_cli("chat", "-m", str(tiny_checkpoint), "--resume", "--json-object", "--max-tokens", "3",
                   stdin="Anything, as JSON.")
    assert proc.returncode == 1 and "the JSON answer is truncated" in proc.stderr, proc.stderr
    assert "Anything, as JSON." in saved.read_text()


@pytest.mark.parametrize("recipient", ["functions.nope", "python", "browser.search"])
def test_a_call_to_a_tool_the_reply_lacks_ends_like_any_call(tok, pet, recipient):
    """With a response format, a message to a tool that is not there (no such function, no
    python or browser in the system message) ends with <|call|> like any call, and whoever runs
    the tools answers it with an error (the server, the terminal chat): held open instead, the
    model wrote on into the call until the token budget ran out. A message to no one cannot."""
    header = harmony.segments_to_tokens([Special(CHANNEL), f"commentary to={recipient} ", Special(CONSTRAIN),
                                         "json", Special(MESSAGE)], tok)
    call = SPECIAL_TOKENS[CALL]
    in_call = HarmonyConstraint(tok, answer=pet, max_tokens=120, prefix=header)
    assert in_call(mx.array([1]), mx.zeros((1, VOCAB_SIZE)))[0, call] == 0
    preamble = harmony.segments_to_tokens([Special(CHANNEL), "commentary", Special(MESSAGE)], tok)
    in_text = HarmonyConstraint(tok, answer=pet, max_tokens=120, prefix=preamble)
    assert in_text(mx.array([1]), mx.zeros((1, VOCAB_SIZE)))[0, call] < -1e30


@pytest.mark.parametrize("name", ["get weather", "get\nweather", "x" * 300], ids=["space", "newline", "long"])
def test_a_function_name_no_header_can_carry_is_an_error(tiny, name):
    """Calls to a function named with whitespace, or too long for a header, are not read back
    as calls to it ("get weather" reads as a call to "get"), so their arguments went
    unconstrained: refused, like a schema that cannot be enforced. So is a name declared twice."""
    with pytest.raises(SchemaError, match="a harmony header cannot carry this name"):
        Chat(*tiny, functions=[ToolSpec(name, "", WEATHER.parameters)])
    with pytest.raises(SchemaError, match="function 'get_weather' is declared twice"):
        Chat(*tiny, functions=[WEATHER, ToolSpec(WEATHER.name, "", {"type": "object"})])
    Chat(*tiny, functions=[ToolSpec("weather.get-v2", "", WEATHER.parameters)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.text(st.characters(min_codepoint=0x80, max_codepoint=0x1FFFF, exclude_categories=["Cs"]),
                     min_size=1, max_size=4), cut=st.floats(0, 1))
def test_closing_completes_a_character_cut_in_its_bytes(tok, value, cut):
    """o200k has ~1500 tokens that end inside a UTF-8 character: when the tokens left are just
    enough to close the JSON, the text may be mid-character, and the closing (which found none,
    so the answer was cut by max_tokens) must finish the character first."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    text = json.dumps({"a": value}, ensure_ascii=False, separators=(",", ":")).encode()
    prefix = text[:len('{"a":"') + int(cut * len(value.encode()))]
    byte_token = [tok.encode_single_token(bytes([b])) for b in range(256)]
    matcher = compile_schema(tok, schema).matcher()
    assert matcher.consume_tokens([byte_token[b] for b in prefix])
    scan = JSONScan()
    scan.feed(prefix)
    closing = closing_tokens(tok, matcher, scan)
    assert closing is not None and matcher.consume_tokens(closing) and matcher.is_accepting()
    assert len(closing) <= 4  # the character's last bytes, then '"}' in one or two tokens
    answer = json.loads(prefix + tok.decode_bytes(closing))
    assert answer["a"].startswith(prefix.decode(errors="ignore")[len('{"a":"'):])



@pytest.mark.parametrize("schema, outside, inside", [
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}, "0", "0.25"),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1.5}, "1", "1.2"),
    ({"type": "number", "minimum": -0.5, "exclusiveMaximum": 0}, "-0", "-0.25"),
    ({"type": "object", "properties": {"p": {"anyOf": [{"type": "number", "exclusiveMinimum": 0,
                                                        "exclusiveMaximum": 0.5}]}}}, '{"p":0}', '{"p":0.1}'),
])
def test_an_exclusive_bound_is_kept_out(tok, schema, outside, inside):
    """llguidance lets an exclusive whole-number bound through when the other bound is within 1
    of it ({"x": 0} for exclusiveMinimum 0, maximum 0.5 came out with finish reason stop)."""
    def accepts(text):
        matcher = compile_schema(tok, schema).matcher()
        return matcher.consume_tokens(tok.encode_ordinary(text)) and matcher.is_accepting()
    assert not accepts(outside) and accepts(inside)
    jsonschema.validate(json.loads(inside), schema)


@pytest.mark.parametrize("schema, outside, inside", [
    ({"type": "integer", "minimum": 0, "maximum": 1, "exclusiveMinimum": True}, "0", "1"),
    ({"type": "number", "maximum": 5, "exclusiveMaximum": True}, "5", "4.5"),
    ({"type": "number", "minimum": 2, "exclusiveMinimum": False}, "1.5", "2"),  # (inclusive, as 2020-12's)
    ({"type": "object", "properties": {"p": {"type": "integer", "minimum": 3, "exclusiveMinimum": True}},
      "required": ["p"]}, '{"p":3}', '{"p":4}'),
])
def test_draft_4_exclusive_flags_are_enforced_as_draft_4_means_them(tok, schema, outside, inside):
    """A tester's (helper-123): llguidance reads only 2020-12's exclusive bounds, so draft 4's
    ``exclusiveMinimum: true`` beside ``minimum: 0`` was ignored and 0 answered; then (helper-127)
    refused with advice that mis-said ``false``. The flags are read as draft 4 means them."""
    def accepts(text):
        matcher = compile_schema(tok, schema).matcher()
        return matcher.consume_tokens(tok.encode_ordinary(text)) and matcher.is_accepting()
    assert not accepts(outside) and accepts(inside)
    jsonschema.Draft4Validator(schema).validate(json.loads(inside))
    assert not jsonschema.Draft4Validator(schema).is_valid(json.loads(outside))


# -- whole replies, fuzzed: the answer validates or the reply says it was cut
@st.composite
def answer_schema(draw):
    """The closing fuzz's schemas, under keywords that combine them: anyOf, $ref to $defs,
    const, nullable types, exclusive bounds."""
    inner = draw(schema_and_instance())[0]
    kind = draw(st.sampled_from(["plain", "anyOf", "ref", "const", "nullable", "exclusive"]))
    if kind == "anyOf":
        inner = {"anyOf": [inner, draw(schema_and_instance())[0]]}
    elif kind == "ref":
        return {"type": "object", "properties": {"x": {"$ref": "#/$defs/x"}}, "required": ["x"],
                "$defs": {"x": inner}}
    elif kind == "const":
        inner = {"const": draw(st.sampled_from(["on", 3, None, {"k": [1, "é"]}]))}
    elif kind == "nullable":
        inner = {"type": [draw(st.sampled_from(["string", "integer", "number", "boolean"])), "null"]}
    elif kind == "exclusive":
        inner = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": draw(st.sampled_from([0.5, 1, 100]))}
    return {"type": "object", "properties": {"x": inner}, "required": ["x"], "additionalProperties": False}


@settings(max_examples=18, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(schema=answer_schema(), seed=st.integers(0, 2**16), max_tokens=st.integers(8, 90),
       budget=st.sampled_from([None, 0, 1, 5, 10**9]))
def test_random_model_replies_over_schemas(tok, tiny, schema, seed, max_tokens, budget):
    """Any schema of these, any seed, small max_tokens, any reasoning budget: a reply that
    ends (or was closed early to fit: finish "length") has an answer valid against the schema;
    one cut by max_tokens otherwise had too little room."""
    grammar = compile_schema(tok, schema)
    constraint = HarmonyConstraint(tok, answer=grammar, reasoning_budget=budget, max_tokens=max_tokens)
    fmt = harmony.ResponseFormat("answer", schema)
    out, finish = generate(tiny, prompt_for(tok, formats=[fmt]), constraint, seed, max_tokens)
    assert finish == "stop" or finish == "length" and (out[-1] != SPECIAL_TOKENS[RETURN] or constraint.cut_short)
    if out[-1] == SPECIAL_TOKENS[RETURN]:
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
                                        ).validate(json.loads(final_text(tok, out)))
    else:
        assert finish == "length" and max_tokens < 20 + 2 * grammar.min_tokens
