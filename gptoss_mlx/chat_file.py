"""A saved chat's file: Chat Completions JSON (reasoning and tool calls included) plus
``title``, ``updated`` and ``format``, checked field by field before it replaces a conversation
(:func:`check_chat_file`: a damaged or hostile file is refused with its name and field), and
written atomically."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from .files import JSONProblem, expand_user, float64_holds, lone_surrogate_problem, parse_json, regular_file_problem
from .harmony import EFFORTS, HarmonyError, from_chat_completions, render_conversation
from .harmony.chat_completions import REASONING_KEYS, response_formats

FORMAT_VERSION = 1  # files without "format" are version 1
MAX_FILE_BYTES = 64 * 2**20
MAX_DATE_CHARS = 64  # "Current date: ..." in the system message: one line, not a section of its own
MAX_DEPTH = 64  # JSON nesting; a tool's parameter schema needs a handful of levels
ROLES = ("system", "developer", "user", "assistant", "tool")
# the rest: metadata. chat_response_format: the chat's own format where the last turn's
# (response_format, in the prompt) was given for that turn alone (Chat.send's response_format).
CHAT_FIELDS = ("messages", "reasoning_effort", "tools", "response_format", "date", "chat_response_format")


class ChatFileError(ValueError):
    """A saved chat that cannot be read."""


def check_chat_file(path: Path) -> dict:
    """The file's JSON if it has the shape of a saved chat; else ChatFileError naming the file
    and the first field that is wrong."""
    problem = regular_file_problem(path)  # never open a FIFO (it would block) or a device
    if problem:
        raise ChatFileError(f"{path}: {problem}")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ChatFileError(f"{path}: not a saved chat (larger than {MAX_FILE_BYTES >> 20} MB)")
        raw = path.read_bytes()
    except OSError as e:
        raise ChatFileError(f"{path}: {e.strerror or e}") from None
    try:
        data = parse_json(raw)
    except JSONProblem as e:
        raise ChatFileError(f"{path}: not a saved chat ({e})") from None
    problem = chat_file_problem(data)
    if problem:
        raise ChatFileError(f"{path}: {problem}")
    return data


def chat_file_problem(data) -> str | None:
    """What is wrong with a saved chat's JSON, naming the field; None if nothing."""
    if _depth(data) > MAX_DEPTH:
        return f"not a saved chat (JSON nested deeper than {MAX_DEPTH} levels)"
    if not isinstance(data, dict):
        return "not a saved chat (expected a JSON object)"
    version = data.get("format", 1)
    if not _is_int(version) or version < 1:
        return f"format must be a positive integer, got {_show(version)}"
    if version > FORMAT_VERSION:
        return (f"format {_show(version)} was written by a newer gptoss-mlx (this one reads format "
                f"{FORMAT_VERSION}); upgrade to open it")
    for name, ok, expected in (
        ("title", lambda v: isinstance(v, str), "a string"),
        ("date", is_one_line_date, DATE_SHAPE),
        ("updated", lambda v: _is_number(v) and float64_holds(v) and v >= 0, "a time in seconds"),
        ("reasoning_effort", lambda v: v in EFFORTS, " or ".join(EFFORTS)),
        ("tools", lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v),
         "a list of objects"),
    ):
        if name in data and data[name] is not None and not ok(data[name]):
            return f"{name} must be {expected}, got {_show(data[name])}"
    if not isinstance(data.get("messages"), list):
        return f"messages must be a list, got {_show(data.get('messages'))}"
    for i, m in enumerate(data["messages"]):
        problem = _message_problem(m)
        if problem:
            return f"messages[{i}]{problem}"
    problem = lone_surrogate_problem(data)
    if problem:
        return problem
    try:  # what only rendering finds (a tool's parameter schema of the wrong shape)
        render_conversation(from_chat_completions(data, date=data.get("date")))
        if "chat_response_format" in data:
            response_formats(data["chat_response_format"], "chat_response_format")
    except HarmonyError as e:
        return f"not a saved chat ({e})"
    return None


DATE_SHAPE = f"a date on one line (at most {MAX_DATE_CHARS} characters)"


def is_one_line_date(value) -> bool:
    """Whether ``value`` can be the system message's current date (saved chats, render --date)."""
    return isinstance(value, str) and len(value) <= MAX_DATE_CHARS and value.isprintable()


def _message_problem(m) -> str | None:
    if not isinstance(m, dict):
        return f" must be an object, got {_show(m)}"
    if m.get("role") not in ROLES:
        return f".role must be one of {', '.join(ROLES)}, got {_show(m.get('role'))}"
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        if not isinstance(content, list) or not all(
                isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            return f".content must be a string or a list of text parts, got {_show(content)}"
    for name in (*REASONING_KEYS, "name", "tool_call_id"):
        if m.get(name) is not None and not isinstance(m[name], str):
            return f".{name} must be a string, got {_show(m[name])}"
    calls = m.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        return f".tool_calls must be a list, got {_show(calls)}"
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f".tool_calls[{j}].function.name must be a non-empty string"
        if not isinstance(fn.get("arguments", ""), (str, dict)):
            return f".tool_calls[{j}].function.arguments must be a string, got {_show(fn['arguments'])}"
    return None


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v) -> str:
    try:  # (a value from Python, not a file: save()'s metadata)
        text = json.dumps(v, ensure_ascii=False) if not isinstance(v, float) else repr(v)
    except (TypeError, ValueError):
        text = f"a {type(v).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """A saved chat; one larger than a saved chat may be (it could not be opened again) is an
    OSError (EFBIG), and the file keeps what it had."""
    encoded = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
    if len(encoded) > MAX_FILE_BYTES:
        raise OSError(errno.EFBIG, f"the chat would be {len(encoded) / 2**20:.0f} MB, more than the "
                      f"{MAX_FILE_BYTES >> 20} MB a saved chat may have (it could not be opened "
                      f"again): not saved", str(path))
    return write_text_atomic(path, encoded)


def write_text_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write through a temporary file and a rename: a crash never leaves half a file (the
    store removes temporary files that a killed save left behind). A link is followed, as
    ``open(path, "w")`` follows it: the file it names is written, the link stays."""
    path = expand_user(path)
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory: name a file in it", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
