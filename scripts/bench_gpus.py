#!/usr/bin/env python3
"""Several GPUs of one host (NCCL, started as mlx.launch starts it): tensor parallel against one
GPU, in decode tokens per second and in agreement.

    python scripts/bench_gpus.py --dir /tmp/g20 [--ranks 2] [--rounds 3] [--tokens 128]
    python scripts/bench_gpus.py --dir /tmp/oi/tiny --backend ring     # the same on a CPU

Each run (one GPU, then ``--ranks`` ranks) is its own set of processes. Rank 0 prints:

- decode tokens per second, ``--rounds`` greedy generations of ``--tokens`` after a 128-token
  prompt (bf16, the first round after a warm-up);
- the hidden state after every layer for a 16-token prompt in float32, with our kernels and
  without them (``GPTOSS_MLX_KERNELS=off``).

Agreement is judged against a yardstick from the same run: how far one GPU's own kernels move
the hidden state from the plain-MLX path. Random weights route their tokens by near-ties, so
any change of rounding (the all-reduce's order, a kernel's) flips an expert somewhere within a
few layers and the states part from there: compare the layers before the first flip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = 128
LAYER_PROMPT = 16


def rank_worker(directory: str, out: str, rounds: int, tokens: int) -> None:
    import mlx.core as mx
    import numpy as np

    from gptoss_mlx import distributed
    from gptoss_mlx.engine_thread import engine_thread
    from gptoss_mlx.generate import Engine, SamplingParams
    from gptoss_mlx.loading import load_model

    group = distributed.join() if distributed.launched_backend() else None
    rank = group.rank() if group else 0
    results = {}

    def layers() -> None:  # every rank runs every layer's collectives; rank 0 keeps the states
        model = load_model(directory, mx.float32, group=group, sharding="tensor")
        x = model.embed_tokens(mx.array([[(i * 7919) % 200000 for i in range(LAYER_PROMPT)]]))
        states = []
        for layer in model.layers:
            x = layer(x, None)
            mx.eval(x)
            states.append(np.array(x))
        results["layers"] = np.stack(states)

    def decode() -> None:
        model = load_model(directory, mx.bfloat16, group=group, sharding="tensor")
        vocab = model.config.vocab_size
        if rank > 0:
            distributed.follow(Engine(model, max_context=4096), group)
            return
        engine = distributed.Leader(model, group, 4096) if group else Engine(model, 4096)
        prompts = [[(i * 7919 + r) % vocab for i in range(PROMPT)] for r in range(rounds + 1)]
        rates = []
        for r, prompt in enumerate(prompts):
            got = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=tokens), stop_tokens=()))
            if r == 0:
                results["tokens"] = np.array(got)
            else:
                rates.append(engine.stats.generated_tokens / engine.stats.decode_s)
        results["rates"] = np.array(rates)
        if group:
            engine.close()

    engine_thread().call(layers)
    engine_thread().call(decode)
    if rank == 0:
        np.savez(out, **results)


def run(args, ranks: int, out: Path, kernels: str) -> None:
    command = [sys.executable, __file__, "--dir", args.dir, "--rank-worker", str(out),
               "--rounds", str(args.rounds), "--tokens", str(args.tokens)]
    env = {**os.environ, "GPTOSS_MLX_KERNELS": kernels}
    if ranks > 1:
        command = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
                   "-n", str(ranks), "--backend", args.backend, "--", *command]
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
    elif args.backend == "nccl":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode or not out.exists():
        sys.exit(f"{ranks} rank(s), kernels {kernels}: exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def relative(a, b) -> list[float]:
    return [float(abs(x - y).max() / abs(x).max()) for x, y in zip(a, b)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="a checkpoint (python -m gptoss_mlx.testing.checkpoints)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", default="nccl", choices=["nccl", "ring"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        return rank_worker(args.dir, args.rank_worker, args.rounds, args.tokens)

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for ranks in (1, args.ranks):
            for kernels in ("auto", "off"):
                out = Path(tmp) / f"{ranks}-{kernels}.npz"
                run(args, ranks, out, kernels)
                got[ranks, kernels] = dict(np.load(out))
    one, many = got[1, "auto"], got[args.ranks, "auto"]
    rows = [("one process (one GPU)", one), (f"{args.ranks} ranks, tensor ({args.backend})", many)]
    print(f"decode tok/s, {args.rounds} rounds of {args.tokens} greedy tokens after {PROMPT} (bf16):")
    for name, r in rows:
        print(f"  {name:28s} {' / '.join(f'{x:.1f}' for x in r['rates'])}  (median {np.median(r['rates']):.1f})")
    ratio = np.median(many["rates"] / one["rates"])
    print(f"  {args.ranks} ranks against one process: {ratio:.2f}x (median of per-round ratios)")
    same = next((i for i, (a, b) in enumerate(zip(one["tokens"], many["tokens"])) if a != b), len(one["tokens"]))
    print(f"greedy tokens (bf16): the same for the first {same} of {len(one['tokens'])}")
    print(f"hidden state after each layer, float32, {LAYER_PROMPT}-token prompt: max |difference| / max |value|")
    pairs = {f"{args.ranks} ranks against one (our kernels)": (one["layers"], many["layers"]),
             f"{args.ranks} ranks against one (kernels off)": (got[1, "off"]["layers"], got[args.ranks, "off"]["layers"]),
             "yardstick: one process, our kernels against off": (one["layers"], got[1, "off"]["layers"])}
    for name, (a, b) in pairs.items():
        print(f"  {name:48s} " + " ".join(f"{x:.0e}" for x in relative(a, b)))
    print(json.dumps({"rates_one": one["rates"].tolist(), "rates_many": many["rates"].tolist(),
                      "ratio": float(ratio), "greedy_same": same}))


if __name__ == "__main__":
    main()
