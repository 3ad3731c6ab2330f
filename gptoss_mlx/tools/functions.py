"""Function tools: Python callables (or raw JSON Schemas) the model can call as ``functions.NAME``.

    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> str:
        '''Current weather in a city.

        Args:
            city: the city's name
        '''
    tool = FunctionTool.from_callable(get_weather)

The schema comes from the type hints and the docstring (first paragraph = description, an
``Args:`` section = parameter descriptions). Calls are validated against the schema; a bad
call or an exception becomes an error text for the model, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import enum
import functools
import importlib.machinery
import importlib.util
import inspect
import json
import math
import re
import sys
import types
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..files import expand_user, regular_file_problem
from ..harmony import ToolSpec

FUNCTION_TIMEOUT_S = 60.0  # serve: a call to one of --functions not returned by then gets an error
# The longest a code run or a function call may be given: poll() waits at most 2**31 - 1 ms
# (24.8 days), and a --python-timeout beyond it failed every call with an OverflowError.
MAX_TIMEOUT_S = 7 * 86400.0
# The shortest: 1e-300 was taken and every run "timed out after 0.0 seconds" (helper-153).
MIN_TIMEOUT_S = 0.01


class ToolError(Exception):
    """A call the model got wrong; its message goes back to the model."""


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object",
               list: "array", type(None): "null"}


def json_schema(hint) -> dict:
    """JSON Schema for a type hint (str, int, float, bool, list[X], dict, Literal, Enum, X | None)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"type": _types_of(args), "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [json_schema(a) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"oneOf": options}
        return {**schema, "nullable": True} if type(None) in args else schema
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, int]: so many of one type
        if len(set(args)) > 1:
            raise TypeError(f"no JSON Schema for the type hint {hint!r} (items of different types): "
                            "give list[...] or tuple[X, ...]")
        return {"type": "array", "items": json_schema(args[0]), "minItems": len(args), "maxItems": len(args)}
    if origin in (list, tuple, set, frozenset):
        return {"type": "array", **({"items": json_schema(args[0])} if args else {})}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        return {"type": _types_of(values), "enum": values}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise TypeError(f"no JSON Schema for the type hint {hint!r}")


def _types_of(values) -> str | list[str]:
    """The JSON type of an enum's values, or the list of them (``Literal[1, "auto"]``, an
    ``IntEnum``, ``Literal["a", None]``): the first value's alone refused the others."""
    kinds = list(dict.fromkeys(_JSON_TYPES.get(type(v), "string") for v in values))
    if "integer" in kinds and "number" in kinds:
        kinds.remove("integer")
    return kinds[0] if len(kinds) == 1 else kinds


def _converter(hint) -> Callable[[Any], Any] | None:
    """What makes a JSON value the hint's type, where JSON has none of it: an Enum's value its
    member (in a union, only a value that is one: `Color | int` took 3 as Color(3) and failed),
    an array a tuple or a set, and their items likewise (``list[Color]``); None where the value
    is already it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        def member(v):
            if isinstance(v, (hint, bool)):  # (True == 1: an IntEnum's 1 is no answer to a bool)
                return v
            try:
                return hint(v)
            except (ValueError, TypeError):  # another option of a union's
                return v
        return member
    if origin in (typing.Union, types.UnionType):  # each option's in turn, the first that takes it
        inner = [c for a in args if (c := _converter(a)) is not None]
        if not inner:
            return None

        def first_that_takes(v):
            for convert in inner:
                made = convert(v)
                if made is not v:
                    return made
            return v
        return first_that_takes
    if origin in (list, tuple, set, frozenset):
        item = _converter(args[0]) if args and args[0] is not Ellipsis else None
        make = list if origin is list else origin
        if item is None and origin is list:
            return None
        def sequence(v):
            if not isinstance(v, list):
                return v  # (not taken: a union's next option may take it)
            items = [item(x) for x in v] if item else v
            if origin is list and all(a is b for a, b in zip(items, v)):
                return v  # none of its items taken: a union's next option may take them
            return make(items)
        return sequence
    return None


def _caller(fn: Callable, signature: inspect.Signature, hints: dict) -> Callable[..., Any]:
    """``fn`` called with the model's arguments as keywords: positional-only parameters passed
    by position, and each value as its hint's type where JSON has none of it (_converter: an
    Enum's member, as its default is; a tuple; a set)."""
    converters = {p.name: c for p in signature.parameters.values() if (c := _converter(hints.get(p.name))) is not None}
    positional = [p.name for p in signature.parameters.values() if p.kind == p.POSITIONAL_ONLY]
    if not converters and not positional:
        return fn

    def call(**args):
        for name, convert in converters.items():
            if args.get(name) is not None:
                args[name] = convert(args[name])
        first = []
        for name in positional:
            if name not in args:
                break  # (the rest take their defaults)
            first.append(args.pop(name))
        return fn(*first, **args)

    return functools.wraps(fn)(call)


