"""How the model's code is shown before the user approves it: every character that could hide or
reorder text on a terminal (carriage return, escape sequences, other control characters, bidi
overrides and isolates, zero-width and invisible characters) is replaced by a visible, highlighted
marker, so what the person reads is what will run. Newlines and tabs stay as they are, but for
long runs of blank space, which could push code out of sight (below a screenful of empty lines,
or a screen's width to the right): one marker each, e.g. ``<200 blank lines>``.

    print(render_code_ansi(code), file=sys.stderr)      # the terminal prompt
    dialog_body = render_code_text(code)                 # a rich Text for the TUI dialog
"""

from __future__ import annotations

import re
import unicodedata

from rich.text import Text

_NAMES = {"\r": "\\r", "\x1b": "ESC", "\x00": "NUL", "\x08": "BS", "\x7f": "DEL", "\x0b": "\\v",
          "\x0c": "\\f"}
_KEPT = {"\n", "\t"}
# Unicode's default-ignorable code points (shown as nothing) that are not format characters,
# and the blank letters: some are valid inside Python names (U+034F, U+FE0F, U+3164, U+115F),
# so ``target`` and ``target\u034f`` would read as one variable.
_INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
                        "\U00016fe4\U000e0100-\U000e01ef]")


def hidden_char_marker(ch: str) -> str | None:
    """The visible stand-in for ``ch`` (e.g. ``<\\r>``, ``<ESC>``, ``<U+202E>``), or None for a
    character that shows as itself."""
    if ch in _KEPT:
        return None
    if ch in _NAMES:
        return f"<{_NAMES[ch]}>"
    # Cc: controls (C0, C1); Cf: format (bidi, zero-width, soft hyphen...); Zl/Zp: line and
    # paragraph separators; Co/Cn: private and unassigned; Zs other than the plain space.
    category = unicodedata.category(ch)
    if (category in ("Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs") or (category == "Zs" and ch != " ")
            or _INVISIBLE.match(ch)):
        return f"<U+{ord(ch):04X}>"
    return None


# What could drive a terminal or break its output: C0 controls but newline and tab, DEL, C1
# controls (U+009B is CSI on some terminals), lone surrogates.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# ... and, in text a terminal prints, what reorders it: bidi embeddings, overrides and isolates.
_REORDERING = re.compile("[\u202a-\u202e\u2066-\u2069]")


def prose_marker(ch: str) -> str | None:
    """The visible stand-in for ``ch`` in prose printed to a terminal (a reply, a file name):
    for what could drive the terminal or reorder the text (as :func:`hidden_char_marker` gives
    them); None for everything else, the joiners of emoji and of Persian (U+200D, U+200C), the
    no-break spaces of French (U+00A0, U+202F), soft hyphens and direction marks included."""
    return hidden_char_marker(ch) if _CONTROLS.match(ch) or _REORDERING.match(ch) else None


def controls_shown(text: str) -> str:
    """``text`` for display as prose (a reply, a tool's output in the TUI): escape sequences and
    other control characters become visible stand-ins (C0 and DEL their Unicode control
    pictures, ␛ for ESC, which Markdown shows as they are, where it would take ``<ESC>`` for a
    tag; the rest ``<U+009B>``); everything else stays as it is, the joiners of emoji and the
    direction marks of right-to-left scripts included (code for approval gets those marked
    too: render_code_text); bidi embeddings, overrides and isolates, which reorder what
    follows them, become ``<U+202E>``, as :func:`prose_marker` makes them. Windows' line ends
    (``\\r\\n``) are newlines."""
    return _SHOWN.sub(_control_picture, text.replace("\r\n", "\n"))


_SHOWN = re.compile(f"{_CONTROLS.pattern}|{_REORDERING.pattern}")


def _control_picture(found: re.Match) -> str:
    code = ord(found.group())
    if code < 0x20:
        return chr(0x2400 + code)
    return "\u2421" if code == 0x7F else f"<U+{code:04X}>"


def hold_carriage_return(text: str, held: bool) -> tuple[str, bool]:
    """A streamed piece of text as far as it can be shown now, and whether its last ``\\r`` is
    held back: with the next piece's ``\\n`` it is a Windows line end, not a lone one.
    ``held``: the piece before ended with one, held back then."""
    text = "\r" + text if held else text
    return (text[:-1], True) if text.endswith("\r") else (text, False)


