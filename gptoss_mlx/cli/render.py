"""``gptoss-mlx render``: the exact harmony prompt for a conversation."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from ..chat_file import DATE_SHAPE, is_one_line_date
from ..files import JSONProblem, expand_user, lone_surrogate_problem, parse_json, read_json_file
from ..harmony import (
    HarmonyError, from_chat_completions, render_conversation, segments_to_text, segments_to_tokens,
    today,
)
from ..loading import CheckpointError, resolve_checkpoint
from ..tokenizer import TokenizerError, load_tokenizer
from . import common
from .common import CLIError, add_effort_argument, add_model_argument


def register(sub) -> None:
    p = sub.add_parser("render", help="print the exact harmony prompt for a conversation",
                       description="Print the exact prompt gpt-oss sees for a conversation in "
                                   "Chat Completions JSON ({'messages': [...], 'tools': [...]}).")
    p.add_argument("file", help="conversation JSON file, or - for standard input")
    p.add_argument("--tokens", action="store_true",
                   help="print token ids (one line, space-separated) instead of text")
    add_effort_argument(p)
    p.add_argument("--date", type=one_line_date,
                   help="current date for the system message (default: a saved chat's own, else today)")
    p.add_argument("--tools", default="", help="built-in tools to declare: python,browser")
    add_model_argument(p, "; only its tokenizer is used, for --tokens")
    p.set_defaults(func=cmd_render)


def one_line_date(text: str) -> str:
    if not is_one_line_date(text):
        raise argparse.ArgumentTypeError(f"expected {DATE_SHAPE}, got {text[:80]!r}")
    return text


def cmd_render(args) -> int:
    request = _request(args.file)
    if args.reasoning_effort:
        request = {**request, "reasoning_effort": args.reasoning_effort}
    tools = common.tool_names(args.tools)
    saved_date = request.get("date")  # a saved chat's, which its resumed chat renders
    if saved_date is not None and not is_one_line_date(saved_date):
        raise CLIError(f"{args.file}: 'date' must be {DATE_SHAPE}, got {str(saved_date)[:80]!r}")
    try:
        messages = from_chat_completions(request, date=args.date or saved_date or today(),
                                         browser="browser" in tools, python="python" in tools)
        segments = render_conversation(messages)
    except HarmonyError as e:
        raise CLIError(f"{args.file}: {e}") from None
    if args.tokens:
        tokenizer = _tokenizer(args.model)
        print(" ".join(map(str, segments_to_tokens(segments, tokenizer))))
    else:
        print(segments_to_text(segments))
    return 0


def _request(file: str) -> dict:
    """The Chat Completions request in ``file`` (- for standard input), or one CLIError naming
    the file and what is wrong."""
    if file != "-":  # checked before it is opened: a FIFO would block, a device stream forever
        try:
            pipe = stat.S_ISFIFO(os.stat(file).st_mode)  # <(jq ...), /dev/stdin from a pipe
        except OSError:
            pipe = False  # (read_json_file names what is wrong)
        if pipe:
            raise CLIError(f"{file}: is a pipe; give the conversation on standard input with `-` "
                           f"(gptoss-mlx render - < FILE)")
        request = read_json_file(expand_user(file, CLIError), CLIError)
    else:
        try:
            request = parse_json(sys.stdin.buffer.read())
        except JSONProblem as e:
            raise CLIError(f"{file}: {e}") from None
    if isinstance(request, list):  # a bare list of messages
        request = {"messages": request}
    if not isinstance(request, dict):
        raise CLIError(f"{file}: expected a JSON object with messages, or a list of messages")
    problem = lone_surrogate_problem(request)
    if problem:
        raise CLIError(f"{file}: {problem}")
    return request


def _tokenizer(model: str | None):
    try:
        if model is None:  # never download a whole checkpoint just for its tokenizer
            return load_tokenizer()
        return load_tokenizer(resolve_checkpoint(model))
    except TokenizerError as e:
        hint = "" if model else " (or pass --model with a checkpoint that has tokenizer.json)"
        raise CLIError(f"{e}{hint}") from None
    except CheckpointError as e:
        raise CLIError(str(e)) from None
