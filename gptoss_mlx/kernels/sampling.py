"""The greedy sampler in one launch (metal/greedy_token.metal): the argmax of the logits plus the
reserved ids' additive mask. Reference: ``mx.argmax(logits + banned)``. The engine's sampler
calls :func:`greedy_token`."""

from __future__ import annotations

import mlx.core as mx

from . import registry
from .launch import Kernel, Launch

KERNEL = Kernel("greedy_token", ["logits", "banned"], ["token"])
THREADS = 1024  # a threadgroup per row: 201088 logits are 25 rounds of 8 a thread


def plan(logits: mx.array, banned: mx.array, first: int) -> Launch:
    """logits (ROWS, V); banned (V - first,) of the logits' dtype, the mask of ids first .. V - 1
    (the ids below may all be emitted) -> token (ROWS,) uint32."""
    rows, V = logits.shape
    if banned.shape != (V - first,) or banned.dtype != logits.dtype or not 0 <= first < V:
        raise ValueError(f"greedy_token: logits {logits.shape} {logits.dtype}, banned {banned.shape} "
                         f"{banned.dtype}, first {first}: needs a mask entry per id from first, of the "
                         f"logits' dtype")
    threads = min(THREADS, -(-V // (8 * 32)) * 32)  # (8: the ids a thread reads at a time, WIDTH)
    return Launch(
        inputs=[logits, banned], output_shapes=[(rows,)], output_dtypes=[mx.uint32],
        grid=(threads, rows, 1), threadgroup=(threads, 1, 1),
        template=[("T", logits.dtype), ("TG", threads), ("FIRST", int(first))],
    )


def reference(logits: mx.array, banned: mx.array, first: int) -> tuple[mx.array]:
    mask = mx.concatenate([mx.zeros((first,), banned.dtype), banned])
    return (mx.argmax(logits + mask, axis=-1).astype(mx.uint32),)


def sample(shape, key, dtype):
    """Random (logits, banned, first) for ``shape`` (rows, V, first, kind): "ties", whole numbers
    from -2 to 2 (many equal maxima, in every thread: the lowest id wins); "nan", NaNs in the
    first row (the first wins, as in mx.argmax) and +inf at a reserved id in the last (+inf plus
    -inf: NaN); else the last row's top at its last id. The mask bans every third id from
    ``first`` on and the first row's top one where it is there."""
    rows, V, first, kind = shape
    logits = 3 * mx.random.normal((rows, V), key=key)
    if kind == "ties":
        logits = mx.clip(mx.round(logits), -2, 2)
    elif kind == "nan":
        logits[0, V // 2] = logits[0, V // 3] = float("nan")
        logits[-1, first + (1 - first) % 3] = float("inf")
    else:
        logits[-1, -1] = 100.0
    ids = mx.arange(first, V)
    banned = mx.where((ids % 3 == 1) | (ids == mx.argmax(logits[0])), float("-inf"), 0.0)
    return logits.astype(dtype), banned.astype(dtype), first


SPEC = registry.register(registry.KernelSpec(
    "greedy_token", KERNEL, plan, reference, sample, check=((2, 8192, 7000, ""), 900),
    description="the greedy sampler: the reserved ids' mask added and the argmax, one launch",
))


def greedy_token(logits: mx.array, banned: mx.array, first: int = 0) -> mx.array:
    """logits (B, V), banned (V,) 0 or -inf, of the logits' dtype, and 0 below ``first`` -> each
    row's token (B,) uint32, the lowest id among equal maxima, NaN the highest (as mx.argmax)."""
    V = logits.shape[-1]
    first = min(first, V - 1)
    if logits.ndim == 2 and registry.active(SPEC.name, logits.dtype):
        (token,) = SPEC.launch(logits, banned[first:], first)
        return token
    return mx.argmax(logits + banned, axis=-1)
