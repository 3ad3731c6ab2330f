"""Run escape attempts against the python tool's sandbox and print contained/escaped per case.

    python scripts/check_sandbox.py            # on a Mac (Seatbelt) or on Linux (bubblewrap)
    python scripts/check_sandbox.py network    # only the cases whose names contain a word

Each case runs model-style code in a fresh PythonSandbox and then judges, from the output and
from what it can see outside (a canary directory, this process's environment, priority and
limits, the process list, a listening socket), whether the code got out. tests/test_sandbox.py
runs the same cases. Exit status 1 if anything escaped.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gptoss_mlx.tools.python_tool import PythonSandbox
from gptoss_mlx.tools.sandbox import SandboxLimits, python_paths, sandbox_env

SECRET = "gptoss-canary-secret-4f1d"


@dataclass
class Context:
    outside: Path  # a directory of the user's, with a canary file, that the code must not touch
    parent: int  # this process: the chat the code must not reach
    server: socket.socket  # listening on 127.0.0.1: nothing may connect
    marker: str  # a word in the command line of any process the code starts
    abstract: socket.socket | None  # Linux: listening on an abstract unix address
    grown: int = 0  # how much the case's host-side count grew while its sandbox was open

    @property
    def port(self) -> int:
        return self.server.getsockname()[1]

    @property
    def abstract_name(self) -> str:
        return self.abstract.getsockname()[1:].decode() if self.abstract else "none"

    def close(self) -> None:
        self.server.close()
        if self.abstract:
            self.abstract.close()

    def reset(self) -> None:
        """Put the outside directory back as it was (one case's escape must not fail the next)."""
        for p in self.outside.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        (self.outside / "canary").write_text("keep")

    def untouched(self) -> bool:
        return sorted(p.name for p in self.outside.iterdir()) == ["canary"] and \
            (self.outside / "canary").read_text() == "keep"

    def connected(self) -> bool:
        self.server.settimeout(0.05)
        try:
            self.server.accept()[0].close()
            return True
        except OSError:
            return False

    def survivors(self) -> list[str]:
        ps = subprocess.run(["ps", "-axww", "-o", "pid=,command="], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if self.marker in line and "ps -axww" not in line]


@dataclass
class Case:
    name: str
    code: str  # formatted with the Context's fields ({outside}, {parent}, {port}, {marker})
    contained: Callable[[str, Context], bool]  # (output, context) -> True if nothing got out
    limits: dict | None = None  # SandboxLimits fields for this case
    after: str | None = None  # a second cell; its output is what `contained` sees
    gap: float = 2.0  # seconds between the two cells (a leftover thread shows itself)
    host: Callable[[], int] | None = None  # a host-side count, read before and after the cells


def _meminfo_kb(field: str) -> int:
    """A field of the host's /proc/meminfo in kB (0 where there is none: macOS)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


def _shmem_kb() -> int:  # SysV segments and memfds are shmem
    return _meminfo_kb("Shmem")


def _host_threads() -> int:
    """Threads of every process on the host (0 where /proc is missing)."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[1])
    except OSError:
        return 0


def _paused_for(out: str, seconds: float) -> bool:
    """Whether ``out`` says 'longest pause X' with X at least ``seconds``."""
    found = re.search(r"longest pause ([0-9.]+)", out)
    return found is not None and float(found.group(1)) >= seconds


def _count_below(out: str, what: str, bound: int) -> bool:
    found = re.search(rf"{what} (\d+)", out)
    return found is not None and int(found.group(1)) < bound


def _failed(out: str) -> bool:
    return "Error" in out or "denied" in out or "not permitted" in out


def _no_write(out: str, ctx: Context) -> bool:
    return ctx.untouched()


def _parent_environ_in(out: str) -> bool:
    """Whether ``out`` shows an entry of this process's environment as the kernel keeps it
    (/proc/self/environ: the environment it started with)."""
    try:
        entries = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    ours = set(sandbox_env("/"))  # names the sandbox sets itself
    return any(repr(e)[2:-1] in out for e in entries
               if len(e) > 12 and e.split(b"=")[0].decode() not in ours)


def _only_python(line: str) -> bool:
    """A listing of the home directory may show only the way to a Python installed below it."""
    if not line.startswith("LIST "):
        return True
    home = Path(os.path.expanduser("~"))
    allowed = {Path(p).relative_to(home).parts[0] for p in python_paths()
               if Path(p).is_relative_to(home) and Path(p) != home}
    return set(eval(line[5:])) <= allowed  # noqa: S307 — a list of names we printed


FIND_REPLY_FD = ("import os, stat, sys\n"
                 "fds = [fd for fd in range(3, 64) if _ok(fd)]\n")
_OK = ("def _ok(fd):\n"
       "    try:\n"
       "        return stat.S_ISFIFO(os.fstat(fd).st_mode) and os.get_blocking(fd) is not None\n"
       "    except OSError:\n"
       "        return False\n")



def forge(output: str) -> str:
    """Code that writes a reply with the request's real id (found in the worker's frame) to every
    pipe it can find, with ``output`` (a Python expression: what replies carried before the
    output had a pipe of its own, which a forged reply must not bring to the model)."""
    return (_OK + FIND_REPLY_FD + "import json\nf = sys._getframe()\n"
            "while 'request' not in f.f_locals:\n    f = f.f_back\n"
            "line = json.dumps({{'id': f.f_locals['request']['id'], 'output': " + output +
            ", 'ok': True, 'dropped': 0}}).encode() + b'\\n'\nfor fd in fds:\n    os.write(fd, line)\n")


CASES = [
    Case("audit-hook tampering, then write outside",
         "import __main__\nvars(__main__).clear()\nopen('{outside}/pwned', 'w').write('x')", _no_write),
    Case("subprocess (_posixsubprocess.fork_exec)",
         "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo {marker}; touch {outside}/pwned'])",
         lambda out, ctx: ctx.untouched() and _failed(out)),
    Case("ctypes fork() and system()",
         "import ctypes\nlibc = ctypes.CDLL(None)\nprint('fork', libc.fork())\n"
         "print('system', libc.system(b'touch {outside}/pwned'))",
         lambda out, ctx: ctx.untouched() and not re.search(r"fork [1-9]", out) and "system 0" not in out),
    Case("fork bomb", "import os\nwhile True:\n    os.fork()",
         lambda out, ctx: "PermissionError" in out),
    Case("child in its own session survives the timeout",
         "import subprocess, sys, time\n"
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)  # {marker}'],\n"
         "                 start_new_session=True)\ntime.sleep(60)",
         lambda out, ctx: not ctx.survivors(),
         limits={"processes": True, "timeout_s": 2.0}),
    Case("signal every process (kill -1, with the harmless SIGCONT)",
         "import os, signal\nos.kill(-1, signal.SIGCONT)\nprint('signalled')",
         lambda out, ctx: "signalled" not in out and _failed(out)),
    Case("os.open with dir_fd",
         "import os\nfd = os.open('/', os.O_RDONLY)\n"
         "os.open('{outside}'.lstrip('/') + '/pwned', os.O_CREAT | os.O_WRONLY, dir_fd=fd)", _no_write),
    Case("sqlite3 database outside",
         "import sqlite3\nsqlite3.connect('{outside}/db.sqlite').execute('create table t (x)')", _no_write),
    Case("native writers outside (numpy.save, mx.save)",
         "import numpy as np\ntry:\n    np.save('{outside}/a.npy', np.zeros(3))\nexcept OSError as e:\n    print(e)\n"
         "import mlx.core as mx\nmx.save('{outside}/b.npy', mx.zeros(3))", _no_write),
    Case("mkfifo / mknod outside",
         "import os, stat\ntry:\n    os.mkfifo('{outside}/fifo')\nexcept OSError as e:\n    print(e)\n"
         "os.mknod('{outside}/node', stat.S_IFREG | 0o600)", _no_write),
    Case("hard link and rename of a file outside",
         "import os\ntry:\n    os.link('{outside}/canary', 'stolen')\nexcept OSError as e:\n    print(e)\n"
         "os.rename('{outside}/canary', 'moved')",
         lambda out, ctx: ctx.untouched() and "keep" not in out),
    Case("symlink out of the working directory",
         "import os\nos.symlink('/', 'root')\nopen('root{outside}/pwned', 'w').write('x')", _no_write),
    Case("write anywhere else (/, /etc, /dev, /dev/shm, /tmp, $HOME)",
         "import os\nfor p in ['/x', '/etc/x', '/dev/x', '/dev/shm/x', '/tmp/x', {home!r} + '/x']:\n"
         "    try:\n        open(p, 'w').write('x')\n        print('WROTE', p)\n    except OSError as e:\n"
         "        print(p, e)",
         lambda out, ctx: "WROTE" not in out and not os.path.exists(os.path.expanduser("~/x"))),
    Case("write a kernel setting (/proc/sys, same value)",
         "v = open('/proc/sys/fs/file-max').read()\nopen('/proc/sys/fs/file-max', 'w').write(v)\nprint('WROTE')",
         lambda out, ctx: "WROTE" not in out and _failed(out)),
    Case("write into the Python installation",
         "import json\nopen(json.__file__, 'a').write('# pwned')",
         lambda out, ctx: _failed(out) and "# pwned" not in Path(__import__("json").__file__).read_text()),
    Case("read /proc/<parent>/environ and every environ in /proc",
         "import os, glob\nfor p in ['/proc/{parent}/environ'] + glob.glob('/proc/*/environ'):\n"
         "    try:\n        print(p, open(p, 'rb').read())\n    except OSError as e:\n        print(p, e)",
         lambda out, ctx: SECRET not in out and not _parent_environ_in(out)),
    Case("open /proc/<parent>/mem for writing (also through dir_fd)",
         "import os\ntry:\n    os.open('/proc/{parent}/mem', os.O_RDWR)\n    print('OPENED')\n"
         "except OSError as e:\n    print(e)\n"
         "os.open('mem', os.O_RDWR, dir_fd=os.open('/proc/{parent}', os.O_RDONLY))\nprint('OPENED')",
         lambda out, ctx: "OPENED" not in out),
    Case("signal the parent: kill and pidfd_send_signal",
         "import os, signal\ntry:\n    os.kill({parent}, 0)\n    print('kill ok')\nexcept OSError as e:\n"
         "    print(e)\nsignal.pidfd_send_signal(os.pidfd_open({parent}), 0)\nprint('pidfd ok')",
         lambda out, ctx: "ok" not in out),
    Case("renice the parent",
         "import os\nos.setpriority(os.PRIO_PROCESS, {parent}, 19)",
         lambda out, ctx: os.getpriority(os.PRIO_PROCESS, 0) != 19 and _failed(out)),
    Case("set the parent's file-size limit (prlimit)",
         "import resource\nresource.prlimit({parent}, resource.RLIMIT_FSIZE, (0, 0))",
         lambda out, ctx: resource.getrlimit(resource.RLIMIT_FSIZE)[0] != 0 and _failed(out)),
    Case("raise its own limits",
         "import resource\nfor kind in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE'):\n"
         "    k = getattr(resource, kind)\n    soft, hard = resource.getrlimit(k)\n"
         "    try:\n        resource.setrlimit(k, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
         "        print(kind, 'raised')\n    except (ValueError, OSError):\n        print(kind, 'held')",
         lambda out, ctx: "raised" not in out and out.count("held") == 4),
    Case("background thread burning CPU after the cell returns",
         "import threading, time\nbeat = {{'last': time.monotonic(), 'longest': 0.0}}\ndef burn():\n"
         "    while True:\n        now = time.monotonic()\n"
         "        beat['longest'], beat['last'] = max(beat['longest'], now - beat['last']), now\n"
         "threading.Thread(target=burn, daemon=True).start()",
         lambda out, ctx: _paused_for(out, 1.5),  # stopped between the cells, not caught after
         after="import time\ntime.sleep(0.05)\nprint('longest pause', beat['longest'])"),
    Case("background thread making files after the cell returns",
         "import threading\ndef make():\n    i = 0\n    while True:\n"
         "        open(f'f{{i}}', 'w').close()\n        i += 1\n"
         "threading.Thread(target=make, daemon=True).start()",
         lambda out, ctx: "lost" not in out and _count_below(out, "files", 20000),
         after="import os\nprint('files', len(os.listdir('.')))"),
    Case("fill the disk",
         "n = 0\nwith open('fill', 'wb') as f:\n    while n < 2**30:\n        f.write(b'x' * 2**20)\n"
         "        n += 2**20\n        f.flush()",
         lambda out, ctx: "Error" in out, limits={"disk_mb": 16, "max_file_mb": 512}),
    Case("fill the disk with many files",
         "for i in range(1000):\n    open(f'f{{i}}', 'wb').write(b'x' * 2**20)",
         lambda out, ctx: "Error" in out, limits={"disk_mb": 16}),
    Case("forged reply line",
         _OK + FIND_REPLY_FD +
         "for fd in fds:\n    os.write(fd, b'{{\"id\": \"x\", \"output\": \"FORGED\", \"ok\": true}}\\n')",
         lambda out, ctx: "FORGED" not in out and "reply" in out),
    Case("a reply nested too deep for the JSON parser, then a busy worker",
         _OK + FIND_REPLY_FD + "for fd in fds:\n    os.write(fd, b'[' * 50000 + b']' * 50000 + b'\\n')\n"
         "import time\nt = time.time()\nwhile time.time() - t < 25:\n    pass",
         lambda out, ctx: out.strip() == "next", gap=0, after="print('next')"),
    Case("forged reply with the right id, then a large cell", forge("'FORGED'"),
         lambda out, ctx: "FORGED" not in out and out.rstrip().endswith("large done"),
         after="x = '" + "y" * 3_000_000 + "'\nprint('large done')"),
    Case("network: TCP to the host's 127.0.0.1",
         "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
         lambda out, ctx: _failed(out) and not ctx.connected()),
    Case("network: abstract unix socket of the host",
         "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{abstract}')",
         lambda out, ctx: _failed(out)),
    Case("read the home directory and ~/.ssh",
         "import os\nfor p in [{home!r}, {home!r} + '/.ssh', '{outside}']:\n"
         "    try:\n        print('LIST', sorted(os.listdir(p)))\n    except OSError as e:\n        print(e)\n"
         "print(open('{outside}/canary').read())",
         lambda out, ctx: "keep" not in out and all(_only_python(line) for line in out.splitlines())),
    Case("read /etc/shadow, type into the terminal (/dev/tty)",
         "import fcntl, termios\nfor p in ['/etc/shadow', '/etc/passwd']:\n    try:\n"
         "        print('READ', open(p).read()[:20])\n    except OSError as e:\n        print(e)\n"
         "tty = open('/dev/tty', 'w')\nfcntl.ioctl(tty, termios.TIOCSTI, b'x')\nprint('TYPED')",
         lambda out, ctx: "READ" not in out and "TYPED" not in out),
    # (helper-151's: bwrap's own devpts hands out ptys from the host's pool, kernel.pty.nr, which
    # every container shares; a session held 240 between cells, 13 emptied the pool)
    Case("ptys from the host's pool (kernel.pty.nr)",
         "import os\nptys = []\ntry:\n    for _ in range(20):\n        ptys.append(os.openpty())\n"
         "except OSError as e:\n    print(e)\nprint('PTYS', len(ptys))\n"
         "try:\n    open('/dev/pts/x', 'wb').write(b'x' * 2**20)\n    print('WROTE')\nexcept OSError as e:\n    print(e)",
         lambda out, ctx: "PTYS 0" in out and "WROTE" not in out),  # (the re-attack: its tmpfs took 720 MB)
    Case("environment variables (tokens, keys)", "import os\ndict(os.environ)",
         lambda out, ctx: SECRET not in out and "HOME" in out),
    Case("unshare a new user namespace",
         "import ctypes\nprint('unshare', ctypes.CDLL(None).unshare(0x10000000))",
         lambda out, ctx: "unshare 0" not in out),
    Case("memory bomb", "b = bytearray(8 * 2**30)",
         lambda out, ctx: "MemoryError" in out or "ended" in out, limits={"memory_mb": 512}),
    Case("SysV shared memory outside the memory limit (shmget, shmat, populate, shmdt)",
         "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n"
         "libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]\n"
         "for i in range(2):\n    sid = libc.shmget(0, ctypes.c_size_t(2**28), 0o1600)\n"
         "    a = libc.shmat(sid, None, 0)\n    if sid >= 0 and a not in (None, 2**64 - 1):\n"
         "        ctypes.memset(a, 1, 2**28)\n        libc.shmdt(ctypes.c_void_p(a))\n"
         "        print('HELD 256 MB')",
         lambda out, ctx: "HELD" not in out and ctx.grown < 2**17, limits={"memory_mb": 512},
         host=_shmem_kb),
    Case("memfd outside the memory and disk limits",
         "import os\nfor i in range(4):\n    fd = os.memfd_create('m')\n"
         "    os.posix_fallocate(fd, 0, 60 * 2**20)\n    print('HELD 60 MB')",
         lambda out, ctx: "HELD" not in out and ctx.grown < 2**17,
         limits={"memory_mb": 512, "disk_mb": 16}, host=_shmem_kb),
    Case("thread bomb (native threads, past max_processes)",
         "import ctypes\nlibc = ctypes.CDLL(None)\nattr = ctypes.create_string_buffer(64)\n"
         "libc.pthread_attr_init(attr)\nlibc.pthread_attr_setstacksize(attr, ctypes.c_size_t(16384))\n"
         "libc.pthread_attr_setdetachstate(attr, 1)\ntid = ctypes.c_ulong()\n"
         "start = ctypes.cast(libc.pause, ctypes.c_void_p)\nn = 0\n"
         "while n < 2000 and libc.pthread_create(ctypes.byref(tid), attr, start, None) == 0:\n"
         "    n += 1\nprint('THREADS', n)",
         lambda out, ctx: ctx.grown < 500 and ((m := re.search(r"THREADS (\d+)", out)) is None
                                               or int(m[1]) <= 64),
         limits={"max_processes": 64}, host=_host_threads),
    Case("inode flood (empty files in the working directory)",
         "import os\nfor i in range(200_000):\n    os.close(os.open(f'f{{i}}', os.O_CREAT | os.O_WRONLY))\n"
         "print('CREATED', i + 1)",
         lambda out, ctx: "CREATED" not in out,
         limits={"max_files": 5000}),
    Case("inode flood while a thread prints every millisecond (the output pipe never idle)",
         "import os, threading, time\n"
         "threading.Thread(target=lambda: [(os.write(1, b'z'), time.sleep(0.001)) for _ in iter(int, 1)],"
         " daemon=True).start()\nfor i in range(200_000):\n    os.close(os.open(f'f{{i}}', os.O_CREAT | os.O_WRONLY))\n"
         "print('CREATED', i + 1)",
         lambda out, ctx: "CREATED" not in out and "created more than 5000 files" in out,
         limits={"max_files": 5000}),
    Case("inode flood with hard links and symlinks (quicker than one poll)",
         "import os\nopen('a', 'w').close()\nfor i in range(20_000):\n    os.link('a', f'l{{i}}')\n"
         "    os.symlink('a', f's{{i}}')\nprint('CREATED')",  # (printed before the count is seen)
         lambda out, ctx: "created more than 5000 files" in out and "restarted" in out,
         limits={"max_files": 5000}),
    Case("forged reply with the right id and a huge output",
         forge("'A' * 7000") + "import time\ntime.sleep(2)",
         lambda out, ctx: len(out) <= 1100, limits={"max_output": 1000}),
    Case("forged reply with the right id, then exit: the next cell must run",
         forge("'x'") + "os._exit(0)", lambda out, ctx: "next ran" in out, after="print('next ran')",
         gap=0.0),
    Case("forged reply with the right id, the real one late: the next cell must run",
         forge("'x'") + "import time\ntime.sleep(0.5)",
         lambda out, ctx: out.rstrip().endswith("next ran") and "malformed" not in out,
         after="print('next ran')", gap=0.0),
    Case("a lone surrogate in the output", "print('\\ud800')",
         lambda out, ctx: _valid(out)),
]


