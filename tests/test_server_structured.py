"""Structured outputs through the server: response_format (json_object, json_schema),
text.format, forced function calls, the reasoning budget, and errors, driven with OpenAI's
client against the tiny random model (whose reasoning never ends by itself)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from gptoss_mlx.loading import load
from scripted import ScriptedModel
from test_server import answer, call, client, script, serving, tok  # noqa: F401 - tok: a fixture
from test_structured import PET, WEATHER

USER = [{"role": "user", "content": "Describe a pet as JSON."}]
WEATHER_TOOL = {"type": "function", "function": {"name": WEATHER.name, "description": WEATHER.description,
                                                 "parameters": WEATHER.parameters}}


@pytest.fixture(scope="module")
def api(tiny_checkpoint):
    with serving(*load(tiny_checkpoint)) as url:
        yield client(url)


def pet_format(name="pet"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": PET, "strict": True}}


@pytest.mark.parametrize("seed", range(3))
def test_chat_completions_json_schema(api, seed):
    r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, response_format=pet_format(),
                                    max_tokens=100, seed=seed, extra_body={"reasoning_budget": 6 * seed})
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), PET)
    else:  # cut by max_tokens (a random model's strings run on): cut, as OpenAI's, not closed early
        assert choice.finish_reason == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice.message.content)
    assert r.usage.completion_tokens <= 100


def test_chat_completions_answers_a_small_schema_whole(api):
    """A schema whose instances are short: the answer ends by itself, valid."""
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
            "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(3):
        r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=100, seed=seed,
                                        response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": flag}},
                                        extra_body={"reasoning_budget": 8})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), flag)


def test_chat_completions_json_object_streamed(api):
    """Without a reasoning budget: what is left of max_tokens opens the answer in time."""
    stream = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, stream=True, seed=4,
                                         response_format={"type": "json_object"}, max_tokens=60)
    content, reasoning = "", ""
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
    assert content.lstrip().startswith("{") and reasoning  # the answer was opened in time


def test_responses_text_format(api):
    r = api.responses.create(model="gpt-oss-tiny", input="A pet, as JSON.", max_output_tokens=90,
                             text={"format": {"type": "json_schema", "name": "pet", "schema": PET}},
                             extra_body={"reasoning_budget": 10, "seed": 1})
    assert [item.type for item in r.output][-1] == "message"
    if r.status == "completed":
        jsonschema.validate(json.loads(r.output_text), PET)
    else:  # cut by max_output_tokens: said, and not valid JSON that the SDK's responses.parse
        # would take as a whole answer
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.output[-1].status == "incomplete"
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.output_text)


@pytest.mark.parametrize("seed", range(2))
def test_forced_function_call_arguments_validate(api, seed):
    r = api.chat.completions.create(
        model="gpt-oss-tiny", messages=USER, tools=[WEATHER_TOOL], max_tokens=50, seed=seed,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER.parameters)


def test_unenforceable_schemas_are_400s_naming_them(api):
    unique = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": unique}})
    assert "uniqueItems" in e.value.message and e.value.body["param"] == "response_format"
    tool = {"type": "function", "function": {"name": "f", "parameters": unique, "strict": True}}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5, tools=[tool])
    assert "function 'f'" in e.value.message and e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:  # the Responses API's default: strict
        api.responses.create(model="gpt-oss-tiny", input="hi", max_output_tokens=5,
                             tools=[{"type": "function", "name": "f", "parameters": unique}])
    assert "function 'f'" in e.value.message and e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5,
                                    extra_body={"reasoning_budget": -1})
    assert e.value.body["param"] == "reasoning_budget"


@pytest.mark.parametrize("name, code", [(None, "missing_required_parameter"), ("", "invalid_value"),
                                        ("my schema", "invalid_value"), ("x" * 65, "invalid_value"),
                                        ("a\n## Instructions", "invalid_value")])
def test_a_json_schema_needs_a_name_as_openais_api_does(api, name, code):
    """A json_schema without a name was taken (named "response"), and a name with spaces or
    newlines went into the developer message's heading as it was: OpenAI's API refuses both."""
    schema = {"type": "object"}
    named = {} if name is None else {"name": name}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5,
                                    response_format={"type": "json_schema", "json_schema": {**named, "schema": schema}})
    assert (e.value.body["param"], e.value.body["code"]) == ("response_format.json_schema.name", code)
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input="hi", max_output_tokens=5,
                             text={"format": {"type": "json_schema", **named, "schema": schema}})
    assert (e.value.body["param"], e.value.body["code"]) == ("text.format.name", code)
    assert "text.format.name" in e.value.body["message"]
    api.responses.create(model="gpt-oss-tiny", input="hi", max_output_tokens=5,  # and the right one is taken
                         text={"format": {"type": "json_schema", "name": "A-b_9", "schema": schema}})


def test_a_tool_that_is_not_strict_is_called_with_an_object_where_its_schema_cannot_be_held(api, caplog):
    """One tool whose schema uses `not` (zod's z.never()), a look-around pattern or uniqueItems
    failed the whole request with a 400, though the model might never call it and the client
    said strict: false (Chat Completions' default). Such a tool is now given to the model and
    its calls are held to a JSON object only; the log says so. (Left wholly free, a forced
    call's arguments were any text, which no client parses: a tester's, helper-157.)"""
    odd = {"type": "object", "properties": {"path": {"type": "string", "pattern": "^(?!/etc).*$"},
                                            "never": {"not": {}}}}
    tools = [WEATHER_TOOL, {"type": "function", "function": {"name": "read_file", "parameters": odd}}]
    with caplog.at_level("INFO", logger="gptoss_mlx"):
        r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5, tools=tools)
        s = api.responses.create(model="gpt-oss-tiny", input="hi", max_output_tokens=5, tools=[
            {"type": "function", "name": "read_file", "parameters": odd, "strict": False}])
    assert r.choices[0].finish_reason == "length" and s.status == "incomplete"
    assert "its calls are held to a JSON object only, not to its parameters (strict is false)" in caplog.text
    invalid = {"type": "object", "properties": {"x": {"type": "wat"}}, "required": ["x"]}
    for parameters in (odd, invalid, {"type": "object", "properties": {"p": {"$ref": "#/$defs/nope"}}}):
        forced = api.chat.completions.create(
            model="gpt-oss-tiny", messages=USER, max_tokens=200, tool_choice="required", seed=3,
            tools=[{"type": "function", "function": {"name": "read_file", "parameters": parameters}}])
        (call,) = forced.choices[0].message.tool_calls  # (cut by max_tokens or not: an object)
        assert call.function.arguments.startswith("{"), call.function.arguments
        if forced.choices[0].finish_reason == "tool_calls":
            assert isinstance(json.loads(call.function.arguments), dict)


@pytest.mark.parametrize("parameters, ok", [
    ({"properties": {"query": {"type": "string"}}, "required": ["query"]}, True),
    ({"type": "string"}, False), ({"type": ["object", "null"]}, False), ({"type": ["object"]}, True)])
def test_a_functions_calls_are_json_objects(api, parameters, ok):
    """A tool schema without "type" (MCP tools') let a forced call's arguments be any JSON:
    '474000160058331941038896', which LangChain refused. Such a schema is an object's; one
    of another type is a 400 (OpenAI's rule), strict or not."""
    tool = {"type": "function", "function": {"name": "search", "parameters": parameters}}
    ask = dict(model="gpt-oss-tiny", messages=USER, tools=[tool], max_tokens=200, seed=0,
               tool_choice={"type": "function", "function": {"name": "search"}})
    if not ok:
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(**ask)
        assert 'the schema\'s type must be "object"' in e.value.message and e.value.body["param"] == "tools"
        return
    r = api.chat.completions.create(**ask)
    [made] = r.choices[0].message.tool_calls
    if r.choices[0].finish_reason == "tool_calls":
        assert isinstance(json.loads(made.function.arguments), dict)
    else:
        assert made.function.arguments.lstrip().startswith("{")


def test_reasoning_closed_by_the_budget_is_counted(api):
    """The tiny model writes its reasoning without a header; closed by the reasoning budget it
    came back as reasoning, counted as 0 reasoning tokens (its tokens were a header's)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    for budget in (4, 8, 16):
        r = api.responses.create(model="gpt-oss-tiny", input="hello there", max_output_tokens=60,
                                 text={"format": {"type": "json_schema", "name": "a", "schema": schema}},
                                 extra_body={"reasoning_budget": budget, "seed": 0})
        assert [i.type for i in r.output] == ["reasoning", "message"]
        assert budget <= r.usage.output_tokens_details.reasoning_tokens <= budget + 1 < r.usage.output_tokens
        c = api.chat.completions.create(model="gpt-oss-tiny", messages=[{"role": "user", "content": "hello there"}],
                                        max_tokens=60, response_format={"type": "json_object"}, seed=0,
                                        extra_body={"reasoning_budget": budget})
        assert c.choices[0].message.reasoning_content
        assert budget <= c.usage.completion_tokens_details.reasoning_tokens <= budget + 1


def test_a_cut_answer_is_reported_as_cut(api):
    """max_tokens below the smallest answer: finish_reason length, status incomplete."""
    r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, response_format=pet_format(),
                                    max_tokens=10, seed=0)
    assert r.choices[0].finish_reason == "length"
    r = api.responses.create(model="gpt-oss-tiny", input="A pet.", max_output_tokens=10,
                             text={"format": {"type": "json_schema", "name": "pet", "schema": PET}})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_stop_strings_cannot_cut_a_json_answer(api):
    """A stop string would cut the JSON (finish_reason "stop" on '{'): refused with a 400
    naming 'stop', and the server goes on answering."""
    for fmt in (pet_format(), {"type": "json_object"}):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="gpt-oss-tiny", messages=USER, response_format=fmt,
                                        stop=['"', "}"], max_tokens=60, seed=1)
        assert e.value.body["param"] == "stop" and "response_format" in e.value.message
    r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, stop=["}"], max_tokens=5,
                                    response_format={"type": "text"})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_responses_schema_errors_name_text_format(api):
    """The Responses API's schema lives in text.format: its 400 names that field."""
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input="A pet.", max_output_tokens=10, text={"format": {
            "type": "json_schema", "name": "pet", "schema": {"type": "array", "uniqueItems": True}}})
    assert "uniqueItems" in e.value.message and e.value.body["param"] == "text.format"
    # and its message names it too, not Chat Completions' response_format
    assert e.value.body["message"].startswith("text.format 'pet': "), e.value.body["message"]
    # a schema of the wrong shape (a tester's: named response_format and 'input' here, and
    # 'messages' in Chat Completions)
    bad = {"type": "object", "required": "a"}
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input="A pet.", max_output_tokens=10, text={"format": {
            "type": "json_schema", "name": "pet", "schema": bad}})
    assert e.value.body["param"] == "text.format" and e.value.body["message"].startswith("text.format.schema.required")
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=10, response_format={
            "type": "json_schema", "json_schema": {"name": "pet", "schema": bad}})
    assert e.value.body["param"] == "response_format"


@pytest.mark.parametrize("fmt, says", [
    ({"type": "json_schema", "name": "pet"}, "needs its 'schema'"),
    ({"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}, "not nested in 'json_schema'"),
    ({"type": "json_schema", "name": "pet", "schema": PET, "strict": "yes"}, "'strict' must be true or false")])
def test_responses_text_format_the_schema_would_not_constrain_is_a_400(api, fmt, says):
    """Chat Completions' nesting, or no schema at all, in text.format left the answer free
    without a word: a 400 naming text.format and the Responses shape."""
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input="A pet.", max_output_tokens=8, text={"format": fmt})
    assert e.value.body["param"] == "text.format" and says in e.value.body["message"]


@pytest.mark.parametrize("schema", [True, None, "abc"])
def test_a_schema_that_is_not_an_object_is_named_as_such(api, schema):
    """A schema of true, null or a string beside 'name' was told it was missing or nested
    ("needs its 'schema' (an object) beside 'name', not nested in 'json_schema'"); in Chat
    Completions, only the list of formats."""
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input="A pet.", max_output_tokens=8, text={"format": {
            "type": "json_schema", "name": "pet", "schema": schema}})
    assert e.value.body["param"] == "text.format.schema"
    assert e.value.body["message"] == f"'text.format.schema' must be a JSON Schema object, got {json.dumps(schema)}"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "pet", "schema": schema}})
    assert e.value.body["param"] == "response_format"
    assert "response_format.json_schema.schema must be a JSON Schema object" in e.value.body["message"]


