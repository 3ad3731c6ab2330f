"""The process the python tool's code runs in (started by python_tool.py; not imported).

    python -I _sandbox_worker.py '{"workdir": ..., "memory_mb": ..., "network": false, ...}'

Limits first (address space, file size, CPU time, no core files), then an audit hook that the
code cannot remove: no network unless allowed, no new processes, no native-code loading, and
no writing, deleting or renaming outside the working directory. Then it reads one JSON request
per line ({"code": ...}), runs it like a notebook cell (the value of a final expression is
printed) in one persistent namespace, and answers one JSON line ({"output": ..., "ok": ...}).
Output is captured up to a cap; the parent enforces wall-clock time by killing the process.
This is containment for a model's code, not a security boundary against a determined attacker.
"""

import ast
import io
import json
import os
import sys
import traceback

sys.dont_write_bytecode = True  # no .pyc files written beside imported modules
config = json.loads(sys.argv[1])
WORKDIR = os.path.realpath(config["workdir"])
MAX_OUTPUT = int(config["max_output"])
os.chdir(WORKDIR)

try:
    import resource

    def _limit(kind, value):
        try:
            soft, hard = resource.getrlimit(kind)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(kind, (value, hard))
        except (ValueError, OSError):
            pass  # not supported here (e.g. RLIMIT_AS on macOS)

    if config.get("memory_mb"):
        _limit(resource.RLIMIT_AS, int(config["memory_mb"]) * 2**20)
    _limit(resource.RLIMIT_FSIZE, int(config.get("max_file_mb", 64)) * 2**20)
    _limit(resource.RLIMIT_CPU, int(config.get("cpu_s", 600)))
    _limit(resource.RLIMIT_CORE, 0)
except ImportError:  # Windows: no rlimits
    pass


def _inside(path) -> bool:
    try:
        if isinstance(path, int):
            return True  # an already-open descriptor
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == WORKDIR or real.startswith(WORKDIR + os.sep)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move",
                "shutil.copyfile", "shutil.copytree", "os.chflags", "os.lchflags", "os.setxattr",
                "os.removexattr"}
_PROCESS_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                   "subprocess.Popen", "os.startfile", "pty.spawn", "os.kill", "os.killpg"}
_NETWORK_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                   "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                   "urllib.Request", "http.client.connect"}
# Loading a library or calling into one through ctypes would step around everything above.
# (Plain ctypes types stay allowed: NumPy uses them when it is imported.)
_NATIVE_EVENTS = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
                  "ctypes.PyObj_FromPtr"}
_ALLOW_NETWORK = bool(config.get("network"))


def _audit(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"writing outside the working directory is not allowed: {path}")
    elif event in _PATH_EVENTS:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(p) for p in paths):
            raise PermissionError(f"{event} outside the working directory is not allowed")
    elif event in _PROCESS_EVENTS:
        raise PermissionError("starting or signalling processes is not allowed in this sandbox")
    elif event in _NETWORK_EVENTS and not _ALLOW_NETWORK:
        raise PermissionError("network access is disabled in this sandbox")
    elif event in _NATIVE_EVENTS and not (event == "ctypes.dlopen" and args and args[0] is None):
        # dlopen(None) (the interpreter's own symbols) is what NumPy does on import; looking a
        # symbol up in it (dlsym) stays blocked.
        raise PermissionError(f"loading native code (ctypes) is not allowed in this sandbox ({event})")


class _CappedText(io.TextIOBase):
    """Keeps the first MAX_OUTPUT characters; counts the rest."""

    def __init__(self):
        self.parts, self.kept, self.dropped = [], 0, 0

    def writable(self):
        return True

    def write(self, s):
        room = MAX_OUTPUT - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self):
        out = "".join(self.parts)
        if self.dropped:
            out += f"\n[output truncated: {self.dropped} more characters]"
        return out


def _run(code: str, namespace: dict) -> tuple[str, bool]:
    buffer = _CappedText()
    sys.stdout = sys.stderr = buffer
    ok = True
    try:
        tree = ast.parse(code, "<python>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<python>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<python>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException:  # noqa: BLE001  — SystemExit and MemoryError included: report them
        ok = False
        etype, value, tb = sys.exc_info()
        frames = [f for f in traceback.extract_tb(tb) if f.filename == "<python>"]
        print("".join(traceback.format_list(frames) + traceback.format_exception_only(etype, value)).rstrip())
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return buffer.text(), ok


def main():
    channel_in = sys.stdin
    channel_out = os.fdopen(os.dup(1), "w")  # replies go here; the code's prints are captured
    sys.addaudithook(_audit)
    namespace = {"__name__": "__main__"}
    for line in channel_in:
        request = json.loads(line)
        output, ok = _run(request["code"], namespace)
        channel_out.write(json.dumps({"output": output, "ok": ok}) + "\n")
        channel_out.flush()


main()
