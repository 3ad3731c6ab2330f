#!/usr/bin/env python3
"""The MoE block alone: fused MXFP4 kernels vs MLX's gather_qmm path, at full model size.

    python scripts/bench_moe.py [--preset 20b] [--tokens 1,4,16,32] [--iters 50] [--bandwidth-gbs 3350]

Random packed experts of the preset's size (20b: 32 experts of 2880x5760 gate/up + 2880x2880
down, top-4). For each batch of tokens, ``--iters`` MoE calls are chained (each one's output is
the next one's input) and evaluated once. Two measures per path:
- experts: from the activations and given routing to the combined output plus residual (the
  two expert kernels vs gather_qmm, bias gathers, SwiGLU, weighted sum);
- block: the whole MoE block as the model runs it, router included (router kernel + the two
  expert kernels vs MLX's addmm, argsort, take, softmax and the gather_qmm path).
Achieved GB/s counts the distinct expert bytes one call must read (MXFP4 weights, scales,
biases). Also checks the paths agree. Pick ``MAX_TOKENS`` in gptoss_mlx/kernels/moe.py from the
crossover.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="20b", choices=["20b", "120b"])
    ap.add_argument("--tokens", default="1,4,16,32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                    help="the machine's memory bandwidth, for the percentage (H100 SXM: 3350)")
    args = ap.parse_args()

    import mlx.core as mx

    os.environ.setdefault("GPTOSS_MLX_KERNELS", "on")  # the expert kernels are held back by default
    import make_tiny_checkpoint as mtc
    from gptoss_mlx.kernels import moe, registry
    from gptoss_mlx.model import MLP

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
        return moe.combine_experts(ex(x, indices), weights, x)

    def block(x, indices, weights):  # the model's MoE block; the registry picks kernels or not
        return mlp(x, residual=x)

    def chained(fn, x0, indices, weights) -> float:
        """µs per call of ``--iters`` chained calls (the second round: the first compiles)."""
        for attempt in range(2):
            x = x0
            t0 = time.perf_counter()
            for _ in range(args.iters):
                x = fn(x, indices, weights)  # each call's output is the next one's input
            mx.eval(x)
        return (time.perf_counter() - t0) / args.iters * 1e6

    registry.reset()
    print(f"device: {mx.default_device()}, MLX {mx.__version__}, {args.preset}: D={D} I={I} E={E} top-{k}")
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
        times = {label: chained(fn, x0, indices, weights) for label, fn in (("mlx", mlx_path), ("kernels", kernels))}
        ours_block = block(x0, indices, weights)
        times["block ours"] = chained(block, x0, indices, weights)
        with kernels_off():
            block_diff = max_diff(ours_block, block(x0, indices, weights))
            times["block mlx"] = chained(block, x0, indices, weights)
        distinct = len(set(indices.flatten().tolist()))
        gbs = distinct * bytes_per_expert / (times["kernels"] * 1e-6) / 1e9
        print(f"{T:>6} {times['mlx']:>14.1f} {times['kernels']:>11.1f} {times['mlx'] / times['kernels']:>7.2f}x "
              f"{gbs:>13.0f} {100 * gbs / args.bandwidth_gbs:>8.0f}% {diff:>10.3g} {times['block mlx']:>13.1f} "
              f"{times['block ours']:>14.1f} {times['block mlx'] / times['block ours']:>7.2f}x {block_diff:>10.3g}")
    return 0


@contextmanager
def kernels_off():
    from gptoss_mlx.kernels import registry

    mode = os.environ.get(registry.ENV_VAR)
    os.environ[registry.ENV_VAR] = "off"
    registry.reset()
    try:
        yield
    finally:
        os.environ[registry.ENV_VAR] = mode or "check"
        registry.reset()


def max_diff(a, b) -> float:
    import mlx.core as mx

    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


if __name__ == "__main__":
    sys.exit(main())
