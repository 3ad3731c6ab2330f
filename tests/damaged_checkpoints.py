"""Damaged checkpoints for the loading tests: every way a checkpoint directory can be broken
that issue 17 names (file types, safetensors headers, the index, config.json, generation_config,
tokenizer.json, NaN/Inf weights, YaRN ranges), each as a copy of a healthy tiny checkpoint.

    cases = make_damaged(healthy_dir, sharded_dir, out_dir)   # [Case], one directory each
    outcome = try_load(case)                                  # "clear", "unclear", "traceback", ...

Run as a script it builds the healthy checkpoints itself and prints the sweep's counts:

    python tests/damaged_checkpoints.py [--isolate] [--tokenizer PATH/gpt-oss-tokenizer.json.gz]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

TIMEOUT_S = 10  # a load of the tiny checkpoint takes well under a second


@dataclass
class Case:
    name: str
    category: str
    path: Path
    expect: str  # the file or field the one-line message must name
    tokenizer: bool = False  # the damage is in the tokenizer: load it too


# --------------------------------------------------------------------------- safetensors bytes
def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors(path, header, data)


def set_values(path: Path, name: str, value: float, count: int | None = None) -> None:
    """Overwrite the first ``count`` (default all) values of one floating tensor."""
    tensors = mx.load(str(path))
    flat = tensors[name].reshape(-1)
    n = flat.size if count is None else count
    flat = mx.concatenate([mx.full((n,), value, dtype=flat.dtype), flat[n:]])
    tensors[name] = flat.reshape(tensors[name].shape)
    mx.save_safetensors(str(path), tensors)


# --------------------------------------------------------------------------- the damages
SINGLE = "model.safetensors"
BLOCKS = "model.layers.0.mlp.experts.gate_up_proj_blocks"
SCALES = "model.layers.0.mlp.experts.gate_up_proj_scales"
NORM = "model.layers.0.input_layernorm.weight"


def _json_edit(file: str, edit: Callable[[dict], None]):
    def damage(d: Path):
        data = json.loads((d / file).read_text())
        edit(data)
        (d / file).write_text(json.dumps(data))
    return damage


def _config(**changes):
    return _json_edit("config.json", lambda c: c.update(changes))


def _config_drop(*names, **changes):
    def edit(c):
        for n in names:
            c.pop(n, None)
        c.update(changes)
    return _json_edit("config.json", edit)


def _rope(**changes):
    return _json_edit("config.json", lambda c: c["rope_scaling"].update(changes))


def _write(file: str, content: bytes | str):
    def damage(d: Path):
        target = d / file
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def _replace(file: str, make: Callable[[Path], None]):
    def damage(d: Path):
        target = d / file
        if os.path.lexists(target):
            target.unlink()
        make(target)
    return damage


def _fifo(p: Path):
    os.mkfifo(p)


def _socket(p: Path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()


def _loop(p: Path):
    os.symlink(p.name + ".b", p)
    os.symlink(p.name, p.with_name(p.name + ".b"))


def _self_loop(p: Path):
    os.symlink(p.name, p)


def _header(edit: Callable[[dict], None], file: str = SINGLE):
    return lambda d: edit_header(d / file, edit)


def _entry(name: str, **changes):
    return _header(lambda h: h[name].update(changes))


def _overlap(h: dict):
    a, b = h[NORM], h["model.layers.0.post_attention_layernorm.weight"]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + (b["data_offsets"][1] - b["data_offsets"][0])]


def _same_bytes_other_dtype(name: str, dtype: str):
    return _entry(name, dtype=dtype)


def _index(edit: Callable[[dict], None]):
    return _json_edit("model.safetensors.index.json", edit)


def _first_tensor_elsewhere(index: dict):
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]


def _tokenizer_json(data) -> Callable[[Path], None]:
    return _write("tokenizer.json", data if isinstance(data, str) else json.dumps(data))


GOOD_TOKENIZER = {"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}

DAMAGES: list[tuple[str, str, str, Callable[[Path], None], bool]] = [
    # (name, category, expected in the message, damage, needs the tokenizer)
    # ---- file types: never block, never a traceback
    ("weights symlink loop", "files", SINGLE, _replace(SINGLE, _loop), False),
    ("weights symlink to itself", "files", SINGLE, _replace(SINGLE, _self_loop), False),
    ("weights dangling symlink", "files", SINGLE, _replace(SINGLE, lambda p: os.symlink("gone", p)), False),
    ("weights FIFO", "files", SINGLE, _replace(SINGLE, _fifo), False),
    ("weights socket", "files", SINGLE, _replace(SINGLE, _socket), False),
    ("weights -> /dev/zero", "files", SINGLE, _replace(SINGLE, lambda p: os.symlink("/dev/zero", p)), False),
    ("weights -> /dev/null", "files", SINGLE, _replace(SINGLE, lambda p: os.symlink("/dev/null", p)), False),
    ("weights is a directory", "files", SINGLE, _replace(SINGLE, lambda p: p.mkdir()), False),
    ("extra directory named x.safetensors", "files", "extra.safetensors",
     lambda d: (d / "extra.safetensors").mkdir(), False),
    ("empty weights file", "files", SINGLE, _write(SINGLE, b""), False),
    ("config.json FIFO", "files", "config.json", _replace("config.json", _fifo), False),
    ("config.json symlink loop", "files", "config.json", _replace("config.json", _loop), False),
    ("config.json -> /dev/null", "files", "config.json",
     _replace("config.json", lambda p: os.symlink("/dev/null", p)), False),
    ("config.json is a directory", "files", "config.json", _replace("config.json", lambda p: p.mkdir()), False),
    ("generation_config.json FIFO", "files", "generation_config.json",
     _replace("generation_config.json", _fifo), False),
    ("generation_config.json -> /dev/zero", "files", "generation_config.json",
     _replace("generation_config.json", lambda p: os.symlink("/dev/zero", p)), False),
    ("tokenizer.json FIFO", "files", "tokenizer.json", _replace("tokenizer.json", _fifo), True),
    ("tokenizer.json symlink loop", "files", "tokenizer.json: is a symbolic link loop", _replace("tokenizer.json", _loop), True),
    ("tokenizer.json -> /dev/urandom", "files", "tokenizer.json",
     _replace("tokenizer.json", lambda p: os.symlink("/dev/urandom", p)), True),
    # ---- safetensors headers
    ("header length beyond the file", "header", SINGLE,
     lambda d: (d / SINGLE).write_bytes(struct.pack("<Q", 2**40) + (d / SINGLE).read_bytes()[8:]), False),
    ("header is not JSON", "header", SINGLE,
     lambda d: (d / SINGLE).write_bytes((d / SINGLE).read_bytes()[:8] + b"\xff" * 16 + (d / SINGLE).read_bytes()[24:]), False),
    ("header is a JSON list", "header", SINGLE,
     lambda d: write_safetensors(d / SINGLE, [], b""), False),  # type: ignore[arg-type]
    ("__metadata__ is a number", "header", SINGLE, _header(lambda h: h.update(__metadata__=5)), False),
    ("entry is a string", "header", NORM, _header(lambda h: h.update({NORM: "x"})), False),
    ("string data_offsets", "header", NORM, _entry(NORM, data_offsets=["0", "128"]), False),
    ("bool data_offsets", "header", NORM, _entry(NORM, data_offsets=[False, True]), False),
    ("one data_offset", "header", NORM, _entry(NORM, data_offsets=[0]), False),
    ("reversed data_offsets", "header", NORM, _entry(NORM, data_offsets=[128, 0]), False),
    ("data_offsets past the end", "header", NORM, _entry(NORM, data_offsets=[0, 10**12]), False),
    ("overlapping data_offsets", "header", "overlap", _header(_overlap), False),
    ("span disagrees with shape", "header", NORM, _entry(NORM, shape=[65]), False),
    ("negative dimension", "header", NORM, _entry(NORM, shape=[-64]), False),
    ("string shape", "header", NORM, _entry(NORM, shape="64"), False),
    ("unknown dtype", "header", NORM, _entry(NORM, dtype="Q4"), False),
    ("float8 dtype", "header", NORM, _entry(NORM, dtype="F8_E4M3"), False),
    ("blocks declared I8", "dtype", BLOCKS, _same_bytes_other_dtype(BLOCKS, "I8"), False),
    ("scales declared I8", "dtype", SCALES, _same_bytes_other_dtype(SCALES, "I8"), False),
    ("norm declared I16", "dtype", NORM, _same_bytes_other_dtype(NORM, "I16"), False),
    ("norm declared U16", "dtype", NORM, _same_bytes_other_dtype(NORM, "U16"), False),
    ("blocks declared F16 [.., 8]", "dtype", BLOCKS,
     lambda d: edit_header(d / SINGLE, lambda h: h[BLOCKS].update(dtype="F16", shape=h[BLOCKS]["shape"][:-1] + [8])), False),
    ("truncated weights file", "header", SINGLE,
     lambda d: (d / SINGLE).write_bytes((d / SINGLE).read_bytes()[:-1000]), False),
    ("missing tensor", "header", "no tensor for layers.1.self_attn.sinks",
     lambda d: mx.save_safetensors(str(d / SINGLE), {k: v for k, v in mx.load(str(d / SINGLE)).items()
                                                      if k != "model.layers.1.self_attn.sinks"}), False),
    # ---- NaN / Inf weights
    ("NaN layernorm", "values", NORM, lambda d: set_values(d / SINGLE, NORM, math.nan), False),
    ("Inf lm_head", "values", "lm_head", lambda d: set_values(d / SINGLE, "lm_head.weight", math.inf), False),
    ("one NaN in q_proj", "values", "NaN", lambda d: set_values(d / SINGLE, "model.layers.1.self_attn.q_proj.weight", math.nan, 1), False),
    ("one -Inf in the embedding", "values", "embed_tokens",
     lambda d: set_values(d / SINGLE, "model.embed_tokens.weight", -math.inf, 1), False),
    ("MXFP4 scale 255 (NaN)", "values", SCALES,
     lambda d: mx.save_safetensors(str(d / SINGLE), {**mx.load(str(d / SINGLE)), SCALES: mx.full(mx.load(str(d / SINGLE))[SCALES].shape, 255, mx.uint8)}), False),
    # ---- the index (sharded checkpoint)
    ("weight_map is a list", "index", "weight_map", _index(lambda i: i.update(weight_map=[])), False),
    ("weight_map is empty", "index", "weight_map", _index(lambda i: i.update(weight_map={})), False),
    ("weight_map value is a number", "index", "weight_map",
     _index(lambda i: i["weight_map"].update({next(iter(i["weight_map"])): 3})), False),
    ("weight_map escapes the directory", "index", "weight_map",
     _index(lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "../x.safetensors"})), False),
    ("weight_map names /dev/zero", "index", "weight_map",
     _index(lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "/dev/zero"})), False),
    ("weight_map names a missing shard", "index", "model-00009-of-00009.safetensors",
     _index(lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "model-00009-of-00009.safetensors"})), False),
    ("weight_map puts a tensor in the wrong shard", "index", "weight_map", _index(_first_tensor_elsewhere), False),
    ("weight_map lists a tensor no shard has", "index", "weight_map",
     _index(lambda i: i["weight_map"].update({"model.ghost": i["weight_map"]["lm_head.weight"]})), False),
    ("weight_map misses a tensor", "index", "weight_map", _index(lambda i: i["weight_map"].pop("lm_head.weight")), False),
    ("index without weight_map", "index", "weight_map", _index(lambda i: i.pop("weight_map")), False),
    ("index is not JSON", "index", "model.safetensors.index.json", _write("model.safetensors.index.json", "{oops"), False),
    ("index FIFO", "index", "model.safetensors.index.json", _replace("model.safetensors.index.json", _fifo), False),
    # ---- config.json
    ("empty config.json", "config", "config.json", _write("config.json", ""), False),
    ("config.json is not JSON", "config", "config.json", _write("config.json", "{not json"), False),
    ("config.json is a list", "config", "config.json", _write("config.json", "[]"), False),
    ("config.json not UTF-8", "config", "config.json", _write("config.json", b"\xff\xfe{}"), False),
    ("config.json nested 100000 deep", "config", "config.json", _write("config.json", "[" * 100000), False),
    ("rope_scaling is a list", "config", "rope_scaling", _config(rope_scaling=[32.0]), False),
    ("rope_scaling is a string", "config", "rope_scaling", _config(rope_scaling="yarn"), False),
    ("layer_types is an int", "config", "layer_types", _config(layer_types=4), False),
    ("layer_types holds ints", "config", "layer_types", _config(layer_types=[0, 1, 0, 1]), False),
    ("eos_token_id is a float", "config", "eos_token_id", _config(eos_token_id=200002.0), False),
    ("eos_token_id is a string", "config", "eos_token_id", _config(eos_token_id="<|return|>"), False),
    ("eos_token_id is a dict", "config", "eos_token_id", _config(eos_token_id={"a": 1}), False),
    ("rope_theta Infinity", "config", "rope_theta", _config(rope_theta=math.inf), False),
    ("rope_theta NaN", "config", "rope_theta", _config(rope_theta=math.nan), False),
    ("rope_theta is a string", "config", "rope_theta", _config(rope_theta="150000"), False),
    ("rope_theta 1", "config", "rope_theta", _config(rope_theta=1), False),
    ("factor is not numeric", "config", "factor", _rope(factor="abc"), False),
    ("factor is a bool", "config", "factor", _rope(factor=True), False),
    ("factor negative", "config", "rope_scaling_factor", _rope(factor=-2.0), False),
    ("beta_fast is a list", "config", "beta_fast", _rope(beta_fast=[32]), False),
    ("original_max_position_embeddings a string", "config", "original_max_position_embeddings must",
     _rope(original_max_position_embeddings="4096"), False),
    ("hiden_size misspelled", "config", "hidden_size", _config_drop("hidden_size", hiden_size=64), False),
    ("num_hidden_layers missing", "config", "num_hidden_layers", _config_drop("num_hidden_layers"), False),
    ("head_dim is a float", "config", "head_dim", _config(head_dim=16.0), False),
    ("num_key_value_heads 0", "config", "num_key_value_heads", _config(num_key_value_heads=0), False),
    ("sliding_window negative", "config", "sliding_window", _config(sliding_window=-8), False),
    ("quant_method gptq", "config", "quant_method", _config(quantization_config={"quant_method": "gptq", "bits": 4}), False),
    ("quant_method awq", "config", "quant_method", _config(quantization_config={"quant_method": "awq"}), False),
    ("quantization_config is a string", "config", "quantization_config", _config(quantization_config="mxfp4"), False),
    ("YaRN high beyond head_dim/2-1", "config", "YaRN correction range", _rope(beta_slow=1e-4), False),
    ("YaRN low below 0", "config", "YaRN correction range", _rope(beta_fast=1e6), False),
    ("hidden_size disagrees with the weights", "config", SINGLE, _config(hidden_size=128), False),
    ("generation_config.json not JSON", "config", "generation_config.json",
     _write("generation_config.json", "{"), False),
    ("generation_config.json is a list", "config", "generation_config.json",
     _write("generation_config.json", "[1]"), False),
    ("generation eos_token_id is a float", "config", "generation_config.json",
     _json_edit("generation_config.json", lambda g: g.update(eos_token_id=[200002.5])), False),
    ("vocab_size smaller than the tokenizer", "config", "vocab_size is 512", lambda d: None, True),
    # ---- tokenizer.json
    ("empty tokenizer.json", "tokenizer", "tokenizer.json", _tokenizer_json(""), True),
    ("tokenizer.json is not JSON", "tokenizer", "tokenizer.json", _tokenizer_json("{"), True),
    ("tokenizer.json is a list", "tokenizer", "tokenizer.json", _tokenizer_json([]), True),
    ("tokenizer.json without model", "tokenizer", "model", _tokenizer_json({}), True),
    ("model.vocab is a list", "tokenizer", "model.vocab", _tokenizer_json({"model": {"vocab": ["a"]}}), True),
    ("vocab rank is a string", "tokenizer", "model.vocab", _tokenizer_json({"model": {"vocab": {"a": "0"}}}), True),
    ("added_tokens is a dict", "tokenizer", "added_tokens", _tokenizer_json({**GOOD_TOKENIZER, "added_tokens": {}}), True),
    ("added_tokens holds a string", "tokenizer", "added_tokens", _tokenizer_json({**GOOD_TOKENIZER, "added_tokens": ["x"]}), True),
    ("pre_tokenizer is a string", "tokenizer", "pre_tokenizer", _tokenizer_json({**GOOD_TOKENIZER, "pre_tokenizer": "x"}), True),
    ("special token with a wrong id", "tokenizer", "<|start|>",
     _tokenizer_json({**GOOD_TOKENIZER, "added_tokens": [{"content": "<|start|>", "id": 200007}]}), True),
    ("too few ranks", "tokenizer", "tokenizer.json", _tokenizer_json(GOOD_TOKENIZER), True),
    ("not byte-level BPE", "tokenizer", "byte-level", _tokenizer_json({"model": {"vocab": {"\u4e00": 0}}}), True),
    ("truncated tokenizer.json.gz", "tokenizer", "tokenizer.json.gz",
     lambda d: ((d / "tokenizer.json").unlink(), (d / "tokenizer.json.gz").write_bytes(gzip.compress(b'{"model": {}}' * 99)[:-20])), True),
]


def make_damaged(healthy: Path, sharded: Path, out: Path, tokenizer_json: Path | None = None) -> list[Case]:
    """One damaged copy of ``healthy`` (single file) or ``sharded`` (index) per entry of DAMAGES.
    Tokenizer cases get ``tokenizer_json`` copied in first (skipped if it is None)."""
    cases = []
    for k, (name, category, expect, damage, needs_tokenizer) in enumerate(DAMAGES):
        if needs_tokenizer and tokenizer_json is None:
            continue
        base = sharded if category == "index" else healthy
        path = out / f"{k:03d}"
        shutil.copytree(base, path, ignore=shutil.ignore_patterns("original"))
        if needs_tokenizer:
            os.symlink(tokenizer_json, path / "tokenizer.json")  # the real one, 27 MB: link it
        damage(path)
        cases.append(Case(name, category, path, expect, needs_tokenizer))
    return cases


# --------------------------------------------------------------------------- trying them
class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def try_load(case: Case, timeout: int = TIMEOUT_S) -> tuple[str, str]:
    """(outcome, message). outcome: "clear" (one-line error of the package naming the file or
    field), "unclear" (the package's error, without either), "traceback" (any other exception),
    "hang" (still loading after ``timeout`` s), "silent" (loaded, and the first step ran)."""
    import gptoss_mlx
    from gptoss_mlx import generate, loading

    ours = tuple(getattr(m, n) for m, n in [(loading, "CheckpointError"), (gptoss_mlx, "ConfigError"),
                                            (gptoss_mlx, "TokenizerError"), (generate, "NonFiniteLogitsError")]
                 if hasattr(m, n))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        if case.tokenizer:
            model, _ = gptoss_mlx.load(case.path)
        else:
            model = loading.load_model(case.path)
        generate.Engine(model).prefill([1, 2, 3])
        return "silent", ""
    except _Hang:
        return "hang", f"still loading after {timeout} s"
    except ours as e:
        message = str(e)
        clear = "\n" not in message and case.expect.lower() in message.lower()
        return ("clear" if clear else "unclear"), message
    except Exception as e:  # noqa: BLE001 - that is what is being counted
        return "traceback", f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_healthy(root: Path) -> tuple[Path, Path]:
    """(single-file, sharded-with-index) tiny checkpoints holding the same random weights."""
    from gptoss_mlx.testing import checkpoints as mtc

    config = mtc.TINY.replace(vocab_size=512)
    single = root / "healthy"
    mtc.write_hf(single, config, seed=1)
    sharded = root / "sharded"
    mtc.write_hf(sharded, config, seed=1, shard_bytes=150_000)
    return single, sharded


def try_load_isolated(case: Case, timeout: int = TIMEOUT_S) -> tuple[str, str]:
    """try_load in a fresh process with 4 GiB of address space: code that reads /dev/zero to
    its end, or blocks where no signal reaches it, cannot take the sweep down with it."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    argv = [sys.executable, __file__, "--one", case.name, case.category, str(case.path), case.expect]
    argv += ["--with-tokenizer"] if case.tokenizer else []
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30,
                              preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return "hang", f"killed after {timeout + 30} s"
    if done.returncode != 0:
        return "crash", f"exit status {done.returncode}: {done.stderr.strip()[-200:]}"
    outcome, _, message = done.stdout.strip().splitlines()[-1].partition(" ")
    return outcome, message


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt-oss-tokenizer.json.gz"
    parser.add_argument("--tokenizer", type=Path, default=default)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--isolate", action="store_true", help="each case in its own process")
    parser.add_argument("--one", nargs=4, metavar=("NAME", "CATEGORY", "PATH", "EXPECT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--with-tokenizer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        name, category, path, expect = args.one
        outcome, message = try_load(Case(name, category, Path(path), expect, args.with_tokenizer))
        print(outcome, message.replace("\n", " | "))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = None
        if args.tokenizer.exists():
            tokenizer = tmp / "tokenizer.json"
            tokenizer.write_bytes(gzip.decompress(args.tokenizer.read_bytes()))
        single, sharded = make_healthy(tmp)
        cases = make_damaged(single, sharded, tmp / "damaged", tokenizer)
        counts = Counter()
        for case in cases:
            outcome, message = (try_load_isolated if args.isolate else try_load)(case)
            counts[outcome] += 1
            if args.verbose or outcome != "clear":
                print(f"{outcome:9} {case.category:9} {case.name}: {message[:200]}")
    print(f"{len(cases)} damaged checkpoints: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
