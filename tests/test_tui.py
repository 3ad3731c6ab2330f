"""The Textual app, driven with Pilot: a scripted streaming chat (fast), and a tiny real model."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from types import SimpleNamespace

import pytest
from textual.screen import ModalScreen
from textual.widgets import Markdown, OptionList, Static

from gptoss_mlx.cli.lineedit import input_history
from gptoss_mlx.chat import AnswerDelta, Chat, ContextTrimmed, Done, ReasoningDelta, ToolCall
from gptoss_mlx.generate import ContextLengthError, Engine, SamplingParams, Stats
from gptoss_mlx.harmony import Message
from gptoss_mlx.tools import Toolbox
from gptoss_mlx.tui import ChatApp, ConversationStore
from gptoss_mlx.tui.app import TYPE_AHEAD_S, AssistantTurn, PromptInput, UserMessage

SIZE = (100, 32)


class FakeEngine:
    def __init__(self):
        self.max_context = 4096
        self.prompt_cache = SimpleNamespace(tokens=[])
        self.stats = Stats()
        self.model = SimpleNamespace(expert_pool=None)


class ScriptedChat(Chat):
    """A Chat whose replies are scripted event lists: ("analysis" | "final", text), ("analysis",
    text, message index), ("call", recipient, args), ("wait",) blocks until stop() (("wait",
    seconds): and then as long again, a slow last token), ("fail", message) raises, and so does
    ("too long", message), as a ContextLengthError."""

    def __init__(self, *replies, **kwargs):
        super().__init__(None, None, engine=FakeEngine(), **kwargs)
        self.replies = list(replies)
        self.efforts: list[str] = []

    def prompt_tokens(self, messages=None):  # no tokenizer: ten tokens a message
        return [0] * 10 * len(self.messages if messages is None else messages)

    def _reply(self, ledger):
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
                time.sleep(step[1] if len(step) > 1 else 0)
            elif kind == "fail":
                raise RuntimeError(step[1])
            elif kind == "too long":
                raise ContextLengthError(step[1])
            elif kind == "analysis":
                reasoning += step[1]
                yield ReasoningDelta(step[1], "analysis", *step[2:])  # (a message's index: another message)
            elif kind == "final":
                answer += step[1]
                yield AnswerDelta(step[1])
            elif kind == "preamble":  # text to the user before a call, as a message of its own
                new.append(Message("assistant", step[1], channel="commentary"))
                yield AnswerDelta(step[1], "commentary", len(new))
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
        if finish == "interrupted":  # as Chat._reply: a send stopped with nothing kept is taken back
            ledger.take_back_unanswered()
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


async def send(pilot, app, text: str, timeout: float = 10.0):
    done = app.replies_finished
    app.query_one(PromptInput).text = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.replies_finished == done + 1, timeout)
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
        assert "effort medium" in status and "context 30/4096" in status and "peak 1.5 GB" in status  # 3 messages
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
        assert app.query_one(PromptInput).text == ""  # kept in the chat: not offered to send twice
        assert "stopped" in turn.query_one(".stats").render().plain
        assert [m.text for m in chat.messages] == ["long question", "Partial ans"]
        await send(pilot, app, "go on")  # the session continues
        assert chat.messages[-1].text == "next"


@pytest.mark.parametrize("answered", [True, False])
async def test_quitting_during_the_first_reply_saves_the_question_and_the_partial_answer(store, answered):
    """Quit (Ctrl+Q) while the first reply is written: the chat is saved with the question and
    the answer as far as it went; with no answer yet (stopped in its chain of thought, which
    the chat would take back), the question alone."""
    partial = [("final", "Partial ans")] if answered else []
    chat = ScriptedChat([("analysis", "thinking"), *partial, ("wait", 0.5), ("final", "never")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "hello there"
        await pilot.press("enter")
        turn = app.query_one(AssistantTurn)
        await wait_until(pilot, lambda: turn.reasoning_text == "thinking" and
                         ("Partial ans" in turn.answer_text or not answered))
        await pilot.press("ctrl+q")
        deadline = time.monotonic() + 10
        while app.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    (saved,) = store.root.glob("*.json")
    messages = json.loads(saved.read_text())["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", "hello there")] + (
        [("assistant", "Partial ans")] if answered else [])


async def test_escape_before_any_answer_takes_the_message_back_to_the_input_and_sends_it_once(store):
    """Esc in the chain of thought put the question back in the input and also kept it in the
    chat: sent again, the model saw it twice in a row. Nothing of that reply is kept, so the
    turn leaves the transcript and the chat, and only the input holds the question."""
    chat = ScriptedChat([("final", "hi")], [("analysis", "thinking"), ("wait",), ("final", "never")],
                        [("final", "42")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "first")
        app.query_one(PromptInput).text = "long question"
        await pilot.press("enter")
        turn = app.query(AssistantTurn).first()
        await wait_until(pilot, lambda: app.query(AssistantTurn).last().reasoning_text == "thinking")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 2)
        await pilot.pause(0.1)
        assert app.query_one(PromptInput).text == "long question"
        assert [m.render().plain for m in app.query(UserMessage)] == ["first"]
        assert len(app.query(AssistantTurn)) == 1 and turn.is_attached
        assert [m.text for m in chat.messages if m.role == "user"] == ["first"]
        await pilot.press("enter")  # sent again as it is
        await wait_until(pilot, lambda: app.replies_finished == 3)
        assert [m.text for m in chat.messages if m.role == "user"] == ["first", "long question"]
        assert chat.messages[-1].text == "42"
    (saved,) = store.root.glob("*.json")
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["first", "long question"]


async def test_a_first_message_stopped_before_the_reply_does_not_name_the_chat(store):
    """The chat was titled by a first message that Esc took back before any reply: saved and
    listed under words it does not hold (a tester's, helper-155). The message kept names it."""
    chat = ScriptedChat([("analysis", "thinking"), ("wait",), ("final", "never")], [("final", "42")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        prompt.text = "dropped words"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.query(AssistantTurn).last().reasoning_text == "thinking")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        prompt.text = "kept words"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.replies_finished == 2)
    (saved,) = store.root.glob("*.json")
    assert json.loads(saved.read_text())["title"] == "kept words"


async def test_escape_with_a_draft_typed_keeps_both_and_says_where_the_message_is(store):
    """Esc before any answer, with something typed meanwhile: the draft stays and the notice
    said the message was back in the input, where it was not (it is in the history); and Up
    then Down in the input lost a draft."""
    chat = ScriptedChat([("analysis", "thinking"), ("wait",), ("final", "never")], [("final", "42")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        prompt.text = "the question"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.query(AssistantTurn).last().reasoning_text == "thinking")
        prompt.text = "a draft"
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        await pilot.pause(0.1)
        assert prompt.text == "a draft"
        said = [n.message for n in app._notifications]
        assert any("in the input's history" in m for m in said) and not any("back in the input" in m for m in said)
        prompt.move_cursor((0, 0))
        await pilot.press("up")
        assert prompt.text == "the question"
        await pilot.press("down")
        assert prompt.text == "a draft"
        assert chat.messages == []


async def test_a_closed_terminal_saves_the_reply_under_way(store, monkeypatch):
    """Closing the terminal (SIGHUP) mid-reply ended the TUI unsaved; the terminal chat saved."""
    import os
    import signal

    ended = []  # the process is ended after the save (os._exit): not this one, pytest's
    monkeypatch.setattr(ChatApp, "_end_after_hang_up", lambda self: ended.append(True))

    chat = ScriptedChat([("analysis", "thinking"), ("final", "Partial ans"), ("wait", 0.3), ("final", "never")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "hup"
        await pilot.press("enter")
        turn = app.query_one(AssistantTurn)
        await wait_until(pilot, lambda: "Partial ans" in turn.answer_text)
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)  # else this would end pytest
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while app.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    (saved,) = store.root.glob("*.json")
    messages = json.loads(saved.read_text())["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", "hup"), ("assistant", "Partial ans")]
    assert ended == [True]


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


async def test_pasted_code_keeps_its_first_lines_indent(store):
    """A tester's (helper-138): the input sent text.strip(), so pasted code reached the model and
    the saved chat with its first line moved to column 0 and the others not. Blank lines around
    the message still go."""
    chat = ScriptedChat()
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "\n  \n    if x:\n        return 1\n\n")
        assert [m.text for m in chat.messages if m.role == "user"] == ["    if x:\n        return 1"]
        assert app.query_one(UserMessage).render().plain == "    if x:\n        return 1"
        app.query_one(PromptInput).text = " \n\t\n"
        await pilot.press("enter")  # blank: nothing sent
        await pilot.pause(0.1)
        assert app.replies_finished == 1 and len(app.query(UserMessage)) == 1


async def test_prompts_are_kept_across_sessions_and_a_draft_on_quit(store):
    """The TUI's ↑ reached only this session's prompts (the terminal chat keeps its own in a
    file, which the TUI shares now), and Ctrl+Q dropped a typed, unsent message without a word:
    it goes into that history, and the exit note says so."""
    input_history(store.history_file).store_string("from the terminal chat")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        await send(pilot, app, "first here")
        await pilot.press("up")
        assert prompt.text == "first here"
        await pilot.press("up")
        assert prompt.text == "from the terminal chat"
        await pilot.press("down", "down")
        assert prompt.text == ""
        prompt.text = "half-written\nthought"
        await pilot.press("ctrl+q")
    assert "↑ at the prompt brings it back" in app.exit_note
    assert list(input_history(store.history_file).load_history_strings()) == [
        "half-written\nthought", "first here", "from the terminal chat"]
    again = make_app(ScriptedChat(), store)
    async with again.run_test(size=SIZE) as pilot:
        await pilot.press("up")
        assert again.query_one(PromptInput).text == "half-written\nthought"
        await pilot.press("up")  # a recalled prompt left as it was is no draft
        await pilot.press("ctrl+q")
    assert again.exit_note is None
    assert len(list(input_history(store.history_file).load_history_strings())) == 3


def test_an_escape_inside_a_paste_stays_in_the_paste():
    """Textual's parser read what followed an ESC inside a bracketed paste as keys: a pasted log
    with a colour code (ESC[31m) sent its middle line as a message (the line break was Enter)
    and lost the others. The input decoder shows such an ESC as ␛, however the terminal's reads
    split the paste, and passes a key's ESC (Escape, arrows, Alt) on at once."""
    import codecs
    import random

    from gptoss_mlx.tui.app import PastedEscapes

    raw = (b"a\x1b[A\x1b[200~first\n\x1b[31mERR\x1b[0m x\n\xc3\xa9last\x1b[201~\x1bb\x1b"
           b"\x1b[200~\x1b\x1b[201~")
    shown = ("a\x1b[A\x1b[200~first\n\u241b[31mERR\u241b[0m x\n\u00e9last\x1b[201~\x1bb\x1b"
             "\x1b[200~\u241b\x1b[201~")
    rng = random.Random(0)
    for _ in range(500):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 8)))
        decoder = PastedEscapes(codecs.getincrementaldecoder("utf-8")(errors="replace"))
        parts = [decoder.decode(raw[i:j]) for i, j in zip([0, *cuts], [*cuts, len(raw)])]
        assert "".join(parts) + decoder.decode(b"", final=True) == shown, cuts
    decoder = PastedEscapes(codecs.getincrementaldecoder("utf-8")(errors="replace"))
    assert decoder.decode(b"\x1b") == "\x1b"  # the Escape key, not held for what may follow


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


