"""The operating-system sandbox the python tool's code runs in.

One policy (``Policy``: what the code may read, the one directory it may write, network on or
off, new processes on or off) is turned into the confinement of the platform:

- Linux: a bubblewrap (``bwrap``) command line — new user, PID, network, IPC, UTS and cgroup
  namespaces, no capabilities, a root that holds only read-only binds of the Python
  installation and system libraries, the working directory as a size-capped tmpfs (the only
  writable place, and a hard cap on the bytes written; the rest of the root is read-only), no
  /proc, a cleared environment, ``--die-with-parent`` (killing bwrap ends the PID
  namespace and every process in it), plus a seccomp filter (``seccomp_filter``) that refuses
  new processes, ptrace, namespaces, mounts, pidfds, keyrings, BPF, io_uring, SysV shared
  memory and memfds (memory no limit counts), and with the network off IPv4/IPv6 sockets
  (unread loopback connections pin host socket buffers). bwrap is started from one thread that
  lives as long as the process (python_tool's spawner): ``--die-with-parent`` watches the
  thread that started it. As root, RLIMIT_NPROC does not hold (uid 0 is
  exempt), so the sandbox's processes and threads go into a pids cgroup of their own instead
  (``PidsCgroup``).
- macOS: a Seatbelt profile (``seatbelt_profile``) for ``sandbox-exec``, deny by default, after
  the pattern of OpenAI's Codex CLI: reads of the same paths, writes only in the working
  directory, no network, no process-fork unless allowed, signals and process info only for
  itself.

There is no fallback: where neither works, ``require_sandbox`` raises ``SandboxUnavailable``
with one line saying what to install. Resource limits (set by the worker, hard = soft, so the
code cannot raise them) and the wall-clock kill are in python_tool.py / _sandbox_worker.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import site
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .functions import MAX_TIMEOUT_S, MIN_TIMEOUT_S, ToolError

WORKER = str(Path(__file__).with_name("_sandbox_worker.py"))
LINUX_WORKDIR = "/mnt/data"  # where the tmpfs working directory appears inside the sandbox


@dataclass
class SandboxLimits:
    timeout_s: float = 30.0  # wall clock per code run; then the whole sandbox is killed
    memory_mb: int = 2048  # address space of the Python process
    cpu_s: int = 600  # CPU seconds for the life of one interpreter (a session)
    max_output: int = 16_000  # characters of output returned to the model
    max_file_mb: int = 64  # the largest file the code may write
    disk_mb: int = 256  # everything the code may write, together (the Linux tmpfs; macOS: none)
    open_files: int = 256
    max_processes: int = 256  # processes and threads (RLIMIT_NPROC; as root, a pids cgroup)
    max_files: int = 100_000  # files and directories in the working directory (Linux: polled)
    network: bool = False
    processes: bool = False  # may the code start new processes (subprocess, os.fork)?

    def __post_init__(self):
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not MIN_TIMEOUT_S <= t <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be a number of seconds from {MIN_TIMEOUT_S:g} to "
                             f"{MAX_TIMEOUT_S:g} (a week), got {t!r:.40}{'...' if len(repr(t)) > 40 else ''}")


class SandboxUnavailable(ToolError):
    """No operating-system sandbox on this machine; the message says what to install."""


@dataclass(frozen=True)
class Policy:
    workdir: str  # the code's working directory: the only place it may write
    read_paths: tuple[str, ...]  # readable, never writable: Python and the system libraries
    disk_mb: int = 256
    network: bool = False
    processes: bool = False
    read_files: tuple[str, ...] = ()  # single readable files (the worker script)
    max_processes: int = 256  # processes and threads together (as root on Linux: a pids cgroup)


def python_paths() -> tuple[str, ...]:
    """The directories this Python needs: its prefixes, its stdlib and its site-packages (also
    those a .pth file or PYTHONPATH put on sys.path; never the current or a project directory)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             *site.getsitepackages(),
             *(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))}
    return tuple(sorted(os.path.realpath(p) for p in paths if p and os.path.isdir(p)))


LINUX_SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
                      "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
LINUX_NETWORK_PATHS = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl",
                       "/etc/ca-certificates", "/etc/pki")
MACOS_SYSTEM_PATHS = ("/usr/lib", "/usr/share", "/System", "/Library/Frameworks",
                      "/private/var/db/timezone", "/private/var/db/dyld", "/dev/urandom",
                      "/dev/random", "/dev/null", "/private/etc/localtime")
MACOS_NETWORK_PATHS = ("/private/etc/resolv.conf", "/private/etc/hosts", "/private/etc/ssl",
                       "/private/var/run/resolv.conf")


