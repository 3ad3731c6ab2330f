#!/usr/bin/env python3
"""Expert streaming: decode and prefill speed, hit rate, bytes read and peak memory per memory limit.

    python scripts/bench_streaming.py --dir /tmp/g20 --make --preset 20b --limits 14,10,8,6 --dense-bits 4
    python scripts/bench_streaming.py --dir /tmp/g120 --make --preset 120b --layers 28 --limits 66,48,32 --dense-bits 4 --scale-to 120b
    python scripts/bench_streaming.py --dir /tmp/tiny --make --preset tiny --limits 1.03,1.02307 --dense-bits 4 --cache warm   # any machine

Each row runs in its own process (its peak memory is its own): the memory plan for the limit
(``memory.choose_plan`` at 32768 tokens of context, as the front ends plan), the model loaded
that way, ``mx.set_memory_limit(limit)``, a warm-up (a fresh process compiles its kernels on its
first passes), then a ``--prompt``-token prefill and ``--tokens`` greedy decode tokens after a
128-token prompt; each row's greedy tokens are compared with the resident row's (the same bytes
must make the same tokens). ``warm``: the checkpoint's files are read once
first, so the page cache holds them; ``dropped``: the page cache is emptied first (root:
``echo 3 > /proc/sys/vm/drop_caches``, else ``posix_fadvise(DONTNEED)`` on each file); a row
whose plan keeps everything resident runs warm only. ``--sync-row`` adds a row with all but one
expert in the pool: the cost of reading routing back once per layer, without reads.
``--policies`` adds rows with other eviction policies at the second limit, ``--transfers``
rows with other ways into the pool (``expert_pool.TRANSFERS``: ``mlx`` is the MLX copy that
every device can do, the way before host writes), ``--guesses`` rows that read ahead another
number of guessed experts per layer (``ExpertPool.guess``; 0: no reads ahead).

Per decode token, the time splits into ``read`` (copying experts from the checkpoint into host
memory: the pool's own, or MLX's staging), ``migrate`` (moving them into the device's pool: MLX's
copy, or the CUDA driver's DMA; nothing where the pool is host memory, as on a Mac) and ``compute`` (the
rest, including ``read-back``: waiting for each layer's routing, which on CUDA also pays for
pages that migrate by faults, and the pool's own bookkeeping in Python); transfer GB/s is the
bytes read over read + migrate.

``--rounds R`` adds, after the table, the rates measured side by side: every limit's arrangement
loaded into one process (its memory limit not set: peak memory is the table's), then R rounds
that each decode ``--tokens`` greedy tokens with each of them in turn, after a fresh 128-token
prompt per round (a repeated one would find its experts in the pool). The table's "% of
resident" divides rates measured in separate processes, minutes apart, on a host whose speed
moves between calls (a resident 120b-8-layer row at 323 and 590 tok/s in one session); the median
of the per-round ratios does not depend on it.

Random weights route almost uniformly, so every expert is equally likely: the hit rates here are
a floor (real checkpoints reuse experts strongly from token to token).
``--scale-to 120b`` with a checkpoint of fewer layers (``--layers N``, for a small disk) gives
each row the share of experts on the GPU that the full model gets at that limit, so the
per-token reads match the full model's per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

CONTEXT = 32768
PROMPT_SEED = 3


def random_prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1000, 199000) for _ in range(n)]


def checkpoint_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def warm_page_cache(directory: Path) -> str:
    for f in checkpoint_files(directory):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return "warm"


def drop_page_cache(directory: Path) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped (drop_caches)"
    except OSError:
        for f in checkpoint_files(directory):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "dropped (fadvise)"


def row_plan(config, limit_gb: float, scale_to: str | None, slots: str | None, dense_bits):
    """The memory plan of one row, and the limit it must stay under (bytes)."""
    from gptoss_mlx.config import PRESETS
    from gptoss_mlx.memory import GB, choose_plan, plan

    if slots == "all-but-one":
        p = plan(config, CONTEXT, dense_bits or 4, 1e15, expert_slots=config.num_hidden_layers
                 * config.num_local_experts - 1)
        return p, p.total
    if scale_to:
        full = choose_plan(PRESETS[f"gpt-oss-{scale_to}"], CONTEXT, dense_bits, limit_gb * GB)
        share = full.expert_slots / full.total_experts
        total = config.num_hidden_layers * config.num_local_experts
        p = plan(config, CONTEXT, full.dense_bits, 1e15,
                 expert_slots=max(config.num_local_experts, round(share * total)))
        return p, p.total
    p = choose_plan(config, CONTEXT, dense_bits, limit_gb * GB)
    return p, limit_gb * GB


def progress(what: str, t0: float = time.perf_counter()) -> None:
    """A row's progress on stderr (its parent passes it through): a row cut short by a time
    limit still says how far it got."""
    print(f"  [{time.perf_counter() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)


def run_row(args) -> dict:
    """One row, in this process (on the engine thread, where all MLX work belongs)."""
    import mlx.core as mx

    from gptoss_mlx.expert_pool import PoolStats
    from gptoss_mlx.generate import Engine, SamplingParams
    from gptoss_mlx.loading import load_model, read_config

    config = read_config(args.dir)
    memory_plan, limit = row_plan(config, args.limit, args.scale_to, args.slots, args.dense_bits)
    progress(f"plan: {memory_plan.arrangement}; page cache: {args.cache}")
    how = drop_page_cache(args.dir) if args.cache == "dropped" else warm_page_cache(args.dir)
    progress("loading")
    mx.set_memory_limit(int(limit))
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model = load_model(args.dir, memory_plan=memory_plan)
    if model.expert_pool is not None and args.policy:
        model.expert_pool.set_policy(args.policy)
    if model.expert_pool is not None and args.transfer:
        model.expert_pool.set_transfer(args.transfer)
    if model.expert_pool is not None and args.guess is not None:
        model.expert_pool.guess = args.guess
    load_s = time.perf_counter() - t0
    pool = model.expert_pool
    progress(f"loaded in {load_s:.1f}s" + (f"; transfer {pool.transfer}, {pool.slots} slots, "
                                           f"{pool.pinned_bytes / 1e9:.1f} GB page-locked" if pool else ""))
    stats = pool.stats if pool else PoolStats()

    def delta(before: PoolStats, n: int) -> dict:
        d = stats.since(before)
        return {"hit_rate": d.hit_rate if d.hits + d.misses else 1.0, "mb_per_token": d.bytes_read / n / 1e6,
                "transfer_gbps": d.transfer_gbps, "read_ms_per_token": d.read_s / n * 1e3,
                "migrate_ms_per_token": d.migrate_s / n * 1e3, "readback_ms_per_token": d.readback_s / n * 1e3,
                "guessed_per_token": d.guessed / n, "guess_rate": d.guess_rate,
                "pool_ms_per_token": (d.fetch_s - d.readback_s - d.read_s - d.migrate_s) / n * 1e3}

    # Warm-up: a fresh process's first passes compile (and on CUDA load) their kernels.
    list(Engine(model, max_context=CONTEXT).generate(random_prompt(args.prompt, PROMPT_SEED + 2),
                                                     SamplingParams(temperature=0, max_tokens=3),
                                                     stop_tokens=frozenset()))
    progress("warmed up")
    greedy = SamplingParams(temperature=0, max_tokens=1)
    engine = Engine(model, max_context=CONTEXT)
    before = replace(stats)
    list(engine.generate(random_prompt(args.prompt, PROMPT_SEED), greedy, stop_tokens=frozenset()))
    progress(f"prefill of {args.prompt} tokens: {engine.stats.ttft_s:.1f}s")
    prefill = {"prefill_tps": args.prompt / engine.stats.ttft_s, **{
        f"prefill_{k}": v for k, v in delta(before, args.prompt).items()}}
    engine = Engine(model, max_context=CONTEXT)
    prompt = random_prompt(128, PROMPT_SEED + 1)
    engine.prefill(prompt)
    before = replace(stats)
    tokens = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=args.tokens),
                             stop_tokens=frozenset())
    made = []
    for n, token in enumerate(tokens, 1):
        made.append(token)
        if n % 8 == 0:
            progress(f"{n} tokens; " + (stats.since(before).summary() if pool else "resident"))
    decode = delta(before, args.tokens)
    progress(f"decode: {engine.stats.decode_tps:.1f} tok/s")
    compute_ms = 1e3 / engine.stats.decode_tps - decode["read_ms_per_token"] - decode["migrate_ms_per_token"]
    return {"arrangement": memory_plan.arrangement, "planned_gb": memory_plan.total / 1e9,
            "limit_gb": limit / 1e9, "cache": how, "policy": pool.policy if pool else "-",
            "transfer": pool.transfer if pool else "-", "guess": pool.guess if pool else "-", "load_s": load_s,
            "decode_tps": engine.stats.decode_tps, **decode, "compute_ms_per_token": compute_ms,
            **prefill, "peak_gb": mx.get_peak_memory() / 1e9, "tokens": made}


def run_rounds(args) -> list[dict]:
    """Each limit's arrangement loaded side by side, decoding in alternating rounds (on the
    engine thread): per limit, its rates and their per-round ratios to the first limit's, and
    in how many rounds its greedy tokens were the first limit's. With ``--waits``, a streamed
    arrangement runs once per mode in each round (``ExpertPool.set_waits``, one model)."""
    import statistics

    from dataclasses import astuple

    import mlx.core as mx
    import numpy as np

    from gptoss_mlx.expert_pool import PoolStats
    from gptoss_mlx.generate import Engine, SamplingParams
    from gptoss_mlx.loading import load_model, read_config

    config = read_config(args.dir)
    # (waits, experts guessed per layer): "on", "off", "host" (the device waits, the host lets
    # each layer go after its copies, not the copy stream), any with ":G" for G guesses
    modes = [(m.split(":")[0], int(m.split(":")[1]) if ":" in m else None)
             for m in args.waits.split(",")] if args.waits else [(None, None)]
    labels = {None: "", "off": ", read back", "on": ", device waits", "host": ", device waits, host answers"}
    runs = []
    for limit in [float(x) for x in args.limits.split(",")]:
        memory_plan, _ = row_plan(config, limit, args.scale_to, None, args.dense_bits)
        model = load_model(args.dir, memory_plan=memory_plan)
        engine = Engine(model, max_context=CONTEXT)
        for waits, guess in modes if model.expert_pool is not None else [(None, None)]:
            if waits is not None:
                model.expert_pool.set_waits(waits != "off", host_answers=waits == "host")
                guess = model.expert_pool.guess if guess is None else guess
                model.expert_pool.guess = guess
            list(engine.generate(random_prompt(128, PROMPT_SEED + 2), SamplingParams(temperature=0, max_tokens=3),
                                 stop_tokens=frozenset()))  # warm-up: kernels compiled and loaded
            arrangement = memory_plan.arrangement + labels[waits]
            arrangement += f", {guess} guessed" if waits is not None else ""
            runs.append({"limit": limit, "arrangement": arrangement, "engine": engine, "waits": waits,
                         "guess": guess, "rates": [], "same": 0, "stats": None})
            progress(f"loaded {arrangement}")
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens)
    for r in range(args.rounds):
        prompt = random_prompt(128, PROMPT_SEED + 10 + r)
        first_tokens = None
        for run in runs:
            pool = run["engine"].model.expert_pool
            if run["waits"] is not None:
                pool.set_waits(run["waits"] != "off", host_answers=run["waits"] == "host")
                pool.guess = run["guess"]
            if pool is not None:  # every row from an empty pool and a fresh prefill: modes share a
                # pool, and the one before would have left this round's experts in it
                pool._wait_for_copies()
                mx.synchronize()
                pool._release(np.arange(pool.slots))
                run["engine"].reset()
            run["engine"].prefill(prompt)
            before = replace(pool.stats) if pool is not None else None
            tokens = list(run["engine"].generate(prompt, greedy, stop_tokens=frozenset()))
            if pool is not None:
                spent = pool.stats.since(before)
                run["stats"] = spent if run["stats"] is None else PoolStats(
                    *(x + y for x, y in zip(astuple(run["stats"]), astuple(spent))))
            first_tokens = tokens if first_tokens is None else first_tokens
            run["same"] += tokens == first_tokens
            run["rates"].append(run["engine"].stats.decode_tps)
        progress(f"round {r + 1}: " + ", ".join(f"{run['rates'][-1]:.1f}" for run in runs) + " tok/s")
    first = runs[0]["rates"]
    return [{"limit": run["limit"], "arrangement": run["arrangement"], "rates": run["rates"],
             "ratio": statistics.median(x / y for x, y in zip(run["rates"], first)),
             "same": run["same"], "pool": pool_line(run["stats"])} for run in runs]


def pool_line(stats) -> str:
    """Per decode token: the host's time on the pool's experts, and where it went."""
    if stats is None or not stats.tokens:
        return "-"
    per = 1e3 / stats.tokens
    return (f"hit {stats.hit_rate:.0%}, {stats.bytes_per_token / 1e6:.0f} MB read, guesses {stats.guess_rate:.0%} "
            f"chosen; ms/token: routing waited {stats.readback_s * per:.2f}, pool {stats.fetch_s * per:.2f} "
            f"(copies waited {(stats.read_s + stats.migrate_s) * per:.2f})")


def child(args) -> int:
    import faulthandler
    import signal

    from gptoss_mlx.engine_thread import engine_thread

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a row that ran too long was

    print("ROW " + json.dumps(engine_thread().call(run_rounds if args.rounds_child else run_row, args)),
          flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--make", action="store_true", help="write a random checkpoint first")
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--layers", type=int, default=None, help="write only this many layers (--make)")
    ap.add_argument("--limits", default="14,10,8,6", help="memory limits in GB, comma-separated")
    ap.add_argument("--cache", default="warm,dropped",
                    help="page cache states: warm,dropped ('': no table, --rounds alone)")
    ap.add_argument("--scale-to", choices=["20b", "120b"], default=None,
                    help="give each row the expert share the full model gets at that limit")
    ap.add_argument("--dense-bits", type=int, choices=[16, 8, 4], default=None)
    ap.add_argument("--policies", default="", help="extra eviction policies to compare, e.g. lru,lfu")
    ap.add_argument("--transfers", default="", help="extra ways into the pool to compare, e.g. host,mlx")
    ap.add_argument("--guesses", default="", help="extra numbers of experts read ahead per layer, e.g. 0,6")
    ap.add_argument("--sync-row", action="store_true",
                    help="add a row with all but one expert in the pool (the per-layer read-back alone)")
    ap.add_argument("--prompt", type=int, default=1024, help="prefill prompt tokens")
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens")
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds a row may take")
    ap.add_argument("--rounds", type=int, default=0,
                    help="also decode with every limit's arrangement side by side in this many rounds")
    ap.add_argument("--waits", default="", help="with --rounds: streamed rows in these modes, e.g. off,on,host,on:2 "
                    "(on: the device waiting for the host, expert_pool.HostWaits; host: its layers let go "
                    "by the host after their copies, not by the copy stream; :G guesses a layer)")
    # one row, in a child process
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--slots", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--transfer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--guess", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rounds-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.limit is not None or args.slots or args.rounds_child:
        return child(args)

    from gptoss_mlx.testing import checkpoints as mtc

    if args.make:
        t0 = time.perf_counter()
        mtc.main([str(args.dir), "--preset", args.preset] + (["--layers", str(args.layers)] if args.layers else []))
        size = sum(f.stat().st_size for f in checkpoint_files(args.dir)) / 1e9
        print(f"{size:.1f} GB in {time.perf_counter() - t0:.0f}s", flush=True)

    from gptoss_mlx.loading import read_config

    config = read_config(args.dir)
    limits = [float(x) for x in args.limits.split(",")]
    caches = [c for c in args.cache.split(",") if c]
    # A resident model reads nothing after loading: its row once, with a warm page cache.
    rows = [dict(limit=limit, cache=cache) for limit in limits for cache in caches
            if cache == "warm" or row_plan(config, limit, args.scale_to, None, args.dense_bits)[0].streamed]
    if args.sync_row:
        rows.insert(0, dict(limit=limits[0], cache="warm", slots="all-but-one"))
    second = limits[1] if len(limits) > 1 else limits[0]
    rows += [dict(limit=second, cache="warm", policy=p) for p in filter(None, args.policies.split(","))]
    rows += [dict(limit=second, cache="warm", transfer=t) for t in filter(None, args.transfers.split(","))]
    rows += [dict(limit=second, cache="warm", guess=int(g)) for g in filter(None, args.guesses.split(","))]
    results = []
    for row in rows:
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--limit", str(row["limit"]),
               "--cache", row["cache"], "--prompt", str(args.prompt), "--tokens", str(args.tokens)]
        cmd += given_flags(args, ("--slots", row.get("slots")), ("--policy", row.get("policy")),
                           ("--transfer", row.get("transfer")), ("--guess", row.get("guess")))
        print(f"row {row}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # its progress: our stderr
        try:
            out, _ = proc.communicate(timeout=args.row_timeout)
        except subprocess.TimeoutExpired:
            print(f"row {row} took more than {args.row_timeout:g}s: stopped; where it was:", flush=True)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            proc.communicate()
            continue
        line = next((x for x in out.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            print(f"row {row} failed (exit {proc.returncode})", flush=True)
            continue
        result = {**row, **json.loads(line[4:])}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)

    if results:
        print_table(args, results)
    if args.rounds:
        side_by_side(args)
    return 0


def print_table(args, results: list[dict]) -> None:
    import mlx.core as mx

    resident_row = next((r for r in results if "everything resident" in r["arrangement"]
                         and r.get("slots") is None), None)
    resident = resident_row and resident_row["decode_tps"]
    print(f"\ndevice: {mx.default_device()}, MLX {mx.__version__}, checkpoint {args.dir}; "
          f"prefill {args.prompt} tokens, decode {args.tokens} greedy tokens after 128; plans for "
          f"{CONTEXT} tokens of context")
    print("| limit (GB) | arrangement | page cache | policy | transfer | read ahead | decode tok/s "
          "| % of resident | hit rate | read ahead/token (chosen) | MB read/token | transfer GB/s "
          "| read ms/token | migrate ms/token "
          "| compute ms/token | of which read-back | of which the pool's own | prefill tok/s "
          "| prefill MB/token | peak GB "
          "| greedy tokens as resident |")
    print("|" + "---|" * 21)
    for r in results:
        share = f"{100 * r['decode_tps'] / resident:.0f}%" if resident else "-"
        limit = "-" if r.get("slots") else f"{r['limit_gb']:.2f}"
        if args.scale_to and not r.get("slots"):  # the full model's limit, and this model's share of it
            limit = f"{r['limit']:g} for {args.scale_to}: {limit}"
        ahead = f"{r['guessed_per_token']:.1f} ({r['guess_rate']:.0%})" if r["guessed_per_token"] else "-"
        print(f"| {limit} | {r['arrangement']} | {r['cache']} | {r['policy']} | {r['transfer']} | {r['guess']} "
              f"| {r['decode_tps']:.1f} | {share} | {r['hit_rate']:.1%} | {ahead} | {r['mb_per_token']:.1f} "
              f"| {r['transfer_gbps']:.1f} | {r['read_ms_per_token']:.1f} | {r['migrate_ms_per_token']:.1f} "
              f"| {r['compute_ms_per_token']:.1f} | {r['readback_ms_per_token']:.1f} | {r['pool_ms_per_token']:.1f} "
              f"| {r['prefill_tps']:.0f} | {r['prefill_mb_per_token']:.1f} | {r['peak_gb']:.2f} "
              f"| {same_tokens(r, resident_row)} |")


def given_flags(args, *pairs: tuple[str, object]) -> list[str]:
    """A child process's flags: --scale-to and --dense-bits as given, and ``pairs`` (flag, value)
    whose value is not None."""
    pairs = (("--scale-to", args.scale_to), ("--dense-bits", args.dense_bits), *pairs)
    return [x for flag, value in pairs if value is not None for x in (flag, str(value))]


def side_by_side(args) -> None:
    """The --rounds measurement, in a process of its own."""
    cmd = [sys.executable, __file__, "--dir", str(args.dir), "--limits", args.limits, "--rounds",
           str(args.rounds), "--tokens", str(args.tokens), "--rounds-child", "--waits", args.waits]
    cmd += given_flags(args)
    print(f"\nside by side: {args.rounds} rounds of {args.tokens} greedy tokens after a fresh 128-token "
          "prompt, each arrangement in turn, one process", flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.row_timeout).stdout
    line = next((x for x in out.splitlines() if x.startswith("ROW ")), None)
    if line is None:
        print("side by side: failed", flush=True)
        return
    print("| limit (GB) | arrangement | decode tok/s by round | median ratio to the first "
          "| rounds with the first's greedy tokens | the pool in those rounds |")
    print("|---|---|---|---|---|---|")
    for r in json.loads(line[4:]):
        limit = f"{r['limit']:g}" + (f" for {args.scale_to}" if args.scale_to else "")
        print(f"| {limit} | {r['arrangement']} | {' / '.join(f'{x:.1f}' for x in r['rates'])} "
              f"| {r['ratio']:.0%} | {r['same']} of {len(r['rates'])} | {r['pool']} |")


def same_tokens(row: dict, resident: dict | None) -> str:
    """Whether the row's greedy decode made the resident row's tokens (exactness: the same bytes)."""
    if resident is None:
        return "-"
    a, b = row["tokens"], resident["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return "yes" if a == b else f"no: the first {same} of {len(b)}"


if __name__ == "__main__":
    sys.exit(main())
