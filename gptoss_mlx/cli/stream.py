"""Printing a reply as it streams, and answering one message (``generate``, piped ``chat``)."""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field

from ..chat import AnswerDelta, ContextTrimmed, Done, ReasoningDelta, ToolCall
from ..generate import ContextLengthError, NonFiniteLogitsError, Stats
from ..loading import CheckpointError
from ..tools import Toolbox, ToolResult, run_with_tools
from ..tools.approval import hold_carriage_return
from . import common
from .common import DIM, RESET, CLIError, json_safe, make_toolbox, terminal_safe

BLANK = " \t\n"  # what a line with nothing on it holds


def from_first_line(text: str) -> str:
    """``text`` from its first line with something on it, that line's indentation kept."""
    lead = len(text) - len(text.lstrip(BLANK))
    return text[text.rfind("\n", 0, lead) + 1:]


def after_label(text: str, limit: int | None = None) -> str:
    """A call's arguments or a result after its label ("[result ← f]"), made safe to print: a
    space and the text from its first line with something on it to its last character that is
    not blank, cut at ``limit`` characters (" …" then); nothing for an empty one. (Made safe
    first: a lone ``\\r`` at its end is shown, and the edges and the cut are the shown text's.)"""
    text = from_first_line(terminal_safe(text).rstrip(BLANK))
    if limit is not None and len(text) > limit:
        text = text[:limit] + " …"
    return " " + text if text else ""


def replies(chat, text, toolbox):
    """One user turn: the loop that answers tool calls until the model is done. Without tools
    too: a call to a tool the chat does not have is answered with an error, and the model
    goes on (it ended the reply with nothing said)."""
    return run_with_tools(chat, text, toolbox or Toolbox())


class PromptProgress:
    """On a terminal, while the engine reads a long prompt (no event yet): one dim line saying
    how far it has got, redrawn in place and erased before the reply starts. The engine's
    statistics and cache are read from this thread: a new Stats object when the prefill starts,
    the cache's token list growing a chunk at a time."""

    DELAY_S = 1.0  # a prompt read faster shows nothing
    EVERY_S = 0.25

    def __init__(self, engine, out):
        self.engine, self.out = engine, out
        self.before = engine.stats  # the last reply's
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.shown = False
        self.thread = threading.Thread(target=self._show, name="prompt-progress", daemon=True)

    def _show(self) -> None:
        self.done.wait(self.DELAY_S)
        while not self.done.is_set():
            stats = self.engine.stats
            if stats is not self.before and stats.prompt_tokens:
                read = min(len(self.engine.prompt_cache.tokens), stats.prompt_tokens)
                with self.lock:
                    if self.done.is_set():
                        return
                    self.out.write(f"\r{DIM}[reading the prompt: {read:,} of {stats.prompt_tokens:,} "
                                   f"tokens · Ctrl-C stops]{RESET}\x1b[K")
                    self.out.flush()
                    self.shown = True
            self.done.wait(self.EVERY_S)

    def stopping(self) -> None:
        """Ctrl-C while the line shows: the prompt stops at the end of the chunk being read,
        seconds away on a slow machine, which looked like a hang (a tester's, helper-155): the
        line says it is stopping, and stays."""
        with self.lock:
            self.done.set()
            if self.shown:
                self.out.write(f"\r{DIM}[stopping: the chunk of the prompt being read ends first…]{RESET}\x1b[K")
                self.out.flush()
                self.shown = False

    def stop(self) -> None:
        with self.lock:
            self.done.set()
            if self.shown:
                self.out.write("\r\x1b[K")
                self.out.flush()
                self.shown = False


def with_prompt_progress(events, engine, out):
    """``events``, with a PromptProgress line on ``out`` until the first one."""
    progress = PromptProgress(engine, out)
    progress.thread.start()
    try:
        for event in events:
            progress.stop()
            yield event
    except KeyboardInterrupt:
        progress.stopping()
        raise
    finally:
        progress.stop()