def turn_layout(turn) -> list[str]:
    """The turn's rows from the top: reasoning sections, preambles, tool rows and the answer
    (with their text), as a reader sees them."""
    rows = []
    for child in turn.children:
        if child.has_class("reasoning") and child.display and not child.has_class("-empty"):
            rows.append("reasoning: " + child.query_one(".reasoning-md", Markdown).source.strip())
        elif child.has_class("preamble") or child.has_class("answer") or child.has_class("answer-part"):
            if child.source.strip():
                rows.append(f"{'preamble' if child.has_class('preamble') else 'answer'}: {child.source.strip()}")
        elif child.has_class("tool-call"):
            rows.append(str(child.title))
    return rows


PREAMBLE_TURN = ["reasoning: need weather", "preamble: Let me check.", "tool call · functions.get_weather",
                 "result · functions.get_weather", "reasoning: it is sunny", "answer: Sunny in Oslo."]


async def test_a_preamble_stays_above_its_call_live_and_reopened(store, monkeypatch):
    """Text the model wrote to the user before a call ("Let me check.") was shown below the call
    and run into the answer ("Let me check.Sunny in Oslo."), live and when the chat was reopened;
    copying the answer copied both."""
    from gptoss_mlx.harmony import Message

    chat = ScriptedChat([("analysis", "need weather"), ("preamble", "Let me check."),
                         ("analysis", " then call"), ("call", "functions.get_weather", '{"city": "Oslo"}'),
                         ("final", "Sunny in Oslo.")])
    copied = []
    app = make_app(chat, store)
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "weather?")
        turn = app.query_one(AssistantTurn)
        assert turn_layout(turn) == ["reasoning: need weather", "preamble: Let me check.", "reasoning: then call",
                                     "tool call · functions.get_weather", "error · functions.get_weather",
                                     "answer: Sunny in Oslo."]
        assert turn.answer_text == "Sunny in Oslo." and turn.preambles == ["Let me check."]
        await pilot.press("alt+c")
        await pilot.pause()
        assert copied == ["Sunny in Oslo."]

    saved = ScriptedChat()
    saved.messages += [
        Message("user", "weather?"), Message("assistant", "need weather", channel="analysis"),
        Message("assistant", "Let me check.", channel="commentary"),
        Message("assistant", '{"city": "Oslo"}', channel="commentary", recipient="functions.get_weather"),
        Message("tool", '{"sky": "sunny"}', channel="commentary", recipient="assistant",
                name="functions.get_weather"),
        Message("assistant", "it is sunny", channel="analysis"),
        Message("assistant", "Sunny in Oslo.", channel="final")]
    store.save(saved, "pre", "Weather")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation("pre")
        await wait_until(pilot, lambda: app.query(AssistantTurn))
        await pilot.pause(0.1)
        turn = app.query_one(AssistantTurn)
        assert turn_layout(turn) == PREAMBLE_TURN
        assert turn.answer_text == "Sunny in Oslo."


