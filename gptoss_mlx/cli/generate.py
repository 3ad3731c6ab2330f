"""``gptoss-mlx generate``: answer one prompt and exit."""

from __future__ import annotations

import sys

from .common import add_model_options, ask_on_terminal, decline_when_piped
from .stream import answer_once


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt and exit")
    add_model_options(p)
    p.add_argument("--prompt", "-p", required=True, help="the user message")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    approve = ask_on_terminal if sys.stdin.isatty() else decline_when_piped
    return answer_once(args, args.prompt, approve, show_reasoning=True, dim=sys.stderr.isatty())
