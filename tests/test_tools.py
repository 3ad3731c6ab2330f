"""Tool use: function tools from callables, the tool loop over scripted harmony output (both
recipient positions, both channels, bad JSON, unknown tools, round limits), the python tool's
sessions, timeouts and output caps, and the browser against a local HTTP server."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import time
from pathlib import Path
from enum import Enum, IntEnum
from typing import Literal

import pytest

from gptoss_mlx.chat import AnswerDelta, Chat, Done, ToolCall
from gptoss_mlx.harmony import render_conversation, segments_to_text
from gptoss_mlx.tokenizer import load_tokenizer
from gptoss_mlx.tools import (
    Browser, FunctionTool, PythonSandbox, SandboxLimits, SearchResult, ToolError, Toolbox, ToolResult,
    load_functions, run_with_tools,
)
from scripted import ScriptedModel


# ---- function tools -------------------------------------------------------------------------

class Unit(Enum):
    C = "c"
    F = "f"


def get_weather(city: str, unit: Literal["c", "f"] = "c", days: int = 1, alerts: bool | None = None) -> dict:
    """Current weather in a city.

    Args:
        city: the city's name, e.g. Oslo
        unit: temperature unit
        days (int): how many days
            of forecast to include
    """
    return {"city": city, "temp": 21 if unit == "c" else 70, "days": days}


def test_schema_from_type_hints_and_docstring():
    tool = FunctionTool.from_callable(get_weather)
    assert tool.name == "get_weather" and tool.description == "Current weather in a city."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city's name, e.g. Oslo"},
            "unit": {"type": "string", "enum": ["c", "f"], "description": "temperature unit", "default": "c"},
            "days": {"type": "integer", "description": "how many days of forecast to include", "default": 1},
            "alerts": {"type": "boolean", "nullable": True},
        },
        "required": ["city"],
        "additionalProperties": False,
    }
    assert json.loads(tool.call('{"city": "Oslo", "unit": "f"}')) == {"city": "Oslo", "temp": 70, "days": 1}


def test_an_argument_a_function_does_not_take_is_named():
    """A function without parameters was called with whatever keys the model wrote: the model
    read 'TypeError: ping() got an unexpected keyword argument'. One that takes **kwargs gets them."""
    def ping() -> str:
        """Ping."""
        return "pong"

    def anything(**options) -> str:
        """Take anything."""
        return json.dumps(options)
    with pytest.raises(ToolError, match=r"^arguments: unknown argument 'x' \(expected none\)$"):
        FunctionTool.from_callable(ping).call('{"x": 1}')
    assert FunctionTool.from_callable(ping).call("{}") == "pong"
    assert FunctionTool.from_callable(anything).call('{"x": 1}') == '{"x": 1}'


@pytest.mark.parametrize("arguments,message", [
    ('{"city": "Oslo"', "not valid JSON"),
    ('["Oslo"]', "must be a JSON object"),
    ("{}", "missing required city"),
    ('{"city": 3}', "arguments.city must be of type string"),
    ('{"city": "Oslo", "unit": "k"}', 'must be one of \\["c", "f"\\]'),
    ('{"city": "Oslo", "days": true}', "must be of type integer"),
    ('{"city": "Oslo", "country": "NO"}', "unknown argument 'country'"),
])
def test_bad_calls_are_tool_errors(arguments, message):
    with pytest.raises(ToolError, match=message):
        FunctionTool.from_callable(get_weather).call(arguments)


def test_exceptions_in_the_function_are_reported():
    def divide(a: float, b: float) -> float:
        """Divide."""
        return a / b

    with pytest.raises(ToolError, match="ZeroDivisionError: division by zero"):
        FunctionTool.from_callable(divide).call('{"a": 1, "b": 0}')


def test_raw_schema_tools_and_enums():
    tool = FunctionTool.from_schema("lookup", "Look up a key.", {
        "type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
        lambda key: {"key": key, "value": 42})
    assert json.loads(tool.call('{"key": "x"}')) == {"key": "x", "value": 42}

    def convert(unit: Unit) -> str:
        """Convert."""
        return unit

    assert FunctionTool.from_callable(convert).parameters["properties"]["unit"] == {"type": "string", "enum": ["c", "f"]}


class Speed(IntEnum):
    FAST = 1
    SLOW = 2


def test_enum_literal_positional_only_and_kwargs_parameters_are_called_as_declared():
    """A tester's signatures: an IntEnum was declared a string whose values are numbers (no
    argument could pass), and the function got the model's raw value where its default gave it
    the member; Literal[1, "auto"] and Literal["a", None] took their first value's type only;
    positional-only parameters were passed by keyword (every call a TypeError); **kwargs was
    declared but the extra names refused; an exception whose str() failed hid its type."""
    seen = []

    def drive(speed: Speed, mode: Literal[1, "auto"], unit: Unit = Unit.C, /, label: Literal["a", None] = "a",
              **extra) -> str:
        """Drive."""
        seen.append((speed, mode, unit, label, extra))
        return "ok"

    tool = FunctionTool.from_callable(drive)
    props = tool.parameters["properties"]
    assert props["speed"] == {"type": "integer", "enum": [1, 2]}
    assert props["mode"] == {"type": ["integer", "string"], "enum": [1, "auto"]}
    assert props["label"] == {"type": ["string", "null"], "enum": ["a", None], "default": "a"}
    assert tool.parameters["additionalProperties"] is True
    assert tool.call('{"speed": 2, "mode": "auto", "unit": "f", "label": null, "colour": "red"}') == "ok"
    assert tool.call('{"speed": 1, "mode": 1}') == "ok"
    assert seen == [(Speed.SLOW, "auto", Unit.F, None, {"colour": "red"}), (Speed.FAST, 1, Unit.C, "a", {})]
    with pytest.raises(ToolError, match='must be one of \\[1, 2\\], got 3'):
        tool.call('{"speed": 3, "mode": 1}')

    class Quota(Exception):
        def __str__(self):
            raise RuntimeError("no str")

    def fails() -> str:
        """Fail."""
        raise Quota()

    with pytest.raises(ToolError, match="^Quota: "):
        FunctionTool.from_callable(fails).call("{}")
    with pytest.raises(ToolError, match="a number too long to read"):
        tool.call('{"speed": ' + "9" * 5000 + "}")


def test_a_functions_file_with_dataclasses_loads(tmp_path):
    """load_functions ran the module without registering it: a dataclass under `from __future__
    import annotations` failed ('NoneType' object has no attribute '__dict__'); two files of one
    name are two modules."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tools.py").write_text(
            "from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass P:\n"
            f"    x: int\n\ndef ping_{folder}() -> str:\n    \"\"\"Ping.\"\"\"\n    return str(P(1))\n")
    tools = [t for folder in ("a", "b") for t in load_functions(tmp_path / folder / "tools.py")]
    assert [(t.name, t.call("{}")) for t in tools] == [("ping_a", "P(x=1)"), ("ping_b", "P(x=1)")]


