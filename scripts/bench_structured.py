#!/usr/bin/env python3
"""Structured outputs: decode tok/s with and without a JSON Schema constraint, interleaved in one
run on the same weights, and the CPU time of a token mask with the real 201k-token vocabulary.

    python scripts/bench_structured.py --tokenizer ../shared/data/gpt-oss-tokenizer.json.gz \\
        --dir /tmp/g20 --make --preset 20b [--rounds 5] [--tokens 200]
    python scripts/bench_structured.py --tokenizer ... --dir /tmp/tiny --make --preset tiny --rounds 2
    python scripts/bench_structured.py --tokenizer ... --dir /tmp/tiny --make --preset tiny --host-times

Masks: llguidance's mask for each token of a realistic answer (an object with an enum, bounded
numbers and strings, an array and a nested object), and the greedy closing, timed alone.
Decode: the constrained run's tokens are inside the answer (the prompt ends with the final
channel's header), so each one waits for a mask: the worst case (sampled at temperature 1, the
random model rarely closes the array; the tokens inside it are counted). "constrained" is the engine as
it runs (the mask is computed while the device runs the step's forward); "constrained_serial"
waits for the forward first, which shows what the overlap saves.

--host-times: where the engine thread's time per decoded token goes, plain and constrained:
building the forward's graph, queueing work (mx.async_eval; on the CPU it also waits there while
the CPU computes earlier work), the constraint (reading the new token: a wait here is the
constraint waiting for the device; advancing the matcher and the harmony parser; llguidance's
mask; the budgets' checks and the mask's application), building the sampler's graph, and the
rest (the host waiting for the token, handing it over, the loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# An array of records: long enough for any --tokens, a mix of keys, enums, numbers and strings.
SCHEMA = {"type": "array", "items": {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40},
                   "kind": {"enum": ["cat", "dog", "bird"]},
                   "age": {"type": "integer", "minimum": 0, "maximum": 30},
                   "weight": {"type": "number"},
                   "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                   "owner": {"type": "object", "properties": {"email": {"type": "string"},
                                                              "vip": {"type": "boolean"}},
                             "required": ["email"]}},
    "required": ["name", "kind", "age", "tags", "owner"]}}
ANSWER = [{"name": "Rex the brave", "kind": "dog", "age": 7, "weight": 12.5, "tags": ["loyal", "good"],
           "owner": {"email": "ann@example.com", "vip": True}},
          {"name": "Tweety", "kind": "bird", "age": 2, "tags": [], "owner": {"email": "bo@example.org"}}]


def mask_times(tokenizer) -> dict:
    """Per-token CPU time of a mask (µs) and of the closing, over ANSWER's tokens."""
    import numpy as np

    from gptoss_mlx.structured import JSONScan, closing_tokens, compile_schema, ll_tokenizer
    from gptoss_mlx.tokenizer import VOCAB_SIZE

    t0 = time.perf_counter()
    ll_tokenizer(tokenizer)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = compile_schema(tokenizer, SCHEMA)
    compile_ms = 1e3 * (time.perf_counter() - t0)
    bits = np.zeros((VOCAB_SIZE + 31) // 32, dtype=np.int32)
    masks, closings = [], []
    for _ in range(3):  # the first pass fills llguidance's caches; all three are counted
        m, scan = grammar.matcher(), JSONScan()
        for token in tokenizer.encode_ordinary(json.dumps(ANSWER)):
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            masks.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            closing_tokens(tokenizer, m, scan)
            closings.append(time.perf_counter() - t0)
            assert bits[token // 32] >> (token % 32) & 1 and m.consume_token(token)
            scan.feed(tokenizer.decode_single_token_bytes(token))
    us = lambda xs, q: 1e6 * float(np.percentile(xs, q))  # noqa: E731
    return {"setup_s": setup, "compile_ms": compile_ms, "tokens": len(masks),
            "mask_median_us": us(masks, 50), "mask_p90_us": us(masks, 90), "mask_max_us": 1e6 * max(masks),
            "closing_median_us": us(closings, 50), "closing_p90_us": us(closings, 90)}


class HostTimes:
    """Seconds the engine thread spends in the decode loop's parts, by wrapping them in place."""

    PARTS = ("forward graph", "queue (async_eval)", "constraint: read token", "constraint: advance",
             "constraint: mask (llguidance)", "constraint: budgets, apply mask", "sample graph")

    def __init__(self):
        import mlx.core as mx

        from gptoss_mlx import generate, structured

        self.spent = dict.fromkeys(self.PARTS + ("constraint",), 0.0)
        self._wrap(generate.Engine, "_forward_async", "forward graph")
        self._wrap(mx, "async_eval", "queue (async_eval)")
        self._wrap(structured.HarmonyConstraint, "__call__", "constraint")
        self._wrap(structured.HarmonyConstraint, "_advance", "constraint: advance")
        self._wrap(structured.HarmonyConstraint, "_mask", "constraint: budgets, apply mask")
        make_sampler = generate.make_sampler

        def timed_sampler(*args):
            sample = make_sampler(*args)
            return lambda *a: self._timed("sample graph", sample, *a)
        generate.make_sampler = timed_sampler

    def _timed(self, part, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.spent[part] += time.perf_counter() - t0

    def _wrap(self, owner, name, part):
        fn = getattr(owner, name)
        setattr(owner, name, lambda *a, **k: self._timed(part, fn, *a, **k))

    def reset(self):
        self.spent = dict.fromkeys(self.spent, 0.0)

    def per_token_us(self, total_s: float, tokens: int, mask_s: float) -> dict:
        """Exclusive microseconds per token of each part, and of the rest of ``total_s``."""
        s = dict(self.spent)
        s["constraint: mask (llguidance)"] = mask_s
        s["constraint: budgets, apply mask"] -= mask_s
        s["constraint: read token"] = (s.pop("constraint") - s["constraint: advance"]
                                       - s["constraint: budgets, apply mask"] - mask_s)
        s["rest (waiting for the token, the loop)"] = total_s - sum(s.values())
        return {k: 1e6 * v / tokens for k, v in s.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="gpt-oss tokenizer.json(.gz)")
    ap.add_argument("--dir", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--make", action="store_true", help="write a random checkpoint first")
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--host-times", action="store_true", help="where the host's time per token goes")
    args = ap.parse_args()

    import mlx.core as mx

    from bench import random_prompt
    from gptoss_mlx import harmony
    from gptoss_mlx.generate import Engine, SamplingParams
    from gptoss_mlx.loading import load_model
    from gptoss_mlx.structured import HarmonyConstraint, compile_schema
    from gptoss_mlx.testing import checkpoints as mtc
    from gptoss_mlx.tokenizer import SPECIAL_TOKENS, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    masks = mask_times(tokenizer)
    print("masks (CPU, real vocabulary):", json.dumps({k: round(v, 2) for k, v in masks.items()}), flush=True)

    if args.make:
        t0 = time.perf_counter()
        mtc.write_hf(args.dir, mtc.PRESETS[args.preset])
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.0f}s", flush=True)
    model = load_model(args.dir)
    grammar = compile_schema(tokenizer, SCHEMA)
    header = harmony.segments_to_tokens([harmony.Special(harmony.CHANNEL), "final",
                                         harmony.Special(harmony.MESSAGE)], tokenizer)
    cpu_mask_s, inside = [], []
    host = HostTimes() if args.host_times else None
    host_us = {"plain": [], "constrained": []}

    def rate(kind: str, seed: int) -> float:
        engine = Engine(model)
        prompt = random_prompt(128, seed) + [SPECIAL_TOKENS[harmony.START]] + tokenizer.encode_ordinary("assistant")
        processors = []
        if kind != "plain":
            constraint = HarmonyConstraint(tokenizer, answer=grammar, prefix=header)
            processors = [constraint]
            if kind == "constrained_serial":
                processors = [lambda tokens, logits: constraint(tokens, (mx.eval(logits), logits)[1])]
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=args.tokens)
        if host:
            host.reset()
        t0 = time.perf_counter()
        out = list(engine.generate(prompt + header, params, stop_tokens=frozenset(),
                                   logits_processors=processors))
        stats = engine.stats
        if host and kind in host_us:
            decode_s = time.perf_counter() - t0 - stats.prefill_s
            mask_s = constraint.mask_s if processors else 0.0
            host_us[kind].append(host.per_token_us(decode_s, stats.generated_tokens - 1, mask_s))
        if kind == "constrained":
            end = SPECIAL_TOKENS[harmony.RETURN]
            inside.append(out.index(end) if end in out else len(out))
            cpu_mask_s.append(constraint.mask_s / inside[-1])
        return stats.decode_tps

    kinds = ("plain", "constrained", "constrained_serial")
    for kind in kinds:
        rate(kind, 1)  # warm-up
    for values in host_us.values():
        values.clear()
    rates = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            rates[kind].append(rate(kind, 10 + r))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)

    print(f"\ndevice: {mx.default_device()}, MLX {mx.__version__}, checkpoint {args.dir}; "
          f"{args.tokens} tokens sampled after a 128-token prompt (median {statistics.median(inside):.0f} "
          f"of them inside the constrained answer), "
          f"{args.rounds} interleaved rounds")
    print("| run | median tok/s | min | max |\n|---|---|---|---|")
    for kind, values in rates.items():
        print(f"| {kind} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    for kind in kinds[1:]:
        ratios = [c / p for c, p in zip(rates[kind], rates["plain"])]
        print(f"{kind} / plain: median of per-round ratios {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"mask CPU time per constrained token in the engine: median "
          f"{1e6 * statistics.median(cpu_mask_s):.0f} us")
    if host:
        print("\nengine thread, us per decoded token (median over rounds; exclusive times)")
        print("| part | plain | constrained |\n|---|---|---|")
        for part in host_us["plain"][0]:
            plain, constrained = (statistics.median(r[part] for r in host_us[k]) for k in host_us)
            print(f"| {part} | {plain:.0f} | {constrained:.0f} |")
        plain, constrained = (statistics.median(sum(r.values()) for r in host_us[k]) for k in host_us)
        print(f"| per token | {plain:.0f} | {constrained:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
