"""Chat: events, effort switch, history without earlier reasoning, save/load; and the CLI
driven through standard input and a scripted REPL session."""

import io
import json
import subprocess
import sys

import pytest

from gptoss_mlx.cli.chat import Repl
from gptoss_mlx.store import ConversationStore
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


def test_repl_commands(chat, tmp_path):
    lines = iter(["/effort high", "/reasoning hide", "2+2?", "/stats", f"/save {tmp_path}/s.json",
                  "/reset", f"/load {tmp_path}/s.json", "/bogus", '"""multi', 'line"""', "/exit"])
    out = io.StringIO()
    store = ConversationStore(tmp_path / "data")
    assert Repl(chat, store, lambda prompt="": next(lines), out=out).run() == 0
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
