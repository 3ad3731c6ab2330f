"""The package's shape: what importing it loads, and the forward pass's modules importing down only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import gptoss_mlx

PACKAGE = Path(gptoss_mlx.__file__).parent


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_importing_the_library_loads_no_test_machinery():
    """A user's `import gptoss_mlx` (and the model, and Chat) loads neither the kernels' proving
    machinery (clang check, emulator, sample inputs, checkpoint writer) nor numpy."""
    modules = _loaded_after("import gptoss_mlx, gptoss_mlx.model, gptoss_mlx.chat")
    assert "gptoss_mlx.model" in modules and "gptoss_mlx.kernels.registry" in modules
    assert [m for m in modules if m.startswith("gptoss_mlx.testing")] == []
    assert [m for m in modules if m == "numpy" or m.startswith("numpy.")] == []


def test_the_test_machinery_is_importable_and_runnable():
    modules = _loaded_after("import gptoss_mlx.testing.toolchain, gptoss_mlx.testing.samples")
    assert "gptoss_mlx.testing.toolchain" in modules
    out = subprocess.run([sys.executable, "-m", "gptoss_mlx.testing.checkpoints", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--preset" in out.stdout


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The gptoss_mlx modules a module imports (anywhere in it): ``from . import ops`` imports
    gptoss_mlx.ops, ``from .config import X`` gptoss_mlx.config."""
    module = "gptoss_mlx." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("gptoss_mlx"):
                submodules = {f"{target}.{a.name}" for a in node.names} & modules
                found.update(submodules or {target})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gptoss_mlx"))
    return found


def test_the_forward_pass_imports_down_only():
    """No import cycle among the modules the model reaches (model, ops, kernels, cache, config),
    and none of them reaches the test machinery."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        name = "gptoss_mlx." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    graph = {name: _imports(path, set(files)) & set(files) - {name} for name, path in files.items()}

    reached, stack = set(), ["gptoss_mlx.model"]
    while stack:
        name = stack.pop()
        if name not in reached:
            reached.add(name)
            stack.extend(graph[name])
    assert "gptoss_mlx.ops" in reached and "gptoss_mlx.kernels.moe" in reached
    assert not [m for m in reached if m.startswith("gptoss_mlx.testing")]
    assert graph["gptoss_mlx.ops"] == set()  # a leaf

    def cycle_from(node, path):
        for nxt in graph[node]:
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt in reached and (found := cycle_from(nxt, path + [nxt])):
                return found
        return None

    for start in sorted(reached):
        assert cycle_from(start, [start]) is None, f"import cycle: {' -> '.join(cycle_from(start, [start]))}"
