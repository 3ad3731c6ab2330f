"""``gptoss-mlx tui``: the full-screen chat app."""

from __future__ import annotations

import io
import sys

from ..loading import DEFAULT_MODEL
from . import common
from .common import add_model_options, make_toolbox, terminal_safe


def register(sub) -> None:
    p = sub.add_parser("tui", help="the full-screen chat app (live reasoning, effort switch, saved chats)",
                       description="The full-screen chat app: live reasoning, effort switch, "
                                   "saved chats.")
    add_model_options(p)
    p.set_defaults(func=cmd_tui)


def cmd_tui(args) -> int:
    """The Textual app; the model loads inside it, with a visible loading state."""
    from ..tui import ChatApp  # Textual loads only for this subcommand

    if common.follow_rank0(args):  # another machine's share of the model; rank 0 does the I/O
        return 0
    name = args.model or DEFAULT_MODEL
    # The plan and a download happen here, in the terminal, where the progress bars show.
    args.model = str(common.prepare(args)[0])
    # the app asks before code runs (unless --auto-approve); Textual takes what functions print
    toolbox = make_toolbox(args, prints_to_stderr=False)
    app = ChatApp(loader=lambda: common.load_chat(args, out=io.StringIO(), toolbox=toolbox),
                  model_name=name.rstrip("/").split("/")[-1], effort=args.reasoning_effort,
                  toolbox=toolbox, ask_before_running_code=not args.auto_approve)
    app.run()
    if app.exit_note:  # where the chat went when it could not be saved in its place, or a draft
        print(terminal_safe(app.exit_note), file=sys.stderr)
    return 0
