#!/usr/bin/env python3
"""The compiled decode step (gptoss_mlx/decode_step.py) against the uncompiled one on a checkpoint,
three steps in lockstep from the same prompt, each fed the uncompiled step's greedy token:

- ``plain``: the model's usual decode step (its caches, attention over exactly the filled keys);
- ``storage``: decode_step's step run through the plain forward: StepCache, attention over the
  whole storage through a mask (what the compiled step computes, without mx.compile; where the
  one-pass step attention runs, the grouped step as the plain one takes it, until 1024 keys);
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


def lockstep(model, prompt: list[int], steps: int, paths: dict, pairs: tuple, first: str) -> dict:
    """Run ``paths`` ({name: (prepare(), step(token, prompt_cache) -> logits (1, V))}) in
    lockstep: the prompt on a prompt cache of each, then ``steps`` decode steps, each fed
    ``first``'s greedy token. Per pair (a, b): identical steps, max |diff| / max |logit| per step,
    steps whose argmax differs; per path the host ms of each step (build + queue)."""
    import mlx.core as mx

    from gptoss_mlx.generate import PromptCache, forward

    caches, logits = {}, {}
    for name, (prepare, _) in paths.items():
        prepare()
        caches[name] = PromptCache(model.make_cache())
        logits[name] = forward(model, caches[name], prompt)
        mx.eval(logits[name])
    result = {"identical": {p: 0 for p in pairs}, "relative": {p: [] for p in pairs},
              "argmax_differs": {p: 0 for p in pairs}, "times": {name: [] for name in paths}, "caches": caches}
    token = mx.argmax(logits[first], axis=-1)
    for _ in range(steps):
        for name, (prepare, step) in paths.items():
            prepare()
            t0 = time.perf_counter()
            out = step(token, caches[name])
            mx.async_eval(out)
            t1 = time.perf_counter()
            mx.eval(out)
            result["times"][name].append(t1 - t0)
            logits[name] = out.astype(mx.float32)
        scale = mx.abs(logits[first]).max().item()
        for a, b in pairs:
            result["identical"][(a, b)] += mx.array_equal(logits[a], logits[b]).item()
            result["relative"][(a, b)].append(mx.abs(logits[a] - logits[b]).max().item() / scale)
            result["argmax_differs"][(a, b)] += (mx.argmax(logits[a]) != mx.argmax(logits[b])).item()
        token = mx.argmax(logits[first], axis=-1)
    return result


def report(result: dict, steps: int, timed: tuple[str, ...]) -> None:
    """The table of :func:`lockstep`'s pairs and the host times of ``timed``."""
    print("| pair | identical steps | max |diff| / max |logit|: median | max | argmax differs |")
    print("|---|---|---|---|---|")
    for (a, b), r in result["relative"].items():
        print(f"| {a} vs {b} | {result['identical'][(a, b)]}/{steps} | {statistics.median(r):.2e} | {max(r):.2e} "
              f"| {result['argmax_differs'][(a, b)]} |")
    for name in timed:
        values = result["times"][name]
        print(f"{name}: host ms per step (build + queue), median {1e3 * statistics.median(values[2:]):.2f}")


def compare(model, prompt: list[int], args, paths: dict, first: str, timed: tuple[str, ...], summary) -> int:
    """Three ``paths`` a, b, c (in that order) in :func:`lockstep`, fed ``first``'s tokens: a
    line of what ran (``summary(result)`` at its end), the table of pairs (a, b), (b, c),
    (a, c) and the host times of ``timed``. Returns 1 when b vs c is more than 10x a vs b (the
    rounding scale, at least 1e-6) at its worst step, else 0."""
    import mlx.core as mx

    a, b, c = paths
    result = lockstep(model, prompt, args.steps, paths, ((a, b), (b, c), (a, c)), first)
    print(f"device {mx.default_device()}, MLX {mx.__version__}, {args.dir}: {args.prompt}-token prompt, "
          f"{args.steps} steps, each fed {first}'s greedy token; {summary(result)}")
    report(result, args.steps, timed)
    floor = max(result["relative"][(a, b)])
    return 1 if max(result["relative"][(b, c)]) > 10 * max(floor, 1e-6) else 0


def setup(doc: str):
    """The command line of a lockstep check (``--dir``, ``--prompt``, ``--steps``) -> (args, the
    checkpoint's model, the prompt's ids)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="the checkpoint")
    ap.add_argument("--prompt", type=int, default=120, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=300, help="decode steps")
    args = ap.parse_args()

    from gptoss_mlx.loading import load_model

    model = load_model(args.dir)
    return args, model, [(i * 7919) % min(model.config.vocab_size, 200000) for i in range(args.prompt)]


def main() -> int:
    args, model, prompt = setup(__doc__)

    from gptoss_mlx.decode_step import CompiledDecode
    steps = {"storage": CompiledDecode(model, compiled=False), "compiled": CompiledDecode(model)}
    fallbacks = []

    def plain(token, pc):
        return model(token.reshape(1, 1), cache=pc.cache, sampled=True)[:, -1, :]

    def through(name):
        def step(token, pc):
            out = steps[name](token, pc.cache)
            if out is None:  # where the decode attention kernels take over (2048 keys)
                fallbacks.append(name)
                out = plain(token, pc)
            return out
        return step

    paths = {"plain": (lambda: None, plain), "storage": (lambda: None, through("storage")),
             "compiled": (lambda: None, through("compiled"))}
    return compare(model, prompt, args, paths, "plain", ("plain", "compiled"),
                   lambda result: f"compiled traced {steps['compiled'].traces} times, fell back "
                                  f"{steps['compiled'].failed}, steps run uncompiled {len(fallbacks)}")


if __name__ == "__main__":
    sys.exit(main())