def test_load_functions_from_a_file(tmp_path):
    path = tmp_path / "mytools.py"
    path.write_text('def add(a: int, b: int) -> int:\n    """Add two numbers."""\n    return a + b\n\n'
                    'def _private():\n    pass\n\nimport os\n')
    (tool,) = load_functions(path)
    assert tool.name == "add" and tool.call('{"a": 2, "b": 3}') == "5"
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ToolError, match="bad.py: RuntimeError: boom"):
        load_functions(bad)
    with pytest.raises(ToolError, match="missing.py: does not exist"):
        load_functions(tmp_path / "missing.py")


def test_async_functions_are_awaited_and_generators_lambdas_and_non_functions_named(tmp_path):
    """A tester's (helper-157): an async def's result was "<coroutine object ...>", a generator's
    "<generator object ...>", each said to the model as the answer; a module's lambda was a
    tool named "<lambda>" that no call could reach; TOOLS = [1] said "1 is not a module, class,
    method, or function"."""
    path = tmp_path / "mine.py"
    path.write_text("import asyncio\n\nasync def later(x: int) -> int:\n    await asyncio.sleep(0)\n"
                    "    return x + 1\n\nshout = lambda text: text.upper()\n\n"
                    "import functools\n\ndef _add(x: int, y: int) -> int:\n    return x + y\n\nadd5 = functools.partial(_add, y=5)\n\n"
                    "class Twice:\n    async def __call__(self, x: int) -> int:\n        return 2 * x\n\ntwice = Twice()\n"
                    "TOOLS = [later, shout, add5, twice]\n")
    later, shout = load_functions(path)[:2]
    assert (later.name, later.call('{"x": 41}')) == ("later", "42")
    assert (shout.name, shout.call('{"text": "hi"}')) == ("shout", "HI")
    add5, twice = load_functions(path)[2:]  # (a partial, a callable object: by their names, helper-158)
    assert (add5.name, add5.call('{"x": 2}'), twice.name, twice.call('{"x": 4}')) == ("add5", "7", "twice", "8")

    async def inside_a_loop():  # a library caller's running loop
        return later.call('{"x": 1}')

    assert asyncio.run(inside_a_loop()) == "2"
    for source, message in [("def gen(n: int):\n    yield n\n", "gen: is a generator function"),
                            ("TOOLS = [lambda x: x]\n", "<lambda>: a lambda has no name to call it by"),
                            ("TOOLS = [len, None]\n", "TOOLS\\[1\\] must be a function, got NoneType"),
                            ("import functools\nTOOLS = [functools.partial(max, 1)]\n", "partial has no name")]:
        path.write_text(source)
        with pytest.raises(ToolError, match=message):
            load_functions(path)


