"""Chat: events, effort switch, history without earlier reasoning, save/load; and the CLI
driven through standard input and a scripted REPL session."""

import io
import json
import subprocess
import sys

import pytest

from gptoss_mlx import commands
from gptoss_mlx.chat import AnswerDelta, Chat, ChatFileError, Done, ReasoningDelta, ToolCall
from gptoss_mlx.tokenizer import load_tokenizer
from scripted import ScriptedModel


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def script(tok, text):
    return tok.encode(text, allowed_special="all")


def reply_script(tok, reasoning, answer):
    return script(tok, f"<|channel|>analysis<|message|>{reasoning}<|end|>"
                       f"<|start|>assistant<|channel|>final<|message|>{answer}<|return|>")


@pytest.fixture()
def chat(tok):
    model = ScriptedModel([reply_script(tok, "Add them.", "4"),
                           reply_script(tok, "Double it.", "8")])
    return Chat(model, tok, reasoning_effort="low", date="2025-08-05")


def collect(events):
    events = list(events)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    return reasoning, answer, events[-1]


def test_turns_stream_reasoning_then_answer(chat):
    reasoning, answer, done = collect(chat.send("2+2?"))
    assert (reasoning, answer) == ("Add them.", "4")
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert done.stats.generated_tokens > 0
    reasoning, answer, _ = collect(chat.send("times 2?"))
    assert answer == "8"


def test_history_drops_earlier_reasoning_and_prompt_reuses_cache(chat, tok):
    collect(chat.send("2+2?"))
    assert "Add them." not in tok.decode(chat.prompt_tokens())
    assert [m.channel for m in chat.history] == [None, "final"]
    collect(chat.send("times 2?"))
    assert chat.engine.stats.reused_tokens > 0


def test_effort_change_applies_to_next_reply(chat, tok):
    assert "Reasoning: low" in tok.decode(chat.prompt_tokens())
    chat.reasoning_effort = "high"
    assert "Reasoning: high" in tok.decode(chat.prompt_tokens())
    with pytest.raises(ValueError):
        chat.reasoning_effort = "max"


def test_tool_call_event(tok):
    call = script(tok, '<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}<|call|>')
    chat = Chat(ScriptedModel([call]), tok, date="2025-08-05")
    events = list(chat.send("time?"))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("functions.get_time", "{}", "commentary")]
    assert events[-1].finish_reason == "stop"


def test_save_and_load_round_trip(chat, tmp_path, tok):
    collect(chat.send("2+2?"))
    path = chat.save(tmp_path / "chats" / "c.json")
    data = json.loads(path.read_text())
    assert data["messages"][-1] == {"role": "assistant", "content": "4", "reasoning": "Add them."}
    other = Chat(ScriptedModel([[0]]), tok)
    other.load(path)
    assert other.reasoning_effort == "low"
    assert tok.decode(other.prompt_tokens()) == tok.decode(chat.prompt_tokens())


def test_load_errors(chat, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ChatFileError, match="not a saved chat"):
        chat.load(bad)
    with pytest.raises(ChatFileError):
        chat.load(tmp_path / "missing.json")


