"""Dev check: render tool namespaces with our harmony and with OpenAI's openai-harmony package
and print every difference. openai-harmony is not a dependency; install it beside the project:

    pip install --target /tmp/ohlib openai-harmony
    PYTHONPATH=/tmp/ohlib TIKTOKEN_ENCODINGS_BASE=../shared/data python tests/compare_openai_harmony.py

(``TIKTOKEN_ENCODINGS_BASE`` names a directory holding ``o200k_base.tiktoken``, so nothing is
downloaded.)
"""

from __future__ import annotations

import sys

import openai_harmony as oh

from gptoss_mlx import harmony

NUMBERS = [1e-6, 1e20, 0.5, 3, -1, 1.0, 100.0, 1e16, 1e15, 123456789.125, 2.5e-5, 0.1, 1e21, 1e-7]
SCHEMAS = {
    f"default {n!r}": {"type": "object", "properties": {"x": {"type": "number", "default": n}}}
    for n in NUMBERS
} | {
    "defaults of other types": {"type": "object", "properties": {
        "b": {"type": "boolean", "default": True}, "s": {"type": "string", "default": "hi"},
        "e": {"type": "string", "enum": ["a", "b"], "default": "a"}, "n": {"default": None},
        "l": {"type": "array", "default": [1, "x"]}, "d": {"type": "object", "default": {"k": 1.5}}}},
    "enum default inside oneOf": {"type": "object", "properties": {"unit": {"oneOf": [
        {"type": "string", "enum": ["c", "f"], "default": "c"}, {"type": "number", "default": 2.0}]}}},
    "oneOf with descriptions": {"type": "object", "properties": {"v": {
        "description": "pick", "default": "z",
        "oneOf": [{"type": "string", "description": "pick"}, {"type": "number", "description": "n"}]}}},
    "nested, nullable, arrays": {"type": "object", "required": ["o"], "properties": {
        "o": {"type": "object", "description": "inner", "properties": {"k": {"type": "integer"}}},
        "t": {"type": ["string", "null"]}, "a": {"type": "array", "items": {"type": "number"}},
        "m": {"type": "string", "nullable": True}, "x": {"title": "T", "examples": ["e"]}}},
    "property description with line breaks": {"type": "object", "properties": {
        "g": {"type": "string", "description": "one\ntwo\r\nthree\rfour\u2028five"}}},
    "no properties": {"type": "object", "properties": {}},
    "enum default in a oneOf of array items": {"type": "object", "properties": {"u": {
        "type": "array", "items": {"oneOf": [{"type": "string", "enum": ["a"], "default": "a"},
                                             {"type": "number", "default": 1e-6}]}}}},
    "oneOf property with an enum default": {"type": "object", "properties": {"u": {
        "default": "a", "oneOf": [{"type": "string", "enum": ["a", "b"]}, {"type": "number"}]}}},
    "nested float default, key order": {"type": "object", "properties": {"u": {
        "type": "object", "default": {"b": 1, "a": [0.5, 1e20]},
        "properties": {"v": {"type": "number", "default": 1e-6}}}}},
}
DESCRIPTIONS = ["one line", "two\nlines", "crlf\r\nline", "cr\ronly", "sep\u2028line", "trailing\n",
                "\nleading", "blank\n\nline"]


def ours(name: str, description: str, parameters) -> str:
    dev = harmony.Message("developer", harmony.DeveloperContent(
        None, [harmony.ToolSpec(name, description, parameters)]))
    return harmony.segments_to_text(harmony.render_conversation([dev], for_completion=False))


def theirs(enc, name: str, description: str, parameters) -> str:
    dev = oh.DeveloperContent.new().with_function_tools(
        [oh.ToolDescription.new(name, description, parameters=parameters)])
    conv = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)])
    return enc.decode(enc.render_conversation(conv))


def conversation(lib, enc=None) -> str:
    """A tool-calling turn, rendered without dropping analysis (the two differ there on purpose:
    see ``drop_earlier_analysis``)."""
    tool_calls = [("commentary", "functions.get_weather", "<|constrain|>json", '{"city":"Paris"}', '{"t":21}'),
                  ("analysis", "python", "code", "print(1)", "1")]
    if lib is harmony:
        msgs = [harmony.Message("user", "hi"), harmony.Message("assistant", "think", channel="analysis"),
                harmony.Message("assistant", "Checking.", channel="commentary")]
        for channel, recipient, ctype, args, result in tool_calls:
            msgs += [harmony.Message("assistant", args, channel=channel, recipient=recipient, content_type=ctype),
                     harmony.Message("tool", result, channel=channel, recipient="assistant", name=recipient)]
        msgs.append(harmony.Message("assistant", "done", channel="final"))
        return harmony.segments_to_text(harmony.render_conversation(msgs, auto_drop_analysis=False))
    a = oh.Role.ASSISTANT
    msgs = [oh.Message.from_role_and_content(oh.Role.USER, "hi"),
            oh.Message.from_role_and_content(a, "think").with_channel("analysis"),
            oh.Message.from_role_and_content(a, "Checking.").with_channel("commentary")]
    for channel, recipient, ctype, args, result in tool_calls:
        msgs.append(oh.Message.from_role_and_content(a, args).with_channel(channel)
                    .with_recipient(recipient).with_content_type(ctype))
        msgs.append(oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, recipient), result)
                    .with_recipient("assistant").with_channel(channel))
    msgs.append(oh.Message.from_role_and_content(a, "done").with_channel("final"))
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    return enc.decode(enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), a, config))


def main() -> int:
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    cases = [(label, "f", "Does f.", schema) for label, schema in SCHEMAS.items()]
    cases += [(f"tool description {d!r}", "f", d, None) for d in DESCRIPTIONS]
    differ = 0
    for label, name, desc, schema in cases:
        a, b = ours(name, desc, schema), theirs(enc, name, desc, schema)
        if a != b:
            differ += 1
            print(f"DIFFERS: {label}\n  ours:   {a!r}\n  theirs: {b!r}")
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.HIGH)
    system = system.with_conversation_start_date("2025-06-28")
    system = system.with_tools(oh.ToolNamespaceConfig.browser()).with_tools(oh.ToolNamespaceConfig.python())
    conv = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.SYSTEM, system)])
    ours_system = harmony.segments_to_text(harmony.render_conversation(
        [harmony.system_message("high", "2025-06-28", browser=True, python=True)], for_completion=False))
    if ours_system != enc.decode(enc.render_conversation(conv)):
        differ += 1
        print("DIFFERS: system message with the browser and python tools")
    if conversation(harmony) != conversation(oh, enc):
        differ += 1
        print("DIFFERS: a tool-calling conversation (preamble, function and python calls, results)")
    print(f"{len(cases) + 2} cases, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
