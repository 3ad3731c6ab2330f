#!/usr/bin/env python3
"""The compiled decode step (gptoss_mlx/decode_step.py) against the uncompiled one on a checkpoint,
three steps in lockstep from the same prompt, each fed the uncompiled step's greedy token:

- ``plain``: the model's usual decode step (its caches, attention over exactly the filled keys);
- ``storage``: decode_step's step run through the plain forward: StepCache, attention over the
  whole storage through a mask (what the compiled step computes, without mx.compile);
- ``compiled``: the same under mx.compile (traced once per full-layer capacity, fused).

    python scripts/check_compiled_decode.py --dir /tmp/g20 [--prompt 120] [--steps 300]

Per pair it prints the steps with bit-identical logits, the largest difference relative to the
step's largest |logit| (median and max over steps) and the steps whose argmax differs. On the CPU
all three are identical (tests/test_decode_step.py). On a GPU, plain vs storage is rounding (the
masked attention sums in another order), which sets the scale; storage vs compiled is what
mx.compile and our kernels inside it change: it must stay at that scale. Also the median host ms
per step (build + queue) of plain and compiled. A prompt just under 128 tokens crosses the sliding
window's wrap early; past 256 positions the full layers' storage grows. Exits 1 when storage vs
compiled is more than 10x plain vs storage at its worst step.
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
    names = ("plain", "storage", "compiled")
    caches = {name: PromptCache(model.make_cache()) for name in names}
    steps = {"storage": CompiledDecode(model, compiled=False), "compiled": CompiledDecode(model)}
    logits = {name: forward(model, caches[name], prompt) for name in names}
    pairs = (("plain", "storage"), ("storage", "compiled"), ("plain", "compiled"))
    identical = {p: 0 for p in pairs}
    relative = {p: [] for p in pairs}
    argmax_differs = {p: 0 for p in pairs}
    times = {"plain": [], "compiled": []}
    fallbacks = 0
    token = mx.argmax(logits["plain"], axis=-1)
    for _ in range(args.steps):
        for name in names:
            t0 = time.perf_counter()
            out = None if name == "plain" else steps[name](token, caches[name].cache)
            if out is None:  # plain, or where the decode attention kernels take over (2048 keys)
                fallbacks += name != "plain"
                out = model(token.reshape(1, 1), cache=caches[name].cache, sampled=True)[:, -1, :]
            mx.async_eval(out)
            t1 = time.perf_counter()
            mx.eval(out)
            if name in times:
                times[name].append(t1 - t0)
            logits[name] = out.astype(mx.float32)
        scale = mx.abs(logits["plain"]).max().item()
        for a, b in pairs:
            identical[(a, b)] += mx.array_equal(logits[a], logits[b]).item()
            relative[(a, b)].append(mx.abs(logits[a] - logits[b]).max().item() / scale)
            argmax_differs[(a, b)] += (mx.argmax(logits[a]) != mx.argmax(logits[b])).item()
        token = mx.argmax(logits["plain"], axis=-1)
    print(f"device {mx.default_device()}, MLX {mx.__version__}, {args.dir}: {args.prompt}-token prompt, "
          f"{args.steps} steps, each fed plain's greedy token; compiled traced {steps['compiled'].traces} times, "
          f"fell back {steps['compiled'].failed}, steps run uncompiled {fallbacks}")
    print("| pair | identical steps | max |diff| / max |logit|: median | max | argmax differs |")
    print("|---|---|---|---|---|")
    for (a, b) in pairs:
        r = relative[(a, b)]
        print(f"| {a} vs {b} | {identical[(a, b)]}/{args.steps} | {statistics.median(r):.2e} | {max(r):.2e} "
              f"| {argmax_differs[(a, b)]} |")
    for name, values in times.items():
        print(f"{name}: host ms per step (build + queue), median {1e3 * statistics.median(values[2:]):.2f}")
    floor = max(relative[("plain", "storage")])
    return 1 if max(relative[("storage", "compiled")]) > 10 * max(floor, 1e-6) else 0


if __name__ == "__main__":
    sys.exit(main())
