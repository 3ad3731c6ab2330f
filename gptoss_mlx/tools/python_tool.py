"""The built-in ``python`` tool: the model's code runs in a Python process inside an OS sandbox.

The sandbox (sandbox.py: bubblewrap + seccomp on Linux, Seatbelt on macOS) lets the code read
Python and the system libraries and write only its working directory (on Linux a tmpfs capped
at ``disk_mb``); no network unless allowed, no new processes, nothing of the user's (home,
keys, environment, other processes). The worker (_sandbox_worker.py) sets hard resource
limits. Each run has a wall-clock timeout, after which the whole sandbox is killed (and, in
session mode, restarted). ``stateful=True`` keeps one interpreter across calls, like the
notebook the model was trained with; ``stateful=False`` starts a fresh one per call, like
OpenAI's reference tool. Without a working OS sandbox the tool refuses to start.

Replies come back one JSON line per request, tagged with the request's random id. The code
runs in the worker's process and could write to that channel, so the parent believes only one
well-formed reply with the right id, read before a deadline; anything else (malformed,
unmatched, extra bytes, silence) kills the worker and tells the model what happened. What the
code prints comes on a pipe of its own (the worker's descriptors 1 and 2) while it runs, so a
cell stopped at its deadline, or killed, still gives the model what it printed before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..files import valid_text
from ..harmony import PYTHON_DESCRIPTION, python_description
from .sandbox import (LINUX_WORKDIR, WORKER, PidsCgroup, SandboxLimits, make_policy,
                      require_sandbox, sandbox_env, sandboxed_command)

__all__ = ["PythonSandbox", "SandboxLimits", "description"]

CANCELLED_NOTE = "[the python sandbox was stopped: whoever asked for this run has gone]"
INTERRUPTED_NOTE = "[stopped by the user before it finished]"
EXTRA_REPLY_NOTE = ("[the previous cell wrote extra data to the tool's reply channel; the "
                    "session was restarted and {lost}]\n")  # lost: PythonSandbox.lost
STARTUP_S = 20.0  # for the sandbox and the interpreter to come up
CHANNELS_CLOSED = 86  # the worker's exit status where the code closed its request or reply channel
CLOSED_NOTE = "the previous cell closed the descriptors the tool talks to the session through"
ENDING_S = 1.0  # for a session that could not be paused (it is ending by itself) to end
IDLE_CPU_S = 0.2  # CPU seconds a session may use between cells before it is restarted
CONTINUE_S = 5.0  # for a session continued between cells to answer an empty cell
STOP_TRIES = 50  # SIGSTOPs sent (2 ms apart) until every thread of a session between cells is stopped
POLL_S = 0.1  # how often a running cell's file count is checked (Linux), and at its end


def description(stateful: bool, limits: SandboxLimits, workdir: str = LINUX_WORKDIR) -> str:
    """The tool's description in the system message: the training-time text (harmony's
    PYTHON_DESCRIPTION) with what this sandbox really does (timeout, directory, network); for
    a stateless tool, the text of OpenAI's reference tool."""
    network = "enabled" if limits.network else "disabled"
    if stateful:
        return python_description(
            limits.timeout_s, f"The drive at '{workdir}' can be used to save and persist user files.",
            f"{network}.")
    intro = PYTHON_DESCRIPTION.split("\n\n")[0].replace("execute Python", "execute STATELESS Python")
    return (
        f"{intro}\n\nWhen you send a message containing python code to python, it will be "
        "executed in a stateless environment, and it will respond with the output of the "
        f"execution or time out after {limits.timeout_s:.1f} seconds. You have to use print "
        "statements to access the output; the environment is not shared between calls. "
        f"Internet access for this session is {network}.")


def _ended_how(status: int) -> str:
    """Why the worker ended, from its exit status (the sandbox's: bwrap gives a signal as 128 +
    its number, sandbox-exec as minus it): every end was "out of memory, over its CPU-time
    limit, or killed", an exit status of 3 and a segfault too (a tester's)."""
    number = -status if status < 0 else status - 128 if 128 < status < 128 + 65 else None
    if status == CHANNELS_CLOSED:
        return "the code closed the descriptors the tool talks to it through"
    if number is None:
        return f"exit status {status}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    if number == signal.SIGKILL:
        return "killed: out of memory or over its CPU-time limit?"
    if number == getattr(signal, "SIGXCPU", None):
        return "over its CPU-time limit"
    return {"SIGSEGV": "it crashed: SIGSEGV", "SIGBUS": "it crashed: SIGBUS",
            "SIGABRT": "it aborted: SIGABRT"}.get(name, f"signal {name}")


