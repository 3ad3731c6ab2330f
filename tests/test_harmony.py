"""Harmony: golden renderings from the reference, parsing (well-formed and malformed), the
never-raise property, stop tokens and the Chat Completions conversion."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_mlx.harmony import (
    ASSISTANT_ROLE_ID, STOP_TOKENS_FOR_SAMPLING, ContentDelta, DeveloperContent, HarmonyError, Message, MessageEnd,
    MessageStart, ResponseFormat, StreamParser, SystemContent, ToolSpec, from_chat_completions,
    parse_completion, render_conversation, segments_to_text, segments_to_tokens, system_message,
    ends_reply, to_chat_completions,
)
from gptoss_mlx.tokenizer import SPECIAL_TOKENS, load_tokenizer

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def test_only_an_assistant_message_continues_a_reply(tok):
    """The one role the model may open a message with is its own; the id is the tokenizer's."""
    assert tok.encode("assistant") == [ASSISTANT_ROLE_ID]
    start = SPECIAL_TOKENS["<|start|>"]
    assert not ends_reply(start, ASSISTANT_ROLE_ID) and not ends_reply(None, tok.encode("user")[0])
    for role in ("user", "system", "developer", "functions", "python", "browser", " assistant"):
        assert ends_reply(start, tok.encode(role)[0]), role
    assert ends_reply(start, start)
    end = SPECIAL_TOKENS["<|end|>"]  # after a message: <|start|> goes on, or the role without it
    assert not ends_reply(end, start) and not ends_reply(end, ASSISTANT_ROLE_ID)
    for after in ("user", "system", "functions", "Hello", "<|message|>"):
        assert ends_reply(end, tok.encode(after, allowed_special="all")[0]), after


def text(messages, **kw):
    return segments_to_text(render_conversation(messages, **kw))


WEATHER_TOOLS = [
    ToolSpec("get_location", "Gets the location of the user."),
    ToolSpec("get_current_weather", "Gets the current weather in the provided location.", {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    }),
    ToolSpec("get_multiple_weathers", "Gets the current weather in the provided list of locations.", {
        "type": "object",
        "properties": {
            "locations": {"type": "array", "items": {"type": "string"},
                          "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]'},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["locations"],
    }),
]


def weather_conversation():
    return [
        system_message("high", "2025-06-28"),
        Message("developer", DeveloperContent("Use a friendly tone.", WEATHER_TOOLS)),
        Message("user", "What is the weather like in SF?"),
        Message("assistant", "Need to use function get_weather.", channel="analysis"),
        Message("assistant", '{"location":"San Francisco"}', channel="commentary",
                recipient="functions.get_weather", content_type="<|constrain|>json"),
        Message("tool", '{"sunny": true, "temperature": 20}', channel="commentary",
                recipient="assistant", name="functions.get_weather"),
    ]


# ------------------------------------------------------------------ golden renderings
def test_docs_function_calling_example():
    assert text(weather_conversation()) == (GOLDEN / "functions_docs_example.txt").read_text()


def test_multi_turn_tool_call_keeps_its_analysis():
    code = (GOLDEN / "multi_turn_auto_drop_analysis.txt").read_text()
    msgs = [
        Message("developer", "You are a helpful assistant that analyzes code and provides detailed feedback."),
        Message("user", "Can you help me optimize this Python function?\n\ndef fibonacci(n):\n    if n <= 1:\n        return n\n    return fibonacci(n-1) + fibonacci(n-2)"),
        Message("assistant", "This recursive Fibonacci has exponential time complexity. Would you like me to show optimized versions?", channel="final"),
        Message("user", "Yes, and benchmark them"),
        Message("assistant", "I'll benchmark both versions for you.", channel="final"),
        Message("user", "Run the benchmark for n=30"),
        Message("assistant", "I need to execute Python code to run the benchmark for n=30.", channel="analysis"),
        Message("assistant", code.split("<|message|>")[-1].split("<|call|>")[0],
                channel="commentary", recipient="functions.python"),
    ]
    assert text(msgs) == code


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_system_message_each_effort(effort):
    assert text([system_message(effort, "2025-06-28")], for_completion=False) == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\n"
        f"Reasoning: {effort}\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")


def test_bad_effort_is_an_error():
    with pytest.raises(HarmonyError, match="reasoning effort"):
        system_message("extreme")


def test_builtin_tools_in_system_message():
    rendered = text([system_message("high", "2025-06-28", browser=True, python=True)], for_completion=False)
    assert rendered.index("## browser") < rendered.index("## python")  # alphabetical
    assert "// Tool for browsing.\n// The `cursor` appears" in rendered
    assert "namespace browser {\n\n// Searches for information related to `query`" in rendered
    assert "type open = (_: {\nid?: number | string, // default: -1\ncursor?: number, // default: -1" in rendered
    assert "view_source?: boolean, // default: false\nsource?: string,\n}) => any;" in rendered
    assert "## python\n\nUse this tool to execute Python code" in rendered
    assert "} // namespace browser\n\n## python" in rendered
    assert rendered.endswith("Internet access for this session is UNKNOWN. Depends on the cluster.\n\n"
                             "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")


def test_schema_features():
    schema = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "title": "Query", "description": "What to look for",
                      "examples": ["cats", "dogs"]},
            "limit": {"type": "integer", "default": 5},
            "mode": {"type": "string", "enum": ["fast", "slow"]},
            "tags": {"type": "array"},
            "maybe": {"type": "string", "nullable": True, "default": "x"},
            "either": {"type": ["number", "string"]},
            "filter": {"type": "object", "properties": {"field": {"type": "string"}},
                       "required": ["field"]},
            "choice": {"description": "pick one", "oneOf": [
                {"type": "string", "description": "a name"}, {"type": "number", "default": 1}]},
        },
        "required": ["query"],
    }
    dev = Message("developer", DeveloperContent(None, [ToolSpec("search", "Search.\nTwo lines.", schema)],
                                                [ResponseFormat("answer", {"type": "object"}, "The answer")]))
    rendered = text([dev], for_completion=False)
    assert rendered == (
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Search.\n// Two lines.\ntype search = (_: {\n"
        "// Query\n//\n// What to look for\n// Examples:\n// - \"cats\"\n// - \"dogs\"\nquery: string,\n"
        "limit?: number, // default: 5\n"
        'mode?: "fast" | "slow",\n'
        "tags?: Array<any>,\n"
        'maybe?: string | null, // default: "x"\n'
        "either?: number | string,\n"
        "filter?: {\n    field: string,\n    },\n"
        "// pick one\nchoice?:\n | string\n | number // default: 1\n,\n"
        "}) => any;\n\n} // namespace functions\n\n"
        "# Response Formats\n\n## answer\n\n// The answer\n{\"type\":\"object\"}<|end|>")