def scripted_replies(tok, segments: list[str], json_answer: bool = False) -> tuple[list[list[int]], list[str], str]:
    """The model's replies for a turn of ``segments`` ("analysis", "preamble", "call", "final":
    an answer that more follows) and a final answer (a reply ends at each call), the turn as
    turn_layout should show it, and its answer."""
    replies, text, layout, answers = [], "", [], []
    for i, kind in enumerate(segments + ["final"]):
        start = "<|start|>assistant" if text else ""
        if kind == "analysis":
            text += f"{start}<|channel|>analysis<|message|>think {i}.<|end|>"
            if layout and layout[-1].startswith("reasoning: "):
                layout[-1] += f"\n\nthink {i}."  # one section until something else is shown; a paragraph a message
            else:
                layout.append(f"reasoning: think {i}.")
        elif kind == "preamble":
            text += f"{start}<|channel|>commentary<|message|>Say {i}.<|end|>"
            layout.append(f"preamble: Say {i}.")
        elif kind == "final" and i < len(segments):  # an answer the model goes on from
            text += f"{start}<|channel|>final<|message|>Early {i}.<|end|>"
            layout.append(f"answer: Early {i}.")
            answers.append(f"Early {i}.")
        elif kind == "call":
            text += f"{start} to=functions.f{i}<|channel|>commentary json<|message|>{{}}<|call|>"
            replies.append(tok.encode(text, allowed_special="all"))
            text = ""
            layout += [f"tool call · functions.f{i}", f"error · functions.f{i}"]
        else:
            done = f'{{"a": {i}}}' if json_answer else f"Done {i}."
            text += f"{start}<|channel|>final<|message|>{done}<|return|>"
            replies.append(tok.encode(text, allowed_special="all"))
            layout.append(f"answer: {done}")
            answers.append(done)
    return replies, layout, "\n\n".join(answers)


def test_a_turn_reads_in_the_order_it_was_written_live_and_reopened(tokenizer_json, tmp_path):
    """Any order of reasoning, preambles, calls and answers the model goes on from, before the
    answer, is shown in that order, live and when the chat is reopened (two messages in a row
    are two blocks), with or without a response format; the answer is the final channel's text."""
    from hypothesis import given, settings, strategies as st

    from gptoss_mlx.generate import Engine
    from gptoss_mlx.tokenizer import load_tokenizer
    from scripted import ScriptedModel

    tok = load_tokenizer(tokenizer_json)

    async def shown(segments, root, response_format=None):
        store = ConversationStore(root)
        replies, layout, answer = scripted_replies(tok, segments, json_answer=response_format is not None)
        model = ScriptedModel(replies)
        chat = Chat(model, tok, engine=Engine(model, max_context=4096), date="2025-08-05",
                    response_format=response_format)
        app = make_app(chat, store)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, app, "go")
            turn = app.query_one(AssistantTurn)
            live = turn_layout(turn), turn.answer_text
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: not app.query(AssistantTurn))
            app.open_conversation(store.list()[0].id)
            await wait_until(pilot, lambda: app.query(AssistantTurn))
            await pilot.pause(0.05)
            turn = app.query_one(AssistantTurn)
            reopened = turn_layout(turn), turn.answer_text
        assert live == reopened == (layout, answer), (segments, live, reopened)

    runs = iter(range(10 ** 6))

    @settings(max_examples=10, deadline=None, database=None)  # (about 1.4 s an example)
    @given(st.lists(st.sampled_from(["analysis", "preamble", "call", "final"]), max_size=5))
    def check(segments):
        asyncio.run(shown(segments, tmp_path / str(next(runs))))

    # with the answer held to a format (its preambles come as reasoning events, live)
    @settings(max_examples=6, deadline=None, database=None)
    @given(st.lists(st.sampled_from(["analysis", "preamble"]), max_size=4))
    def check_format(segments):
        asyncio.run(shown(segments, tmp_path / str(next(runs)), {"type": "object"}))

    check()
    check_format()


async def test_a_reasoning_section_says_its_length_once_a_call_ends_it(store):
    """A section of reasoning that a tool call ended said "thinking…" until the whole reply had
    ended: while the model went on (reading the result, thinking again) it looked unfinished."""
    chat = ScriptedChat([("analysis", "need the weather"), ("call", "functions.get_weather", "{}"), ("wait",)])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "weather?"
        await pilot.press("enter")
        await wait_until(pilot, lambda: bool(app.query(".tool-call")))
        await pilot.pause()
        assert app.query_one(AssistantTurn).reasoning.title == "Reasoning · 3 words"
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)


async def test_code_approval_shows_hidden_characters_and_all_of_the_code(store, monkeypatch):
    """Issue 16: a carriage return in a comment must not hide the line before it from the person
    approving; long code scrolls instead of being cut."""
    from gptoss_mlx.tui import app as tui_app
    from gptoss_mlx.tui.app import ApproveCode

    hidden = "import shutil; shutil.rmtree('/Users/me')\r# tidy up the cache (harmless)\n"
    code = hidden + "".join(f"print({i})\n" for i in range(60))
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        answers = []
        app.push_screen(ApproveCode(code), answers.append)
        await pilot.pause()
        body = app.screen.query_one(".code Static").render()
        assert "warning: 1 hidden or control character" in body.plain
        assert "shutil.rmtree('/Users/me')<\\r># tidy up" in body.plain
        assert "print(59)" in body.plain
        assert "\r" not in body.plain
        monkeypatch.setattr(tui_app, "TYPE_AHEAD_S", 60.0)  # however slow the machine, no pause yet
        await pilot.press("n")  # typed ahead (the dialog just showed): not an answer
        assert answers == []
        monkeypatch.setattr(tui_app, "TYPE_AHEAD_S", 0.0)
        await pilot.press("n")
        assert answers == [False]


@pytest.mark.parametrize("button, answer", [("#yes", True), ("#no", False), ("#stop", None)])
async def test_the_approval_dialog_s_buttons_answer_it(store, button, answer):
    """A change this session left ApproveCode without its button handler: clicking "Run (Y)"
    did nothing."""
    from gptoss_mlx.tui.app import ApproveCode

    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        answers = []
        app.push_screen(ApproveCode("print(1)"), answers.append)
        await pilot.pause()
        await pilot.click(button)
        await pilot.pause()
        assert answers == [answer]


async def test_quitting_with_the_approval_dialog_open_does_not_hang(store):
    """The reply worker waits for the dialog; quitting the app must end that wait (it hung)."""
    from gptoss_mlx.tui.app import ApproveCode

    app = make_app(ScriptedChat(), store)
    answers = []
    async with app.run_test(size=SIZE) as pilot:
        worker = app.run_worker(lambda: answers.append(app.approve_code("print(1)")), thread=True)
        await wait_until(pilot, lambda: isinstance(app.screen, ApproveCode))
    worker_done = time.monotonic() + 5
    while not answers and time.monotonic() < worker_done:
        time.sleep(0.05)
    assert answers == [None] and worker.is_finished  # not answered: not "declined"


class FakePython:
    """The python tool's interface, without a sandbox: records what ran and what was stopped."""
    description = "Run Python."

    def __init__(self, seconds: float = 0.0):
        self.ran, self.interrupted, self.seconds = [], threading.Event(), seconds

    def run(self, code):
        self.ran.append(code)
        self.interrupted.wait(self.seconds)
        return "[stopped by the user before it finished]" if self.interrupted.is_set() else "42\n"

    def interrupt(self):
        self.interrupted.set()

    def close(self):
        pass


