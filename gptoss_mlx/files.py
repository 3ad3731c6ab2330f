"""Reading checkpoint files safely: the file's type is checked before it is opened (a FIFO would
block, a device could stream forever), and a file that holds no JSON is one error naming it."""

from __future__ import annotations

import errno
import gzip
import json
import os
import stat
import sys
import zlib
from pathlib import Path

MAX_JSON_BYTES = 256 << 20  # config, index, tokenizer.json (27 MB) are far smaller


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
    problem = regular_file_problem(path)
    if problem:
        raise error(f"{path}: {problem}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path}: {size} bytes is too large for a JSON file; is it the right file?")
    try:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    except (OSError, EOFError, zlib.error) as e:  # gzip: BadGzipFile is an OSError
        raise error(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise error(f"{path}: the file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError:  # int(): a number of more than sys.get_int_max_str_digits() digits
        digits = sys.get_int_max_str_digits()
        raise error(f"{path}: not valid JSON (a number of more than {digits} digits)") from None
