"""Line editing for the terminal chat, with prompt_toolkit.

Python's ``readline`` is GNU readline only where Python was built against it; on macOS
(Apple's Python, python.org and uv builds) it is libedit, with its own configuration syntax, its
own history file format and no editing of a multi-line message. prompt_toolkit gives every
platform the same editor: arrow keys and Emacs keys, history kept across sessions in a file,
Ctrl-R reverse search, and one buffer for a multi-line message:

- Enter sends the message; Alt-Enter (Esc then Enter) starts a new line;
- a line ending in ``\\`` continues on the next line, and so does an open triple quote.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

try:
    import termios
except ImportError:  # Windows
    termios = None

from prompt_toolkit import PromptSession
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import has_focus
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.output import Output


def is_unfinished(text: str) -> bool:
    """True when Enter should start a new line: a trailing backslash or an open triple quote."""
    stripped = text.strip()
    opened = stripped.startswith('"""') and not (len(stripped) >= 6 and stripped.endswith('"""'))
    return text.endswith("\\") or opened


def _keys() -> KeyBindings:
    keys = KeyBindings()
    editing = has_focus(DEFAULT_BUFFER)  # not while Ctrl-R searches

    @keys.add("enter", filter=editing)
    def _(event) -> None:
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and is_unfinished(buffer.text):
            if buffer.text.endswith("\\"):
                buffer.delete_before_cursor(1)
            buffer.newline(copy_margin=False)
        else:
            buffer.validate_and_handle()

    @keys.add("escape", "enter", filter=editing)
    def _(event) -> None:
        event.current_buffer.newline(copy_margin=False)

    @keys.add(Keys.Vt100MouseEvent)
    def _(event) -> None:
        # No mouse reports are asked for: this is text, a colour code typed or pasted (ESC[31m)
        # outside a bracketed paste, which prompt_toolkit read as a mouse report and failed on
        # (ValueError: the chat ended, what was typed lost). Kept as text, as a paste keeps it.
        event.current_buffer.insert_text(event.data)

    return keys


class _KeptHistory(FileHistory):
    """A history file that stops being written when it cannot be (a disk that fills, a data
    directory made read-only): prompt_toolkit reported each failed write as an unhandled
    exception and waited for Enter, at every message."""

    def store_string(self, string: str) -> None:
        try:
            super().store_string(string)
        except OSError:
            pass  # this session's history stays in memory


def input_history(history_file: Path) -> FileHistory | InMemoryHistory:
    """The messages typed in the terminal chat and the TUI, oldest first in the file (both
    front ends read and add to the one file); in memory only where it cannot be written."""
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history_file.touch(mode=0o600)  # every message typed: private, as the saved chats are
        if history_file.stat().st_mode & 0o077:  # made readable to others by an older version
            history_file.chmod(0o600)
        return _KeptHistory(str(history_file))
    except OSError:  # an unwritable data directory: the chat still works, without old history
        return InMemoryHistory()


def line_reader(history_file: Path, input: Input | None = None,
                output: Output | None = None) -> Callable[[str], str]:
    """``read(prompt, default="", remember=True) -> message``: EOFError on Ctrl-D at an empty prompt,
    KeyboardInterrupt on Ctrl-C, like ``input``; ``default`` is the text the line starts with.
    Messages are added to ``history_file`` as they are sent."""
    session = PromptSession(history=input_history(history_file), key_bindings=_keys(),
                            prompt_continuation="... ", input=input, output=output)
    questions = PromptSession(key_bindings=_keys(), input=input, output=output)  # answers kept out of the file

    def read(prompt: str, default: str = "", remember: bool = True) -> str:
        """``remember`` False: an answer to a question (y/N), not a message for the history."""
        typed = "".join(_held) + (take_typeahead() if input is None else "")
        _held.clear()
        return (session if remember else questions).prompt(prompt, default="\n".join(t for t in (default, typed) if t))

    return read


_held: list[str] = []  # text typed ahead of a question that is not a message (hold_typeahead)
MAX_TYPEAHEAD = 1 << 20
TYPEAHEAD_QUIET_S = 0.15  # no input for this long after some: what was typed or pasted is all there


def take_typeahead() -> str:
    """What was typed or pasted at the terminal while nothing read it (during a reply): the next
    prompt shows it, to edit or send. Read line by line, each line was sent as a message of its
    own, unseen, and a line could answer a question the reply then asked ("Run it? [y/N]")."""
    if termios is None or not sys.stdin.isatty():
        return ""
    fd = sys.stdin.fileno()
    try:
        before = termios.tcgetattr(fd)
        raw = termios.tcgetattr(fd)
        raw[3] &= ~(termios.ICANON | termios.ECHO)  # a line not ended yet is readable too
        raw[6][termios.VMIN], raw[6][termios.VTIME] = 0, 0  # what is there, without waiting
        termios.tcsetattr(fd, termios.TCSANOW, raw)
    except (termios.error, OSError):
        return ""
    data = b""
    try:  # until the input is quiet: a paste under way (a terminal writes it in pieces) is taken whole
        while len(data) < MAX_TYPEAHEAD and select.select([fd], [], [], TYPEAHEAD_QUIET_S if data else 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)
    return typed_text(data)


# Keys that edit or move, as a terminal sends them: cursor keys, Home/End, Insert/Delete, Page
# Up/Down and function keys (CSI ... A-D, H, F, ~; SS3 + a letter), an ESC alone (Esc, or Alt + a
# key's prefix), and the other control characters but tab and the line break: Ctrl-A, Ctrl-R,
# and the NUL that Ctrl-D leaves in a terminal's line buffer. Typed during a reply (the terminal
# in line mode, nothing reading), they reached the next prompt as text ("ax^[[DY^AS"), and Ctrl-D
# was sent as a NUL. A colour code (CSI ... m) pasted stays text, as at the prompt.
EDIT_KEYS = re.compile(r"\x1b\[[0-?]*[ -/]*[A-DHF~]|\x1bO[A-Za-z]|\x1b(?!\[[0-?]*[ -/]*m)|[\x00-\x08\x0b-\x1a\x1c-\x1f\x7f]")


def typed_text(data: bytes) -> str:
    """What was typed ahead, as the next prompt's text: line ends as newlines, the keys that
    edit or move (EDIT_KEYS) left out."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return EDIT_KEYS.sub("", text).rstrip("\n")


