"""The built-in ``python`` tool: the model's code runs in a sandboxed subprocess.

Each sandbox has its own temporary working directory, a wall-clock timeout per call (the
process is killed and, in session mode, restarted), a memory limit, truncated output, no
network unless allowed, no child processes, and no writes outside its directory
(_sandbox_worker.py). ``stateful=True`` keeps one interpreter across calls, like the
notebook the model was trained with; ``stateful=False`` starts a fresh one per call, like
OpenAI's reference tool.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("_sandbox_worker.py")


@dataclass
class SandboxLimits:
    timeout_s: float = 30.0
    memory_mb: int = 2048
    max_output: int = 16_000  # characters of output returned to the model
    max_file_mb: int = 64
    network: bool = False


def description(stateful: bool, limits: SandboxLimits) -> str:
    """The tool's description in the system message: the training-time text where it is true,
    adjusted to what this sandbox really does (directory, timeout, network)."""
    network = "enabled" if limits.network else "disabled"
    if stateful:
        return (
            "Use this tool to execute Python code in your chain of thought. The code will not be "
            "shown to the user. This tool should be used for internal reasoning, but not for code "
            "that is intended to be visible to the user (e.g. when creating plots, tables, or "
            "files).\n\nWhen you send a message containing Python code to python, it will be "
            "executed in a stateful Jupyter notebook environment. python will respond with the "
            f"output of the execution or time out after {limits.timeout_s:.1f} seconds. The "
            "current working directory can be used to save and persist files. Internet access "
            f"for this session is {network}.")
    return (
        "Use this tool to execute STATELESS Python code in your chain of thought. The code will "
        "not be shown to the user. This tool should be used for internal reasoning, but not for "
        "code that is intended to be visible to the user (e.g. when creating plots, tables, or "
        "files).\n\nWhen you send a message containing python code to python, it will be "
        "executed in a stateless environment, and it will respond with the output of the "
        f"execution or time out after {limits.timeout_s:.1f} seconds. You have to use print "
        "statements to access the output; the environment is not shared between calls. "
        f"Internet access for this session is {network}.")


class PythonSandbox:
    def __init__(self, stateful: bool = True, limits: SandboxLimits | None = None,
                 workdir: str | os.PathLike | None = None):
        self.stateful = stateful
        self.limits = limits or SandboxLimits()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gptoss-python-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen | None = None

    @property
    def description(self) -> str:
        return description(self.stateful, self.limits)

    def _start(self) -> subprocess.Popen:
        config = {"workdir": str(self.workdir), "memory_mb": self.limits.memory_mb,
                  "max_output": self.limits.max_output, "max_file_mb": self.limits.max_file_mb,
                  "network": self.limits.network}
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.workdir), "LANG": "C.UTF-8",
               "TMPDIR": str(self.workdir)}
        return subprocess.Popen(
            [sys.executable, "-I", str(WORKER), json.dumps(config)], cwd=self.workdir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True,  # its own process group: killed as a whole
        )

    def run(self, code: str) -> str:
        """Run ``code``; returns what it printed (and its last expression's value), a traceback,
        or a note that it timed out. Never raises for anything the code does."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        try:
            proc.stdin.write(json.dumps({"code": code}) + "\n")
            proc.stdin.flush()
            line = self._read_line(proc, self.limits.timeout_s)
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            timed_out = proc.poll() is None
            self._kill()
            if timed_out:
                note = "the session was restarted; its variables are lost" if self.stateful else ""
                return f"[execution timed out after {self.limits.timeout_s:.1f} seconds{'; ' + note if note else ''}]"
            return "[the Python process ended unexpectedly (out of memory?); the session was restarted]"
        if not self.stateful:
            self._kill()
        try:
            return json.loads(line)["output"] or "[no output]"
        except (json.JSONDecodeError, KeyError, TypeError):
            self._kill()
            return "[the Python process wrote an unreadable reply; the session was restarted]"

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        chunks = b""
        while b"\n" not in chunks:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            data = os.read(fd, 1 << 16)
            if not data:
                return None  # the process died
            chunks += data
        return chunks.split(b"\n", 1)[0].decode("utf-8", "replace")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
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

    def close(self) -> None:
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