def print_events(events, show_reasoning: bool, answer_out, reasoning_out, dim: bool,
                 json_answer: bool = False) -> Done | None:
    """Print a reply's events; returns the Done event. Its parts (reasoning, a preamble, a tool
    call with its result, the answer) are a blank line apart, one blank line however they follow
    each other (both outputs are usually the one terminal), whatever newlines the model's text
    starts or ends with (lines with nothing on them), and each output's last line is ended.
    Interrupted (Ctrl-C), it leaves no colour on. ``json_answer``: the answer is JSON, printed
    with JSON's escapes where other text gets markers (common.json_safe)."""
    done = None
    part = None  # the part being shown: ("reasoning" or "answer", its message's channel, index), or None
    ends: dict[int, int] = {}  # by output written to: the newlines its text ends with
    last = None  # the output written to last
    held = ""  # the blank end of the model's text of this part so far: written if more text follows
    start = None  # how the part shows its first text (a blank line before it, its colour): None once shown
    dimmed = False  # the reasoning's colour is on
    cr_out = None  # the output whose model text so far ends with a "\r": a line end if "\n" comes next

    def write(out, text: str) -> None:
        nonlocal last
        if text:
            out.write(text)
            out.flush()
            shown = text.replace(DIM, "").replace(RESET, "")  # colours take no room
            stripped = shown.rstrip("\n")
            if stripped or id(out) in ends:
                ends[id(out)] = len(shown) - len(stripped) + (ends[id(out)] if not stripped else 0)
                last = out

    def apart(out, lines: int = 2) -> None:
        """A blank line before the next part, on ``out`` (lines=1: a new line). Where the part
        before it is on the other output, that output's line is ended and the blank line goes
        on ``out``, unless ``out`` is the answer's and holds nothing yet: the answer's output
        (stdout, ``generate > file``) holds the answer's parts one blank line apart and no blank
        line before the first or after the last, and on one terminal the two read as one."""
        if last is not None and last is not out:
            if out is answer_out and id(out) not in ends:
                write(last, "\n" * max(0, lines - ends[id(last)]))
                return
            shown = max(1, ends[id(last)])  # the newlines the terminal's text ends with, its line ended
            write(last, "\n" * max(0, 1 - ends[id(last)]))
            write(out, "\n" * max(0, lines - shown))
        elif id(out) in ends:
            write(out, "\n" * max(0, lines - ends[id(out)]))

    def model_text(out, text: str, new_part=None) -> None:
        """The model's text of a reasoning or answer part (``new_part``: how a new one starts),
        made safe to print and shown from its first line with something on it (its indentation
        kept) to its last character that is not blank: the blank lines at the part's edges are
        apart()'s to write; inside it, the text is shown as it is. A ``\\r`` a piece ends with
        waits for the next: with its ``\\n``, a Windows line end."""
        nonlocal start, cr_out
        if new_part is not None:  # (the part before it ended: end_text())
            start = new_part
        if json_answer and out is answer_out and part and part[0] == "answer":
            shown(out, json_safe(text))  # (its \r can only be JSON's blank space)
            return
        text, held_cr = hold_carriage_return(text, cr_out is not None)
        cr_out = out if held_cr else None
        shown(out, terminal_safe(text))

    def end_text() -> None:
        """The part's text is over: a ``\\r`` it ended with is shown (its marker); the next
        part's blank edges start anew."""
        nonlocal held, cr_out
        if cr_out is not None:
            out, cr_out = cr_out, None
            shown(out, terminal_safe("\r"))
        held = ""

    def shown(out, text: str) -> None:
        nonlocal held, start
        text = held + text
        core = text.rstrip(BLANK)
        held = text[len(core):]
        if not core:
            return
        if start is not None:
            core = from_first_line(core)
            start()
            start = None
        write(out, core)

    def start_reasoning() -> None:
        nonlocal dimmed
        apart(reasoning_out)
        if dim:
            dimmed = True  # first: a Ctrl-C while the colour is written still resets it
            write(reasoning_out, DIM)

    def end_reasoning() -> None:
        nonlocal dimmed
        if dimmed:
            write(reasoning_out, RESET)
            dimmed = False

    def line_part(text: str, lines: int = 2) -> None:
        """A part of our own (a call, its result, a notice): one line or more, on reasoning_out."""
        nonlocal part
        end_text()
        end_reasoning()
        part = None
        apart(reasoning_out, lines)
        write(reasoning_out, text)

    try:
        for event in events:
            if isinstance(event, ReasoningDelta):
                if not show_reasoning:
                    part = None  # (hidden: the answer's next text is a new part all the same)
                    continue
                new_part = ("reasoning", event.channel, event.message) != part  # (a preamble, in a formatted turn)
                if new_part:
                    end_text()
                    end_reasoning()
                part = "reasoning", event.channel, event.message
                model_text(reasoning_out, event.text, start_reasoning if new_part else None)
            elif isinstance(event, AnswerDelta):
                new_part = ("answer", event.channel, event.message) != part  # after another part, or message
                if new_part:
                    end_text()
                end_reasoning()
                part = "answer", event.channel, event.message
                model_text(answer_out, event.text, (lambda: apart(answer_out)) if new_part else None)
            elif isinstance(event, ToolCall):
                line_part(terminal_safe(f"[tool call → {event.recipient}]") + after_label(event.arguments) + "\n")
            elif isinstance(event, ToolResult):
                line_part(terminal_safe(f"[result ← {event.name}]") + after_label(event.content, 2000) + "\n", lines=1)
            elif isinstance(event, ContextTrimmed) and not event.repeated:  # said once until the cut moves
                line_part(f"[{event}]\n")
            elif isinstance(event, Done):
                end_text()
                done = event
                part = None
    finally:
        try:
            end_text()  # (interrupted too: a lone "\r" held back is shown)
        finally:
            end_reasoning()
    if reasoning_out is not answer_out and ends.get(id(reasoning_out)) == 0:
        write(reasoning_out, "\n")  # (on its own output, reasoning may come last)
    if not ends.get(id(answer_out)):  # the reply ends its line (a blank one if nothing was written)
        write(answer_out, "\n")
    return done