def test_unanchored_patterns_are_enforced_as_searches(api):
    """A JSON Schema pattern matches anywhere in the string: 'abc' was refused as having no
    instance; now its answers hold it."""
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "abc", "maxLength": 12}},
              "required": ["code"], "additionalProperties": False}
    for seed in range(2):
        r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, seed=seed, max_tokens=60,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "c", "schema": schema}},
                                        extra_body={"reasoning_budget": 4})
        assert "abc" in json.loads(r.choices[0].message.content)["code"]


def test_a_function_name_no_header_can_carry_is_a_400(api):
    """tool_choice forced a call to "get weather": it came back as a call to "get" with free
    text for arguments. Now a 400 naming the function; the server goes on serving."""
    tool = {"type": "function", "function": {"name": "get weather", "parameters": WEATHER.parameters}}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=30, tools=[tool],
                                    tool_choice={"type": "function", "function": {"name": "get weather"}})
    assert "'get weather'" in e.value.message and e.value.body["param"] == "tools[0].function.name"
    r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5)
    assert r.choices[0].finish_reason == "length"


# -- tool_choice "required": the model reasons, then calls one of the functions, of its choice

PET_TOOL = {"type": "function", "function": {"name": "describe_pet", "description": "Describe a pet",
                                             "parameters": PET}}
