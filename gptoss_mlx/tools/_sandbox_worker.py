"""The process the python tool's code runs in (started by python_tool.py inside the OS sandbox of
sandbox.py; not imported).

    python -I _sandbox_worker.py '{"memory_mb": ..., "cpu_s": ..., "max_output": ..., ...}'

It sets its resource limits with hard = soft, so the code cannot raise them again, moves the
reply channel off descriptor 1 and the request channel off descriptor 0 (0 is then /dev/null:
``input()`` meets the end of its input at once; 1 and 2 are the output pipe the parent gave as
descriptor 2), says it is ready, then reads one JSON request per line ({"id": ..., "code": ...}),
runs the code like a notebook cell (the value of a final expression is printed) in one persistent
namespace, and answers one JSON line ({"id": ..., "ok": ..., "dropped": ...}). What the cell
prints, from Python (``print``, ``sys.stdout.buffer``, the first MAX_OUTPUT characters; "dropped"
counts the rest) or natively on descriptors 1 and 2, goes down the output pipe as it is written,
so the parent has it when the cell is killed at its deadline. The code runs in this process and
could find the reply descriptor; the parent therefore trusts nothing it reads here: a reply
with the wrong id, a malformed one or one too many restarts the worker. The confinement is the
OS sandbox's, not this file's.
"""

import ast
import codecs
import io
import json
import os
import sys
import traceback
import types

sys.dont_write_bytecode = True
config = json.loads(sys.argv[1])
MAX_OUTPUT = int(config["max_output"])

try:
    import resource

    def _limit(kind, value):
        try:
            resource.setrlimit(kind, (value, value))  # hard = soft: no raising it later
        except (ValueError, OSError):
            pass  # not supported here (RLIMIT_AS on macOS)

    _limit(resource.RLIMIT_AS, int(config["memory_mb"]) * 2**20)
    _limit(resource.RLIMIT_FSIZE, int(config["max_file_mb"]) * 2**20)
    _limit(resource.RLIMIT_CPU, int(config["cpu_s"]))
    _limit(resource.RLIMIT_NOFILE, int(config["open_files"]))
    _limit(resource.RLIMIT_NPROC, int(config["processes"]))  # threads count too; root is exempt
    _limit(resource.RLIMIT_CORE, 0)
    # queued signals and message queue bytes count against the host user's quota
    _limit(resource.RLIMIT_SIGPENDING, 64)
    _limit(resource.RLIMIT_MSGQUEUE, 0)
except ImportError:  # no rlimits on this platform
    pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


CHANNELS_CLOSED = 86  # the exit status where the code closed the request or reply channel (python_tool.py)
OUTPUT = 1  # the output pipe; main() gives Python's output a descriptor of its own
OUTPUT_ID = None  # (device, inode) of that pipe: a cell may close or replace the descriptor


def _output_intact() -> bool:
    try:
        st = os.fstat(OUTPUT)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == OUTPUT_ID


class _CappedText(io.TextIOBase):
    """Writes the first MAX_OUTPUT characters, and one more (so that the parent knows there were
    more, also of a cell killed before its reply), to descriptor 1 (the output pipe) as they
    come; counts the rest. Bytes written to ``.buffer`` (``sys.stdout.buffer.write(b"...")``) are
    decoded as UTF-8 text."""

    encoding, errors = "utf-8", "replace"

    def __init__(self):
        self.kept, self.dropped = 0, 0
        self.lost = False  # a write failed: the code closed the descriptor (what follows is lost too)
        self.buffer = _Bytes(self)

    def writable(self):
        return True

    def write(self, s):
        room = MAX_OUTPUT + 1 - self.kept
        if room > 0 and not self.lost:
            self.kept += min(room, len(s))
            try:
                _write_all(OUTPUT, s[:room].encode("utf-8", "replace"))  # (a lone surrogate: "?")
            except OSError:
                self.lost = True
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)