# Blank space that could push code out of sight: a terminal's width of spaces and tabs on one
# line, or more lines in a row that show nothing (blank, or an empty comment) than code keeps
# (PEP 8: two), or a line padded out of sight in several stretches, each shorter.
BLANK_COLUMNS, BLANK_LINES, PADDED_COLUMNS = 80, 5, 60
_EMPTY_LINE = r"[ \t]*#?[ \t]*\n"
_BLANK_RUN = re.compile(f"[ \t]{{{BLANK_COLUMNS},}}|^(?:{_EMPTY_LINE}){{{BLANK_LINES},}}|\n(?:{_EMPTY_LINE}){{{BLANK_LINES},}}")
_INNER_BLANKS = re.compile(r"(?<=\S)[ \t]{8,}")  # a stretch after something on its line


def _blank_run_marker(run: str, first: bool) -> tuple[str, str, str]:
    """(text before, the marker, text after) for a long run of blank space: a run of empty
    lines keeps the line end before it (none where it starts the code: ``first``) and its last,
    so the marker stands on a line of its own."""
    if "\n" in run:
        lines = run.count("\n") - (0 if first else 1)
        kind = "blank or '#' lines" if "#" in run else "blank lines"
        return ("" if first else "\n"), f"<{lines} {kind}>", "\n"
    kinds = " and ".join(name for ch, name in ((" ", "spaces"), ("\t", "tabs")) if ch in run)
    return "", f"<{len(run)} {kinds}>", ""


def _blank_runs(code: str) -> list[tuple[int, int, str, str, str]]:
    """The long runs of blank space in ``code``: (start, end, and _blank_run_marker's three)."""
    runs = [(m.start(), m.end(), *_blank_run_marker(m.group(), m.start() == 0))
            for m in _BLANK_RUN.finditer(code)]
    taken = [(a, b) for a, b, *_ in runs]
    at = 0
    for line in code.split("\n"):  # a line padded in stretches: each stretch marked
        stretches = list(_INNER_BLANKS.finditer(line))
        if sum(len(m.group()) for m in stretches) >= PADDED_COLUMNS:
            runs += [(at + m.start(), at + m.end(), *_blank_run_marker(m.group(), False)) for m in stretches
                     if not any(a <= at + m.start() < b for a, b in taken)]
        at += len(line) + 1
    return sorted(runs)


def _pieces(code: str) -> tuple[list[tuple[str, bool]], str]:
    """``code`` as (text, is_marker) runs, and the warning line for its markers ("" for none).
    Windows' line ends (``\\r\\n``) are newlines, as Python reads them."""
    code = code.replace("\r\n", "\n")
    out: list[tuple[str, bool]] = []
    hidden = 0

    def add(text: str, marker: bool) -> None:
        if not marker and out and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        elif text:
            out.append((text, marker))

    def add_chars(text: str) -> None:
        nonlocal hidden
        for ch in text:
            marker = hidden_char_marker(ch)
            hidden += marker is not None
            add(marker or ch, marker is not None)

    start, runs = 0, _blank_runs(code)
    for a, b, before, marker, after in runs:
        add_chars(code[start:a])
        add(before, False)
        add(marker, True)
        add(after, False)
        start = b
    add_chars(code[start:])
    found = ([f"{hidden} hidden or control character{'s' if hidden != 1 else ''}"] if hidden else []) + (
        [f"{len(runs)} long run{'s' if len(runs) != 1 else ''} of blank space"] if runs else [])
    return out, f"warning: {' and '.join(found)} in this code, shown highlighted" if found else ""


def hidden_char_count(code: str) -> int:
    return sum(hidden_char_marker(ch) is not None for ch in code)


def render_code_ansi(code: str) -> str:
    """The whole of ``code`` for a terminal, markers in reverse-video red; with a warning line
    first when there are any. Nothing in the result can move the cursor or reorder text."""
    pieces, warning = _pieces(code)
    body = "".join(f"\x1b[1;7;31m{t}\x1b[0m" if marker else t for t, marker in pieces)
    return (f"\x1b[1;31m{warning}\x1b[0m\n" if warning else "") + body


def render_code_text(code: str) -> Text:
    """The same for the TUI: a rich Text, markers styled "bold reverse red"."""
    text = Text()
    pieces, warning = _pieces(code)
    if warning:
        text.append(warning + "\n", style="bold red")
    for t, marker in pieces:
        text.append(t, style="bold reverse red" if marker else None)
    return text