SCHEMAS = {WEATHER.name: WEATHER.parameters, "describe_pet": PET}


def required_chat(api, seed: int, stream: bool, **extra) -> tuple[str, list[tuple[str, str]], int]:
    """(finish_reason, the calls as (name, arguments), completion tokens) of a reply under
    tool_choice "required", streamed or not."""
    ask = dict(model="gpt-oss-tiny", messages=USER, tools=[WEATHER_TOOL, PET_TOOL], tool_choice="required",
               max_tokens=120, seed=seed, **extra)
    if not stream:
        r = api.chat.completions.create(**ask)
        calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]
        return r.choices[0].finish_reason, calls, r.usage.completion_tokens
    calls, finish, usage = {}, None, None
    for chunk in api.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            name, arguments = calls.get(delta.index, ("", ""))
            calls[delta.index] = (name + (delta.function.name or ""), arguments + (delta.function.arguments or ""))
        finish = chunk.choices[0].finish_reason if chunk.choices else finish
    return finish, list(calls.values()), usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_always_calls_a_function_with_valid_arguments(api, stream):
    """A call, always; its arguments valid, or cut by max_tokens (finish "length", arguments
    that do not parse): never closed early into a shorter call that would."""
    names, finishes = set(), []
    for seed in range(4):
        finish, calls, used = required_chat(api, seed, stream)
        assert finish in ("tool_calls", "length") and len(calls) == 1 and used <= 120, (seed, finish, calls)
        name, arguments = calls[0]
        if finish == "tool_calls":
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        else:
            with pytest.raises(json.JSONDecodeError):
                json.loads(arguments)
        names.add(name)
        finishes.append(finish)
    assert names == set(SCHEMAS)  # the model chose which (both, over these seeds)
    assert "tool_calls" in finishes


