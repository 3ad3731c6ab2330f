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

from pathlib import Path
from typing import Callable

from prompt_toolkit import PromptSession
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import has_focus
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings
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
    """``read(prompt, default="") -> message``: EOFError on Ctrl-D at an empty prompt,
    KeyboardInterrupt on Ctrl-C, like ``input``; ``default`` is the text the line starts with.
    Messages are added to ``history_file`` as they are sent."""
    session = PromptSession(history=input_history(history_file), key_bindings=_keys(),
                            prompt_continuation="... ", input=input, output=output)
    def read(prompt: str, default: str = "") -> str:
        return session.prompt(prompt, default=default)

    return read
