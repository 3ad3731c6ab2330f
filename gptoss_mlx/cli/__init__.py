"""The ``gptoss-mlx`` command. Each subcommand is a module of this package with ``register(sub)``
(its arguments) and a ``cmd_*`` function; this module only assembles them and runs one."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path

from .. import __version__
from . import chat, doctor, finetune, generate, models, render, serve, tui
from .common import CLIError, take_positional_model, terminal_safe, unrecognized_arguments

SUBCOMMANDS = (render, chat, generate, tui, serve, models, finetune, doctor)
# what writing to standard output raises when it cannot go on: a closed pipe, a full disk
OUTPUT_ERRORS = (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT)
PACKAGE = Path(__file__).resolve().parent.parent


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's warnings (an adapter made for other weights, a decode step that could not be
    compiled) as one line in the command's words; others' as Python writes them."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        print(f"gptoss-mlx: note: {terminal_safe(str(message))}", file=file or sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose help and version reach a full disk's error (argparse swallows
    it: the help was lost and the exit status 0; `ls --help > /dev/full` says so and fails)."""

    def _print_message(self, message, file=None):
        file = file or sys.stderr
        try:
            if message:
                file.write(message)
        except (AttributeError, OSError):  # (standard error closed or full: as argparse)
            if file is sys.stdout:
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gptoss-mlx", description="Run OpenAI's gpt-oss models locally with MLX.")
    parser.add_argument("--version", action="version", version=f"gptoss-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    parser.commands = sub.choices  # name -> its parser, for usage errors in its own words
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            if extra:
                parser.error("unrecognized arguments: " + " ".join(extra))
            parser.print_help()
            return flushed(0)
    except SystemExit:  # --help, --version, a usage error: argparse's exit, once written
        status = flushed(0)
        if status:
            return status
        raise
    except OSError as e:  # writing the help or the version
        return output_failed(e)
    command = parser.commands[args.command]
    if extra:
        unrecognized_arguments(extra, args, command)
    take_positional_model(args, command)
    if sys.stdout is None:  # started with standard output closed (`>&-`)
        print("gptoss-mlx: error: standard output is closed", file=sys.stderr)
        return 1
    stderr = sys.stderr
    # (a full or closed stderr threw the answer away)
    sys.stderr = BestEffort(stderr if stderr is not None else open(os.devnull, "w"))
    try:
        return run(args)
    finally:
        sys.stderr = stderr


def flushed(status: int) -> int:
    """``status``, once what was printed (help, the version) is written: into a full disk or a
    closed pipe, an error as `ls --help` says it (it was lost, and the exit status 0)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError as e:
        return output_failed(e)
    return status


def output_failed(e: OSError) -> int:
    """Standard output could not be written: quietly where the reader went away (`| head`),
    else saying so; the status to exit with."""
    discard_stdout()
    if e.errno == errno.EPIPE:
        return 141  # 128 + SIGPIPE, as a shell tool killed by it reports
    print(f"gptoss-mlx: error: cannot write the output: {e.strerror}", file=sys.stderr)
    return 1


class BestEffort:
    """Standard error as far as it takes writes: notes and progress go there, and where it is
    full or closed (`2>/dev/full`, `2>&-`) they are lost, not the answer on standard output."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            self.stream.write(text)
        except (OSError, ValueError):  # (ValueError: a closed file)
            pass
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run(args) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            status = args.func(args)
        sys.stdout.flush()  # a write error shows here, not as a traceback at exit
        return status
    except CLIError as e:
        print(f"gptoss-mlx: error: {terminal_safe(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(file=sys.stderr)
        return getattr(e, "status", 130)  # (common.Terminated: SIGTERM's)
    except OSError as e:
        if e.errno is None and e.filename is None and e.args:  # ours, its message whole (files.expand_user)
            print(f"gptoss-mlx: error: {terminal_safe(str(e))}", file=sys.stderr)
            return 1
        if e.filename is not None or e.errno not in OUTPUT_ERRORS:
            raise  # not the output's fault
        return output_failed(e)


def discard_stdout() -> None:
    """Point standard output at the null device, so the final flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
