"""The package's import graph: no module imports one that imports it back (issue 18, item 3)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gptoss_mlx": ROOT / "gptoss_mlx", "gptoss_mlx.tui": ROOT / "tui"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module ``name`` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycles():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # a module reaching up to its own package (`from .. import __version__`) finds it already
    # imported: Python imports every parent before the child, so that edge is no circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_subcommands_point_down():
    """Only gptoss_mlx.cli assembles the subcommands; none imports another one or the package."""
    modules = module_files()
    subcommands = {"gptoss_mlx.cli.render", "gptoss_mlx.cli.chat", "gptoss_mlx.cli.generate",
                   "gptoss_mlx.cli.tui", "gptoss_mlx.cli.doctor"}
    for name in subcommands:
        assert name in modules, f"{name} missing: one module per subcommand"
        imported = imports_of(name, modules[name], modules)
        assert not imported & (subcommands | {"gptoss_mlx.cli"}), (name, imported)
