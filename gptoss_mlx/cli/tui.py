"""``gptoss-mlx tui``: the full-screen chat app."""

from __future__ import annotations

import io

from ..loading import DEFAULT_MODEL, CheckpointError, resolve_checkpoint
from . import common
from .common import add_model_options, make_toolbox


def register(sub) -> None:
    p = sub.add_parser("tui", help="the full-screen chat app (live reasoning, effort switch, saved chats)",
                       description="The full-screen chat app: live reasoning, effort switch, "
                                   "saved chats.")
    add_model_options(p)
    p.set_defaults(func=cmd_tui)


def cmd_tui(args) -> int:
    """The Textual app; the model loads inside it, with a visible loading state."""
    from ..tui import ChatApp  # Textual loads only for this subcommand

    name = args.model or DEFAULT_MODEL
    toolbox = make_toolbox(args)  # the app asks before code runs (unless --auto-approve)
    try:  # a download happens here, in the terminal, where its progress bars show
        args.model = str(resolve_checkpoint(args.model))
    except CheckpointError:
        pass  # the app's loader raises it again and shows it as a notification
    app = ChatApp(loader=lambda: common.load_chat(args, out=io.StringIO(), toolbox=toolbox),
                  model_name=name.rstrip("/").split("/")[-1], effort=args.reasoning_effort,
                  toolbox=toolbox, ask_before_running_code=not args.auto_approve)
    app.run()
    return 0
