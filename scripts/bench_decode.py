#!/usr/bin/env python3
"""Decode speed of our engine (default kernels, all kernels, none) and mlx-lm's gpt_oss, interleaved.

    python scripts/bench_decode.py --dir /tmp/gpt-oss-20b-random [--make --preset 20b] [--rounds 7] [--tokens 200]

Decode rates on the GPU machine drift by +-20 % between runs of one process (clocks, host
scheduling), so timing the engines one after another confounds them with the drift. Here both
models stay loaded (same random weights) and every round times each engine once, back to back, on
the same prompt; the table gives each engine's median and the median over rounds of the per-round
ratios. "ours" runs every kernel (each passes its run-time check in the warm-up, which is then
not repeated: GPTOSS_MLX_KERNELS=on), "ours_uncompiled" the same with its decode step built in
Python per token (Engine(compile_decode=False), decode_step.py), "ours_nokernels" the plain-MLX
path (=off).
(scripts/bench.py gives everything else: prefill, memory, follow-up TTFT.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--make", action="store_true", help="write a random checkpoint first")
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_lm.utils import load_model as load_mlx_lm

    from gptoss_mlx.testing import checkpoints as mtc
    from bench import mlx_lm_decode_rate, ours_decode_rate
    from gptoss_mlx.kernels import registry
    from gptoss_mlx.loading import load_model

    if args.make:
        mtc.write_hf(args.dir, mtc.PRESETS[args.preset])
    ours = load_model(args.dir)
    theirs, _ = load_mlx_lm(args.dir)

    def ours_with(kernels: str, compile_decode: bool | None = None):
        def rate(seed):
            os.environ[registry.ENV_VAR] = kernels
            registry.reset()
            return ours_decode_rate(ours, seed, args.tokens, compile_decode)
        return rate

    ours_with("check")(1)  # warm-up: compiles and checks every kernel for these shapes
    for name, state, _ in registry.status(mx.bfloat16, check=False):
        print(f"  {name:<20} {state}")
    engines = {"ours": ours_with("on", compile_decode=True), "ours_uncompiled": ours_with("on", compile_decode=False),
               "ours_nokernels": ours_with("off"),
               "mlx_lm": lambda seed: mlx_lm_decode_rate(theirs, seed, args.tokens)}
    for rate in engines.values():
        rate(1)  # warm-up
    rates = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, rate in engines.items():
            rates[name].append(rate(10 + r))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)

    print(f"\ndevice: {mx.default_device()}, MLX {mx.__version__}, checkpoint {args.dir}; "
          f"{args.tokens} greedy tokens after a 128-token prompt, {args.rounds} interleaved rounds")
    print("| engine | median tok/s | min | max |\n|---|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    for a, b in (("ours", "mlx_lm"), ("ours", "ours_uncompiled"), ("ours", "ours_nokernels"),
                 ("ours_nokernels", "mlx_lm")):
        ratios = [x / y for x, y in zip(rates[a], rates[b])]
        print(f"{a} / {b}: median of per-round ratios {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
