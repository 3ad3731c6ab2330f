"""The tools a chat may use, and the loop that runs them.

    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)], python=PythonSandbox())
    chat = Chat(model, tokenizer, **toolbox.chat_options())
    for event in run_with_tools(chat, "What's the weather in Oslo?", toolbox):
        ...   # ReasoningDelta, AnswerDelta, ToolCall, ToolResult, Done (one per model reply)

The model calls a function as ``functions.NAME`` on the commentary channel (sometimes on
analysis: both are accepted), the built-ins as ``python`` and ``browser.search|open|find``.
Every call gets a result message back — invalid JSON, an unknown tool, a declined or failing
call become error texts the model can react to — until it answers, or ``max_rounds`` is reached.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

from ..chat import Chat, Done, ToolCall, result_channel
from ..harmony import BROWSER_TOOLS
from .browser import Browser
from .functions import FunctionTool, ToolError, error_text, parse_arguments
from .python_tool import PythonSandbox

MAX_RESULT_CHARS = 100_000  # a tool result longer than this is cut (it would flood the context)


@dataclass
class ToolResult:
    name: str  # the tool's author name: "functions.get_weather", "python", "browser.open"
    content: str
    ok: bool = True


@dataclass
class Toolbox:
    functions: list[FunctionTool] = field(default_factory=list)
    python: PythonSandbox | None = None
    browser: Browser | None = None
    # Asked before the python tool runs code: (code) -> True to run it, False (declined) or None
    # (not answered: the user stopped the reply) not to. None runs it at once.
    approve_code: Callable[[str], bool | None] | None = None
    # Where what a function prints goes while it runs (the CLI: standard error, so that the
    # answer on standard output stays whole); None leaves sys.stdout as it is.
    function_output: TextIO | None = None
    # interrupt(): a function called off the main thread is left to itself (_call_leaving_on_stop)
    _stop_call: threading.Event = field(default_factory=threading.Event, repr=False)

    def chat_options(self) -> dict:
        """Keyword arguments for Chat: which tools the system and developer messages declare."""
        return {"functions": [f.spec for f in self.functions], "browser": self.browser is not None,
                "python": self.python is not None,
                "python_description": self.python.description if self.python else None}

    def execute(self, call: ToolCall) -> ToolResult:
        """Run one call. Whatever happens (a bad argument, any exception but Ctrl-C, a result
        that is not text or is huge) comes back as a result the model sees: the loop goes on."""
        recipient = str(call.recipient).strip()
        try:
            content, ok = self._dispatch(recipient, call.arguments), True
            if not isinstance(content, str):
                raise ToolError(f"the tool returned {type(content).__name__}, not text")
        except KeyboardInterrupt:
            raise
        except ToolError as e:
            content, ok = f"Error: {error_text(e)}", False
        except RecursionError:
            content, ok = "Error: the arguments or the result are nested too deeply", False
        except BaseException as e:  # noqa: BLE001 - SystemExit, GeneratorExit... must not end the loop
            content, ok = f"Error: the tool failed ({type(e).__name__}: {error_text(e)})", False
        return ToolResult(recipient, _bounded(content), ok)

    @property
    def recipients(self) -> list[str]:
        return tool_recipients(self.functions, self.python is not None, self.browser is not None)

    def _dispatch(self, recipient: str, arguments: str) -> str:
        namespace, _, name = recipient.partition(".")
        if namespace == "functions":
            for f in self.functions:
                if f.name == name:
                    with (contextlib.redirect_stdout(self.function_output) if self.function_output
                          else contextlib.nullcontext()):
                        if threading.current_thread() is threading.main_thread():
                            return f.call(arguments)  # (Ctrl-C stops it: the terminal chat)
                        return self._call_leaving_on_stop(f, arguments)
        elif recipient == "python" and self.python is not None:
            code = _python_code(arguments)
            if self.approve_code is not None:
                answer = self.approve_code(code)  # None: not answered, the reply was stopped
                if not answer:
                    raise ToolError("the user declined to run this code" if answer is not None
                                    else "not run: the user stopped the reply before answering")
            return self.python.run(code)
        elif namespace == "browser" and self.browser is not None:
            return self.browser.call(name, parse_arguments(arguments))
        raise ToolError(no_such_tool(recipient, self.recipients))

    def _call_leaving_on_stop(self, f: FunctionTool, arguments: str) -> str:
        """``f.call(arguments)`` in a daemon thread of its own, waited for until :meth:`interrupt`:
        off the main thread Ctrl-C reaches no function, so one that hung held the TUI's reply
        (Esc said "stopping…" for good) and the app's exit. Stopped, the call fails at once and
        the function is left to end by itself (Python cannot stop a thread)."""
        self._stop_call.clear()
        outcome: list = []
        done = threading.Event()

        def run():
            try:
                outcome.append((True, f.call(arguments)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
                outcome.append((False, e))
            finally:
                done.set()

        threading.Thread(target=run, name=f"function-{f.name}", daemon=True).start()
        while not done.wait(0.02):
            if self._stop_call.is_set():
                raise ToolError("stopped by the user while it ran (it goes on by itself until it returns)")
        returned, value = outcome[0]
        if not returned:
            raise value
        return value

    def interrupt(self) -> None:
        """From another thread: stop the python cell or the function under way (Esc in the
        TUI); the toolbox goes on working."""
        self._stop_call.set()
        if self.python is not None:
            self.python.interrupt()

    def cancel(self) -> None:
        """Stop whatever runs now, from another thread (the one asking has gone); the toolbox
        runs nothing after this."""
        if self.python is not None:
            self.python.cancel()

    def new_conversation(self) -> None:
        """Another conversation goes on from here (a new chat, a saved one opened): a fresh
        python session and no browser pages, as each conversation has its own."""
        if self.python is not None:
            self.python.new_session()
        if self.browser is not None:
            self.browser.new_session()

    def close(self) -> None:
        if self.python is not None:
            self.python.close()


def tool_recipients(functions: list[FunctionTool], python: bool, browser: bool) -> list[str]:
    """What the model may address these tools as: ``functions.NAME``, ``python``, ``browser.search``..."""
    return ([f"functions.{f.name}" for f in functions] + (["python"] if python else [])
            + ([f"browser.{t.name}" for t in BROWSER_TOOLS] if browser else []))


def no_such_tool(recipient: str, available: list[str]) -> str:
    """What a call to a tool that is not there gets back (the model can call another)."""
    if not available:
        return f"there is no tool {recipient!r}: no tools are available here; answer without them"
    return f"there is no tool {recipient!r} (available: {', '.join(available)})"


def limit_reached(max_rounds: int) -> str:
    """What a call past the tool-call limit gets back instead of running."""
    return (f"Error: tool-call limit reached ({max_rounds} round{'' if max_rounds == 1 else 's'}); "
            "answer with what you have")


def _bounded(content: str) -> str:
    """At most MAX_RESULT_CHARS characters, valid UTF-8 (lone surrogates replaced)."""
    content = content.encode("utf-8", "replace").decode("utf-8")
    if len(content) > MAX_RESULT_CHARS:
        cut = len(content) - MAX_RESULT_CHARS
        content = f"{content[:MAX_RESULT_CHARS]}\n[truncated: {cut} more characters]"
    return content


def _python_code(arguments: str) -> str:
    """The model sends python code as plain text; accept a JSON {"code": ...} too."""
    text = arguments.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("code"), str):
                return data["code"]
        except json.JSONDecodeError:
            pass
    return arguments


def run_with_tools(chat: Chat, text: str | None, toolbox: Toolbox, max_rounds: int = 8) -> Iterator:
    """Send ``text`` (or, if None, continue the conversation) and keep answering tool calls
    until the model stops calling tools. Yields the chat's events plus a ToolResult per call.
    A call past ``max_rounds`` rounds is told the limit is reached, and the reply after it is
    the answer (Chat.reply(answer=True))."""
    events = chat.send(text) if text is not None else chat.reply()
    for round_ in range(max_rounds + 2):
        calls, done = [], None
        for event in events:
            yield event
            if isinstance(event, ToolCall):
                calls.append(event)
            elif isinstance(event, Done):
                done = event
        if (not calls or done is None or done.finish_reason in ("interrupted", "length", "context")
                or round_ > max_rounds):
            return
        stopped = None  # Ctrl-C (the terminal chat) while a call ran or its user was asked
        for call in calls:
            if round_ == max_rounds:
                result = ToolResult(call.recipient, limit_reached(max_rounds), ok=False)
            elif chat.stop_requested or stopped:  # stopped after the call was made (Esc in the TUI)
                result = ToolResult(call.recipient, "Error: not run: the user stopped the reply", ok=False)
            else:
                try:
                    result = toolbox.execute(call)
                except KeyboardInterrupt as e:  # every call keeps a result: none is left unanswered
                    stopped = e
                    result = ToolResult(call.recipient, "Error: stopped by the user", ok=False)
            chat.add_tool_result(result.name, result.content, channel=result_channel(call))
            yield result
        if chat.stop_requested or stopped:  # no next round, and the reply is saved as stopped
            chat.mark_stopped()
            if stopped:
                raise stopped
            return
        events = chat.reply(answer=round_ == max_rounds)
