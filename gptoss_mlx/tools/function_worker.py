"""``serve --functions FILE``: the functions run in worker processes of their own.

A call that does not return within ``--function-timeout`` is ended with its process and the
processes its function started (its loop no longer spins on the server's cores, its slot is free
again); a function that ends its process
(``os._exit``, a crash in a C extension) fails that call alone; what a function prints goes to
the server's log. Idle workers are kept and reused, so a module's state (a connection, a cache)
lives as long as its worker; calls made at once run in different workers.

    python -m gptoss_mlx.tools.function_worker FILE [FILE ...]

reads one JSON request per line on stdin, ``{"recipient": "functions.NAME", "arguments": "..."}``,
and answers each with one line, ``{"content": "...", "ok": true}``; its first line is
``{"ready": true}``, or ``{"error": "..."}`` when a file cannot be loaded.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .toolbox import MAX_RESULT_CHARS, ToolResult

MAX_IDLE = 4  # idle workers kept for the next calls
MAX_LINE_BYTES = 8 * MAX_RESULT_CHARS + 65536  # a result line (JSON escapes ~6 bytes a character)


class WorkerFailed(Exception):
    """A worker that could not start, ended, or did not answer in time; str() says which."""


class Worker:
    """One worker process and its pipes."""

    def __init__(self, paths: list[Path]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptoss_mlx.tools.function_worker", *map(str, paths)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)  # no Ctrl-C of the server's
        self.pending = b""

    def ask(self, request: dict, deadline: float) -> dict:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        return self.answer(deadline)

    def answer(self, deadline: float) -> dict:
        """The worker's next line; WorkerFailed when it ends, or has not written one by ``deadline``
        (it is then ended)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.end()
                raise WorkerFailed("timeout")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.end()
                raise WorkerFailed(self.exit_description())
            self.pending += chunk
            if len(self.pending) > MAX_LINE_BYTES:
                self.end()
                raise WorkerFailed(f"its answer is over {MAX_LINE_BYTES} bytes")
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def exit_description(self) -> str:
        code = self.proc.wait()
        if code < 0:
            try:
                return f"its process was ended by {signal.Signals(-code).name}"
            except ValueError:
                return f"its process was ended by signal {-code}"
        return f"its process exited with code {code}"

    def end(self) -> None:
        """Kill the worker and what its functions started (its session's process group: a
        subprocess left running would outlive the call's timeout and the server)."""
        if self.proc.returncode is not None:  # ended and reaped: its id may be another group's now
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # before the wait: the group's id stays its own
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class FunctionWorkers:
    """The server's workers for its ``--functions`` files. :meth:`call` blocks (run it in a
    thread): at most one call per worker at a time."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def call(self, recipient: str, arguments: str, timeout_s: float, since: float | None = None) -> ToolResult:
        """Run the call in a worker; not returned ``timeout_s`` after ``since`` (a time.monotonic()
        when the call was made; default now), its worker is ended."""
        deadline = (time.monotonic() if since is None else since) + timeout_s
        try:
            worker = self._take(deadline)
        except WorkerFailed as e:
            why = f"did not start within {timeout_s:g} s" if str(e) == "timeout" else f"could not start: {e}"
            return ToolResult(recipient, f"Error: {recipient} {why}", ok=False)
        try:
            reply = worker.ask({"recipient": recipient, "arguments": arguments}, deadline)
        except (WorkerFailed, OSError, ValueError) as e:
            with self._lock:
                self._busy.discard(worker)
            worker.end()
            why = (f"did not return within {timeout_s:g} s: its process was ended" if str(e) == "timeout"
                   else f"failed: {e}" if isinstance(e, WorkerFailed) else f"failed: its worker broke ({e})")
            return ToolResult(recipient, f"Error: {recipient} {why}", ok=False)
        self._give_back(worker)
        return ToolResult(recipient, str(reply.get("content", "")), bool(reply.get("ok")))

    def _take(self, deadline: float) -> Worker:
        with self._lock:
            if self._closed:
                raise WorkerFailed("the server is shutting down")
            worker = self._idle.pop() if self._idle else None
            if worker is not None:
                self._busy.add(worker)
                return worker
        worker = Worker(self.paths)
        with self._lock:
            self._busy.add(worker)
        try:
            first = worker.answer(deadline)
        except WorkerFailed:
            with self._lock:
                self._busy.discard(worker)
            raise
        if "error" in first:
            with self._lock:
                self._busy.discard(worker)
            worker.end()
            raise WorkerFailed(first["error"])
        return worker

    def _give_back(self, worker: Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            if not self._closed and len(self._idle) < MAX_IDLE and worker.proc.poll() is None:
                self._idle.append(worker)
                return
        worker.end()

    def close(self) -> None:
        """End every worker, busy ones too (their calls fail); no call starts after this."""
        with self._lock:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle, self._busy = [], set()
        for worker in workers:
            worker.end()


# ---- the worker process ------------------------------------------------------------------------

def _end_with_parent() -> None:
    """A worker whose server has gone (killed, crashed) ends, even while a function spins."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main(paths: list[str]) -> int:
    from ..chat import ToolCall
    from .functions import ToolError, load_functions
    from .toolbox import Toolbox

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server ends its workers itself
    _end_with_parent()
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # what the functions print goes to the server's log, not into the answers

    def say(data: dict) -> None:
        answers.write(json.dumps(data, ensure_ascii=False) + "\n")
        answers.flush()
    try:
        functions = [f for path in paths for f in load_functions(path)]
    except ToolError as e:
        say({"error": str(e)})
        return 1
    toolbox = Toolbox(functions=functions)
    say({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        result = toolbox.execute(ToolCall(request["recipient"], request["arguments"]))
        say({"content": result.content, "ok": result.ok})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
