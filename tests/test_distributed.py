"""The model split over processes with mx.distributed's ring backend on 127.0.0.1, each process
started the way mlx.launch starts it (MLX_HOSTFILE, MLX_RANK): greedy chats equal to one
process's, each rank holding and reading only its share, and a killed rank ending the others."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, strategies as st

from gptoss_mlx import distributed
from gptoss_mlx.loading import load_model
from gptoss_mlx.model import Model
from gptoss_mlx.testing import checkpoints as mtc

WORKER = Path(__file__).with_name("distributed_worker.py")
# 4 KV heads and 8 experts: both 2 and 4 ranks split them evenly.
CONFIG = mtc.TINY.replace(num_key_value_heads=4)
TURNS = 3
# Tensor parallel: each rank's o_proj and experts make a partial sum that the all-reduce adds,
# in another order than one process's single matmul accumulates; float32 keeps that to rounding.
TENSOR_ATOL = 1e-4
TIMEOUT_S = 240  # the machines we test on are shared: 4 processes may take a while to start


@pytest.fixture(scope="module")
def checkpoint(tokenizer_json, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("dist") / "tiny"
    mtc.write_hf(ckpt, CONFIG, seed=3)
    mtc.copy_tokenizer(ckpt, tokenizer_json)
    return ckpt


def free_ports(n: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ring_environments(n: int, tmp_path: Path) -> list[dict]:
    """Each rank's environment for a ring of ``n`` on 127.0.0.1, as mlx.launch sets it."""
    hostfile = tmp_path / f"hosts{n}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(n)]))
    return [{**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)} for rank in range(n)]


def launch(n: int, command: list[str], tmp_path: Path, **popen) -> list[subprocess.Popen]:
    """``command`` in ``n`` processes joined by the ring backend."""
    return [subprocess.Popen(command, env=env, **popen) for env in ring_environments(n, tmp_path)]


def wait_all(processes: list[subprocess.Popen]) -> None:
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * len(processes)


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    subprocess.run([sys.executable, str(WORKER), str(checkpoint), str(out), "tensor"], check=True,
                   timeout=TIMEOUT_S)
    return mx.load(f"{out}-tensor.safetensors"), held(out, "tensor", 0)


def held(out: Path, sharding: str, rank: int) -> dict:
    return json.loads(Path(f"{out}-{sharding}.rank{rank}.json").read_text())


def layer_bytes(held: dict, *pieces: str) -> int:
    return sum(b for name, b in held.items() if name.startswith("layers.") and any(p in name for p in pieces))


@pytest.mark.parametrize("n", [2, 4])
def test_ranks_chat_as_one_process(n, checkpoint, one_process, tmp_path):
    out = tmp_path / "run"
    wait_all(launch(n, [sys.executable, str(WORKER), str(checkpoint), str(out), "tensor,pipeline"],
                    tmp_path))
    reference, whole = one_process
    for sharding in ("pipeline", "tensor"):
        result = mx.load(f"{out}-{sharding}.safetensors")
        for turn in range(TURNS):
            assert result[f"tokens{turn}"].tolist() == reference[f"tokens{turn}"].tolist(), (sharding, turn)
            assert result[f"reused{turn}"].item() == reference[f"reused{turn}"].item()
            logits, expected = result[f"logits{turn}"], reference[f"logits{turn}"]
            if sharding == "pipeline":  # the same operations in the same order: bit for bit
                assert mx.array_equal(logits, expected).item(), turn
            else:
                assert mx.allclose(logits, expected, rtol=0, atol=TENSOR_ATOL).item(), turn
        assert reference["reused1"].item() > 0 and reference["reused2"].item() > 0  # the cache was reused

    full = whole["held"]
    ranks = {s: [held(out, s, r) for r in range(n)] for s in ("tensor", "pipeline")}
    for rank, part in enumerate(ranks["tensor"]):
        for piece in (".experts.", ".qkv_proj.", ".o_proj.weight", ".sinks"):
            assert layer_bytes(part["held"], piece) * n == layer_bytes(full, piece), (rank, piece)
        assert ("lm_head.weight" in part["held"]) == (rank == 0)
        if rank > 0:  # it never held the whole model, not even while reading it
            assert part["peak"] < sum(full.values())
    for rank, part in enumerate(ranks["pipeline"]):
        start, stop = distributed.pipeline_layers(CONFIG.num_hidden_layers, rank, n)
        assert layer_bytes(part["held"], "") * CONFIG.num_hidden_layers == layer_bytes(full, "") * (stop - start)
        assert ("embed_tokens.weight" in part["held"]) == (rank == n - 1)
        assert ("lm_head.weight" in part["held"]) == (rank == 0)
        assert part["peak"] < sum(full.values())