def test_required_tool_choice_within_a_reasoning_budget(api):
    r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, tools=[WEATHER_TOOL, PET_TOOL],
                                    tool_choice="required", max_tokens=400, seed=0,
                                    extra_body={"reasoning_budget": 8})
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.usage.completion_tokens_details.reasoning_tokens <= 8 + 1  # + the <|end|> that closed it
    [call] = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_in_the_responses_api(api, stream):
    tools = [{"type": "function", **t["function"]} for t in (WEATHER_TOOL, PET_TOOL)]
    for seed in range(2):
        ask = dict(model="gpt-oss-tiny", input="Describe a pet.", tools=tools, tool_choice="required",
                   max_output_tokens=120, extra_body={"seed": seed})
        if stream:  # (the SDK's get_final_response() wants response.completed, not .incomplete)
            ends = [e.response for e in api.responses.create(**ask, stream=True)
                    if e.type in ("response.completed", "response.incomplete")]
            r = ends[-1]
        else:
            r = api.responses.create(**ask)
        assert r.output[-1].type == "function_call", (seed, r.output)
        if r.status == "completed":
            jsonschema.validate(json.loads(r.output[-1].arguments), SCHEMAS[r.output[-1].name])
        else:  # cut by max_output_tokens: said, and not a call that parses
            assert r.incomplete_details.reason == "max_output_tokens" and r.output[-1].status == "incomplete"
            with pytest.raises(json.JSONDecodeError):
                json.loads(r.output[-1].arguments)
        assert all(item.type == "reasoning" for item in r.output[:-1])