def make_policy(limits: SandboxLimits, workdir: str, system: str | None = None) -> Policy:
    system = system or platform.system()
    base = LINUX_SYSTEM_PATHS if system == "Linux" else MACOS_SYSTEM_PATHS
    net = (LINUX_NETWORK_PATHS if system == "Linux" else MACOS_NETWORK_PATHS) if limits.network else ()
    return Policy(workdir=workdir, read_paths=tuple(dict.fromkeys(base + python_paths() + net)),
                  disk_mb=limits.disk_mb, network=limits.network, processes=limits.processes,
                  read_files=(WORKER,), max_processes=limits.max_processes)


# ---------------------------------------------------------------------------------- Linux
def bwrap_argv(policy: Policy, seccomp_fd: int | None) -> list[str]:
    """The bwrap options (up to, not including, the command) that enforce ``policy``."""
    argv = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", "sandbox", "--clearenv"]
    if not policy.network:
        argv.append("--unshare-net")
    for path in policy.read_paths + policy.read_files:
        argv += ["--ro-bind-try", path, path]
    # No /proc at all: it would show bwrap's init, and as root its /proc/sys is writable.
    # The root and /dev tmpfs that bwrap builds are made read-only once everything is mounted.
    # Its /dev/pts, hidden: every pty opened there counts against the host's pool (kernel.pty.nr,
    # shared with every container), and a session held them between cells (a tester's, helper-151).
    # (one page, read-only: a tmpfs's default size is half the host's memory, beyond disk_mb)
    argv += ["--dev", "/dev", "--size", "4096", "--tmpfs", "/dev/pts", "--size", str(policy.disk_mb * 2**20),
             "--tmpfs", policy.workdir, "--remount-ro", "/dev/pts", "--remount-ro", "/dev", "--remount-ro", "/",
             "--chdir", policy.workdir]
    for name, value in sandbox_env(policy.workdir).items():
        argv += ["--setenv", name, value]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--"]


def sandbox_env(workdir: str) -> dict[str, str]:
    """The whole environment the code sees: no tokens, keys or paths of the user's."""
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}


# Syscalls by number per architecture (audit arch, number table). From the kernel's
# arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (arm64).
_SYSCALLS = {
    "x86_64": (0xC000003E, {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "unshare": 272, "setns": 308,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "keyctl": 250,
        "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "kexec_load": 246, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65,
        "semctl": 66, "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
        "memfd_create": 319, "socket": 41, "timer_create": 222, "inotify_init": 253,
        "inotify_init1": 294, "fanotify_init": 300, "mq_open": 240, "fcntl": 72, "setsockopt": 54,
        "io_setup": 206, "vmsplice": 278, "syslog": 103}),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "keyctl": 219, "add_key": 217, "request_key": 218,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "kexec_load": 104,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "reboot": 142,
        "swapon": 224, "swapoff": 225, "acct": 89, "msgget": 186, "msgctl": 187, "msgrcv": 188,
        "msgsnd": 189, "semget": 190, "semctl": 191, "semtimedop": 192, "semop": 193,
        "shmget": 194, "shmctl": 195, "shmat": 196, "shmdt": 197, "memfd_create": 279,
        "socket": 198, "timer_create": 107, "inotify_init1": 26, "fanotify_init": 262, "mq_open": 180,
        "fcntl": 25, "setsockopt": 208, "io_setup": 0, "vmsplice": 75, "syslog": 116}),
}
# Numbered alike on both: io_uring, pidfds, the new mount API.
_COMMON = {"pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
           "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
           "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "pidfd_getfd": 438,
           "mount_setattr": 442, "memfd_secret": 447}
# SysV IPC and memfds: memory that no rlimit of the sandbox counts (it outlives shmdt/close).
_UNCOUNTED_MEMORY = ("shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl",
                     "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl", "memfd_create",
                     "vmsplice")  # (a page spliced into a pipe pins its whole huge page, unmapped)
# Quotas the sandbox would share with the host's user (inotify and fanotify instances, POSIX
# message queue bytes: the user's file watchers and queues fail while a session holds them), and
# POSIX timers, whose signal can be SIGCONT: a session stopped between cells woke itself with one.
_SHARED_QUOTAS = ("inotify_init", "inotify_init1", "fanotify_init", "mq_open", "timer_create",
                  "io_setup")  # (Linux AIO: fs.aio-max-nr is the whole machine's)
