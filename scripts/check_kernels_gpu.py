#!/usr/bin/env python3
"""Run every custom kernel on the GPU against its plain-MLX reference (step 4 of the toolchain).

    python scripts/check_kernels_gpu.py [--kernels NAME,...] [--iters 200] [--json OUT]

On the GPU machine (CUDA) this runs the CUDA mirror of each Metal kernel (metal/msl_cuda.h);
on a Mac it runs the Metal kernel itself. For every kernel, activation dtype and sample input
(edge shapes included) it prints the max relative error against the reference and the time per
call of kernel and reference, then the run-time check's verdict (what GPTOSS_MLX_KERNELS=check
would decide). Exits 1 if any kernel is outside its tolerance or fails to build.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path



def time_call(fn, iters: int) -> float:
    """Microseconds per call: ``iters`` calls built into one graph and evaluated together, as a
    decode step does (graph building included, one synchronisation for all of them)."""
    import mlx.core as mx

    mx.eval([fn() for _ in range(3)])
    t0 = time.perf_counter()
    mx.eval([fn() for _ in range(iters)])
    return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", help="comma-separated kernel names (default: all)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)

    import mlx.core as mx

    from gptoss_mlx.kernels import registry
    from gptoss_mlx.kernels.launch import gpu_backend
    from gptoss_mlx.testing.samples import samples

    backend = gpu_backend()
    if backend is None:
        print("no GPU backend: run this on the GPU machine or a Mac", file=sys.stderr)
        return 2
    names = args.kernels.split(",") if args.kernels else list(registry.REGISTRY)
    print(f"backend: {backend}, MLX {mx.__version__}, device: {mx.default_device()}")
    print(f"{'kernel':<16} {'dtype':<9} {'sample':<36} {'max err':>9} {'tol':>7} {'kernel µs':>10} {'ref µs':>9}")
    rows, failed = [], False
    for name in names:
        spec = registry.REGISTRY[name]
        for dtype in spec.dtypes:
            for sample in samples(name, dtype):
                shapes = " ".join(
                    "x".join(map(str, a.shape)) if isinstance(a, mx.array) and a.ndim else "s"
                    for a in sample
                )
                try:
                    got = spec.launch(*sample)
                    mx.eval(got)
                    err = registry.max_error(got, spec.expected(*sample))
                    t_kernel = time_call(lambda: spec.launch(*sample), args.iters)
                    t_ref = time_call(lambda: spec.reference(*sample), args.iters)
                except Exception as e:  # report and go on with the other kernels
                    print(f"{name:<16} {str(dtype).split('.')[-1]:<9} {shapes:<36} FAILED: {e}")
                    rows.append({"kernel": name, "dtype": str(dtype), "sample": shapes, "error": str(e)})
                    failed = True
                    continue
                ok = err <= registry.tolerance(dtype)
                failed |= not ok
                print(f"{name:<16} {str(dtype).split('.')[-1]:<9} {shapes:<36} {err:>9.2e} {registry.tolerance(dtype):>7.0e} "
                      f"{t_kernel:>10.1f} {t_ref:>9.1f}{'' if ok else '  <-- OUTSIDE TOLERANCE'}")
                rows.append({"kernel": name, "dtype": str(dtype), "sample": shapes, "max_error": err,
                             "tolerance": registry.tolerance(dtype), "kernel_us": t_kernel, "reference_us": t_ref})
    print("\nrun-time check (GPTOSS_MLX_KERNELS=check):")
    registry.reset()
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for name, state, _ in registry.status(dtype):
            if name in names:
                print(f"  {name:<16} {str(dtype).split('.')[-1]:<9} {state}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
