#!/usr/bin/env python3
"""Our engine vs mlx-lm's gpt_oss on the same random weights, in the same run.

    python scripts/bench.py --dir /tmp/gpt-oss-20b-random --make --preset 20b
    python scripts/bench.py --dir /tmp/tiny --make --preset tiny --prompts 128,512 --history 512

For each engine (each in its own process, so peak memory is its own): prefill tok/s at each
prompt length (time to the first token; second of two runs, as the first JIT-compiles), decode
tok/s after a short prompt (median of five), the time to first token of a follow-up turn after
``--history`` tokens, and peak memory during the longest prefill.
The follow-up turn diverges right after the first turn's prompt, as a chat does once the reply's
reasoning is dropped: our prompt cache rewinds to it; mlx-lm's cache cannot rewind its
ring buffers, so a client must prefill the whole conversation again (its cold time is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path



DECODE_SEEDS = (2, 5, 6, 7, 8)  # decode is timed five times (after a 128-token prompt); the median counts


def random_prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1000, 199000) for _ in range(n)]


def ours_decode_rate(model, seed: int, tokens: int, compile_decode: bool | None = None) -> float:
    """Our engine's decode tok/s over ``tokens`` greedy tokens after a 128-token prompt
    (``compile_decode``: Engine's)."""
    from gptoss_mlx.generate import Engine, SamplingParams

    engine = Engine(model, compile_decode=compile_decode)
    list(engine.generate(random_prompt(128, seed), SamplingParams(temperature=0, max_tokens=tokens),
                         stop_tokens=frozenset()))
    return engine.stats.decode_tps


def mlx_lm_decode_rate(model, seed: int, tokens: int) -> float:
    """mlx-lm's decode tok/s, measured the same way (from the first token on)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    count, t_first = 0, None
    for tok, _ in generate_step(mx.array(random_prompt(128, seed)), model, max_tokens=tokens,
                                sampler=lambda logits: mx.argmax(logits, axis=-1)):
        tok = tok.item() if hasattr(tok, "item") else tok
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - t_first)


def bench_ours(directory: Path, prompts: list[int], decode: int, history: int) -> dict:
    import mlx.core as mx

    from gptoss_mlx.generate import Engine, SamplingParams
    from gptoss_mlx.loading import load_model

    model = load_model(directory)
    weights_gb = mx.get_active_memory() / 1e9
    greedy = SamplingParams(temperature=0, max_tokens=1)
    out = {"weights_gb": round(weights_gb, 2), "prefill_tps": {}}
    list(Engine(model).generate(random_prompt(256, 0), greedy, stop_tokens=frozenset()))  # warm-up
    for n in prompts:
        for attempt in range(2):  # the first one JIT-compiles kernels for the new shapes
            engine = Engine(model)
            mx.reset_peak_memory()
            list(engine.generate(random_prompt(n, n + attempt), greedy, stop_tokens=frozenset()))
            out["prefill_tps"][n] = round(n / engine.stats.ttft_s, 1)
            out["peak_gb_at_%d" % n] = round(mx.get_peak_memory() / 1e9, 2)
            del engine
            mx.clear_cache()
    ours_decode_rate(model, 1, 8)  # warm-up
    rates = [ours_decode_rate(model, seed, decode) for seed in DECODE_SEEDS]
    out["decode_tps"] = round(statistics.median(rates), 1)
    out["decode_tps_runs"] = [round(r, 1) for r in rates]
    # follow-up turn after `history` tokens
    engine = Engine(model)
    first = random_prompt(history, 3)
    list(engine.generate(first, SamplingParams(temperature=0, max_tokens=16), stop_tokens=frozenset()))
    cold = engine.stats.ttft_s
    follow = first + random_prompt(24, 4)
    list(engine.generate(follow, greedy, stop_tokens=frozenset()))
    out["history_cold_ttft_s"] = round(cold, 3)
    out["followup_ttft_s"] = round(engine.stats.ttft_s, 3)
    out["followup_reused_tokens"] = engine.stats.reused_tokens
    out["followup_vs_cold"] = round(engine.stats.ttft_s / cold, 4)
    return out


def bench_mlx_lm(directory: Path, prompts: list[int], decode: int, history: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(directory)
    weights_gb = mx.get_active_memory() / 1e9
    greedy = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731
    out = {"weights_gb": round(weights_gb, 2), "prefill_tps": {}}

    def ttft(tokens) -> float:
        t0 = time.perf_counter()
        for tok, _ in generate_step(mx.array(tokens), model, max_tokens=1, sampler=greedy):
            mx.eval(tok)
            break
        return time.perf_counter() - t0

    ttft(random_prompt(256, 0))  # warm-up
    for n in prompts:
        for attempt in range(2):  # the first one JIT-compiles kernels for the new shapes
            mx.reset_peak_memory()
            out["prefill_tps"][n] = round(n / ttft(random_prompt(n, n + attempt)), 1)
            out["peak_gb_at_%d" % n] = round(mx.get_peak_memory() / 1e9, 2)
            mx.clear_cache()
    mlx_lm_decode_rate(model, 1, 8)  # warm-up
    rates = [mlx_lm_decode_rate(model, seed, decode) for seed in DECODE_SEEDS]
    out["decode_tps"] = round(statistics.median(rates), 1)
    out["decode_tps_runs"] = [round(r, 1) for r in rates]
    out["history_cold_ttft_s"] = round(ttft(random_prompt(history + 40, 3)), 3)
    return out


ENGINES = {"ours": bench_ours, "ours_nokernels": bench_ours, "mlx_lm": bench_mlx_lm}


def run_engine(name: str, args) -> dict:
    """One engine in its own process. ``ours_nokernels`` is ours with GPTOSS_MLX_KERNELS=off."""
    cmd = [sys.executable, __file__, "--dir", str(args.dir), "--engine", name,
           "--prompts", args.prompts, "--decode", str(args.decode), "--history", str(args.history)]
    env = dict(os.environ)
    if name == "ours_nokernels":
        env["GPTOSS_MLX_KERNELS"] = "off"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict, prompts: list[int], history: int) -> str:
    names = list(results)
    rows = [("weights resident (GB)", "weights_gb")]
    rows += [(f"prefill {n} tok (tok/s)", ("prefill_tps", n)) for n in prompts]
    rows += [("decode (tok/s)", "decode_tps"),
             (f"peak memory, {max(prompts)}-tok prefill (GB)", f"peak_gb_at_{max(prompts)}"),
             (f"cold TTFT, {history} tok (s)", "history_cold_ttft_s"),
             (f"follow-up TTFT after {history} tok (s)", "followup_ttft_s"),
             ("follow-up / cold", "followup_vs_cold")]

    def cell(r, key):
        if isinstance(key, tuple):
            v = r.get(key[0], {}).get(str(key[1]), r.get(key[0], {}).get(key[1]))
        else:
            v = r.get(key)
        return "-" if v is None else str(v)

    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(cell(results[n], key) for n in names) + " |")
    for other, label in (("mlx_lm", "mlx-lm"), ("ours_nokernels", "ours without kernels")):
        if "ours" in results and "decode_tps" in results.get(other, {}):
            ratio = results["ours"].get("decode_tps", 0) / max(results[other]["decode_tps"], 1e-9)
            lines.append(f"| decode ours / {label} | {ratio:.2f}x |" + " |" * (len(names) - 1))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--make", action="store_true", help="write a random checkpoint first")
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--prompts", default="128,2048,16384")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--history", type=int, default=8192)
    ap.add_argument("--engines", default="ours,mlx_lm", help=f"comma-separated: {', '.join(ENGINES)}")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]
    if args.engine:  # child process
        fn = ENGINES[args.engine]
        print(json.dumps(fn(args.dir, prompts, args.decode, args.history)))
        return
    if args.make:
        from gptoss_mlx.testing import checkpoints as mtc

        mtc.write_hf(args.dir, mtc.PRESETS[args.preset])
    import mlx.core as mx

    results = {name: run_engine(name, args) for name in args.engines.split(",")}
    print(f"device: {mx.default_device()}, checkpoint: {args.dir} ({args.preset})")
    print(table(results, prompts, args.history))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