def _ps_cpu(pid: int) -> float | None:
    """CPU seconds of one process from ``ps -o time=`` ("[[dd-]hh:]mm:ss[.ss]"), or None."""
    try:
        text = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        days, _, clock = text.rpartition("-")
        seconds = 0.0
        for part in clock.split(":"):
            seconds = seconds * 60 + float(part)
        return seconds + 86400 * int(days or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _ready(fds: list[int], timeout: float, write: bool = False) -> list[int]:
    """Those of ``fds`` ready to read (or to write) within ``timeout`` seconds, or ended. Through
    poll, not select, which refuses descriptors from 1024 on (a server with as many connections
    lost the python tool)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0, math.ceil(timeout * 1000)))]


class _Output:
    """What a cell printed, read from the output pipe as it comes: the first ``max_output``
    characters' worth of bytes kept, the rest counted."""

    def __init__(self, max_output: int):
        self.max_output, self.kept, self.dropped = max_output, bytearray(), 0

    def add(self, data: bytes) -> None:
        room = 4 * self.max_output - len(self.kept)  # UTF-8: at most 4 bytes a character
        self.kept += data[:max(room, 0)]
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self, dropped_chars: int | None = 0) -> str:
        """As valid text (a broken or lone character becomes U+FFFD), max_output characters at
        most, and a note of what was left out (``dropped_chars``: what the worker left out, None
        when it could not say: the cell was stopped)."""
        text = valid_text(self.kept.decode("utf-8", "replace"))
        cut = max(0, len(text) - self.max_output)
        text = text[:self.max_output]
        if dropped_chars or cut or self.dropped:
            known = dropped_chars is not None and not self.dropped
            text += f"\n[output truncated: {dropped_chars + cut} more characters]" if known else "\n[output truncated]"
        return text


# Starts every sandbox, from one thread that lives as long as the process: bwrap's
# --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that started it ends, so a
# session started from a short-lived thread (a request's, a pool's) died with that thread.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptoss-mlx-sandbox-spawner")


