"""Shared fixtures: small random checkpoints in the published layouts, and the real tokenizer
files from ../shared/data when they are there."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import mlx.core as mx
import pytest

from gptoss_mlx.testing import checkpoints as mtc

ROOT = Path(__file__).resolve().parents[1]

SHARED_DATA = Path(os.environ.get("GPTOSS_MLX_SHARED", ROOT.parent / "shared")) / "data"
TOKENIZER_JSON = SHARED_DATA / "gpt-oss-tokenizer.json.gz"
TIKTOKEN_FILE = SHARED_DATA / "o200k_base.tiktoken"

# float32 tolerance for "the same computation, arranged differently": exact-ish on the CPU;
# CUDA runs float32 matmuls in TF32 (about 1e-3 relative), so the GPU machine needs more room.
FP32_ATOL = 2e-5 if mx.default_device() == mx.cpu else 1e-2

# Small but structurally complete: GQA 8/2, window 8 (shorter than the prompts), 8 experts top-4.
TINY = mtc.TINY.replace(vocab_size=512)


@pytest.fixture(scope="session")
def tiny_config():
    return TINY


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"hf": dir, "original": dir, "mlx": dir, "mlx_q8": dir} holding the same random weights."""
    root = tmp_path_factory.mktemp("ckpt")
    hf = mtc.write_hf(root / "hf", TINY, seed=1, keep=True)
    mtc.write_original(root / "hf" / "original", TINY, hf)
    mtc.write_mlx(root / "mlx", TINY, hf)
    mtc.write_mlx(root / "mlx_q8", TINY, hf, dense_bits=8, group_size=32)
    return {"hf": root / "hf", "original": root / "hf" / "original", "mlx": root / "mlx",
            "mlx_q8": root / "mlx_q8"}


@pytest.fixture(scope="session")
def tokenizer_json():
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"real tokenizer not found: {TOKENIZER_JSON.name} in {SHARED_DATA} "
                    "(set GPTOSS_MLX_SHARED; README, Tests)")
    return TOKENIZER_JSON


@pytest.fixture(scope="session")
def tiny_checkpoint(tokenizer_json, tmp_path_factory):
    """A tiny random checkpoint with the real tokenizer and its full vocabulary (the `checkpoints`
    above have 512 ids: enough for the model tests, not for real text)."""
    ckpt = tmp_path_factory.mktemp("tiny") / "tiny"
    mtc.write_hf(ckpt, mtc.TINY)
    mtc.copy_tokenizer(ckpt, tokenizer_json)
    return ckpt


@pytest.fixture(scope="session")
def tiktoken_file():
    if not TIKTOKEN_FILE.exists():
        pytest.skip(f"o200k_base.tiktoken not found in {SHARED_DATA} "
                    "(set GPTOSS_MLX_SHARED; README, Tests)")
    return TIKTOKEN_FILE


@pytest.fixture(scope="session")
def os_sandbox():
    """The python tool's OS sandbox (bubblewrap on Linux): skip without it, but fail in CI, where
    .ci/run installs it and sets GPTOSS_MLX_REQUIRE_TOOLCHAIN=1."""
    from gptoss_mlx.tools.sandbox import sandbox_problem

    problem = sandbox_problem()
    if problem:
        if os.environ.get("GPTOSS_MLX_REQUIRE_TOOLCHAIN") == "1":
            pytest.fail(f"{problem}, and GPTOSS_MLX_REQUIRE_TOOLCHAIN=1")
        pytest.skip(problem)


def _tokenizer_status() -> str:
    found = "found" if TOKENIZER_JSON.exists() else "MISSING, the tests that need it skip"
    return f"real tokenizer ({TOKENIZER_JSON}): {found}"


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker more than the cores. Much of the suite waits
    on subprocesses, servers, sleeps and sockets, which left two cores a quarter idle with two
    workers (514 s for the suite; 409 s with three)."""
    return (os.cpu_count() or 1) + 1


def pytest_report_header(config):
    return [_tokenizer_status()]


def pytest_terminal_summary(terminalreporter):
    skipped = len(terminalreporter.stats.get("skipped", []))
    if skipped:
        terminalreporter.write_line(f"{skipped} tests skipped; the short test summary names what "
                                    f"each needs. {_tokenizer_status()}. README, Tests, says how "
                                    "to run them all.")


@pytest.fixture(autouse=True)
def _sigint_left_as_it_was():
    """A test that leaves Ctrl-C's handler changed fails (a later test's Ctrl-C would be lost)."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test left SIGINT's handler changed: {after!r}")


@pytest.fixture
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt here, as in a terminal, even where the tests were started
    with SIGINT ignored (an asynchronous command of a non-interactive shell: `pytest &`)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