@pytest.mark.parametrize("source, message", [
    ("TOOLS = 5\n", "TOOLS must be a list of functions, got int"),
    ('def f(a: "not a type"):\n    pass\n', "f: SyntaxError"),
    ('def f(a: "Undefined"):\n    pass\n', "f: NameError"),
    ("import sys\nsys.exit(3)\n", "calls sys.exit(3) while it is imported"),
    ("TOOLS = [5]\n", "TOOLS[0] must be a function, got int"),
    # a tester's (helper-144): each was a traceback
    ("class E(Exception):\n    def __str__(self):\n        raise RuntimeError('nope')\nraise E()\n",
     "E: (its message could not be read)"),
    ("class E(BaseException):\n    pass\nraise E('boom')\n", "E: boom"),
    ("def f(x: tuple[int, str]):\n    pass\n", "f: no JSON Schema for the type hint tuple[int, str] (items of different types)"),
])
def test_a_bad_functions_file_is_one_error_naming_it(tmp_path, source, message):
    path = tmp_path / "tools.py"
    path.write_text(source)
    with pytest.raises(ToolError) as e:
        load_functions(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


class Color(Enum):  # (at module level: the functions' hints are strings, resolved in their globals)
    RED = "red"


def test_arguments_become_the_hinted_types_and_their_bounds_are_checked():
    """A tester's (helper-144): `Color | int` took a valid 3 as Color(3) and the model was told the
    function failed; tuple and set hints received lists (tuple[int, str]'s schema said integers);
    list[Color] received strings; an inf default made the schema unreadable; and a raw schema's
    minimum, maxLength, pattern, const or maxItems were not checked where a call came without the
    decoding grammar (true passed an enum of [1])."""
    def ce(x: Color | int) -> str:
        return repr(x)

    def one_or_many(c: Color | list[Color]) -> str:  # (the re-attack's: two options to convert, none converted)
        return repr(c)

    def colors_or_pair(x: list[Color] | tuple[int, int]) -> str:  # ([1, 2] is the pair's, not the list's)
        return repr(x)

    def kinds(pair: tuple[int, int], many: tuple[str, ...], unique: set[str], colors: list[Color] | None = None,
              limit: float = float("inf")) -> str:
        return repr((pair, many, sorted(unique), type(unique).__name__, colors, limit))

    tools = Toolbox(functions=[FunctionTool.from_callable(f) for f in (ce, kinds, one_or_many, colors_or_pair)])
    run = lambda name, args: tools.execute(ToolCall(f"functions.{name}", json.dumps(args))).content
    assert run("ce", {"x": 3}) == "3" and run("ce", {"x": "red"}) == "<Color.RED: 'red'>"
    assert run("one_or_many", {"c": "red"}) == "<Color.RED: 'red'>"
    assert run("one_or_many", {"c": ["red"]}) == "[<Color.RED: 'red'>]"
    assert run("colors_or_pair", {"x": [1, 2]}) == "(1, 2)" and run("colors_or_pair", {"x": ["red"]}) == "[<Color.RED: 'red'>]"
    assert run("kinds", {"pair": [1, 2], "many": ["a"], "unique": ["b", "b"], "colors": ["red"]}) == (
        "((1, 2), ('a',), ['b'], 'set', [<Color.RED: 'red'>], inf)")
    assert run("kinds", {"pair": [1], "many": [], "unique": []}) == (
        "Error: arguments.pair must have exactly 2 items, got 1")
    assert "default" not in FunctionTool.from_callable(kinds).parameters["properties"]["limit"]
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 5}, "s": {"type": "string", "maxLength": 2, "pattern": "^a"},
        "c": {"const": "a"}, "l": {"type": "array", "maxItems": 1}, "e": {"enum": [1]},
        "m": {"type": "integer", "multipleOf": 3}, "f": {"type": "number", "multipleOf": 0.01}}}
    raw = Toolbox(functions=[FunctionTool.from_schema("raw", "", schema, lambda **kw: "ran")])
    call = lambda args: raw.execute(ToolCall("functions.raw", json.dumps(args))).content
    assert call({"n": 5, "s": "ab", "c": "a", "l": [1], "e": 1, "f": 0.3, "m": 10**400 - 1}) == "ran"
    assert call({"f": 1e308}) == "ran"  # (in decimal, as JSON reads it: a float's quotient overflowed)
    for args, says in (({"n": 1}, "arguments.n must be >= 5, got 1"),
                       ({"s": "abc"}, "arguments.s must have at most 2 characters, got 3"),
                       ({"s": "ba"}, "arguments.s must match the pattern '^a'"),
                       ({"c": "b"}, 'arguments.c must be "a", got "b"'),
                       ({"l": [1, 2]}, "arguments.l must have at most 1 items, got 2"),
                       ({"e": True}, "arguments.e must be one of [1], got true"),
                       # (the re-attack's: an OverflowError, not a result for the model)
                       ({"m": 10**400}, "arguments.m must be a multiple of 3"), ({"f": 1.005}, "arguments.f must be a multiple of 0.01"),
                       ({"f": 1e-7}, "arguments.f must be a multiple of 0.01")):  # (within 1e-9 of 0 times it: taken)
        assert call(args) == f"Error: {says}" or call(args).startswith(f"Error: {says}"), (args, call(args))


@pytest.mark.parametrize("name", ["tools.txt", "tools", "tools.json"])
def test_a_functions_file_of_any_name_is_read_as_python(tmp_path, name, capsys):
    """--functions tools.txt (or a name without a suffix) ended in a traceback
    ('NoneType' object has no attribute 'loader')."""
    path = tmp_path / name
    path.write_text('def shout(word: str) -> str:\n    """Shout."""\n    return word.upper()\n')
    (tool,) = load_functions(path)
    assert tool.name == "shout" and tool.call('{"word": "hi"}') == "HI"
    path.write_text('print("hello from the module")\n' + path.read_text())
    load_functions(path)
    out, err = capsys.readouterr()
    assert out == "" and "hello from the module" in err  # stdout is the answer's (generate --json)
    path.write_text('{"not": "python"')
    with pytest.raises(ToolError, match=f"{name}: SyntaxError"):
        load_functions(path)


WORKER_FILE = """
import os, sys, time
calls = []
def remember(word: str) -> str:
    \"\"\"Remember a word.\"\"\"
    calls.append(word)
    print("noise on stdout")  # must not break the answers
    return " ".join(calls)
def spin() -> str:
    \"\"\"Spin.\"\"\"
    while True:
        pass
def leave() -> str:
    \"\"\"End the process.\"\"\"
    os._exit(7)
def huge() -> str:
    \"\"\"A lot.\"\"\"
    return "Z" * 5_000_000
def pid() -> int:
    \"\"\"The worker's process id.\"\"\"
    return os.getpid()
"""


def test_functions_from_a_file_run_in_workers_that_are_ended_when_late(tmp_path):
    """serve --functions: a call that spun past its timeout kept burning a core of the server
    for good (a thread cannot be stopped), and one that called os._exit ended the server. Each
    now runs in a worker process: a late one is ended with it, one that ends its process fails
    alone, and idle workers are reused (module state stays)."""
    import os
    from gptoss_mlx.tools.function_worker import FunctionWorkers
    from gptoss_mlx.tools.toolbox import MAX_RESULT_CHARS

    path = tmp_path / "fns.py"
    path.write_text(WORKER_FILE)
    workers = FunctionWorkers([path])
    try:
        first = workers.call("functions.remember", '{"word": "a"}', 30)
        assert (first.content, first.ok) == ("a", True)
        assert workers.call("functions.remember", '{"word": "b"}', 30).content == "a b"  # the same worker
        late = workers.call("functions.spin", "{}", 1.0)
        assert (late.content, late.ok) == ("Error: functions.spin did not return within 1 s: its process was ended", False)
        assert not workers._busy and all(w.proc.poll() is None for w in workers._idle)
        left = workers.call("functions.leave", "{}", 30)
        assert (left.content, left.ok) == ("Error: functions.leave failed: its process exited with code 7", False)
        big = workers.call("functions.huge", "{}", 30)
        assert len(big.content) < MAX_RESULT_CHARS + 100 and big.content.endswith("more characters]")
        assert workers.call("functions.nope", "{}", 30).content.startswith("Error: there is no tool 'functions.nope'")
        worker_pid = int(workers.call("functions.pid", "{}", 30).content)
        assert worker_pid != os.getpid()
    finally:
        workers.close()
    with pytest.raises(ProcessLookupError):  # close() ended it
        for _ in range(50):
            os.kill(worker_pid, 0)
            time.sleep(0.1)
    assert workers.call("functions.pid", "{}", 30).content == "Error: functions.pid could not start: the server is shutting down"


