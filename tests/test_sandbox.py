"""The python tool's OS sandbox: escape attempts of every kind (the cases of
scripts/check_sandbox.py, each in a fresh sandbox), the policy generators (bwrap argv, the
seccomp program run through a small BPF interpreter, the Seatbelt profile), the refusal without
a sandbox, the reply channel, and the approval rendering of hidden characters."""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from gptoss_mlx.tools import python_tool
from gptoss_mlx.tools import sandbox as sb
from gptoss_mlx.tools.approval import controls_shown, hidden_char_count, render_code_ansi, render_code_text
from gptoss_mlx.tools.python_tool import PythonSandbox, description
from gptoss_mlx.tools.sandbox import (Policy, SandboxLimits, SandboxUnavailable, bwrap_argv,
                                      make_policy, seatbelt_profile, seccomp_filter)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_sandbox.py"
_spec = importlib.util.spec_from_file_location("check_sandbox", SCRIPT)
check = sys.modules["check_sandbox"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


@pytest.fixture(scope="module")
def ctx(os_sandbox, tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("HF_TOKEN", "OPENAI_API_KEY")}
    context = check.context(tmp_path_factory.mktemp("escape"))
    yield context
    context.close()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("case", check.CASES, ids=[c.name for c in check.CASES])
def test_escape_is_contained(case, ctx):
    contained, out = check.run_case(case, ctx)
    assert contained, f"{case.name} escaped:\n{out}"
    assert ctx.untouched() and not ctx.connected() and not ctx.survivors()


# Cases that are safe to run with no sandbox at all: each must then be judged escaped, which
# shows that its judge can fail.
UNCONFINED = ["subprocess (_posixsubprocess.fork_exec)", "child in its own session survives the timeout",
              "native writers outside (numpy.save, mx.save)", "mkfifo / mknod outside",
              "open /proc/<parent>/mem for writing (also through dir_fd)",
              "signal the parent: kill and pidfd_send_signal", "read /etc/shadow, type into the terminal (/dev/tty)", "os.open with dir_fd", "sqlite3 database outside",
              "hard link and rename of a file outside", "read /proc/<parent>/environ and every environ in /proc",
              "network: TCP to the host's 127.0.0.1", "read the home directory and ~/.ssh",
              "memfd outside the memory and disk limits", "ptys from the host's pool (kernel.pty.nr)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("name", UNCONFINED)
def test_the_judges_see_an_escape_without_the_sandbox(name, monkeypatch, tmp_path):
    monkeypatch.setattr(python_tool, "require_sandbox", lambda: None)
    monkeypatch.setattr(python_tool, "sandboxed_command", lambda policy, command: sb.Launch(command, ()))
    monkeypatch.chdir(tmp_path)
    for key in ("HF_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.setenv(key, "")  # restored after check.context() sets them
    context = check.context(tmp_path)
    try:
        contained, out = check.run_case(next(c for c in check.CASES if c.name == name), context)
    finally:
        context.close()
        for line in context.survivors():
            os.kill(int(line.split()[0]), 9)
    assert not contained, out


def test_the_sandbox_still_does_what_the_model_needs(os_sandbox):
    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        assert box.run("open('a.txt', 'w').write('hi'); open('a.txt').read()").strip() == "'hi'"
        assert box.run("import os; os.getcwd()").strip() == repr(box.workdir)
        assert box.run("import numpy as np; int(np.arange(5).sum())").strip() == "10"
        threads = "import threading; t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()"
        assert box.run(threads).strip() == "thread"
        assert box.run("import tempfile; tempfile.NamedTemporaryFile().name").startswith(f"'{box.workdir}")


def test_network_and_processes_when_allowed(ctx):
    with PythonSandbox(limits=SandboxLimits(timeout_s=10, network=True, processes=True)) as box:
        code = f"import socket; socket.create_connection(('127.0.0.1', {ctx.port}), timeout=2).close(); 'connected'"
        assert box.run(code).strip() == "'connected'" and ctx.connected()
        run = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True).stdout"
        assert box.run(run).strip() == "b'42\\n'"


def test_forged_reply_does_not_shift_later_results(os_sandbox):
    with PythonSandbox(limits=SandboxLimits(timeout_s=5)) as box:
        forged = box.run(check._OK + check.FIND_REPLY_FD.replace("{{", "{") +
                         "for fd in fds:\n    os.write(fd, b'{\"id\": \"x\", \"output\": \"1\"}\\n{\"id\": \"y\", \"output\": \"2\"}\\n')")
        assert "malformed or out of order" in forged and "restarted" in forged
        assert [box.run(f"{i} * 10").strip() for i in range(3)] == ["0", "10", "20"]


def test_a_session_that_ends_between_cells_says_so_and_cells_from_two_threads_take_turns(os_sandbox):
    import threading

    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        # dies as it is continued for the next cell (stopped in between)
        box.run("keep = 4\nimport os, signal\nsignal.signal(signal.SIGCONT, lambda *a: os._exit(3))")
        out = box.run("print(keep)")
        assert "the previous session ended between cells" in out and "NameError" in out, out
        box.run("k = 5")
        outs = {}
        threads = [threading.Thread(target=lambda n=n, c=c: outs.__setitem__(n, box.run(c)))
                   for n, c in (("A", "import time\ntime.sleep(1)\nprint('A', k)"), ("B", "print('B', k)"))]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        assert outs == {"A": "A 5\n", "B": "B 5\n"}, outs


# A tester's attacks on the session (each failed before): one deadline for a cell, a session
# that outlives the thread that started it, cancel() at the start, losses always said, emoji.
def test_a_cell_gets_one_deadline_even_when_a_forged_late_reply_restarts_it(os_sandbox):
    """A thread of an earlier cell wrote that cell's reply id just before the next cell's
    deadline: the cell was run again in a fresh session with a whole new timeout (2x)."""
    arm = """
import sys, threading, time, json
f = sys._current_frames()[threading.main_thread().ident]
while f.f_code.co_name != "main": f = f.f_back
old_id, reply = f.f_locals["request"]["id"], f.f_locals["reply"]
def t():
    while True:
        time.sleep(0.005)
        req = f.f_locals.get("request") or {}
        if req.get("id") not in (None, old_id) and req.get("code"):
            time.sleep(2.7)
            reply.write(json.dumps({"id": old_id, "ok": True, "dropped": 0}) + "\\n"); reply.flush()
            return
threading.Thread(target=t, daemon=True).start()
"""
    with PythonSandbox(limits=SandboxLimits(timeout_s=3)) as box:
        box.run(arm)
        start = time.monotonic()
        out = box.run("import time\ntime.sleep(60)")
        assert time.monotonic() - start < 4.5 and "timed out after 3.0 seconds" in out, out


def test_a_session_outlives_the_thread_that_started_it(os_sandbox):
    import threading

    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        starter = threading.Thread(target=box.run, args=("x = 41",))
        starter.start()
        starter.join()  # bwrap --die-with-parent: fired when the thread that started it ended
        assert box.run("print(x + 1)") == "42\n"


def test_cancel_as_the_sandbox_starts_stops_the_cell(os_sandbox, monkeypatch):
    started = []
    real_start = PythonSandbox._start

    def start_then_cancelled(self):
        self.cancel()  # as it comes during Popen: no process yet to kill
        real_start(self)
        started.append(self._proc.pid)

    monkeypatch.setattr(PythonSandbox, "_start", start_then_cancelled)
    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        t0 = time.monotonic()
        assert box.run("import time; time.sleep(3); print('ran')") == python_tool.CANCELLED_NOTE
        assert time.monotonic() - t0 < 2.5 and started


def test_interrupt_stops_the_cell_under_way_and_the_tool_goes_on(os_sandbox):
    """Esc in the TUI waited for a spinning cell's timeout; cancel() would end the tool for good."""
    import threading

    with PythonSandbox(limits=SandboxLimits(timeout_s=30)) as box:
        box.interrupt()  # no cell under way: nothing to stop, nothing remembered
        assert box.run("x = 41") == "[no output]"
        threading.Timer(1.0, box.interrupt).start()
        t0 = time.monotonic()
        assert box.run("while True: pass") == ("[stopped by the user before it finished; the session "
                                               f"was restarted and {box.lost}]")
        assert time.monotonic() - t0 < 5
        assert box.run("print('next')") == "next\n"


def test_ctrl_c_in_the_callers_thread_stops_the_cell_too(os_sandbox):
    """A tester's (helper-137): Ctrl-C in the terminal chat left the run() but not the cell, which
    ran on in its own session past its deadline (a core busy until the next call), and the next
    cell blamed the code for it ("kept using the CPU ... a background thread?")."""
    import signal
    import threading

    with PythonSandbox(limits=SandboxLimits(timeout_s=5)) as box:
        box.run("x = 41")
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            box.run("while True: pass")
        pid = box._proc.pid if box._proc is not None else None
        assert pid is None or box._proc.poll() is not None  # killed, not left running
        assert box.run("'x' in globals()") == (f"[the previous cell was stopped by the user; the session was "
                                               f"restarted and {box.lost}]\nFalse\n")


def test_a_cell_runs_as_in_a_notebook_whatever_it_does_to_its_output(os_sandbox):
    """A tester's (helper-137): a cell that replaced sys.stdout, or pointed descriptor 1 elsewhere,
    raised with '[no output]' (its traceback printed where it had pointed); one that set
    sys.stdout to a number ended the session with the worker's own traceback; nothing a cell
    defined could be pickled (__main__ was the worker's module); after exit(), input() raised
    ValueError instead of EOFError."""
    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        box.run("x = 41")
        assert box.run("import sys; sys.stdout = None; raise ValueError('boom')").endswith("ValueError: boom\n")
        assert box.run("import io; sys.stdout = io.StringIO(); 1/0").endswith("ZeroDivisionError: division by zero\n")
        assert box.run("sys.stdout = 5; x") == "41\n"  # the session and its variables kept
        box.run("import os; _ = os.dup2(os.open('/dev/null', os.O_WRONLY), 1)")
        assert box.run("print('after'); x") == "after\n41\n"
        assert box.run("class Foo: pass\nimport pickle\ntype(pickle.loads(pickle.dumps(Foo()))).__name__") == "'Foo'\n"
        assert box.run("exit()").endswith("SystemExit: None\n")
        assert box.run("input()").endswith("EOFError: EOF when reading a line\n")
        assert box.run("class E(Exception):\n    def __str__(self): raise RuntimeError\nraise E()").endswith("\n")
        assert box.run("x") == "41\n"
        # the worker's own descriptor, found and closed or replaced (the re-attack's, helper-141):
        # a host traceback, or every later cell '[no output]'
        hijack = "import os\nfor fd in range(3, 20):\n    try:\n        {}\n    except OSError:\n        pass"
        said = box.run(hijack.format("os.dup2(os.open('/dev/null', os.O_WRONLY), fd) if fd != 3 else None"))
        assert "Traceback" not in said and said.endswith(f"[the code closed or replaced the descriptor its output goes "
                                                         f"through: what it printed after that is lost; the session was "
                                                         f"restarted and {box.lost}]") or "descriptors the tool talks" in said, said
        assert box.run("print('next'); 1/0").endswith("ZeroDivisionError: division by zero\n")
        said = box.run(hijack.format("os.close(fd)"))
        assert "Traceback" not in said and "the code closed the descriptors the tool talks to it through" in said, said
        assert box.run("print('again')") == "again\n"
        box.run("import os; os.close(4)")  # the request channel alone (descriptor 4): the worker ends after the cell
        assert box.run("print('next')").startswith("[the previous cell closed the descriptors the tool talks to "
                                                   "the session through; it was restarted")


def test_a_session_ended_after_its_cell_returned_is_said_in_the_next_cell(os_sandbox, monkeypatch):
    """Pausing the session after a cell could fail (a thread ending as its processes were
    listed): it was restarted, and the next cell ran without its variables and without a word."""
    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        real = box._signal_all
        monkeypatch.setattr(box, "_signal_all", lambda sig: False if sig == python_tool.signal.SIGSTOP else real(sig))
        assert box.run("secret = 42") == "[no output]"
        monkeypatch.setattr(box, "_signal_all", real)
        out = box.run("print(secret)")
        assert "could not be paused after its cell" in out and box.lost in out and "NameError" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_session_keeps_its_variables_while_its_threads_come_and_go(os_sandbox, monkeypatch):
    """A thread that ended while the session's processes were listed (to pause it) made the
    listing fail, and the session was restarted (a tester's churning threads: half the time)."""
    real = os.listdir
    ended = "4000000"  # a thread listed, gone before its file is opened
    monkeypatch.setattr(os, "listdir", lambda p: real(p) + [ended] if str(p).endswith("/task") else real(p))
    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        box.run("secret = 42")
        assert box._sandbox_pids() is not None
        assert box.run("print(secret)") == "42\n"


def test_a_long_emoji_output_with_a_raised_limit_comes_back(os_sandbox):
    with PythonSandbox(limits=SandboxLimits(timeout_s=10, max_output=40_000)) as box:
        out = box.run("x = 1\nprint('\\U0001F600' * 100_000)")
        assert out.startswith("\U0001F600" * 100) and "truncated" in out
        assert box.run("print(x)") == "1\n"


def test_what_a_cell_printed_before_it_was_stopped_comes_back_with_the_reason(os_sandbox):
    """A cell that printed its results, then ran past its deadline (or was interrupted, or
    died), gave the model only "[execution timed out ...]": what it printed was lost with the
    worker. And bytes written on descriptors 1 and 2 (C code, os.write) were discarded."""
    import threading

    with PythonSandbox(limits=SandboxLimits(timeout_s=1.5, max_output=1000)) as box:
        out = box.run("import time\nprint('result: 42', flush=False)\ntime.sleep(60)")
        assert out == f"result: 42\n[execution timed out after 1.5 seconds; the session was restarted and {box.lost}]", out
        out = box.run("import os\nprint('a')\nos.write(1, b'native 1\\n')\nos.write(2, b'native 2\\n')\nprint('b')")
        assert out == "a\nnative 1\nnative 2\nb\n"
        out = box.run("import os\nprint('before')\nos.abort()")
        assert out.startswith("before\n[the Python process ended") and "restarted" in out, out
        out = box.run("import os\nos.write(1, b'x' * 3000)\nn = os.write(1, '\\u00e9'.encode() * 10)")
        assert out == "x" * 1000 + "\n[output truncated: 2010 more characters]", out[-80:]
        out = box.run("import os\nfor i in range(300):\n    os.write(1, b'y' * 65536)")  # 19 MB from C code
        assert out == "y" * 1000 + "\n[output truncated]"
        out = box.run("import sys, ctypes\nsys.__stdout__.write('direct ')\nn = ctypes.CDLL(None).printf(b'from C')")
        assert out == "direct from C", out  # buffered in the worker, they came in later cells
        out = box.run("import ctypes, os, threading\nlibc = ctypes.CDLL(None)\n"  # a thread left in fgets()
                      "libc.fdopen.restype = ctypes.c_void_p\nlibc.fgets.argtypes = [ctypes.c_char_p, ctypes.c_int, "
                      "ctypes.c_void_p]\nr, w = os.pipe()\nf = libc.fdopen(r, b'r')\nbuf = ctypes.create_string_buffer(9)\n"
                      "threading.Thread(target=libc.fgets, args=(buf, 9, f), daemon=True).start()\nprint('done')")
        assert out == "done\n", out  # (flushing every C stream waited for its lock: timed out)
        out = box.run("print('z' * 5000)\nimport time\ntime.sleep(60)")  # cut, then stopped: both said
        assert out == "z" * 1000 + f"\n[output truncated]\n[execution timed out after 1.5 seconds; the session was restarted and {box.lost}]"
        timer = threading.Timer(0.5, box.interrupt)
        timer.start()
        out = box.run("import time\nprint('so far')\ntime.sleep(30)")
        assert out.startswith("so far\n[stopped by the user"), out


def test_what_c_code_printed_comes_back_in_order_and_before_a_timeout_or_crash(os_sandbox):
    """A tester's (helper-119): C's stdout on the worker's pipe was buffered by the C library, so
    a line printed with puts() came after Python's later output, and was lost when the cell then
    ran past its deadline, crashed or called _exit (the README promises what the code printed
    before, from Python or C)."""
    with PythonSandbox(limits=SandboxLimits(timeout_s=1.5)) as box:
        libc = "import ctypes, os, time\nlibc = ctypes.CDLL(None)\n"
        assert box.run(libc + "libc.puts(b'from C')\nprint('from Python')") == "from C\nfrom Python\n"
        out = box.run(libc + "libc.puts(b'C line')\ntime.sleep(60)")
        assert out.startswith("C line\n[execution timed out after 1.5 seconds"), out
        out = box.run(libc + "libc.puts(b'before _exit')\nos._exit(3)")
        # how it ended (every end read "out of memory, over its CPU-time limit, or killed": a
        # second tester's, helper-121)
        assert out.startswith("before _exit\n[the Python process ended (exit status 3)"), out
        out = box.run("import ctypes\nctypes.string_at(0)")
        assert out.startswith("[the Python process ended (it crashed: SIGSEGV)"), out
        assert box.run("print('next')") == "next\n"


def test_a_restart_says_the_working_directory_is_lost_where_it_is(os_sandbox):
    """A tester's (helper-119): on Linux the working directory is a tmpfs of the sandbox, so a
    restart (a timeout, a crash) emptied it, and the model was told only that its variables were
    lost; macOS's directory outlives the interpreter."""
    with PythonSandbox(limits=SandboxLimits(timeout_s=1.5)) as box:
        assert box.run("open('keep.txt', 'w').write('x')\nkept = 1") == "[no output]"
        out = box.run("while True: pass")
        files = box.run("import os\nos.listdir('.')")
        if sys.platform.startswith("linux"):
            assert out.endswith(f"; the session was restarted and its variables and its files in {box.workdir} "
                                "are lost]"), out
            assert files == "[]\n"
        else:
            assert out.endswith("; the session was restarted and its variables are lost]"), out
            assert files == "['keep.txt']\n"


def test_a_stop_while_the_session_is_checked_is_not_lost_and_close_never_pulls_a_cell_from_under_it(os_sandbox):
    """A tester's: Stop pressed while run() checked the paused session (kept busy by a SIGCONT
    handler) was taken for "the session ended between cells", and the whole cell ran in a fresh
    one; close() from another thread (the server's, as a client leaves) made run() raise."""
    import threading

    with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
        box.run("import signal, time\nsignal.signal(signal.SIGCONT, lambda *a: time.sleep(3))")
        threading.Timer(1.0, box.interrupt).start()
        start = time.monotonic()
        out = box.run("import time\ntime.sleep(4)\nprint('RAN')")
        assert "RAN" not in out and "stopped by the user" in out and time.monotonic() - start < 3.5, out
        assert box.run("print('next')") == "next\n"
    for _ in range(3):
        box = PythonSandbox(stateful=False, limits=SandboxLimits(timeout_s=5))
        result = []
        cell = threading.Thread(target=lambda: result.append(box.run("import time\nprint('A', flush=True)\ntime.sleep(3)")))
        cell.start()
        time.sleep(0.5)
        box.close()
        cell.join(10)
        assert not cell.is_alive() and "stopped" in result[0], result


def test_cpu_time_of_a_process_from_ps():  # how macOS (no /proc) sees a session burning CPU
    import time
    start = time.process_time()
    while time.process_time() - start < 1.1:
        pass
    assert python_tool._ps_cpu(os.getpid()) >= 1.0 and python_tool._ps_cpu(2**22 + 7) is None


def test_reads_never_block_past_the_deadline(os_sandbox):
    import time
    with PythonSandbox(limits=SandboxLimits(timeout_s=1.5)) as box:
        t0 = time.monotonic()
        out = box.run("import os; r, w = os.pipe(); os.read(r, 1)")  # would wait forever
        assert time.monotonic() - t0 < 4 and "timed out after 1.5 seconds" in out
        assert box.run("2 + 2").strip() == "4"
        assert box.run("import sys; sys.stdin.read()").strip() == "''"  # nothing to read, at once


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="root on Linux")
def test_as_root_threads_are_capped_by_a_cgroup_that_goes_away(os_sandbox):
    base = sb.pids_cgroup_base()
    orphan = f"{base}/{sb.PidsCgroup.PREFIX}{2**22 + 7}-left"  # its owner was killed (no such pid)
    alive = f"{base}/{sb.PidsCgroup.PREFIX}{os.getpid()}-other"  # another sandbox of a live process
    os.mkdir(orphan)
    os.mkdir(alive)
    try:
        with PythonSandbox(limits=SandboxLimits(timeout_s=10)) as box:
            box.run("1")
        assert not os.path.exists(orphan) and os.path.exists(alive)
    finally:
        for path in (orphan, alive):
            if os.path.exists(path):
                os.rmdir(path)
    with PythonSandbox(limits=SandboxLimits(timeout_s=10, max_processes=32)) as box:
        code = ("import threading, time\nfor i in range(100):\n"
                "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()")
        assert "can't start new thread" in box.run(code)
        path = box._cgroup.path
        assert open(f"{path}/pids.max").read().strip() == "32"
    assert not os.path.exists(path)


@pytest.fixture
def refusal():
    """Runs PythonSandbox() expecting a refusal and returns its message, checked to be one line
    (the probe's cached result is forgotten before and after)."""
    def refuse() -> str:
        sb.sandbox_problem.cache_clear()
        with pytest.raises(SandboxUnavailable) as e:
            PythonSandbox()
        assert "\n" not in str(e.value)
        return str(e.value)
    yield refuse
    sb.sandbox_problem.cache_clear()


def test_root_without_a_pids_cgroup_means_no_python_tool(monkeypatch, refusal):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sb.shutil, "which", lambda name: "/usr/bin/bwrap")
    monkeypatch.setattr(sb.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sb, "pids_cgroup_base", lambda: None)
    assert "no pids cgroup is writable" in refusal()


