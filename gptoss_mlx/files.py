"""Reading checkpoint files safely: the file's type is checked before it is opened (a FIFO would
block, a device could stream forever), and a file that holds no JSON is one error naming it."""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import re
import stat
import sys
import zlib
from pathlib import Path

MAX_JSON_BYTES = 256 << 20  # config, index, tokenizer.json (27 MB) are far smaller


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or not gpt-oss (here, not in loading,
    so that the expert pool, which loading builds, can raise it too)."""


def expand_user(path: str | os.PathLike, error: type[Exception] = FileNotFoundError) -> Path:
    """``path`` with a leading ``~`` or ``~name`` made the home folder, as a shell does; where
    there is none (no user ``name`` here, or no HOME), ``error`` saying so, not pathlib's bare
    RuntimeError (a traceback: a tester's ``/save ~nosuchuser/x.json``, helper-155)."""
    text = os.fspath(path)
    if not text.startswith("~"):
        # pathlib makes ./~x the path ~x, which a later expansion reads as user x's home (a
        # /save there wrote into that user's home, a re-attack's, helper-159): such a path is
        # made absolute, where no ~ starts it
        given = Path(text)
        return Path.cwd() / given if given.parts[:1] and given.parts[0].startswith("~") else given
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):  # not expanded
        first = text.split(os.sep, 1)[0]
        why = (f"there is no user {first[1:]!r} on this machine" if first != "~"
               else "the home folder is unknown (HOME is not set)")
        raise error(f"{text}: {why}")
    return Path(expanded)


def env_folder(variable: str) -> Path | None:
    """The folder an environment variable names, ``~`` expanded (None where it is unset or
    empty); a ``~name`` of no user is a FileNotFoundError naming the variable."""
    given = os.environ.get(variable)
    if not given:
        return None
    try:
        return expand_user(given)
    except FileNotFoundError as e:  # (a traceback once, helper-158)
        raise FileNotFoundError(f"{variable}={e}") from None


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a checkpoint file, or None if it is a regular file.

    Only ``stat`` is used: opening a FIFO would block, a device could stream forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a symbolic link to a missing file" if os.path.lexists(path) else "does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file"


def read_json_file(path: Path, error: type[Exception]):
    """The JSON value in a checkpoint file (gzipped if it ends in .gz); ``error`` naming the
    file if it holds none."""
    return json_from_bytes(path, read_file_bytes(path, error), error)


def read_file_bytes(path: Path, error: type[Exception], limit: int | None = None,
                    what: str = "a JSON file") -> bytes:
    """A regular file's bytes (at most ``limit``, MAX_JSON_BYTES by default), ``error`` naming
    the file otherwise."""
    limit = MAX_JSON_BYTES if limit is None else limit
    problem = regular_file_problem(path)
    if problem:
        raise error(f"{path}: {problem}")
    size = path.stat().st_size
    if size > limit:
        raise error(f"{path}: {size} bytes is too large for {what}; is it the right file?")
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None


def json_from_bytes(path: Path, data: bytes, error: type[Exception]):
    """The JSON value in ``data``, read from ``path`` (gunzipped if it ends in .gz, to at most
    MAX_JSON_BYTES: a small .gz can hold gigabytes)."""
    if path.suffix == ".gz":
        data = gunzip(path, data, error)
    if not data.strip():
        raise error(f"{path}: the file is empty")
    try:
        return parse_json(data)
    except JSONProblem as e:
        raise error(f"{path}: {e}") from None


GZIP_MEMBERS = 64  # gzip writes one; a file of many thousands took minutes to read


def gunzip(path: Path, data: bytes, error: type[Exception]) -> bytes:
    limit, out, size, rest = MAX_JSON_BYTES, [], 0, data
    try:
        while rest:  # each gzip member in turn, as gzip.decompress reads them
            if len(out) == GZIP_MEMBERS:
                raise error(f"{path}: more than {GZIP_MEMBERS} gzip members; is it the right file?")
            member = zlib.decompressobj(wbits=31)
            out.append(member.decompress(rest, limit + 1 - size))
            size += len(out[-1])
            if size > limit:
                raise error(f"{path}: unpacks to more than {limit} bytes, too large for a JSON file; "
                            "is it the right file?")
            if not member.eof:
                raise EOFError("the file ends inside its compressed data")
            rest = member.unused_data.lstrip(b"\0")
    except (EOFError, zlib.error) as e:
        raise error(f"{path}: cannot be read ({e})") from None
    return b"".join(out)


class JSONProblem(Exception):
    """Why some bytes hold no JSON value (the caller adds the file's name)."""


def parse_json(raw: bytes, finite: bool = False):
    """The JSON value in UTF-8 ``raw`` (a byte order mark before it, as some Windows editors
    write, is skipped); JSONProblem saying what is wrong if it holds none. ``finite``: NaN,
    Infinity and numbers too large for a float (``1e999``) are refused, as strict JSON does
    (Python's reader takes them, and its writer could not send them back as JSON)."""
    hooks = {"parse_constant": _not_finite, "parse_float": _finite_float} if finite else {}
    try:
        return json.loads(raw.decode("utf-8-sig"), **hooks)
    except UnicodeDecodeError as e:
        raise JSONProblem(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise JSONProblem(f"not valid JSON ({e})") from None
    except RecursionError:
        raise JSONProblem("not valid JSON (nested too deeply)") from None
    except ValueError:  # int(): a number of more than sys.get_int_max_str_digits() digits
        digits = sys.get_int_max_str_digits()
        raise JSONProblem(f"not valid JSON (a number of more than {digits} digits)") from None


def _not_finite(text: str):
    raise JSONProblem(f"not valid JSON ({text} is not a JSON number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONProblem(f"not valid JSON ({text[:40]} is too large for a number)")
    return value


def float64_holds(value) -> bool:
    """Whether a JSON number is finite as a float64 (a whole number of 400 digits is valid JSON,
    and ``math.isfinite`` raises OverflowError on it)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def brief_number(value) -> str:
    """A JSON number in a message: one of 400 digits by its length, not in full."""
    text = repr(value)
    return text if len(text) <= 40 else f"a number of {len(str(abs(value)))} digits"


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what strict UTF-8 cannot encode
REPLACEMENT = "\ufffd"  # what valid_text puts in its place


def valid_text(text: str) -> str:
    """``text`` as text any file or terminal takes: each lone surrogate (a byte that was not
    UTF-8, as Python reads it from a terminal; half of a pair) becomes U+FFFD, and a pair
    written as its two halves the character it stands for."""
    if not LONE_SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def lone_surrogate_problem(data) -> str | None:
    """Which field of parsed JSON (``messages[2].content``) holds a lone surrogate (a ``\\ud800``
    escape in a key or text), which no terminal can print and no file can store as UTF-8; None
    if none."""
    stack = [(data, "")]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if LONE_SURROGATE.search(v):
                return (f"{where or 'the file'} holds a lone surrogate (a \\ud800-\\udfff "
                        "escape), which is not text")
        elif isinstance(v, dict):
            stack.extend((c, f"{where}.{k}" if where else str(k)) for k, c in v.items())
            stack.extend((k, where or "the file") for k in v)
        elif isinstance(v, list):
            stack.extend((c, f"{where}[{i}]") for i, c in enumerate(v))
    return None