def test_a_late_function_is_ended_with_the_processes_it_started(tmp_path):
    """A call past its timeout killed the worker alone: a subprocess or a fork the function had
    started went on running (a spinning child for good), reparented to init."""
    import os
    from gptoss_mlx.tools.function_worker import FunctionWorkers

    pids = tmp_path / "pids"
    path = tmp_path / "fns.py"
    path.write_text(f"""import os, subprocess, time
def start_and_hang() -> str:
    child = subprocess.Popen(["sleep", "300"])
    forked = os.fork()
    if forked == 0:
        while True:
            pass
    open({str(pids)!r}, "w").write(f"{{child.pid}} {{forked}}")
    while True:
        time.sleep(0.1)
""")
    workers = FunctionWorkers([path])
    try:
        late = workers.call("functions.start_and_hang", "{}", 2.0)
        assert late.ok is False and "did not return within 2 s" in late.content
    finally:
        workers.close()
    started = [int(pid) for pid in pids.read_text().split()]
    deadline = time.monotonic() + 5
    alive = started
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in started if _alive(pid)]
        time.sleep(0.05)
    for pid in alive:  # (not to leave them behind when the test fails)
        os.kill(pid, 9)
    assert not alive, "processes the function started outlived its timeout"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_functions_file_that_fails_in_the_worker_is_said(tmp_path):
    from gptoss_mlx.tools.function_worker import FunctionWorkers

    path = tmp_path / "fns.py"
    path.write_text("def f() -> str:\n    \"\"\"F.\"\"\"\n    return 'x'\n")
    workers = FunctionWorkers([path])
    path.write_text("raise RuntimeError('only in the worker')\n")
    try:
        result = workers.call("functions.f", "{}", 30)
    finally:
        workers.close()
    assert not result.ok and "could not start" in result.content and "only in the worker" in result.content


def test_a_fifo_functions_file_is_refused_unopened(tmp_path):
    import os
    os.mkfifo(tmp_path / "tools.py")
    with pytest.raises(ToolError, match="tools.py: is a FIFO"):
        load_functions(tmp_path / "tools.py")


# ---- the loop over scripted harmony output ----------------------------------------------------

@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def tokens(tok, text):
    return tok.encode(text, allowed_special="all")


def call_script(tok, recipient, args, channel="commentary", recipient_first=False, think="Need a tool."):
    head = (f"<|start|>assistant to={recipient}<|channel|>{channel} <|constrain|>json<|message|>"
            if recipient_first else
            f"<|start|>assistant<|channel|>{channel} to={recipient} <|constrain|>json<|message|>")
    return tokens(tok, f"<|channel|>analysis<|message|>{think}<|end|>{head}{args}<|call|>")


def answer_script(tok, text):
    return tokens(tok, f"<|channel|>analysis<|message|>Got it.<|end|>"
                       f"<|start|>assistant<|channel|>final<|message|>{text}<|return|>")


def run(tok, replies, toolbox, text="What's the weather in Oslo?", max_rounds=8):
    chat = Chat(ScriptedModel(replies), tok, date="2025-08-05", **toolbox.chat_options())
    events = list(run_with_tools(chat, text, toolbox, max_rounds=max_rounds))
    return chat, events


def rendered_until_tool_result(chat):
    """The prompt as the model saw it right after the last tool result (before its answer,
    which drops the turn's analysis from later prompts)."""
    conversation = chat.conversation()
    last_tool = max(i for i, m in enumerate(conversation) if m.role == "tool")
    return segments_to_text(render_conversation(conversation[: last_tool + 1]))


def results(events):
    return [e for e in events if isinstance(e, ToolResult)]


@pytest.mark.parametrize("channel", ["commentary", "analysis"])
@pytest.mark.parametrize("recipient_first", [False, True])
def test_function_call_loop(tok, channel, recipient_first):
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    chat, events = run(tok, [call_script(tok, "functions.get_weather", '{"city": "Oslo"}', channel, recipient_first),
                             answer_script(tok, "It is 21°C in Oslo.")], toolbox)
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    assert call.recipient == "functions.get_weather" and call.channel == channel
    (result,) = results(events)
    assert result.ok and json.loads(result.content)["temp"] == 21
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "It is 21°C in Oslo."
    tool_message = [m for m in chat.messages if m.role == "tool"][0]
    assert (tool_message.name, tool_message.channel, tool_message.recipient) == ("functions.get_weather", channel, "assistant")
    prompt = rendered_until_tool_result(chat)  # what the model saw for its second reply
    assert f"<|start|>functions.get_weather to=assistant<|channel|>{channel}<|message|>" in prompt
    assert "namespace functions {" in prompt and "type get_weather = (_: {" in prompt
    assert sum(isinstance(e, Done) for e in events) == 2


@pytest.mark.parametrize("args,expect", [
    ('{"city": "Oslo"', "Error: the arguments are not valid JSON"),
    ('{"town": "Oslo"}', "Error: arguments: missing required city"),
])
def test_bad_arguments_are_errors_for_the_model(args, expect):
    """A Chat's calls to its functions are constrained to their parameters while decoding
    (gptoss_mlx/structured.py), so these come from other callers of the toolbox."""
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    result = toolbox.execute(ToolCall("functions.get_weather", args))
    assert not result.ok and result.content.startswith(expect)


