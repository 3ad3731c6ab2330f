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


def run(*argv, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "gptoss_mlx", *argv], capture_output=True, input="hi\n",
                          text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=cwd)


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
    if argv[:2] == ["models", "pull"]:  # it told pull to run pull, or to name a directory (pull takes none)
        assert line.endswith("cannot be downloaded: HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE and run this again")
        return
    assert "is not downloaded and HF_HUB_OFFLINE is set" in line
    assert "gptoss-mlx models pull" in line and "local checkpoint directory" in line


@pytest.mark.parametrize("name", ["../../etc", "a/b/c", "x" * 200])
def test_pull_of_what_is_not_a_repo_id_says_so(cache, name):
    proc = run("models", "pull", name)
    assert proc.returncode == 2
    assert proc.stderr == (f"gptoss-mlx: error: models pull: {name!r} is not a Hugging Face repo id (owner/name, "
                           "e.g. openai/gpt-oss-20b)\n")


@pytest.mark.parametrize("argv", [["generate", "--model", "test/gpt-oss-talks", "-p", "hi", "--max-tokens", "2"],
                                  ["models", "pull", "test/gpt-oss-talks"]])
def test_a_downloaded_model_runs_when_the_hub_cannot_be_reached(cache, tiny_checkpoint, argv):
    """A tester on a plane (no network, HF_HUB_OFFLINE not set): a model in the cache died with
    httpx's ConnectError from the free-disk check's query of the Hub, in every front end."""
    add_to_cache(cache, "test/gpt-oss-talks", {p.name: p for p in tiny_checkpoint.iterdir() if p.is_file()})
    proc = run(*argv, env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_folder_here_named_like_a_repo_is_not_pulled_and_is_named_where_it_is_used(cache, tmp_path):
    """A tester's ./openai/gpt-oss-20b (a broken config.json) made `models pull openai/gpt-oss-20b`
    and `generate --model openai/gpt-oss-20b` fail as if the downloaded repo were damaged."""
    here = tmp_path / "work"
    (here / "test" / "gpt-oss-tiny").mkdir(parents=True)
    (here / "test" / "gpt-oss-tiny" / "config.json").write_text("{")
    pulled = run("models", "pull", "test/gpt-oss-tiny", cwd=here)
    assert pulled.returncode == 0 and "test/gpt-oss-tiny is ready: " + str(cache) in pulled.stdout, pulled.stderr
    used = run("generate", "--model", "test/gpt-oss-tiny", "-p", "hi", cwd=here)
    assert used.returncode == 2
    assert (f"(if you meant the Hugging Face repo test/gpt-oss-tiny: the folder test/gpt-oss-tiny in {here} "
            "is read instead" in used.stderr)


def test_rm_deletes_the_repo(cache):
    unasked = run("models", "rm", "test/gpt-oss-tiny")  # no terminal to ask on, no --yes
    assert unasked.returncode == 2 and "pass --yes to delete test/gpt-oss-tiny" in unasked.stderr
    # one it does not have is said so first (it asked for --yes to delete it: a tester's, helper-152)
    proc = run("models", "rm", "someone/missing")
    assert proc.returncode == 2 and "someone/missing is not in the Hugging Face cache" in proc.stderr
    # another model's repo, which `list` does not show, is not ours to delete (a typo deleted it: helper-150)
    proc = run("models", "rm", "someone/llama", "--yes")
    assert proc.returncode == 2 and ("someone/llama is not a gpt-oss checkpoint (its config.json says model_type "
                                     "'llama'): `models rm` deletes gpt-oss checkpoints only") in proc.stderr
    assert (cache / "models--someone--llama").is_dir()
    proc = run("models", "rm", "openai/gpt-oss-120b", "--yes")
    assert proc.returncode == 0 and "Deleted openai/gpt-oss-120b" in proc.stdout
    assert not (cache / "models--openai--gpt-oss-120b").exists()
    assert "openai/gpt-oss-120b" not in run("models", "list").stdout
    proc = run("models", "rm", "openai/gpt-oss-120b", "--yes")
    assert proc.returncode == 2 and "not in the Hugging Face cache" in proc.stderr


def test_offline_a_damaged_download_is_said_as_it_is_not_as_missing(cache):
    blob = os.path.realpath(cache / "models--test--gpt-oss-tiny" / "snapshots" / COMMIT / "model.safetensors")
    with open(blob, "r+b") as f:
        f.truncate(os.path.getsize(blob) // 2)
    proc = run("generate", "--model", "test/gpt-oss-tiny", "--prompt", "hi")
    assert proc.returncode == 2 and "not downloaded" not in proc.stderr
    assert "truncated" in proc.stderr and "`gptoss-mlx models rm test/gpt-oss-tiny`" in proc.stderr


def test_offline_a_download_whose_ref_is_damaged_is_said_so_not_as_missing(cache):
    """A tester's (helper-131): a ref naming a snapshot that is gone, or a path outside the
    cache, read "is not downloaded ... `models pull`" or huggingface-hub's "Invalid pointer path"."""
    ref = cache / "models--test--gpt-oss-tiny" / "refs" / "main"
    for target, why in (("f" * 40, "no config.json where its ref points"), ("../../../../etc", "Invalid pointer path")):
        ref.write_text(target)
        proc = run("generate", "--model", "test/gpt-oss-tiny", "--prompt", "hi", env={"HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2 and "not downloaded" not in proc.stderr and why in proc.stderr
        assert "is damaged" in proc.stderr and "`gptoss-mlx models rm test/gpt-oss-tiny`" in proc.stderr


def test_a_damaged_download_is_listed_and_can_be_deleted(cache):
    """A blob gone from under its snapshot link: huggingface-hub's scan leaves the repo out, so
    `list` did not show it and `rm` said it was not in the cache while its files stayed."""
    snapshot = cache / "models--test--gpt-oss-tiny" / "snapshots" / COMMIT
    os.remove(os.path.realpath(snapshot / "model.safetensors"))
    listed = run("models", "list")
    assert listed.returncode == 0 and "Damaged downloads" in listed.stdout
    assert f"  test/gpt-oss-tiny: Blob missing (broken symlink): {cache}/models--test--gpt-oss-tiny/blobs/" in listed.stdout
    proc = run("models", "rm", "test/gpt-oss-tiny", "--yes")
    assert proc.returncode == 0 and "Deleted test/gpt-oss-tiny" in proc.stdout, proc.stderr
    assert not (cache / "models--test--gpt-oss-tiny").exists()
    assert "Damaged" not in run("models", "list").stdout


def test_downloads_damaged_in_other_ways_are_listed_too(cache):
    """A ref to a snapshot that is gone, and a gpt-oss config.json that does not load, were left
    out of `list` (the second counted as another model); a folder no repo id names
    (models--..--x) was listed as a damaged '../x' that `rm` then refused."""
    repo = cache / "models--test--gpt-oss-tiny"
    (repo / "refs" / "main").write_text("f" * 40)  # the snapshot it names is not there
    config = GPT_OSS_120B.to_hf_dict()
    add_to_cache(cache, "test/bad-config", {"config.json": json.dumps({**config, "num_hidden_layers": "x"})})
    add_to_cache(cache, "test/cut-config", {"config.json": '{"model_type": "gpt_oss",'})  # cut short
    (cache / "models--..--canary" / "snapshots").mkdir(parents=True)
    listed = run("models", "list")
    assert listed.returncode == 0, listed.stderr
    damaged = listed.stdout.split("Damaged downloads")[1]
    assert "  test/gpt-oss-tiny: Reference(s) refer to missing commit hashes" in damaged
    assert "  test/bad-config: " in damaged and "num_hidden_layers" in damaged
    assert "  test/cut-config: " in damaged
    assert "canary" not in listed.stdout
    assert "(1 other model repo" in listed.stdout  # someone/llama (and the canary folder is not a repo)


def test_a_config_that_is_a_fifo_or_a_device_is_a_damaged_download_not_a_hang(cache):
    """A tester's (helper-131): `models list` read such a config.json whole to tell whose model
    it was: a FIFO blocked it for good, /dev/zero took all memory."""
    for name, make in (("fifo", os.mkfifo), ("zero", lambda p: p.symlink_to("/dev/zero"))):
        make(add_to_cache(cache, f"test/{name}", {"tokenizer.json": "{}"}) / "config.json")
    listed = run("models", "list")
    assert listed.returncode == 0, listed.stderr
    damaged = listed.stdout.split("Damaged downloads")[1]
    assert "test/fifo: " in damaged and "is a FIFO" in damaged
    assert "test/zero: " in damaged and "is a character device" in damaged


def test_a_repo_folder_moved_elsewhere_loses_its_link_and_keeps_its_files(cache, tmp_path):
    moved = tmp_path / "external" / "models--openai--gpt-oss-120b"
    moved.parent.mkdir()
    shutil.move(cache / "models--openai--gpt-oss-120b", moved)
    (cache / "models--openai--gpt-oss-120b").symlink_to(moved)
    proc = run("models", "rm", "openai/gpt-oss-120b", "--yes")
    assert proc.returncode == 0 and f"it was a link to {moved}, whose files stay" in proc.stdout, proc.stderr
    assert not os.path.lexists(cache / "models--openai--gpt-oss-120b") and (moved / "refs" / "main").is_file()


def test_a_cache_that_is_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "hubfile").write_text("")
    for argv in (("models", "list"), ("models", "rm", "a/b", "--yes")):
        proc = run(*argv, env={"HF_HUB_CACHE": str(tmp_path / "hubfile")})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "(the Hugging Face cache, HF_HUB_CACHE) is not a directory" in proc.stderr


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
    # under a file: said before the model loads (was a traceback after it)
    assert main(["models", "convert", str(checkpoints["hf"]), str(tmp_path / "a-file" / "sub"),
                 "--dense-bits", "8"]) == 2
    err = capsys.readouterr().err
    assert "a-file/sub: cannot create it" in err and "Loading" not in err


def test_convert_output_places(checkpoints, tmp_path, monkeypatch, capsys):
    """Readable as mkdir makes directories (mkdtemp's 0700 was kept); a link to an empty
    directory is written through (was a traceback after the work); the current directory is
    refused (was an OSError after the work)."""
    convert = ["models", "convert", str(checkpoints["hf"])]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    umask = os.umask(0o022)
    try:
        assert main([*convert, str(tmp_path / "link"), "--dense-bits", "8"]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "link").is_symlink() and load_model(tmp_path / "real")
    assert (tmp_path / "real").stat().st_mode & 0o777 == 0o755
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main([*convert, ".", "--dense-bits", "8"]) == 2
    assert "the current directory; choose a new directory" in capsys.readouterr().err
    assert list((tmp_path / "here").iterdir()) == []


def test_a_convert_stopped_by_sigterm_cleans_up(checkpoints, tmp_path):
    """SIGTERM (timeout, systemd, docker) left the hidden directory for good: tens of GB for
    120b, hidden from ls. Now it unwinds as Ctrl-C does; one a SIGKILL left is named next time."""
    code = ("import os, signal, sys\nfrom gptoss_mlx.cli import main, models\n"
            "def save(out, tensors):\n    (out / 'w').write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "models.save_weights = save\nsys.exit(main(sys.argv[1:]))")
    out = tmp_path / "q8"
    done = subprocess.run([sys.executable, "-c", code, "models", "convert", str(checkpoints["hf"]), str(out),
                           "--dense-bits", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and list(tmp_path.iterdir()) == [], done.stderr
    (tmp_path / ".q8.partial-killed").mkdir()
    proc = run("models", "convert", str(checkpoints["hf"]), str(out), "--dense-bits", "8")
    assert proc.returncode == 0 and f"note: {tmp_path / '.q8.partial-killed'} was left by a run that was killed" in proc.stderr


def test_an_interrupted_convert_leaves_nothing_in_its_place(checkpoints, tmp_path, monkeypatch):
    """Stopped while it writes: no half-written directory (which never loaded, and stopped the
    same command from running again: "exists and is not empty")."""
    from gptoss_mlx.cli import models

    def interrupted(out, tensors):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(models, "save_weights", interrupted)
    out = tmp_path / "q8"
    assert main(["models", "convert", str(checkpoints["hf"]), str(out), "--dense-bits", "8"]) == 130
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main(["models", "convert", str(checkpoints["hf"]), str(out), "--dense-bits", "8"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q8"] and load_model(out)
    shutil.rmtree(out)


def test_list_plans_an_mlx_conversion_with_its_experts_resident(checkpoints, monkeypatch):
    """An mlx-lm conversion's experts cannot stream: `models list` (and pull) said such a
    checkpoint fit with its experts streamed, where loading it names a larger limit. (The
    20b's shapes on a simulated 16 GB Mac, the tiny checkpoints' layouts.)"""
    from gptoss_mlx.cli.models import fits
    from gptoss_mlx.config import GPT_OSS_20B

    monkeypatch.setenv("GPTOSS_MLX_DEVICE_MEMORY", "10.7GB")
    assert fits(GPT_OSS_20B, checkpoints["hf"]).startswith("yes, experts streamed")
    assert fits(GPT_OSS_20B, checkpoints["mlx"]).startswith("no (needs ")


def test_ctrl_d_at_rms_question_deletes_nothing(cache, monkeypatch, capsys):
    """Ctrl-D at "Delete ...? [y/N]" was an EOFError's traceback (the re-attack, helper-153)."""
    from gptoss_mlx.cli import main

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: (_ for _ in ()).throw(EOFError))
    assert main(["models", "rm", "test/gpt-oss-tiny"]) == 0
    assert "Nothing deleted." in capsys.readouterr().out
    assert (cache / "models--test--gpt-oss-tiny").is_dir()
