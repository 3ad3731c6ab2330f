"""What every subcommand shares: the user-facing error, the arguments, and loading a Chat."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import math
import os
import re
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

from .. import distributed
from ..chat import CONTEXT_OVERFLOW, Chat, check_schemas
from ..config import ConfigError, ModelConfig
from ..engine_thread import engine_thread
from ..files import expand_user, read_json_file
from ..generate import Engine, SamplingParams
from ..harmony import EFFORTS
from ..hub import check_free_disk, fetch_config
from ..loading import (
    DEFAULT_MODEL, CheckpointError, WeightsMissing, checkpoint_tokenizer, download, find_layout, load, load_model,
    NO_ADAPTER_ACROSS_MACHINES, looks_like_repo_id, not_downloaded, offline, resolve_checkpoint, stream_problem,
)
from ..memory import (
    BARE_GB_MAX, DEFAULT_CONTEXT, DENSE_BITS, GB, PROMPT_CACHE_GB, MemoryPlan, MemoryPlanError, checkpoint_dense_bits,
    choose_plan, cli_wording, kv_cache_bytes, parse_size, server_bytes,
)
from ..structured import SchemaError
from ..tokenizer import TokenizerError
from ..tools import Browser, PythonSandbox, SandboxLimits, ToolError, Toolbox, load_functions
from ..tools.approval import prose_marker, render_code_ansi
from ..tools.functions import FUNCTION_TIMEOUT_S, MAX_TIMEOUT_S, MIN_TIMEOUT_S

DIM, RESET = "\x1b[2m", "\x1b[0m"

PYTHON_TIMEOUT_S = SandboxLimits.timeout_s  # --python-timeout's default


class CLIError(Exception):
    """A user-facing failure: printed as ``gptoss-mlx: error: ...`` with exit status 2. A
    library message's advice for Python callers is left out (memory.cli_wording)."""

    def __init__(self, message: str = ""):
        super().__init__(cli_wording(str(message)))


def check_new_directory(path: Path) -> None:
    """An output directory (convert, fuse) must be new or empty."""
    if not os.path.lexists(path) or path.is_dir() and not any(path.iterdir()):
        return
    kind = "is not empty" if path.is_dir() else "is a file" if path.is_file() else "is not a directory"
    raise CLIError(f"{path}: exists and {kind}; choose a new directory")