def test_required_tool_choice_keeps_the_models_own_call_and_turns_an_answer_into_one(tok):
    """A model that calls a function under "required" makes its call as it would anyway; one
    that would answer instead has its reasoning kept and its answer replaced by a call."""
    arguments = '{"location": "Oslo", "unit": "celsius"}'
    replies = [call(tok, "Need the weather.", "get_weather", arguments), answer(tok, "Easy.", "It is sunny.")]
    with serving(ScriptedModel(replies), tok) as url:
        ask = dict(model="gpt-oss-tiny", messages=USER, tools=[PET_TOOL, WEATHER_TOOL], tool_choice="required",
                   max_tokens=200, temperature=0)
        calling, answering = (client(url).chat.completions.create(**ask) for _ in replies)
    assert calling.choices[0].message.reasoning_content == "Need the weather."
    [made] = calling.choices[0].message.tool_calls
    assert (made.function.name, made.function.arguments) == ("get_weather", arguments)
    message = answering.choices[0].message
    assert answering.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.reasoning_content == "Easy."
    [made] = message.tool_calls
    jsonschema.validate(json.loads(made.function.arguments), SCHEMAS[made.function.name])


SHELL_TOOL = {"type": "function", "function": {"name": "run_shell", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}
COMMAND = '{"command": "rm -rf /var/cache/build ; mkdir output && cp important.txt backup/"}'


@pytest.mark.parametrize("max_tokens", [14, 20, 26, 32])
def test_a_call_cut_by_max_tokens_is_never_a_shorter_call(tok, max_tokens):
    """Near max_tokens the arguments were closed early into a shorter, valid call reported as
    complete: `{"command":"rm -rf /"}` (finish "tool_calls", status "completed"), which agent
    frameworks ran. A call cut by max_tokens is now cut: finish "length", the response and
    the item incomplete, and arguments that do not parse."""
    replies = [script(tok, f"<|channel|>commentary to=functions.run_shell <|constrain|>json<|message|>{COMMAND}<|call|>")]
    with serving(ScriptedModel(replies), tok) as url:
        api = client(url)
        chat = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, tools=[SHELL_TOOL],
                                           max_tokens=max_tokens, temperature=0)
        response = api.responses.create(model="gpt-oss-tiny", input="Clean up.", max_output_tokens=max_tokens,
                                        tools=[{"type": "function", **SHELL_TOOL["function"]}], temperature=0)
    choice = chat.choices[0]
    assert choice.finish_reason == "length"
    for arguments in [c.function.arguments for c in choice.message.tool_calls or []]:
        assert COMMAND.startswith(arguments)
        with pytest.raises(json.JSONDecodeError):
            json.loads(arguments)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    for item in response.output:
        assert item.status == "incomplete" and COMMAND.startswith(item.arguments)


