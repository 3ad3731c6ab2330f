#!/usr/bin/env python3
"""The compiled decode step (gptoss_mlx/decode_step.py) against the uncompiled one on a checkpoint:
both decode greedily side by side from the same prompt, every step's logits compared.

    python scripts/check_compiled_decode.py --dir /tmp/g20 [--prompt 120] [--steps 300]

Prints how many steps had bit-identical logits, the largest difference, whether the greedy
tokens agreed, how often MLX traced the step (once per full-layer capacity: 256 slots) and the
median host ms per step of each (build + queue, the step then evaluated). On the CPU every step
must be identical (tests/test_decode_step.py); on a GPU this is where the custom kernels run
inside mx.compile. A prompt just under 128 tokens crosses the sliding window's wrap early; past
256 positions the full layers' storage grows. Exits 1 when a greedy token differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="the checkpoint")
    ap.add_argument("--prompt", type=int, default=120, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=300, help="decode steps")
    args = ap.parse_args()

    import mlx.core as mx

    from gptoss_mlx.decode_step import CompiledDecode
    from gptoss_mlx.generate import PromptCache, forward
    from gptoss_mlx.loading import load_model

    model = load_model(args.dir)
    prompt = [(i * 7919) % min(model.config.vocab_size, 200000) for i in range(args.prompt)]
    plain, compiled = PromptCache(model.make_cache()), PromptCache(model.make_cache())
    step = CompiledDecode(model)
    a, b = forward(model, plain, prompt), forward(model, compiled, prompt)
    ya, yb = mx.argmax(a, axis=-1), mx.argmax(b, axis=-1)
    identical, worst, first_token_diff, times = 0, 0.0, None, {"uncompiled": [], "compiled": []}
    for n in range(args.steps):
        t0 = time.perf_counter()
        a = model(ya.reshape(1, 1), cache=plain.cache)[:, -1, :]
        mx.async_eval(a)
        t1 = time.perf_counter()
        mx.eval(a)
        t2 = time.perf_counter()
        b = step(yb, compiled.cache)
        if b is None:  # where the decode attention kernels take over (2048 keys on a GPU)
            b = model(yb.reshape(1, 1), cache=compiled.cache)[:, -1, :]
        mx.async_eval(b)
        t3 = time.perf_counter()
        mx.eval(b)
        times["uncompiled"].append(t1 - t0)
        times["compiled"].append(t3 - t2)
        identical += mx.array_equal(a, b).item()
        worst = max(worst, mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item())
        ya, yb = mx.argmax(a, axis=-1), mx.argmax(b, axis=-1)
        if first_token_diff is None and ya.item() != yb.item():
            first_token_diff = n
    print(f"device {mx.default_device()}, MLX {mx.__version__}, {args.dir}: {args.prompt}-token prompt, "
          f"{args.steps} steps")
    print(f"identical logits: {identical}/{args.steps} steps; largest |difference| {worst:.3g}; "
          f"greedy tokens {'agree' if first_token_diff is None else f'differ from step {first_token_diff}'}; "
          f"traces {step.traces}; compiled fell back: {step.failed}")
    for name, values in times.items():
        print(f"{name}: host ms per step (build + queue), median {1e3 * statistics.median(values[2:]):.2f}")
    return 0 if first_token_diff is None else 1


if __name__ == "__main__":
    sys.exit(main())
