"""The installable package: the wheel carries the TUI and the kernel sources; the command runs."""

import subprocess
import sys

from gptoss_mlx.testing import wheel as check_wheel


def test_wheel_ships_tui_and_metal_sources(tmp_path):
    names = check_wheel.wheel_files(tmp_path)
    assert check_wheel.check(names) == []


def test_tui_and_metal_import_as_subpackages():
    import gptoss_mlx.metal
    import gptoss_mlx.tui  # noqa: F401
    assert gptoss_mlx.metal.__file__


def test_command_line_version():
    out = subprocess.run([sys.executable, "-m", "gptoss_mlx", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("gptoss-mlx ")
