#!/usr/bin/env python3
"""GPU time of a decode token, kernel by kernel, from Nsight Compute: ours (every kernel; its step
built per token, and compiled), ours with GPTOSS_MLX_KERNELS=off, and mlx-lm, on the same
checkpoint in one profiled process.

    python scripts/profile_decode.py --dir /tmp/g20 [--make --preset 20b] [--steps 4] [--top 18]
    python scripts/profile_decode.py --from-csv ncu.csv --steps 4   # the table from a saved ncu run
    python scripts/profile_decode.py --host [--steps 50]            # host time per token, any machine

Each engine prefills the same 128-token prompt, decodes two tokens (compiles, checks the
kernels), then decodes ``--steps`` more between two marker kernels; ``ncu --csv --clock-control
none --metrics gpu__time_duration.sum`` times every kernel. The table gives per token: kernels,
GPU time, the bytes a token must read (weights of the dense layers and of the chosen experts,
one embedding row, the KV cache) over that time, and the time and count of each kernel family
(a family: the kernel's function name, our kernels by their metal/ name, with the grid when one
name runs at several grids — qkv, o_proj and the unembedding share a GEMV). Kernels run
serialized with cold caches under the profiler, so only the sum of GPU time carries over, not
wall time (scripts/bench_decode.py measures that).

``--host`` measures the other half of a token's cost, the host's: the time Python and MLX take
to build one decode step's graph (model and greedy sampling, as Engine.generate queues it) and to
queue it (``mx.async_eval``), uncompiled and compiled (decode_step.py), and the graph's size in
operations, for gpt-oss-20b's structure (24 layers, 32 experts top-4, 64/8
heads, its window) at small widths: host time depends on the number of operations, not on their
sizes. A CPU has no GPU kernel to build, and MLX's fast operations (rms_norm, rope, sdpa) fall
back to several operations there: each of those calls, and with kernels "on" each of our kernel
launches (whose plans and checks run as on a GPU), is stood in for by one node that depends on
its inputs (counted as one operation: "Depends"). "off" is MLX's path.

The marker helpers and the CSV parsing here are also what ``scripts/bench_moe.py --ncu`` uses.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

METRIC = "gpu__time_duration.sum"
NCU_ARGS = ["--csv", "--clock-control", "none", "--metrics", METRIC]
_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
          "s": 1e6, "second": 1e6}
ENGINES = ("ours", "ours_compiled", "ours_kernels_off", "mlx_lm")
WARMUP = 2  # decode steps before the measured ones
PROMPT = 128


# ---- markers and ncu's CSV (shared with bench_moe.py) -----------------------------------------

_markers: dict = {}


def marker(label: str) -> None:
    """Launch a one-thread kernel named ``marker__<label>__`` (``end`` closes a range) so the
    profile can be cut into ranges. Nothing on the CPU (there is nothing to profile)."""
    import mlx.core as mx

    from gptoss_mlx.kernels.launch import Kernel, Launch, gpu_backend

    if gpu_backend() is None:
        return
    if label not in _markers:
        _markers[label] = Kernel(f"marker__{label}__", ["inp"], ["out"], source=("", "out[0] = inp[0];\n"))
    mx.eval(_markers[label](Launch(inputs=[mx.zeros((8,))], output_shapes=[(1,)], output_dtypes=[mx.float32],
                                   grid=(32, 1, 1), threadgroup=(32, 1, 1))))


def _profiler(call: str) -> None:
    """cuProfilerStart/Stop: under ``ncu --profile-from-start off`` only what runs between them
    is profiled (loading and prefill are thousands of kernels, slow under the profiler)."""
    import ctypes

    from gptoss_mlx.kernels.launch import gpu_backend

    if gpu_backend() == "cuda":
        getattr(ctypes.CDLL("libcuda.so.1"), call)()


def range_start(label: str) -> None:
    _profiler("cuProfilerStart")
    marker(label)


def range_end() -> None:
    marker("end")
    _profiler("cuProfilerStop")


@dataclass
class KernelTime:
    name: str  # the function name: no return type, namespace, template arguments or parameters
    grid: str  # "(x, y, z)" blocks, as ncu prints it
    block: str
    us: float


def function_name(full: str) -> str:
    """'void mlx::core::cu::rms_norm<__nv_bfloat16, 256>(const T1 *, ...)' -> 'rms_norm'."""
    name = full.replace("(anonymous namespace)", "")
    while True:  # template arguments, innermost first
        plain = re.sub(r"<[^<>]*>", "", name)
        if plain == name:
            break
        name = plain
    words = name.split("(")[0].split()
    return words[-1].split("::")[-1] if words else full


def parse_ncu_csv(text: str) -> list[KernelTime]:
    """The kernels of ``ncu --csv --metrics gpu__time_duration.sum`` output, in launch order
    (ncu's own log lines before the CSV header are skipped)."""
    start = text.find('"ID"')
    if start < 0:
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(text[start:])):
        if r.get("Metric Name") != METRIC:
            continue
        value = float(r["Metric Value"].replace(",", "")) * _UNITS[r["Metric Unit"].strip()]
        rows.append(KernelTime(function_name(r["Kernel Name"]), r.get("Grid Size", ""), r.get("Block Size", ""), value))
    return rows


