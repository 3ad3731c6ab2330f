"""Attention with sinks and GQA: two decode kernels for one token over a long cache
(metal/sdpa_decode_*.metal), a prefill kernel for many queries on a sliding layer
(metal/sdpa_prefill.metal), and ``ops.sdpa`` (MLX's fused attention) otherwise. The model calls
:func:`attention`.

Decode: the keys and values come straight from the cache buffers (a full layer's growing cache,
or a sliding layer's 128-slot ring — at decode the ring's order does not matter and every slot
is inside the window). Pass 1 splits the keys into partitions and lets the query heads of a KV
head share each K/V read; pass 2 merges the partitions with the sink.

Prefill: a chunk of L queries attends to K >= L keys in position order that end at its last
token (what the caches return). On a sliding layer MLX's sdpa needs an (L, K) mask array and
computes every score; the kernel visits only the key tiles inside each query block's window.
"""

from __future__ import annotations

import mlx.core as mx

from .. import ops
from ..cache import device_positions
from . import registry
from .launch import Kernel, Launch

CHUNK = 256  # keys per partition (threadgroup) in pass 1, at most
PARTS = 8  # partitions per KV head over a buffer shorter than PARTS * CHUNK
# Below this many cached keys MLX's single sdpa launch wins (two launches cost more than they
# save: 0.36x at 128 keys, 0.93x at 1k, 1.77x at 8k, 3.28x at 32k on the GPU machine,
# scripts/bench_attention.py); so sliding layers (128 keys) keep MLX's path.
MIN_KEYS = 2048

PARTIAL = Kernel("sdpa_decode_partial", ["q", "k", "v", "scale", "n_keys"], ["partial"], constants=("scale",))
COMBINE = Kernel("sdpa_decode_combine", ["partial", "sinks"], ["out"])


def _chunk(capacity: int) -> int:
    """Keys per partition: CHUNK, or for a short buffer (the compiled step's from 1 key on) a
    power of two from 32 (one tile) that splits it into about PARTS partitions. A short cache in
    one partition of 256 keys gave the GPU one threadgroup per KV head, each looping over every
    key: 22.7 µs a call at 130 keys on the H200, against 7.8 for MLX's one-pass kernel."""
    chunk = 32
    while chunk < CHUNK and chunk * PARTS < capacity:
        chunk *= 2
    return chunk