def test_repl_commands(chat, tmp_path, monkeypatch):
    lines = iter(["/effort high", "/reasoning hide", "2+2?", "/stats", f"/save {tmp_path}/s.json",
                  "/reset", f"/load {tmp_path}/s.json", "/bogus", '"""multi', 'line"""', "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = io.StringIO()
    assert commands.Repl(chat, out=out).run() == 0
    text = out.getvalue()
    assert "reasoning effort: high" in text and "Add them." not in text
    assert "\n4\n" in text and "prompt tokens" in text
    assert "loaded 3 messages" in text  # user, reasoning, answer and "unknown command /bogus" in text
    assert chat.messages[-3].content == "multi\nline"


def test_cli_chat_from_stdin(tmp_path, tokenizer_json):
    import make_tiny_checkpoint as mtc
    ckpt = tmp_path / "tiny"
    mtc.write_hf(ckpt, mtc.TINY)
    mtc.copy_tokenizer(ckpt, tokenizer_json)
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "chat", "--model", str(ckpt), "--max-tokens", "12",
         "--seed", "0"], input="Hello?\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Loaded" in proc.stderr and proc.stdout.strip()  # a (random) answer on stdout


def test_cli_errors_are_clear(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gptoss_mlx", "chat", "--model", str(tmp_path / "nope")],
                          input="hi", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gptoss_mlx", "generate", "--model", "x", "-p", "hi",
                           "--top-p", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "top_p" in proc.stderr


# ------------------------------------------------------------------ resumed chats render as live ones
TOOL_TURN = [
    '<|channel|>analysis<|message|>Need the weather.<|end|>'
    '<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>'
    '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
    '<|message|>{"city": "Paris"}<|call|>',
    '<|channel|>analysis<|message|>Convert it.<|end|>'
    '<|start|>assistant<|channel|>analysis to=python code<|message|>print(21*9/5+32)<|call|>',
    '<|channel|>analysis<|message|>Done.<|end|>'
    '<|start|>assistant<|channel|>final<|message|>21 C (69.8 F).<|return|>',
    '<|channel|>analysis<|message|>Polite.<|end|>'
    '<|start|>assistant<|channel|>final<|message|>You are welcome.<|return|>',
]


def resumed(tok, chat, path):
    chat.save(path)
    other = Chat(ScriptedModel([[0]]), tok, python=True)
    other.load(path)
    return other


def test_resumed_chat_renders_token_for_token(tok, tmp_path):
    from gptoss_mlx.harmony import ToolSpec
    weather = ToolSpec("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})
    chat = Chat(ScriptedModel([script(tok, s) for s in TOOL_TURN]), tok, functions=[weather],
                python=True, reasoning_effort="high", date="2025-08-05")
    calls = [e for e in chat.send("Weather in Paris, in F?") if isinstance(e, ToolCall)]
    chat.add_tool_result("functions.get_weather", '{"temp": 21}', channel=calls[0].channel)
    ongoing = chat.prompt_tokens()
    assert resumed(tok, chat, tmp_path / "a.json").prompt_tokens() == ongoing
    assert "Need the weather." in tok.decode(ongoing)  # the turn under way keeps its reasoning
    calls = [e for e in chat.reply() if isinstance(e, ToolCall)]
    assert calls == [ToolCall("python", "print(21*9/5+32)", "analysis")]
    chat.add_tool_result("python", "69.8", channel="analysis")
    assert resumed(tok, chat, tmp_path / "b.json").prompt_tokens() == chat.prompt_tokens()
    list(chat.reply())
    list(chat.send("Thanks!"))
    final = chat.prompt_tokens()
    assert resumed(tok, chat, tmp_path / "c.json").prompt_tokens() == final
    rendered = tok.decode(final)
    assert "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" in rendered
    assert "Need the weather." not in rendered and "Polite." not in rendered
    assert "print(21*9/5+32)" not in rendered  # the built-in call went with its turn's analysis
    assert "to=functions.get_weather" in rendered and "21 C (69.8 F)." in rendered


def test_third_turn_drops_stale_reasoning_and_reuses_the_cache(tok):
    from gptoss_mlx.generate import common_prefix
    from gptoss_mlx.harmony import Message
    replies = [reply_script(tok, f"Think {n}.", f"Answer {n}.") for n in range(3)]
    chat = Chat(ScriptedModel(replies), tok, date="2025-08-05")
    collect(chat.send("one"))
    collect(chat.send("two"))
    cached = list(chat.engine.prompt_cache.tokens)  # prompt 2 and reply 2
    chat.messages.append(Message("user", "three"))
    prompt3 = chat.prompt_tokens()
    assert "Think" not in tok.decode(prompt3)  # not even turn 2's, which harmony's library keeps
    collect(chat.reply())
    reused = chat.engine.stats.reused_tokens
    assert reused == common_prefix(cached, prompt3)
    # reused right up to the dropped reasoning of turn 2: only the rest is computed again
    assert tok.decode(prompt3[reused:]).startswith("final<|message|>Answer 1.<|end|>")
