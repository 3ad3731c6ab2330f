"""The Textual app, driven with Pilot: a scripted streaming chat (fast), and a tiny real model."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
from textual.widgets import Markdown, OptionList

from gptoss_mlx.chat import AnswerDelta, Chat, Done, ReasoningDelta, ToolCall
from gptoss_mlx.generate import SamplingParams, Stats
from gptoss_mlx.harmony import Message
from gptoss_mlx.tui import ChatApp, ConversationStore
from gptoss_mlx.tui.app import AssistantTurn, PromptInput, UserMessage

SIZE = (100, 32)


class FakeEngine:
    def __init__(self):
        self.max_context = 4096
        self.prompt_cache = SimpleNamespace(tokens=[])
        self.stats = Stats()


class ScriptedChat(Chat):
    """A Chat whose replies are scripted event lists: ("analysis" | "final", text),
    ("call", recipient, args), ("wait",) blocks until stop(), ("fail", message) raises."""

    def __init__(self, *replies, **kwargs):
        super().__init__(None, None, engine=FakeEngine(), **kwargs)
        self.replies = list(replies)
        self.efforts: list[str] = []

    def reply(self):
        self._stop = False
        self.efforts.append(self.reasoning_effort)
        script = self.replies.pop(0) if self.replies else [("final", "ok")]
        reasoning = answer = ""
        finish, new = "stop", []
        for step in script:
            if self._stop:
                finish = "interrupted"
                break
            time.sleep(0.002)
            kind = step[0]
            if kind == "wait":
                deadline = time.time() + 10
                while not self._stop and time.time() < deadline:
                    time.sleep(0.01)
            elif kind == "fail":
                raise RuntimeError(step[1])
            elif kind == "analysis":
                reasoning += step[1]
                yield ReasoningDelta(step[1])
            elif kind == "final":
                answer += step[1]
                yield AnswerDelta(step[1])
            elif kind == "call":
                new.append(Message("assistant", step[2], channel="commentary", recipient=step[1]))
                yield ToolCall(step[1], step[2], "commentary")
        if self._stop:
            finish = "interrupted"
        if reasoning and finish != "interrupted":
            new.insert(0, Message("assistant", reasoning, channel="analysis"))
        if answer:
            new.append(Message("assistant", answer, channel="final"))
        self.messages.extend(new)
        self.engine.prompt_cache.tokens += [0] * 40
        stats = Stats(prompt_tokens=30, reused_tokens=10, ttft_s=0.25, generated_tokens=21,
                      decode_s=0.5, peak_memory_gb=1.5, finish_reason=finish)
        yield Done(stats, finish, new)


async def wait_until(pilot, predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


@pytest.fixture
def store(tmp_path):
    return ConversationStore(tmp_path / "data")


def make_app(chat, store, **kwargs):
    return ChatApp(chat, model_name="gpt-oss-test", store=store, **kwargs)


async def send(pilot, app, text: str):
    done = app.replies_finished
    app.query_one(PromptInput).text = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.replies_finished == done + 1)
    await pilot.pause()


THOUGHT = [("analysis", "The user greets. "), ("analysis", "Answer briefly."),
           ("final", "Hello! "), ("final", "Here is code:\n\n```python\nprint('hi')\n```\n")]


async def test_reply_streams_reasoning_then_answer_and_folds_the_reasoning(store):
    chat = ScriptedChat(THOUGHT)
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "hello")
        assert [w.render().plain for w in app.query(UserMessage)] == ["hello"]
        turn = app.query_one(AssistantTurn)
        assert turn.reasoning_text == "The user greets. Answer briefly."
        assert turn.reasoning.collapsed  # folded when the answer began
        assert turn.reasoning.title == "Reasoning · 5 words"
        assert turn.query_one(".answer", Markdown).source.startswith("Hello! Here is code:")
        assert "```python" in turn.query_one(".answer", Markdown).source  # re-parsed at the end
        stats = turn.query_one(".stats").render().plain
        assert "21 tokens" in stats and "40.0 tok/s" in stats and "TTFT 0.25s" in stats
        status = app.query_one("#status").render().plain
        assert "effort medium" in status and "context 40/4096" in status and "peak 1.5 GB" in status
        await pilot.click(turn.reasoning.query_one("CollapsibleTitle"))  # re-opens on click
        assert not turn.reasoning.collapsed
    saved = list((store.root).glob("*.json"))
    assert len(saved) == 1
    data = json.loads(saved[0].read_text())
    assert data["title"] == "hello"
    assistant = [m for m in data["messages"] if m["role"] == "assistant"]
    assert assistant[-1]["content"].startswith("Hello!")
    assert "The user greets." in json.dumps(data)  # reasoning saved too


async def test_reasoning_can_stay_open_and_be_hidden_globally(store):
    app = make_app(ScriptedChat(THOUGHT), store, collapse_on_answer=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "hello")
        turn = app.query_one(AssistantTurn)
        assert not turn.reasoning.collapsed
        assert turn.reasoning.display and turn.reasoning.styles.display == "block"
        await pilot.press("ctrl+r")
        assert turn.has_class("-hide-reasoning")
        assert turn.reasoning.styles.display == "none"
        await pilot.press("ctrl+r")
        assert not turn.has_class("-hide-reasoning")


async def test_effort_switch_by_key_click_and_palette_applies_to_the_next_reply(store):
    chat = ScriptedChat([("final", "a")], [("final", "b")], [("final", "c")], [("final", "d")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "one")
        await pilot.press("ctrl+t")  # medium -> high
        assert app.effort == "high" and chat.reasoning_effort == "high"
        assert app.query_one("#effort-high").has_class("-active")
        await send(pilot, app, "two")
        await pilot.click("#effort-low")
        assert chat.reasoning_effort == "low"
        assert "effort low" in app.query_one("#status").render().plain
        await send(pilot, app, "three")
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        commands["Reasoning effort: medium"].callback()
        await send(pilot, app, "four")
    assert chat.efforts == ["medium", "high", "low", "medium"]


async def test_escape_stops_the_reply_and_keeps_the_session_and_the_prompt(store):
    chat = ScriptedChat([("analysis", "thinking"), ("final", "Partial ans"), ("wait",), ("final", "never")],
                        [("final", "next")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "long question"
        await pilot.press("enter")
        turn = app.query_one(AssistantTurn)
        await wait_until(pilot, lambda: turn.answer_text == "Partial ans")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert app.query_one(PromptInput).text == "long question"  # back, ready to edit
        assert "stopped" in turn.query_one(".stats").render().plain
        assert [m.text for m in chat.messages] == ["long question", "Partial ans"]
        await send(pilot, app, "go on")  # the session continues
        assert chat.messages[-1].text == "next"


async def test_multiline_input_and_prompt_history(store):
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert app.query_one(UserMessage).render().plain == "a\nb"
        assert prompt.text == ""
        await pilot.press("up")
        assert prompt.text == "a\nb"
        await pilot.press("down")  # cursor is on the last line: back to an empty prompt
        assert prompt.text == ""


async def test_tool_calls_show_as_expandable_rows(store):
    chat = ScriptedChat([("analysis", "need weather"), ("call", "functions.get_weather", '{"city": "Oslo"}')])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "weather?")
        row = app.query_one(".tool-call")
        assert row.title == "tool call · functions.get_weather"
        assert row.collapsed
        await pilot.click(row.query_one("CollapsibleTitle"))
        assert not row.collapsed
        assert '{"city": "Oslo"}' in row.query_one(".tool-args").render().plain


async def test_conversations_resume_rename_delete_and_export(store):
    first = ScriptedChat(THOUGHT)
    app = make_app(first, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "first chat")
        app.action_export()
        await pilot.press("ctrl+n")
        assert not app.query(AssistantTurn)
        await send(pilot, app, "second chat")
        entries = store.list()
        assert [e.title for e in entries] == ["second chat", "first chat"]
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("down", "r")
        await wait_until(pilot, lambda: app.screen.query("#value"))
        app.screen.query_one("#value").value = "Greetings"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        assert [e.title for e in store.list()] == ["second chat", "Greetings"]
        await pilot.press("enter")  # open "Greetings"
        await wait_until(pilot, lambda: app.chat_title == "Greetings")
        await pilot.pause(0.1)
        assert [w.render().plain for w in app.query(UserMessage)] == ["first chat"]
        turn = app.query_one(AssistantTurn)
        await wait_until(pilot, lambda: turn.answer_text.startswith("Hello!"))
        assert turn.reasoning.collapsed and turn.reasoning_text.startswith("The user greets.")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("d")
        await pilot.pause()
        assert [e.title for e in store.list()] == ["Greetings"]
    exported = list((store.root.parent / "exports").glob("*.md"))
    assert len(exported) == 1
    text = exported[0].read_text()
    assert "## User\n\nfirst chat" in text and "<details><summary>Reasoning</summary>" in text
    assert "```python\nprint('hi')\n```" in text


async def test_unreadable_saved_chat_is_listed_and_reported_not_fatal(store):
    store.root.mkdir(parents=True)
    (store.root / "broken.json").write_text("{not json")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        assert "unreadable" in store.list()[0].title
        app.open_conversation("broken")
        await pilot.pause()
        assert any("not a saved chat" in n.message for n in app._notifications)
        await send(pilot, app, "still works")


async def test_system_prompt_editing(store):
    chat = ScriptedChat()
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.query("#value"))
        app.screen.query_one("#value").text = "Answer in French."
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: chat.instructions == "Answer in French.")


async def test_copy_answer_and_code_block(store, monkeypatch):
    app = make_app(ScriptedChat(THOUGHT), store)
    copied = []
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "hello")
        await pilot.press("alt+c")
        app.action_copy_code()
    assert copied[0].startswith("Hello! Here is code:")
    assert copied[1] == "print('hi')\n"


async def test_a_failed_reply_is_a_notification_and_the_chat_survives(store):
    chat = ScriptedChat([("final", "part"), ("fail", "GPU fell over")], [("final", "fine")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "first")
        assert any("GPU fell over" in n.message for n in app._notifications)
        await send(pilot, app, "second")
        assert chat.messages[-1].text == "fine"


async def test_model_loading_shows_progress_and_errors_do_not_crash(store):
    release = threading.Event()

    def slow_failing_loader():
        release.wait(5)
        raise ValueError("checkpoint /nowhere not found: pass --model DIR")

    app = ChatApp(loader=slow_failing_loader, model_name="missing", store=store)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.query_one("#loading").display)
        assert "Loading the model" in app.query_one("#status").render().plain
        release.set()
        await wait_until(pilot, lambda: not app.query_one("#loading").display)
        assert any("not found" in n.message for n in app._notifications)
        assert "Could not load the model" in app.query_one(".error").render().plain
        app.query_one(PromptInput).text = "hi"
        await pilot.press("enter")  # no model: a warning, not a crash
        await pilot.pause()
        assert any("No model loaded" in n.message for n in app._notifications)


async def test_with_a_tiny_real_model(tokenizer_json, tmp_path, store):
    """The real stack: tiny random checkpoint, real tokenizer, real Chat and Engine."""
    import gzip
    import shutil

    import make_tiny_checkpoint as mtc
    from gptoss_mlx.loading import load

    ckpt = tmp_path / "ckpt"
    mtc.write_hf(ckpt, mtc.TINY, seed=1)  # the full vocabulary: every id the tokenizer makes
    with gzip.open(tokenizer_json) as src, open(ckpt / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    model, tokenizer = load(ckpt)
    chat = Chat(model, tokenizer, sampling=SamplingParams(temperature=0, max_tokens=12), date="2025-08-05")
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Hi there")
        await pilot.press("ctrl+t")
        await send(pilot, app, "Again")
        turns = list(app.query(AssistantTurn))
        assert len(turns) == 2
        for t in turns:
            stats = t.query_one(".stats").render().plain
            assert "tokens ·" in stats and "TTFT" in stats, stats
        assert chat.reasoning_effort == "high"
        assert "context" in app.query_one("#status").render().plain
    assert len(store.list()) == 1


# ---- snapshots (pytest-textual-snapshot; review with --snapshot-update) ---------------------------

def _snapshot_app(tmp_path, collapse: bool):
    script = [("analysis", "The user asks for a haiku about MLX. Keep it 5-7-5. "),
              ("analysis", "Mention Apple silicon."),
              ("final", "**Haiku**\n\nUnified memory —\nMetal threads hum in the dark,\ntokens fall like rain.\n")]
    app = ChatApp(ScriptedChat(script), model_name="gpt-oss-20b", store=ConversationStore(tmp_path),
                  collapse_on_answer=collapse)
    return app


async def _run_turn(pilot):
    app = pilot.app
    app.query_one(PromptInput).text = "Write a haiku about MLX"
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.replies_finished == 1)
    app.clear_notifications()
    await pilot.pause(0.2)


def test_snapshot_reply_with_reasoning_open(snap_compare, tmp_path):
    assert snap_compare(_snapshot_app(tmp_path, collapse=False), terminal_size=SIZE, run_before=_run_turn)


def test_snapshot_effort_switched_to_high(snap_compare, tmp_path):
    async def run_before(pilot):
        await _run_turn(pilot)
        await pilot.press("ctrl+t")
        pilot.app.clear_notifications()
        await pilot.pause(0.2)

    assert snap_compare(_snapshot_app(tmp_path, collapse=True), terminal_size=SIZE, run_before=run_before)


def test_snapshot_empty_chat(snap_compare, tmp_path):
    app = ChatApp(ScriptedChat(), model_name="gpt-oss-20b", store=ConversationStore(tmp_path))
    assert snap_compare(app, terminal_size=SIZE)
