#!/usr/bin/env python3
"""Load time and peak memory of a random full-size checkpoint (default: gpt-oss-20b).

    python scripts/bench_load.py --dir /tmp/gpt-oss-20b-random [--preset 20b] [--make]

``--make`` first writes the random checkpoint in the published Hugging Face layout (on the GPU
machine it is generated on the GPU). The load is then measured in a fresh process, so the peak
reflects loading alone: MLX's peak memory, the process's max RSS, the weights' size on disk, and
a short forward pass to prove the model runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path



def measure(directory: Path) -> dict:
    import mlx.core as mx

    from gptoss_mlx.loading import load_model

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model = load_model(directory)
    load_s = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    active = mx.get_active_memory()
    cache = model.make_cache()
    t0 = time.perf_counter()
    logits = model(mx.array([[200006, 1428, 200008, 24912]]), cache=cache)
    mx.eval(logits)
    first_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {
        "device": str(mx.default_device()),
        "load_s": round(load_s, 2),
        "weights_on_disk_gb": round(disk / 1e9, 3),
        "active_after_load_gb": round(active / 1e9, 3),
        "peak_during_load_gb": round(peak / 1e9, 3),
        "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "first_forward_s": round(first_s, 3),
        "logits_finite": bool(mx.isfinite(logits).all().item()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--make", action="store_true", help="write the random checkpoint first")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.dir)))
        return
    if args.make:
        from gptoss_mlx.testing import checkpoints as mtc

        t0 = time.perf_counter()
        mtc.write_hf(args.dir, mtc.PRESETS[args.preset])
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.1f}s", flush=True)
    out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--measure-only"],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["preset"] = args.preset
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
