"""Build the wheel of this checkout and check it ships the TUI as gptoss_mlx.tui, the Metal
kernel sources and the server's playground page.

    python -m gptoss_mlx.testing.wheel [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (an editable install)


def wheel_files(out: Path) -> list[str]:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
    )
    (wheel,) = out.glob("gptoss_mlx-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def check(names: list[str]) -> list[str]:
    problems = []
    for required in ("gptoss_mlx/__init__.py", "gptoss_mlx/tui/__init__.py",
                     "gptoss_mlx/metal/__init__.py", "gptoss_mlx/kernels/__init__.py",
                     "gptoss_mlx/metal/msl_cuda.h", "gptoss_mlx/metal/README.md",
                     "gptoss_mlx/tui/app.py", "gptoss_mlx/tui/app.tcss", "gptoss_mlx/store.py",
                     "gptoss_mlx/cli/__init__.py", "gptoss_mlx/cli/chat.py"):
        if required not in names:
            problems.append(f"missing {required}")
    metal_sources = sorted(p.name for p in (ROOT / "metal").glob("*.metal"))
    metal_sources += sorted(p.name for p in (ROOT / "metal").glob("*.h"))
    for name in metal_sources:
        if f"gptoss_mlx/metal/{name}" not in names:
            problems.append(f"missing kernel source gptoss_mlx/metal/{name}")
    for asset in sorted((ROOT / "gptoss_mlx" / "server" / "playground" / "static").iterdir()):
        if f"gptoss_mlx/server/playground/static/{asset.name}" not in names:
            problems.append(f"missing playground file gptoss_mlx/server/playground/static/{asset.name}")
    if not any(n.endswith("entry_points.txt") for n in names):
        problems.append("no entry_points.txt (the gptoss-mlx command)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = wheel_files(args.out or Path(tmp))
    problems = check(names)
    for p in problems:
        print(p)
    print("wheel OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
