"""Prefill attention with sinks, GQA and a sliding window (metal/sdpa_prefill.metal), next to
its plain-MLX reference.

A prefill chunk of L queries attends to K >= L keys in position order that end at its last
token (what the caches return). On a sliding layer MLX's sdpa needs an (L, K) mask array and
computes every score; the kernel visits only the key tiles inside each query block's window.
The model reaches it through ``kernels.attention``.
"""

from __future__ import annotations

import mlx.core as mx

from .. import ops
from . import registry
from .launch import Kernel, Launch

KERNEL = Kernel("sdpa_prefill", ["q", "k", "v", "sinks", "scale"], ["out"])


def _queries_per_group(gqa: int) -> int:
    # (query head, query) pairs per threadgroup, one per simdgroup: at most 16 simdgroups (512
    # threads, safe for any Metal pipeline's register budget), at least one query.
    return max(1, min(4, 16 // gqa))


def plan(q, k, v, sinks, scale, window) -> Launch:
    """q (HEADS, L, D); k, v (KV_HEADS, K, D), K >= L; sinks (HEADS,); window None or a size."""
    heads, L, D = q.shape
    kv_heads, K = k.shape[:2]
    if K < L or heads % kv_heads or D % 32:
        raise ValueError(f"sdpa_prefill: q {q.shape}, k {k.shape}: needs K >= L, GQA, head_dim % 32 == 0")
    gqa = heads // kv_heads
    bq = _queries_per_group(gqa)
    threads = 32 * gqa * bq
    return Launch(
        inputs=[q, k, v, sinks, float(scale)],
        output_shapes=[(L, heads, D)], output_dtypes=[q.dtype],
        grid=(threads * -(-L // bq), kv_heads, 1), threadgroup=(threads, 1, 1),
        template=[("T", q.dtype), ("S_T", sinks.dtype), ("D", D), ("GQA", gqa), ("BQ", bq),
                  ("WINDOW", int(window or 0))],
    )


def reference(q, k, v, sinks, scale, window):
    """Written out in full (scores, mask, sink column, softmax): (L, HEADS, D)."""
    heads, L, D = q.shape
    kv_heads, K = k.shape[:2]
    gqa = heads // kv_heads
    keys = mx.repeat(k, gqa, axis=0)  # (HEADS, K, D)
    values = mx.repeat(v, gqa, axis=0)
    scores = (q * scale) @ keys.swapaxes(1, 2)  # (HEADS, L, K)
    scores = mx.where(ops.window_mask(L, K, window), scores, -mx.inf)
    sink = mx.broadcast_to(sinks.astype(scores.dtype)[:, None, None], (heads, L, 1))
    weights = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1)[..., :K]
    return ((weights @ values).transpose(1, 0, 2).astype(q.dtype),)


def sample(shape, key, dtype):
    """Random (q, k, v, sinks, scale, window) for ``shape`` (heads, kv heads, D, L, K, window)."""
    heads, kv_heads, D, L, K, window = shape
    k1, k2, k3, k4 = mx.random.split(key, 4)
    q = mx.random.normal((heads, L, D), key=k1).astype(dtype)
    k = mx.random.normal((kv_heads, K, D), key=k2).astype(dtype)
    v = mx.random.normal((kv_heads, K, D), key=k3).astype(dtype)
    sinks = mx.random.normal((heads,), key=k4).astype(dtype)
    return q, k, v, sinks, D ** -0.5, window


SPEC = registry.register(registry.KernelSpec(
    "sdpa_prefill", KERNEL, plan, reference, sample, check=((8, 2, 32, 12, 20, 8), 400),
    description="prefill attention: window and causality from indices (no mask), sinks, GQA",
    reference_in_float32=True,
))


def fits(q: mx.array, keys: mx.array, window: int | None) -> bool:
    """Several queries of batch 1 on a sliding layer, head_dim a multiple of 32, kernel active.
    Full layers keep MLX's fused causal attention (it needs no mask array there)."""
    B, heads, L, D = q.shape
    return (window is not None and L > 1 and B == 1 and D % 32 == 0 and heads % keys.shape[1] == 0
            and registry.active(SPEC.name, q.dtype))


def run(q, keys, values, sinks, scale: float, window: int | None) -> mx.array:
    """q (1, HEADS, L, D); keys/values (1, KV_HEADS, K, D) in position order ending at the last
    query -> (1, L, HEADS, D), token-major."""
    (out,) = SPEC.launch(q[0], keys[0], values[0], sinks, scale, window)
    return out[None]