async def test_escape_in_the_approval_dialog_stops_the_reply_not_just_the_code(store):
    """Esc in the "Run it?" dialog counted as "Don't run": the reply went on, the next call
    asked again, and only the 8-round limit ended it; Ctrl+Q did nothing while it was open. Esc
    now stops the reply there (the call's result says so, not that the user declined)."""
    from gptoss_mlx.tui.app import ApproveCode

    call = [("call", "python", "print(6*7)")]
    chat = ScriptedChat(call, call, call)
    python = FakePython()
    app = make_app(chat, store, toolbox=Toolbox(python=python))
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "compute"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ApproveCode))
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert python.ran == [] and len(chat.replies) == 2  # no second round
        assert chat.messages[-1].role == "tool"
        assert chat.messages[-1].text == "Error: not run: the user stopped the reply before answering"
        app.query_one(PromptInput).text = "again"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ApproveCode))
        await pilot.press("ctrl+q")  # quits from the dialog, the chat saved
        deadline = time.monotonic() + 10
        while app.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert not app.is_running and python.ran == []


async def test_escape_stops_python_code_under_way_at_once(store):
    """Esc while the python tool ran waited for its timeout (60 s by default)."""
    chat = ScriptedChat([("call", "python", "while 1: pass")], [("final", "never")])
    python = FakePython(seconds=30)
    app = make_app(chat, store, toolbox=Toolbox(python=python), ask_before_running_code=False)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "spin"
        await pilot.press("enter")
        await wait_until(pilot, lambda: python.ran)
        started = time.monotonic()
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert time.monotonic() - started < 3
        assert chat.messages[-1].text == "[stopped by the user before it finished]"
        assert len(chat.replies) == 1  # no reply after the tool's result


async def test_escape_and_quit_leave_a_function_that_hangs(store):
    """A --functions function that hung (time.sleep(10000)): Esc said "stopping…" for good,
    Ctrl+Q "stopping the reply and saving…", and the process never ended (Textual waits for the
    reply's thread). The call is now left to itself: the reply stops at once."""
    from gptoss_mlx.tools import FunctionTool

    release = threading.Event()

    def hang() -> str:
        """Hang."""
        release.wait(60)
        return "late"

    chat = ScriptedChat([("call", "functions.hang", "{}")], [("call", "functions.hang", "{}")])
    toolbox = Toolbox(functions=[FunctionTool.from_callable(hang)])
    calls = lambda: sum(t.name == "function-hang" for t in threading.enumerate())  # noqa: E731
    app = make_app(chat, store, toolbox=toolbox)
    try:
        async with app.run_test(size=SIZE) as pilot:
            app.query_one(PromptInput).text = "call it"
            await pilot.press("enter")
            await wait_until(pilot, lambda: calls() == 1)
            started = time.monotonic()
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.replies_finished == 1)
            assert time.monotonic() - started < 3
            assert "stopped by the user while it ran" in chat.messages[-1].text
            assert len(chat.replies) == 1  # no reply after it (the next script is the next message's)
            app.query_one(PromptInput).text = "again"
            await pilot.press("enter")
            await wait_until(pilot, lambda: calls() == 2 and app.generating)
            await pilot.press("ctrl+q")  # quits once the reply is stopped: it no longer waits for the call
            await wait_until(pilot, lambda: not app.is_running, timeout=5)
    finally:
        release.set()


def test_bytes_from_the_terminal_that_are_not_utf8_do_not_end_the_app():
    """One byte that is not UTF-8 (tmux send-keys -H ff, a Latin-1 paste) raised in Textual's
    input thread and ended the TUI, with the reply under way."""
    from textual.drivers import linux_driver

    import gptoss_mlx.tui.app  # noqa: F401 - makes the driver's decoding lenient

    decode = linux_driver.getincrementaldecoder("utf-8")().decode
    assert decode(b"ab\xffc\xe2\x82", final=False) + decode(b"\xac") == "ab\ufffdc\u20ac"


async def test_a_windows_line_end_split_between_two_streamed_pieces_shows_no_marker(store):
    """The model's "\\r" and "\\n" as two pieces were each shown alone: the line ended with ␍
    while the reply streamed. A lone "\\r" is still shown, at the end too."""
    chat = ScriptedChat([("analysis", "x\r"), ("analysis", "\ny"), ("final", "a\r"), ("final", "\nb\r"),
                         ("wait",), ("final", "c\r")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "q"
        await pilot.press("enter")
        turn = app.query_one(AssistantTurn)
        answer, reasoning = turn.query_one(".answer", Markdown), turn.query_one(".reasoning-md", Markdown)
        await wait_until(pilot, lambda: answer.source.rstrip() == "a\nb" and reasoning.source.rstrip() == "x\ny")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert answer.source == "a\nb\u240d"  # the full text, re-parsed: its lone \r shown


@pytest.mark.parametrize("after", ["reasoning", "answer", "call"])
async def test_a_lone_carriage_return_ending_a_reasoning_message_shows_when_more_follows(store, after):
    """A "\\r" held back at a reasoning message's end was shown only when the reply ended (an
    answer or a call followed), and lost for good when the next reasoning message followed
    (the paragraph break after it read as a Windows line end)."""
    follows = {"reasoning": [("analysis", "y", 1)], "answer": [("final", "a")],
               "call": [("call", "functions.f", "{}")]}[after]
    app = make_app(ScriptedChat([("analysis", "x\r"), *follows, ("wait",)]), store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "q"
        await pilot.press("enter")
        turn = app.query_one(AssistantTurn)
        first = turn.query_one(".reasoning-md", Markdown)
        shown = "x\u240d\n\ny" if after == "reasoning" else "x\u240d"
        await wait_until(pilot, lambda: first.source.rstrip("\n") == shown, timeout=4)  # while it streams
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert first.source.rstrip("\n") == shown  # and re-parsed at the end


async def test_escape_sequences_in_a_saved_chat_are_shown_not_run(store):
    """A saved chat (or a model, or a tool) with escape sequences cleared the screen, set the
    window title and wrote the clipboard: Textual passes ESC through to the terminal."""
    bad = "\x1b[2J\x1b]0;PWN\x07\x1b]52;c;cHduZWQ=\x1b\\"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": bad}}
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "20261201-000000-escape.json").write_text(json.dumps({
        "format": 1, "title": "title" + bad, "messages": [
            {"role": "user", "content": "user" + bad},
            {"role": "assistant", "content": None, "reasoning": "thought" + bad, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "tool" + bad},
            {"role": "assistant", "content": "answer" + bad}]}))
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        listed = str(app.screen.query_one(OptionList).get_option_at_index(0).prompt)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.query(AssistantTurn))
        await pilot.pause()
        turn = app.query_one(AssistantTurn)
        shown = [listed, app.query_one(UserMessage).render().plain,
                 turn.query_one(".answer", Markdown).source, turn.query_one(".reasoning-md", Markdown).source,
                 *(w.render().plain for w in turn.query(".tool-args"))]
        assert len(shown) == 6
        for text in shown:
            assert "\x1b" not in text and "\x07" not in text and "\u241b]0;PWN\u2407" in text, repr(text)
        # The dialogs show the instructions and the title the same way; saved unchanged, they
        # stay as they were.
        app.chat.instructions = "dev" + bad
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.query("TextArea#value"))
        assert app.screen.query_one("TextArea#value").text == "dev\u241b[2J\u241b]0;PWN\u2407\u241b]52;c;cHduZWQ=\u241b\\"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.chat.instructions == "dev" + bad
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("r")
        await wait_until(pilot, lambda: app.screen.query("Input#value"))
        assert "\x1b" not in app.screen.query_one("Input#value").value
        await pilot.press("enter")
        await pilot.pause()
        assert store.list()[0].title == "title" + bad