def _docstring_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring."""
    doc = inspect.cleandoc(doc or "")
    head, _, rest = doc.partition("\n\n")
    params: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.MULTILINE)
    if section:
        current = None
        for line in section.group(1).splitlines():
            m = re.match(r"\s+(\w+)(?:\s*\(.*?\))?\s*:\s*(.*)", line)
            if m:
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and line.strip():
                params[current] += " " + line.strip()
    description = " ".join(head.split()) if not head.startswith(("Args:", "Parameters:")) else ""
    return description, params


@dataclass
class FunctionTool:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    fn: Callable[..., Any]
    source: Path | None = None  # the file it was loaded from (load_functions), if any

    @classmethod
    def from_callable(cls, fn: Callable, name: str | None = None, description: str | None = None) -> "FunctionTool":
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            # (its result was "<generator object ...>", said to the model as the answer, helper-157)
            raise TypeError("is a generator function: return the values (a list) instead of yielding them")
        name = name or getattr(fn, "__name__", None)
        if name in (None, "<lambda>"):  # a lambda, a functools.partial, an object with __call__
            what = "a lambda" if name else type(fn).__name__
            raise TypeError(f"{what} has no name to call it by: use def, or FunctionTool.from_callable(f, name=...)")
        # where its hints and docstring are: a partial's function's, a callable object's __call__'s
        inner = fn.func if isinstance(fn, functools.partial) else (
            fn if inspect.isroutine(fn) or isinstance(fn, type) else getattr(fn, "__call__", fn))
        description_doc, param_docs = _docstring_parts(inner.__doc__ if inner.__doc__ else fn.__doc__)
        hints = typing.get_type_hints(inner)
        properties, required = {}, []
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            schema = json_schema(hints.get(p.name, inspect.Parameter.empty))
            if p.name in param_docs:
                schema["description"] = param_docs[p.name]
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
            elif p.default is not None and isinstance(p.default, (str, int, float, bool)) and (
                    not isinstance(p.default, float) or math.isfinite(p.default)):  # (inf: no JSON)
                schema["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
            properties[p.name] = schema
        parameters = {"type": "object", "properties": properties}
        if required:
            parameters["required"] = required
        signature = inspect.signature(fn)
        # a name it does not take: refused, not a TypeError; with **kwargs, any name is taken
        parameters["additionalProperties"] = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        return cls(name, description or description_doc, parameters, _caller(fn, signature, hints))

    @classmethod
    def from_schema(cls, name: str, description: str, parameters: dict, fn: Callable) -> "FunctionTool":
        """A raw JSON Schema; ``fn`` receives the validated arguments as keywords."""
        return cls(name, description, parameters, fn)

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    def call(self, arguments: str) -> str:
        """Parse, validate and run; returns the result as text (JSON for non-strings)."""
        args = parse_arguments(arguments)
        validate(args, self.parameters)
        try:
            result = self.fn(**args)
            if inspect.isawaitable(result):  # an async def's (its coroutine was the answer, helper-157)
                result = _awaited(result)
        except Exception as e:  # noqa: BLE001  — reported to the model, which can retry
            raise ToolError(f"{type(e).__name__}: {error_text(e)}") from None
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def _awaited(awaitable) -> Any:
    """An async function's result: run in an event loop of its own (one running in this thread,
    a library caller's, cannot wait for it: then in a thread of its own)."""
    async def wait():
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def error_text(error: BaseException) -> str:
    """``str(error)``, or a note where its ``__str__`` fails (its type still says what it was)."""
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails
        return "(its message could not be read)"


