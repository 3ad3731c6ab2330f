"""`gptoss-mlx models list|pull|rm|convert` against a fake local Hugging Face cache laid out as
the hub lays it out (blobs, refs, snapshot symlinks); HF_HUB_OFFLINE=1 throughout, so nothing
here can reach the network. Also: chat/generate read config.json before any weights."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from gptoss_mlx import hub, memory
from gptoss_mlx.cli import main
from gptoss_mlx.config import GPT_OSS_120B
from gptoss_mlx.loading import find_layout, load, load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path | str]) -> Path:
    """Lay ``files`` (name in the repo -> local file or text) out as huggingface-hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, source in files.items():
        data = source.read_bytes() if isinstance(source, Path) else source.encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture()
def cache(tmp_path, checkpoints, monkeypatch):
    cache = tmp_path / "hub"
    tiny = checkpoints["hf"]
    add_to_cache(cache, "test/gpt-oss-tiny",
                 {p.name: p for p in tiny.iterdir() if p.is_file()})
    add_to_cache(cache, "openai/gpt-oss-120b",  # its config alone: a pull that was refused
                 {"config.json": json.dumps(GPT_OSS_120B.to_hf_dict())})
    add_to_cache(cache, "someone/llama", {"config.json": '{"model_type": "llama"}'})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def run(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "gptoss_mlx", *argv], capture_output=True, input="hi\n",
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_list_shows_repo_revision_size_layout_and_fit(cache):
    proc = run("models", "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    tiny = next(line for line in lines if line.startswith("test/gpt-oss-tiny"))
    assert f"{COMMIT[:8]} (main)" in tiny and " MB " in tiny and "  hf  " in tiny
    assert "yes (" in tiny
    big = next(line for line in lines if line.startswith("openai/gpt-oss-120b"))
    assert "incomplete" in big and "no safetensors" not in big
    assert "(1 other model repo in the cache not shown)" in proc.stdout
    assert lines[0].split()[:4] == ["REPO", "REVISION", "SIZE", "LAYOUT"]


def test_list_says_when_a_model_fits_only_with_its_experts_streamed(cache):
    # 120b on a 64 GB Mac (48 GB for the GPU): it runs, with part of its experts on the GPU
    proc = run("models", "list", env={"GPTOSS_MLX_DEVICE_MEMORY": "48GB"})
    assert proc.returncode == 0, proc.stderr
    big = next(line for line in proc.stdout.splitlines() if line.startswith("openai/gpt-oss-120b"))
    assert "yes, experts streamed (" in big and "of 4608 on the GPU" in big, big
    proc = run("models", "list", env={"GPTOSS_MLX_DEVICE_MEMORY": "3GB"})
    big = next(line for line in proc.stdout.splitlines() if line.startswith("openai/gpt-oss-120b"))
    assert "no (needs " in big, big


def test_pull_of_a_cached_checkpoint_is_ready(cache):
    proc = run("models", "pull", "test/gpt-oss-tiny")
    assert proc.returncode == 0, proc.stderr
    assert "test/gpt-oss-tiny is ready" in proc.stdout and "fits at" in proc.stdout


def test_pull_checks_memory_before_downloading(cache, monkeypatch, capsys):
    monkeypatch.setattr(memory, "device_limit", lambda: (3e9, "test limit"))
    monkeypatch.setattr("gptoss_mlx.cli.common.resolve_checkpoint",
                        lambda *a: pytest.fail("weights fetched before the memory plan"))
    assert main(["models", "pull", "openai/gpt-oss-120b"]) == 2
    err = capsys.readouterr().err
    assert "the model will not fit in 3.00 GB (test limit)" in err


def test_pull_checks_free_disk_before_downloading(cache, monkeypatch, capsys):
    monkeypatch.setattr(hub, "download_bytes", lambda repo: 10**15)
    monkeypatch.setattr("gptoss_mlx.cli.common.resolve_checkpoint",
                        lambda *a: pytest.fail("download started without disk space"))
    assert main(["models", "pull", "openai/gpt-oss-120b", "--no-memory-check"]) == 2
    assert "needs 1000000.0 GB more on disk" in capsys.readouterr().err


def test_generate_plans_memory_from_config_before_fetching_weights(cache, monkeypatch, capsys):
    monkeypatch.setattr(memory, "device_limit", lambda: (3e9, "test limit"))
    assert main(["generate", "--model", "openai/gpt-oss-120b", "-p", "hi"]) == 2
    assert "the model will not fit" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["models", "pull", "openai/gpt-oss-20b"],
                                  ["models", "pull", "openai/gpt-oss-120b", "--no-memory-check"],
                                  ["generate", "-p", "hi"],
                                  ["chat", "--model", "nobody/missing"]])
def test_offline_without_the_model_is_one_clear_line(cache, argv):
    proc = run(*argv)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "is not downloaded and HF_HUB_OFFLINE is set" in line
    assert "gptoss-mlx models pull" in line and "--model" in line


def test_rm_deletes_the_repo(cache):
    assert run("models", "rm", "someone/llama").returncode == 2  # no terminal to ask on, no --yes
    proc = run("models", "rm", "openai/gpt-oss-120b", "--yes")
    assert proc.returncode == 0 and "Deleted openai/gpt-oss-120b" in proc.stdout
    assert not (cache / "models--openai--gpt-oss-120b").exists()
    assert "openai/gpt-oss-120b" not in run("models", "list").stdout
    proc = run("models", "rm", "openai/gpt-oss-120b", "--yes")
    assert proc.returncode == 2 and "not in the Hugging Face cache" in proc.stderr


@pytest.mark.parametrize("bits", [8, 4])
def test_convert_saves_quantized_dense_layers_loadable_as_any_checkpoint(checkpoints, tmp_path,
                                                                        bits, capsys):
    out = tmp_path / f"q{bits}"
    assert main(["models", "convert", str(checkpoints["hf"]), str(out), "--dense-bits", str(bits)]) == 0
    assert f"--model {out}" in capsys.readouterr().out
    assert find_layout(out)[0] == "mlx"
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == bits
    converted = load_model(out)
    at_load = load_model(checkpoints["hf"], dense_bits=bits)
    tokens = mx.array([[1, 5, 7, 300, 2, 9]])
    assert mx.array_equal(converted(tokens, cache=converted.make_cache()),
                          at_load(tokens, cache=at_load.make_cache()))
    assert main(["models", "convert", str(checkpoints["hf"]), str(out), "--dense-bits", "8"]) == 2
    assert main(["models", "convert", str(out), str(tmp_path / "again"), "--dense-bits", "8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    other = 4 if bits == 8 else 8  # its dense layers cannot be loaded at other bits: the plan would count those
    with pytest.raises(ValueError, match=f"stored {bits}-bit"):
        load(out, dense_bits=other)
    assert main(["generate", "-m", str(out), "-p", "hi", "--dense-bits", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"stored {bits}-bit" in err and "Memory plan" not in err  # no plan of bits it has not
    (tmp_path / "a-file").write_text("")
    assert main(["models", "convert", str(checkpoints["hf"]), str(tmp_path / "a-file"), "--dense-bits", "8"]) == 2
    assert "a-file: exists and is a file" in capsys.readouterr().err  # was a NotADirectoryError traceback
    shutil.rmtree(out)
