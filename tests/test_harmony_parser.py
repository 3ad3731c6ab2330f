"""The streaming parser on hostile input: it never raises, never drops text and never invents
it, over harmony-shaped sequences (headers, channels, recipients, constrain, special tokens in
every position) with the real tokenizer; and the header cases that used to go wrong."""

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import TOKENIZER_JSON
from gptoss_mlx.harmony import ContentDelta, StreamParser, parse_completion
from gptoss_mlx.tokenizer import load_tokenizer
from harmony_shapes import account, harmony_sequences

if not TOKENIZER_JSON.exists():
    pytest.skip(f"real tokenizer not found at {TOKENIZER_JSON}", allow_module_level=True)
TOK = load_tokenizer(TOKENIZER_JSON)


def encode(s):
    return TOK.encode(s, allowed_special="all")


def parse(s, role="assistant"):
    return parse_completion(encode(s), TOK, role)


# 2000 sequences take about 10 s on one CI core: enough to meet every special token in every
# state many times over (tests/fuzz_harmony.py runs 20,000 with counts).
@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(harmony_sequences(TOK))
def test_parser_never_raises_loses_or_invents_text(case):
    tokens, role = case
    parser = StreamParser(TOK, role)
    events = [e for t in tokens for e in parser.feed(t)] + parser.finish()
    lost, invented = account(TOK, tokens, parser.messages)
    assert (lost, invented) == ("", "")
    deltas = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert deltas == "".join(m.content for m in parser.messages)
    assert parser.state == "expect_start"


def test_a_token_that_is_no_int_is_refused_and_the_parser_goes_on():
    """A tester's (helper-146): feed("x") raised, and kept the "x": every later feed raised again."""
    parser = StreamParser(TOK, "assistant")
    for bad in ("x", 1.5, None):
        with pytest.raises(TypeError, match="feed\\(\\) takes one token id"):
            parser.feed(bad)
    events = [e for t in encode("<|channel|>final<|message|>hi") for e in parser.feed(t)] + parser.finish()
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "hi"


def test_tool_role_without_a_name_is_text():
    (msg,) = parse("<|start|>tool<|end|>", role=None)
    assert (msg.role, msg.content) == ("assistant", "tool")


@pytest.mark.parametrize("header", ["", "tool", " to=assistant<|channel|>commentary"])
def test_tool_role_given_without_a_name_keeps_the_text(header):
    parser = StreamParser(TOK, role="tool")
    tokens = encode(header) + [200008] + encode("sunny, 20 C") + [200007]
    events = [e for t in tokens for e in parser.feed(t)] + parser.finish()
    (msg,) = parser.messages
    assert msg.content.endswith("sunny, 20 C") and msg.role == "assistant"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == msg.content


def test_tool_role_given_with_its_name():
    (msg,) = parse("functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>", role="tool")
    assert (msg.role, msg.name, msg.channel, msg.content) == ("tool", "functions.get_weather", "commentary", "sunny")


def test_two_recipients_stay_text():
    (msg,) = parse("<|channel|>commentary to=functions.a to=functions.b<|message|>{}<|call|>")
    assert not msg.is_tool_call
    assert msg.content == "to=functions.a to=functions.b {}"


@pytest.mark.parametrize("word", ["hello", "functions.get_weather", "python"])
def test_stray_header_word_is_not_a_hidden_tool_call(word):
    (msg,) = parse(f"<|channel|>final {word}<|message|>The answer.<|return|>")
    assert (msg.channel, msg.recipient, msg.is_tool_call) == ("final", None, False)
    assert msg.content == f"{word} The answer."


def test_builtin_tool_messages_parse():
    call, result = parse("<|start|>assistant to=python<|channel|>analysis code<|message|>print(1)<|call|>"
                         "<|start|>python to=assistant<|channel|>analysis<|message|>1<|end|>", role=None)
    assert (call.recipient, call.channel, call.content_type, call.content) == ("python", "analysis", "code", "print(1)")
    assert (result.role, result.name, result.recipient, result.content) == ("tool", "python", "assistant", "1")


def test_ids_outside_the_vocabulary_do_not_raise():
    messages = parse_completion(encode("<|channel|>final<|message|>a") + [-1, 201088, 2**40], TOK)
    assert messages[0].content.startswith("a")


