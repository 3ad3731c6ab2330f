"""What every subcommand shares: the user-facing error, the arguments, and loading a Chat."""

from __future__ import annotations

import argparse
import sys
import time

from ..chat import Chat
from ..config import ConfigError, ModelConfig
from ..generate import SamplingParams
from ..harmony import EFFORTS
from ..loading import DEFAULT_MODEL, CheckpointError, find_layout, load, resolve_checkpoint
from ..memory import DEFAULT_CONTEXT, MemoryPlanError, check_fits
from ..tokenizer import TokenizerError
from ..tools import Browser, PythonSandbox, SandboxLimits, ToolError, Toolbox, load_functions

DIM, RESET = "\x1b[2m", "\x1b[0m"


class CLIError(Exception):
    """A user-facing failure: printed as ``gptoss-mlx: error: ...`` with exit status 2."""


def add_model_argument(p: argparse.ArgumentParser, required_for: str = "") -> None:
    p.add_argument("--model", "-m", default=None,
                   help="local checkpoint directory or Hugging Face repo id "
                        f"(default: {DEFAULT_MODEL})" + required_for)


def add_effort_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reasoning-effort", "-e", choices=EFFORTS, default=None,
                   help="reasoning effort written into the system message (default: medium)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options of every subcommand that runs the model: chat, generate, tui."""
    add_model_argument(p)
    add_effort_argument(p)
    p.add_argument("--system", help="instructions for the model (the developer message)")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"context length to plan memory for and to allow (default: {DEFAULT_CONTEXT})")
    p.add_argument("--dense-bits", type=int, choices=[8, 4], default=None,
                   help="quantize attention, router and embeddings at load (saves memory)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="load even if the memory estimate says it will not fit")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per reply")
    tools = p.add_argument_group("tools")
    tools.add_argument("--tools", default="", metavar="python,browser",
                       help="built-in tools to enable: python (sandboxed code), browser (search needs EXA_API_KEY)")
    tools.add_argument("--functions", metavar="FILE.py", action="append", default=[],
                       help="Python file whose functions (or TOOLS list) the model may call")
    tools.add_argument("--auto-approve", action="store_true",
                       help="run the model's Python code without asking first")
    tools.add_argument("--python-timeout", type=float, default=30.0, help="seconds per code run (default 30)")
    tools.add_argument("--python-stateless", action="store_true",
                       help="a fresh interpreter per code run (default: one session per chat)")
    tools.add_argument("--python-network", action="store_true", help="allow the Python code network access")


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
        python = PythonSandbox(stateful=not args.python_stateless, limits=SandboxLimits(
            timeout_s=args.python_timeout, network=args.python_network))
    return Toolbox(functions=functions, python=python,
                   browser=Browser() if "browser" in names else None,
                   approve_code=None if args.auto_approve else approve)


def ask_on_terminal(code: str) -> bool:
    """Show the model's code and ask before running it (standard input is the terminal)."""
    print(f"{DIM}The model wants to run this Python code:{RESET}\n{code}", file=sys.stderr)
    try:
        return input("Run it? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def decline_when_piped(code: str) -> bool:
    print("[python code not run: pass --auto-approve to allow it without a terminal]", file=sys.stderr)
    return False


def load_chat(args, out=sys.stderr, toolbox=None) -> Chat:
    """Check memory, load the model, and make a Chat, turning failures into CLIErrors."""
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p,
                                  args.seed, args.max_tokens)
        directory = resolve_checkpoint(args.model)
        _, weights_dir = find_layout(directory)
        config = ModelConfig.from_file(weights_dir / "config.json")
        context = min(args.max_context or DEFAULT_CONTEXT, config.max_position_embeddings)
        if not args.no_memory_check:
            check_fits(config, context, args.dense_bits)
        t0 = time.perf_counter()
        print(f"Loading {directory} ...", file=out, flush=True)
        model, tokenizer = load(directory, dense_bits=args.dense_bits)
        print(f"Loaded in {time.perf_counter() - t0:.1f}s.", file=out, flush=True)
        return Chat(model, tokenizer, instructions=getattr(args, "system", None),
                    reasoning_effort=args.reasoning_effort or "medium", sampling=sampling,
                    max_context=context, **(toolbox.chat_options() if toolbox else {}))
    except (CheckpointError, ConfigError, TokenizerError, MemoryPlanError, ValueError) as e:
        raise CLIError(str(e)) from None