def test_the_quiet_excepthook_is_installed_once():
    # each Watchdog installs it; a second layer would make a real failure wait twice as long
    once = distributed._quiet_while_dying(sys.excepthook)
    assert distributed._quiet_while_dying(once) is once and once is not sys.excepthook


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_rank_stops_the_others(killed, checkpoint, tmp_path):
    """gptoss-mlx serve on two ranks: rank 0 waits for requests, rank 1 inside a collective.
    Killing either ends the other within seconds, with one line naming what happened."""
    port = free_ports(1)[0]
    command = [sys.executable, "-m", "gptoss_mlx", "serve", "--model", str(checkpoint),
               "--port", str(port), "--max-context", "256"]
    ranks = launch(2, command, tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _serving(port):
            assert time.monotonic() < deadline and all(p.poll() is None for p in ranks)
            time.sleep(0.5)
        ranks[killed].send_signal(signal.SIGKILL)
        other = ranks[1 - killed]
        other.wait(timeout=distributed.HEARTBEAT_TIMEOUT_S)
        stderr = other.stderr.read()
        assert other.returncode == 1
        assert f"gptoss-mlx: error: rank {killed} exited; rank {1 - killed} stops too" in stderr
        assert "Traceback" not in stderr
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()


def _serving(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_split_that_does_not_divide_is_refused_naming_the_numbers():
    config = mtc.TINY  # 2 KV heads, 8 experts, 4 layers
    with pytest.raises(ValueError, match=r"over 4 ranks splits the 2 KV heads and the 8 experts"):
        distributed.check_shardable(config, 4, "tensor")
    with pytest.raises(ValueError, match=r"over 5 ranks needs at least 5 layers; this model has 4"):
        distributed.check_shardable(config, 5, "pipeline")
    distributed.check_shardable(config, 2, "tensor")
    distributed.check_shardable(config, 4, "pipeline")


def test_pipeline_over_nccl_is_refused_before_loading(monkeypatch):
    """MLX's NCCL backend has no send or receive ("[nccl] Recv not supported", measured on two
    H200s): the split is refused up front, with the way out, by the CLI and by Model.shard."""
    with pytest.raises(ValueError, match=r"NCCL backend has no send or receive; use --sharding tensor"):
        distributed.check_shardable(mtc.TINY, 2, "pipeline", "nccl")
    distributed.check_shardable(mtc.TINY, 2, "tensor", "nccl")
    distributed.check_shardable(mtc.TINY, 2, "pipeline", "ring")
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("NCCL_HOST_IP", "127.0.0.1")

    class Pair:  # a group of two, as mx.distributed.init returns over NCCL
        size, rank = staticmethod(lambda: 2), staticmethod(lambda: 0)

    model = Model(mtc.TINY)
    with pytest.raises(ValueError, match="NCCL backend has no send or receive"):
        model.shard(Pair(), "pipeline")


@given(layers=st.integers(1, 120), size=st.integers(1, 16))
def test_pipeline_stages_cover_every_layer_once(layers, size):
    if size > layers:
        return
    ranges = [distributed.pipeline_layers(layers, rank, size) for rank in reversed(range(size))]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_auto_sharding_is_pipeline_over_tcp_and_tensor_over_rdma():
    assert distributed.choose_sharding("auto", "ring") == "pipeline"
    assert distributed.choose_sharding("auto", "jaccl") == "tensor"
    assert distributed.choose_sharding("auto", "nccl") == "tensor"
    assert distributed.choose_sharding("tensor", "ring") == "tensor"


@pytest.mark.parametrize("layout", ["hf", "original", "mlx_q8"])
@pytest.mark.parametrize("sharding,size", [("tensor", 2), ("pipeline", 2), ("pipeline", 3)])
def test_each_rank_reads_its_part_of_every_layout(layout, sharding, size, checkpoints):
    """What a rank reads from the files (rows alone) is the part of the whole model that
    Model.shard keeps of a loaded one. (Reading needs no messages: a stand-in group will do.)"""
    model = load_model(checkpoints[layout], mx.float32)
    whole, config = dict(nn.utils.tree_flatten(model.parameters())), model.config
    for rank in range(size):
        group = SimpleNamespace(rank=lambda r=rank: r, size=lambda: size)
        part = dict(nn.utils.tree_flatten(
            load_model(checkpoints[layout], mx.float32, group=group, sharding=sharding).parameters()))
        expected = {p.name: p.take(whole[name]) for name in whole
                    if (p := distributed.shard_part(config, name, rank, size, sharding))}
        assert part.keys() == expected.keys()
        for name, value in part.items():
            assert mx.array_equal(value, expected[name]).item(), (layout, rank, name)


def test_a_rank_that_cannot_connect_gives_up_saying_so(tmp_path):
    """Rank 0 of two, and rank 1 never starts: it exits with one line instead of waiting."""
    code = "from gptoss_mlx import distributed; distributed.init(timeout_s=3)"
    rank0 = subprocess.Popen([sys.executable, "-c", code], env=ring_environments(2, tmp_path)[0],
                             stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = rank0.communicate(timeout=60)
    finally:
        rank0.kill()  # not left behind when it fails
    assert rank0.returncode != 0  # killed: MLX does not let go while it connects
    assert "gptoss-mlx: error: rank 0 could not connect to the other ranks within 3s" in stderr


def test_a_rank_gone_while_it_connects_leaves_nothing_behind(tmp_path):
    """Killed (kill -9, or Ctrl-C, which ends it at once: no Python handler can run while MLX
    connects), its connect timer neither says it could not connect nor kills anything later."""
    code = "from gptoss_mlx import distributed; distributed.init(timeout_s=3.25)"
    timers = ("pgrep", "-f", "^sleep 3.25$")  # each connecting rank's timer: the shell's sleep
    signals = (signal.SIGKILL, signal.SIGINT)
    logs = [tmp_path / f"stderr{sig}" for sig in signals]
    for sig in signals:
        (tmp_path / str(sig)).mkdir()
    ranks = [subprocess.Popen([sys.executable, "-c", code], env=ring_environments(2, tmp_path / str(sig))[0],
                              stderr=open(log, "w"), start_new_session=True)
             for sig, log in zip(signals, logs)]
    deadline = time.monotonic() + TIMEOUT_S
    while len(subprocess.run(timers, capture_output=True, text=True).stdout.split()) < len(ranks):
        assert time.monotonic() < deadline and all(r.poll() is None for r in ranks)
        time.sleep(0.05)
    for rank, sig in zip(ranks, signals):  # both are connecting now
        rank.send_signal(sig)
        assert rank.wait(timeout=2) == -sig
    time.sleep(0.5)
    # the timers' shells (each names its rank's pid last: other tests' ranks may be connecting
    # meanwhile), and their sleeps (this test's alone sleep 3.25)
    for left in [f"could not connect to the other ranks.* {rank.pid}$" for rank in ranks] + ["^sleep 3.25$"]:
        assert not subprocess.run(["pgrep", "-f", left], capture_output=True, text=True).stdout.strip()
    time.sleep(3.25)  # past the timeout
    for log in logs:
        assert "could not connect" not in log.read_text()


def test_piped_input_under_mlx_launch_ends_without_its_end(monkeypatch):
    """mlx.launch passes its input on to rank 0 but never closes it: `echo hi | mlx.launch ...
    gptoss-mlx chat` waited forever for the end of its input. Under it, a quiet second ends it."""
    from gptoss_mlx.cli import common

    read, write = os.pipe()
    os.write(write, "Why is the sky blue?\nAnd the sea?\n".encode())  # left open, as mlx.launch does
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", "hosts.json")
    with open(read, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        started = time.monotonic()
        assert common.read_standard_input() == "Why is the sky blue?\nAnd the sea?\n"
        assert time.monotonic() - started < common.PIPE_QUIET_S + 2
    os.close(write)


@pytest.mark.parametrize("hosts", ["[]", "{}", "[[]]", '["127.0.0.1:5000"]'])
def test_a_hostfile_without_each_ranks_addresses_is_refused(tmp_path, hosts):
    """MLX itself dies of SIGFPE on [] and {}, and raises a bare ValueError on [[]]."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(hosts)
    code = "from gptoss_mlx import distributed; distributed.init(timeout_s=3)"
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert f"{hostfile} (MLX_HOSTFILE) must list each rank's addresses" in done.stderr


@pytest.mark.parametrize("content, says", [(None, "No such file or directory"), ("[[", "is not JSON")])
def test_a_hostfile_that_is_missing_or_no_json_is_said_so(tmp_path, content, says):
    """A tester's (helper-130): MLX's own message was its JSON parser's, of an empty input."""
    hostfile = tmp_path / "hosts.json"
    if content is not None:
        hostfile.write_text(content)
    code = "from gptoss_mlx import distributed; distributed.init(timeout_s=3)"
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert f"{hostfile} (MLX_HOSTFILE)" in done.stderr and says in done.stderr, done.stderr


def test_an_adapter_on_a_follower_is_refused_as_on_rank_0(monkeypatch):
    """A tester's (helper-130): --adapter on rank 1 alone was ignored (followers load with
    load_model), the run exiting 0 with the base model's output; on rank 0 it is refused."""
    from types import SimpleNamespace

    from gptoss_mlx.cli import common

    monkeypatch.setattr(common, "group_of", lambda args: SimpleNamespace(rank=lambda: 1, size=lambda: 2))
    monkeypatch.setattr(common, "prepare", lambda *a: pytest.fail("loaded"))
    with pytest.raises(common.CLIError, match="adapters are not applied across machines yet"):
        common.follow_rank0(SimpleNamespace(adapter="my-adapter"))


@pytest.mark.parametrize("problem", ["no checkpoint", "other options", "other weights", "other config",
                                     "other dense bits", "other attention"])
def test_a_rank_that_cannot_follow_stops_rank_0(problem, checkpoint, tokenizer_json, tmp_path):
    """Rank 1 cannot find its checkpoint, or was started with other options than rank 0, or
    with another model of the same shape (which would run, and answer nonsense): it says so
    and exits, and rank 0 does not wait for it in a collective forever."""
    generate = [sys.executable, "-m", "gptoss_mlx", "generate", "--prompt", "hi", "--model"]
    rank0 = generate + [str(checkpoint), "--sharding", "pipeline"]
    if problem == "no checkpoint":
        rank1, said = generate + [str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such directory"
    elif problem == "other options":
        rank1 = generate + [str(checkpoint), "--sharding", "tensor"]
        said = "rank 1 does not run what rank 0 runs (sharding (1 tensor, 2 pipeline) 1 here, 2 on rank 0)"
    elif problem in ("other weights", "other config"):
        other = tmp_path / "other"
        if problem == "other weights":
            mtc.write_hf(other, CONFIG, seed=4)
            said = "rank 1 does not run what rank 0 runs (weights (a checksum of its tensors) "
        else:  # the same weights, another rope_theta: the same shape, other answers
            mtc.write_hf(other, CONFIG.replace(rope_theta=7 * CONFIG.rope_theta), seed=3)
            said = "rank 1 does not run what rank 0 runs (config (a checksum of its values) "
        mtc.copy_tokenizer(other, tokenizer_json)
        rank1 = generate + [str(other), "--sharding", "pipeline"]
    elif problem == "other attention":  # a fine-tune fused into the attention alone: the checksum's
        # blocks spread over the whole file missed it, and the two ranks answered as neither model
        other = tmp_path / "other"
        shutil.copytree(checkpoint, other)
        weights = other / "model.safetensors"
        with open(weights, "r+b") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
            f.seek(8)
            info = json.loads(f.read(start - 8))["model.layers.0.self_attn.q_proj.weight"]
            begin, end = info["data_offsets"]
            f.seek(start + begin + (end - begin) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
        rank1 = generate + [str(other), "--sharding", "pipeline"]
        said = "rank 1 does not run what rank 0 runs (weights (a checksum of its tensors) "
    else:
        rank1 = generate + [str(checkpoint), "--sharding", "pipeline", "--dense-bits", "8"]
        said = "rank 1 does not run what rank 0 runs (dense bits 8 here, 16 on rank 0)"
    ranks = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
             for command, env in zip((rank0, rank1), ring_environments(2, tmp_path))]
    try:
        errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [1, 2]
    assert "gptoss-mlx: error: rank 1 exited; rank 0 stops too" in errors[0]
    assert f"gptoss-mlx: error: {said}" in errors[1]