async def test_new_chat_and_chats_during_a_reply_say_why_not(store):
    app = make_app(ScriptedChat([("final", "Partial"), ("wait",), ("final", "never")]), store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "hi"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.generating)
        await pilot.press("ctrl+n", "ctrl+o")
        await pilot.pause()
        said = [n.message for n in app._notifications]
        assert said.count("A reply is still being written (Esc stops it)") == 2, said
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.generating)


async def test_a_reopened_reply_that_was_cut_short_says_so(store):
    """A reply stopped with Esc or cut at the token limit reopened as if whole: its turn now
    says "stopped" or "cut off" as it did when it was made."""
    from gptoss_mlx.harmony import Message

    saved = ScriptedChat()
    saved.messages += [Message("user", "count"), Message("assistant", "Counting.", channel="analysis"),
                       Message("assistant", "one two", channel="final", cut="length"),
                       Message("user", "again"), Message("assistant", "one", channel="final", cut="interrupted"),
                       Message("user", "thanks"), Message("assistant", "You're welcome.", channel="final"),
                       Message("user", "weather?"),  # stopped while its tool ran (the call is marked)
                       Message("assistant", "{}", channel="commentary", recipient="functions.slow", cut="interrupted"),
                       Message("tool", "Error: stopped by the user", channel="commentary", recipient="assistant",
                               name="functions.slow")]
    store.save(saved, "cut", "Counting")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation("cut")
        await wait_until(pilot, lambda: len(app.query(AssistantTurn)) == 4)
        await pilot.pause(0.1)
        stats = [t.query_one(".stats", Static).render().plain for t in app.query(AssistantTurn)]
        assert stats == ["cut off: token limit", "stopped", "", "stopped"], stats


async def test_a_reopened_chat_ending_at_a_call_never_run_answers_it_for_the_model(store):
    """A chat saved before its call ran (the process ended then) reopened with the call neither
    shown answered nor answered: the model never learnt it had not run (a tester's, helper-157)."""
    from gptoss_mlx.chat import UNRUN_CALL
    from gptoss_mlx.harmony import Message

    saved = ScriptedChat()
    saved.messages += [Message("user", "weather?"),
                       Message("assistant", '{"city": "Oslo"}', channel="commentary", recipient="functions.get_weather")]
    store.save(saved, "ended", "Weather")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation("ended")
        await wait_until(pilot, lambda: len(app.query(AssistantTurn)) == 1)
        await pilot.pause(0.1)
        last = app.chat.messages[-1]
        assert (last.role, last.name, last.text) == ("tool", "functions.get_weather", UNRUN_CALL)


async def test_a_reopened_message_left_unanswered_and_cut_replies_say_so_here_and_in_the_export(store):
    """A tester's (helper-138): a chat quit while its prompt was read reopened ending in the
    question with no mark (the next message then made two user turns, the first never answered,
    nothing said), and the Markdown export left out that a reply was cut off or stopped."""
    from gptoss_mlx.harmony import Message

    saved = ScriptedChat()
    saved.messages += [Message("user", "count"), Message("assistant", "one two", channel="final", cut="length"),
                       Message("user", "a long paste")]
    store.save(saved, "left", "Left")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation("left")
        await wait_until(pilot, lambda: len(app.query(UserMessage)) == 2)
        await pilot.pause(0.1)
        assert [w.render().plain for w in app.query(".unanswered")] == ["not answered: stopped before the reply began"]
        app.action_export()
    text = (store.root.parent / "exports" / "left.md").read_text()
    assert "one two\n\n*(cut off: token limit)*" in text
    assert text.endswith("a long paste\n\n*(not answered: stopped before the reply began)*\n")


async def test_a_chats_folder_that_is_a_file_is_said_in_the_list(tmp_path):
    """A tester's (helper-138): a file named chats in the data folder listed as "No saved
    conversations yet", while every save failed."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chats").write_text("x")
    store = ConversationStore(tmp_path / "data")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        shown = str(app.screen.query_one(OptionList).get_option_at_index(0).prompt)
        assert shown == f"The chats folder {store.root} is not a folder (something else has its name): no chat can be saved"


async def test_an_export_that_cannot_be_written_is_said_and_the_app_goes_on(store):
    """A file named "exports" in the data directory (or a full disk) made Export a traceback that
    closed the app."""
    store.exports.parent.mkdir(parents=True, exist_ok=True)
    store.exports.write_text("not a folder")
    app = make_app(ScriptedChat(THOUGHT, THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "hello")
        app.action_export()
        await pilot.pause()
        assert any(n.message.startswith("Not exported:") and "exports" in n.message for n in app._notifications)
        await send(pilot, app, "still here?")
        assert len(app.query(AssistantTurn)) == 2


async def test_an_opened_chats_functions_give_way_to_those_that_can_run(store, tokenizer_json):
    """A chat opened with Ctrl+O kept the functions it was saved with (none of which could run)
    for itself and for every chat after Ctrl+N."""
    from gptoss_mlx.harmony import Message, ToolSpec

    old = ToolSpec("boom", "Explodes.", {"type": "object", "properties": {}})
    new = ToolSpec("weather", "The weather.", {"type": "object", "properties": {}})
    from gptoss_mlx.tokenizer import load_tokenizer

    saved, chat = ScriptedChat(instructions="Be terse."), ScriptedChat(instructions="Original.")
    saved.tokenizer = chat.tokenizer = load_tokenizer(tokenizer_json)  # (tools' schemas are checked with it)
    saved.functions, chat.functions = [old], [new]
    saved.messages += [Message("user", "hi"), Message("assistant", "Hello.", channel="final")]
    store.save(saved, "old", "Old tools")
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation("old")
        await pilot.pause()
        assert [f.name for f in chat.functions] == ["weather"] and chat.instructions == "Be terse."
        assert any("saved with boom" in n.message for n in app._notifications)
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert [f.name for f in chat.functions] == ["weather"] and chat.instructions == "Original."


async def test_a_new_chat_takes_the_users_effort_not_an_opened_chats(store):
    """Ctrl+N after opening a chat saved at low effort started the new chat at low too (the
    README: a new chat starts from the command line's settings and those set since)."""
    saved = ScriptedChat()
    saved.reasoning_effort = "low"
    saved.messages += [Message("user", "hi"), Message("assistant", "Hello.", channel="final")]
    store.save(saved, "low", "Low effort")
    chat = ScriptedChat()
    app = make_app(chat, store, effort="high")
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation("low")
        await pilot.pause()
        assert app.effort == chat.reasoning_effort == "low"  # an opened chat keeps its own
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.effort == chat.reasoning_effort == "high"  # the command line's
        assert app.query_one("#effort-high").has_class("-active")
        app.open_conversation("low")
        await pilot.pause()
        await pilot.click("#effort-medium")  # set by the user since: it carries over
        await pilot.press("ctrl+n")
        await pilot.pause()
        await send(pilot, app, "new")
    assert chat.efforts == ["medium"]


async def test_keys_as_terminals_send_them(store, monkeypatch):
    """Alt+C from a terminal that sends Alt as ESC + the key (tmux, most Linux terminals:
    Textual reads it as alt+c with the character "c") typed a "c" into the input and copied
    nothing; Ctrl+C's hint showed its markup ("Press [b]ctrl+q[/b]")."""
    from textual import events

    app = make_app(ScriptedChat(THOUGHT), store)
    copied = []
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "hello")
        prompt = app.query_one(PromptInput)
        prompt.focus()
        app._driver.send_message(events.Key("alt+c", "c"))
        await wait_until(pilot, lambda: copied)
        assert copied[0].startswith("Hello! Here is code:") and prompt.text == ""
        await pilot.press("ctrl+c")
        await pilot.pause()
        hint = list(app._notifications)[-1]
    assert "Ctrl+Q quits" in hint.message and "[" not in hint.message


