"""Rendering on bad input (one HarmonyError naming the message and field, never TypeError or
RecursionError), the chain of thought of completed turns, and tool-schema text as harmony
writes it."""

import pytest

from gptoss_mlx.harmony import (
    DeveloperContent, HarmonyError, Message, ResponseFormat, SystemContent, ToolSpec,
    render_conversation, render_message, segments_to_text, system_message,
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
    (dev(ToolSpec("f", "", recursive_schema())), r"functions\[0\].parameters: .* deeper than 32 levels \(or contains itself\)"),
    (dev(ToolSpec("f", "", deep_schema(2000))), r"functions\[0\].parameters: .* deeper than"),
    (dev(ToolSpec("f", "", {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(6000)}})),
     r"functions\[0\].parameters: the JSON Schema has more than 10000 values"),
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


def test_description_lines_split_on_newline_only():
    assert function_text("a\nb\r\nc\rd\u2028e\n", None) == "// a\n// b\n// c\rd\u2028e\ntype f = () => any;"
