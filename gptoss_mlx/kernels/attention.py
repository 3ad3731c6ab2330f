"""Attention with sinks and the window: the decode kernels (``sdpa_decode``) for one token over
a long cache, the prefill kernel (``sdpa_prefill``) for many queries on a sliding layer, and
``ops.sdpa`` (MLX's fused attention) otherwise."""

from __future__ import annotations

import mlx.core as mx

from .. import ops
from . import sdpa_decode, sdpa_prefill


def attention(q, k, v, sinks, scale: float, window: int | None, offset: int, cache=None) -> mx.array:
    """``ops.sdpa(q, k, v, sinks, scale, window, offset)``: q (B, H, L, D) at positions offset ..,
    k/v (B, KV, K, D) as ``cache.update_and_fetch`` returned them -> (B, L, H, D)."""
    if cache is not None and sdpa_decode.fits(q, cache.keys, k.shape[2]):
        # One token over a long cache: read the cache buffer directly, each KV head's keys
        # once for all of its query heads, split across threadgroups.
        return sdpa_decode.run(q, cache.keys, cache.values, k.shape[2], sinks, scale)
    if sdpa_prefill.fits(q, k, window):
        # Many queries on a sliding layer: only the key tiles inside each window, no mask array.
        return sdpa_prefill.run(q, k, v, sinks, scale, window)
    return ops.sdpa(q, k, v, sinks, scale, window, offset)