_MARKER = re.compile(r"marker__(\w+?)__")


def ranges(rows: list[KernelTime]) -> dict[str, list[KernelTime]]:
    """{label: the kernels between marker ``label`` and the next marker}; kernels outside any
    range (loading, prefill, warm-up, ``end``) are dropped."""
    out, current = {}, None
    for r in rows:
        m = _MARKER.search(r.name)
        if m:
            current = None if m[1] == "end" else m[1]
            if current is not None:
                out[current] = []
            continue
        if current is not None:
            out[current].append(r)
    return out


def family(r: KernelTime) -> str:
    """Our kernels by their metal/ name; everything else by its function name."""
    m = re.match(r"custom_kernel_(.*)", r.name)
    if m:
        from gptoss_mlx.kernels import registry

        return next((n for n in sorted(registry.REGISTRY, key=len, reverse=True) if m[1].startswith(n)), m[1][:32])
    return r.name[:48]


def families(kernels: list[KernelTime], per: int) -> dict[str, tuple[float, float]]:
    """{family label: (µs, launches)} per token (``per`` tokens in ``kernels``). A family that
    runs at several grids is split by grid."""
    grids = defaultdict(set)
    for r in kernels:
        grids[family(r)].add(r.grid)
    out = defaultdict(lambda: [0.0, 0.0])
    for r in kernels:
        f = family(r)
        label = f"{f} {r.grid}" if len(grids[f]) > 1 else f
        out[label][0] += r.us / per
        out[label][1] += 1 / per
    return {k: (v[0], v[1]) for k, v in out.items()}


def report(rows: list[KernelTime], steps: int, bytes_per_token: float | None, top: int) -> str:
    """The table: per engine kernels, GPU time and TB/s per token, then the families."""
    measured = ranges(rows)
    lines = [f"GPU time per decode token (ncu {METRIC}, --clock-control none, {steps} tokens after a "
             f"{PROMPT}-token prompt)", "",
             "| engine | kernels / token | GPU ms / token | TB/s (bytes read / GPU time) |", "|---|---|---|---|"]
    for engine in ENGINES:
        if engine not in measured:
            continue
        us = sum(r.us for r in measured[engine]) / steps
        tbs = f"{bytes_per_token / (us * 1e-6) / 1e12:.2f}" if bytes_per_token else "-"
        lines.append(f"| {engine} | {len(measured[engine]) / steps:.0f} | {us / 1e3:.3f} | {tbs} |")
    if bytes_per_token:
        lines.append(f"\nbytes one token must read: {bytes_per_token / 1e9:.3f} GB")
    for engine in ENGINES:
        if engine not in measured:
            continue
        fam = sorted(families(measured[engine], steps).items(), key=lambda kv: -kv[1][0])
        lines += ["", f"{engine}: µs per token by kernel family (launches per token)", "| family | µs | launches | µs each |",
                  "|---|---|---|---|"]
        for name, (us, n) in fam[:top]:
            lines.append(f"| {name} | {us:.1f} | {n:.0f} | {us / n:.1f} |")
        if len(fam) > top:
            rest = fam[top:]
            lines.append(f"| {len(rest)} more | {sum(v[0] for _, v in rest):.1f} | {sum(v[1] for _, v in rest):.0f} | |")
    return "\n".join(lines)