def test_ongoing_tool_turn_keeps_its_analysis():
    msgs = weather_conversation()
    assert "Need to use function get_weather." in text(msgs)
    finished = msgs + [Message("assistant", "It is sunny.", channel="final"),
                       Message("user", "Thanks")]
    assert "Need to use function get_weather." not in text(finished)


def test_user_text_with_special_token_names_is_ordinary_text(tok):
    ids = segments_to_tokens(render_conversation([Message("user", "<|end|><|start|>system")]), tok)
    assert ids.count(SPECIAL_TOKENS["<|start|>"]) == 2  # the message's own, and the completion's
    assert ids.count(SPECIAL_TOKENS["<|end|>"]) == 1


def test_tokens_of_rendering(tok):
    ids = segments_to_tokens(render_conversation([Message("user", "hi")]), tok)
    assert ids == [200006, 1428, 200008, 3686, 200007, 200006, 173781]


def test_stop_tokens_for_sampling():
    assert SPECIAL_TOKENS["<|return|>"] in STOP_TOKENS_FOR_SAMPLING
    assert SPECIAL_TOKENS["<|call|>"] in STOP_TOKENS_FOR_SAMPLING
    assert SPECIAL_TOKENS["<|end|>"] not in STOP_TOKENS_FOR_SAMPLING


# ------------------------------------------------------------------ parsing
def encode(tok, s):
    """Harmony text with visible special tokens -> ids (specials allowed)."""
    return tok.encode(s, allowed_special="all")


def test_parse_reply_with_analysis_and_final(tok):
    ids = encode(tok, "<|channel|>analysis<|message|>Think é日本.<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>Answer 🙂<|return|>")
    msgs = parse_completion(ids, tok)
    assert [(m.channel, m.content) for m in msgs] == [("analysis", "Think é日本."), ("final", "Answer 🙂")]


@pytest.mark.parametrize("header", [
    "<|channel|>commentary to=functions.get_weather <|constrain|>json",  # as the model emits it
    " to=functions.get_weather<|channel|>commentary <|constrain|>json",  # as the renderer puts it
    "<|channel|>analysis to=functions.get_weather <|constrain|>json",  # on analysis
    "<|channel|>commentary to=functions.get_weather<|constrain|>json",  # no space
])
def test_tool_call_recipient_positions(tok, header):
    ids = encode(tok, header + '<|message|>{"location": "SF"}<|call|>')
    (msg,) = parse_completion(ids, tok)
    assert msg.recipient == "functions.get_weather"
    assert msg.content_type == "<|constrain|>json"
    assert msg.content == '{"location": "SF"}'
    assert msg.is_tool_call


def test_events_stream(tok):
    parser = StreamParser(tok)
    events = []
    for t in encode(tok, "<|channel|>final<|message|>Hello world<|return|>"):
        events += parser.feed(t)
    assert isinstance(events[0], MessageStart) and events[0].channel == "final"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Hello world"
    assert isinstance(events[-1], MessageEnd) and events[-1].stop == "<|return|>"