def parse_arguments(arguments: str) -> dict:
    """A tool call's arguments: a JSON object (empty text counts as {})."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise ToolError(f"the arguments are not valid JSON ({e.msg} at position {e.pos})") from None
    except ValueError:  # an integer of more digits than Python converts (4,300)
        raise ToolError("the arguments hold a number too long to read") from None
    except RecursionError:
        raise ToolError("the arguments are nested too deeply") from None
    if not isinstance(args, dict):
        raise ToolError("the arguments must be a JSON object")
    return args


_CHECKS = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
           "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
           "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
           "null": lambda v: v is None}


def validate(value, schema: dict, path: str = "arguments") -> None:
    """The JSON Schema subset tools use: type (or a list of types), enum, const, properties,
    required, additionalProperties: false, items, oneOf/anyOf, nullable, and the bounds (minimum,
    maximum and their exclusive forms, multipleOf, minLength, maxLength, pattern, minItems,
    maxItems). Raises ToolError. (The bounds were taken unchecked: a call made without the
    decoding grammar, by a library caller or in a saved chat, reached the function with 1 for a
    minimum of 5.)"""
    if not isinstance(schema, dict):
        raise ToolError(f"{path}: the tool's schema for it is not a JSON Schema object: {json.dumps(schema)[:80]}")
    if value is None and schema.get("nullable"):
        return
    for key in ("oneOf", "anyOf"):
        if key in schema:
            errors = []
            for option in schema[key]:
                try:
                    validate(value, option, path)
                    return
                except ToolError as e:
                    errors.append(str(e))
            raise ToolError(f"{path}: matches none of the allowed forms ({'; '.join(errors)})")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if kinds and not any(_CHECKS.get(k, lambda v: True)(value) for k in kinds):
        raise ToolError(f"{path} must be of type {' or '.join(kinds)}, got {json.dumps(value)}")
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        raise ToolError(f"{path} must be one of {json.dumps(schema['enum'])}, got {json.dumps(value)}")
    if "const" in schema and not _same(value, schema["const"]):
        raise ToolError(f"{path} must be {json.dumps(schema['const'])}, got {json.dumps(value)}")
    _check_bounds(value, schema, path)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            raise ToolError(f"{path}: missing required {', '.join(missing)}")
        for k, v in value.items():
            if k in props:
                validate(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False or (props and "additionalProperties" not in schema):
                raise ToolError(f"{path}: unknown argument {k!r} (expected {', '.join(props) or 'none'})")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            validate(v, schema["items"], f"{path}[{i}]")


def _same(a, b) -> bool:
    """JSON's equality: true is not 1 (Python's True == 1 let it through an enum of [1])."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _check_bounds(value, schema: dict, path: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    bounds = (("minimum", lambda v, b: v >= b, ">="), ("maximum", lambda v, b: v <= b, "<="),
              ("exclusiveMinimum", lambda v, b: v > b, ">"), ("exclusiveMaximum", lambda v, b: v < b, "<"))
    for key, holds, said in bounds if number else ():
        bound = schema.get(key)
        if isinstance(bound, (int, float)) and not isinstance(bound, bool) and not holds(value, bound):
            raise ToolError(f"{path} must be {said} {bound}, got {json.dumps(value)}")
    step = schema.get("multipleOf")
    if number and isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0 and not _multiple(value, step):
        raise ToolError(f"{path} must be a multiple of {step}, got {json.dumps(value)[:100]}")
    sizes = (("minLength", "maxLength", "characters") if isinstance(value, str) else
             ("minItems", "maxItems", "items") if isinstance(value, list) else None)
    if sizes:
        low, high = schema.get(sizes[0]), schema.get(sizes[1])
        if isinstance(low, int) and len(value) < low or isinstance(high, int) and len(value) > high:
            raise ToolError(f"{path} must have {_range(low, high)} {sizes[2]}, got {len(value)}")
    if isinstance(value, str) and isinstance(schema.get("pattern"), str):
        try:
            matches = re.search(schema["pattern"], value) is not None
        except re.error:  # (a pattern Python reads otherwise than JSON Schema's: left to the grammar)
            matches = True
        if not matches:
            raise ToolError(f"{path} must match the pattern {schema['pattern']!r}, got {json.dumps(value)[:200]}")


