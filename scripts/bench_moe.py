#!/usr/bin/env python3
"""The MoE block alone: fused MXFP4 kernels vs MLX's gather_qmm path, at full model size.

    python scripts/bench_moe.py [--preset 20b] [--tokens 1,4,16,32] [--iters 50] [--rounds 7] [--bandwidth-gbs 3350]

Random packed experts of the preset's size (20b: 32 experts of 2880x5760 gate/up + 2880x2880
down, top-4). For each batch of tokens, ``--iters`` MoE calls are chained (each one's output is
the next one's input) and evaluated once; ``--rounds`` rounds time the four cases below back to
back (the GPU machine's speed drifts between runs), and the table gives each case's median and
the median of the per-round speedups. Two measures per path:
- experts: from the activations and given routing to the combined output plus residual (the
  two expert kernels vs gather_qmm, bias gathers, SwiGLU, weighted sum);
- block: the whole MoE block as the model runs it, router included (router kernel + the two
  expert kernels vs MLX's addmm, argsort, take, softmax and the gather_qmm path).
Achieved GB/s counts the distinct expert bytes one call must read (MXFP4 weights, scales,
biases). Also checks the paths agree. Pick ``MAX_TOKENS`` in gptoss_mlx/kernels/moe.py from the
crossover.

These wall-clock times include MLX's host cost per operation, which on MLX-CUDA (10-20 µs per
launch on the GPU machine) is far above Metal's and favours the path with fewer launches.
``--ncu`` (CUDA machines with Nsight Compute) reports instead the GPU time of the kernels each
path launches, summed per block call and averaged over ``--iters`` calls (``ncu --metrics gpu__time_duration.sum``; kernels are
serialized under the profiler, so caches are cold-ish for both paths alike).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="20b", choices=["20b", "120b"])
    ap.add_argument("--tokens", default="1,4,16,32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                    help="the machine's memory bandwidth, for the percentage (H100 SXM: 3350)")
    ap.add_argument("--ncu", action="store_true", help="GPU time per path from Nsight Compute instead")
    ap.add_argument("--ncu-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ncu:
        return ncu_report(args)

    import mlx.core as mx

    from gptoss_mlx import ops
    from gptoss_mlx.kernels import moe, registry
    from gptoss_mlx.model import MLP
    from gptoss_mlx.testing import checkpoints as mtc

    config = mtc.PRESETS[args.preset]
    D, I, E, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    mlp = MLP(config)
    key = mx.random.key(0)
    k1, k2 = mx.random.split(key)
    ex = mlp.experts
    ex.gate_up_proj.weight, ex.gate_up_proj.scales, ex.gate_up_proj.bias = moe.random_experts(k1, E, 2 * I, D, mx.bfloat16)
    ex.down_proj.weight, ex.down_proj.scales, ex.down_proj.bias = moe.random_experts(k2, E, D, I, mx.bfloat16)
    mlp.router.weight = (mx.random.normal(mlp.router.weight.shape) * D ** -0.5).astype(mx.bfloat16)
    mlp.router.bias = mx.zeros_like(mlp.router.bias).astype(mx.bfloat16)
    mx.eval(mlp.parameters())
    bytes_per_expert = (2 * I * D + D * I) * (0.5 + 1 / 32) + (2 * I + D) * 2

    def kernels(x, indices, weights):  # residual + moe(x), as the model calls it
        return moe.fused_experts(x, indices, weights, ex, x)

    def mlx_path(x, indices, weights):
        return ops.combine_experts(ex(x, indices), weights, x)

    def block(x, indices, weights):  # the model's MoE block; the registry picks kernels or not
        return mlp(x, residual=x)

    def chained(fn, x0, indices, weights) -> float:
        """µs per call of ``--iters`` chained calls, evaluated together."""
        x = x0
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            x = fn(x, indices, weights)  # each call's output is the next one's input
        mx.eval(x)
        return (time.perf_counter() - t0) / args.iters * 1e6

    def timed_rounds(cases: dict, x0, indices, weights) -> dict:
        """{label: [µs per call, one per round]}: each round runs every case once, back to back
        (a case is (fn, kernel mode)); round 0 compiles and is not counted."""
        times = {label: [] for label in cases}
        for r in range(args.rounds + 1):
            for label, (fn, mode) in cases.items():
                with kernel_mode(mode):
                    t = chained(fn, x0, indices, weights)
                if r:
                    times[label].append(t)
        return times

    if args.ncu_worker:
        return ncu_worker(args, block, D)

    registry.reset()
    print(f"device: {mx.default_device()}, MLX {mx.__version__}, {args.preset}: D={D} I={I} E={E} top-{k}")
    with kernel_mode("check"):  # the timings below skip the check ("on"), so it runs here once
        for name in ("moe_router", "moe_gate_up_swiglu", "moe_down_combine"):
            print(f"  run-time check {name}: ", "active" if registry.active(name, mx.bfloat16) else "DISABLED")
    print(f"{'tokens':>6} {'gather_qmm µs':>14} {'kernels µs':>11} {'speedup':>8} {'kernels GB/s':>13} {'% of peak':>9} "
          f"{'max |diff|':>10} {'block MLX µs':>13} {'block ours µs':>14} {'speedup':>8} {'max |diff|':>10}")
    for T in [int(t) for t in args.tokens.split(",")]:
        kx, ki, kw = mx.random.split(mx.random.key(T), 3)
        x0 = mx.random.normal((T, D), key=kx).astype(mx.bfloat16)
        indices = mx.argsort(mx.random.uniform(shape=(T, E), key=ki), axis=-1)[:, :k].astype(mx.uint32)
        weights = mx.softmax(mx.random.normal((T, k), key=kw), axis=-1).astype(mx.bfloat16)
        diff = max_diff(kernels(x0, indices, weights), mlx_path(x0, indices, weights))
        with kernel_mode("on"):
            ours_block = block(x0, indices, weights)
        with kernel_mode("off"):
            block_diff = max_diff(ours_block, block(x0, indices, weights))
        times = timed_rounds({"mlx": (mlx_path, "on"), "kernels": (kernels, "on"),
                              "block mlx": (block, "off"), "block ours": (block, "on")}, x0, indices, weights)
        med = {label: statistics.median(ts) for label, ts in times.items()}
        speedup = statistics.median(a / b for a, b in zip(times["mlx"], times["kernels"]))
        block_speedup = statistics.median(a / b for a, b in zip(times["block mlx"], times["block ours"]))
        distinct = len(set(indices.flatten().tolist()))
        gbs = distinct * bytes_per_expert / (med["kernels"] * 1e-6) / 1e9
        print(f"{T:>6} {med['mlx']:>14.1f} {med['kernels']:>11.1f} {speedup:>7.2f}x "
              f"{gbs:>13.0f} {100 * gbs / args.bandwidth_gbs:>8.0f}% {diff:>10.3g} {med['block mlx']:>13.1f} "
              f"{med['block ours']:>14.1f} {block_speedup:>7.2f}x {block_diff:>10.3g}")
    return 0


def ncu_worker(args, block, D) -> int:
    """Under ncu: per batch size and path, a marker kernel, --iters block calls, an end marker."""
    import mlx.core as mx

    from gptoss_mlx.kernels.launch import Kernel, Launch

    def marker(label):
        kernel = Kernel(f"marker_{label}", ["inp"], ["out"], source=("", "out[0] = inp[0];\n"))
        mx.eval(kernel(Launch(inputs=[mx.zeros((8,))], output_shapes=[(1,)], output_dtypes=[mx.float32],
                              grid=(32, 1, 1), threadgroup=(32, 1, 1))))

    for T in [int(t) for t in args.tokens.split(",")]:
        x = mx.random.normal((T, D), key=mx.random.key(T)).astype(mx.bfloat16)
        for path, mode in (("mlx", "off"), ("ours", "check")):
            with kernel_mode(mode):
                mx.eval(block(x, None, None))  # compiles (and checks) outside the measured range
                marker(f"{path}_{T}")
                for _ in range(args.iters):
                    mx.eval(block(x, None, None))
                marker("end")
    return 0


def ncu_report(args) -> int:
    """Runs this script under ncu and sums each path's kernel time per block call."""
    import csv
    import io
    import re
    import subprocess

    cmd = ["ncu", "--csv", "--metrics", "gpu__time_duration.sum", sys.executable, __file__, "--ncu-worker",
           "--preset", args.preset, "--tokens", args.tokens, "--iters", str(args.iters)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    rows = [r for r in csv.DictReader(io.StringIO(run.stdout[run.stdout.find('"ID"'):]))
            if r.get("Metric Name") == "gpu__time_duration.sum"]
    if run.returncode or not rows:
        print(run.stdout[-3000:], run.stderr[-3000:])
        return 1
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    sums, launches, per_kernel, current = {}, {}, {}, None
    for r in rows:
        marker = re.search(r"marker_(mlx|ours|end)_?(\d*)", r["Kernel Name"])
        if marker:
            current = None if marker[1] == "end" else (marker[1], int(marker[2]))
            continue
        if current:
            us = float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]]
            sums[current] = sums.get(current, 0.0) + us / args.iters
            launches[current] = launches.get(current, 0) + 1 / args.iters
            if current[0] == "ours":  # "custom_kernel_<name><template hash>(...)": keep the name part
                key = (current[1], r["Kernel Name"].split("(")[0].split("::")[-1].removeprefix("custom_kernel_")[:24])
                per_kernel[key] = per_kernel.get(key, 0.0) + us / args.iters
    print(f"GPU time per MoE block call (ncu gpu__time_duration.sum, {args.iters} calls per path, "
          f"{args.preset}, bf16, router included)")
    print(f"{'tokens':>6} {'MLX path µs':>12} {'kernels µs':>11} {'speedup':>8} {'launches MLX / ours':>20}")
    for T in [int(t) for t in args.tokens.split(",")]:
        mlx_us, ours_us = sums[("mlx", T)], sums[("ours", T)]
        print(f"{T:>6} {mlx_us:>12.1f} {ours_us:>11.1f} {mlx_us / ours_us:>7.2f}x "
              f"{launches[('mlx', T)]:>12.0f} / {launches[('ours', T)]:.0f}   "
              + ", ".join(f"{name} {us:.1f}" for (t, name), us in per_kernel.items() if t == T))
    return 0


@contextmanager
def kernel_mode(mode: str):
    """GPTOSS_MLX_KERNELS=mode inside the block."""
    from gptoss_mlx.kernels import registry

    before = os.environ.get(registry.ENV_VAR)
    os.environ[registry.ENV_VAR] = mode
    registry.reset()
    try:
        yield
    finally:
        os.environ[registry.ENV_VAR] = before or "check"
        registry.reset()


def max_diff(a, b) -> float:
    import mlx.core as mx

    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


if __name__ == "__main__":
    sys.exit(main())
