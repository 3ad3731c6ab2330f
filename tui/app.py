"""The gptoss-mlx chat TUI: live chain of thought, a reasoning-effort switch, saved chats.

    gptoss-mlx tui [--model M] [-e low|medium|high]      (or: python -m gptoss_mlx.tui)

The app drives a :class:`gptoss_mlx.chat.Chat` from a thread worker; the model itself loads and
runs on the engine thread (gptoss_mlx/engine_thread.py), whatever worker asks. Every event
(reasoning delta, answer delta, tool call, context trimmed, done) is handed to the UI thread,
which streams it into the current turn. Conversations are saved after each reply (tui/store.py).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import os
import re
import signal
import threading
import time
from typing import Callable, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.worker import get_current_worker
from textual.widgets import (
    Button, Collapsible, Footer, Input, Label, LoadingIndicator, Markdown, OptionList, Static,
    TextArea,
)
from textual.widgets.option_list import Option
from rich.text import Text

from gptoss_mlx.chat import (
    ANSWER_CHANNELS, AnswerDelta, Chat, ChatFileError, ContextTrimmed, Done, ReasoningDelta, ToolCall, reply_cut,
)
from gptoss_mlx.chat_file import check_chat_file
from gptoss_mlx.cli.common import message_text
from gptoss_mlx.cli.lineedit import input_history
from gptoss_mlx.engine_thread import engine_thread
from gptoss_mlx.generate import ContextLengthError
from gptoss_mlx.harmony import EFFORTS, Message
from gptoss_mlx.memory import total_experts
from gptoss_mlx.store import CUT_NOTES, UNANSWERED, ConversationStore, saved_elsewhere_note, title_for
from gptoss_mlx.tools import Toolbox, ToolResult, run_with_tools
from gptoss_mlx.tools.approval import controls_shown, hold_carriage_return, render_code_text

HANG_UP_S = 30.0  # after a closed terminal: the most the reply under way gets to stop
TYPE_AHEAD_S = 0.5  # a dialog's Y/N keys count only this long after it shows (not typed ahead)
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


def _read_terminal_input_leniently() -> None:
    """Textual's Linux driver decodes the terminal's input as strict UTF-8: one byte that is
    not (a paste from a Latin-1 file) raised in its input thread and ended the app, with the
    reply under way and the text being typed lost. Such bytes are read as U+FFFD instead, as
    the terminal chat sends them; and an ESC inside a paste is shown as ␛ (PastedEscapes)."""
    try:
        from textual.drivers import linux_driver
    except ImportError:  # Windows
        return
    if getattr(linux_driver, "getincrementaldecoder", None) is codecs.getincrementaldecoder:
        linux_driver.getincrementaldecoder = lambda encoding: functools.partial(
            PastedEscapes, codecs.getincrementaldecoder(encoding)(errors="replace"))


class PastedEscapes:
    """A decoder of the terminal's input that turns each ESC inside a bracketed paste into ␛
    (U+241B). Textual 8's parser read the characters after an ESC in a paste as keys, outside
    the paste: a pasted log line with a colour code (ESC[31m) sent the paste's middle line as a
    message (its line break pressed Enter) and lost the rest. A key's ESC, outside pastes, is
    passed on at once (the Escape key is never held back)."""

    START, END = "\x1b[200~", "\x1b[201~"

    def __init__(self, decoder):
        self.decoder = decoder
        self.pasting = False
        self.held = ""  # inside a paste: the start of what may be its end marker
        self.before = ""  # the last characters passed on outside a paste (a start marker split)

    def decode(self, data: bytes, final: bool = False) -> str:
        text, self.held = self.held + self.decoder.decode(data, final), ""
        out = []
        while text:
            if not self.pasting:
                seen = self.before + text
                at = seen.find(self.START)
                if at < 0:
                    out.append(text)
                    self.before = seen[-len(self.START):]
                    break
                cut = at + len(self.START) - len(self.before)  # (within text: the marker's end)
                out.append(text[:cut])
                text, self.pasting, self.before = text[cut:], True, ""
                continue
            at = text.find(self.END)
            if at < 0:
                keep = next((k for k in range(len(self.END) - 1, 0, -1)
                             if not final and text.endswith(self.END[:k])), 0)
                text, self.held = (text[:-keep], text[-keep:]) if keep else (text, "")
                out.append(text.replace("\x1b", "\u241b"))
                break
            out.append(text[:at].replace("\x1b", "\u241b") + self.END)
            text, self.pasting = text[at + len(self.END):], False
        return "".join(out)


_read_terminal_input_leniently()


# ---- widgets ----------------------------------------------------------------------------------

MAX_RECALLED = 1000  # earlier prompts ↑ reaches in the TUI (the history file keeps them all)


class PromptInput(TextArea):
    """Multi-line prompt: Enter sends, Shift+Enter or Ctrl+J adds a line, Up/Down on the first
    or last line recall earlier prompts."""

    class Submitted(TextualMessage):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, compact=True, **kwargs)
        self.sent: list[str] = []  # earlier prompts, oldest first
        self.kept = None  # where sent prompts are kept across sessions (use_history)
        self._recall = 0  # 0 = not recalling; k = the k-th most recent prompt
        self._draft = ""  # what the input held when recalling began: Down past the newest returns it

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            if self.text.strip():  # as typed, less blank lines around it (pasted code kept its
                self.post_message(self.Submitted(message_text(self.text)))  # first line's indent)
            return
        if event.key.startswith("alt+"):
            # Terminals that send Alt as ESC + the key (tmux, most Linux ones) give Alt+C as a
            # printable "c": it was typed into the input, and the app's Alt+C never ran. Left
            # to the bindings (not to TextArea's handler, which types the character).
            event.prevent_default()
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.prevent_default()
            event.stop()
            self.insert("\n")
            return
        if event.key == "up" and self.cursor_location[0] == 0 and self._recall < len(self.sent):
            event.prevent_default()
            event.stop()
            if self._recall == 0:
                self._draft = self.text
            self._recall += 1
            self._show_recalled()
            return
        if event.key == "down" and self._recall > 0 and self.cursor_location[0] == self.document.line_count - 1:
            event.prevent_default()
            event.stop()
            self._recall -= 1
            self._show_recalled()
            return
        await super()._on_key(event)

    def _show_recalled(self) -> None:
        self.text = self.sent[-self._recall] if self._recall else self._draft
        self.move_cursor(self.document.end)

    def use_history(self, history) -> None:
        """Earlier prompts from ``history`` (a prompt_toolkit history: the file the terminal chat
        keeps too), newest last, and the prompts sent from now on go into it."""
        try:
            self.sent = list(reversed(list(history.load_history_strings())))[-MAX_RECALLED:]
        except (OSError, ValueError):  # unreadable: this session's prompts only
            self.sent = []
        self.kept = history

    def remember(self, text: str) -> None:
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
            if self.kept is not None:
                self.kept.store_string(text)
        self._recall = 0

    def keep_draft(self) -> bool:
        """What the input holds, unsent, goes into the history (↑ brings it back, here or in the
        terminal chat): True when there was such a draft (not an earlier prompt recalled)."""
        draft = message_text(self.text)
        if not draft.strip() or (self._recall and draft == self.sent[-self._recall]):
            return False
        self.remember(draft)
        return self.kept is not None


class EffortSwitch(Horizontal):
    """low · medium · high, always visible; click one (or Ctrl+T) to switch."""

    def compose(self) -> ComposeResult:
        yield Label("effort:", classes="effort-label")
        for level in EFFORTS:
            yield Label(level, id=f"effort-{level}", classes="effort-choice")

    def show(self, effort: str) -> None:
        for level in EFFORTS:  # a marker as well as a colour: readable without colours too
            label = self.query_one(f"#effort-{level}", Label)
            label.set_class(level == effort, "-active")
            label.update(f"● {level}" if level == effort else f"○ {level}")

    def on_click(self, event) -> None:
        widget = event.widget
        if widget is not None and widget.id and widget.id.startswith("effort-"):
            self.app.set_effort(widget.id.removeprefix("effort-"))


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(controls_shown(text), markup=False, classes="user")


class AssistantTurn(Vertical):
    """One reply: collapsible Reasoning sections that stream live, tool-call rows, the answer
    as Markdown, and a stats line. Reasoning written after a tool's result (the model reading
    it) gets a section of its own below that result, so the turn reads in the order it
    happened; so does text the model writes to the user before a call or before thinking on (a
    preamble: "Let me check the weather."), which stays above what follows it, apart from the
    answer."""

    def __init__(self, collapse_on_answer: bool, show_reasoning: bool, saved: list | None = None):
        """``saved``: the messages of a reply from a resumed conversation, shown at once."""
        super().__init__(classes="assistant")
        self.collapse_on_answer = collapse_on_answer
        self.saved = saved or []
        self._text = ""  # the text under way (in the .answer block): the answer, unless more follows
        self._source: tuple = ()  # its message: (channel, index in the reply)
        self._finals: list[str] = []  # the texts on an answer's channel that more followed, in order
        self.preambles: list[str] = []  # the other texts that more followed (a call, reasoning), in order
        self._texts: list[str] = [""]  # each reasoning section's text, in order
        self._thinking = None  # the message of the reasoning text last shown
        self._after_tool = False  # a tool row came after the last reasoning section
        self._streams = {}
        self._cr = set()  # the Markdown whose streamed text so far ends with a "\r" (held back)
        self.set_class(not show_reasoning, "-hide-reasoning")

    def compose(self) -> ComposeResult:
        # hidden until the first reasoning arrives (a reply may open with an answer or a call)
        yield _reasoning_section()
        yield Markdown(classes="answer")
        yield Static("", classes="stats")

    async def on_mount(self) -> None:
        if not self.saved:
            return
        for m in self.saved:
            if m.role == "tool":
                await self.handle(ToolResult(m.name or "tool", m.text, not m.text.startswith("Error:")))
            elif m.is_tool_call:
                await self.handle(ToolCall(m.recipient, m.text, m.channel))
            elif m.channel == "analysis":
                await self._reason(m.text, id(m), stream=False)
            else:
                await self._answer(m.text, (m.channel, id(m)), stream=False)  # each message a block
        await self.finish()
        for section in self.sections:
            section.collapsed = bool(self.answer_text)
        cut = reply_cut(self.saved)  # the reply was cut short when it was made
        if cut in CUT_NOTES:
            self.query_one(".stats", Static).update(CUT_NOTES[cut])

    @property
    def answer_text(self) -> str:
        """The answer: the turn's text on an answer's channel (final, or none), or else the text
        it ended with (a reply stopped in a preamble)."""
        parts = self._finals + ([self._text] if self._text and self._source[0] in ANSWER_CHANNELS else [])
        return "\n\n".join(parts) if parts else self._text

    @property
    def reasoning_text(self) -> str:
        """All of the turn's reasoning, as shown (a lone ``\\r`` ending one of its messages is
        its marker, ␍: the paragraph break after it would make it a Windows line end)."""
        return "".join(self._texts)

    @property
    def reasoning(self) -> Collapsible:
        """The first reasoning section."""
        return self.query_one(".reasoning", Collapsible)

    @property
    def sections(self) -> list[Collapsible]:
        return list(self.query(".reasoning").results(Collapsible))

    def on_paste(self, event) -> None:
        """A paste while one of this turn's rows has the focus goes to the input, as typing does
        (ChatApp.on_key; the screen does not pass a paste on to the app)."""
        prompt = self.app.query_one(PromptInput)
        if event.text and not prompt.disabled:
            prompt.focus()
            prompt.insert(event.text)
            event.stop()

    async def _write(self, md: Markdown, text: str) -> None:
        """Stream the model's ``text`` to ``md``, its controls shown (controls_shown). A ``\\r``
        a piece ends with waits for the next: with its ``\\n``, a Windows line end (the full
        text's re-parse shows a lone one at the end)."""
        text, held = hold_carriage_return(text, md in self._cr)
        (self._cr.add if held else self._cr.discard)(md)
        if md not in self._streams:
            self._streams[md] = Markdown.get_stream(md)
        if text:
            await self._streams[md].write(controls_shown(text))

    async def _show_held(self, keep: Markdown | None = None) -> None:
        """Other text or a row follows: a ``\\r`` held back (``_write``) in any Markdown but
        ``keep`` is a lone one, shown."""
        for md in [md for md in self._cr if md is not keep]:
            self._cr.discard(md)
            if md in self._streams:
                await self._streams[md].write(controls_shown("\r"))

    async def _end_text(self) -> None:
        """The text under way is followed by something else (another message, a call, more
        reasoning): it stays where it is, a preamble unless it is on an answer's channel, and
        the next text starts below what comes next."""
        if not self._text:
            return
        md = self.query_one(".answer", Markdown)
        if md in self._streams:
            await self._streams.pop(md).stop()
        self._cr.discard(md)
        answer = self._source[0] in ANSWER_CHANNELS
        md.set_classes("answer-part" if answer else "preamble")
        await md.update(controls_shown(self._text))  # the whole text, re-parsed (finish())
        (self._finals if answer else self.preambles).append(self._text)
        self._text = ""
        await self.mount(Markdown(classes="answer"), after=md)
        self._after_tool = True  # reasoning after it gets a section of its own below it

    async def _answer(self, text: str, source: tuple, stream: bool = True) -> None:
        """Text for the user from ``source`` (its message's channel and index)."""
        if self._text and source != self._source:
            await self._end_text()  # a preamble, then the answer: two messages, two blocks
        if not self._text and not self.reasoning_text:
            self.reasoning.add_class("-empty")  # no thinking before the answer: no empty section
        elif not self._text:
            self._titled()  # the thinking is over
            for section in self.sections:
                if self.collapse_on_answer:
                    section.collapsed = True  # the answer starts: fold the thinking away
        self._text += text
        self._source = source
        md = self.query_one(".answer", Markdown)
        await self._show_held(keep=md)
        if stream:
            await self._write(md, text)

    async def _reason(self, text: str, source, stream: bool = True) -> None:
        """Reasoning from ``source`` (its message); another message is a paragraph of its own."""
        await self._end_text()
        new_message = False
        if self._after_tool:  # the model reads a tool's result: a new section below it
            await self.mount(_reasoning_section(), before=self.query_one(".answer"))
            self._texts.append("")
            self._after_tool = False
        elif self._texts[-1] and source != self._thinking:
            new_message = True
            if self._texts[-1].endswith("\r"):  # a lone one: the paragraph break must not make it a line end
                self._texts[-1] = self._texts[-1][:-1] + controls_shown("\r")
            text = "\n\n" + text
        self._thinking = source
        self._texts[-1] += text
        section = self.sections[-1]
        section.remove_class("-empty")
        md = section.query_one(".reasoning-md", Markdown)
        await self._show_held(keep=None if new_message else md)
        if stream:
            await self._write(md, text)

    async def handle(self, event) -> None:
        """Show ``event``. What the model, a tool or a saved file wrote is shown with its control
        characters as markers (controls_shown): an escape sequence would drive the terminal."""
        if isinstance(event, ReasoningDelta) and event.channel == "commentary":
            # a preamble of a turn whose answer is held to a format: shown as it is when reopened
            await self._answer(event.text, (event.channel, event.message))
        elif isinstance(event, ReasoningDelta):
            await self._reason(event.text, (event.channel, event.message))
        elif isinstance(event, AnswerDelta):
            await self._answer(event.text, (event.channel, event.message))
        elif isinstance(event, (ToolCall, ToolResult)):
            if isinstance(event, ToolCall):
                text, title = event.arguments, f"tool call · {event.recipient}"
            else:
                text, title = event.content, f"{'result' if event.ok else 'error'} · {event.name}"
            row = Collapsible(Static(controls_shown(text), markup=False, classes="tool-args"),
                              title=controls_shown(title), collapsed=True, classes="tool-call")
            self._titled()  # a section's thinking ends at a call
            await self._show_held()
            if isinstance(event, ToolCall):
                await self._end_text()
            await self.mount(row, before=self.query_one(".answer"))
            self._after_tool = True
        elif isinstance(event, ContextTrimmed) and not event.repeated:  # said once until the cut moves
            await self.mount(Static(context_notice(event), markup=False, classes="notice"), before=0)
        elif isinstance(event, Done):
            self.query_one(".stats", Static).update(_stats_line(event))

    async def finish(self) -> None:
        """End the streams and re-parse the full texts (a code fence closed mid-stream can
        leave the streamed Markdown blank otherwise: oterm #308)."""
        for stream in self._streams.values():
            await stream.stop()
        self._streams.clear()
        self._cr.clear()
        for section, text in zip(self.sections, self._texts):
            await section.query_one(".reasoning-md", Markdown).update(controls_shown(text))
            if not text.split():
                section.display = False  # no empty section (showing is left to the CSS)
        self._titled()
        await self.query_one(".answer", Markdown).update(controls_shown(self._text))

    def _titled(self) -> None:
        """The sections written so far say how long they are, not "thinking…"."""
        for section, text in zip(self.sections, self._texts):
            section.title = f"Reasoning · {len(text.split())} words"


def _reasoning_section() -> Collapsible:
    """A Reasoning section, open while it streams; hidden (-empty) until its first words."""
    return Collapsible(Markdown(classes="reasoning-md"), title="Reasoning · thinking…", collapsed=False,
                       classes="reasoning -empty")


def context_notice(event: ContextTrimmed) -> str:
    parts = [f"the oldest {event.dropped_messages} messages ({event.dropped_tokens} tokens) are left out "
             "of this reply's prompt"] if event.dropped_messages else []
    if event.cut_result:
        parts.append("the tool results are cut to {} of their {} characters".format(*event.cut_result))
    return f"Context full: {'; '.join(parts)}"




def _stats_line(done: Done) -> str:
    s = done.stats
    cut = f" · {CUT_NOTES[done.finish_reason]}" if done.finish_reason in CUT_NOTES else ""
    return " · ".join([f"{s.generated_tokens} tokens", *_rates(s),
                       f"prompt {s.prompt_tokens} ({s.reused_tokens} cached)", f"peak {s.peak_memory_gb:.1f} GB"]) + cut


def _rates(s) -> list[str]:
    """The decode rate and time to first token, where there was a first token (a reply stopped
    while its prompt was read has neither: not "TTFT 0.00s · 0.0 tok/s")."""
    return [f"{s.decode_tps:.1f} tok/s", f"TTFT {s.ttft_s:.2f}s"] if s.generated_tokens else []


# ---- screens ----------------------------------------------------------------------------------

class TextPrompt(ModalScreen[str | None]):
    """Ask for a line or a block of text (rename, system prompt)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, title: str, value: str, multiline: bool):
        """``value`` is shown with its control characters as markers (controls_shown); saved
        unchanged, it comes back as it was given."""
        super().__init__()
        self.title_text, self.value, self.multiline = title, value, multiline
        self.shown = controls_shown(value)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            if self.multiline:
                yield TextArea(self.shown, id="value", soft_wrap=True)
            else:
                yield Input(self.shown, id="value")
            with Horizontal(classes="buttons"):
                yield Button("Save (Ctrl+S)", id="save", variant="primary")
                yield Button("Cancel (Esc)", id="cancel")

    def _value(self) -> str:
        w = self.query_one("#value")
        text = w.text if isinstance(w, TextArea) else w.value
        return self.value if text == self.shown else text

    def action_save(self) -> None:
        self.dismiss(self._value())

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_save()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()


class Deliberate(ModalScreen):
    """A dialog whose Y and N keys count only when they come after a pause (TYPE_AHEAD_S since
    it showed and since the key before): a "y" typed into the next message as the dialog
    appeared ran the model's code, and a sentence typed into the list went on into its
    dialog. Its buttons take clicks at once."""

    def on_mount(self) -> None:
        self._last_key_at = time.monotonic()  # as if a key came when it showed
        self._paused = False  # whether the key being handled came after a pause

    def on_key(self, event) -> None:  # before the key's binding runs
        now = time.monotonic()
        self._paused, self._last_key_at = now - self._last_key_at >= TYPE_AHEAD_S, now

    def typed_ahead(self) -> bool:
        return not self._paused


class ApproveCode(Deliberate):
    """The model wants to run Python code: show it, run only on Y; N declines (the model is
    told and goes on), Esc stops the reply (None), as it does outside the dialog."""

    BINDINGS = [Binding("y", "answer(True)", "Run it"), Binding("n", "answer(False)", "Don't run"),
                Binding("escape", "answer(None)", "Stop reply"), Binding("ctrl+q", "app.quit", "Quit")]

    def __init__(self, code: str):
        super().__init__()
        self.code = code

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("The model wants to run this Python code (sandboxed). Run it?", classes="dialog-title")
            with VerticalScroll(classes="code"):  # the whole code, scrollable, hidden characters shown
                yield Static(render_code_text(self.code))
            with Horizontal(classes="buttons"):
                yield Button("Run (Y)", id="yes", variant="warning")
                yield Button("Don't run (N)", id="no")
                yield Button("Stop reply (Esc)", id="stop")

    def action_answer(self, run: bool | None) -> None:
        if run is None or not self.typed_ahead():
            self.dismiss(run)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss({"yes": True, "no": False}.get(event.button.id))


class ConfirmDelete(Deliberate):
    """Delete a saved conversation? Y deletes; N, Esc or Enter keep it."""

    BINDINGS = [Binding("y", "answer(True)", "Delete"), Binding("n,escape", "answer(False)", "Keep")]

    def __init__(self, title: str):
        super().__init__()
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Text(controls_shown(f"Delete \"{self.title_text}\"? Its file is removed.")),
                        classes="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Keep (N)", id="no", variant="primary")
                yield Button("Delete (Y)", id="yes", variant="error")

    def action_answer(self, delete: bool) -> None:
        if not delete or not self.typed_ahead():
            self.dismiss(delete)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class ConversationList(ModalScreen[str | None]):
    """Saved conversations: Enter resumes, R renames, D (or Delete) asks to delete, Esc closes."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("r", "rename", "Rename"),
                Binding("delete,d", "delete", "Delete")]

    def __init__(self, store: ConversationStore):
        super().__init__()
        self.store = store
        self.deleted: set[str] = set()  # the conversations deleted here
        self._asking = False  # a ConfirmDelete is up (or on its way)
        self._titles: dict[str, str] = {}  # id -> title, as the list shows them

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Conversations — Enter: open · R: rename · D: delete · Esc: close", classes="dialog-title")
            yield OptionList(id="chats")

    def on_mount(self) -> None:
        self.refresh_list()

    def refresh_list(self, keep: str | None = None) -> None:
        """Rebuild the list; the highlight stays on ``keep`` if it is still there."""
        chats = self.query_one(OptionList)
        chats.clear_options()
        entries = self.store.list()
        self._titles = {e.id: e.title for e in entries}
        for e in entries:
            what = f"{e.messages} messages" if e.messages >= 0 else e.problem[:120]  # (why it cannot be opened)
            chats.add_option(Option(Text(controls_shown(f"{e.title}  ({what})")), id=e.id))
        problem = self.store.folder_problem()  # (a file in its place listed as no chats at all)
        if problem:
            chats.add_option(Option(Text(controls_shown(problem[0].upper() + problem[1:])), id="", disabled=True))
        elif not entries:
            chats.add_option(Option("No saved conversations yet", id="", disabled=True))
        else:
            ids = [e.id for e in entries]
            chats.highlighted = ids.index(keep) if keep in ids else 0
        chats.focus()

    def _selected(self) -> str | None:
        chats = self.query_one(OptionList)
        if chats.highlighted is None:
            return None
        return chats.get_option_at_index(chats.highlighted).id or None

    @on(OptionList.OptionSelected)
    def _open(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.dismiss(event.option.id)

    def action_close(self) -> None:
        self.dismiss(None)

    @work
    async def action_delete(self) -> None:
        """Asks first (ConfirmDelete: one at a time, however many Ds come before it shows); a
        file that cannot be removed is said, the list stays."""
        chat_id = self._selected()
        if not chat_id or self._asking:
            return
        self._asking = True
        try:
            if not await self.app.push_screen_wait(ConfirmDelete(self._titles.get(chat_id, ""))):
                return
        finally:
            self._asking = False
        try:
            self.store.delete(chat_id)
        except OSError as e:
            self.app.notify(f"Could not delete the conversation: {e}", severity="error", timeout=10)
            return
        self.deleted.add(chat_id)
        self.app.notify("Conversation deleted")
        self.refresh_list()

    @work
    async def action_rename(self) -> None:
        chat_id = self._selected()
        if not chat_id:
            return
        title = await self.app.push_screen_wait(
            TextPrompt("Rename conversation", self._titles.get(chat_id, ""), multiline=False))
        if title and title.strip():
            try:
                self.store.rename(chat_id, title.strip())
                if chat_id == self.app.chat_id:
                    self.app.chat_title = title.strip()  # the open chat's next save keeps it
            except (OSError, ValueError) as e:
                self.app.notify(f"Could not rename: {e}", severity="error")
            self.refresh_list(keep=chat_id)


# ---- the app ----------------------------------------------------------------------------------

class ChatApp(App):
    """Chat with gpt-oss. ``chat``: a ready Chat; or ``loader``: a function returning one, run
    in a worker with a visible loading state (errors become notifications, never a crash)."""

    TITLE = "gptoss-mlx"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("escape", "stop", "Stop reply", id="stop"),
        Binding("ctrl+t", "cycle_effort", "Effort", id="effort"),
        Binding("ctrl+r", "toggle_reasoning", "Show/hide reasoning", id="toggle.reasoning"),
        Binding("ctrl+o", "conversations", "Chats", id="chats"),
        Binding("ctrl+n", "new_chat", "New chat", id="new.chat"),
        Binding("ctrl+s", "edit_system", "System prompt", id="system"),
        Binding("alt+c", "copy_answer", "Copy answer", id="copy"),
        Binding("ctrl+q", "quit", "Quit", id="quit"),
    ]

    effort = reactive("medium")
    show_reasoning = reactive(True)
    generating = reactive(False)

    def __init__(self, chat: Chat | None = None, *, loader: Callable[[], Chat] | None = None,
                 model_name: str = "", store: ConversationStore | None = None,
                 collapse_on_answer: bool = True, effort: str | None = None,
                 toolbox: Toolbox | None = None, ask_before_running_code: bool = True):
        """``toolbox``: tools the model may call; with ``ask_before_running_code`` every piece of
        Python code waits for the user's Y in a dialog."""
        super().__init__()
        self.chat = chat
        # what each new chat starts from: the command line's settings and those set here since (not
        # an opened chat's own)
        self.defaults = chat.settings() if chat is not None else {}
        self.toolbox = toolbox
        if toolbox is not None and toolbox.python is not None and ask_before_running_code:
            toolbox.approve_code = self.approve_code
        self.loader = loader
        self.model_name = model_name
        self.store = store or ConversationStore()
        self.collapse_on_answer = collapse_on_answer
        self.chat_id = self.store.new_id()
        self.chat_title = "New chat"
        self._titled_by = None  # the message the title was made from (_submit)
        self._context_tokens = 0  # the next reply's prompt, as the status bar shows it
        self.last_done: Done | None = None
        self.replies_finished = 0  # completed (or stopped, or failed) replies
        self.quitting = False  # Ctrl+Q came during a reply: exit once it is stopped and saved
        self.exit_note: str | None = None  # where the chat went when it could not be saved in its place
        self.save_failed = False  # the chat's last save failed, and no copy holds it
        effort = effort or (chat.reasoning_effort if chat is not None else "medium")
        self.set_reactive(ChatApp.effort, effort)  # before mounting: no watcher yet
        if chat is not None:
            chat.reasoning_effort = self.defaults["reasoning_effort"] = effort

    # -- layout
    def compose(self) -> ComposeResult:
        with Horizontal(id="topbar"):
            yield Label(self.model_name or "gpt-oss", id="model")
            yield EffortSwitch(id="effort")
        yield VerticalScroll(id="transcript")
        yield LoadingIndicator(id="loading")
        yield PromptInput(id="prompt", placeholder="Message gpt-oss — Enter sends, Shift+Enter or Ctrl+J: new line")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(EffortSwitch).show(self.effort)
        self.query_one("#loading").display = False
        self._stats_before = None
        self.set_interval(0.5, self._tick)  # how far a long prompt has been read
        if threading.current_thread() is threading.main_thread():  # (not under some test runners)
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: no SIGHUP
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._hang_up)
        if self.chat is None and self.loader is not None:
            self.load_model()
        self.update_status()
        prompt = self.query_one(PromptInput)
        prompt.use_history(input_history(self.store.history_file))
        prompt.focus()

    # -- model loading
    @work(thread=True, exclusive=True, group="load")
    def load_model(self) -> None:
        self.call_from_thread(self._loading, True)
        try:
            chat = engine_thread().call(self.loader)  # MLX work belongs on the engine thread
        except Exception as e:  # noqa: BLE001  — shown to the user, the app stays up
            self.call_from_thread(self._load_failed, str(e) or type(e).__name__)
        else:
            self.call_from_thread(self._loaded, chat)
        finally:
            self.call_from_thread(self._loading, False)

    def _loading(self, on: bool) -> None:
        self.query_one("#loading").display = on
        self.update_status("Loading the model…" if on else None)

    def _loaded(self, chat: Chat) -> None:
        chat.reasoning_effort = self.effort
        self.chat = chat
        self.defaults = chat.settings()  # the command line's: each new chat starts from them
        self.notify("Model loaded", timeout=3)

    def _load_failed(self, message: str) -> None:
        self.notify(message, title="Could not load the model", severity="error", timeout=30)
        shown = controls_shown(f"Could not load the model:\n{message}")
        self.query_one("#transcript").mount(Static(shown, markup=False, classes="error"))

    # -- state
    def watch_effort(self, effort: str) -> None:
        if self.chat is not None:
            self.chat.reasoning_effort = effort
        self.query_one(EffortSwitch).show(effort)
        self.update_status()

    def watch_show_reasoning(self, show: bool) -> None:
        for turn in self.query(AssistantTurn):
            turn.set_class(not show, "-hide-reasoning")

    def set_effort(self, effort: str) -> None:
        """The user's choice: this chat's effort, and each new chat's from now on."""
        self.effort = effort
        self.defaults["reasoning_effort"] = effort
        self.notify(f"Reasoning effort: {effort} (from the next reply)", timeout=2)

    def _next_prompt_tokens(self) -> int:
        """The next reply's prompt as the model will get it: once the chat is past the context,
        its oldest turns left out (the whole history counted gave "context 394/300")."""
        try:
            return len(self.chat.fitted_prompt()[0])
        except ContextLengthError:  # it cannot fit: what it is
            return len(self.chat.prompt_tokens())

    def update_status(self, message: str | None = None) -> None:
        parts = [self.model_name or "gpt-oss", f"effort {self.effort}"]
        if self.chat is not None:
            if not self.generating:  # the worker changes the messages meanwhile
                self._context_tokens = self._next_prompt_tokens()
            parts.append(f"context {self._context_tokens}/{self.chat.engine.max_context}")
        if self.last_done is not None:
            s = self.last_done.stats
            parts += [*_rates(s)[::-1], f"peak {s.peak_memory_gb:.1f} GB"]
            pool = getattr(self.chat.engine.model, "expert_pool", None)
            if pool is not None:  # streamed experts: the pool's size, how often a chosen one was in it
                parts.append(f"experts {pool.slots}/{total_experts(pool.config)} on the GPU, "
                             f"{pool.stats.hit_rate:.0%} hits")
        if message:
            parts.append(message)
        elif self.generating and self.chat.stop_requested:  # a prompt's chunk under way ends first
            parts.append("stopping…")
        elif self.generating:
            read = self._prompt_read()
            parts.append(f"reading the prompt: {read[0]:,} of {read[1]:,} tokens (Esc stops)" if read
                         else "replying… (Esc stops)")
        self.query_one("#status", Static).update(" · ".join(parts))

    def _prompt_read(self) -> tuple[int, int] | None:
        """While this reply's prompt is read (prefill): (tokens read, tokens in all). The
        engine's statistics and cache are read from this thread, as the terminal chat does."""
        engine = self.chat.engine if self.chat is not None else None
        stats = getattr(engine, "stats", None)
        if stats is None or stats is self._stats_before or not stats.prompt_tokens:
            return None
        read = min(len(engine.prompt_cache.tokens), stats.prompt_tokens)
        return (read, stats.prompt_tokens) if read < stats.prompt_tokens else None

    def _tick(self) -> None:
        if self.generating and not self.quitting:
            self.update_status()

    # -- sending
    @on(PromptInput.Submitted)
    def _submit(self, event: PromptInput.Submitted) -> None:
        if self._busy():
            return
        prompt = self.query_one(PromptInput)
        prompt.remember(event.text)
        prompt.text = ""
        transcript = self.query_one("#transcript", VerticalScroll)
        turn = AssistantTurn(self.collapse_on_answer, self.show_reasoning)
        asked = UserMessage(event.text)
        if self.chat_title == "New chat":
            self.chat_title = title_for(event.text)
            self._titled_by = asked  # taken back, it takes the title with it (_take_back)
        transcript.mount(asked)
        transcript.mount(turn)
        transcript.anchor()
        self.generating = True
        self._stats_before = self.chat.engine.stats  # the last reply's: _prompt_read tells them apart
        self.update_status()
        self.reply(event.text, turn, asked)

    def approve_code(self, code: str) -> bool | None:
        """Called from the reply worker: ask in a dialog and wait for the answer (None: the
        reply is stopping, by Esc in the dialog or out of it, or quitting)."""
        answered, result = threading.Event(), []

        def ask():
            self.push_screen(ApproveCode(code), lambda ok: (result.append(ok), answered.set()))

        worker = get_current_worker()
        self.call_from_thread(ask)
        while not answered.wait(0.2):
            if worker.is_cancelled:  # the app is quitting with the dialog open
                return None
            if self.chat is not None and self.chat.stop_requested:  # Ctrl+Q while the dialog is open
                self.call_from_thread(self.pop_screen)
                return None
        if result[0] is None and self.chat is not None:  # Esc in the dialog: the reply stops
            self.chat.stop()
        return result[0]

    @work(thread=True, exclusive=True, group="reply")
    def reply(self, text: str, turn: AssistantTurn, asked: UserMessage) -> None:
        before, failed = len(self.chat.messages), False
        events = run_with_tools(self.chat, text, self.toolbox or Toolbox())  # no tools: calls get an error
        try:
            for event in events:
                self.call_from_thread(turn.handle, event)
                if isinstance(event, ContextTrimmed) and not event.repeated:
                    self.call_from_thread(self.notify, context_notice(event), severity="warning",
                                          timeout=8)
                elif isinstance(event, Done):
                    self.last_done = event
        except ContextLengthError as e:  # the chat took its message back: nothing else changed
            self.call_from_thread(self.notify, str(e), title="Too long", severity="error", timeout=15)
            failed = True
        except Exception as e:  # noqa: BLE001  — a failed reply is reported; the chat stays
            self.call_from_thread(self.notify, f"{type(e).__name__}: {e}", title="The reply failed",
                                  severity="error", timeout=15)
            failed = True
        finally:
            if len(self.chat.messages) == before:  # the chat took the message back (failed, or
                if self.quitting and not failed:   # stopped before any reply): the transcript too,
                    self.chat.messages.append(Message("user", text))  # but quitting saves it
                else:
                    self.call_from_thread(self._take_back, text, turn, asked, not failed)
            elif not failed and self.chat.stop_requested and not self.quitting:
                self.call_from_thread(self._stopped)
            self.call_from_thread(self._reply_finished, turn)

    async def _take_back(self, text: str, turn: AssistantTurn, asked: UserMessage, stopped: bool) -> None:
        """The chat took the message back (nothing of the turn is in its history): so does the
        transcript, and the text returns to the input to be sent again (unless something new
        was typed meanwhile)."""
        await asked.remove()
        await turn.remove()
        if self._titled_by is asked:  # the chat's first message: the next one names it (a
            self.chat_title = "New chat"  # stopped message was the title of a chat without it, helper-155)
        prompt = self.query_one(PromptInput)
        restored = not prompt.text
        if restored:
            prompt.text = text
            prompt.move_cursor(prompt.document.end)
        if stopped:
            where = ("back in the input, to edit or send again" if restored else
                     "in the input's history (↑), beside what you typed meanwhile")
            self.notify(f"Stopped before the reply: the message is {where}", timeout=5)

    def _stopped(self) -> None:
        """Esc stopped a reply that kept something: the message stays in the chat (and so not
        in the input, where Enter would send it twice)."""
        self.notify("Stopped; the partial reply is kept", timeout=3)

    async def _reply_finished(self, turn: AssistantTurn) -> None:
        if turn.is_attached:
            await turn.finish()
        self.generating = False
        saved = self.autosave()
        self.update_status()
        self.replies_finished += 1
        if self.quitting:
            self._exit_keeping(None if saved else self.keep_conversation())

    def autosave(self) -> bool:
        """Save the chat, unless it is as it was read or last written and its file is there: a
        chat only opened (then Ctrl+Q) is left alone, or a window with it open would save its
        next reply as a "(copy)". False (and said) when it could not be saved."""
        if self.chat is None or not self.chat.messages:
            return True
        if self.store.unchanged(self.chat, self.chat_id, self.chat_title):
            return True
        try:
            self.chat_id, self.chat_title, note = self.store.save_keeping_others(self.chat, self.chat_id,
                                                                                 self.chat_title)
        except OSError as e:
            self.notify(f"Could not save the conversation: {e}", severity="error")
            self.save_failed = True
            return False
        self.save_failed = False
        if note:
            self.notify(note[0].upper() + note[1:], severity="warning", timeout=10)
        return True

    def keep_conversation(self) -> str | None:
        """Before the chat is left (quit, a new chat, another one opened): saved, or, where the
        chats folder cannot take it, copied elsewhere (store.save_elsewhere); what to tell the
        user about the copy, or None when it was saved in its place."""
        if self.autosave():
            return None
        path = self.store.save_elsewhere(self.chat, self.chat_id, self.chat_title)
        self.save_failed = path is None  # the copy holds it now (a second one would be the same)
        if path is None:
            return "The conversation could not be saved anywhere."
        return saved_elsewhere_note(path)

    # -- actions
    def on_unmount(self) -> None:
        if self.toolbox is not None:
            self.toolbox.close()

    def _hang_up(self) -> None:
        """The terminal closed (SIGHUP): as Ctrl+Q, the reply under way stops and the chat is
        saved with it before the app ends (the default action ended it at once, unsaved). The
        process then ends even where Textual's exit blocks on the terminal that has gone."""
        asyncio.ensure_future(self.action_quit())
        threading.Thread(target=self._end_after_hang_up, daemon=True).start()

    def _end_after_hang_up(self) -> None:
        deadline = time.monotonic() + HANG_UP_S
        while self.generating and time.monotonic() < deadline:  # the reply stops, then is saved
            time.sleep(0.1)
        time.sleep(2.0)  # the save after it, and Textual's own exit
        os._exit(129)  # 128 + SIGHUP, as a shell reports a hung-up job

    async def action_quit(self) -> None:
        """Quit. A reply being written stops at its next token first, and the app exits once
        the chat is saved with the partial answer (``_reply_finished``); a second Ctrl+Q while
        that takes long saves what is there and quits at once."""
        if self.generating and self.chat is not None and not self.quitting:
            self.quitting = True
            self.chat.stop()
            if self.toolbox is not None:
                self.toolbox.interrupt()
            self.update_status("stopping the reply and saving…")
            return
        self._exit_keeping(self.keep_conversation())

    def _exit_keeping(self, moved: str | None) -> None:
        """Exit; where the chat went, when it could not be saved in its place, and where an
        unsent message went, is ``exit_note`` (``gptoss-mlx tui`` prints it after the app, a note a
        line: a path Rich wraps is hard to copy)."""
        notes = [moved] if moved else []
        with contextlib.suppress(NoMatches):
            if self.query_one(PromptInput).keep_draft():
                notes.append("The message you had not sent is in the input history: "
                             "↑ at the prompt brings it back (here or in gptoss-mlx chat).")
        self.exit_note = "\n".join(notes) or None
        self.exit()

    def action_stop(self) -> None:
        if self.generating and self.chat is not None:
            self.chat.stop()  # the reply says what was kept when it ends (reply)
            if self.toolbox is not None:
                self.toolbox.interrupt()  # a python cell under way too, not at its timeout
            self.update_status()

    def action_cycle_effort(self) -> None:
        self.set_effort(EFFORTS[(EFFORTS.index(self.effort) + 1) % len(EFFORTS)])

    def action_toggle_reasoning(self) -> None:
        self.show_reasoning = not self.show_reasoning
        self.notify("Reasoning shown" if self.show_reasoning else "Reasoning hidden", timeout=2)

    def action_toggle_collapse(self) -> None:
        self.collapse_on_answer = not self.collapse_on_answer
        state = "on" if self.collapse_on_answer else "off"
        self.notify(f"Collapse reasoning when the answer starts: {state}", timeout=3)

    def notify(self, message: str, *, markup: bool = False, **kwargs) -> None:
        """Every notification: its text (errors quote files, paths and the model) with control
        characters as markers (controls_shown), and not read as markup unless asked."""
        super().notify(controls_shown(message), markup=markup, **kwargs)

    def action_help_quit(self) -> None:
        """Ctrl+C, which does not quit here: what does (Textual's own hint showed its markup as
        text, notifications being plain), and during a reply what stops it."""
        stop = "Esc stops the reply; " if self.generating else ""
        self.notify(f"{stop}Ctrl+Q quits the app", title="Do you want to quit?")

    def on_key(self, event) -> None:
        """Typing while a reasoning or tool row has the focus goes to the input (it went
        nowhere, and the message was lost)."""
        if len(self.screen_stack) > 1 or not event.is_printable or not event.character:
            return  # a dialog's keys are its own
        prompt = self.query_one(PromptInput)
        if self.focused is prompt or prompt.disabled:
            return
        prompt.focus()
        prompt.insert(event.character)
        event.stop()

    def _busy(self) -> bool:
        """Whether there is no chat to change now (saying why)."""
        if self.chat is None:
            self.notify("No model loaded yet", severity="warning")
        elif self.generating:
            self.notify("A reply is still being written (Esc stops it)", severity="warning")
        return self.chat is None or self.generating

    def action_new_chat(self) -> None:
        if self._busy():
            return
        self._leave_conversation()
        self._new_chat()

    def _leave_conversation(self) -> None:
        """A chat whose last save failed is kept (keep_conversation) before another takes its
        place; any other is saved already."""
        if not self.save_failed:
            return
        moved = self.keep_conversation()
        if moved:
            self.notify(moved, severity="warning", timeout=15)

    def _new_chat(self) -> None:
        self.chat.reset()
        self.chat.apply(self.defaults)  # not an opened chat's effort or tools
        self.effort = self.chat.reasoning_effort
        self.chat_id, self.chat_title = self.store.new_id(), "New chat"
        if self.toolbox is not None:  # nothing of the last conversation's python session or pages
            self.toolbox.new_conversation()
        self.query_one("#transcript").remove_children()
        self.last_done = None
        self.update_status()

    @work
    async def action_conversations(self) -> None:
        if self._busy():
            return
        listed = ConversationList(self.store)
        chat_id = await self.push_screen_wait(listed)
        if self.chat_id in listed.deleted:  # the open one: it is closed, not saved again later
            self._new_chat()
            if not chat_id:
                self.notify("The open conversation was deleted: this is a new chat", timeout=5)
        if chat_id:
            self.open_conversation(chat_id)

    def open_conversation(self, chat_id: str) -> None:
        """Open a saved chat in place of this one. The open chat itself stays as it is (its file
        may lack what a failed save did not write); a file that cannot be read leaves this one."""
        if chat_id == self.chat_id and self.chat.messages:
            self.notify("This conversation is the one open", timeout=3)
            return
        try:
            check_chat_file(self.store.path(chat_id))
            self._leave_conversation()
            title = self.store.load(self.chat, chat_id)
        except (ChatFileError, ValueError) as e:
            self.notify(str(e), title="Could not open the conversation", severity="error", timeout=10)
            return
        self.chat_id, self.chat_title = chat_id, title
        tools = self.chat.keep_functions(self.defaults.get("functions", []))  # only those that can run here
        if tools:
            self.notify(controls_shown(tools[0].upper() + tools[1:]), title="Functions", timeout=10)
        if self.toolbox is not None:
            self.toolbox.new_conversation()
        self.effort = self.chat.reasoning_effort
        self.last_done = None
        self.chat.answer_unrun_call()  # a call saved before it ran: shown, and the model told (helper-157)
        self.render_history()
        self.update_status()

    def render_history(self) -> None:
        """Rebuild the transcript from the chat's messages (a resumed conversation)."""
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.remove_children()
        reply: list = []
        messages = self.chat.messages
        for i, m in enumerate(messages + [None]):
            if (m is None or m.role == "user") and reply:
                transcript.mount(AssistantTurn(True, self.show_reasoning, saved=reply))
                reply = []
            if m is not None and m.role == "user":
                transcript.mount(UserMessage(m.text))
                if i + 1 == len(messages) or messages[i + 1].role == "user":  # (quit before its reply began)
                    transcript.mount(Static(UNANSWERED, classes="stats unanswered"))
            elif m is not None:
                reply.append(m)
        transcript.anchor()  # at its end, the latest turn in view, where the next one goes

    @work
    async def action_edit_system(self) -> None:
        if self.chat is None:
            return
        text = await self.push_screen_wait(TextPrompt(
            "System prompt (the developer message's instructions; empty: none)",
            self.chat.instructions or "", multiline=True))
        if text is not None:
            self.chat.instructions = self.defaults["instructions"] = text.strip() or None
            self.notify("System prompt set" if text.strip() else "System prompt removed", timeout=3)

    def action_copy_answer(self) -> None:
        turns = list(self.query(AssistantTurn))
        if turns and turns[-1].answer_text:
            self.copy_to_clipboard(turns[-1].answer_text)
            self.notify("Answer copied (OSC 52)", timeout=2)

    def action_copy_code(self) -> None:
        turns = [t for t in self.query(AssistantTurn) if CODE_BLOCK.search(t.answer_text)]
        if turns:
            self.copy_to_clipboard(CODE_BLOCK.findall(turns[-1].answer_text)[-1])
            self.notify("Code block copied (OSC 52)", timeout=2)
        else:
            self.notify("No code block in the answers yet", severity="warning")

    def action_export(self) -> None:
        if self.chat is None or not self.chat.messages:
            self.notify("Nothing to export yet", severity="warning")
            return
        try:
            path = self.store.export_markdown(self.chat, self.chat_title, self.chat_id)
        except OSError as e:  # (an "exports" that is a file, a full or read-only disk: the app goes on)
            self.notify(f"Not exported: {e.strerror or e} ({e.filename or self.store.exports})",
                        severity="error", timeout=10)
            return
        self.notify(f"Exported to {path}", timeout=8)

    def get_system_commands(self, screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for level in EFFORTS:
            yield SystemCommand(f"Reasoning effort: {level}", "Applies from the next reply",
                                lambda level=level: self.set_effort(level))
        yield SystemCommand("Show or hide all reasoning", "Ctrl+R", self.action_toggle_reasoning)
        yield SystemCommand("Collapse reasoning when the answer starts (toggle)",
                            "On by default", self.action_toggle_collapse)
        yield SystemCommand("Conversations", "Resume, rename or delete saved chats (Ctrl+O)",
                            self.action_conversations)
        yield SystemCommand("New conversation", "Ctrl+N", self.action_new_chat)
        yield SystemCommand("Edit system prompt", "Ctrl+S", self.action_edit_system)
        yield SystemCommand("Export conversation to Markdown", "Into the data directory's exports/",
                            self.action_export)
        yield SystemCommand("Copy last answer", "Alt+C (OSC 52)", self.action_copy_answer)
        yield SystemCommand("Copy last code block", "OSC 52", self.action_copy_code)
