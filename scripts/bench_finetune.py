#!/usr/bin/env python3
"""LoRA training: our trainer vs mlx-lm's on the same random weights, data, rank and targets.

    python scripts/bench_finetune.py --dir /tmp/g20 --make --preset 20b
    python scripts/bench_finetune.py --dir /tmp/tiny --make --preset tiny --seq-len 128 --sweep 64,128

Each trainer runs in its own process (so peak memory is its own) on the same batches: ``--batch-size``
random sequences of ``--seq-len`` tokens whose second half is trained (an assistant's reply). Both
put rank ``--rank`` adapters (scale alpha/rank, float32) on the attention projections and the
experts (``--targets``), use Adam, and run ``--steps`` timed steps after two warm-up steps, with
and without gradient checkpointing. mlx-lm's side is its own LoRA layers
(``mlx_lm.tuner.lora``) and the step of ``mlx_lm.tuner.trainer.train`` (``default_loss``, the
compiled value-and-grad and update, the per-layer checkpoint), written out here because that
module imports ``rich``, which the GPU machine lacks. Tokens/s counts every token of the batch.

Ours then measures its peak at each ``--sweep`` length (checkpointing on): what the memory table
for 16/32/64 GB Macs is computed from (weights from gptoss_mlx.memory, adapter state exactly, the
activations as measured; a Mac's GPU may use about 2/3 of its memory below 36 GB and 3/4 above).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

MAC_LIMITS = {16: 16 * 2 / 3, 32: 32 * 2 / 3, 64: 64 * 3 / 4}  # GB the GPU may wire by default
WARMUP = 2


def sequences(directory: str, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Random token ids below the checkpoint's vocabulary size."""
    vocab = json.loads((Path(directory) / "config.json").read_text())["vocab_size"]
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def time_steps(step, batch, steps: int) -> tuple[float, float]:
    """(median seconds per step after the warm-up, peak GB over the timed steps)."""
    for _ in range(WARMUP):
        step(*batch)
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(*batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mx.get_peak_memory() / 1e9


def run_ours(args) -> dict:
    import mlx.optimizers as optim

    from gptoss_mlx import finetune as ft
    from gptoss_mlx.loading import load_model
    from gptoss_mlx.lora import LoRAConfig, adapter_weights, apply_lora

    model = load_model(Path(args.dir))
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(args.rank, args.alpha, tuple(args.targets.split(","))))
    optimizer = optim.Adam(learning_rate=1e-5)
    results = {"adapter_params": sum(a.size for a in adapter_weights(model).values())}

    def batch(length):
        tokens = sequences(args.dir, args.batch_size, length)
        trained = [False] * (length // 2) + [True] * (length - length // 2)
        return ft.make_batch([ft.Example(list(map(int, t)), trained, 0) for t in tokens])[:3]

    with ft.reference_ops():
        for checkpoint in (False, True):
            step = ft.make_step(model, optimizer, checkpoint)
            results[f"ckpt={checkpoint}"] = time_steps(step, batch(args.seq_len), args.steps)
        step = ft.make_step(model, optimizer, True)
        mx.clear_cache()
        results["resident_gb"] = mx.get_active_memory() / 1e9  # weights, adapter, Adam state
        results["sweep"] = {n: time_steps(step, batch(n), 1)[1] for n in args.sweep}
    return results


def run_mlx_lm(args) -> dict:
    from functools import partial

    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(args.dir))
    model.freeze()
    keys = {"attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
            "experts": ["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"],
            "router": ["mlp.router"]}
    wanted = {k for t in args.targets.split(",") for k in keys[t]}
    mx.random.seed(0)
    for layer in model.layers:  # mlx_lm.tuner.utils.linear_to_lora_layers, all layers
        lora = [(k, (LoRASwitchLinear if "experts" in k else LoRALinear).from_base(
            m, r=args.rank, scale=args.alpha / args.rank, dropout=0.0))
            for k, m in layer.named_modules() if k in wanted]
        layer.update_modules(tree_unflatten(lora))
    params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

    def default_loss(model, batch, lengths):  # mlx_lm.tuner.trainer.default_loss
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ce = nn.losses.cross_entropy(logits, targets) * mask
        ntoks = mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    layer_call = type(model.layers[0]).__call__

    def checkpointing(on: bool):  # mlx_lm.tuner.trainer.grad_checkpoint
        def checkpointed(layer, *a, **kw):
            def inner(params, *a, **kw):
                layer.update(params)
                return layer_call(layer, *a, **kw)
            return mx.checkpoint(inner)(layer.trainable_parameters(), *a, **kw)
        type(model.layers[0]).__call__ = checkpointed if on else layer_call

    optimizer = optim.Adam(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(model, default_loss)

    def make_step():
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def compiled(batch, lengths):
            (loss, toks), grad = loss_and_grad(model, batch, lengths)
            optimizer.update(model, grad)
            return loss, toks

        def step(batch, lengths):
            loss, toks = compiled(batch, lengths)
            mx.eval(state, loss, toks)
        return step

    tokens = mx.array(sequences(args.dir, args.batch_size, args.seq_len))
    lengths = mx.array([[args.seq_len // 2, args.seq_len]] * args.batch_size)
    results = {"adapter_params": params}
    for checkpoint in (False, True):
        checkpointing(checkpoint)
        results[f"ckpt={checkpoint}"] = time_steps(make_step(), (tokens, lengths), args.steps)
    return results


def mac_table(config, ours: dict, args) -> list[str]:
    """Which rank and sequence length fit on 16/32/64 GB Macs (checkpointing on)."""
    from gptoss_mlx.memory import dense_bytes, expert_bytes, total_experts

    def weight_bytes(config, bits=None) -> float:  # everything resident, dense layers at ``bits``
        return dense_bytes(config, bits or 16) + expert_bytes(config) * total_experts(config)

    measured_weights = weight_bytes(config) / 1e9
    state_per_param = 16 / 1e9  # float32 adapter, gradient, Adam's two moments
    per_rank = ours["adapter_params"] / args.rank  # adapter parameters per unit of rank
    rows = ["| Mac | GPU limit | dense layers | rank 8 | rank 32 | rank 64 |", "|---|---|---|---|---|---|"]
    for ram, limit in MAC_LIMITS.items():
        for bits, name in ((None, "bf16"), (8, "8-bit"), (4, "4-bit")):
            cells = []
            for rank in (8, 32, 64):
                fits = []
                for n, peak in sorted(ours["sweep"].items(), key=lambda kv: int(kv[0])):
                    activations = peak - ours["resident_gb"]
                    resident = (ours["resident_gb"] - measured_weights + weight_bytes(config, bits) / 1e9
                                + (rank - args.rank) * per_rank * state_per_param)
                    if resident + activations <= limit:
                        fits.append(int(n))
                cells.append(f"{max(fits)} tokens" if fits else "no")
            rows.append(f"| {ram} GB | {limit:.1f} GB | {name} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="checkpoint directory (published layout)")
    ap.add_argument("--make", action="store_true", help="write a random checkpoint there first")
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="attention,experts")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    ap.add_argument("--sweep", default="512,1024,2048,4096",
                    help="sequence lengths whose peak memory ours measures (for the Mac table)")
    ap.add_argument("--worker", choices=["ours", "mlx_lm"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sweep = [int(n) for n in args.sweep.split(",")] if isinstance(args.sweep, str) else args.sweep
    if args.worker:
        print(json.dumps((run_ours if args.worker == "ours" else run_mlx_lm)(args)))
        return
    if args.make and not (Path(args.dir) / "config.json").exists():
        from gptoss_mlx.testing import checkpoints

        t0 = time.perf_counter()
        checkpoints.write_hf(Path(args.dir), checkpoints.PRESETS[args.preset])
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.0f}s", flush=True)
    results = {}
    for worker in ("ours", "mlx_lm"):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", worker],
                             capture_output=True, text=True)
        if out.returncode:  # the other trainer's results are still worth printing
            print(f"{worker} failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        results[worker] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{worker}: {time.perf_counter() - t0:.0f}s", flush=True)
    tokens = args.batch_size * args.seq_len
    print(f"\nbatch {args.batch_size} x {args.seq_len} tokens, rank {args.rank}, {args.targets}, "
          f"{mx.default_device()}")
    print("| trainer | adapter params | checkpointing | tokens/s | peak GB |\n|---|---|---|---|---|")
    for worker, r in results.items():
        for checkpoint in (False, True):
            seconds, peak = r[f"ckpt={checkpoint}"]
            print(f"| {worker} | {r['adapter_params'] / 1e6:.1f}M | {'on' if checkpoint else 'off'} "
                  f"| {tokens / seconds:,.0f} | {peak:.2f} |")
    if "ours" not in results:
        sys.exit(1)
    for checkpoint in (False, True) if "mlx_lm" in results else ():
        (a, pa), (b, pb) = results["ours"][f"ckpt={checkpoint}"], results["mlx_lm"][f"ckpt={checkpoint}"]
        print(f"checkpointing {'on' if checkpoint else 'off'}: ours {b / a:.2f}x mlx-lm's tokens/s "
              f"at {pa / pb:.2f}x its peak memory")
    ours = results["ours"]
    print(f"\nours, checkpointing on, peak by sequence length (resident {ours['resident_gb']:.2f} GB): "
          + ", ".join(f"{n}: {p:.2f} GB" for n, p in ours["sweep"].items()))
    from gptoss_mlx.config import ModelConfig

    config = ModelConfig.from_file(Path(args.dir) / "config.json")
    print("\n" + "\n".join(mac_table(config, ours, args)))


if __name__ == "__main__":
    main()
