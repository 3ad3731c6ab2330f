"""A plain clone's test run says what it skips and why, and the README says how to run it all."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_skips_are_named_with_what_they_need(tmp_path):
    env = {**os.environ, "GPTOSS_MLX_SHARED": str(tmp_path / "nothing")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_cli_render.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    out = proc.stdout
    assert f"real tokenizer ({tmp_path / 'nothing' / 'data'}" in out and "MISSING" in out
    assert "SKIPPED" in out and "set GPTOSS_MLX_SHARED; README, Tests" in out
    assert "tests skipped; the short test summary names what each needs" in out
    assert "README, Tests, says how to run them all" in out


def test_readme_says_what_each_skip_needs():
    readme = (ROOT / "README.md").read_text()
    tests = readme[readme.index("### Tests"):]
    for need in ("GPTOSS_MLX_SHARED", "gpt-oss-tokenizer.json.gz", "o200k_base.tiktoken",
                 "clang", "g++", "GPTOSS_MLX_REQUIRE_TOOLCHAIN=1", "-ra"):
        assert need in tests, need