VERDICT = {"type": "object", "properties": {"verdict": {"type": "string"}}, "required": ["verdict"],
           "additionalProperties": False}


@pytest.mark.parametrize("max_tokens", [8, 12, 16])
def test_an_answer_cut_by_max_tokens_is_cut_not_a_shorter_valid_one(tok, max_tokens):
    """An answer closed early to fit max_tokens was valid JSON with another meaning ("...planted
    by"), which the openai SDK's responses.parse and LangChain took as the whole answer (only
    the status said incomplete). The server's answers are cut as OpenAI's are: not valid JSON."""
    text = '{"verdict": "not guilty because evidence was planted by an officer"}'
    replies = [script(tok, f"<|channel|>final<|message|>{text}<|return|>")]
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": VERDICT}}
    with serving(ScriptedModel(replies), tok) as url:
        api = client(url)
        chat = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, response_format=fmt,
                                           max_tokens=max_tokens, temperature=0)
        response = api.responses.create(model="gpt-oss-tiny", input="Verdict?", max_output_tokens=max_tokens,
                                        temperature=0, text={"format": {"type": "json_schema", "name": "v",
                                                                        "schema": VERDICT}})
        whole = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, response_format=fmt,
                                            max_tokens=60, temperature=0)
    assert chat.choices[0].finish_reason == "length" and text.startswith(chat.choices[0].message.content)
    assert response.status == "incomplete" and text.startswith(response.output_text)
    for cut in (chat.choices[0].message.content, response.output_text):
        with pytest.raises(json.JSONDecodeError):
            json.loads(cut)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].message.content == text


def test_allowed_tools_show_and_let_the_model_call_only_those_listed(api):
    """tool_choice ``allowed_tools`` (agent frameworks send it to narrow a long tool list for one
    turn): the prompt holds only the listed functions (as many tokens as a request that declares
    those alone), and under mode ``required`` every call is to one of them; both APIs' shapes."""
    both = [WEATHER_TOOL, PET_TOOL]
    alone = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, tools=[PET_TOOL], max_tokens=1)
    listed = api.chat.completions.create(
        model="gpt-oss-tiny", messages=USER, tools=both, max_tokens=1,
        tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
            {"type": "function", "function": {"name": "describe_pet"}}]}})
    assert listed.usage.prompt_tokens == alone.usage.prompt_tokens
    for seed in range(2):
        r = api.chat.completions.create(
            model="gpt-oss-tiny", messages=USER, tools=both, max_tokens=120, seed=seed,
            tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                {"type": "function", "function": {"name": WEATHER.name}}]}})
        calls = r.choices[0].message.tool_calls
        assert calls and {c.function.name for c in calls} == {WEATHER.name}, (seed, r.choices[0])
    tools = [{"type": "function", **t["function"]} for t in both]
    r = api.responses.create(model="gpt-oss-tiny", input="Describe a pet.", tools=tools, max_output_tokens=120,
                             tool_choice={"type": "allowed_tools", "mode": "required",
                                          "tools": [{"type": "function", "name": "describe_pet"}]})
    assert r.output[-1].type == "function_call" and r.output[-1].name == "describe_pet"
    assert r.tool_choice.type == "allowed_tools"  # echoed as sent


