"""Structured outputs through the server: response_format (json_object, json_schema),
text.format, forced function calls, the reasoning budget, and errors, driven with OpenAI's
client against the tiny random model (whose reasoning never ends by itself)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from gptoss_mlx.loading import load
from test_server import client, serving
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
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PET)
    assert r.usage.completion_tokens <= 100


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
    assert isinstance(json.loads(content), dict) and reasoning


def test_responses_text_format(api):
    r = api.responses.create(model="gpt-oss-tiny", input="A pet, as JSON.", max_output_tokens=90,
                             text={"format": {"type": "json_schema", "name": "pet", "schema": PET}},
                             extra_body={"reasoning_budget": 10, "seed": 1})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PET)
    assert [item.type for item in r.output][-1] == "message"


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
    tool = {"type": "function", "function": {"name": "f", "parameters": unique}}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5, tools=[tool])
    assert "function 'f'" in e.value.message and e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5,
                                    extra_body={"reasoning_budget": -1})
    assert e.value.body["param"] == "reasoning_budget"


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


def test_a_function_name_no_header_can_carry_is_a_400(api):
    """tool_choice forced a call to "get weather": it came back as a call to "get" with free
    text for arguments. Now a 400 naming the function; the server goes on serving."""
    tool = {"type": "function", "function": {"name": "get weather", "parameters": WEATHER.parameters}}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=30, tools=[tool],
                                    tool_choice={"type": "function", "function": {"name": "get weather"}})
    assert "'get weather'" in e.value.message and e.value.body["param"] == "tools"
    r = api.chat.completions.create(model="gpt-oss-tiny", messages=USER, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