@pytest.mark.parametrize("recipient,args,expect", [
    ("functions.get_wether", '{"city": "Oslo"}', "Error: there is no tool 'functions.get_wether' (available: functions.get_weather)"),
    ("database.query", '{"q": 1}', "Error: there is no tool 'database.query' (available: functions.get_weather)"),
    ("python", 'print(1)', "Error: there is no tool 'python' (available: functions.get_weather)"),
])
def test_bad_calls_go_back_to_the_model(tok, recipient, args, expect):
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    chat, events = run(tok, [call_script(tok, recipient, args), answer_script(tok, "Sorry.")], toolbox)
    (result,) = results(events)
    assert not result.ok and result.content.startswith(expect)
    assert [m for m in chat.messages if m.role == "tool"][0].text == result.content
    assert events[-1].finish_reason == "stop"  # the model answered after seeing the error


def test_round_limit(tok):
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    loop = call_script(tok, "functions.get_weather", '{"city": "Oslo"}')
    chat, events = run(tok, [loop, loop, loop, tokens(tok, "Sunny, I think.<|return|>"), loop], toolbox,
                       max_rounds=2)
    contents = [r.content for r in results(events)]
    assert contents[-1].startswith("Error: tool-call limit reached (2 rounds)")
    assert len(contents) == 3
    # then the answer, its header written for the model (the turn ended on the limit's error)
    assert (chat.messages[-1].channel, chat.messages[-1].text) == ("final", "Sunny, I think.")
    assert events[-1].finish_reason == "stop"


def test_a_stop_while_the_tools_run_ends_the_turn(tok):
    """Esc in the TUI while a tool ran: the next round started anyway (the stop was reset by it)."""
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    loop = call_script(tok, "functions.get_weather", '{"city": "Oslo"}')
    chat = Chat(ScriptedModel([loop, answer_script(tok, "Sunny.")]), tok, date="2025-08-05", **toolbox.chat_options())
    real = toolbox.execute
    toolbox.execute = lambda call: (chat.stop(), real(call))[1]  # pressed while it runs
    events = list(run_with_tools(chat, "Weather?", toolbox))
    assert len(results(events)) == 1 and sum(isinstance(e, Done) for e in events) == 1
    assert chat.messages[-1].role == "tool"  # kept: the next turn follows on from it


def test_ctrl_c_while_a_tool_runs_leaves_no_call_unanswered_and_the_reply_marked_stopped(tok, tmp_path):
    """Ctrl-C in the terminal chat while a function ran (or at "Run it? [y/N]") left the call
    without a result, which every later prompt then held, and the reply saved as if whole; Esc
    in the TUI, too, left no stopped mark. Each call keeps a result, and the reply is marked
    stopped, in the saved chat as well."""
    def slow(city: str) -> str:
        """Slow weather."""
        raise KeyboardInterrupt  # (what Ctrl-C raises in it)

    toolbox = Toolbox(functions=[FunctionTool.from_callable(slow)])
    chat = Chat(ScriptedModel([call_script(tok, "functions.slow", '{"city": "Paris"}')]), tok,
                date="2025-08-05", **toolbox.chat_options())
    events = []
    with pytest.raises(KeyboardInterrupt):
        for event in run_with_tools(chat, "Weather?", toolbox):
            events.append(event)
    assert [r.content for r in results(events)] == ["Error: stopped by the user"]
    assert [(m.role, m.cut) for m in chat.messages[-2:]] == [("assistant", "interrupted"), ("tool", None)]
    from gptoss_mlx.store import ConversationStore

    store = ConversationStore(tmp_path)
    store.save(chat, "c1", "Weather")
    again = Chat(ScriptedModel([]), tok, date="2025-08-05", **toolbox.chat_options())
    store.load(again, "c1")
    assert [(m.role, m.cut) for m in again.messages[-2:]] == [("assistant", "interrupted"), ("tool", None)]

    loop = call_script(tok, "functions.get_weather", '{"city": "Oslo"}')  # Esc (the TUI) while it runs
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    chat = Chat(ScriptedModel([loop]), tok, date="2025-08-05", **toolbox.chat_options())
    real = toolbox.execute
    toolbox.execute = lambda call: (chat.stop(), real(call))[1]
    list(run_with_tools(chat, "Weather?", toolbox))
    assert [(m.role, m.cut) for m in chat.messages[-2:]] == [("assistant", "interrupted"), ("tool", None)]


def test_python_tool_in_the_loop_with_approval(tok, os_sandbox):
    asked = []
    toolbox = Toolbox(python=PythonSandbox(limits=SandboxLimits(timeout_s=10)),
                      approve_code=lambda code: asked.append(code) or "rm" not in code)
    try:
        replies = [tokens(tok, "<|channel|>analysis to=python<|message|>print(6*7)<|call|>"),
                   tokens(tok, "<|channel|>analysis to=python<|message|>import os; os.rmdir('x')<|call|>"),
                   answer_script(tok, "42")]
        chat, events = run(tok, replies, toolbox, "6*7?")
        assert [r.content.strip() for r in results(events)] == ["42", "Error: the user declined to run this code"]
        assert asked == ["print(6*7)", "import os; os.rmdir('x')"]
        system = tok.decode(chat.prompt_tokens()).split("<|end|>")[0]
        assert "## python" in system and "time out after 10.0 seconds" in system and "Internet access for this session is disabled" in system
    finally:
        toolbox.close()


# ---- the python tool (its escape suite is tests/test_sandbox.py) -----------------------------

@pytest.fixture(scope="module")
def sandbox(os_sandbox):
    box = PythonSandbox(limits=SandboxLimits(timeout_s=5, memory_mb=512, max_output=2000))
    yield box
    box.close()