@pytest.mark.parametrize("choice, param, says", [
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "nope"}]},
     "tool_choice.tools[0]", '"nope", which is not in \'tools\''),
    ({"type": "allowed_tools", "mode": "sometimes", "tools": [{"type": "function", "name": "describe_pet"}]},
     "tool_choice.mode", '"sometimes"'),
    ({"type": "allowed_tools", "tools": [{"type": "function", "name": "describe_pet"}]},  # OpenAI's needs it
     "tool_choice.mode", "got null"),
    ({"type": "allowed_tools", "mode": "auto", "tools": []}, "tool_choice.tools", "1 to 1,024 tools"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "web_search"}]}, "tool_choice.tools[0]",
     "must be {\"type\": \"function\", \"name\": ...}"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "describe_pet",
                                                           "function": {"name": "nope"}}]},
     "tool_choice.tools[0]", "must be"),  # two names: which one?
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "describe_pet"}}]}},  # Chat Completions' shape
     "tool_choice.allowed_tools", "'tool_choice.allowed_tools' is not a field"),
    ({"type": "allowed_tools", "mode": "auto", "junk": 1, "tools": [{"type": "function", "name": "describe_pet"}]},
     "tool_choice.junk", "'tool_choice.junk' is not a field"),
    ({"type": "function", "function": {"name": "describe_pet"}},  # Chat Completions' named function
     "tool_choice", 'must be {"type": "function", "name": ...}'),
    ({"type": "function", "name": "describe_pet", "x": 1}, "tool_choice", "must be"),
    ({"type": "web_search_preview"}, "tool_choice", 'tool_choice {"type": "web_search_preview"} is not supported'),
])
def test_allowed_tools_that_cannot_be_followed_are_a_400_naming_the_field(api, choice, param, says):
    tools = [{"type": "function", **t["function"]} for t in (WEATHER_TOOL, PET_TOOL)]
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input="hi", tools=tools, tool_choice=choice)
    assert says in e.value.message and e.value.body["param"] == param


def test_allowed_tools_in_chat_completions_shape_errors_name_its_fields(api):
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, tools=[WEATHER_TOOL, PET_TOOL],
                                    tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
                                        {"type": "function", "name": "describe_pet"}]}})  # the Responses API's entry
    assert e.value.body["param"] == "tool_choice.allowed_tools.tools[0]"
    assert '{"type": "function", "function": {"name": ...}}' in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, tools=[WEATHER_TOOL, PET_TOOL],
                                    tool_choice={"type": "allowed_tools"})
    assert e.value.body["param"] == "tool_choice.allowed_tools"
    for choice, param, says in [
        ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "function": {"name": "describe_pet"}}]},
         "tool_choice.allowed_tools", "under 'allowed_tools'"),  # the Responses API's shape
        ({"type": "allowed_tools", "z": 1, "allowed_tools": {"mode": "auto", "tools": [
            {"type": "function", "function": {"name": "describe_pet"}}]}}, "tool_choice.z", "'tool_choice.z'"),
        ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "z": 1, "tools": [
            {"type": "function", "function": {"name": "describe_pet"}}]}},
         "tool_choice.allowed_tools.z", "'tool_choice.allowed_tools.z'"),
        ({"type": "function", "name": "describe_pet"}, "tool_choice",  # the Responses API's named function
         'must be {"type": "function", "function": {"name": ...}}'),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="gpt-oss-tiny", messages=USER, tools=[WEATHER_TOOL, PET_TOOL],
                                        tool_choice=choice)
        assert says in e.value.message and e.value.body["param"] == param, (choice, e.value.body)


def test_a_field_nested_900_deep_is_echoed_and_stored_not_a_500(api):
    """The JSON parser takes up to 1,000 levels; sizing the stored response recursed past
    Python's limit and a 500 (a cut stream when streamed) came after the reply was made."""
    deep = 1
    for _ in range(900):
        deep = {"a": deep}
    r = api.responses.create(model="gpt-oss-tiny", input=[{"role": "user", "content": "hi", "x": deep}],
                             max_output_tokens=4)
    assert r.status == "incomplete" and api.responses.retrieve(r.id).id == r.id


def test_required_tool_choice_needs_tools(api):
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, tool_choice="required")
    assert "'required'" in e.value.message and e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input="hi", tool_choice="required",
                             tools=[{"type": "web_search"}])  # no function among them
    assert "'required'" in e.value.message and e.value.body["param"] == "tool_choice"