async def test_an_opened_chat_shows_its_latest_turn(store):
    """A long chat opened with Ctrl+O showed its first turns: the last, where the next message
    goes, was out of view."""
    saved = ScriptedChat()
    for i in range(12):
        saved.messages += [Message("user", f"question {i}"), Message("assistant", f"answer {i}\n" * 4, channel="final")]
    store.save(saved, "long", "Long")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation("long")
        transcript = app.query_one("#transcript")
        await wait_until(pilot, lambda: transcript.max_scroll_y > 0 and transcript.scroll_y == transcript.max_scroll_y)
        await pilot.pause(0.2)
        assert transcript.scroll_y == transcript.max_scroll_y > 0
        last = app.query(UserMessage).last()
        assert last.region.y < app.size.height  # on screen


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
        await pilot.press("d")  # one key does not delete a conversation: it asks
        await pilot.pause(TYPE_AHEAD_S)
        assert [e.title for e in store.list()] == ["second chat", "Greetings"]
        await pilot.press("escape")  # kept
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("d")
        await pilot.pause(TYPE_AHEAD_S)
        await pilot.press("y")
        await wait_until(pilot, lambda: [e.title for e in store.list()] == ["Greetings"])
    exported = list((store.root.parent / "exports").glob("*.md"))
    assert len(exported) == 1
    text = exported[0].read_text()
    assert "## User\n\nfirst chat" in text and "<details><summary>Reasoning</summary>" in text
    assert "```python\nprint('hi')\n```" in text


async def test_a_chat_that_cannot_be_saved_is_copied_before_it_is_left(tmp_path, monkeypatch):
    """On a full or read-only disk, Ctrl+N showed an empty chat and Ctrl+Q quit, each dropping
    the conversation it could not save (the terminal chat copies it to the current directory)."""
    (tmp_path / "datafile").write_text("x")
    monkeypatch.chdir(tmp_path)
    app = make_app(ScriptedChat(THOUGHT, THOUGHT), ConversationStore(tmp_path / "datafile"))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "first chat")
        await pilot.press("ctrl+n")
        (copy,) = tmp_path.glob("gptoss-mlx-chat-*.json")
        assert any(f"saved to {copy} instead" in n.message for n in app._notifications)
        await send(pilot, app, "second chat")
        await pilot.press("ctrl+q")
    (second,) = set(tmp_path.glob("gptoss-mlx-chat-*.json")) - {copy}
    assert "second chat" in second.read_text() and "second chat" not in copy.read_text()
    (rescued,) = set(tmp_path.glob("gptoss-mlx-chat-*.json")) - {copy}
    assert app.exit_note.startswith(f"The conversation is saved to {rescued} instead")


async def test_typing_into_the_list_deletes_nothing(store, monkeypatch):
    """Typing a sentence into the list ("I added the address") deleted conversations: D twice
    deleted, and "added" has two. D now asks in a dialog whose Y counts only once it has been
    seen; a file that cannot be removed is said, and the app goes on (it crashed)."""
    from gptoss_mlx.tui import app as tui_app
    from gptoss_mlx.tui.app import ConfirmDelete

    app = make_app(ScriptedChat(THOUGHT, THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "keep me")
        await pilot.press("ctrl+n")
        await send(pilot, app, "and me")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        monkeypatch.setattr(tui_app, "TYPE_AHEAD_S", 60.0)  # typing: however slow the machine, no pause
        await pilot.press(*"I added the address yes")
        await pilot.pause()
        assert len(store.list()) == 2 and isinstance(app.screen, ConfirmDelete)
        monkeypatch.setattr(tui_app, "TYPE_AHEAD_S", 0.0)  # from here every key comes after a pause
        await pilot.press("n")  # kept
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        assert len(store.list()) == 2
        listed = app.screen
        listed.action_delete(), listed.action_delete()  # Ds faster than the dialog shows
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDelete))
        await pilot.pause(0.1)
        assert sum(isinstance(s, ConfirmDelete) for s in app.screen_stack) == 1  # stacked, one per D
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        monkeypatch.setattr(store, "delete", lambda chat_id: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDelete))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        assert any("Could not delete the conversation" in n.message for n in app._notifications)
        monkeypatch.setattr(store, "delete", ConversationStore.delete.__get__(store))
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDelete))
        await pilot.press("y")
        await wait_until(pilot, lambda: len(store.list()) == 1)


async def test_deleting_the_open_chat_in_the_list_closes_it(store):
    """The open chat deleted in the list (D twice) came back, whole, with its next message."""
    app = make_app(ScriptedChat(THOUGHT, THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "doomed chat")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("d")
        await pilot.pause(TYPE_AHEAD_S)
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, ModalScreen))
        assert store.list() == [] and not app.query(UserMessage) and app.chat.messages == []
        assert any("open conversation was deleted" in n.message for n in app._notifications)
        await send(pilot, app, "after delete")
        assert [e.title for e in store.list()] == ["after delete"]
        (saved,) = store.root.glob("*.json")
        assert [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"] == [
            "after delete"]


