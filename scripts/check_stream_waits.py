#!/usr/bin/env python3
"""Streamed decode passes whose device waits for the host (``expert_pool.HostWaits``, CUDA
only) must compute what the resident model does: logits bit for bit against it and against the
same pool reading each layer's routing back, turn after turn with evictions on every pass; an
error on the host's side ends its pass at once (no kernel left waiting) and the next pass runs;
then the engine's own sequence (a 128-token prompt prefilled, then decode) after a reset, and
after the pool was emptied, each way of answering (``bench_streaming.py --rounds`` found a pass
there whose first layer waited until its limit: stacks are dumped if one takes over 8 s); then
decode time read back, waiting with the host letting each layer go, and waiting with the copy
stream letting it go (the default), interleaved.

    python3 -m gptoss_mlx.testing.checkpoints /tmp/w20 --preset 20b --layers 4
    python3 scripts/check_stream_waits.py /tmp/w20 [--extra-slots 8] [--tokens 24]
"""

from __future__ import annotations

import argparse
import faulthandler
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gptoss_mlx.loading import load_model, read_config
from gptoss_mlx.memory import plan


def differing(a: mx.array, b: mx.array) -> str:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return "equal" if np.array_equal(a, b) else f"{int((a != b).sum())} of {a.size} differ (max {float(np.abs(a - b).max()):.3g})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--extra-slots", type=int, default=8, help="pool slots beyond one layer's experts")
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens per turn and per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wait-limit", type=float, default=10.0, help="seconds a layer waits for the host")
    a = ap.parse_args()
    from gptoss_mlx import expert_pool

    expert_pool.WAIT_LIMIT_S = a.wait_limit  # (read when the wait kernel is first built)
    config = read_config(a.dir)
    resident = load_model(a.dir)
    pooled = [load_model(a.dir, memory_plan=plan(config, 64, 16, 1e12,
                                                  expert_slots=config.num_local_experts + a.extra_slots))
              for _ in range(2)]
    for model, waits in zip(pooled, (True, False)):
        model.expert_pool.set_transfer("cuda")
        model.expert_pool.set_waits(waits)
    pool = pooled[0].expert_pool
    passes = []
    answer = pool._answer
    pool._answer = lambda waiting, *rest: (passes.append(len(waiting)), answer(waiting, *rest))[1]
    print(f"{config.num_hidden_layers} layers, pool of {pool.slots} slots for {config.num_local_experts} "
          f"experts a layer, transfer {pool.transfer}, each layer let go by the "
          f"{'host' if pool.waits.stream is None else 'copy stream'}", flush=True)

    failures = 0
    rng = np.random.default_rng(0)
    for turn in range(3):
        caches = [m.make_cache() for m in (resident, *pooled)]
        chunk = rng.integers(0, config.vocab_size, 20 + 7 * turn).tolist()
        for step in range(a.tokens):
            logits = [m(mx.array([chunk]), cache=c) for m, c in zip((resident, *pooled), caches)]
            verdicts = [differing(logits[0], logits[1]), differing(logits[1], logits[2])]
            if verdicts != ["equal", "equal"]:
                failures += 1
                print(f"turn {turn} step {step} ({len(chunk)} tokens): waits vs resident {verdicts[0]}, "
                      f"waits vs read back {verdicts[1]}", flush=True)
            chunk = [int(mx.argmax(logits[0][0, -1]).item())]
    print(f"3 turns of {a.tokens} passes: {failures} differed; {len(passes)} passes waited "
          f"({set(passes)} layers each); pool: {pool.stats.summary()}", flush=True)

    # An error on the host's side: the pass fails at once, the next one runs.
    decide = pool._decide

    def broken(layer, *rest, **kw):
        if layer == 1:
            raise OSError("a read failed (on purpose)")
        return decide(layer, *rest, **kw)

    cache = pooled[0].make_cache()
    pooled[0](mx.array([[1, 2, 3]]), cache=cache)
    pool._decide = broken
    t0 = time.perf_counter()
    try:
        pooled[0](mx.array([[4]]), cache=cache)
        print("the broken pass did not fail", flush=True)
        failures += 1
    except OSError as e:
        print(f"the broken pass failed in {time.perf_counter() - t0:.3f}s: {e}", flush=True)
    pool._decide = decide
    fresh = [m.make_cache() for m in (resident, pooled[0])]
    outs = [m(mx.array([[9, 8, 7, 6]]), cache=c) for m, c in zip((resident, pooled[0]), fresh)]
    outs = [m(mx.array([[5]]), cache=c) for m, c in zip((resident, pooled[0]), fresh)]
    print(f"the pass after it: {differing(*outs)}", flush=True)
    failures += differing(*outs) != "equal"

    # The engine's sequence, as bench_streaming.py --rounds runs it before each row.
    from gptoss_mlx.generate import Engine, SamplingParams

    engine, prompt = Engine(pooled[0], max_context=4096), rng.integers(0, config.vocab_size, 128).tolist()
    for label, empty, host in (("reset", False, False), ("reset, pool emptied", True, False),
                               ("reset, pool emptied, host answers", True, True), ("reset", False, False)):
        pool.set_waits(True, host_answers=host)
        if empty:
            pool._wait_for_copies()
            mx.synchronize()
            pool._release(np.arange(pool.slots))
        engine.reset()
        faulthandler.dump_traceback_later(8)
        t0 = time.perf_counter()
        try:
            engine.prefill(prompt)
            made = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=8), stop_tokens=frozenset()))
            print(f"engine after {label}: {len(made)} tokens in {time.perf_counter() - t0:.2f}s", flush=True)
        except RuntimeError as e:
            failures += 1
            print(f"engine after {label}: FAILED in {time.perf_counter() - t0:.1f}s: {e}", flush=True)
        faulthandler.cancel_dump_traceback_later()

    # Decode time, each mode in turn on one model.
    model = pooled[0]
    rates = {"read back": [], "host answers": [], "stream answers": []}
    for r in range(a.rounds):
        for waits in rates:
            model.expert_pool.set_waits(waits != "read back", host_answers=waits == "host answers")
            cache = model.make_cache()
            model(mx.array([rng.integers(0, config.vocab_size, 32).tolist()]), cache=cache)
            token = mx.array([[1]])
            t0 = time.perf_counter()
            for _ in range(a.tokens):
                token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
            mx.eval(token)
            rates[waits].append((time.perf_counter() - t0) / a.tokens * 1e3)
        print(f"round {r + 1} (ms/token): " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()), flush=True)
    print("median (ms/token): " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in rates.items())
          + f" ({config.num_hidden_layers} layers)")
    print("FAILED" if failures else "OK", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    from gptoss_mlx.engine_thread import engine_thread

    raise SystemExit(engine_thread().call(main))  # (all MLX work on the engine's thread, as the engine's own)
