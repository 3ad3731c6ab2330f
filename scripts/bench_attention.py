#!/usr/bin/env python3
"""Attention alone at 20b's shapes: our kernels vs MLX's sdpa with sinks.

    python scripts/bench_attention.py [--contexts 128,1024,8192,32768] [--iters 100]
                                      [--chunk 2048] [--history 0,14336,30720]

64 query heads over 8 KV heads, head_dim 64, bf16, sinks.
Decode (one query token), for each context length: µs per call (``--iters`` calls built into
one graph and evaluated together) of the kernel pair (sdpa_decode_partial + combine, reading
the cache buffer directly) and of ``mx.fast.scaled_dot_product_attention`` on the cache view.
Prefill (a ``--chunk``-token chunk after each ``--history``), per layer kind: ms per call and
the peak memory above the inputs of sdpa_prefill and of MLX's sdpa as the model calls it — a
sliding layer with the (chunk, keys) window mask over the ring's last 127 keys plus the chunk,
a full layer with "causal" over the whole history. Max differences are printed too.
"""

from __future__ import annotations

import argparse
import sys
import time

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="128,1024,8192,32768")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--history", default="0,14336,30720")
    args = ap.parse_args()

    import mlx.core as mx

    from gptoss_mlx.kernels import registry

    print(f"device: {mx.default_device()}, MLX {mx.__version__}; 64 q heads / 8 kv heads, D 64, bf16")
    for name in ("sdpa_decode_partial", "sdpa_decode_combine", "sdpa_prefill"):
        print(f"  run-time check {name}:", "active" if registry.active(name, mx.bfloat16) else "DISABLED")
    if args.contexts:
        decode_table([int(c) for c in args.contexts.split(",")], args.iters)
    if args.history:
        prefill_table(args.chunk, [int(h) for h in args.history.split(",")], max(3, args.iters // 20))
    return 0


HEADS, KV_HEADS, D, WINDOW = 64, 8, 64, 128


def _time(fn, iters: int) -> float:
    """Seconds per call: ``iters`` calls in one graph, after three warm-up calls."""
    import mlx.core as mx

    mx.eval([fn(i) for i in range(3)])
    t0 = time.perf_counter()
    mx.eval([fn(i) for i in range(iters)])
    return (time.perf_counter() - t0) / iters


def _max_diff(a, b) -> float:
    import mlx.core as mx

    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def _inputs(queries: int, keys: int, n_q: int):
    """n_q query sets (1, HEADS, queries, D), keys and values (1, KV_HEADS, keys, D), sinks; bf16."""
    import mlx.core as mx

    qs = [mx.random.normal((1, HEADS, queries, D)).astype(mx.bfloat16) for _ in range(n_q)]
    k = mx.random.normal((1, KV_HEADS, keys, D)).astype(mx.bfloat16)
    v = mx.random.normal((1, KV_HEADS, keys, D)).astype(mx.bfloat16)
    sinks = mx.random.normal((HEADS,)).astype(mx.bfloat16)
    mx.eval(qs, k, v, sinks)
    return qs, k, v, sinks


def decode_table(contexts: list[int], iters: int) -> None:
    import mlx.core as mx

    from gptoss_mlx.kernels.attention import sdpa_decode

    scale = D ** -0.5
    print("\ndecode: one query token")
    print(f"{'context':>8} {'mlx sdpa µs':>12} {'kernels µs':>11} {'speedup':>8} {'max |diff|':>11}")
    for n in contexts:
        qs, k, v, sinks = _inputs(1, -(-n // 256) * 256, 4)  # a cache buffer grown in steps of 256

        def ours(i):
            return sdpa_decode(qs[i % 4], k, v, n, sinks, scale)

        def mlx(i):
            out = mx.fast.scaled_dot_product_attention(qs[i % 4], k[:, :, :n], v[:, :, :n], scale=scale,
                                                       sinks=sinks)
            return out.transpose(0, 2, 1, 3)  # token-major, as the kernels return it

        diff = _max_diff(ours(0), mlx(0))
        times = {label: _time(fn, iters) * 1e6 for label, fn in (("mlx", mlx), ("ours", ours))}
        print(f"{n:>8} {times['mlx']:>12.1f} {times['ours']:>11.1f} {times['mlx'] / times['ours']:>7.2f}x {diff:>11.3g}")


def prefill_table(chunk: int, histories: list[int], iters: int) -> None:
    import mlx.core as mx

    from gptoss_mlx.kernels.attention import sdpa_prefill
    from gptoss_mlx.ops import window_mask

    scale = D ** -0.5
    print(f"\nprefill: a {chunk}-token chunk after each history; ms per call, peak MB above the inputs")
    print(f"{'layer':>8} {'history':>8} {'keys':>6} {'mlx ms':>8} {'ours ms':>8} {'speedup':>8} "
          f"{'mlx MB':>8} {'ours MB':>8} {'max |diff|':>11}")
    for window in (WINDOW, None):
        for history in histories:
            K = chunk + (min(history, WINDOW - 1) if window else history)
            qs, k, v, sinks = _inputs(chunk, K, 2)

            def ours(i):
                return sdpa_prefill(qs[i % 2], k, v, sinks, scale, window)

            def mlx(i):  # as the model calls it: a mask array only where causality is not enough
                mask = window_mask(chunk, K, window) if window and K > WINDOW else "causal"
                out = mx.fast.scaled_dot_product_attention(qs[i % 2], k, v, scale=scale, mask=mask, sinks=sinks)
                return out.transpose(0, 2, 1, 3)

            diff = _max_diff(ours(0), mlx(0))
            times, peaks = {}, {}
            for label, fn in (("mlx", mlx), ("ours", ours)):
                times[label] = _time(fn, iters) * 1e3
                mx.synchronize()
                base = mx.get_active_memory()
                mx.reset_peak_memory()
                mx.eval(fn(0))
                peaks[label] = (mx.get_peak_memory() - base) / 1e6
            kind = "sliding" if window else "full"
            print(f"{kind:>8} {history:>8} {K:>6} {times['mlx']:>8.2f} {times['ours']:>8.2f} "
                  f"{times['mlx'] / times['ours']:>7.2f}x {peaks['mlx']:>8.0f} {peaks['ours']:>8.0f} {diff:>11.3g}")


if __name__ == "__main__":
    sys.exit(main())