async def test_a_rename_of_the_open_chat_here_or_elsewhere_survives_the_next_reply(store):
    """Renaming the chat that is open (R in the list) was undone by its next reply's save, and so
    was a rename made in the playground or another window."""
    app = make_app(ScriptedChat(THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "first chat")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("r")
        await wait_until(pilot, lambda: app.screen.query("#value"))
        app.screen.query_one("#value").value = "Renamed here"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("escape")
        await send(pilot, app, "second turn")
        assert [(e.title, e.messages) for e in store.list()] == [("Renamed here", 4)]
        ConversationStore(store.root.parent).rename(app.chat_id, "Renamed elsewhere")
        await send(pilot, app, "third turn")
        assert [(e.title, e.messages) for e in store.list()] == [("Renamed elsewhere", 6)]
        assert app.chat_title == "Renamed elsewhere"


async def test_a_chat_only_opened_is_not_written_again_on_quit(store):
    """Opening a chat (Ctrl+O) and quitting rewrote its file, so a terminal chat that had it
    open saved its next reply as a "(copy)". A chat left as it was is not written again."""
    app = make_app(ScriptedChat(THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "first chat")
    (entry,) = store.list()
    path = store.path(entry.id)
    stamp = path.stat().st_mtime_ns
    app = make_app(ScriptedChat(THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation(entry.id)
        await pilot.pause()
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert path.stat().st_mtime_ns == stamp and len(store.list()) == 1


async def test_unreadable_saved_chat_is_listed_and_reported_not_fatal(store):
    store.root.mkdir(parents=True)
    (store.root / "broken.json").write_text("{not json")
    app = make_app(ScriptedChat(), store)
    async with app.run_test(size=SIZE) as pilot:
        assert "unreadable" in store.list()[0].title
        await pilot.press("ctrl+o")  # the list says why, as /chats does (it said "(? messages)")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        shown = str(app.screen.query_one(OptionList).get_option_at_index(0).prompt)
        assert "broken (unreadable)  (not a saved chat" in shown, shown
        await pilot.press("escape")
        await pilot.pause()
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


async def test_a_message_that_does_not_fit_is_reported_and_the_history_stays(store):
    chat = ScriptedChat([("final", "first answer")],
                        [("too long", "the context limit is 4096 tokens")], [("final", "fine")])
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "short")
        await send(pilot, app, "far too long")
        assert any("context limit is 4096" in n.message for n in app._notifications)
        assert [m.text for m in chat.messages] == ["short", "first answer"]  # taken back, no more
        # ... and so does the transcript: the text is back in the input, to be sent again
        assert [str(w.render()) for w in app.query(UserMessage)] == ["short"]
        assert len(app.query(AssistantTurn)) == 1 and app.query_one(PromptInput).text == "far too long"
        await send(pilot, app, "shorter")
        assert chat.messages[-1].text == "fine"
        assert [str(w.render()) for w in app.query(UserMessage)] == ["short", "shorter"]


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


def tiny_chat(ckpt, **sampling) -> Chat:
    from gptoss_mlx.loading import load

    model, tokenizer = load(ckpt)
    return Chat(model, tokenizer, sampling=SamplingParams(temperature=0, **sampling), date="2025-08-05")


async def test_a_long_prompt_shows_how_far_it_has_been_read_and_no_empty_reasoning(tokenizer_json, store):
    """While a long message was read, the TUI showed "Reasoning · thinking…" and nothing more
    (the terminal chat says how far it has got); a reply with no reasoning kept that header."""
    from gptoss_mlx.generate import Engine
    from gptoss_mlx.tokenizer import load_tokenizer
    from scripted import ScriptedModel, SlowChunks

    tok = load_tokenizer(tokenizer_json)
    answer = tok.encode("<|channel|>final<|message|>Read it.<|return|>", allowed_special="all")
    model = SlowChunks(ScriptedModel([answer]), 0.05)
    chat = Chat(model, tok, engine=Engine(model, max_context=4096, prefill_step=16), date="2025-08-05")
    app = make_app(chat, store)
    shown = []
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "word " * 600
        await pilot.press("enter")
        turn = app.query_one(AssistantTurn)
        while not app.replies_finished:
            status = app.query_one("#status").render().plain
            shown += re.findall(r"reading the prompt: ([\d,]+) of ([\d,]+) tokens", status)
            assert not turn.reasoning.display or turn.reasoning.has_class("-empty")  # no empty "thinking…"
            await pilot.pause(0.1)
        assert turn.answer_text == "Read it." and turn.reasoning.has_class("-empty")
    assert len(shown) >= 2 and len({total for _, total in shown}) == 1
    assert int(shown[-1][0].replace(",", "")) > int(shown[0][0].replace(",", ""))  # it moved on


async def test_escape_while_a_long_prompt_is_read_says_it_is_stopping(tokenizer_json, store):
    """Esc while a long message was read showed nothing until the chunk under way ended (about
    15 s for a 13,769-token prompt on a 2-core CPU): the status still said "reading the prompt"."""
    from gptoss_mlx.generate import Engine
    from gptoss_mlx.tokenizer import load_tokenizer
    from scripted import ScriptedModel, SlowChunks

    tok = load_tokenizer(tokenizer_json)
    answer = tok.encode("<|channel|>final<|message|>Read it.<|return|>", allowed_special="all")
    chunk_ends = threading.Event()
    model = SlowChunks(ScriptedModel([answer]), 0.0, hold=chunk_ends)
    chat = Chat(model, tok, engine=Engine(model, max_context=4096, prefill_step=16), date="2025-08-05")
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "word " * 300
        await pilot.press("enter")
        await wait_until(pilot, lambda: "reading the prompt" in app.query_one("#status").render().plain)
        await pilot.press("escape")
        assert "stopping…" in app.query_one("#status").render().plain  # at once, not after the chunk
        chunk_ends.set()
        await wait_until(pilot, lambda: app.replies_finished == 1)
        await pilot.pause(0.1)
        status = app.query_one("#status").render().plain
        assert "stopping" not in status and "TTFT" not in status and "tok/s" not in status, status  # no first token
        assert app.query_one(PromptInput).text.strip() == ("word " * 300).strip()


async def test_with_a_tiny_real_model(tiny_checkpoint, store):
    """The real stack: tiny random checkpoint, real tokenizer, real Chat and Engine."""
    chat = tiny_chat(tiny_checkpoint, max_tokens=12)
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
        status = app.query_one("#status").render().plain
        assert f"context {len(chat.prompt_tokens())}/" in status, status
        await pilot.press("ctrl+n")  # the new chat's context: its instructions, not the old chat's
        await pilot.pause()
        status = app.query_one("#status").render().plain
        assert f"context {len(chat.prompt_tokens())}/" in status and not chat.messages, status
    assert len(store.list()) == 1


async def test_a_streamed_model_shows_its_expert_pool_in_the_status(tiny_checkpoint, store):
    """With experts streamed (a memory limit that holds 8 of the tiny model's 32), the status line
    says how many experts the pool holds and how often a chosen one was in it."""
    from gptoss_mlx.loading import load

    model, tokenizer = load(tiny_checkpoint, memory_limit="1.02307GB", dense_bits=4)
    assert model.expert_pool is not None
    chat = Chat(model, tokenizer, sampling=SamplingParams(temperature=0, max_tokens=3), date="2025-08-05")
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Hi there", 60)  # (a streamed reply on a loaded CPU took more than 10 s)
        status = app.query_one("#status").render().plain
        assert re.search(r"experts 8/32 on the GPU, \d+% hits", status), status


async def test_a_turn_whose_streamed_checkpoint_was_cut_is_taken_back_and_can_be_sent_again(
        tiny_checkpoint, store, tmp_path):
    """The checkpoint is cut between turns of a streamed model: the error is shown, the turn
    leaves neither the history nor the transcript, and its text is back in the input; once the
    file is restored, the same again (its bytes are not known to be the ones loaded until the
    model is loaded again), and with the model loaded again the same text is answered."""
    import shutil

    from gptoss_mlx.loading import load

    directory = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint, directory)
    (shard,) = directory.glob("*.safetensors")
    original = shard.read_bytes()
    model, tokenizer = load(directory, memory_limit="1.02307GB", dense_bits=4)
    chat = Chat(model, tokenizer, sampling=SamplingParams(temperature=0, max_tokens=3), date="2025-08-05")
    app = make_app(chat, store)
    question = "Tell me about the weather in Lima and in Tokyo"
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Hi there", 60)
        history = list(chat.messages)
        with open(shard, "r+b") as f:
            f.truncate(len(original) // 2)
        await send(pilot, app, question, 60)
        assert any("the file was cut" in n.message for n in app._notifications)
        assert chat.messages == history and app.query_one(PromptInput).text == question
        assert [str(w.render()) for w in app.query(UserMessage)] == ["Hi there"]
        shard.write_bytes(original)
        await send(pilot, app, question, 60)
        assert any("the file changed (written to, or its modification time set)" in n.message
                   for n in app._notifications)
        assert chat.messages == history and app.query_one(PromptInput).text == question
        chat.engine = Engine(load(directory, memory_limit="1.02307GB", dense_bits=4)[0])
        await send(pilot, app, question, 60)
        assert [str(w.render()) for w in app.query(UserMessage)] == ["Hi there", question]
        assert chat.messages[len(history)].text == question and len(chat.messages) > len(history) + 1


@pytest.mark.parametrize("turns", [2, 5])
async def test_follow_ups_with_the_same_effort_on_a_tiny_real_model(tiny_checkpoint, store, turns):
    """Issue 15: each reply runs on a new worker thread; every follow-up used to fail with
    "There is no Stream(cpu, 1) in current thread". The model loads in the app, as it does for
    users (on the engine thread)."""
    app = ChatApp(loader=lambda: tiny_chat(tiny_checkpoint, max_tokens=8), model_name="tiny", store=store)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat is not None, timeout=60)
        for n in range(turns):
            await send(pilot, app, f"Message number {n + 1}")
        assert not [n.message for n in app._notifications if n.severity == "error"]
        stats = [t.query_one(".stats").render().plain for t in app.query(AssistantTurn)]
        assert len(stats) == turns and all("8 tokens ·" in s for s in stats), stats
        assert all(" cached)" in s and "(0 cached)" not in s for s in stats[1:]), stats  # cache reused
        assert app.chat.reasoning_effort == "medium"
    assert [m.role for m in app.chat.messages].count("user") == turns


QUIT_MID_REPLY = """
import asyncio, sys
from pathlib import Path
from test_tui import tiny_chat, wait_until
from gptoss_mlx.tui import ChatApp, ConversationStore
from gptoss_mlx.tui.app import PromptInput

async def main():
    chat = tiny_chat(sys.argv[1], max_tokens=200000)
    app = ChatApp(chat, store=ConversationStore(Path(sys.argv[2])))
    async with app.run_test(size=(100, 32)) as pilot:
        app.query_one(PromptInput).text = "Write forever"
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat.engine.stats.generated_tokens > 20, timeout=60)
        await pilot.press("ctrl+q")
    print(f"quit after {chat.engine.stats.generated_tokens} tokens", flush=True)

asyncio.run(main())
"""


def test_ctrl_q_during_a_reply_exits_cleanly(tiny_checkpoint, tmp_path):
    """Quitting mid-reply stops the reply at its next token; the process ends with status 0
    (it used to abort: "terminate called without an active exception", exit 134)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "quit.py"
    script.write_text(QUIT_MID_REPLY)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(tests)}  # the script imports test_tui's helpers
    proc = subprocess.run([sys.executable, str(script), str(tiny_checkpoint), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120, cwd=tests, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quit after" in proc.stdout and "terminate" not in proc.stderr
    generated = int(proc.stdout.split("quit after ")[1].split()[0])
    assert generated < 200000  # stopped, not run to the end


async def test_the_status_counts_the_prompt_the_model_gets_once_the_chat_is_past_the_context(store, monkeypatch):
    """Past the context the status bar counted the whole history: "context 394/300"."""
    monkeypatch.setattr("gptoss_mlx.chat.message_tokens", lambda message, tokenizer: 10)
    chat = ScriptedChat(*[[("final", "fine")]] * 8)
    chat.engine.max_context = 100  # room for 7 messages of ten tokens, with the reply's quarter
    app = make_app(chat, store)
    async with app.run_test(size=SIZE) as pilot:
        for k in range(8):
            await send(pilot, app, f"message {k}")
        status = app.query_one("#status").render().plain
        used = int(re.search(r"context (\d+)/100", status).group(1))
        assert len(chat.prompt_tokens()) > 100 and used <= 75, status


async def test_context_trimmed_shows_a_notice_once_until_the_cut_moves(store):
    class TrimmingChat(ScriptedChat):
        def _reply(self, ledger):
            yield ContextTrimmed(dropped_messages=4, dropped_tokens=1234, repeated=len(self.messages) > 2)
            yield from super()._reply(ledger)

    app = make_app(TrimmingChat([("final", "fine")], [("final", "again")]), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "long chat")
        notice = "the oldest 4 messages (1234 tokens) are left out"
        assert notice in app.query_one(".notice").render().plain
        assert any(notice in n.message for n in app._notifications)
        assert app.query_one(AssistantTurn).answer_text == "fine"
        await send(pilot, app, "more")  # the same messages left out: said already
        assert len(app.query(".notice")) == 1 and sum(notice in n.message for n in app._notifications) == 1


# ---- snapshots (pytest-textual-snapshot; review with --snapshot-update) ---------------------------

def _snapshot_app(tmp_path, collapse: bool):
    script = [("analysis", "The user asks for a haiku about MLX. Keep it 5-7-5. "),
              ("analysis", "Mention Apple silicon."),
              ("final", "**Haiku**\n\nUnified memory —\nMetal threads hum in the dark,\ntokens fall like rain.\n")]
    app = ChatApp(ScriptedChat(script), model_name="gpt-oss-20b", store=ConversationStore(tmp_path),
                  collapse_on_answer=collapse)
    return app


async def _still_cursor(pilot):
    pilot.app.query_one(PromptInput).cursor_blink = False  # a blinking cursor made snapshots flaky


async def _run_turn(pilot):
    app = pilot.app
    await _still_cursor(pilot)
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
    assert snap_compare(app, terminal_size=SIZE, run_before=_still_cursor)


async def test_typing_while_a_row_has_the_focus_goes_to_the_input(store):
    """With a Reasoning row focused (Shift+Tab, or a click to open it), typed text went nowhere
    and Enter only unfolded the row."""
    app = make_app(ScriptedChat(THOUGHT, THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "hello")
        app.query_one(AssistantTurn).reasoning.query_one("CollapsibleTitle").focus()
        await pilot.pause()
        await pilot.press(*"again?")
        prompt = app.query_one(PromptInput)
        assert prompt.text == "again?" and app.focused is prompt
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.replies_finished == 2)
        assert [w.render().plain for w in app.query(UserMessage)] == ["hello", "again?"]


async def test_reopening_the_open_chat_after_a_failed_save_keeps_its_turns(store, tmp_path, monkeypatch):
    """Enter on the open chat in the list reloaded its file, which lacked the turn a failed
    save did not write: the turn was gone. A copy is written once, when the chat is left."""
    monkeypatch.chdir(tmp_path)
    app = make_app(ScriptedChat(THOUGHT, THOUGHT, THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "turn one")
        monkeypatch.setattr(store, "save_keeping_others", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
        await send(pilot, app, "turn two")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen.focused, OptionList))
        await pilot.press("enter")
        await wait_until(pilot, lambda: not isinstance(app.screen, ModalScreen))
        assert [w.render().plain for w in app.query(UserMessage)] == ["turn one", "turn two"]
        assert not list(tmp_path.glob("gptoss-mlx-chat-*.json"))
        await pilot.press("ctrl+n")
        await pilot.press("ctrl+n")
        (copy,) = tmp_path.glob("gptoss-mlx-chat-*.json")
        assert "turn two" in copy.read_text()


async def test_a_paste_while_a_row_has_the_focus_goes_to_the_input(store):
    from textual import events

    app = make_app(ScriptedChat(THOUGHT), store)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "hello")
        app.query_one(AssistantTurn).reasoning.query_one("CollapsibleTitle").focus()
        await pilot.pause()
        app.focused.post_message(events.Paste("pasted\ntext"))
        await wait_until(pilot, lambda: app.query_one(PromptInput).text == "pasted\ntext")