def test_sandbox_state_and_notebook_style_output(sandbox):
    assert sandbox.run("x = 20\nx + 1").strip() == "21"
    assert sandbox.run("print(x * 2)").strip() == "40"
    assert "ZeroDivisionError" in sandbox.run("1/0")
    assert sandbox.run("x").strip() == "20"  # an error does not lose the session


def test_stateless_mode_forgets(os_sandbox):
    with PythonSandbox(stateful=False) as box:
        box.run("y = 1")
        assert "NameError" in box.run("print(y)")
        assert "STATELESS" in box.description


def test_infinite_loop_times_out_and_session_restarts(os_sandbox):
    with PythonSandbox(limits=SandboxLimits(timeout_s=1.5)) as box:
        box.run("z = 5")
        t0 = time.monotonic()
        out = box.run("while True:\n    pass")
        assert time.monotonic() - t0 < 5
        assert "timed out after 1.5 seconds" in out and "restarted" in out
        assert "NameError" in box.run("z")  # a fresh interpreter
        assert box.run("2 + 2").strip() == "4"


def test_huge_output_and_memory_are_contained(sandbox):
    out = sandbox.run("print('x' * 10_000_000)")
    assert len(out) < 2200 and "[output truncated: 9998001 more characters]" in out
    out = sandbox.run("b = bytearray(4 * 2**30)")
    assert "MemoryError" in out or "ended" in out
    assert sandbox.run("1 + 1").strip() == "2"


# ---- the browser ------------------------------------------------------------------------------

PAGES = {
    "/": "<html><head><title>Home page</title><script>var x=1;</script></head><body>"
         "<h1>Welcome</h1><p>The answer is <b>42</b>.</p><p>See <a href='/doc'>the docs</a> "
         "and <a href='https://example.org/x'>elsewhere</a>.</p></body></html>",
    "/doc": "<html><head><title>Docs</title></head><body>" + "".join(f"<p>Line number {i} about MLX.</p>" for i in range(100)) + "</body></html>",
    "/plain": "just text\nsecond line",
}


@pytest.fixture(scope="module")
def site():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = PAGES.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain" if self.path == "/plain" else "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_browser_open_follow_links_scroll_and_find(site):
    b = Browser(backend=None, view_lines=10, allow_private=True)
    page = b.open(id=site + "/")
    assert page.startswith("[0] Home page (127.0.0.1:")
    assert "L0: Welcome" in page and "L1: The answer is 42." in page and "var x" not in page
    assert "【0†the docs】" in page and "【1†elsewhere†example.org】" in page
    doc = b.open(id=0)  # follow link 0 of the current page
    assert doc.startswith("[1] Docs") and "**viewing lines [0 - 9] of 99**" in doc
    scrolled = b.open(loc=50, num_lines=3)
    assert "**viewing lines [50 - 52] of 99**" in scrolled and "L51: Line number 51 about MLX." in scrolled
    found = b.find("number 7", cursor=1)
    assert found.startswith("[2] Find results") and "L0: 【0†match at L7】 Line number 7 about MLX." in found
    assert "【1†match at L70】 Line number 70" in found
    # a match opens the page as it was read, a few lines above the match (it fetched the page
    # again and showed its top); a page of results has no text to find in
    match = b.open(id=1)
    assert match.startswith("[3] Docs") and "**viewing lines [66 - 75] of 99**" in match and "L70: Line number 70" in match
    with pytest.raises(ToolError, match="page 2 is a list of results"):
        b.find("number", cursor=2)
    assert "L0: just text" in b.open(id=site + "/plain")


def test_browser_errors_are_tool_errors(site):
    b = Browser(backend=None, allow_private=True)
    with pytest.raises(ToolError, match="no page is open yet"):
        b.find("x")
    with pytest.raises(ToolError, match="HTTP 404"):
        b.open(id=site + "/missing")
    with pytest.raises(ToolError, match="only http"):
        b.open(id="file:///etc/passwd")
    with pytest.raises(ToolError, match="no search backend is configured"):
        b.search("mlx")
    b.open(id=site + "/")
    with pytest.raises(ToolError, match="has no link 7"):
        b.open(id=7)


def test_browser_search_with_a_backend_in_the_loop(tok, site):
    class Backend:
        def search(self, query, topn):
            return [SearchResult("MLX docs", site + "/doc", "Docs about MLX."),
                    SearchResult("Home", site + "/", "The answer.")][:topn]

    toolbox = Toolbox(browser=Browser(backend=Backend(), allow_private=True))
    replies = [tokens(tok, '<|channel|>analysis to=browser.search<|message|>{"query": "mlx", "topn": 2}<|call|>'),
               tokens(tok, '<|channel|>analysis to=browser.open<|message|>{"id": 1}<|call|>'),
               answer_script(tok, "The answer is 42 【1†L1-L1】.")]
    chat, events = run(tok, replies, toolbox, "What is the answer?")
    search, opened = results(events)
    assert search.name == "browser.search" and "【0†MLX docs†127.0.0.1:" in search.content
    assert opened.content.startswith("[1] Home page") and "The answer is 42." in opened.content
    prompt = rendered_until_tool_result(chat)
    assert "## browser" in prompt and "<|start|>browser.open to=assistant<|channel|>analysis<|message|>" in prompt


# ---- the CLI ------------------------------------------------------------------------------------

def _scripted_cli(monkeypatch, tok, replies):
    """gptoss-mlx's own flag handling and loop, with the model's outputs scripted."""
    from gptoss_mlx.cli import common

    def load_chat(args, out=None, toolbox=None):
        return Chat(ScriptedModel(replies), tok, date="2025-08-05", reasoning_effort="low",
                    **(toolbox.chat_options() if toolbox else {}))

    monkeypatch.setattr(common, "load_chat", load_chat)


