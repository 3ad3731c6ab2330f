"""``gptoss-mlx chat``, ``generate`` and ``doctor``: the subcommands that run the model."""

from __future__ import annotations

import argparse
import sys
import time

from .harmony import EFFORTS

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

DIM, RESET = "\x1b[2m", "\x1b[0m"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (reads standard input when piped)",
                       description="Chat with gpt-oss. Piped input is answered once: the answer "
                                   "goes to standard output, the reasoning to standard error.")
    _model_options(p)
    p.add_argument("--system", help="instructions for the model (the developer message)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the chain of thought")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="answer one prompt and exit")
    _model_options(p)
    p.add_argument("--prompt", "-p", required=True, help="the user message")
    p.add_argument("--system", help="instructions for the model (the developer message)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tui", help="the full-screen chat app (live reasoning, effort switch, saved chats)")
    _model_options(p)
    p.add_argument("--system", help="instructions for the model (the developer message)")
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser("doctor", help="MLX, memory limits, what fits, and kernel status")
    p.set_defaults(func=cmd_doctor)


def _model_options(p: argparse.ArgumentParser) -> None:
    from .cli import add_effort_argument, add_model_argument

    add_model_argument(p)
    add_effort_argument(p)
    p.add_argument("--max-context", type=int, default=None,
                   help="context length to plan memory for and to allow (default: 32768)")
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


def make_toolbox(args, approve=None):
    """The Toolbox the flags ask for (None if none); bad flags or files become CLIErrors.
    ``approve(code) -> bool`` is asked before code runs unless --auto-approve."""
    from .cli import CLIError
    from .tools import Browser, PythonSandbox, SandboxLimits, ToolError, Toolbox, load_functions

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


def _ask_on_terminal(code: str) -> bool:
    """Show the model's code and ask before running it (standard input is the terminal)."""
    print(f"{DIM}The model wants to run this Python code:{RESET}\n{code}", file=sys.stderr)
    try:
        return input("Run it? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _decline_when_piped(code: str) -> bool:
    print("[python code not run: pass --auto-approve to allow it without a terminal]", file=sys.stderr)
    return False


def _replies(chat, text, toolbox):
    """One user turn: with tools, the loop that answers tool calls until the model is done."""
    if toolbox is None:
        return chat.send(text)
    from .tools import run_with_tools

    return run_with_tools(chat, text, toolbox)


def _load_chat(args, out=sys.stderr, toolbox=None):
    """Check memory, load the model, and make a Chat, turning failures into CLIErrors."""
    from .chat import Chat
    from .cli import CLIError
    from .config import ConfigError, ModelConfig
    from .generate import SamplingParams
    from .loading import CheckpointError, find_layout, load, resolve_checkpoint
    from .memory import MemoryPlanError, check_fits
    from .tokenizer import TokenizerError

    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p,
                                  args.seed, args.max_tokens)
        directory = resolve_checkpoint(args.model)
        _, weights_dir = find_layout(directory)
        config = ModelConfig.from_file(weights_dir / "config.json")
        context = min(args.max_context or 32768, config.max_position_embeddings)
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


def _stream(events, show_reasoning: bool, answer_out, reasoning_out, dim: bool) -> object:
    """Print a reply's events; returns the Done event."""
    from .chat import AnswerDelta, Done, ReasoningDelta, ToolCall
    from .tools import ToolResult

    in_reasoning = False
    done = None

    def end_reasoning(gap: str) -> None:
        nonlocal in_reasoning
        if in_reasoning:
            reasoning_out.write((RESET if dim else "") + gap)
            reasoning_out.flush()
            in_reasoning = False

    for event in events:
        if isinstance(event, ReasoningDelta):
            if show_reasoning:
                if not in_reasoning and dim:
                    reasoning_out.write(DIM)
                in_reasoning = True
                reasoning_out.write(event.text)
                reasoning_out.flush()
        elif isinstance(event, AnswerDelta):
            end_reasoning("\n\n")
            answer_out.write(event.text)
            answer_out.flush()
        elif isinstance(event, ToolCall):
            end_reasoning("\n")
            reasoning_out.write(f"\n[tool call → {event.recipient}] {event.arguments.strip()}\n")
            reasoning_out.flush()
        elif isinstance(event, ToolResult):
            text = event.content if len(event.content) <= 2000 else event.content[:2000] + " …"
            reasoning_out.write(f"[result ← {event.name}] {text.strip()}\n\n")
            reasoning_out.flush()
        elif isinstance(event, Done):
            done = event
    end_reasoning("")
    answer_out.write("\n")
    answer_out.flush()
    return done


