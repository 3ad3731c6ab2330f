"""The ``gptoss-mlx`` command. Each subcommand is a module of this package with ``register(sub)``
(its arguments) and a ``cmd_*`` function; this module only assembles them and runs one."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import chat, doctor, generate, models, render, serve, tui
from .common import CLIError, terminal_safe

SUBCOMMANDS = (render, chat, generate, tui, serve, models, doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss-mlx", description="Run OpenAI's gpt-oss models locally with MLX.")
    parser.add_argument("--version", action="version", version=f"gptoss-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except CLIError as e:
        print(f"gptoss-mlx: error: {terminal_safe(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