_ALWAYS_DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns", "mount",
                  "umount2", "pivot_root", "chroot", "keyctl", "add_key", "request_key", "bpf",
                  "perf_event_open", "userfaultfd", "kexec_load", "init_module", "finit_module",
                  "delete_module", "reboot", "swapon", "swapoff", "acct",
                  "syslog",  # the host's kernel log, where kernel.dmesg_restrict is 0 (helper-151)
                  *_UNCOUNTED_MEMORY,
                  *_SHARED_QUOTAS, *_COMMON)
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS, _EAFNOSUPPORT = 1, 38, 97
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK = 1, 2, 10, 16
# fcntl: a signal of one's choosing for I/O on a descriptor (SIGCONT again), leases, which make
# the host's open() of a file the sandbox can read wait for 45 s, and larger pipes (their pages
# count against the host user's pipe quota: past it, every new pipe of the user's has 2 pages)
_F_SETSIG, _F_SETLEASE, _F_SETPIPE_SZ = 10, 1024, 1031
_FCNTL_DENIED = (_F_SETSIG, _F_SETLEASE, _F_SETPIPE_SZ)
# setsockopt(SOL_SOCKET, ...): larger socket buffers (kernel memory no limit of the sandbox counts)
_SOL_SOCKET, _SOCKET_BUFFERS = 1, (7, 8, 32, 33)  # SO_SNDBUF, SO_RCVBUF and their FORCE forms
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000


def _ret_errno(errno: int) -> int:
    return 0x00050000 | errno


def seccomp_filter(processes: bool, machine: str | None = None, network: bool = True) -> bytes:
    """A classic-BPF seccomp program (struct sock_filter[]) for bwrap --seccomp.

    Refuses with EPERM: everything in _ALWAYS_DENIED (SysV IPC and memfds included), and unless
    ``processes``, fork, vfork and clone without CLONE_THREAD (threads stay allowed). clone3
    answers ENOSYS, so the C library falls back to clone, whose flags a filter can see. Another
    architecture is killed. execve stays allowed: bwrap execs the worker after loading the
    filter, and without fork an exec can only replace the worker inside the same sandbox.
    Sockets of other families than Unix (a socketpair: asyncio's) and, with ``network``, IPv4,
    IPv6 and netlink (the C library's address lookups) are refused (EAFNOSUPPORT): vsock would
    reach the hypervisor, and without the network the sandbox's own loopback would let unread
    connections pin socket buffers, host kernel memory that no limit of the sandbox counts; for
    the same reason socket buffers keep their size (setsockopt SO_SNDBUF, SO_RCVBUF: EPERM). fcntl's
    F_SETSIG, F_SETLEASE and F_SETPIPE_SZ are refused (EPERM), as are inotify, fanotify, POSIX message queues
    and timers, and Linux AIO (_SHARED_QUOTAS); and vmsplice (_UNCOUNTED_MEMORY)."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise SandboxUnavailable(f"no seccomp syscall table for {machine}")
    arch, numbers = _SYSCALLS[machine]
    numbers = {**numbers, **_COMMON}
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06

    def op(code, k, jt=0, jf=0):
        return struct.pack("=HBBI", code, jt, jf, k)

    prog = [op(ld, 4), op(jeq, arch, 1, 0), op(ret, _RET_KILL), op(ld, 0)]
    if machine == "x86_64":  # the x32 ABI (numbers with bit 30 set) is refused outright
        prog += [op(jge, 0x40000000, 0, 1), op(ret, _ret_errno(_ENOSYS))]
    denied = list(_ALWAYS_DENIED) + ([] if processes else ["fork", "vfork"])
    for name in denied:
        if name in numbers:
            prog += [op(jeq, numbers[name], 0, 1), op(ret, _ret_errno(_EPERM))]
    prog += [op(jeq, numbers["clone3"], 0, 1), op(ret, _ret_errno(_ENOSYS))]
    # socket(domain, ...): the domain is the low word of args[0]; only these families
    families = [_AF_UNIX] + ([_AF_INET, _AF_INET6, _AF_NETLINK] if network else [])
    prog += [op(jeq, numbers["socket"], 0, len(families) + 2), op(ld, 16)]
    prog += [op(jeq, family, len(families) - i, 0) for i, family in enumerate(families)]
    prog += [op(ret, _ret_errno(_EAFNOSUPPORT)), op(ld, 0)]
    # fcntl(fd, cmd, ...): cmd is the low word of args[1]
    n = len(_FCNTL_DENIED)
    prog += [op(jeq, numbers["fcntl"], 0, n + 2), op(ld, 24)]
    prog += [op(jeq, cmd, n - 1 - i, 0 if i < n - 1 else 1) for i, cmd in enumerate(_FCNTL_DENIED)]
    prog += [op(ret, _ret_errno(_EPERM)), op(ld, 0)]
    # setsockopt(fd, level, name, ...): level and name are the low words of args[1] and args[2]
    buffers = len(_SOCKET_BUFFERS)
    prog += [op(jeq, numbers["setsockopt"], 0, buffers + 5), op(ld, 24), op(jeq, _SOL_SOCKET, 0, buffers + 1),
             op(ld, 32)]
    prog += [op(jeq, name, buffers - i, 0) for i, name in enumerate(_SOCKET_BUFFERS)]
    prog += [op(ret, _RET_ALLOW), op(ret, _ret_errno(_EPERM))]  # (another option; a buffer's size)
    if not processes:  # clone: allowed only for a thread (flags are the low word of args[0])
        prog += [op(jeq, numbers["clone"], 0, 3), op(ld, 16), op(jset, _CLONE_THREAD, 1, 0),
                 op(ret, _ret_errno(_EPERM))]
    return b"".join(prog + [op(ret, _RET_ALLOW)])


PIDS_CGROUP_V1 = "/sys/fs/cgroup/pids"
CGROUP_V2 = "/sys/fs/cgroup"


def pids_cgroup_base() -> str | None:
    """The writable pids cgroup hierarchy where a sandbox's own cgroup can go, or None."""
    if os.path.isfile(f"{PIDS_CGROUP_V1}/cgroup.procs") and os.access(PIDS_CGROUP_V1, os.W_OK):
        return PIDS_CGROUP_V1
    try:
        with open(f"{CGROUP_V2}/cgroup.subtree_control") as f:
            enabled = "pids" in f.read().split()
    except OSError:
        return None
    return CGROUP_V2 if enabled and os.access(CGROUP_V2, os.W_OK) else None


