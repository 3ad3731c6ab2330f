"""What every subcommand shares: the user-facing error, the arguments, and loading a Chat."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ..chat import CONTEXT_OVERFLOW, Chat
from ..config import ConfigError, ModelConfig
from ..generate import SamplingParams
from ..harmony import EFFORTS
from ..hub import check_free_disk, fetch_config
from ..loading import (
    DEFAULT_MODEL, CheckpointError, find_layout, load, not_downloaded, offline, resolve_checkpoint,
)
from ..memory import DEFAULT_CONTEXT, MemoryPlanError, check_fits, checkpoint_dense_bits
from ..tokenizer import TokenizerError
from ..tools import Browser, PythonSandbox, SandboxLimits, ToolError, Toolbox, load_functions
from ..tools.approval import hidden_char_marker, render_code_ansi

DIM, RESET = "\x1b[2m", "\x1b[0m"


class CLIError(Exception):
    """A user-facing failure: printed as ``gptoss-mlx: error: ...`` with exit status 2."""


def terminal_safe(text: str) -> str:
    """``text`` from the model, a tool or a file, made safe to print: newlines and tabs stay;
    escape sequences, other controls, bidi overrides and lone surrogates become visible markers
    (``<ESC>``, ``<U+202E>``), so nothing printed can drive the terminal."""
    return "".join(hidden_char_marker(ch) or ch for ch in text)


def add_model_argument(p: argparse.ArgumentParser, required_for: str = "") -> None:
    p.add_argument("--model", "-m", default=None,
                   help="local checkpoint directory or Hugging Face repo id "
                        f"(default: {DEFAULT_MODEL})" + required_for)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def add_effort_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reasoning-effort", "--effort", "-e", choices=EFFORTS, default=None,
                   help="reasoning effort written into the system message (default: medium)")


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """What the memory plan depends on: context length and dense-layer bits."""
    p.add_argument("--max-context", type=positive_int, default=None, metavar="TOKENS",
                   help="context length to plan memory for and to allow (default: "
                        f"{DEFAULT_CONTEXT}; at most the model's max_position_embeddings)")
    p.add_argument("--dense-bits", type=int, choices=[8, 4], default=None,
                   help="quantize attention, router and embeddings at load (saves memory)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="load even if the memory estimate says it will not fit")


def add_model_options(p: argparse.ArgumentParser, interactive: bool = True) -> None:
    """The options of every subcommand that runs the model: chat, generate, tui, and serve
    (``interactive=False``: no one to approve code, no chat to keep a python session for)."""
    add_model_argument(p)
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter to apply (gptoss-mlx finetune's --adapter-path)")
    add_effort_argument(p)
    p.add_argument("--system", help="instructions for the model (the developer message)")
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
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable replies")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="cap on tokens per reply (reasoning included)")
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
    tools.add_argument("--python-timeout", type=positive_seconds, default=30.0,
                       help="seconds per code run (default 30)")
    tools.add_argument("--python-network", action="store_true", help="allow the Python code network access")
    tools.add_argument("--browser-allow-private", action="store_true",
                       help="let the browser open loopback, private and link-local addresses "
                            "(refused by default: a page could steer the model at your network)")


def make_toolbox(args, approve=None) -> Toolbox | None:
    """The Toolbox the flags ask for (None if none); bad flags or files become CLIErrors.
    ``approve(code) -> bool`` is asked before code runs unless --auto-approve."""
    names = {t.strip() for t in (args.tools or "").split(",") if t.strip()}
    unknown = names - {"python", "browser"}
    if unknown:
        raise CLIError(f"unknown tool(s) {', '.join(sorted(unknown))}: --tools takes python,browser")
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
                   approve_code=None if args.auto_approve else approve)


def ask_on_terminal(code: str) -> bool:
    """Show the model's code and ask before running it (standard input is the terminal)."""
    print(f"{DIM}The model wants to run this Python code:{RESET}\n{render_code_ansi(code)}",
          file=sys.stderr)
    try:
        return input("Run it? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def decline_when_piped(code: str) -> bool:
    print("[python code not run: pass --auto-approve to allow it without a terminal]", file=sys.stderr)
    return False


def planned_context(max_context: int | None, config: ModelConfig, config_file) -> int:
    """--max-context, checked against the model's positions; by default DEFAULT_CONTEXT."""
    limit = config.max_position_embeddings
    if max_context is None:
        return min(DEFAULT_CONTEXT, limit)
    if max_context > limit:
        raise CLIError(f"--max-context {max_context} is more than this model's {limit} positions "
                       f"(max_position_embeddings in {config_file}); use at most {limit}")
    return max_context


def prepare(args) -> tuple[Path, int]:
    """(checkpoint directory, context). The config comes first (a repo's config.json alone),
    so --max-context and the memory plan are checked before any weights are downloaded."""
    source = args.model or DEFAULT_MODEL
    try:
        if Path(source).expanduser().exists():
            directory = resolve_checkpoint(source)
            config_file = find_layout(directory)[1] / "config.json"
        else:
            directory, config_file = None, fetch_config(source)
        config = ModelConfig.from_file(config_file)
        context = planned_context(args.max_context, config, config_file)
        if not args.no_memory_check:
            check_fits(config, context, checkpoint_dense_bits(config, args.dense_bits))
        if directory is None:
            check_free_disk(source)
            directory = resolve_checkpoint(source)  # the weights: progress bars, resumable
            weights_present(source, directory)
        return directory, context
    except (CheckpointError, ConfigError, MemoryPlanError) as e:
        raise CLIError(str(e)) from None


def weights_present(repo_id: str, directory: Path) -> None:
    """Offline, the cache may hold a repo's config.json and no weights (a refused pull)."""
    try:
        find_layout(directory)
    except CheckpointError:
        if offline():
            raise CheckpointError(not_downloaded(repo_id)) from None
        raise


def load_chat(args, out=sys.stderr, toolbox=None) -> Chat:
    """Plan, load the model, and make a Chat, turning failures into CLIErrors."""
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p,
                                  args.seed, args.max_tokens)
        directory, context = prepare(args)
        t0 = time.perf_counter()
        print(f"Loading {directory} ...", file=out, flush=True)
        model, tokenizer = load(directory, dense_bits=args.dense_bits, adapter=args.adapter)
        print(f"Loaded in {time.perf_counter() - t0:.1f}s.", file=out, flush=True)
        options = toolbox.chat_options() if toolbox else {}
        return Chat(model, tokenizer, instructions=getattr(args, "system", None),
                    reasoning_effort=args.reasoning_effort or "medium", sampling=sampling,
                    max_context=context, context_overflow=args.context_overflow, **options)
    except (CheckpointError, ConfigError, TokenizerError, MemoryPlanError, ValueError) as e:
        raise CLIError(str(e)) from None