def _multiple(value, step) -> bool:
    """Whether ``value`` is a multiple of ``step`` as JSON's decimal numbers read: exactly for
    integers (10**400 overflowed a float), else in decimal as the numbers are written (0.3 of 0.1
    is 2.9999999999999996 in float64; 5.0 passed a multipleOf of 1e10 within a tolerance)."""
    if isinstance(value, int) and isinstance(step, int):
        return value % step == 0
    if isinstance(value, float) and not math.isfinite(value):
        return False
    with decimal.localcontext(prec=60):
        quotient = decimal.Decimal(repr(value)) / decimal.Decimal(repr(step))
        return quotient == quotient.to_integral_value()


def _range(low, high) -> str:
    if isinstance(low, int) and low == high:
        return f"exactly {low}"
    if isinstance(low, int) and isinstance(high, int):
        return f"from {low} to {high}"
    return f"at least {low}" if isinstance(low, int) else f"at most {high}"


def load_functions(path: str | Path) -> list[FunctionTool]:
    """The tools a Python file defines: its ``TOOLS`` list if it has one, else every public
    function defined in it. Errors name the file."""
    path = expand_user(path, ToolError)
    problem = regular_file_problem(path)
    if problem:
        raise ToolError(f"{path}: {problem}")
    # (one name per file: two files called tools.py are two modules)
    name = f"gptoss_user_tools_{path.stem}_{zlib.crc32(str(path.resolve()).encode()):08x}"
    # Python source whatever its name ends in (spec_from_file_location knows only .py and kin)
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, str(path)))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses and pickle look the module up there
    try:
        with contextlib.redirect_stdout(sys.stderr):  # what it prints is no answer (generate --json)
            spec.loader.exec_module(module)
    except SystemExit as e:
        sys.modules.pop(name, None)
        raise ToolError(f"{path}: calls sys.exit({e.code!r}) while it is imported") from None
    except KeyboardInterrupt:  # Ctrl-C while it is imported: the user's
        sys.modules.pop(name, None)
        raise
    except BaseException as e:  # noqa: BLE001 - its own exception classes too, and one whose str() fails
        sys.modules.pop(name, None)
        raise ToolError(f"{path}: {type(e).__name__}: {error_text(e)}") from None
    items = getattr(module, "TOOLS", None)
    if items is None:
        items = [f for name, f in vars(module).items()
                 if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")]
    # lambdas, partials and callable objects by the names they are bound to (for TOOLS too; the
    # file's own: an imported partial is no tool of its own)
    named: dict[int, str] = {}
    for name, f in vars(module).items():  # (the first name it is bound to: an alias after it is not it)
        if not name.startswith("_") and callable(f) and getattr(f, "__name__", "<lambda>") == "<lambda>" \
                and not isinstance(f, type):
            named.setdefault(id(f), name)
    if not isinstance(items, (list, tuple)):
        raise ToolError(f"{path}: TOOLS must be a list of functions, got {type(items).__name__}")
    tools = []
    for n, item in enumerate(items):
        if not (isinstance(item, FunctionTool) or callable(item)):
            raise ToolError(f"{path}: TOOLS[{n}] must be a function, got {type(item).__name__}")
        try:
            tools.append(item if isinstance(item, FunctionTool) else FunctionTool.from_callable(item, named.get(id(item))))
        except Exception as e:  # noqa: BLE001  — type hints are the file's code, evaluated here
            why = error_text(e) if isinstance(e, TypeError) else f"{type(e).__name__}: {error_text(e)}"
            raise ToolError(f"{path}: {getattr(item, '__name__', repr(item))}: {why}") from None
    if not tools:
        raise ToolError(f"{path}: defines no functions (a functools.partial or an object with __call__ is a "
                        "tool when listed in TOOLS)")
    for tool in tools:
        tool.source = path
    return tools
