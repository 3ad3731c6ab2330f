"""Rendering on bad input (one HarmonyError naming the message and field, never TypeError or
RecursionError), the chain of thought of completed turns, and tool-schema text as harmony
writes it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_mlx.harmony import (
    DeveloperContent, HarmonyError, Message, ResponseFormat, SystemContent, ToolSpec,
    from_chat_completions, render_conversation, render_message, segments_to_text, system_message,
)


def text(messages, **kw):
    return segments_to_text(render_conversation(messages, **kw))


def recursive_schema():
    schema = {"type": "object", "properties": {}}
    schema["properties"]["self"] = schema
    return schema


def deep_schema(levels):
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def dev(*functions, formats=()):
    return Message("developer", DeveloperContent(None, list(functions), list(formats)))


@pytest.mark.parametrize("message, field", [
    (Message("user", None), r"messages\[1\] \(user\): content must be a string, got None"),
    (Message("user", 5), r"messages\[1\] \(user\): content must be a string, got 5"),
    (Message("user", ["a"]), r"messages\[1\] \(user\): content must be a string, got list"),
    (Message("assistant", "x", channel=5), r"messages\[1\] \(assistant\): channel"),
    (Message("assistant", "x", recipient=["f"]), r"messages\[1\] \(assistant\): recipient"),
    (Message("developer", DeveloperContent(instructions=3)), r"messages\[1\] \(developer\): instructions"),
    (dev(ToolSpec("f", None)), r"messages\[1\] \(developer\): functions\[0\].description"),
    (dev(ToolSpec(5, "")), r"functions\[0\].name"),
    (dev(ToolSpec("f", "", [1, 2])), r"functions\[0\].parameters must be a JSON Schema object, got list"),
    (dev(ToolSpec("f", "", recursive_schema())), r"functions\[0\].parameters: .* deeper than 32 levels .*, or contains itself"),
    (dev(ToolSpec("f", "", deep_schema(2000))), r"functions\[0\].parameters: .* deeper than"),
    (dev(ToolSpec("f", "", {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(6000)}})),
     r"functions\[0\].parameters: the JSON Schema has more than 10,000 JSON values"),
    (dev(ToolSpec("f", "", {"type": "object", "default": {1, 2}})), r"functions\[0\].parameters must be made of JSON values, got set"),
    (dev(formats=[ResponseFormat("r", recursive_schema())]), r"response_formats\[0\].schema: .* contains itself"),
    (Message("system", SystemContent(tools="browser")), r"messages\[1\] \(system\): tools must be a list"),
    ({"role": "user", "content": "hi"}, r"messages\[1\]: expected a harmony Message, got dict"),
])
def test_bad_input_is_one_harmony_error_naming_message_and_field(message, field):
    with pytest.raises(HarmonyError, match=field):
        render_conversation([Message("user", "hi"), message])


def test_changed_role_and_bad_message_list():
    msg = Message("user", "hi")
    msg.role = "wizard"
    with pytest.raises(HarmonyError, match="message: role must be one of"):
        render_message(msg)
    with pytest.raises(HarmonyError, match="messages must be a list"):
        render_conversation(None)


# ------------------------------------------------------------------ chain of thought
def turn(n):
    return [Message("user", f"q{n}"), Message("assistant", f"think{n}", channel="analysis"),
            Message("assistant", f"a{n}", channel="final")]


def test_every_completed_turn_drops_its_analysis():
    rendered = text([system_message()] + turn(1) + turn(2) + turn(3))
    assert "think" not in rendered
    assert all(f"a{n}<|end|>" in rendered for n in (1, 2, 3))


def test_turn_under_way_keeps_its_analysis_and_builtin_calls_go_with_it():
    history = [system_message(python=True)] + turn(1) + [
        Message("user", "compute"),
        Message("assistant", "use python", channel="analysis"),
        Message("assistant", "print(1)", channel="analysis", recipient="python", content_type="code"),
        Message("tool", "1", channel="analysis", recipient="assistant", name="python"),
    ]
    ongoing = text(history)
    assert "think1" not in ongoing
    assert "use python" in ongoing and "print(1)" in ongoing and ">1<|end|>" in ongoing
    done = text(history + [Message("assistant", "It is 1.", channel="final"), Message("user", "thanks")])
    assert "use python" not in done and "print(1)" not in done and "python to=assistant" not in done
    assert "It is 1." in done


# ------------------------------------------------------------------ tool schemas as harmony writes them
# Expected strings are openai-harmony 0.0.8's output (tests/compare_openai_harmony.py checks more).
def function_text(description, parameters):
    rendered = text([dev(ToolSpec("f", description, parameters))], for_completion=False)
    return rendered.split("namespace functions {\n\n")[1].split("\n\n} // namespace")[0]


@pytest.mark.parametrize("default, shown", [
    (1e-6, "1e-6"), (1e20, "1e20"), (2.5e-5, "0.000025"), (1e16, "1e16"), (1e15, "1000000000000000.0"),
    (3.0, "3.0"), (3, "3"), (-0.5, "-0.5"), ({"b": 1, "a": [1e-7]}, '{"b":1,"a":[1e-7]}'),
])
def test_number_defaults_as_harmony_prints_them(default, shown):
    schema = {"type": "object", "properties": {"x": {"type": "number", "default": default}}}
    assert function_text("F.", schema) == f"// F.\ntype f = (_: {{\nx?: number, // default: {shown}\n}}) => any;"


def test_enum_default_inside_one_of_is_quoted():
    schema = {"type": "object", "properties": {"u": {"type": "array", "items": {"oneOf": [
        {"type": "string", "enum": ["a"], "default": "a"}, {"type": "number"}]}}}}
    assert function_text("F.", schema) == (
        '// F.\ntype f = (_: {\nu?: \n     | "a" // default: "a"\n     | number[],\n}) => any;')


def test_enum_default_of_a_one_of_outside_a_property_is_json():
    """harmony writes a enum variant's string default there as JSON (escaped), unlike every
    other string default; ours wrote it as it is ("a"b")."""
    schema = {"type": "object", "properties": {"u": {"type": "array", "items": {"oneOf": [
        {"type": "string", "enum": ['a"b', "c"], "default": 'a"b'}, {"type": "string", "default": 'x"y'}]}}}}
    assert function_text("F.", schema) == (
        '// F.\ntype f = (_: {\nu?: \n     | "a"b" | "c" // default: "a\\"b"\n     | string // default: "x"y"[],\n}) => any;')


def test_description_lines_split_on_newline_only():
    assert function_text("a\nb\r\nc\rd\u2028e\n", None) == "// a\n// b\n// c\rd\u2028e\ntype f = () => any;"


# ------------------------------------------------------------------ tool schemas of the wrong shape
def tool_request(parameters):
    return {"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"function": {"name": "f", "parameters": parameters}}]}


@pytest.mark.parametrize("parameters, field", [
    ({"type": "object", "properties": [1]}, r"parameters.properties must be an object, got list"),
    ({"type": "object", "properties": {}, "required": 5}, r"parameters.required must be a list of strings, got 5"),
    ({"type": "object", "required": "ab"}, r"parameters.required must be a list of strings"),
    ({"type": "object", "properties": {"x": {"type": "string", "enum": 3}}},
     r"parameters.properties.x.enum must be a list, got 3"),
    ({"type": "object", "properties": {"x": {"type": "array", "items": 5}}},
     r"parameters.properties.x.items must be a JSON Schema object, got 5"),
    ({"type": "object", "properties": {"x": {"oneOf": [1]}}}, r"parameters.properties.x.oneOf\[0\] must be"),
    ({"oneOf": {"type": "string"}}, r"parameters.oneOf must be a list of schemas, got dict"),
    ({"anyOf": [{"type": 3}]}, r"parameters.anyOf\[0\].type must be a string or a list of strings, got 3"),
    ({"type": ["string", None]}, r"parameters.type must be a string or a list of strings"),
])
def test_tool_schema_of_the_wrong_shape_is_one_error_naming_tool_and_path(parameters, field):
    with pytest.raises(HarmonyError, match=r"tools\[0\] \(f\): " + field):
        from_chat_completions(tool_request(parameters))
    with pytest.raises(HarmonyError, match=r"functions\[0\]\." + field):
        render_conversation([Message("user", "hi"), dev(ToolSpec("f", "", parameters))])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
SCHEMA_KEYS = ("type", "properties", "required", "items", "enum", "anyOf", "oneOf", "allOf",
               "description", "title", "default", "examples", "nullable")
TYPE_NAMES = st.sampled_from(["object", "string", "array", "number", "integer", "boolean", "null"])


def schemas():
    """Schemas with any JSON value, a schema, a list or map of schemas, or a type name in
    every keyword position."""
    return st.recursive(JSON_VALUES, lambda inner: st.dictionaries(st.sampled_from(SCHEMA_KEYS), st.one_of(
        inner, TYPE_NAMES, st.lists(TYPE_NAMES, max_size=3), st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=3), inner, max_size=3)), max_size=5), max_leaves=20)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(schemas())
def test_any_tool_schema_renders_or_is_one_harmony_error(parameters):
    for build in (lambda: from_chat_completions(tool_request(parameters)),
                  lambda: [dev(ToolSpec("f", "", parameters), formats=[ResponseFormat("r", parameters)])]):
        try:
            text(build())
        except HarmonyError:
            pass