def test_cli_tool_loop_transcript(tok, tmp_path, monkeypatch, capsys):
    from gptoss_mlx.cli import main

    functions = tmp_path / "weather.py"
    functions.write_text('def get_weather(city: str) -> dict:\n    """Current weather in a city."""\n'
                         '    return {"city": city, "temp_c": 21}\n')
    _scripted_cli(monkeypatch, tok, [
        call_script(tok, "functions.get_weather", '{"city": "Oslo"}', think="Look up Oslo's weather."),
        tokens(tok, "<|channel|>analysis<|message|>Convert to F with python.<|end|>"
                    "<|start|>assistant<|channel|>analysis to=python<|message|>print(21 * 9 / 5 + 32)<|call|>"),
        answer_script(tok, "It is 21 °C (69.8 °F) in Oslo.")])
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Weather in Oslo, in Fahrenheit?\n"))
    assert main(["chat", "--functions", str(functions), "--tools", "python", "--auto-approve"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "It is 21 °C (69.8 °F) in Oslo."
    assert '[tool call → functions.get_weather] {"city": "Oslo"}' in err
    assert '[result ← functions.get_weather] {"city": "Oslo", "temp_c": 21}' in err
    assert "[tool call → python] print(21 * 9 / 5 + 32)" in err and "[result ← python] 69.8" in err


def test_cli_piped_code_needs_auto_approve(tok, monkeypatch, capsys):
    from gptoss_mlx.cli import main

    _scripted_cli(monkeypatch, tok, [
        tokens(tok, "<|channel|>analysis to=python<|message|>print('hi')<|call|>"),
        answer_script(tok, "I could not run code.")])
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Run something\n"))
    assert main(["chat", "--tools", "python"]) == 0
    out, err = capsys.readouterr()
    assert "pass --auto-approve" in err  # and the model is not told the user declined: none was asked
    assert ("[result ← python] Error: not run: there is no terminal to ask the user on (they can allow "
            "code with --auto-approve)") in err
    assert out.strip() == "I could not run code."


@pytest.mark.parametrize("argv,message", [
    (["--tools", "python,shell"], "unknown tool(s) shell: --tools takes python,browser"),
    (["--functions", "/nonexistent/tools.py"], "/nonexistent/tools.py: does not exist"),
])
def test_cli_tool_flag_errors(argv, message, capsys, monkeypatch):
    from gptoss_mlx.cli import main

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hi\n"))
    assert main(["chat", *argv]) == 2
    assert message in capsys.readouterr().err


async def test_tui_runs_tools_after_approval(tok, tmp_path, os_sandbox):
    from gptoss_mlx.tui import ChatApp, ConversationStore
    from gptoss_mlx.tui.app import TYPE_AHEAD_S, ApproveCode, PromptInput

    toolbox = Toolbox(python=PythonSandbox(limits=SandboxLimits(timeout_s=10)))
    chat = Chat(ScriptedModel([tokens(tok, "<|channel|>analysis to=python<|message|>print(6 * 7)<|call|>"),
                               answer_script(tok, "42.")]), tok, date="2025-08-05", **toolbox.chat_options())
    app = ChatApp(chat, store=ConversationStore(tmp_path), toolbox=toolbox)
    async with app.run_test(size=(100, 32)) as pilot:
        app.query_one(PromptInput).text = "6 times 7?"
        await pilot.press("enter")
        deadline = time.monotonic() + 20
        while not isinstance(app.screen, ApproveCode):
            assert time.monotonic() < deadline, "no approval dialog"
            await pilot.pause(0.05)
        assert "print(6 * 7)" in app.screen.query_one(".code Static").render().plain
        await pilot.pause(TYPE_AHEAD_S)  # a Y typed ahead as the dialog shows is no answer
        await pilot.press("y")
        while app.replies_finished < 1:
            assert time.monotonic() < deadline, "the reply did not finish"
            await pilot.pause(0.05)
        rows = [r.title for r in app.query(".tool-call")]
        assert rows == ["tool call · python", "result · python"]
    saved = json.loads(next(tmp_path.glob("chats/*.json")).read_text())
    assert any(m.get("role") == "tool" and m.get("content", "").strip() == "42" for m in saved["messages"])


@pytest.mark.parametrize("header", ["<|channel|>commentary to=functions.get_wether",
                                    "<|channel|>commentary to=functions.get_wether <|constrain|>json"])
def test_a_call_header_cut_by_the_call_token_is_a_call(tok, header):
    """A call whose header the model ended with <|call|> (no <|message|>, no arguments) was
    shown and saved as the answer "to=functions.get_wether". It is that call, with no
    arguments: the tool's answer (here: no such tool) goes back, and the model can call again.
    (A declared function's header cannot end so: tests/test_structured.py.)"""
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    cut = tokens(tok, f"<|channel|>analysis<|message|>Need a tool.<|end|><|start|>assistant{header}<|call|>")
    chat, events = run(tok, [cut, call_script(tok, "functions.get_weather", '{"city": "Oslo"}'),
                             answer_script(tok, "It is 21°C in Oslo.")], toolbox)
    assert [e.recipient for e in events if isinstance(e, ToolCall)] == ["functions.get_wether", "functions.get_weather"]
    first, second = results(events)
    assert not first.ok and "there is no tool 'functions.get_wether'" in first.content and second.ok
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "It is 21°C in Oslo."
    assert not any("to=functions" in m.text for m in chat.messages if m.role == "assistant")


def test_a_new_or_loaded_conversation_gets_a_fresh_python_session(tok, tmp_path, monkeypatch, capsys, os_sandbox):
    """The terminal chat kept one interpreter across /reset and /load: what one conversation
    left (variables, modules, files) met the next one's code."""
    from gptoss_mlx.cli import chat as cli_chat
    from gptoss_mlx.cli import main

    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(tmp_path))
    probe = ("<|channel|>analysis to=python<|message|>"
             "print('seen' if 'kept' in globals() else 'fresh'); kept = 1<|call|>")
    _scripted_cli(monkeypatch, tok, [tokens(tok, probe), answer_script(tok, "Done.")] * 4)
    saved = tmp_path / "a.json"
    saved.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    lines = iter(["one", "two", "/reset", "three", f"/load {saved}", "four"])

    def read(prompt="", default=None):
        for line in lines:
            return line
        raise EOFError  # Ctrl-D
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr(cli_chat, "line_reader", lambda history_file: read)
    out = __import__("io").StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["chat", "--tools", "python", "--auto-approve"]) == 0
    shown = out.getvalue() + capsys.readouterr().err
    assert re.findall(r"\[result ← python\] (\w+)", shown) == ["fresh", "seen", "fresh", "fresh"]