def cmd_generate(args) -> int:
    approve = _ask_on_terminal if sys.stdin.isatty() else _decline_when_piped
    return _answer_once(args, args.prompt, approve, show_reasoning=True, dim=sys.stderr.isatty())


def _answer_once(args, text: str, approve, show_reasoning: bool, dim: bool) -> int:
    """Load, answer ``text`` (running tools if asked): the answer to stdout, the rest to stderr."""
    from .cli import CLIError
    from .generate import ContextLengthError

    toolbox = make_toolbox(args, approve)
    chat = _load_chat(args, toolbox=toolbox)
    try:
        _stream(_replies(chat, text, toolbox), show_reasoning, sys.stdout, sys.stderr, dim)
    except ContextLengthError as e:
        raise CLIError(str(e)) from None
    finally:
        if toolbox:
            toolbox.close()
    return 0


def cmd_chat(args) -> int:
    from .cli import CLIError

    if not sys.stdin.isatty():  # piped: answer once
        question = sys.stdin.read().strip()
        if not question:
            raise CLIError("no question on standard input")
        return _answer_once(args, question, _decline_when_piped, not args.hide_reasoning, dim=False)
    toolbox = make_toolbox(args, _ask_on_terminal)
    chat = _load_chat(args, toolbox=toolbox)
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
        from .generate import ContextLengthError

        events = _replies(self.chat, text, self.toolbox)
        try:
            done = _stream(events, self.show_reasoning, self.out, self.out,
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
        from .chat import ChatFileError

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


def cmd_tui(args) -> int:
    """The Textual app; the model loads inside it, with a visible loading state."""
    import io

    from .tui import ChatApp

    from .loading import CheckpointError, resolve_checkpoint

    name = args.model or "openai/gpt-oss-20b"
    toolbox = make_toolbox(args)  # the app asks before code runs (unless --auto-approve)
    try:  # a download happens here, in the terminal, where its progress bars show
        args.model = str(resolve_checkpoint(args.model))
    except CheckpointError:
        pass  # the app's loader raises it again and shows it as a notification
    app = ChatApp(loader=lambda: _load_chat(args, out=io.StringIO(), toolbox=toolbox),
                  model_name=name.rstrip("/").split("/")[-1], effort=args.reasoning_effort,
                  toolbox=toolbox, ask_before_running_code=not args.auto_approve)
    app.run()
    return 0


def cmd_doctor(args) -> int:
    import platform

    import mlx.core as mx

    from .config import PRESETS
    from .memory import GB, device_limit, plan

    limit, source = device_limit()
    print(f"gptoss-mlx on {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    print(f"MLX {mx.__version__}, default device {mx.default_device()}")
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("device_name", "architecture", "memory_size", "max_recommended_working_set_size"):
        if key in info:
            value = info[key]
            print(f"  {key}: {value / GB:.1f} GB" if key.endswith("size") else f"  {key}: {value}")
    print(f"Memory the model may use: {limit / GB:.1f} GB ({source})")
    print("\nWhat fits (weights + KV cache + 1 GB working memory):")
    header = f"  {'model':<14}{'context':>9}  " + "  ".join(f"{b:>14}" for b in ("bf16 dense", "--dense-bits 8", "--dense-bits 4"))
    print(header)
    for name, config in PRESETS.items():
        for ctx in (4096, 32768, 131072):
            cells = []
            for bits in (None, 8, 4):
                p = plan(config, ctx, bits, limit)
                cells.append(f"{('yes ' if p.fits else 'no  ') + f'{p.total / GB:5.1f} GB':>14}")
            print(f"  {name:<14}{ctx:>9}  " + "  ".join(cells))
    from .kernels import registry

    print(f"\nCustom kernels ({registry.ENV_VAR}={registry.mode()}; checked on a small input before use):")
    for name, state, description in registry.status(mx.bfloat16):
        print(f"  {name:<16} {state}\n  {'':<16} {description}")
    return 0
