"""Decode logits of the same tokens along different paths: one sequence at a time with the
kernels on and off, and a batch of sequences (the server's batch caches) against one at a time.

    python scripts/compare_decode_paths.py --dir /tmp/g20 [--dtype float32] [--rows 8] [--steps 4]

Every path is fed the same tokens (greedy, one sequence at a time, kernels off), so a difference
is the path's own; per step it prints each row's largest logit difference. On a GPU, a row that
meets a router near-tie differs by O(1) from there on (docs/measurements.md); rows that meet none
show the paths' rounding.
"""

from __future__ import annotations

import argparse
import os

import mlx.core as mx

from gptoss_mlx.cache import merge_caches
from gptoss_mlx.kernels import registry
from gptoss_mlx.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="checkpoint directory")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=24, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    model = load_model(args.dir)
    if args.dtype == "float32":
        model.set_dtype(mx.float32)
    vocab = model.config.vocab_size
    prompts = [[(i * 131 + j * 7919) % (vocab - 1000) + 100 for j in range(args.prompt)] for i in range(args.rows)]

    def kernels(mode: str) -> None:
        os.environ[registry.ENV_VAR] = mode
        registry.reset()

    def prefill(prompt):
        cache = model.make_cache()
        logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
        mx.eval(logits, [c.state for c in cache])
        return cache, logits

    def one_at_a_time(caches, tokens):
        return mx.concatenate([model(mx.array([[t]]), cache=c)[:, -1, :] for t, c in zip(tokens, caches)])

    def run(mode: str, batched: bool, steps: list[list[int]]) -> list[mx.array]:
        kernels(mode)
        caches = [prefill(p)[0] for p in prompts]
        batch = merge_caches(caches) if batched else None
        out = []
        for tokens in steps:
            logits = (model(mx.array(tokens)[:, None], cache=batch)[:, -1, :] if batched
                      else one_at_a_time(caches, tokens))
            out.append(logits.astype(mx.float32))
            mx.eval(out[-1])
        return out

    # the tokens: greedy, one sequence at a time, kernels off
    kernels("off")
    firsts = [prefill(p) for p in prompts]
    caches = [c for c, _ in firsts]
    steps = [[int(mx.argmax(logits).item()) for _, logits in firsts]]
    for _ in range(args.steps - 1):
        steps.append(mx.argmax(one_at_a_time(caches, steps[-1]), axis=-1).tolist())

    paths = {(mode, batched): run(mode, batched, steps) for mode in ("off", "on") for batched in (False, True)}
    print(f"device {mx.default_device()}, {args.dtype}, {args.rows} rows, {args.prompt}-token prompts")
    for name, a, b in [("one at a time: kernels on vs off", ("on", False), ("off", False)),
                       ("kernels off: batch vs one at a time", ("off", True), ("off", False)),
                       ("kernels on: batch vs one at a time", ("on", True), ("on", False))]:
        print(name)
        for s, (x, y) in enumerate(zip(paths[a], paths[b])):
            diffs = mx.abs(x - y).max(axis=-1).tolist()
            print(f"  step {s}: " + ", ".join(f"{d:.3g}" for d in diffs))


if __name__ == "__main__":
    main()
