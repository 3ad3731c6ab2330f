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

import contextlib
import enum
import functools
import importlib.machinery
import importlib.util
import inspect
import json
import re
import sys
import types
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..files import regular_file_problem
from ..harmony import ToolSpec

FUNCTION_TIMEOUT_S = 60.0  # serve: a call to one of --functions not returned by then gets an error


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
    if origin in (list, tuple, set):
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


def _enum_of(hint) -> type[enum.Enum] | None:
    """The Enum a parameter's hint names (``Color``, ``Color | None``), if any."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    found = [a for a in options if isinstance(a, type) and issubclass(a, enum.Enum)]
    return found[0] if len(found) == 1 else None


def _caller(fn: Callable, signature: inspect.Signature, hints: dict) -> Callable[..., Any]:
    """``fn`` called with the model's arguments as keywords: positional-only parameters passed
    by position, and an Enum parameter's value as its member (as its default is)."""
    enums = {p.name: e for p in signature.parameters.values() if (e := _enum_of(hints.get(p.name))) is not None}
    positional = [p.name for p in signature.parameters.values() if p.kind == p.POSITIONAL_ONLY]
    if not enums and not positional:
        return fn

    def call(**args):
        for name, kind in enums.items():
            if args.get(name) is not None and not isinstance(args[name], kind):
                args[name] = kind(args[name])
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
        description_doc, param_docs = _docstring_parts(fn.__doc__)
        hints = typing.get_type_hints(fn)
        properties, required = {}, []
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            schema = json_schema(hints.get(p.name, inspect.Parameter.empty))
            if p.name in param_docs:
                schema["description"] = param_docs[p.name]
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
            elif p.default is not None and isinstance(p.default, (str, int, float, bool)):
                schema["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
            properties[p.name] = schema
        parameters = {"type": "object", "properties": properties}
        if required:
            parameters["required"] = required
        signature = inspect.signature(fn)
        # a name it does not take: refused, not a TypeError; with **kwargs, any name is taken
        parameters["additionalProperties"] = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        return cls(name or fn.__name__, description or description_doc, parameters, _caller(fn, signature, hints))

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
        except Exception as e:  # noqa: BLE001  — reported to the model, which can retry
            raise ToolError(f"{type(e).__name__}: {error_text(e)}") from None
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


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
    """The JSON Schema subset tools use: type (or a list of types), enum, properties, required,
    additionalProperties: false, items, oneOf/anyOf, nullable. Raises ToolError."""
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
    if "enum" in schema and value not in schema["enum"]:
        raise ToolError(f"{path} must be one of {json.dumps(schema['enum'])}, got {json.dumps(value)}")
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


def load_functions(path: str | Path) -> list[FunctionTool]:
    """The tools a Python file defines: its ``TOOLS`` list if it has one, else every public
    function defined in it. Errors name the file."""
    path = Path(path).expanduser()
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
    except Exception as e:  # noqa: BLE001
        sys.modules.pop(name, None)
        raise ToolError(f"{path}: {type(e).__name__}: {e}") from None
    items = getattr(module, "TOOLS", None)
    if items is None:
        items = [f for name, f in vars(module).items()
                 if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")]
    if not isinstance(items, (list, tuple)):
        raise ToolError(f"{path}: TOOLS must be a list of functions, got {type(items).__name__}")
    tools = []
    for item in items:
        try:
            tools.append(item if isinstance(item, FunctionTool) else FunctionTool.from_callable(item))
        except Exception as e:  # noqa: BLE001  — type hints are the file's code, evaluated here
            why = str(e) if isinstance(e, TypeError) else f"{type(e).__name__}: {e}"
            raise ToolError(f"{path}: {getattr(item, '__name__', repr(item))}: {why}") from None
    if not tools:
        raise ToolError(f"{path}: defines no functions")
    for tool in tools:
        tool.source = path
    return tools
