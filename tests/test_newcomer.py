"""A plain clone's test run says what it skips and why, and the README says how to run it all."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_skips_are_named_with_what_they_need(tmp_path):
    env = {**os.environ, "GPTOSS_MLX_SHARED": str(tmp_path / "nothing")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           "tests/test_cli_render.py"], cwd=ROOT, env=env,  # (one process: 3 workers' start-up)
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


def test_the_readmes_library_example_runs_as_written(tiny_checkpoint, tmp_path, monkeypatch):
    """The README's Library snippet, with the tiny checkpoint for the published one and a short
    reply: every name it imports and calls is there, and the chat it saves reloads (a newcomer
    ran it verbatim with a random model, and it never ended: no max_tokens, helper-152)."""
    readme = (ROOT / "README.md").read_text()
    library = readme[readme.index("## Library"):]
    code = library[library.index("```python\n") + 10:library.index("```\n", library.index("```python"))]
    assert '"openai/gpt-oss-20b"' in code and '"max_tokens": 4096' in code
    code = code.replace('"openai/gpt-oss-20b"', repr(str(tiny_checkpoint))).replace('"max_tokens": 4096', '"max_tokens": 6')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Library)", "exec"), scope)
    assert scope["logits"].shape[-1] == scope["model"].config.vocab_size
    assert [m.role for m in scope["chat"].messages][:1] == ["user"]
    reopened = type(scope["chat"])(scope["model"], scope["tokenizer"])
    reopened.load("chat.json")
    assert [m.text for m in reopened.messages] == [m.text for m in scope["chat"].messages]