CUT = {"length": "--max-tokens", "context": "the context length (--max-context)"}  # finish reasons


def say_cut(finish_reason: str | None) -> bool:
    """On standard error, that a reply answered once was cut off, and by what; whether it was."""
    if finish_reason not in CUT:
        return False
    print(f"gptoss-mlx: the reply was cut off by {CUT[finish_reason]} (finish reason: {finish_reason})",
          file=sys.stderr)
    return True


def cut_json(done: Done | None) -> str:
    """What a cut reply's JSON answer is: closed early to fit (valid, but shorter than the
    model's own), or cut (not valid)."""
    answers = [m.text for m in (done.messages if done else []) if m.role == "assistant" and m.channel == "final"]
    try:
        json.loads(answers[-1] if answers else "")
    except ValueError:
        return "the JSON answer is truncated: it is not valid"
    return "the JSON answer was closed early to fit: it is valid, but shorter than the model's own"


@dataclass
class Outcome:
    """What one user turn produced, over every reply of a tool loop."""
    answer: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    stats: list[Stats] = field(default_factory=list)  # one per reply
    finish_reason: str | None = None
    done: Done | None = None  # the last reply's
    stop_status: int = 130  # a stopped reply's exit status: Ctrl-C's, or SIGTERM's (common.Terminated)

    def record(self, events):
        """Pass ``events`` through, keeping what they say (the texts of separate messages, a
        preamble and the answer, reasoning before and after a call, a blank line apart)."""
        last = None  # the (kind, channel, message) of the text just before; None after another event
        for event in events:
            delta = isinstance(event, (ReasoningDelta, AnswerDelta))
            source = (type(event), event.channel, event.message) if delta else None
            new = source != last  # another message: a paragraph of its own
            if isinstance(event, ReasoningDelta):
                self.reasoning += ("\n\n" if self.reasoning and new else "") + event.text
            elif isinstance(event, AnswerDelta):
                self.answer += ("\n\n" if self.answer and new else "") + event.text
            elif isinstance(event, ToolCall):
                self.tool_calls.append({"name": event.recipient, "arguments": event.arguments})
            elif isinstance(event, ToolResult) and self.tool_calls:
                self.tool_calls[-1]["result"] = event.content
            elif isinstance(event, Done):
                self.stats.append(event.stats)
                self.finish_reason, self.done = event.finish_reason, event
            last = source
            yield event

    def usage(self) -> dict:
        prompt = sum(s.prompt_tokens for s in self.stats)
        completion = sum(s.generated_tokens for s in self.stats)
        return {"prompt_tokens": prompt, "cached_tokens": sum(s.reused_tokens for s in self.stats),
                "completion_tokens": completion, "total_tokens": prompt + completion}


def answer_once(args, text: str, approve, show_reasoning: bool, dim: bool,
                quiet: bool = False) -> Outcome:
    """Load and answer ``text`` (running tools if asked), streaming the answer to stdout and the
    rest to stderr unless ``quiet``. Ctrl-C during the reply ends it: finish reason
    ``interrupted``."""
    toolbox = make_toolbox(args, approve)
    chat = common.load_chat(args, toolbox=toolbox)
    outcome = Outcome()
    try:
        events = outcome.record(replies(chat, text, toolbox))
        try:
            if quiet:
                for _ in events:
                    pass
            else:
                print_events(events, show_reasoning, sys.stdout, sys.stderr, dim,
                             json_answer=bool(args.json_schema or args.json_object))
        except KeyboardInterrupt as e:  # Ctrl-C: what was made so far is the outcome
            events.close()  # the reply stops at the engine's next step
            outcome.finish_reason, outcome.stop_status = "interrupted", getattr(e, "status", 130)
            stats = getattr(chat.engine, "stats", None)  # the stopped reply's (it has no Done)
            if stats is not None and not any(s is stats for s in outcome.stats):
                outcome.stats.append(stats)  # (--json's usage counted none of it)
    except (ContextLengthError, NonFiniteLogitsError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    finally:
        if toolbox:
            toolbox.close()
    return outcome