# ---- the profiled process --------------------------------------------------------------------

def bytes_per_token(model, context: int) -> float:
    """What one decode token reads: every dense weight, the chosen experts' share of the expert
    tensors, one embedding row, and the keys and values it attends to."""
    from mlx.utils import tree_flatten

    c = model.config
    total = 0.0
    for name, p in tree_flatten(model.parameters()):
        if ".experts." in name:
            total += p.nbytes * c.num_experts_per_tok / c.num_local_experts
        elif name.startswith("embed_tokens"):
            total += p.nbytes / c.vocab_size
        else:
            total += p.nbytes
    kv_row = 2 * c.num_key_value_heads * c.head_dim * 2  # keys and values of one position, bf16
    for sliding in c.sliding_layers:
        total += kv_row * (min(context, c.sliding_window) if sliding else context)
    return total


def decode_between_markers(model, sample, prompt: list[int], label: str, steps: int,
                           compiled: bool = False) -> None:
    """Prefill ``prompt``, decode WARMUP tokens, then ``steps`` tokens between the markers of
    range ``label`` (each token queued as Engine.generate does, then evaluated); ``compiled``:
    each step through decode_step.CompiledDecode (traced in the warm-up)."""
    import mlx.core as mx

    from gptoss_mlx.decode_step import CompiledDecode

    step = CompiledDecode(model) if compiled else None
    cache = model.make_cache()
    y = sample(model(mx.array([prompt]), cache=cache)[:, -1, :])
    for n in range(WARMUP + steps):
        if n == WARMUP:
            range_start(label)
        logits = step(y, cache) if step is not None else None
        if logits is None:  # uncompiled, or a step the compiled one does not take
            logits = model(y.reshape(1, 1), cache=cache, sampled=True)[:, -1, :]
        y = sample(logits)
        mx.eval(y)
    range_end()


def worker(directory: Path, steps: int, out: Path, engines: list[str]) -> int:
    """Under ncu (or anywhere, for a dry run): each engine decodes ``steps`` tokens between markers."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as load_mlx_lm

    from bench import random_prompt
    from gptoss_mlx.generate import SamplingParams, make_sampler
    from gptoss_mlx.kernels import registry
    from gptoss_mlx.loading import load_model

    prompt = random_prompt(PROMPT, 1)
    ours = load_model(directory)
    sample = make_sampler(SamplingParams(temperature=0), ours.config.vocab_size)

    def decode_ours(label: str, kernels: str, compiled: bool = False) -> None:
        os.environ[registry.ENV_VAR] = kernels
        registry.reset()
        decode_between_markers(ours, sample, prompt, label, steps, compiled)

    decode_ours("warmup", "check")  # every kernel checked once, outside the measured ranges
    for label, kernels, compiled in (("ours", "on", False), ("ours_compiled", "on", True),
                                     ("ours_kernels_off", "off", False)):
        if label in engines:
            decode_ours(label, kernels, compiled)

    if "mlx_lm" in engines:
        theirs, _ = load_mlx_lm(directory)
        # mlx-lm's own loop: it queues token n + 1 before yielding token n, so the kernels launched
        # between the yields of tokens WARMUP and WARMUP + steps are those of `steps` tokens.
        for n, _ in enumerate(generate_step(mx.array(prompt), theirs, max_tokens=WARMUP + steps + 2,
                                            sampler=lambda logits: mx.argmax(logits, axis=-1)), start=1):
            if n == WARMUP:
                range_start("mlx_lm")
            if n == WARMUP + steps:
                range_end()
    out.write_text(json.dumps({"bytes_per_token": bytes_per_token(ours, PROMPT + WARMUP + steps // 2)}))
    return 0


# ---- host time per token --------------------------------------------------------------------

def host_config():
    """gpt-oss-20b's structure (layers, experts, heads, window) at small widths (head_dim 32: the
    decode attention kernels' multiple)."""
    from gptoss_mlx.config import GPT_OSS_20B

    return GPT_OSS_20B.replace(hidden_size=64, intermediate_size=64, head_dim=32, vocab_size=1024)