@pytest.mark.parametrize("reply, expected", [
    # (channel, recipient, content_type, content) of the one message
    ('<|channel|>commentary to=functions.w <|constrain|>json{"city":"SF"}<|call|>',
     ("commentary", "functions.w", "<|constrain|>json", '{"city":"SF"}')),
    ('<|channel|>commentary to=functions.w <|constrain|>json {"city": "S  F"}<|call|>',
     ("commentary", "functions.w", "<|constrain|>json", '{"city": "S  F"}')),
    ('<|channel|>commentary to=functions.w {"city": "SF"}<|call|>', ("commentary", "functions.w", None, '{"city": "SF"}')),
    ("<|channel|>analysis to=python print(1 + 2)<|call|>", ("analysis", "python", None, "print(1 + 2)")),
    ("<|channel|>analysis to=python code print(1)<|call|>", ("analysis", "python", "code", "print(1)")),
    (" to=python<|channel|>analysis code print(1)<|call|>", ("analysis", "python", "code", "print(1)")),
    (' to=functions.w<|channel|>commentary {"a": 1}<|call|>', ("commentary", "functions.w", None, '{"a": 1}')),
    ('<|channel|>final <|constrain|>json{"a": 1}<|return|>', ("final", None, "<|constrain|>json", '{"a": 1}')),
    ('<|channel|>final <|constrain|> json{"a": 1}<|return|>', ("final", None, "<|constrain|>json", '{"a": 1}')),
    ('<|channel|>commentary to=functions.w <|constrain|> json{"a": 1}<|call|>',
     ("commentary", "functions.w", "<|constrain|>json", '{"a": 1}')),
    ("<|channel|>final I can't <|constrain|>json<|return|>", ("final", None, None, "I can't  json")),
    # only <|call|> makes a call, and only of a header that starts with its recipient
    ('<|channel|>commentary to=functions.w <|constrain|>json{"a":1}<|end|>',
     ("commentary", None, None, 'to=functions.w  json{"a":1}')),
    ("<|channel|>final Sure to=python print(6*7)<|return|>", ("final", None, None, "Sure to=python print(6*7)")),
    ("<|channel|>final Sure to=python print(6*7)<|call|>", ("final", None, None, "Sure to=python print(6*7)")),
    ("Run to=python print(1)<|end|>", (None, None, None, "Run to=python print(1)")),
    ("<|channel|>analysis Hmm to=python<|end|>", ("analysis", None, None, "Hmm to=python")),
    ('<|channel|>final Answer: to=functions.w {"city":1}<|return|>',
     ("final", None, None, 'Answer: to=functions.w {"city":1}')),
    ("<|channel|>final <|constrain|>The answer is 4<|return|>", ("final", None, None, "The answer is 4")),
])
def test_a_header_without_its_message_token_keeps_what_follows_as_the_message(reply, expected):
    """The model sometimes forgets <|message|> (harmony#80): the arguments of
    ``to=functions.w <|constrain|>json{...}<|call|>`` went into the content type and the call
    ran with none, and ``final <|constrain|>json{...}`` showed the token's name in the answer."""
    (msg,) = parse(reply)
    assert (msg.channel, msg.recipient, msg.content_type, msg.content) == expected


def test_a_space_after_the_constrain_token_keeps_json_the_content_type():
    """``<|constrain|> json`` (a space the model wrote) moved "json" into the arguments:
    ``json {}`` did not parse and the call failed."""
    (msg,) = parse("<|channel|>commentary to=functions.f <|constrain|> json<|message|>{}<|call|>")
    assert (msg.recipient, msg.content_type, msg.content) == ("functions.f", "<|constrain|>json", "{}")


@pytest.mark.parametrize("reply", [
    "<|start|>assistant<|channel|>final<|message|>hi<|return|>",
    "<|start|><|channel|>final<|message|>hi<|return|>",
    "<|start|>assistant<|start|>assistant<|channel|>final<|message|>hi<|return|>",
    # the re-attack's: a header of a role alone ended by a stop token, or an empty channel
    "<|start|><|end|><|start|>assistant<|channel|>final<|message|>hi<|return|>",
    "<|start|>assistant<|end|><|start|>assistant<|channel|>final<|message|>hi<|return|>",
    "<|end|><|start|>assistant<|channel|>final<|message|>hi<|return|>",
    "<|start|>assistant<|channel|><|start|>assistant<|channel|>final<|message|>hi<|return|>",
])
def test_a_start_written_again_before_any_header_is_no_message(reply):
    """The prompt ends with <|start|>assistant; a model that wrote <|start|> again gave an empty
    assistant message with no channel first, which Chat kept and rendered into every later
    prompt as <|start|>assistant<|message|><|end|> (openai_harmony gives the one message)."""
    (msg,) = parse(reply)
    assert (msg.role, msg.channel, msg.content) == ("assistant", "final", "hi")


def test_a_recipient_holding_another_special_token_is_no_call():
    """(A re-attack: such a call's result could not be added under its name.)"""
    (msg,) = parse("<|channel|>commentary to=functions.f<|reserved_200017|><|message|>{}<|call|>")
    assert msg.recipient is None and msg.content.startswith("to=functions.f<|reserved_200017|>")


@pytest.mark.parametrize("reply", [
    "<|channel|>commentary<|reserved_200017|> to=functions.f<|message|>{}<|call|>",
    "<|channel|>commentary to=functions.f <|constrain|>json<|reserved_200017|><|message|>{}<|call|>",
])
def test_another_special_token_in_a_header_is_no_content_type(reply):
    """A reserved token after a call's recipient became its content type: written into the next
    prompt's header, and the chat saved with it did not load again (a content type holds no
    special token). It stays in the message's text, where the model reads it as text."""
    from gptoss_mlx.harmony import from_chat_completions, system_message, to_chat_completions
    from gptoss_mlx.harmony import Message

    (msg,) = parse(reply)
    assert (msg.recipient, msg.content_type) == ("functions.f", None) and "<|reserved_200017|>" in msg.content
    saved = to_chat_completions([system_message("low", "2025-01-01"), Message("user", "x"), msg])
    assert from_chat_completions(saved, date="2025-01-01")[-1] == msg
