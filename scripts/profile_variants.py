#!/usr/bin/env python3
"""GPU time per decode token in the model for each layout of the expert kernels (kernels/moe.py
``VARIANTS``), from Nsight Compute, in one profiled process.

    python scripts/profile_variants.py --dir /tmp/g20 [--variants all] [--steps 3]

The model decodes ``--steps`` tokens after a 128-token prompt (two warm-up tokens first) once per
variant, "base" first and again last (the two show the run's drift), with
``ncu --clock-control none --metrics gpu__time_duration.sum``; per variant the kernels and GPU
time per token and the two expert kernels' share. ``scripts/bench_moe.py --ncu`` times the
variants on the MoE block alone; this is the measure that decides ``VARIANT``: in the model
the experts' inputs come out of the kernels before them, and the other kernels run between.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

def worker(directory: Path, variants: list[str], steps: int) -> int:
    from bench import random_prompt
    from gptoss_mlx.generate import SamplingParams, make_sampler
    from gptoss_mlx.kernels import moe, registry
    from gptoss_mlx.loading import load_model
    from profile_decode import PROMPT, decode_between_markers

    prompt = random_prompt(PROMPT, 1)
    model = load_model(directory)
    sample = make_sampler(SamplingParams(temperature=0), model.config.vocab_size)
    os.environ[registry.ENV_VAR] = "check"
    for n, variant in enumerate(variants):
        moe.VARIANT = moe.VARIANTS[variant]
        registry.reset()  # each variant's kernels pass the run-time check before they are timed
        decode_between_markers(model, sample, prompt, f"v{n}", steps)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="a checkpoint (python -m gptoss_mlx.testing.checkpoints)")
    ap.add_argument("--variants", default="all", help="comma-separated names of kernels/moe.py VARIANTS, or 'all'")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # runs under ncu
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gptoss_mlx.kernels.moe import VARIANTS

    names = [v for v in VARIANTS if v != "base"] if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    variants = ["base"] + [v for v in names if v != "base"] + ["base"]
    if args.worker:
        return worker(args.dir, variants, args.steps)

    from profile_decode import PROMPT, families, profile, ranges

    run, rows = profile(args.ncu, [sys.executable, __file__, "--worker", "--dir", str(args.dir),
                                   "--variants", ",".join(names), "--steps", str(args.steps)])
    measured = ranges(rows)
    if run.returncode or len(measured) != len(variants):
        print(run.stdout[-3000:], run.stderr[-3000:])
        return 1
    print(f"GPU time per decode token by expert-kernel variant (ncu gpu__time_duration.sum, "
          f"--clock-control none, {args.steps} tokens after {PROMPT}; 'base' first and last)")
    print("| variant | kernels / token | GPU ms / token | gate/up µs | down µs |")
    print("|---|---|---|---|---|")
    for n, variant in enumerate(variants):
        kernels = measured[f"v{n}"]
        fam = families(kernels, args.steps)
        print(f"| {variant} | {len(kernels) / args.steps:.0f} | {sum(k.us for k in kernels) / args.steps / 1e3:.3f} | "
              f"{fam.get('moe_gate_up_swiglu', (0.0, 0))[0]:.1f} | {fam.get('moe_down_combine', (0.0, 0))[0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