def graph_ops(*outputs) -> dict[str, int]:
    """{primitive: count} of the graph that evaluating ``outputs`` would run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.dot"
        import mlx.core as mx

        mx.export_to_dot(str(path), *outputs)
        labels = re.findall(r'\[label ="(\w+)", shape=rectangle\]', path.read_text())
    counts = defaultdict(int)
    for label in labels:
        counts[label] += 1
    return dict(counts)


def host_time(kernels: str, steps: int, compiled: bool) -> dict:
    """Median ms to build one decode step's graph and to queue it (mx.async_eval), and its
    operations, after a 128-token prompt: Engine.generate's step, compiled (decode_step.py) or not."""
    import statistics
    import time
    from unittest import mock

    import mlx.core as mx
    import mlx.nn as nn

    from gptoss_mlx.generate import Engine, SamplingParams, forward, make_sampler
    from gptoss_mlx.kernels import registry
    from gptoss_mlx.kernels.launch import Kernel
    from gptoss_mlx.model import Model

    config = host_config()
    mx.random.seed(0)
    model = Model(config)
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape).astype(mx.bfloat16) * 0.1
                                   if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    mx.eval(model.parameters())
    sample = make_sampler(SamplingParams(temperature=0), config.vocab_size)
    stood_in = []  # outputs made by stand-ins in this step (each adds a Broadcast node)

    def stand_in(shapes, dtypes, deps):
        """One node (Depends) that waits for ``deps`` and gives outputs of these shapes."""
        stood_in.append(len(shapes))
        outs = [mx.broadcast_to(mx.array(0, dtype=d), s) for s, d in zip(shapes, dtypes)]
        return mx.depends(outs, [a for a in deps if isinstance(a, mx.array)])

    def kernel(self, launch, backend=None):
        return stand_in(launch.output_shapes, launch.output_dtypes, launch.inputs)

    def fast(x, *args, **kwargs):  # mx.fast.rms_norm, rope, sdpa: one GPU kernel, a composite on the CPU
        return stand_in([x.shape], [x.dtype], [x, *args, *kwargs.values()])[0]

    with mock.patch.dict(os.environ, {registry.ENV_VAR: kernels}), \
            mock.patch.object(registry, "gpu_backend", lambda: "metal" if kernels == "on" else None), \
            mock.patch.object(Kernel, "__call__", kernel), mock.patch.object(mx.fast, "rms_norm", fast), \
            mock.patch.object(mx.fast, "rope", fast), mock.patch.object(mx.fast, "scaled_dot_product_attention", fast):
        registry.reset()
        engine = Engine(model, compile_decode=compiled)
        y = sample(forward(model, engine.prompt_cache, list(range(PROMPT))))
        mx.eval(y)
        build, queue, step_stand_ins = [], [], []
        for n in range(WARMUP + steps):
            del stood_in[:]
            t0 = time.perf_counter()
            y = sample(engine._forward_async(y))  # what Engine.generate queues
            t1 = time.perf_counter()
            if stood_in:  # every step's, or (compiled) the traced step's: the graph replayed since
                step_stand_ins = list(stood_in)
            if n == WARMUP:
                ops = graph_ops(y)
            t2 = time.perf_counter()
            mx.async_eval(y)
            t3 = time.perf_counter()
            mx.eval(y)
            if n >= WARMUP:
                build.append(t1 - t0)
                queue.append(t3 - t2)
        registry.reset()
    ops["Broadcast"] -= sum(step_stand_ins)
    return {"build": 1e3 * statistics.median(build), "queue": 1e3 * statistics.median(queue),
            "ops": sum(ops.values()), "stand_ins": len(step_stand_ins), "by_op": ops}