def hold_typeahead() -> None:
    """Before a question that is not a message (``Run it? [y/N]``): what was typed ahead goes
    to the next message's prompt instead of answering it."""
    typed = take_typeahead()
    if typed:
        _held.append(typed)


@contextmanager
def typing_hidden(echo: bool = False):
    """While a reply streams (``echo`` False): what is typed is not echoed by the terminal into
    the reply's text, and Ctrl-C (which still interrupts) does not discard it: it waits, unseen,
    for the next prompt (take_typeahead). ``echo`` True shows typing again for a question asked
    inside (the code approval). The terminal's settings come back after it, also on SIGTERM (the
    signal's own action follows), and after Ctrl-Z and ``fg`` (the shell resumes the job with its
    own) they are made again. Nothing changes where standard input is not a terminal."""
    try:
        fd = sys.stdin.fileno() if termios is not None and sys.stdin.isatty() else None
        before = None if fd is None else termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):  # (a stand-in for standard input has no descriptor)
        before = None
    if before is None:
        yield
        return
    changed = termios.tcgetattr(fd)
    changed[3] = changed[3] | termios.ECHO if echo else (changed[3] & ~termios.ECHO) | termios.NOFLSH

    def apply(attributes) -> None:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, attributes)
        except (termios.error, OSError):  # the terminal has gone
            pass

    def resumed(signum, frame) -> None:
        apply(changed)

    def terminated(signum, frame) -> None:
        apply(before)
        previous = handlers[signal.SIGTERM]
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    handlers = {}
    try:
        if threading.current_thread() is threading.main_thread():
            handlers[signal.SIGCONT] = signal.signal(signal.SIGCONT, resumed)
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # (ignored: it stays so)
                handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, terminated)
        apply(changed)
        yield
    finally:
        apply(before)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