def test_no_sandbox_means_no_python_tool(monkeypatch, refusal):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    assert "install bubblewrap" in refusal()
    assert sb.sandbox_status().startswith("none") and "bubblewrap" in sb.sandbox_status()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bubblewrap")
def test_an_unusable_bwrap_means_no_python_tool(monkeypatch, os_sandbox, refusal):
    monkeypatch.setattr(sb, "bwrap_argv", lambda policy, fd: ["bwrap", "--uid", "x", "--"])
    assert "bwrap cannot create the sandbox here" in refusal()


# ---- the generators ---------------------------------------------------------------------------

def test_bwrap_argv_confines():
    policy = make_policy(SandboxLimits(disk_mb=32), "/mnt/data", system="Linux")
    argv = bwrap_argv(policy, seccomp_fd=7)
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--die-with-parent", "--new-session", "--clearenv",
                 "--disable-userns"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL" and "--proc" not in argv
    mounts = [i for i, a in enumerate(argv) if a in ("--ro-bind-try", "--tmpfs", "--dev")]
    remounts = [i for i, a in enumerate(argv) if a == "--remount-ro"]
    assert [argv[i + 1] for i in remounts] == ["/dev/pts", "/dev", "/"] and min(remounts) > max(mounts)
    assert argv[argv.index("--seccomp") + 1] == "7"
    # every tmpfs sized: /dev/pts (hiding bwrap's devpts: the host's pty pool) one page, the
    # working directory disk_mb (a tmpfs's default is half the host's memory)
    tmpfs = [argv[i - 2:i + 2] for i, a in enumerate(argv) if a == "--tmpfs"]
    assert tmpfs == [["--size", "4096", "--tmpfs", "/dev/pts"], ["--size", str(32 * 2**20), "--tmpfs", "/mnt/data"]]
    writable = [argv[i + 2] for i, a in enumerate(argv) if a in ("--bind", "--dev-bind", "--bind-try")]
    assert writable == []  # the tmpfs is the only writable place
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--ro-bind-try"]
    assert sb.WORKER in binds and os.path.realpath(sys.base_prefix) in binds
    assert not any(b == os.path.expanduser("~") or b in ("/", "/home", "/root", "/proc") for b in binds)
    env = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"}
    assert env == sb.sandbox_env("/mnt/data") and "HF_TOKEN" not in env
    shared = bwrap_argv(make_policy(SandboxLimits(network=True), "/mnt/data", system="Linux"), None)
    assert "--unshare-net" not in shared and "/etc/resolv.conf" in shared and "--seccomp" not in shared


