"""Tools as the model reads them: JSON Schema -> harmony's TypeScript-like namespaces
(``json_schema_to_typescript`` and ``template_tools_section`` in openai/harmony), and the texts of
the built-in browser and python tools (gpt-oss.md 4.4, 5).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from .messages import ToolNamespace, ToolSpec


def _is_enum(schema: dict) -> bool:
    return isinstance(schema.get("enum"), list) and bool(schema["enum"])


def json_compact(value) -> str:
    """JSON as harmony's serde_json writes it: no spaces, keys in order, floats as Rust prints
    them (``1e-6``, ``1e20``, ``0.000025``, ``3.0``)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json_compact(str(k))}:{json_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(json_compact(v) for v in value) + "]"
    if isinstance(value, float):
        return _rust_float(value)
    return json.dumps(value, ensure_ascii=False)


def _rust_float(x: float) -> str:
    """A float laid out as Rust's ryu does, from Python's shortest round-trip digits."""
    if x != x or x in (float("inf"), float("-inf")):
        return "null"  # serde_json has no NaN or infinity
    sign, digits, exp = Decimal(repr(x)).normalize().as_tuple()
    digits = "".join(map(str, digits)) if x else "0"
    exp = exp if x else 0
    point = len(digits) + exp  # where the decimal point goes, counted from the first digit
    if 0 <= exp and point <= 16:
        text = digits + "0" * exp + ".0"
    elif 0 < point <= 16:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -5 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        mantissa = digits if len(digits) == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{point - 1}"
    return ("-" if sign else "") + text


def _default_comment(schema: dict, enum_as_json: bool = False) -> str:
    """``default: X``; a string in quotes, as it is (no escapes), unless the schema is an enum:
    then bare, or (``enum_as_json``: a oneOf variant outside an object property) as JSON."""
    default = schema["default"]
    if isinstance(default, str) and not _is_enum(schema):
        return f'default: "{default}"'
    if isinstance(default, str) and not enum_as_json:
        return f"default: {default}"
    return f"default: {json_compact(default)}"


def _lines(text: str) -> list[str]:
    """Rust's ``str::lines``: split on "\\n" only, dropping one trailing "\\r" of each line
    and a final empty line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _nullable(schema, type_str: str) -> str:
    if isinstance(schema, dict) and schema.get("nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """harmony's ``json_schema_to_typescript``, quirks included (the model was trained on it)."""
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | "
            out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
            trailing = []
            if isinstance(variant, dict) and isinstance(variant.get("description"), str):
                trailing.append(variant["description"])
            if isinstance(variant, dict) and "default" in variant:
                trailing.append(_default_comment(variant, enum_as_json=True))
            if trailing:
                out += " // " + " ".join(trailing)
        return out
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        enum = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
        return " | ".join(enum) if enum else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        items = schema.get("items")
        return f"{schema_to_typescript(items, indent)}[]" if items is not None else "Array<any>"
    return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = ""
    if isinstance(schema.get("description"), str):
        out += f"{indent}// {schema['description']}\n"
    out += "{\n"
    required = set(r for r in schema.get("required") or [] if isinstance(r, str))
    for key, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        optional = "" if key in required else "?"
        if isinstance(prop.get("title"), str):
            out += f"{indent}// {prop['title']}\n{indent}//\n"
        one_of = prop.get("oneOf")
        if not isinstance(one_of, list) and isinstance(prop.get("description"), str):
            out += f"{indent}// {prop['description']}\n"
        examples = prop.get("examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n"
            for ex in examples:
                if isinstance(ex, str):
                    out += f'{indent}// - "{ex}"\n'
        if isinstance(one_of, list):
            out += _one_of_property(key, optional, prop, one_of, indent)
            continue
        type_str = _nullable(prop, schema_to_typescript(prop, indent + "    "))
        out += f"{indent}{key}{optional}: {type_str},"
        if "default" in prop:
            out += " // " + _default_comment(prop)
        out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key, optional, prop, variants, indent) -> str:
    out = ""
    desc = prop.get("description") if isinstance(prop.get("description"), str) else None
    first = variants[0] if variants and isinstance(variants[0], dict) else {}
    above = desc is not None and first.get("description") != desc
    if above:
        out += f"{indent}// {desc}\n"
    if "default" in prop:
        out += f"{indent}// {_default_comment(prop)}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        variant = variant if isinstance(variant, dict) else {}
        out += f"{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
        trailing = []
        if not (i == 0 and above):
            vdesc = variant.get("description")
            if isinstance(vdesc, str) and vdesc != desc:
                trailing.append(vdesc)
        if "default" in variant:
            trailing.append(_default_comment(variant))
        if trailing:
            out += " // " + " ".join(trailing)
        out += "\n"
    return out + f"{indent},\n"


def tools_section(namespaces: list[ToolNamespace]) -> str:
    """``# Tools`` with one ``## name`` section per namespace (harmony ``template_tools_section``)."""
    sections = ["# Tools"]
    for ns in namespaces:
        lines = [f"## {ns.name}\n"]
        for line in _lines(ns.description or ""):
            lines.append(f"// {line}" if ns.tools else line)
        if ns.tools:
            lines.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                lines.extend(f"// {line}" for line in _lines(tool.description))
                if tool.parameters is not None:
                    lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
                else:
                    lines.append(f"type {tool.name} = () => any;\n")
            lines.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


BROWSER_DESCRIPTION = """Tool for browsing.
The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
Cite information from the tool using the following format:
`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
Do not quote more than 10 words directly from the tool output.
sources=web (default: web)"""

BROWSER_TOOLS = [
    ToolSpec("search", "Searches for information related to `query` and displays `topn` results.", {
        "type": "object",
        "properties": {"query": {"type": "string"}, "topn": {"type": "number", "default": 10},
                       "source": {"type": "string"}},
        "required": ["query"],
    }),
    ToolSpec("open", (
        "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
        "showing `num_lines` lines.\n"
        "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
        "If `cursor` is not provided, the most recent page is implied.\n"
        "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
        "If `loc` is not provided, the viewport will be positioned at the beginning of the "
        "document or centered on the most relevant passage, if available.\n"
        "Use this function without `id` to scroll to a new location of an opened page."), {
        "type": "object",
        "properties": {
            "id": {"type": ["number", "string"], "default": -1},
            "cursor": {"type": "number", "default": -1},
            "loc": {"type": "number", "default": -1},
            "num_lines": {"type": "number", "default": -1},
            "view_source": {"type": "boolean", "default": False},
            "source": {"type": "string"},
        },
    }),
    ToolSpec("find", "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.", {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "cursor": {"type": "number", "default": -1}},
        "required": ["pattern"],
    }),
]

def python_description(timeout_s: float = 120.0,
                       files: str = "The drive at '/mnt/data' can be used to save and persist user files.",
                       internet: str = "UNKNOWN. Depends on the cluster.") -> str:
    """The python tool's description as the model was trained on it (harmony's
    ``ToolNamespaceConfig::python``); a sandbox passes what it really does."""
    return (
        "Use this tool to execute Python code in your chain of thought. The code will not be shown "
        "to the user. This tool should be used for internal reasoning, but not for code that is "
        "intended to be visible to the user (e.g. when creating plots, tables, or files).\n\n"
        "When you send a message containing Python code to python, it will be executed in a "
        "stateful Jupyter notebook environment. python will respond with the output of the "
        f"execution or time out after {timeout_s:.1f} seconds. {files} "
        f"Internet access for this session is {internet}")


PYTHON_DESCRIPTION = python_description()


def browser_namespace() -> ToolNamespace:
    return ToolNamespace("browser", BROWSER_DESCRIPTION, list(BROWSER_TOOLS))


def python_namespace(description: str = PYTHON_DESCRIPTION) -> ToolNamespace:
    return ToolNamespace("python", description, [])