class PidsCgroup:
    """One sandbox's pids cgroup: caps its processes and threads together where RLIMIT_NPROC
    cannot (the host's root is exempt from it). ``wrap`` makes a command join it before exec."""

    PREFIX = "gptoss-python-"  # then the owner's process id

    def __init__(self, limit: int):
        base = pids_cgroup_base()
        if base is None:
            raise SandboxUnavailable("no writable pids cgroup")
        _remove_orphaned_cgroups(base, self.PREFIX)
        self.path = tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-", dir=base)
        with open(f"{self.path}/pids.max", "w") as f:
            f.write(str(limit))

    def wrap(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', f"{self.path}/cgroup.procs", *argv]

    def remove(self) -> None:
        """Kill whatever is left in it, then remove it (a moment after the kill)."""
        for _ in range(50):
            try:
                with open(f"{self.path}/cgroup.procs") as f:
                    for pid in f.read().split():
                        os.kill(int(pid), 9)
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


def _remove_orphaned_cgroups(base: str, prefix: str) -> None:
    """Remove the cgroups that sandboxes of ended processes left (killed before they could):
    rmdir refuses one that still holds a process."""
    for name in os.listdir(base):
        owner = name[len(prefix):].split("-")[0]
        if not name.startswith(prefix) or not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(base, name))
        except OSError:
            pass


# ---------------------------------------------------------------------------------- macOS
def _sbpl_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def seatbelt_profile(policy: Policy, executable: str) -> str:
    """The Seatbelt (SBPL) profile for ``sandbox-exec -p`` that enforces ``policy``."""
    # (A rule with no filter would allow everything: each list below is never empty.)
    reads = " ".join([f"(subpath {_sbpl_string(p)})" for p in policy.read_paths] +
                     [f"(literal {_sbpl_string(p)})" for p in policy.read_files + (executable,)])
    exe = {executable, os.path.realpath(executable)}
    lines = [
        "(version 1)",
        "(deny default)",
        # exec of Python itself (a framework build re-execs Python.app inside its prefix); without
        # process-fork an exec can only replace the worker, inside the same sandbox
        f"(allow process-exec {' '.join(f'(literal {_sbpl_string(p)})' for p in sorted(exe))} {reads})",
        "(allow signal (target self))",
        "(allow process-info* (target self))",
        "(allow file-read-metadata)",  # stat() of path components; contents stay closed
        f"(allow file-read* {reads})",
        f"(allow file-read* file-write* (subpath {_sbpl_string(policy.workdir)}))",
        '(allow file-write-data (literal "/dev/null"))',
        "(allow sysctl-read (sysctl-name-prefix \"hw.\") (sysctl-name \"kern.osrelease\")"
        " (sysctl-name \"kern.ostype\") (sysctl-name \"kern.osversion\") (sysctl-name"
        " \"kern.version\") (sysctl-name \"kern.argmax\") (sysctl-name \"kern.maxfilesperproc\")"
        " (sysctl-name \"kern.osproductversion\") (sysctl-name \"machdep.cpu.brand_string\")"
        " (sysctl-name \"vm.loadavg\"))",  # never kern.proc* or kern.procargs*: other processes
        "(allow mach-host*)",
    ]
    if policy.processes:
        lines += ["(allow process-fork)", "(allow process-exec)",
                  "(allow signal (target same-sandbox))"]
    if policy.network:
        lines += ["(allow network*)", "(allow system-socket)",
                  '(allow mach-lookup (global-name "com.apple.dnssd.service"))']
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- choosing one
@dataclass
class Launch:
    argv: list[str]  # the whole command line: the sandbox, then Python and the worker
    pass_fds: tuple[int, ...]
    keep: object = None  # what must stay open until the process has started (the filter file)
    cgroup: PidsCgroup | None = None  # to remove once the process has ended


