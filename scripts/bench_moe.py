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
path launches, summed per block call and averaged over ``--iters`` calls (``ncu --clock-control
none --metrics gpu__time_duration.sum``; kernels are serialized under the profiler, so caches are
cold-ish for both paths alike; five rounds, each path in turn, the median), for each expert-kernel variant of ``--variants`` (kernels/moe.py
``VARIANTS``: rows per simdgroup, simdgroups per threadgroup) side by side, each
with its largest difference from the MLX path:

    python scripts/bench_moe.py --ncu --tokens 1,4 --iters 20 --variants all
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="20b", choices=["20b", "120b"])
    ap.add_argument("--tokens", default="1,4,16,32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                    help="the machine's memory bandwidth, for the percentage (H100 SXM: 3350)")
    ap.add_argument("--ncu", action="store_true", help="GPU time per path from Nsight Compute instead")
    ap.add_argument("--variants", default="base",
                    help="with --ncu: expert-kernel variants to time, comma-separated, or 'all' (kernels/moe.py VARIANTS)")
    ap.add_argument("--ncu-worker", type=Path, help=argparse.SUPPRESS)  # runs under ncu; writes errors here
    args = ap.parse_args()
    from gptoss_mlx.kernels.moe import VARIANTS

    args.variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
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
        # as the router kernels give them: bf16 values stored as float32 (metal/router.h)
        weights = mx.softmax(mx.random.normal((T, k), key=kw), axis=-1).astype(mx.bfloat16).astype(mx.float32)
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
    """Under ncu: per batch size, the MLX path and each variant of the kernels, between markers
    (profile_decode.marker), ``--iters`` block calls each; writes each variant's largest
    difference from the MLX path to ``--ncu-worker`` (on CUDA: the variants' CUDA mirror check)."""
    import json

    import mlx.core as mx

    from gptoss_mlx.kernels import moe
    from profile_decode import _profiler, marker, range_end

    errors = {}
    warm_up_clocks()
    for T in [int(t) for t in args.tokens.split(",")]:
        x = mx.random.normal((T, D), key=mx.random.key(T)).astype(mx.bfloat16)
        with kernel_mode("off"):
            reference = block(x, None, None)
            mx.eval(reference)
        for n, variant in enumerate(args.variants):
            moe.VARIANT = moe.VARIANTS[variant]
            with kernel_mode("check"):
                out = block(x, None, None)  # compiles (and checks) outside the measured ranges
                errors[f"{variant} {T}"] = max_diff(out, reference)
        # Rounds, each path in turn (rotated), so that the GPU's clocks, which drift under the
        # profiler, favour no path: a path's time is the median over its rounds.
        # One profiled range, cut by markers: starting and stopping the profiler costs seconds.
        paths = [("mlx", None)] + list(enumerate(args.variants))
        _profiler("cuProfilerStart")
        for r in range(ROUNDS):
            for label, variant in paths[r % len(paths):] + paths[:r % len(paths)]:
                if variant is not None:
                    moe.VARIANT = moe.VARIANTS[variant]
                with kernel_mode("off" if variant is None else "on"):
                    marker(f"mlx_t{T}_r{r}" if variant is None else f"v{label}_t{T}_r{r}")
                    for _ in range(args.iters):
                        mx.eval(block(x, None, None))
        range_end()
    args.ncu_worker.write_text(json.dumps(errors))
    return 0


ROUNDS = 5  # with --ncu: interleaved rounds per path


def warm_up_clocks(seconds: float = 2.0) -> None:
    """Keep the GPU busy for a moment, so that the first path timed does not run at idle clocks."""
    import time

    import mlx.core as mx

    a = mx.random.normal((4096, 4096))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        mx.eval(a @ a)


def ncu_report(args) -> int:
    """Runs this script under ncu; per batch size and path, the GPU time of one block call."""
    import json
    import tempfile

    from profile_decode import family, profile, ranges

    with tempfile.TemporaryDirectory() as tmp:
        side = Path(tmp) / "errors.json"
        run, rows = profile("ncu", [sys.executable, __file__, "--ncu-worker", str(side), "--preset", args.preset,
                                    "--tokens", args.tokens, "--iters", str(args.iters),
                                    "--variants", ",".join(args.variants)])
        measured = ranges(rows)
        if run.returncode or not measured:
            print(run.stdout[-3000:], run.stderr[-3000:])
            return 1
        errors = json.loads(side.read_text())
    print(f"GPU time per MoE block call (ncu gpu__time_duration.sum, --clock-control none, {args.iters} calls "
          f"per path, {args.preset}, bf16, router included); max |diff| from the MLX path")
    def per_call(label: str, T: int) -> tuple[float, list]:
        """Median over the rounds of a path's GPU µs per block call, and one round's kernels."""
        rounds = [measured[f"{label}_t{T}_r{r}"] for r in range(ROUNDS)]
        return statistics.median(sum(k.us for k in ks) / args.iters for ks in rounds), rounds[0]

    print(f"{'tokens':>6} {'path':<16} {'µs':>8} {'vs MLX':>7} {'launches':>8} {'max |diff|':>10}   µs per kernel")
    for T in [int(t) for t in args.tokens.split(",")]:
        mlx_us, kernels = per_call("mlx", T)
        print(f"{T:>6} {'MLX (gather_qmm)':<16} {mlx_us:>8.1f} {'':>7} {len(kernels) / args.iters:>8.0f}")
        for n, variant in enumerate(args.variants):
            us, kernels = per_call(f"v{n}", T)
            per_kernel = {}
            for r in kernels:
                per_kernel[family(r)] = per_kernel.get(family(r), 0.0) + r.us / args.iters
            disabled = {"moe_gate_up_swiglu", "moe_down_combine"} - set(per_kernel)  # failed the run-time check
            print(f"{T:>6} {variant:<16} {us:>8.1f} {mlx_us / us:>6.2f}x {len(kernels) / args.iters:>8.0f} "
                  f"{errors[f'{variant} {T}']:>10.3g}   " + ", ".join(f"{k} {v:.1f}" for k, v in per_kernel.items())
                  + (f"  (NOT RUN: {', '.join(sorted(disabled))})" if disabled else ""))
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