class PythonSandbox:
    def __init__(self, stateful: bool = True, limits: SandboxLimits | None = None):
        require_sandbox()  # raises SandboxUnavailable: never a run without the OS sandbox
        self.stateful = stateful
        self.limits = limits or SandboxLimits()
        # Linux: a tmpfs inside the sandbox; macOS: a fresh directory the profile opens.
        self._own_dir = None if sys.platform.startswith("linux") else tempfile.mkdtemp(prefix="gptoss-python-")
        self.workdir = os.path.realpath(self._own_dir) if self._own_dir else LINUX_WORKDIR
        self.policy = make_policy(self.limits, self.workdir)
        self._proc: subprocess.Popen | None = None
        self._pending: bytes = b""  # bytes read past the last reply
        self._out: int | None = None  # the output pipe's read end (the worker's descriptors 1, 2)
        self._output = _Output(self.limits.max_output)  # the cell's, so far
        self._idle_cpu: float | None = None  # CPU time of the sandbox when the last cell ended
        self._cgroup: PidsCgroup | None = None  # as root on Linux: the cap on its threads
        self._too_many_files = False
        self._last_id: str | None = None  # the last cell's request id, while its session lives
        self._running = threading.Lock()
        self._cancelled = False  # cancel(): nothing runs any more
        self._interrupted = False  # interrupt(): the cell under way is stopped
        self._lost_note = ""  # for the next cell: the session was ended after the last one
        self._ended: int | None = None  # the last session's exit status, where it ended by itself

    @property
    def description(self) -> str:
        return description(self.stateful, self.limits, self.workdir)

    @property
    def lost(self) -> str:
        """What a restart of the session loses, for the notes that say so: on Linux the working
        directory (a tmpfs) ends with the sandbox too; macOS's directory outlives it."""
        if self._own_dir:
            return "its variables are lost"
        return f"its variables and its files in {self.workdir} are lost"

    def _start(self) -> None:
        config = {"memory_mb": self.limits.memory_mb, "cpu_s": self.limits.cpu_s,
                  "max_output": self.limits.max_output, "max_file_mb": self.limits.max_file_mb,
                  "open_files": self.limits.open_files, "processes": self.limits.max_processes}
        launch = sandboxed_command(self.policy, [sys.executable, "-I", WORKER, json.dumps(config)])
        self._cgroup = launch.cgroup
        out, into = os.pipe()
        try:
            proc = _SPAWNER.submit(
                subprocess.Popen, launch.argv, pass_fds=launch.pass_fds, env=sandbox_env(self.workdir),
                cwd=self._own_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=into, start_new_session=True).result()
        except BaseException:
            os.close(out)
            raise
        finally:
            os.close(into)
            if launch.keep is not None:
                launch.keep.close()
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(out, False)
        self._proc, self._out, self._pending, self._idle_cpu = proc, out, b"", None
        self._output = _Output(self.limits.max_output)
        if self._read_reply(time.monotonic() + STARTUP_S) != {"ready": True}:
            said = self._take_output().strip().splitlines()  # bwrap's or Python's last words
            self._kill()
            raise RuntimeError("the python sandbox did not start" + (f": {said[-1][:300]}" if said else ""))

    def run(self, code: str) -> str:
        """Run ``code``; returns what it printed (and its last expression's value), a traceback,
        or a note saying why there is no result. Never raises for anything the code does."""
        with self._running:  # one cell at a time, whichever threads ask
            try:
                return self._run(code)
            except BaseException:  # Ctrl-C in the caller's thread: the cell is stopped with it
                self._kill()  # (it ran on in its own session, past its deadline, unwatched)
                if self.stateful:
                    self._lost_note = f"[the previous cell was stopped by the user; the session was restarted and {self.lost}]\n"
                raise

    def cancel(self) -> None:
        """From any thread: kill the cell under way (run() then returns at once, saying the
        process ended) and run nothing after it. For a caller whose client has gone."""
        self._cancelled = True
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def interrupt(self) -> None:
        """From any thread: kill the cell under way, which returns saying the user stopped it
        (its session is lost); later cells run as usual. Nothing when no cell runs."""
        if self._running.locked():
            self._interrupted = True
            proc = self._proc
            if proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def _run(self, code: str) -> str:
        self._interrupted = False
        if self._cancelled:
            return CANCELLED_NOTE
        note, self._lost_note = self._lost_note, ""
        note += self._check_idle() or self._check_quiet()
        had_session = self.stateful and self._proc is not None
        if self._proc is not None and not self._signal_all(signal.SIGCONT):
            self._kill()
        if had_session and self._proc is not None:
            stale = self._check_continued()
            note, had_session = note + stale, had_session and not stale
        deadline = None
        for _ in range(2):
            if self._cancelled:  # the worker was killed on purpose: not one to start again
                self._kill()
                return note + CANCELLED_NOTE
            if self._interrupted:  # stopped before the code was sent (as the session was checked)
                self._kill()
                return note + INTERRUPTED_NOTE[:-1] + (f"; the session was restarted and {self.lost}]"
                                                       if had_session else "]")
            try:
                if self._proc is None or self._proc.poll() is not None:
                    if had_session:  # it ended between cells, or as it was continued
                        why = CLOSED_NOTE if self._ended == CHANNELS_CLOSED else "the previous session ended between cells"
                        note += f"[{why}; it was restarted and {self.lost}]\n"
                        had_session = False
                    self._start()
            except (OSError, RuntimeError) as e:
                self._kill()
                if self._cancelled:  # killed as it started
                    return note + CANCELLED_NOTE
                if self._interrupted:
                    return note + INTERRUPTED_NOTE
                return f"[the Python sandbox could not start: {e}]"
            if self._cancelled:  # cancel() came while the sandbox was being started
                self._kill()
                return note + CANCELLED_NOTE
            if self._interrupted:
                self._kill()
                return note + INTERRUPTED_NOTE
            # one deadline for the cell, a second try (in a fresh session) included
            deadline = deadline or time.monotonic() + self.limits.timeout_s
            self._take_output()  # (what a session printed between cells, or at its start: not this cell's)
            request_id, request, sent, reply = self._exchange(code, deadline)
            if self._last_id is not None and isinstance(reply, dict) \
                    and reply.get("id") == self._last_id:
                # The previous cell forged its reply and was stopped before it wrote the real
                # one, which came now: the session is not to be trusted; run the code afresh.
                self._kill()
                note, had_session = note + EXTRA_REPLY_NOTE.format(lost=self.lost), False
                continue
            timed_out = time.monotonic() >= deadline
            if reply is not None or timed_out or not self._never_taken(request, sent):
                break
            # The worker was ending before it read the request (a cell that forged its reply,
            # then exited): run the code in a fresh one.
            self._kill()
        if reply is not None and self._over_files():
            reply = None  # a cell quicker than one poll: its files stay, so the session goes
        dropped = reply.get("dropped") if isinstance(reply, dict) else None
        if not isinstance(reply, dict) or reply.get("id") != request_id or self._pending \
                or type(dropped) is not int or not 0 <= dropped < 2**53:
            status = self._proc.poll() if self._proc is not None else None  # None: still running
            alive = self._proc is not None and status is None
            too_many_files = self._too_many_files
            printed = self._take_output(None)  # what it printed before it was stopped
            printed += "\n" if printed and not printed.endswith("\n") else ""
            self._kill()
            lost = f"; the session was restarted and {self.lost}" if self.stateful else ""
            if self._cancelled:
                return note + CANCELLED_NOTE
            if self._interrupted:
                return note + printed + INTERRUPTED_NOTE[:-1] + lost + "]"
            if too_many_files:
                # (the tmpfs counts each extended attribute's memory in inodes too: helper-137)
                why = (f"the code created more than {self.limits.max_files} files (or extended "
                       "attributes) in its directory")
            elif timed_out:
                why = f"execution timed out after {self.limits.timeout_s:.1f} seconds"
            elif reply is None and not alive:
                why = f"the Python process ended ({_ended_how(status)})"
            else:
                why = ("the Python process's reply was malformed or out of order (the code "
                       "wrote to the tool's reply channel?)")
            return note + printed + f"[{why}{lost}]"
        printed = self._take_output(dropped)
        if reply.get("lost") is True:  # the code closed or replaced the worker's own output descriptor
            self._kill()
            lost = f"; the session was restarted and {self.lost}" if self.stateful else ""
            return note + printed + ("\n" if printed and not printed.endswith("\n") else "") + (
                f"[the code closed or replaced the descriptor its output goes through: what it printed after that "
                f"is lost{lost}]")
        if self.stateful:
            self._idle_cpu, self._last_id = self._sandbox_cpu(), request_id
            # Stopped until the next cell: a thread the code left running makes no files, uses
            # no CPU and reaches no network meanwhile, where no cell's limits are watched.
            if not self._stop_all():  # (a session ending by itself, stopped part-way: let it end, to say how)
                self._signal_all(signal.SIGCONT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=ENDING_S)
                self._kill()
                why = (CLOSED_NOTE if self._ended == CHANNELS_CLOSED
                       else "the previous session could not be paused after its cell")
                self._lost_note = f"[{why}; it was restarted and {self.lost}]\n"
        else:
            self._kill()
        return note + (printed or "[no output]")

    def _check_idle(self) -> str:
        """Restart a session that kept computing after its last cell returned (a thread left
        running); returns a note for the model, or ''."""
        if self._proc is None or self._idle_cpu is None:
            return ""
        used = self._sandbox_cpu()
        if used is None or used - self._idle_cpu <= IDLE_CPU_S:
            return ""
        self._kill()
        return ("[the previous session kept using the CPU after its code returned (a background "
                f"thread?); it was stopped and {self.lost}]\n")

    def _check_quiet(self) -> str:
        """Restart a session that wrote to the reply channel after its last reply (a forged
        reply came first and the real one after it); returns a note for the model, or ''."""
        if self._proc is None:
            return ""
        if not self._pending and not _ready([self._proc.stdout.fileno()], 0):
            return ""
        self._kill()
        return EXTRA_REPLY_NOTE.format(lost=self.lost)

    def _check_continued(self) -> str:
        """Have a session just continued answer an empty cell, so that one that ends as it is
        continued (code left a handler for it) is known to have ended before the cell is sent,
        not after the cell was read; kills a session that does not answer. Returns a note for
        the model when the session is not to be trusted (the kill alone is said by the caller)."""
        request_id, _, _, reply = self._exchange("", time.monotonic() + CONTINUE_S)
        if isinstance(reply, dict) and reply.get("id") == request_id and not self._pending:
            return ""
        self._kill()
        if self._last_id is not None and isinstance(reply, dict) and reply.get("id") == self._last_id:
            return EXTRA_REPLY_NOTE.format(lost=self.lost)  # the previous cell's real reply, after a forged one
        return ""

    def _exchange(self, code: str, deadline: float) -> tuple[str, bytes, bool, object]:
        """Send ``code`` under a new request id and read the reply before ``deadline``:
        (the id, the request's bytes, whether all of it was sent, the reply or None)."""
        request_id = secrets.token_hex(16)
        request = json.dumps({"id": request_id, "code": code}).encode() + b"\n"
        sent = self._send(request, deadline)
        return request_id, request, sent, self._read_reply(deadline) if sent else None

    def _send(self, data: bytes, deadline: float) -> bool:
        """Write all of ``data`` to the worker before ``deadline``; False if it did not take it."""
        fd = self._proc.stdin.fileno()
        while data:
            left = deadline - time.monotonic()
            if left <= 0 or not _ready([fd], left, write=True):
                return False
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                continue
            except OSError:  # the worker is gone
                return False
        return True

    def _never_taken(self, request: bytes, sent: bool) -> bool:
        """Whether a worker that gave no reply had ended without reading ``request``: the pipe
        refused it, or (Linux) all of it is still unread in the pipe."""
        if not sent:
            return True
        if not sys.platform.startswith("linux"):
            return False
        unread = fcntl.ioctl(self._proc.stdin.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(unread, sys.byteorder) == len(request)

    def _over_files(self) -> bool:
        """Whether the Linux sandbox's working directory holds more than max_files inodes (each
        an empty file costs kernel memory that the tmpfs size cap does not count)."""
        if not sys.platform.startswith("linux") or self._proc is None:
            return False
        try:
            with open(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children") as f:
                inner = f.read().split()[0]  # bwrap's process inside the sandbox
            st = os.statvfs(f"/proc/{inner}/root{self.workdir}")
        except (OSError, IndexError):
            return False
        self._too_many_files = st.f_files - st.f_ffree > self.limits.max_files
        return self._too_many_files

    def _read_reply(self, deadline: float):
        """One JSON line from the worker, read before ``deadline`` (None on silence, death, an
        oversized or malformed line), and meanwhile what the code prints. Bytes after the line
        stay in self._pending."""
        fd = self._proc.stdout.fileno()
        limit = 12 * self.limits.max_output + 65536  # JSON: up to 12 bytes a character (an emoji: two \uXXXX escapes)
        chunks = self._pending
        files_checked = time.monotonic()
        while b"\n" not in chunks:
            now = time.monotonic()
            left = deadline - now
            if left <= 0 or len(chunks) > limit:
                return None
            if now - files_checked >= POLL_S:  # (also while the code prints without a pause)
                if self._over_files():
                    return None
                files_checked = now
            ready = _ready([fd, self._out], min(left, POLL_S))
            if self._out in ready:
                self._read_output()
            if fd not in ready:
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                return None  # the process died
            chunks += data
        line, self._pending = chunks.split(b"\n", 1)
        try:
            return json.loads(line)
        except (ValueError, OSError, RecursionError):  # RecursionError: nested too deeply
            return None

    def _read_output(self) -> bool:
        """What is in the output pipe now, into self._output; False once it has nothing."""
        try:
            data = os.read(self._out, 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        self._output.add(data)
        return bool(data)

    def _take_output(self, dropped_chars: int | None = 0) -> str:
        """What the cell printed (all of it that is in the pipe by now), and a fresh record for
        the next. (The worker wrote it before its reply, so once the reply is read it is all
        there; a pipe whose writers all ended reads empty, not blocked.)"""
        if self._out is not None:
            for _ in range(1024):  # 64 MB at most: a cell that floods the pipe from a thread
                if not self._read_output():
                    break
        output, self._output = self._output, _Output(self.limits.max_output)
        return output.text(dropped_chars)

    def _sandbox_pids(self) -> list[int] | None:
        """Every process of the sandbox, as the host numbers them (None if unknown)."""
        if self._proc is None:
            return None
        if not os.path.isdir("/proc"):  # macOS: the worker is the sandbox (no process-fork)
            return [self._proc.pid]
        root = self._proc.pid
        pids, todo = [], [root]
        gone = (FileNotFoundError, ProcessLookupError)  # a process or thread that just ended
        try:
            while todo:
                pid = todo.pop()
                try:
                    tasks = os.listdir(f"/proc/{pid}/task")
                except gone:
                    if pid == root:
                        return None
                    continue
                pids.append(pid)
                for task in tasks:
                    try:
                        with open(f"/proc/{pid}/task/{task}/children") as f:
                            todo += [int(p) for p in f.read().split()]
                    except gone:
                        continue
        except (OSError, ValueError):
            return None
        return pids

    def _sandbox_cpu(self) -> float | None:
        """CPU seconds used so far by every process of the sandbox (None if unknown)."""
        pids = self._sandbox_pids()
        if pids is None:
            return None
        if not os.path.isdir("/proc"):
            return _ps_cpu(pids[0])
        total, tick = 0.0, os.sysconf("SC_CLK_TCK")
        try:
            for pid in pids:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except (OSError, ValueError, IndexError):
            return None
        return total

    def _stop_all(self) -> bool:
        """SIGSTOP the sandbox and check that every thread of it is stopped: a SIGCONT the code
        sends itself in a loop cancels a stop still pending (a tester's 32 threads won 1 cell in
        4), so the stop is sent again until all are; False if they are not (Linux; elsewhere the
        signal is all)."""
        for _ in range(STOP_TRIES):
            if not self._signal_all(signal.SIGSTOP):
                return False
            if not os.path.isdir("/proc"):
                return True
            time.sleep(0.002)  # the group stop reaches every thread
            if all(self._stopped(pid) for pid in self._sandbox_pids() or [None]):
                return True
        return False

    @staticmethod
    def _stopped(pid: int | None) -> bool:
        """Whether every thread of ``pid`` is stopped (state T; False when it cannot be read)."""
        if pid is None:
            return False
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                        return False
        except FileNotFoundError:  # ended meanwhile: it runs nothing
            return True
        except (OSError, IndexError):
            return False
        return True

    def _signal_all(self, sig: int) -> bool:
        """Send ``sig`` to every process of the sandbox; False if they could not all be found."""
        pids = self._sandbox_pids()
        try:
            for pid in pids or ():
                with contextlib.suppress(ProcessLookupError):  # ended since it was found
                    os.kill(pid, sig)
        except OSError:
            return False
        return pids is not None

    def _kill(self) -> None:
        """Kill the sandbox: bwrap's death ends its PID namespace and every process in it."""
        proc, self._proc, self._idle_cpu, self._last_id = self._proc, None, None, None
        cgroup, self._cgroup, self._too_many_files = self._cgroup, None, False
        out, self._out = self._out, None
        if out is not None:
            os.close(out)
        self._ended = None
        if proc is not None:
            self._ended = proc.poll()  # how it ended by itself, if it had (None: killed here)
            try:
                os.killpg(proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if cgroup is not None:
            cgroup.remove()

    def new_session(self) -> None:
        """A new conversation's: the interpreter ended (the next cell starts a fresh one) and its
        files gone, so nothing one conversation left (variables, modules, files, threads) meets
        the next one's code. A cell under way is stopped first."""
        self.interrupt()
        with self._running:
            self._kill()
            self._lost_note = ""
            if self._own_dir:  # macOS: the directory outlives the interpreter
                for entry in os.scandir(self._own_dir):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)

    def close(self) -> None:
        """End the sandbox; a cell under way in another thread is stopped first (it returns the
        cancel note), not pulled from under it."""
        self.cancel()
        with self._running:
            self._kill()
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
