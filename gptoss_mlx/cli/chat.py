"""``gptoss-mlx chat``: the terminal chat (a REPL), or one answer when standard input is piped."""

from __future__ import annotations

import sys

from ..chat import ChatFileError
from ..generate import ContextLengthError
from ..harmony import EFFORTS
from . import common
from .common import (
    RESET, CLIError, add_model_options, ask_on_terminal, decline_when_piped, make_toolbox,
)
from .stream import answer_once, print_events, replies

HELP = """Commands:
  /effort low|medium|high   reasoning effort from the next reply
  /reasoning show|hide      show or hide the chain of thought
  /system TEXT              set the instructions (empty: remove them)
  /reset                    start a new conversation
  /save PATH, /load PATH    save or load the conversation (JSON)
  /stats                    statistics of the last reply
  /help, /exit
Multi-line input: end a line with \\ to continue it, or wrap the text in triple quotes.
Ctrl-C stops the reply (the conversation stays); Ctrl-D or /exit quits."""


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (reads standard input when piped)",
                       description="Chat with gpt-oss. Piped input is answered once: the answer "
                                   "goes to standard output, the reasoning to standard error.")
    add_model_options(p)
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the chain of thought")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    if not sys.stdin.isatty():  # piped: answer once
        question = sys.stdin.read().strip()
        if not question:
            raise CLIError("no question on standard input")
        return answer_once(args, question, decline_when_piped, not args.hide_reasoning, dim=False)
    toolbox = make_toolbox(args, ask_on_terminal)
    chat = common.load_chat(args, toolbox=toolbox)
    try:
        return Repl(chat, show_reasoning=not args.hide_reasoning, toolbox=toolbox).run()
    finally:
        if toolbox:
            toolbox.close()


class Repl:
    def __init__(self, chat, show_reasoning: bool = True, out=sys.stdout, toolbox=None):
        self.chat, self.show_reasoning, self.out = chat, show_reasoning, out
        self.toolbox = toolbox
        self.last_stats = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> int:
        self.say(f"gpt-oss ready (reasoning effort {self.chat.reasoning_effort}). /help for commands.")
        while True:
            try:
                text = self.read_message()
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:
                self.say("")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text.strip()) == "exit":
                    return 0
                continue
            self.turn(text)

    def read_message(self) -> str:
        first = input(">>> ")
        if first.strip().startswith('"""'):
            lines = [first.strip()[3:]]
            while not lines[-1].rstrip().endswith('"""'):
                lines.append(input("... "))
            lines[-1] = lines[-1].rstrip()[:-3]
            return "\n".join(lines).strip("\n")
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        return "\n".join(lines)

    def turn(self, text: str) -> None:
        events = replies(self.chat, text, self.toolbox)
        try:
            done = print_events(events, self.show_reasoning, self.out, self.out,
                           self.out.isatty())
            self.last_stats = done.stats if done else None
            if done and done.finish_reason in ("length", "context"):
                self.say(f"[reply cut off: {done.finish_reason} limit]")
        except KeyboardInterrupt:
            events.close()  # keeps the partial answer in the history now, not at GC time
            self.say(RESET + "\n[stopped]")
            self.last_stats = self.chat.engine.stats
        except ContextLengthError as e:
            self.chat.messages.pop()  # the user message that did not fit
            self.say(f"error: {e}")

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            self.say(HELP)
        elif name == "/effort":
            if arg not in EFFORTS:
                self.say(f"usage: /effort {'|'.join(EFFORTS)}")
            else:
                self.chat.reasoning_effort = arg
                self.say(f"reasoning effort: {arg} (from the next reply)")
        elif name == "/reasoning":
            if arg not in ("show", "hide"):
                self.say("usage: /reasoning show|hide")
            else:
                self.show_reasoning = arg == "show"
                self.say(f"reasoning: {arg}")
        elif name == "/system":
            self.chat.instructions = arg or None
            self.say("instructions set" if arg else "instructions removed")
        elif name == "/reset":
            self.chat.reset()
            self.say("new conversation")
        elif name in ("/save", "/load"):
            self._file_command(name, arg)
        elif name == "/stats":
            self.say(self.last_stats.summary() if self.last_stats else "no reply yet")
        else:
            self.say(f"unknown command {name}; /help lists them")
        return None

    def _file_command(self, name: str, arg: str) -> None:
        if not arg:
            self.say(f"usage: {name} PATH")
            return
        try:
            if name == "/save":
                self.say(f"saved to {self.chat.save(arg)}")
            else:
                self.chat.load(arg)
                self.say(f"loaded {len(self.chat.messages)} messages from {arg}")
        except (ChatFileError, OSError) as e:
            self.say(f"error: {e}")