class _Bytes(io.RawIOBase):
    """A text stream's ``.buffer``: bytes decoded as they come (a character split between two
    writes waits for its end)."""

    def __init__(self, text: _CappedText):
        self._text, self._decoder = text, codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self):
        return True

    def write(self, b):
        self._text.write(self._decoder.decode(bytes(b)))
        return len(b)


def _run(code: str, namespace: dict) -> tuple[int, bool, bool]:
    buffer = _CappedText()
    sys.stdout = sys.stderr = buffer
    sys.stdin = io.StringIO()  # (exit() closes it: input() then raised ValueError, not EOFError)
    ok = True
    try:
        tree = ast.parse(code, "<python>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<python>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<python>", "eval"), namespace)
            if value is not None:
                buffer.write(repr(value) + "\n")  # (not print: the code may have replaced sys.stdout)
    except BaseException:  # noqa: BLE001  — SystemExit and MemoryError included: report them
        ok = False
        etype, value, tb = sys.exc_info()
        frames = [f for f in traceback.extract_tb(tb) if f.filename == "<python>"]
        try:
            text = "".join(traceback.format_list(frames) + traceback.format_exception_only(etype, value)).rstrip()
        except BaseException:  # noqa: BLE001  — an exception whose str() raises
            text = f"{etype.__name__} (its message could not be shown)"
        buffer.write(text + "\n")
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return buffer.dropped, ok, buffer.lost or not _output_intact()


def _unbuffer_c_stdout():
    """C's stdout written as it is printed, as its stderr is: on a pipe the C library buffers it
    (4 KB), so what C code printed came after Python's later output, and was lost with the
    worker when the cell was stopped at its deadline or crashed (a flush at each cell's end only
    kept it to its cell)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        for name in ("stdout", "__stdoutp"):  # glibc's, macOS's
            try:
                libc.setvbuf(ctypes.c_void_p.in_dll(libc, name), None, 2, 0)  # _IONBF (2 in both)
            except ValueError:  # not this C library's name
                continue
    except (OSError, AttributeError, TypeError):
        pass


def _unbuffered(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(open(fd, "wb", buffering=0, closefd=False), encoding="utf-8", errors="replace",
                            write_through=True)


def main():
    reply = os.fdopen(os.dup(1), "w", encoding="utf-8")  # not inherited, not descriptor 1
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")  # likewise, not descriptor 0
    os.dup2(2, 1)  # native code writing to descriptor 1 cannot reach the reply channel
    global OUTPUT, OUTPUT_ID
    OUTPUT = os.dup(2)  # Python's output, whatever the code does to descriptors 1 and 2 (a notebook's)
    st = os.fstat(OUTPUT)
    OUTPUT_ID = (st.st_dev, st.st_ino)
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)  # ... nor reading descriptor 0 take the next request (it reads nothing)
    os.close(nothing)
    _unbuffer_c_stdout()
    # outside a cell (a thread's print after it returned): unbuffered, so nothing waits in a
    # buffer to come out in a later cell's output
    sys.__stdout__ = sys.stdout = _unbuffered(1)
    sys.__stderr__ = sys.stderr = _unbuffered(2)
    sys.__stdin__ = sys.stdin = io.StringIO()  # input() raises EOFError at once: no one types here
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    # the cells' namespace is __main__, as a notebook's: what a cell defines can be pickled and
    # its annotations resolved (this file's own names stay in its functions' globals)
    cells = types.ModuleType("__main__")
    sys.modules["__main__"] = cells
    namespace = cells.__dict__
    try:
        for line in requests:
            request = json.loads(line)
            dropped, ok, lost = _run(request["code"], namespace)
            reply.write(json.dumps({"id": request["id"], "ok": ok, "dropped": dropped, "lost": lost}) + "\n")
            reply.flush()
    except (OSError, ValueError):  # the code closed the request or reply channel: no traceback of ours
        os._exit(CHANNELS_CLOSED)
    os._exit(0)  # the parent is gone: end now, whatever threads the code left running


main()