def sandboxed_command(policy: Policy, command: list[str]) -> Launch:
    """The command line that runs ``command`` (Python and its arguments) under ``policy``."""
    if sys.platform == "darwin":
        return Launch(["/usr/bin/sandbox-exec", "-p", seatbelt_profile(policy, command[0]),
                       *command], ())
    bpf = tempfile.TemporaryFile()
    bpf.write(seccomp_filter(policy.processes, network=policy.network))
    bpf.flush()
    bpf.seek(0)
    argv = bwrap_argv(policy, bpf.fileno()) + command
    if os.geteuid() != 0:
        return Launch(argv, (bpf.fileno(),), bpf)
    cgroup = PidsCgroup(policy.max_processes)  # RLIMIT_NPROC does not hold for root
    return Launch(cgroup.wrap(argv), (bpf.fileno(),), bpf, cgroup)


@functools.cache
def sandbox_problem() -> str | None:
    """None if the OS sandbox works here, else one line saying what is missing (tried once)."""
    if sys.platform == "darwin":
        if not os.path.exists("/usr/bin/sandbox-exec"):
            return "sandbox-exec (Seatbelt) is missing from /usr/bin"
        workdir = os.path.realpath(tempfile.gettempdir())
    elif sys.platform.startswith("linux"):
        if shutil.which("bwrap") is None:
            return ("bubblewrap is not installed: install it (apt install bubblewrap, "
                    "dnf install bubblewrap or pacman -S bubblewrap)")
        if platform.machine() not in _SYSCALLS:
            return f"no seccomp filter for this CPU ({platform.machine()})"
        if os.geteuid() == 0 and pids_cgroup_base() is None:
            return ("running as root, where RLIMIT_NPROC does not cap threads, and no pids "
                    "cgroup is writable (mount the cgroup pids controller, or run as a user)")
        workdir = LINUX_WORKDIR
    else:
        return f"no OS sandbox for {sys.platform} (Linux with bubblewrap or macOS is needed)"
    launch = sandboxed_command(make_policy(SandboxLimits(), workdir),
                               [sys.executable, "-I", "-c", "print('ok')"])
    try:
        done = subprocess.run(launch.argv, pass_fds=launch.pass_fds, capture_output=True,
                              text=True, timeout=30, env=sandbox_env(workdir),
                              cwd=workdir if sys.platform == "darwin" else None)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the sandbox did not start: {e}"
    finally:
        if launch.keep is not None:
            launch.keep.close()
        if launch.cgroup is not None:
            launch.cgroup.remove()
    if done.stdout.strip() != "ok":
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        hint = ("; user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, "
                "or an AppArmor profile for bwrap)") if sys.platform.startswith("linux") else ""
        tool = "sandbox-exec" if sys.platform == "darwin" else "bwrap"
        return f"{tool} cannot create the sandbox here ({why}){hint}"
    return None


def require_sandbox() -> None:
    """Raise SandboxUnavailable (one line: what to install or enable) unless the OS sandbox works."""
    problem = sandbox_problem()
    if problem:
        raise SandboxUnavailable(f"the python tool needs an OS sandbox: {problem}")


def sandbox_status() -> str:
    """One line for ``gptoss-mlx doctor``: the sandbox the python tool uses, or why there is none."""
    problem = sandbox_problem()
    if problem:
        return f"none — the python tool is off: {problem}"
    if sys.platform == "darwin":
        return "Seatbelt (sandbox-exec): deny-by-default profile, writes only in its directory"
    version = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{version or 'bubblewrap'}: user/pid/net/ipc/uts namespaces, seccomp, "
            "read-only system, size-capped tmpfs working directory")