def _valid(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def run_case(case: Case, ctx: Context) -> tuple[bool, str]:
    """(contained, output) for one case in a fresh sandbox."""
    limits = SandboxLimits(**{"timeout_s": 10.0, **(case.limits or {})})
    fields = {"outside": ctx.outside, "parent": ctx.parent, "port": ctx.port, "marker": ctx.marker,
              "home": os.path.expanduser("~"), "abstract": ctx.abstract_name}
    ctx.reset()
    with PythonSandbox(limits=limits) as box:
        before = case.host() if case.host else 0
        out = box.run(case.code.format(**fields))
        if case.after is not None:
            time.sleep(case.gap)
            out = box.run(case.after)
        ctx.grown = case.host() - before if case.host else 0
    time.sleep(0.2 if case.limits and case.limits.get("processes") else 0)
    return case.contained(out, ctx), out


def context(tmp: Path) -> Context:
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "canary").write_text("keep")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    abstract = None
    if sys.platform.startswith("linux"):
        abstract = socket.socket(socket.AF_UNIX)
        abstract.bind(f"\0gptoss-sandbox-check-{os.getpid()}-{outside.stat().st_ino}")
        abstract.listen(1)
    os.environ["HF_TOKEN"] = os.environ["OPENAI_API_KEY"] = SECRET
    return Context(outside, os.getpid(), server, f"gptoss-marker-{os.getpid()}", abstract)


def main(words: list[str]) -> int:
    """Runs the cases whose names contain one of ``words`` (all cases without any)."""
    cases = [c for c in CASES if not words or any(w in c.name for w in words)]
    if not cases:  # "0 of 0 contained" would read as a pass
        print(f"no case's name contains {' or '.join(map(repr, words))}; the cases: "
              f"{', '.join(c.name for c in CASES)}", file=sys.stderr)
        return 2
    escaped = 0
    with tempfile.TemporaryDirectory() as tmp:
        ctx = context(Path(tmp))
        print(f"{'case':58} result")
        for case in cases:
            ok, out = run_case(case, ctx)
            escaped += not ok
            print(f"{case.name:58} {'contained' if ok else 'ESCAPED'}")
            if not ok:
                shown = out.strip().encode("utf-8", "backslashreplace").decode()
                print("    " + shown.replace("\n", "\n    ")[:2000])
    print(f"\n{len(cases) - escaped} of {len(cases)} contained")
    return 1 if escaped else 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="run only the cases whose names contain one of these")
    sys.exit(main(parser.parse_args().words))