def directory_path(text: str) -> Path:
    """A directory argument, ``~`` expanded as every path the CLI takes is (quoted, ``'~/out'``
    made a folder named ~ here: a re-attack's, helper-158)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    return expand_user(text, argparse.ArgumentTypeError)


@contextlib.contextmanager
def new_directory(path: Path):
    """Where convert and fuse write ``path``: a hidden directory beside it, renamed to it once
    all is written. A run that fails or is stopped (Ctrl-C, SIGTERM) leaves nothing
    half-written in its place, nor anything that stops it running again; a place it cannot
    write is said before any work. A link to an empty directory is written through."""
    path = Path(os.path.abspath(path))
    if os.path.islink(path) and os.path.isdir(path):
        path = Path(os.path.realpath(path))
    if path == Path(os.getcwd()):
        raise CLIError(f"{path}: the current directory; choose a new directory")
    check_new_directory(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # as mkdir would make it, not mkdtemp's 0700
    except FileExistsError:  # a part of the path is a file (/dev/full/x said "File exists")
        part = next(p for p in path.parents if os.path.lexists(p))
        why = (f"{part} is a link to {os.readlink(part)}, which is not there" if not part.exists()
               else f"{part} is not a directory")
        raise CLIError(f"{path}: cannot create it ({why})") from None
    except OSError as e:
        raise CLIError(f"{path}: cannot create it ({e.strerror or e})") from None
    for left in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        if left != work:
            note(f"{left} was left by a run that was killed; delete it to free its space")
    stop_on_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if stop_on_sigterm else None
    try:
        yield work
        if path.is_dir():  # new or empty, as checked
            path.rmdir()
        os.rename(work, path)
    finally:
        if stop_on_sigterm:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)


def message_text(typed: str) -> str:
    """A user message as typed or piped in, less the blank lines before it and the blank space
    after it: a strip() took its first line's indent (pasted code reached the model and the
    saved chat with its first line moved to column 0, the others not)."""
    return re.sub(r"\A(?:[ \t\r]*\n)+", "", typed).rstrip()


SIGTERM_REPEAT_S = 1.0  # a SIGTERM this soon after the last is taken as the same one (sigterm_as_ctrl_c)


class Terminated(KeyboardInterrupt):
    """SIGTERM where :func:`sigterm_as_ctrl_c` is in force, raised where Ctrl-C's
    KeyboardInterrupt would be: the command stops as on Ctrl-C, with SIGTERM's status."""

    status = 128 + signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """While inside: SIGTERM stops the command as Ctrl-C does (`timeout 60 gptoss-mlx generate
    --json` printed nothing; now what was made, and status 143). The main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    last = []  # when the last one was raised

    def terminated(signum, frame) -> None:
        # one within a second of the last is that one's (it landed while the reply was being
        # stopped, and what was made was lost); a later one stops the command again (a first
        # one caught by a function's own `except:` left every later one ignored)
        if not last or time.monotonic() - last[-1] > SIGTERM_REPEAT_S:
            last.append(time.monotonic())
            raise Terminated
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds, so the finally blocks clean up


def terminal_safe(text: str) -> str:
    """``text`` from the model, a tool or a file, made safe to print: newlines and tabs stay
    (Windows' line ends, ``\\r\\n``, are newlines); escape sequences, other controls, bidi
    overrides and lone surrogates become visible markers (``<ESC>``, ``<U+202E>``), so nothing
    printed can drive the terminal; the rest of Unicode (emoji joiners, no-break spaces, ...)
    prints as it is (``prose_marker``)."""
    return "".join(prose_marker(ch) or ch for ch in text.replace("\r\n", "\n"))


def json_safe(text: str) -> str:
    """A JSON answer made safe to print as :func:`terminal_safe` makes text, but with JSON's own
    escapes (``\\u0080``, ``\\u202e``): the same JSON, still matching its schema (a marker such as
    ``<U+0080>`` changed the value). Such characters are only ever inside its strings."""
    return "".join(f"\\u{ord(ch):04x}" if prose_marker(ch) else ch for ch in text)


def note(message: str) -> None:
    """Something worth knowing that stops nothing, as every command says it: a line of standard
    error beginning ``gptoss-mlx: note:`` (the README's convention)."""
    print(f"gptoss-mlx: note: {terminal_safe(message)}", file=sys.stderr, flush=True)


def add_model_argument(p: argparse.ArgumentParser, required_for: str = "",
                       positional: bool = False) -> None:
    """``--model``; with ``positional`` the model may also be named first (``chat DIR``), as
    ``vllm serve MODEL`` and ``python -m gpt_oss.chat MODEL`` take it."""
    p.add_argument("--model", "-m", default=None, type=model_name,
                   help="local checkpoint directory or Hugging Face repo id "
                        f"(default: {DEFAULT_MODEL})" + required_for)
    if positional:
        p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL", type=model_name,
                       help="the same as --model")


def model_name(text: str) -> str:
    """argparse type: a model named (an empty one is not taken for the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name a local checkpoint directory or a Hugging Face "
                                         "repo id, or leave the option out for the default")
    return text


def take_positional_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A model named without --model becomes ``args.model``; named twice differently, an error."""
    named = getattr(args, "model_positional", None)
    if named is None:
        return
    if args.model is not None and args.model != named:
        parser.error(f"two models named: {named} and --model {args.model}; name one")
    args.model = named


def unrecognized_arguments(extra: list[str], args: argparse.Namespace,
                           parser: argparse.ArgumentParser) -> NoReturn:
    """The usage error for words no option takes, with a hint where a word looks like a model
    (a directory, a repo id) or a prompt given without its option."""
    message = "unrecognized arguments: " + " ".join(extra)
    first = extra[0]
    if not first.startswith("-") and hasattr(args, "model"):
        if os.path.isdir(first) or looks_like_repo_id(first):
            message += f" (to run that model: --model {first})"
        elif hasattr(args, "prompt"):
            message += " (the prompt goes after --prompt, in quotes)"
    parser.error(message)


def positive_int(text: str, least: int = 1) -> int:
    """argparse type: a whole number of at least 1 (``least``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_float(text: str, what: str = "a finite number") -> float:
    """argparse type: a finite number above 0 (``what``, in its messages)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be {what} above 0, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds from MIN_TIMEOUT_S to a week (MAX_TIMEOUT_S)."""
    value = positive_float(text, "a number of seconds")
    if value < MIN_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_TIMEOUT_S:g} seconds, got {text}")
    if value > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_S:g} seconds (a week), got {text}")
    return value


def add_effort_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reasoning-effort", "--effort", "-e", choices=EFFORTS, default=None,
                   help="reasoning effort written into the system message (default: medium)")


def memory_size(text: str) -> str:
    """argparse type: a memory size such as 10GB, 8.5G or 800MB, checked and kept as given (the
    plan reads it as a size with its unit, not as a number of bytes)."""
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def cache_gb(text: str) -> float:
    """argparse type: GB of saved prompt caches (serve's --prompt-cache-gb), 0 for none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, such as 4 or 0.5, got {text!r:.40}") from None
    if not 0 <= value < BARE_GB_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 (no saved prompt caches) to under {BARE_GB_MAX} GB, "
                                         f"got {text:.40}")
    return value


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """What the memory plan depends on: context length, memory limit and dense-layer bits."""
    p.add_argument("--max-context", type=positive_int, default=None, metavar="TOKENS",
                   help="context length to plan memory for and to allow (default: "
                        f"{DEFAULT_CONTEXT}; at most the model's max_position_embeddings)")
    limits = p.add_mutually_exclusive_group()  # (--no-memory-check dropped a --memory-limit without a word)
    limits.add_argument("--memory-limit", type=memory_size, default=None, metavar="SIZE",
                        help="memory the model may use, e.g. 10GB or 800MB; a bare number is GB (default: "
                             "the device's, on a Mac Metal's recommended working set); the plan keeps "
                             "everything resident, quantizes the dense layers, or streams experts to stay inside")
    p.add_argument("--dense-bits", type=int, choices=DENSE_BITS, default=None,
                   help="dense layers (attention, embeddings) in bf16 (16) or quantized to 8 or 4 "
                        "bits at load; the router stays bf16 (default: the memory plan's choice)")
    limits.add_argument("--no-memory-check", action="store_true",
                        help="load everything resident, whatever the memory estimate says")


def add_model_options(p: argparse.ArgumentParser, interactive: bool = True,
                      positional_model: bool = True) -> None:
    """The options of every subcommand that runs the model: chat, generate, tui, and serve
    (``interactive=False``: no one to approve code, no chat to keep a python session for or to
    truncate: a client over the context gets context_length_exceeded; ``positional_model``: the
    model may be named first, without --model)."""
    add_model_argument(p, positional=positional_model)
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter to apply (gptoss-mlx finetune's --adapter-path)")
    add_effort_argument(p)
    p.add_argument("--system", help="instructions for the model (the developer message)")
    if interactive:  # a server's client keeps its own conversation: over the context is its 400
        p.add_argument("--context-overflow", choices=CONTEXT_OVERFLOW, default=CONTEXT_OVERFLOW[0],
                       help="when the conversation outgrows the context: drop the oldest turns with "
                            "a notice (truncate, the default) or stop with an error")
    add_plan_options(p)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 always takes the likeliest token (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens this probable (default 1.0: all)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k likeliest tokens (default 0: no limit)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the likeliest (default 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, for repeatable replies (default: a new one each run)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="cap on tokens per reply (reasoning included; default: none, the context's room)")
    p.add_argument("--reasoning-budget", type=lambda text: positive_int(text, 0), default=None,
                   metavar="TOKENS", help="close the reasoning after this many tokens and answer")
    tools = p.add_argument_group("tools")
    tools.add_argument("--tools", default="", metavar="python,browser",
                       help="built-in tools to enable: python (sandboxed code), browser (search needs EXA_API_KEY)")
    tools.add_argument("--functions", metavar="FILE.py", action="append", default=[],
                       help="Python file whose functions (or TOOLS list) the model may call")
    if interactive:
        tools.add_argument("--auto-approve", action="store_true",
                           help="run the model's Python code without asking first")
        tools.add_argument("--python-stateless", action="store_true",
                           help="a fresh interpreter per code run (default: one session per chat)")
    else:  # the server: enabling a tool is the approval, and every python run starts fresh
        p.set_defaults(auto_approve=True, python_stateless=True)
    tools.add_argument("--python-timeout", type=positive_seconds, default=PYTHON_TIMEOUT_S,
                       help=f"seconds per code run (default {PYTHON_TIMEOUT_S:g})")
    if not interactive:
        tools.add_argument("--function-timeout", type=positive_seconds, default=FUNCTION_TIMEOUT_S,
                           metavar="SECONDS", help="seconds a --functions call may take; then its worker "
                           "process is ended, and the model is told it failed and goes on "
                           f"(default {FUNCTION_TIMEOUT_S:g})")
    tools.add_argument("--python-network", action="store_true",
                       help="allow the Python code network access (this machine's, services on "
                            "localhost included)")
    tools.add_argument("--browser-allow-private", action="store_true",
                       help="let the browser open loopback, private and link-local addresses "
                            "(refused by default: a page could steer the model at your network)")
    machines = p.add_argument_group("across machines (started by mlx.launch; README: Across machines)")
    machines.add_argument("--sharding", choices=("auto", *distributed.SHARDINGS), default="auto",
                          help="split the model by layers (pipeline: one small message per machine "
                               "and token) or by heads and experts (tensor: two all-reduces per "
                               "layer, for RDMA); auto: pipeline over ring, tensor over jaccl/nccl")
    machines.add_argument("--backend", choices=("auto", *distributed.BACKENDS), default="auto",
                          help="mx.distributed backend (default: the one mlx.launch set up)")


def add_structured_options(p: argparse.ArgumentParser) -> None:
    """Structured answers (chat, generate): a JSON Schema enforced while decoding."""
    group = p.add_argument_group("structured output")
    shape = group.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE",
                       help="the answer must be JSON valid against this JSON Schema (enforced while "
                            "decoding; the reasoning stays free)")
    shape.add_argument("--json-object", action="store_true",
                       help="the answer must be a JSON object (any keys)")


def response_format(args) -> dict | None:
    """The JSON Schema that --json-schema or --json-object asks for (None: a free answer)."""
    if getattr(args, "json_object", False):
        return {"type": "object"}
    path = getattr(args, "json_schema", None)
    return None if path is None else read_json_file(expand_user(path, CLIError), CLIError)


def tool_names(flag: str | None) -> set[str]:
    """The built-in tools --tools names (python, browser); another name is a CLIError."""
    names = {t.strip() for t in (flag or "").split(",") if t.strip()}
    unknown = names - {"python", "browser"}
    if unknown:
        raise CLIError(f"unknown tool(s) {', '.join(sorted(unknown))}: --tools takes python,browser")
    return names


def make_toolbox(args, approve=None, prints_to_stderr: bool = True) -> Toolbox | None:
    """The Toolbox the flags ask for (None if none); bad flags or files become CLIErrors.
    ``approve(code) -> bool`` is asked before code runs unless --auto-approve.
    ``prints_to_stderr``: what a function prints goes to standard error (Toolbox.function_output)."""
    names = tool_names(args.tools)
    try:
        functions = [f for path in args.functions for f in load_functions(path)]
    except ToolError as e:
        raise CLIError(str(e)) from None
    if not names and not functions:
        return None
    python = None
    if "python" in names:
        try:  # no OS sandbox on this machine: refuse, naming what to install
            python = PythonSandbox(stateful=not args.python_stateless, limits=SandboxLimits(
                timeout_s=args.python_timeout, network=args.python_network))
        except ToolError as e:
            raise CLIError(str(e)) from None
    browser = Browser(allow_private=args.browser_allow_private) if "browser" in names else None
    return Toolbox(functions=functions, python=python, browser=browser,
                   approve_code=None if args.auto_approve else approve,
                   function_output=sys.stderr if prints_to_stderr else None)


def ask_on_terminal(code: str) -> bool:
    """Show the model's code and ask before running it (standard input is the terminal). No
    answer (Ctrl-D, or the terminal closing) stops the reply as Ctrl-C does: the call is left
    without a result, not recorded as declined."""
    print(f"{DIM}The model wants to run this Python code:{RESET}\n{render_code_ansi(code)}",
          file=sys.stderr)
    from .lineedit import hold_typeahead, typing_hidden  # (prompt_toolkit: loaded by the commands that read lines)

    hold_typeahead()  # what was typed during the reply is no answer: it waits at the next prompt
    try:
        with typing_hidden(echo=True):  # (the reply around it hides typing)
            return input("Run it? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        raise KeyboardInterrupt from None


def decline_when_piped(code: str) -> bool:
    """No terminal to ask on: the code is not run, and the model is told why, not that the
    user declined (no one was asked: a tester's, helper-157)."""
    print("[python code not run: pass --auto-approve to allow it without a terminal]", file=sys.stderr)
    raise ToolError("not run: there is no terminal to ask the user on (they can allow code "
                    "with --auto-approve)")


def planned_context(max_context: int | None, config: ModelConfig, config_file) -> int:
    """--max-context, checked against the model's positions; by default DEFAULT_CONTEXT."""
    limit = config.max_position_embeddings
    if max_context is None:
        return min(DEFAULT_CONTEXT, limit)
    if max_context > limit:
        raise CLIError(f"--max-context {max_context} is more than this model's {limit} positions "
                       f"(max_position_embeddings in {config_file}); use at most {limit}")
    return max_context


def prepare(args, group=None) -> tuple[Path, int, MemoryPlan]:
    """(checkpoint directory, context, memory plan). The config comes first (a repo's
    config.json alone), so --max-context and the memory plan (of this rank's part, in a
    ``group``) are checked before any weights are downloaded."""
    source = args.model or DEFAULT_MODEL
    hub_only = getattr(args, "hub_only", False)  # models pull: a repo id, whatever folder is here
    try:
        if not hub_only and os.path.lexists(os.path.expanduser(source)):  # (a link loop: "no such directory")
            directory = resolve_checkpoint(source)
            try:
                config_file = find_layout(directory)[1] / "config.json"
            except CheckpointError as e:
                if looks_like_repo_id(source):  # a folder here named like a repo takes its place
                    raise CheckpointError(f"{e} (if you meant the Hugging Face repo {source}: the folder "
                                          f"{source} in {Path.cwd()} is read instead; rename it, or run from "
                                          "elsewhere)") from None
                raise
        else:
            directory, config_file = None, fetch_config(source)
        config = ModelConfig.from_file(config_file)
        context = planned_context(args.max_context, config, config_file)
        if group is not None:
            distributed.check_shardable(config, group.size(), sharding(args), backend(args))
        share = config if group is None else distributed.share_config(config, group.size(), sharding(args))
        limit = math.inf if args.no_memory_check else args.memory_limit
        bits = checkpoint_dense_bits(config, args.dense_bits)

        adapter = getattr(args, "adapter", None)

        def make_plan(unstreamable: str | None) -> MemoryPlan:
            if getattr(args, "max_concurrency", None):  # serve: its sequences and saved prompt caches too
                return plan_server(args, share, context, bits, limit, unstreamable)
            return choose_plan(share, context, bits, limit, unstreamable=unstreamable)

        # a repo not downloaded yet: its experts taken to stream until its files say otherwise
        memory_plan = make_plan(None if directory is None else stream_problem(directory, adapter))
        if group is not None and memory_plan.streamed:
            raise MemoryPlanError(f"this rank's share of the model needs more than {memory_plan.limit / 1e9:.1f} GB "
                                  f"({memory_plan.limit_source}), and experts are not streamed across machines: "
                                  "use more ranks or machines with more memory", memory_plan.total)
        if directory is None:
            check_free_disk(source)
            directory = download(source)  # the weights: progress bars, resumable
            weights_present(source, directory)
            problem = stream_problem(directory, adapter) if memory_plan.streamed else None
            if problem:  # an mlx-lm conversion: its experts stay on the GPU
                memory_plan = make_plan(problem)
        return directory, context, memory_plan
    except (CheckpointError, ConfigError, MemoryPlanError, ValueError) as e:
        raise CLIError(str(e)) from None


def plan_server(args, config, context: int, bits: int | None, limit, unstreamable: str | None = None) -> MemoryPlan:
    """serve's plan: --max-concurrency sequences' KV caches and the saved prompt caches inside the
    limit. Without --prompt-cache-gb the prompt caches get PROMPT_CACHE_GB, or, where that would
    leave the experts streamed (or not fit), one conversation's worth (the expert pool is what
    decode speed needs most); sets ``args.prompt_cache_bytes`` for the scheduler.
    ``unstreamable``: as choose_plan takes it."""
    def planned(cache: float, sequences: int = args.max_concurrency) -> MemoryPlan:
        return choose_plan(config, context, bits, limit, server=server_bytes(config, context, sequences, cache),
                           unstreamable=unstreamable)

    def planned_or_why(cache: float) -> MemoryPlan:
        """planned(cache); where serve's caches are what does not fit, the error says so."""
        try:
            return planned(cache)
        except MemoryPlanError as e:
            try:
                alone = planned(0.0, sequences=1)
            except MemoryPlanError:
                raise e from None
            raise MemoryPlanError(f"{e}; or fewer caches: with --max-concurrency 1 --prompt-cache-gb 0 "
                                  f"serve fits ({alone.arrangement})", e.smallest_limit) from None

    if args.prompt_cache_gb is not None:
        cache = args.prompt_cache_gb * GB
        memory_plan = planned_or_why(cache)
    else:
        cache = PROMPT_CACHE_GB * GB
        try:
            memory_plan = planned(cache)
        except MemoryPlanError:
            memory_plan = None
        if memory_plan is None or memory_plan.streamed:
            cache = kv_cache_bytes(config, context)
            memory_plan = planned_or_why(cache)
    args.prompt_cache_bytes = int(cache)
    return memory_plan


PIPE_QUIET_S = 1.0  # under mlx.launch: how long standard input stays quiet before it has ended
PIPE_WAIT_NOTE_S = 5.0  # and how long none at all comes before a note says what it waits for


def read_standard_input(instead: str = "give it with --prompt") -> str:
    """All of standard input. mlx.launch passes its input on to the ranks but never its end
    (their standard input stays open), so under it the input ends once something came and
    nothing more comes for PIPE_QUIET_S. ``instead``: the command's other way to give it."""
    if distributed.launched_backend() is None:
        return sys.stdin.read()
    fd, chunks, waited = sys.stdin.fileno(), [], 0.0
    while True:
        wait = PIPE_QUIET_S if chunks else PIPE_WAIT_NOTE_S
        if not select.select([fd], [], [], wait)[0]:
            if chunks:
                print(f"gptoss-mlx: standard input quiet for {PIPE_QUIET_S:g} s: taking what came as all "
                      "of it (mlx.launch does not pass the end of input on)", file=sys.stderr, flush=True)
                break
            waited += wait
            if waited == PIPE_WAIT_NOTE_S:
                print("gptoss-mlx: waiting for the prompt on standard input (under mlx.launch the end "
                      f"of an empty input never comes: {instead})", file=sys.stderr, flush=True)
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(sys.stdin.encoding or "utf-8", "surrogateescape")


def group_of(args):
    """The mx.distributed group when mlx.launch started this process (joined once), else None."""
    if distributed.launched_backend() is None:
        return None
    try:
        return distributed.join(backend(args))
    except distributed.DistributedError as e:
        raise CLIError(str(e)) from None


def backend(args) -> str | None:
    return distributed.launched_backend() if args.backend == "auto" else args.backend


def sharding(args) -> str:
    return distributed.choose_sharding(args.sharding, backend(args))


def follow_rank0(args) -> bool:
    """On the ranks other than 0 of a run started by mlx.launch: load this rank's part of the
    model and run rank 0's engine operations until rank 0 exits, then True (rank 0 does all
    the I/O: the subcommand does nothing else here). False on rank 0 and in a single process."""
    group = group_of(args)
    if group is None or group.rank() == 0:
        return False
    if getattr(args, "adapter", None):  # (rank 0 refuses it in load(); here it was ignored)
        raise CLIError(NO_ADAPTER_ACROSS_MACHINES)
    directory, context, memory_plan = prepare(args, group)
    try:  # the plan rank 0 makes too (the same share of the same config): the same dense bits
        model = engine_thread().call(load_model, directory, memory_plan=memory_plan, group=group,
                                     sharding=sharding(args))
    except (CheckpointError, ConfigError, ValueError) as e:
        raise CLIError(str(e)) from None
    try:
        engine_thread().call(distributed.follow, Engine(model, max_context=context), group)
    except distributed.DistributedError as e:
        raise CLIError(str(e)) from None
    except RuntimeError as e:  # MLX's: rank 0 ended (a bad option of its own) before its watchdog said so
        raise CLIError(f"rank 0 stopped, so rank {group.rank()} stops too ({e})") from None
    return True


def weights_present(repo_id: str, directory: Path) -> None:
    """Offline, the cache may hold a repo's config.json and no weights (a refused pull): that
    is "not downloaded". Weights that are there and damaged are said as they are."""
    try:
        find_layout(directory)
    except WeightsMissing:
        if offline():
            raise CheckpointError(not_downloaded(repo_id)) from None
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{e} (a damaged download: `gptoss-mlx models rm {repo_id}`, then "
                              f"`gptoss-mlx models pull {repo_id}` fetches it again)") from None


def load_chat(args, out=None, toolbox=None) -> Chat:
    """Plan, load the model, and make a Chat, turning failures into CLIErrors. Progress goes to
    ``out``, standard error by default (the one at the call: cli.main's best-effort one)."""
    out = sys.stderr if out is None else out
    answer_format = response_format(args)  # a bad file stops us before the model loads
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p,
                                  args.seed, args.max_tokens)
        group = group_of(args)
        if group is not None and group.rank() != 0:  # its command did not call follow_rank0 first
            raise CLIError("this command does not run across machines; chat, generate and serve do")
        directory, context, memory_plan = prepare(args, group)
        options = toolbox.chat_options() if toolbox else {}
        if answer_format is not None or options.get("functions"):  # a schema's error costs no load
            check_schemas(checkpoint_tokenizer(directory), options.get("functions", ()), answer_format)
        t0 = time.perf_counter()
        where = f" (rank 0 of {group.size()}, {sharding(args)} parallel)" if group else ""
        print(f"Loading {directory}{where} ...\nMemory plan: {cli_wording(memory_plan.describe())}", file=out, flush=True)
        model, tokenizer = load(directory, memory_plan=memory_plan, max_context=context, group=group,
                                sharding=sharding(args) if group else "tensor", adapter=args.adapter)
        print(f"Loaded in {time.perf_counter() - t0:.1f}s.", file=out, flush=True)
        engine = None
        if group is not None:
            engine = distributed.Leader(model, group, max_context=context)
            atexit.register(engine.close)  # the other ranks exit with rank 0
        return Chat(model, tokenizer, instructions=getattr(args, "system", None),
                    reasoning_effort=args.reasoning_effort or "medium", sampling=sampling,
                    max_context=context, context_overflow=getattr(args, "context_overflow", "error"), engine=engine,
                    response_format=answer_format,
                    reasoning_budget=args.reasoning_budget, **options)
    except SchemaError as e:  # the answer's schema (--json-schema) or a function's (--functions)
        from_file = getattr(args, "json_schema", None) and str(e).startswith("response format")
        raise CLIError(f"--json-schema {args.json_schema}: {e}" if from_file else str(e)) from None
    except (CheckpointError, ConfigError, TokenizerError, MemoryPlanError, ValueError) as e:
        raise CLIError(str(e)) from None


def drop_output() -> None:
    """Send what this process writes to its standard output from now on to /dev/null (and its
    standard error, when that went to the same place): the reader has gone, and the
    interpreter's own flush at exit must not fail the run (or print about it)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        same = os.path.sameopenfile(1, 2)
    except OSError:
        same = False
    for fd in (1, 2) if same else (1,):
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)