def _parts(n_keys: int | mx.array, capacity: int) -> int:
    """Partitions of ``_chunk(capacity)`` keys: enough for ``n_keys``, or for the whole buffer
    where the number of keys is a device array (the compiled step's: its partitions past the keys
    stay empty)."""
    n = capacity if isinstance(n_keys, mx.array) else n_keys
    return max(1, -(-n // _chunk(capacity)))


# ---- decode, pass 1 ----------------------------------------------------------------------------

def partial_plan(q, k, v, scale, n_keys) -> Launch:
    """q (HEADS, D); k, v (1, KV_HEADS, CAPACITY, D) cache buffers, the first n_keys valid:
    a Python int, or a () int32 array on the device (read by the kernel, nothing baked in)."""
    heads, D = q.shape
    kv_heads = k.shape[1]
    gqa = heads // kv_heads
    P = _parts(n_keys, k.shape[2])
    return Launch(
        inputs=[q, k, v, float(scale), n_keys if isinstance(n_keys, mx.array) else int(n_keys)],
        output_shapes=[(heads, P, D + 2)], output_dtypes=[mx.float32],
        grid=(32 * gqa, kv_heads, P), threadgroup=(32 * gqa, 1, 1),
        template=[("T", q.dtype), ("D", D), ("GQA", gqa), ("CHUNK", _chunk(k.shape[2]))],
    )


def partial_reference(q, k, v, scale, n_keys):
    """(m, l, acc) of every (query head, partition), as pass 1 defines them: an empty partition
    (past the keys) is (-inf, 0, 0)."""
    heads, D = q.shape
    kv_heads = k.shape[1]
    gqa = heads // kv_heads
    P, C = _parts(n_keys, k.shape[2]), _chunk(k.shape[2])
    n = min(P * C, k.shape[2])  # the positions the partitions cover
    keys = mx.repeat(k[0, :, :n].astype(mx.float32), gqa, axis=0)  # (HEADS, n, D)
    values = mx.repeat(v[0, :, :n].astype(mx.float32), gqa, axis=0)
    valid = mx.arange(n) < n_keys  # (n,): traceable where n_keys is an array
    values = mx.where(valid[:, None], values, 0.0)  # unwritten slots may hold anything
    scores = mx.where(valid, (keys @ (q.astype(mx.float32) * scale)[:, :, None])[..., 0], -mx.inf)
    out = []
    for p in range(P):
        s = scores[:, p * C:(p + 1) * C]
        m = s.max(axis=-1, keepdims=True)
        e = mx.where(valid[p * C:(p + 1) * C], mx.exp(s - m), 0.0)  # exp(-inf + inf) is NaN
        acc = (e[:, None, :] @ values[:, p * C:(p + 1) * C])[:, 0]
        out.append(mx.concatenate([m, e.sum(axis=-1, keepdims=True), acc], axis=-1))
    return (mx.stack(out, axis=1),)


# ---- decode, pass 2 ----------------------------------------------------------------------------

def combine_plan(partial, sinks, dtype) -> Launch:
    """partial (HEADS, P, D + 2) float32, sinks (HEADS,); the output in ``dtype``."""
    heads, P, D2 = partial.shape
    return Launch(
        inputs=[partial, sinks],  # the kernel reads P from partial's shape: no scalar per call
        output_shapes=[(heads, D2 - 2)], output_dtypes=[dtype],
        grid=(32, heads, 1), threadgroup=(32, 1, 1),
        template=[("T", dtype), ("S_T", sinks.dtype), ("D", D2 - 2)],
    )


def combine_reference(partial, sinks, dtype):
    m, l, acc = partial[..., :1], partial[..., 1:2], partial[..., 2:]
    sink = sinks.astype(mx.float32)[:, None, None]
    M = mx.maximum(m.max(axis=1, keepdims=True), sink)
    w = mx.exp(m - M)
    L = mx.exp(sink - M)[:, 0] + (l * w).sum(axis=1)
    return (((acc * w).sum(axis=1) / L).astype(dtype),)


# ---- decode: inputs, the run-time check, the launch --------------------------------------------

def _qkv(shape, key, dtype):
    """Random q, cache buffers k and v, and sinks for ``shape`` (heads, kv heads, D, capacity,
    n_keys[, "device"]): with "device", n_keys is a () int32 array (the compiled step's), and
    the partitions cover the whole buffer."""
    heads, kv_heads, D, capacity, n_keys = shape[:5]
    if shape[5:] == ("device",):
        n_keys = mx.array(n_keys, dtype=mx.int32)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    q = mx.random.normal((heads, D), key=k1).astype(dtype)
    k = mx.random.normal((1, kv_heads, capacity, D), key=k2).astype(dtype)
    v = mx.random.normal((1, kv_heads, capacity, D), key=k3).astype(dtype)
    sinks = mx.random.normal((heads,), key=k4).astype(dtype)
    return q, k, v, sinks, n_keys, D ** -0.5


def partial_sample(shape, key, dtype):
    q, k, v, _, n_keys, scale = _qkv(shape, key, dtype)
    return q, k, v, scale, n_keys


def combine_sample(shape, key, dtype):
    q, k, v, sinks, n_keys, scale = _qkv(shape, key, dtype)
    (partial,) = partial_reference(q, k, v, scale, n_keys)
    return partial, sinks, dtype


DECODE_CHECK = ((8, 1, 32, 40, 33), 300)
PARTIAL_SPEC = registry.register(registry.KernelSpec(
    "sdpa_decode_partial", PARTIAL, partial_plan, partial_reference, partial_sample, check=DECODE_CHECK,
    description="decode attention pass 1: K/V tiles shared by a KV head's query heads, split keys",
    reference_in_float32=True,
))
COMBINE_SPEC = registry.register(registry.KernelSpec(
    "sdpa_decode_combine", COMBINE, combine_plan, combine_reference, combine_sample, check=DECODE_CHECK,
    description="decode attention pass 2: merge partitions and the sink",
    reference_in_float32=True,
))


def decode_kernels_fit(heads: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> bool:
    """Whether the decode kernels take this attention's shape (head_dim a multiple of 32, whole
    GQA groups of at most 32 query heads) and are active for ``dtype``, whatever the key count:
    the compiled step's question (it passes the number of keys as a device array)."""
    return (head_dim % 32 == 0 and heads % kv_heads == 0 and 32 * (heads // kv_heads) <= 1024
            and registry.active(PARTIAL.name, dtype) and registry.active(COMBINE.name, dtype))


def _decode_fits(q: mx.array, keys: mx.array, n_keys: int) -> bool:
    """One query token, batch 1, enough keys, the kernels fit and are active."""
    B, heads, L, D = q.shape
    return (L == 1 and B == 1 and n_keys >= MIN_KEYS and decode_kernels_fit(heads, keys.shape[1], D, q.dtype))


def sdpa_decode(q, keys, values, n_keys: int | mx.array, sinks, scale: float) -> mx.array:
    """softmax([q.k_t * scale, sink]) . v over the first n_keys cache positions (an int, or a ()
    int32 array on the device): q (1, HEADS, 1, D), keys/values the cache buffers
    (1, KV_HEADS, CAPACITY, D) -> (1, 1, HEADS, D), token-major like ``ops.sdpa``'s output."""
    heads, D = q.shape[1], q.shape[3]
    (partial,) = PARTIAL_SPEC.launch(q.reshape(heads, D), keys, values, scale, n_keys)
    (out,) = COMBINE_SPEC.launch(partial, sinks, q.dtype)
    return out.reshape(1, 1, heads, D)


# ---- decode, one pass over the cache before the token (the engine's decode steps) ---------------

STEP = Kernel("sdpa_decode_step", ["q", "kv", "cache", "position", "sinks", "scale", "pending"],
              ["out", "passed"], constants=("scale",))
# Up to this many cached keys a full layer's step runs in one pass (one threadgroup per KV head
# reads them all); past it, the two-pass kernels above split them, after the layer's own write.
# A ring (128 slots) always takes the one pass.
STEP_MAX_KEYS = 1024
STEP_SIMDGROUPS = 32  # a threadgroup's, each taking every 32nd key (MLX's one-pass kernel's count)


def step_plan(q, kv, cache, position, sinks, scale, pending, index, layers, ring) -> Launch:
    """q (HEADS, D) and kv (2 KV_HEADS, D): the token's query heads and its key then value heads;
    cache (1, 2 KV_HEADS, SLOTS, D) the layer's keys then values before the token; position (1,)
    int32; sinks (HEADS,); pending (``layers``, 2 KV_HEADS, D) the keys and values of the kind's
    earlier layers (rows < ``index``; any array at index 0); ``ring``: the token's slot is
    position % SLOTS (a sliding layer), else position. Outputs: out (HEADS, D) and passed
    (``layers``, 2 KV_HEADS, D): pending's earlier rows, this layer's, zeros after it."""
    heads, D = q.shape
    kv2 = kv.shape[0]
    if (kv.shape[1] != D or cache.shape[1] != kv2 or cache.shape[3] != D or D % 32 or kv2 % 2
            or heads % (kv2 // 2) or not 0 <= index < layers or (index and pending.shape != (layers, kv2, D))):
        raise ValueError(f"sdpa_decode_step: q {q.shape}, kv {kv.shape}, cache {cache.shape}, pending "
                         f"{pending.shape}, index {index} of {layers}: needs whole GQA groups, head_dim % 32 "
                         f"== 0, a row for each layer")
    simdgroups = min(STEP_SIMDGROUPS, cache.shape[2] + 1)  # no more than the keys there can be
    return Launch(
        inputs=[q, kv, cache, position, sinks, float(scale), pending],
        output_shapes=[(heads, D), (layers, kv2, D)], output_dtypes=[q.dtype, q.dtype],
        grid=(32 * simdgroups, heads, 1), threadgroup=(32 * simdgroups, 1, 1),
        template=[("T", q.dtype), ("S_T", sinks.dtype), ("D", D), ("SG", simdgroups), ("RING", int(ring)),
                  ("INDEX", int(index)), ("LAYERS", int(layers))],
    )


def step_reference(q, kv, cache, position, sinks, scale, pending, index, layers, ring):
    """What the layer's own write followed by the attention computes: the token's key and value
    written into its slot of a copy of the cache, then MLX's attention over the slots up to it
    (a ring's filled ones), as ``RotatingKVCache``/``KVCache`` and :func:`attention` do; passed:
    pending's rows before ``index``, the token's key and value, zeros after."""
    heads, D = q.shape
    kv2, slots = kv.shape[0], cache.shape[2]
    own = kv.reshape(1, kv2, 1, D)
    p = position.reshape(())
    slot = p % slots if ring else p
    written = mx.where((mx.arange(slots) == slot).reshape(1, 1, slots, 1), own, cache)
    # The position on the device, as the compiled step has it: a mask, not a slice.
    visible = (mx.arange(slots) <= p).reshape(1, 1, 1, slots)
    k, v = written[:, : kv2 // 2], written[:, kv2 // 2:]
    out = mx.fast.scaled_dot_product_attention(q.reshape(1, heads, 1, D), k, v, scale=scale, mask=visible,
                                               sinks=sinks)
    passed = mx.concatenate([pending[:index] if index else mx.zeros((0, kv2, D), kv.dtype), kv[None],
                             mx.zeros((layers - index - 1, kv2, D), kv.dtype)])
    return out.reshape(heads, D), passed


def step_sample(shape, key, dtype):
    """Random arguments for ``shape`` (heads, kv heads, D, slots, position, ring, index, layers)."""
    heads, kv_heads, D, slots, p, ring, index, layers = shape
    k1, k2, k3, k4, k5 = mx.random.split(key, 5)
    q = mx.random.normal((heads, D), key=k1).astype(dtype)
    kv = mx.random.normal((2 * kv_heads, D), key=k5).astype(dtype)
    cache = mx.random.normal((1, 2 * kv_heads, slots, D), key=k2).astype(dtype)
    sinks = mx.random.normal((heads,), key=k3).astype(dtype)
    pending = mx.random.normal((layers, 2 * kv_heads, D), key=k4).astype(dtype) if index else kv
    return q, kv, cache, mx.array([p], dtype=mx.int32), sinks, D ** -0.5, pending, index, layers, ring


STEP_SPEC = registry.register(registry.KernelSpec(
    "sdpa_decode_step", STEP, step_plan, step_reference, step_sample,
    check=((8, 2, 32, 40, 37, 0, 1, 3), 350),
    description="decode attention in one pass over the cache before the token, its own key from the qkv "
                "output; the token's keys and values of a kind passed on for one write",
    reference_in_float32=True,
))


def step_fits(heads: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> bool:
    """Whether the one-pass step kernel takes this attention's shape and is active for ``dtype``:
    head_dim a multiple of 32 whose simdgroups' sums fit a threadgroup's 32 KB (4 bytes x
    (32 x head_dim + 64): head_dim up to 224)."""
    return (head_dim % 32 == 0 and 4 * (32 * head_dim + 64) <= 32768 and heads % kv_heads == 0
            and registry.active(STEP.name, dtype))


def step_covers(keys: int) -> bool:
    """Whether a full layer with ``keys`` keys cached takes the one-pass step (else it writes the
    token's key first and the two-pass kernels read them)."""
    return keys < STEP_MAX_KEYS


def attention_step(q, kv, sinks, scale: float, step) -> mx.array:
    """The attention of one token (q (1, HEADS, 1, D), kv (1, 2 KV_HEADS, 1, D)) in a grouped
    decode step: ``step`` (cache.GroupedStep) holds the layer's storage before the token; the
    token's keys and values of the group's layers so far go on in ``step.group.passing`` ->
    (1, 1, HEADS, D), token-major like ``ops.sdpa``'s output."""
    heads, D = q.shape[1], q.shape[3]
    kv = kv.reshape(-1, D)
    group = step.group
    out, group.passing = STEP_SPEC.launch(q.reshape(heads, D), kv, step.buffer, step.position, sinks, scale,
                                          kv if group.passing is None else group.passing, step.index,
                                          group.layers, step.ring)
    return out.reshape(1, 1, heads, D)


# ---- prefill ------------------------------------------------------------------------------------

PREFILL = Kernel("sdpa_prefill", ["q", "k", "v", "sinks", "scale"], ["out"], constants=("scale",))


def _queries_per_group(gqa: int) -> int:
    # (query head, query) pairs per threadgroup, one per simdgroup: at most 16 simdgroups (512
    # threads, safe for any Metal pipeline's register budget), at least one query.
    return max(1, min(4, 16 // gqa))


def prefill_plan(q, k, v, sinks, scale, window) -> Launch:
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


def prefill_reference(q, k, v, sinks, scale, window):
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


def prefill_sample(shape, key, dtype):
    """Random (q, k, v, sinks, scale, window) for ``shape`` (heads, kv heads, D, L, K, window)."""
    heads, kv_heads, D, L, K, window = shape
    k1, k2, k3, k4 = mx.random.split(key, 4)
    q = mx.random.normal((heads, L, D), key=k1).astype(dtype)
    k = mx.random.normal((kv_heads, K, D), key=k2).astype(dtype)
    v = mx.random.normal((kv_heads, K, D), key=k3).astype(dtype)
    sinks = mx.random.normal((heads,), key=k4).astype(dtype)
    return q, k, v, sinks, D ** -0.5, window


PREFILL_SPEC = registry.register(registry.KernelSpec(
    "sdpa_prefill", PREFILL, prefill_plan, prefill_reference, prefill_sample,
    check=((8, 2, 32, 12, 20, 8), 400),
    description="prefill attention: window and causality from indices (no mask), sinks, GQA",
    reference_in_float32=True,
))


def _prefill_fits(q: mx.array, keys: mx.array, window: int | None) -> bool:
    """Several queries of batch 1 on a sliding layer, head_dim a multiple of 32, kernel active.
    Full layers keep MLX's fused causal attention (it needs no mask array there)."""
    B, heads, L, D = q.shape
    return (window is not None and L > 1 and B == 1 and D % 32 == 0 and heads % keys.shape[1] == 0
            and registry.active(PREFILL_SPEC.name, q.dtype))


def sdpa_prefill(q, keys, values, sinks, scale: float, window: int | None) -> mx.array:
    """q (1, HEADS, L, D); keys/values (1, KV_HEADS, K, D) in position order ending at the last
    query -> (1, L, HEADS, D), token-major."""
    (out,) = PREFILL_SPEC.launch(q[0], keys[0], values[0], sinks, scale, window)
    return out[None]


# ---- what the model calls ----------------------------------------------------------------------

def attention(q, k, v, sinks, scale: float, window: int | None, offset: int, cache=None) -> mx.array:
    """``ops.sdpa(q, k, v, sinks, scale, window, offset)``: q (B, H, L, D) at positions offset ..,
    k/v (B, KV, K, D) as ``cache.update_and_fetch`` returned them -> (B, L, H, D)."""
    n_keys = getattr(cache, "n_keys", None)
    if n_keys is not None:
        # The compiled step (decode_step.StepCache, which checked decode_kernels_fit): the
        # whole storage, the number of keys read on the device.
        return sdpa_decode(q, cache.keys, cache.values, n_keys, sinks, scale)
    if cache is not None and _decode_fits(q, cache.keys, k.shape[2]):
        # One token over a long cache: read the cache buffer directly, each KV head's keys
        # once for all of its query heads, split across threadgroups.
        # The number of keys as a view of a device array, not a Python int: on MLX-CUDA that
        # would become a scalar in the pool of small arrays (cache.device_positions). The
        # partitions are the same: a full layer's capacity is a multiple of CHUNK, a ring's 128.
        n_keys = device_positions(k.shape[2]).reshape(())
        return sdpa_decode(q, cache.keys, cache.values, n_keys, sinks, scale)
    if _prefill_fits(q, k, window):
        # Many queries on a sliding layer: only the key tiles inside each window, no mask array.
        return sdpa_prefill(q, k, v, sinks, scale, window)
    return ops.sdpa(q, k, v, sinks, scale, window, offset)