def test_the_answers_and_a_strict_calls_header_words_never_reach_the_client(tok):
    """Text the grammar never held reached clients as a normal answer: an answer addressed
    ``to=all`` (not constrained, yet returned: "Sure! Here:" then the JSON), words before the
    final channel ("Sure {...}"), a header that ended without <|message|> (its text as the
    answer), and a strict call's stray header word as the start of its arguments."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    answers = [' to=all<|channel|>final<|message|>Sure! Here:<|end|><|start|>assistant<|channel|>final<|message|>{"a": "y"}<|return|>',
               ' Sure<|channel|>final<|message|>{"a": "y"}<|return|>',
               '<|channel|> final<|constrain|>json{"b": "x"}<|end|>{"a": "y"}<|return|>']
    arguments = '{"location": "Oslo", "unit": "celsius"}'
    calling = f"<|channel|>commentary to=functions.get_weather <|constrain|>json args<|message|>{arguments}<|call|>"
    model = ScriptedModel([script(tok, a) for a in answers] + [script(tok, calling)] * 2)
    with serving(model, tok) as url:
        c = client(url)
        for _ in answers:
            r = c.chat.completions.create(model="gpt-oss-tiny", messages=USER, response_format=fmt, max_tokens=80)
            content = r.choices[0].message.content
            # (a scripted model whose token was masked writes on at random: the grammar's JSON, cut)
            assert content.startswith("{") and (r.choices[0].finish_reason == "length"
                                                or jsonschema.validate(json.loads(content), schema) is None)
        weather = [{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}]
        r = c.chat.completions.create(model="gpt-oss-tiny", messages=USER, tools=weather, max_tokens=80)
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == json.loads(arguments)
        tools = [{"type": "function", **WEATHER_TOOL["function"]}]  # (strict by default here)
        r = c.responses.create(model="gpt-oss-tiny", input="weather?", tools=tools, max_output_tokens=80)
        assert json.loads(r.output[-1].arguments) == json.loads(arguments)


@pytest.mark.parametrize("phase", ["preamble", 3, ""])
def test_an_input_messages_phase_is_one_of_openais(api, phase):
    """``phase`` tells a preamble (commentary) from the answer (final_answer); another value was
    taken without a word (helper-158)."""
    history = [{"role": "user", "content": "hi"},
               {"type": "message", "role": "assistant", "phase": phase,
                "content": [{"type": "output_text", "text": "Hello."}]},
               {"role": "user", "content": "again"}]
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input=history, max_output_tokens=4)
    assert "input[1].phase must be one of 'commentary', 'final_answer'" in e.value.message
    for ok in ("commentary", "final_answer", None):
        history[1]["phase"] = ok
        assert api.responses.create(model="gpt-oss-tiny", input=history, max_output_tokens=4).status == "incomplete"


def test_top_p_0_is_taken_as_openai_takes_it_the_likeliest_token_alone(api):
    """OpenAI takes top_p from 0 to 1; 0 was a 400 here (helper-154). It keeps the likeliest token
    alone: the reply is the greedy one, and the response echoes 0."""
    greedy = api.responses.create(model="gpt-oss-tiny", input="hi", max_output_tokens=12, temperature=0)
    for seed in (1, 2):
        r = api.responses.create(model="gpt-oss-tiny", input="hi", max_output_tokens=12, top_p=0,
                                 extra_body={"seed": seed})
        assert r.top_p == 0 and r.output_text == greedy.output_text and r.output_text
    c = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=12, top_p=0)
    g = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=12, temperature=0)
    assert (c.choices[0].message.content, c.choices[0].message.model_extra.get("reasoning_content")) == \
        (g.choices[0].message.content, g.choices[0].message.model_extra.get("reasoning_content"))


def test_an_input_item_with_neither_type_nor_role_says_so(api):
    with pytest.raises(openai.BadRequestError) as e:
        api.responses.create(model="gpt-oss-tiny", input=[{"content": "hi"}], max_output_tokens=4)
    assert "input[0] has neither a 'type' nor a 'role'" in e.value.message and "None" not in e.value.message