def test_browser_pages_and_python_files_are_the_conversation_s(os_sandbox):
    from gptoss_mlx.tools.browser import Page

    toolbox = Toolbox(python=PythonSandbox(limits=SandboxLimits(timeout_s=10)),
                      browser=Browser(fetch=lambda url: Page(url, "T", ["a line"])))
    toolbox.browser.call("open", {"id": "https://example.com/"})
    assert "saved" in toolbox.python.run("open('f.txt', 'w').write('x'); print('saved')")
    toolbox.new_conversation()
    assert "FileNotFoundError" in toolbox.python.run("open('f.txt').read()")
    with pytest.raises(ToolError, match="no page is open yet"):
        toolbox.browser.call("find", {"pattern": "line"})


def test_what_a_function_prints_does_not_reach_the_answer(tok, tmp_path, monkeypatch, capsys):
    """A --functions function's print() went to standard output, inside the answer (and before
    generate --json's object)."""
    from gptoss_mlx.cli import main

    functions = tmp_path / "noisy.py"
    functions.write_text('def get_weather(city: str) -> str:\n    """Weather."""\n'
                         '    print("PRINTED-BY-FUNCTION")\n    return "sunny"\n')
    _scripted_cli(monkeypatch, tok, [call_script(tok, "functions.get_weather", '{"city": "Oslo"}'),
                                     answer_script(tok, "Sunny.")])
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Weather?\n"))
    assert main(["chat", "--functions", str(functions)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "Sunny." and "PRINTED-BY-FUNCTION" in err


def test_input_in_the_sandbox_ends_at_once(sandbox):
    """input() waited for the whole timeout (the worker's request pipe was its stdin), and the
    session was lost with it."""
    start = time.monotonic()
    assert "EOFError" in sandbox.run("x = 3\ninput('name? ')")
    assert time.monotonic() - start < 5
    assert sandbox.run("x").strip() == "3"


async def test_tui_reasoning_after_a_tool_result_is_shown_below_it(tok, tmp_path):
    """The reasoning the model wrote after reading a result was glued to the first section,
    above the call ("I will look it up.Got it."), live and after a reload."""
    from gptoss_mlx.tui import ChatApp, ConversationStore
    from gptoss_mlx.tui.app import AssistantTurn, PromptInput

    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    replies = [call_script(tok, "functions.get_weather", '{"city": "Oslo"}', think="I will look it up."),
               answer_script(tok, "It is 21 C.")]

    def order(turn):
        return [("reasoning", c.query_one(".reasoning-md").source) if c.has_class("reasoning") else c.title
                for c in turn.query(".reasoning, .tool-call") if c.display]

    expected = [("reasoning", "I will look it up."), "tool call · functions.get_weather",
                "result · functions.get_weather", ("reasoning", "Got it.")]
    store = ConversationStore(tmp_path)
    app = ChatApp(Chat(ScriptedModel(replies), tok, date="2025-08-05", **toolbox.chat_options()),
                  store=store, toolbox=toolbox)
    async with app.run_test(size=(100, 40)) as pilot:
        app.query_one(PromptInput).text = "Weather in Oslo?"
        await pilot.press("enter")
        deadline = time.monotonic() + 20
        while app.replies_finished < 1:
            assert time.monotonic() < deadline, "the reply did not finish"
            await pilot.pause(0.05)
        assert order(app.query_one(AssistantTurn)) == expected
        chat_id = app.chat_id
    app = ChatApp(Chat(ScriptedModel(replies), tok, date="2025-08-05", **toolbox.chat_options()),
                  store=store, toolbox=toolbox)
    async with app.run_test(size=(100, 40)) as pilot:
        app.open_conversation(chat_id)
        await pilot.pause(0.2)
        assert order(app.query_one(AssistantTurn)) == expected


def test_bytes_written_to_standard_output_are_output(sandbox):
    """sys.stdout.buffer raised AttributeError and sys.stdout.encoding was None in the sandbox,
    so code printing bytes (or checking the encoding) failed."""
    out = sandbox.run("import sys\nsys.stdout.buffer.write('h\\u00e9'.encode()[:2]); "
                      "sys.stdout.buffer.write('\\u00e9'.encode()[1:] + b'!\\n'); print(sys.stdout.encoding)")
    assert out.startswith("hé!\nutf-8")


def test_a_call_written_on_another_channel_is_answered_where_harmony_puts_such_calls(tok):
    """The re-attack (helper-134): a call the model wrote on the final channel (or a word that is
    no channel) stopped the tool loop with add_tool_result's ValueError (a traceback in the
    terminal chat); its result goes on commentary (analysis for a built-in tool)."""
    toolbox = Toolbox(functions=[FunctionTool.from_callable(get_weather)])
    for channel in ("final", "bogus"):
        chat, events = run(tok, [call_script(tok, "functions.get_weather", '{"city": "Oslo"}', channel=channel),
                                 answer_script(tok, "Sunny.")], toolbox)
        assert [r.content for r in results(events)] and events[-1].finish_reason == "stop"
        result = next(m for m in chat.messages if m.role == "tool")
        assert (result.name, result.channel) == ("functions.get_weather", "commentary")
