#!/usr/bin/env python3
"""Decode attention alone at 20b's shapes: our kernels vs MLX's sdpa with sinks.

    python scripts/bench_attention.py [--contexts 128,1024,8192,32768] [--iters 100]

One query token, 64 query heads over 8 KV heads, head_dim 64, bf16, sinks. For each context
length: µs per call (``--iters`` calls built into one graph and evaluated together) of the
kernel pair (sdpa_decode_partial + combine, reading the cache buffer directly) and of
``mx.fast.scaled_dot_product_attention`` on the cache view, plus their max difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="128,1024,8192,32768")
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()

    import mlx.core as mx

    from gptoss_mlx.kernels import registry
    from gptoss_mlx.kernels.sdpa_decode import sdpa_decode

    heads, kv_heads, D = 64, 8, 64
    scale = D ** -0.5
    print(f"device: {mx.default_device()}, MLX {mx.__version__}; 64 q heads / 8 kv heads, D 64, bf16")
    for name in ("sdpa_decode_partial", "sdpa_decode_combine"):
        print(f"  run-time check {name}:", "active" if registry.active(name, mx.bfloat16) else "DISABLED")
    print(f"{'context':>8} {'mlx sdpa µs':>12} {'kernels µs':>11} {'speedup':>8} {'max |diff|':>11}")
    for n in [int(c) for c in args.contexts.split(",")]:
        capacity = -(-n // 256) * 256
        qs = [mx.random.normal((1, heads, 1, D)).astype(mx.bfloat16) for _ in range(4)]
        k = mx.random.normal((1, kv_heads, capacity, D)).astype(mx.bfloat16)
        v = mx.random.normal((1, kv_heads, capacity, D)).astype(mx.bfloat16)
        sinks = mx.random.normal((heads,)).astype(mx.bfloat16)
        mx.eval(qs, k, v, sinks)

        def ours(i):
            return sdpa_decode(qs[i % 4], k, v, n, sinks, scale)

        def mlx(i):
            return mx.fast.scaled_dot_product_attention(qs[i % 4], k[:, :, :n], v[:, :, :n], scale=scale,
                                                        sinks=sinks)

        diff = mx.abs(ours(0).astype(mx.float32) - mlx(0).astype(mx.float32)).max().item()
        times = {}
        for label, fn in (("mlx", mlx), ("ours", ours)):
            mx.eval([fn(i) for i in range(3)])
            t0 = time.perf_counter()
            mx.eval([fn(i) for i in range(args.iters)])
            times[label] = (time.perf_counter() - t0) / args.iters * 1e6
        print(f"{n:>8} {times['mlx']:>12.1f} {times['ours']:>11.1f} {times['mlx'] / times['ours']:>7.2f}x {diff:>11.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