def host_report(steps: int) -> str:
    lines = [f"Host time per decode token: building one step's graph and queueing it (mx.async_eval), "
             f"gpt-oss-20b structure at small widths, {steps} steps, median, on "
             f"{__import__('platform').processor() or 'this CPU'}", "",
             "| kernels | step | build ms / token | queue ms / token | graph ops / token | of which fast ops and our kernels |",
             "|---|---|---|---|---|---|"]
    results = {(mode, step): host_time(mode, steps, step == "compiled")
               for mode in ("on", "off") for step in ("uncompiled", "compiled")}
    for (mode, step), r in results.items():
        lines.append(f"| {mode} | {step} | {r['build']:.2f} | {r['queue']:.2f} | {r['ops']} | {r['stand_ins']} |")
    for (mode, step), r in results.items():
        top = sorted(r["by_op"].items(), key=lambda kv: -kv[1])
        lines.append(f"\nops with kernels {mode}, {step}: " + ", ".join(f"{k} {v}" for k, v in top))
    return "\n".join(lines)


# ---- the parent: run ncu, print the table -----------------------------------------------------

def profile(ncu: str, child: list[str]) -> tuple[subprocess.CompletedProcess, list[KernelTime]]:
    """Run ``child`` under ncu, profiling only between range_start and range_end; if that
    profiled nothing (a driver without cuProfilerStart), once more profiling everything (the
    markers still cut out the ranges, slowly)."""
    for when in (["--profile-from-start", "off"], []):
        run = subprocess.run([ncu, *NCU_ARGS, *when, *child], capture_output=True, text=True)
        rows = parse_ncu_csv(run.stdout)
        if ranges(rows) or run.returncode:
            break
        print("ncu --profile-from-start off profiled nothing; profiling everything", file=sys.stderr)
    return run, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="the checkpoint (all three engines load it)")
    ap.add_argument("--make", action="store_true", help="write a random checkpoint to --dir first")
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--steps", type=int, default=4, help="decode tokens measured per engine")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--top", type=int, default=18, help="kernel families listed per engine")
    ap.add_argument("--ncu", default="ncu", help="the Nsight Compute command line tool")
    ap.add_argument("--from-csv", type=Path, help="print the table from a saved `ncu --csv` output instead")
    ap.add_argument("--bytes-per-token", type=float, help="with --from-csv: for the TB/s column")
    ap.add_argument("--save-csv", type=Path, help="keep ncu's CSV output here")
    ap.add_argument("--host", action="store_true", help="host time per token instead (no GPU, no checkpoint)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # runs under ncu; writes a JSON here
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.worker:
        return worker(args.dir, args.steps, args.worker, args.engines.split(","))
    if args.host:
        print(host_report(args.steps))
        return 0
    if args.from_csv:
        print(report(parse_ncu_csv(args.from_csv.read_text()), args.steps, args.bytes_per_token, args.top))
        return 0
    if args.dir is None:
        ap.error("--dir is required (or --from-csv)")
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engine {sorted(unknown)[0]!r}; known: {', '.join(ENGINES)}")
    if args.make:
        from gptoss_mlx.testing import checkpoints as mtc

        mtc.write_hf(args.dir, mtc.PRESETS[args.preset])
    with tempfile.TemporaryDirectory() as tmp:
        side = Path(tmp) / "worker.json"
        child = [sys.executable, __file__, "--dir", str(args.dir), "--steps", str(args.steps),
                 "--engines", args.engines, "--worker", str(side)]
        try:
            run, rows = profile(args.ncu, child)
        except FileNotFoundError:
            print(f"{args.ncu} not found: Nsight Compute is needed (or --from-csv a saved run)", file=sys.stderr)
            return 1
        if args.save_csv:
            args.save_csv.write_text(run.stdout)
        if run.returncode or not ranges(rows):
            print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
            return 1
        per_token = json.loads(side.read_text())["bytes_per_token"]
    print(report(rows, args.steps, per_token, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
