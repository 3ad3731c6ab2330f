#!/usr/bin/env python3
"""Streamed experts must compute exactly what resident ones do: logits of a model whose experts
stream through a pool, bit for bit against the resident model, per pass length and transfer;
each pass again layer by layer to find the first part that differs; then MLX's gather alone, the
same experts in a larger weight array (a pool holds more slots than a layer has experts).

    python3 -m gptoss_mlx.testing.checkpoints /tmp/x20 --preset 20b --layers 2
    python3 scripts/check_streamed_exact.py /tmp/x20 [--lengths 1,8,16,17,24,32,48,128]

On the CPU every case is bit-identical (tests/test_streaming.py). On the H200 (2026-12-02) a
32-token pass differed with both transfers while 24 and 48 did not (docs/measurements.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

from gptoss_mlx.kernels.moe import random_experts
from gptoss_mlx.loading import load_model, read_config
from gptoss_mlx.memory import plan


def differing(a: mx.array, b: mx.array) -> str:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return f"{int((a != b).sum())} of {a.size} differ (max {float(np.abs(a - b).max()):.3g})"


def models(directory: Path, extra_slots: int):
    config = read_config(directory)
    resident = load_model(directory)
    streamed = {}
    for transfer in ("host", "cuda", "mlx"):
        model = load_model(directory, memory_plan=plan(config, 64, 16, 1e12,
                                                       expert_slots=config.num_local_experts + extra_slots))
        try:
            model.expert_pool.set_transfer(transfer)
        except ValueError:
            continue  # not on this device
        streamed[transfer] = model
    return config, resident, streamed


def first_difference(resident, streamed, ids: mx.array) -> str:
    """Where a pass first differs: each layer run on both models from the same input, its parts
    compared (attention, the add + norm, the routing, the experts' output)."""
    from gptoss_mlx import kernels

    x = resident.embed_tokens(ids)
    for i, (a, b) in enumerate(zip(resident.layers, streamed.layers)):
        parts = {}
        for name, layer in (("resident", a), ("streamed", b)):
            attn = layer.self_attn(x, None, norm=layer.input_layernorm)
            norm = layer.post_attention_layernorm
            h, normed, routing = kernels.add_rms_norm_route(x, attn, norm.weight, norm.eps, layer.mlp.router,
                                                            layer.mlp.top_k)
            flat = normed.reshape(-1, normed.shape[-1])
            indices, weights = routing or kernels.route(flat, layer.mlp.router, layer.mlp.top_k)
            out = layer.mlp(normed, residual=h, routing=(indices, weights))
            parts[name] = {"attention": attn, "add+norm": normed, "expert ids": indices,
                           "routing weights": weights, "block output": out}
        for part in parts["resident"]:
            u, v = parts["resident"][part], parts["streamed"][part]
            if not mx.array_equal(u, v).item():
                return f"layer {i}, {part}: {differing(u, v)}"
        x = parts["resident"]["block output"]
    return "no layer differs"


def gather_alone(config, lengths: list[int], pool_sizes: list[int]) -> None:
    """One gate/up projection through mx.gather_qmm (sorted rows, as a prefill chunk's): the
    layer's experts alone, and the same experts as the first of a larger array."""
    E, k, D, N = config.num_local_experts, config.num_experts_per_tok, config.hidden_size, 2 * config.intermediate_size
    w, scales, _ = random_experts(mx.random.key(0), E, N, D, mx.bfloat16)
    for slots in pool_sizes:
        reps = -(-slots // E)
        w_pool, s_pool = mx.concatenate([w] * reps)[:slots], mx.concatenate([scales] * reps)[:slots]
        for T in lengths:
            if T * k < 64:
                continue  # the model sorts only from 64 rows
            x = mx.random.normal((T * k, 1, D), key=mx.random.key(T)).astype(mx.bfloat16)  # as the model sorts them
            idx = mx.sort(mx.random.randint(0, E, (T * k,), key=mx.random.key(T + 1)).astype(mx.uint32))
            out = [mx.gather_qmm(x, ws, ss, None, rhs_indices=idx, transpose=True, group_size=32, bits=4,
                                 mode="mxfp4", sorted_indices=True) for ws, ss in ((w, scales), (w_pool, s_pool))]
            print(f"gather_qmm, {T} tokens, {E} experts vs the same in {slots} slots: {differing(*out)}", flush=True)
            # As the streamed layer runs it: the experts in scattered slots, rows sorted by slot
            # (another order of the experts' groups than sorted by expert), then put back.
            where = mx.array(np.random.default_rng(T).permutation(slots)[:E].astype(np.uint32))
            w_slots = mx.zeros_like(w_pool).at[where].add(w)
            s_slots = mx.zeros_like(s_pool).at[where].add(scales)
            ids = mx.random.randint(0, E, (T * k,), key=mx.random.key(T + 2)).astype(mx.uint32)
            rows = []
            for table, ws, ss in ((None, w, scales), (where, w_slots, s_slots)):
                i = ids if table is None else table[ids]
                order = mx.argsort(i)
                y = mx.gather_qmm(x[order], ws, ss, None, rhs_indices=i[order], transpose=True, group_size=32,
                                  bits=4, mode="mxfp4", sorted_indices=True)
                rows.append(y[mx.argsort(order)])
            print(f"gather_qmm, {T} tokens, rows sorted by expert vs by scattered slot: {differing(*rows)}",
                  flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--lengths", default="1,8,16,17,24,32,48,128")
    ap.add_argument("--extra-slots", type=int, default=8, help="pool slots beyond one layer's experts")
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    config, resident, streamed = models(args.dir, args.extra_slots)
    print(f"device {mx.default_device()}, MLX {mx.__version__}; transfers {', '.join(streamed)}")
    rng = np.random.default_rng(0)
    for T in lengths:
        ids = mx.array(rng.integers(1000, min(190000, config.vocab_size), (1, T)))
        reference = resident(ids)
        again = differing(reference, resident(ids))
        print(f"{T} tokens: resident again {again}; "
              + "; ".join(f"{name} {differing(reference, m(ids))}" for name, m in streamed.items()), flush=True)
        for name, m in streamed.items():
            print(f"   {name}: {first_difference(resident, m, ids)}", flush=True)
    E = config.num_local_experts
    gather_alone(config, lengths, [E + args.extra_slots, 17 * E, 47 * E])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