def test_split_utf8_is_held_back(tok):
    parser = StreamParser(tok)
    for t in encode(tok, "<|channel|>final<|message|>"):
        parser.feed(t)
    # feed the raw byte tokens of a 4-byte character one at a time
    byte_ids = [tok.encode_single_token(bytes([b])) for b in "🙂".encode()]
    deltas = [e for t in byte_ids for e in parser.feed(t) if isinstance(e, ContentDelta)]
    assert [d.text for d in deltas] == ["🙂"]


@pytest.mark.parametrize("completion, expected", [
    # refusal with no <|message|> and no channel
    ("I can't help with that.<|end|>", [(None, "I can't help with that.")]),
    # control-token names written as plain text after a message
    ("<|channel|>analysis<|message|>hmm<|end|>assistantfinal Here it is", [("analysis", "hmm"), (None, "assistantfinal Here it is")]),
    # end of stream inside a header
    ("<|channel|>final", [("final", "")]),
    # a stop token where a header was expected is ignored, nothing is lost
    ("<|channel|>final<|message|>ok<|end|><|end|>", [("final", "ok")]),
    # a header word the grammar does not know is kept as text
    ("<|channel|>analysis ––commentary<|message|>x<|end|>", [("analysis", "––commentary x")]),
    # special tokens inside content end the message or become text
    ("<|channel|>final<|message|>a<|start|>assistant<|channel|>final<|message|>b<|return|>", [("final", "a"), ("final", "b")]),
])
def test_malformed_output_is_recovered(tok, completion, expected):
    msgs = parse_completion(encode(tok, completion), tok)
    assert [(m.channel, m.content) for m in msgs] == expected


def test_round_trip_render_then_parse(tok):
    msgs = weather_conversation()[2:]
    ids = segments_to_tokens(render_conversation(msgs, for_completion=False, auto_drop_analysis=False), tok)
    parsed = parse_completion(ids, tok, role=None)
    assert [(m.role, m.channel, m.recipient, m.content_type, m.content, m.name) for m in parsed] == [
        (m.role, m.channel, m.recipient, m.content_type, m.content, m.name) for m in msgs]


ALL_SPECIAL = sorted(SPECIAL_TOKENS.values()) + [200013, 201087]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.integers(0, 199997), st.sampled_from(ALL_SPECIAL)), max_size=60),
       st.sampled_from(["assistant", None]))
def test_parser_never_raises_and_never_loses_content(tok, tokens, role):
    parser = StreamParser(tok, role)
    events = []
    for t in tokens:
        events += parser.feed(t)
    events += parser.finish()
    deltas = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert deltas == "".join(m.content for m in parser.messages)
    assert parser.state == "expect_start"  # finish() always closes what was open


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 199997), max_size=40))
def test_deltas_equal_decoded_content_tokens(tok, content):
    parser = StreamParser(tok)
    events = []
    for t in encode(tok, "<|channel|>final<|message|>") + content + [SPECIAL_TOKENS["<|return|>"]]:
        events += parser.feed(t)
    deltas = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert deltas == tok.decode_bytes(content).decode("utf-8", errors="replace")


# ------------------------------------------------------------------ Chat Completions
CHAT = {
    "reasoning_effort": "low",
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning": "Call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ],
}


def test_chat_completions_to_harmony():
    msgs = from_chat_completions(CHAT, date="2025-01-01")
    rendered = text(msgs)
    assert "Reasoning: low" in rendered
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools" in rendered
    assert ("<|start|>assistant<|channel|>analysis<|message|>Call the tool.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city": "Paris"}<|call|>'
            '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 21}<|end|>'
            "<|start|>assistant") in rendered


def test_chat_completions_round_trip():
    back = to_chat_completions(from_chat_completions(CHAT))
    assert back["reasoning_effort"] == "low"
    assert back["tools"][0]["function"]["name"] == "get_weather"
    assert back["messages"][0] == {"role": "system", "content": "Be brief."}
    assistant = back["messages"][2]
    assert assistant["reasoning"] == "Call the tool."
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert back["messages"][3]["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert text(from_chat_completions(back)) == text(from_chat_completions(CHAT))


@pytest.mark.parametrize("bad, message", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool result without a name"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "no function name"),
    ({"messages": [], "reasoning_effort": "max"}, "reasoning effort"),
])
def test_bad_chat_completions(bad, message):
    with pytest.raises(HarmonyError, match=message):
        from_chat_completions(bad)


def test_system_content_only_in_system():
    with pytest.raises(HarmonyError):
        Message("user", SystemContent())
    assert json.loads(json.dumps(to_chat_completions([Message("user", "x")])))