def _bpf_run(program: bytes, nr: int, arch: int, arg0: int = 0, arg1: int = 0, arg2: int = 0) -> int:
    """A classic-BPF interpreter for the instructions seccomp_filter emits."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, arg1, arg2, 0, 0, 0)
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x06:
            return k
        elif code in (0x15, 0x35, 0x45):
            hit = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += jt if hit else jf
        else:
            raise AssertionError(f"unexpected BPF code {code:#x}")
        pc += 1


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_filter_decisions(machine):
    arch, nrs = sb._SYSCALLS[machine]
    allow, eperm, enosys, kill = 0x7FFF0000, 0x50001, 0x50026, 0x80000000
    closed = seccomp_filter(processes=False, machine=machine)
    opened = seccomp_filter(processes=True, machine=machine)
    read = 0 if machine == "x86_64" else 63
    assert _bpf_run(closed, read, arch) == allow
    assert _bpf_run(closed, nrs["clone"], arch, arg0=0x3D0F00) == allow  # pthread_create's flags
    assert _bpf_run(closed, nrs["clone"], arch, arg0=0x01200011) == eperm  # fork()'s flags
    assert _bpf_run(opened, nrs["clone"], arch, arg0=0x01200011) == allow
    assert _bpf_run(closed, nrs["clone3"], arch) == enosys
    for name in ("ptrace", "unshare", "mount", "process_vm_writev", "bpf"):
        assert _bpf_run(opened, nrs[name], arch) == eperm, name
    assert _bpf_run(closed, 434, arch) == eperm  # pidfd_open
    for name in ("shmget", "shmat", "shmctl", "msgget", "semget", "memfd_create"):  # uncounted memory
        assert _bpf_run(opened, nrs[name], arch) == eperm, name
    assert _bpf_run(opened, 447, arch) == eperm  # memfd_secret
    assert _bpf_run(closed, read, 0x40000003) == kill  # another architecture (i386)
    # without the network, no IPv4/IPv6 sockets (loopback buffers are host memory); Unix ones stay
    offline, eafnosupport = seccomp_filter(processes=False, machine=machine, network=False), 0x50061
    for family, verdict in ((2, eafnosupport), (10, eafnosupport), (1, allow)):
        assert _bpf_run(offline, nrs["socket"], arch, arg0=family) == verdict, family
        assert _bpf_run(closed, nrs["socket"], arch, arg0=family) == allow, family
    assert _bpf_run(offline, nrs["clone"], arch, arg0=0x01200011) == eperm  # the checks after it hold
    assert _bpf_run(offline, read, arch) == allow
    # a tester's attacks on the host through the kernel (each failed before): a POSIX timer or
    # F_SETSIG sending SIGCONT woke a session stopped between cells; inotify, fanotify and message
    # queues took the host user's quotas; a lease made the host's open() wait 45 s; grown socket
    # buffers held GBs of kernel memory; vsock could reach the hypervisor with the network off
    for name in ("timer_create", "inotify_init1", "fanotify_init", "mq_open", "io_setup", "vmsplice", "syslog"):
        assert _bpf_run(opened, nrs[name], arch) == eperm, name  # (the re-attack's: AIO's machine-wide
        # quota; a page spliced into a pipe pinned its whole unmapped huge page, past memory_mb)
    for family, online, offline_verdict in ((40, eafnosupport, eafnosupport), (16, allow, eafnosupport),
                                            (1, allow, allow), (2, allow, eafnosupport), (17, eafnosupport, eafnosupport)):
        assert _bpf_run(closed, nrs["socket"], arch, arg0=family) == online, family  # 40 vsock, 17 packet
        assert _bpf_run(offline, nrs["socket"], arch, arg0=family) == offline_verdict, family
    # (helper-137's: F_SETPIPE_SZ grew a session's pipes into the host user's pipe quota, after
    # which every new pipe of the user's had 2 pages)
    for cmd, verdict in ((10, eperm), (1024, eperm), (1031, eperm), (1032, allow), (1, allow), (4, allow),
                         (6, allow)):  # F_SETSIG, F_SETLEASE, F_SETPIPE_SZ, F_GETPIPE_SZ, F_GETFD, F_SETFL, F_SETLK
        assert _bpf_run(closed, nrs["fcntl"], arch, arg0=3, arg1=cmd) == verdict, cmd
    for level, name, verdict in ((1, 7, eperm), (1, 8, eperm), (1, 32, eperm), (1, 33, eperm), (1, 2, allow),
                                 (6, 7, allow), (0, 8, allow)):  # SO_REUSEADDR; TCP's option 7; IP's 8
        for program in (closed, offline):
            assert _bpf_run(program, nrs["setsockopt"], arch, arg0=3, arg1=level, arg2=name) == verdict, (level, name)
    for program in (closed, offline):  # and what comes after these checks still holds
        assert _bpf_run(program, nrs["clone"], arch, arg0=0x01200011) == eperm
        assert _bpf_run(program, read, arch) == allow
    if machine == "x86_64":
        assert _bpf_run(closed, nrs["fork"], arch) == eperm and _bpf_run(opened, nrs["fork"], arch) == allow
        assert _bpf_run(closed, 0x40000000 | 57, arch) == enosys  # x32


def test_seatbelt_profile_from_the_same_policy():
    policy = Policy(workdir="/private/var/folders/x/gptoss-python-1", read_paths=("/usr/lib", '/opt/we"ird'),
                    read_files=("/w/_sandbox_worker.py",))
    profile = seatbelt_profile(policy, "/opt/py/bin/python3")
    lines = profile.splitlines()
    assert lines[:2] == ["(version 1)", "(deny default)"]
    assert '(allow file-read* file-write* (subpath "/private/var/folders/x/gptoss-python-1"))' in lines
    assert '(subpath "/opt/we\\"ird")' in profile  # quoted, cannot end the string early
    assert '(literal "/w/_sandbox_worker.py")' in profile
    assert "network" not in profile and "process-fork" not in profile and "kern.proc" not in profile
    assert "file-write" not in profile.replace("file-write* (subpath \"/private/var/folders/x/gptoss-python-1\")", "") \
        .replace('file-write-data (literal "/dev/null")', "")
    opened = seatbelt_profile(Policy(workdir="/w", read_paths=(), network=True, processes=True), "/p")
    assert "(allow network*)" in opened and "(allow process-fork)" in opened
    assert profile.count("(") == profile.count(")")


def test_description_is_the_training_text_adjusted():
    text = description(True, SandboxLimits(timeout_s=12), "/mnt/data")
    assert "time out after 12.0 seconds" in text and "Internet access for this session is disabled." in text
    assert "UNKNOWN" not in text and "120.0" not in text and "'/mnt/data'" in text
    assert "enabled" in description(False, SandboxLimits(network=True))


# ---- approval rendering ---------------------------------------------------------------------

HIDING = "print('tidy up')  # harmless\rimport shutil; shutil.rmtree('~')  \x1b[2K\n# a\u202edesrever\u200b"


def test_approval_makes_hidden_characters_visible():
    shown = render_code_ansi(HIDING)
    plain = shown.replace("\x1b[1;7;31m", "").replace("\x1b[1;31m", "").replace("\x1b[0m", "")
    assert "\r" not in plain and "\x1b" not in plain and "\u202e" not in plain and "\u200b" not in plain
    assert "<\\r>import shutil; shutil.rmtree('~')" in plain and "<ESC>[2K" in plain
    assert "<U+202E>" in plain and "<U+200B>" in plain and plain.startswith("warning: 4 hidden")
    assert hidden_char_count("x = 1\n\tprint(x)\n") == 0 and render_code_ansi("a\n\tb") == "a\n\tb"
    text = render_code_text(HIDING)
    assert "\r" not in text.plain and "<\\r>" in text.plain
    assert any("reverse" in str(span.style) for span in text.spans)


@pytest.mark.parametrize("invisible", ["\u034f", "\ufe0f", "\u3164", "\u115f"])
def test_approval_marks_invisible_letters_of_python_names(invisible):
    """Characters that show as nothing but are valid in a Python name went unmarked: the
    prompt showed ``target = evil`` then ``target = "https://example.com/"``, two variables."""
    code = f'target{invisible} = evil\ntarget = "https://example.com/"\nprint(target{invisible})'
    compile(code, "<approval>", "exec")  # a valid name indeed
    assert hidden_char_count(code) == 2
    assert f"<U+{ord(invisible):04X}>" in render_code_text(code).plain


def test_approval_marks_long_runs_of_blank_space_that_push_code_out_of_sight():
    """A tester's (helper-119): code after 200 blank lines (below the TUI dialog's first screen,
    above a terminal's) or 3,000 spaces (a screen's width to the right) was shown as it is, with
    no warning: the person approved what they saw, and the rest ran too."""
    code = "print('tidy up')" + " " * 3000 + "import shutil\n" + "\n" * 200 + "shutil.rmtree(home)\n"
    text = render_code_text(code).plain
    assert text == ("warning: 2 long runs of blank space in this code, shown highlighted\n"
                    "print('tidy up')<3000 spaces>import shutil\n<200 blank lines>\nshutil.rmtree(home)\n")
    assert render_code_ansi("\n \t\n\n\n\n\t\nx").endswith("\x1b[1;7;31m<6 blank lines>\x1b[0m\nx")
    assert "x = 1<82 spaces and tabs># c" in render_code_text("x = 1" + " \t" * 40 + "  # c\n").plain
    # what code keeps: blank lines between functions, indentation, alignment
    kept = "def f():\n\n\n    return 1\n" + "\n" * 4 + "x = [1,\n" + " " * 79 + "2]\n"
    assert render_code_ansi(kept) == kept and render_code_text(kept).plain == kept
    aligned = "x = 1" + " " * 30 + "# the first\nlonger_name = 2" + " " * 20 + "# the second\n"
    assert render_code_text(aligned).plain == aligned
    # a second tester's (helper-121): padding in stretches each under the limits, and Windows'
    # line ends marked on every line (noise that teaches the reader to pass over the warning)
    padded = render_code_text("print(1)" + (" " * 79 + ";") * 10 + " evil()").plain
    assert padded.startswith("warning: 10 long runs") and padded.endswith(";<79 spaces>; evil()")
    hashes = render_code_text("print(1)\n" + ("\n" * 4 + "#\n") * 30 + "evil()").plain
    assert hashes.endswith("print(1)\n<150 blank or '#' lines>\nevil()")
    assert render_code_ansi("a = 1\r\nb = 2\r\n") == "a = 1\nb = 2\n"
    assert "<\\r>" in render_code_ansi("a = 1\rb = 2\r\n")  # a lone one is still marked


def test_tool_output_in_the_tui_marks_what_reorders_text():
    assert controls_shown("a\u202eb\u2067c\x1bd") == "a<U+202E>b<U+2067>c\u241bd"
    assert controls_shown("سلام\u200c\u200f ok 👩\u200d💻") == "سلام\u200c\u200f ok 👩\u200d💻"
