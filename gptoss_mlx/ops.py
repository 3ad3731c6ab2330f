"""gpt-oss's own operations in plain MLX: the definitions the model computes and the custom
kernels (``kernels/``) must equal. A leaf module: it imports nothing from the package.

Following OpenAI's reference (``gpt_oss/torch/model.py`` in github.com/openai/gpt-oss):
``swiglu`` and the top-k-then-softmax routing are its ``swiglu`` and ``MLPBlock.forward``.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

SWIGLU_ALPHA = 1.702


@partial(mx.compile, shapeless=True)  # one fused kernel instead of seven
def swiglu(x_glu: mx.array, x_linear: mx.array, limit: float) -> mx.array:
    """gpt-oss's clamped SwiGLU: gate clamped above only, linear part clamped and shifted by +1."""
    x_glu = mx.minimum(x_glu, limit)
    x_linear = mx.clip(x_linear, -limit, limit)
    return x_glu * mx.sigmoid(SWIGLU_ALPHA * x_glu) * (x_linear + 1)


def top_k_softmax(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Each row's k largest logits, highest first (the lower expert on a tie), and a softmax
    over those k only: (T, E) -> indices (T, k) uint32, weights (T, k) in the logits' dtype."""
    indices = mx.stop_gradient(mx.argsort(-logits, axis=-1)[:, :k])  # a choice: no gradient
    weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
    return indices.astype(mx.uint32), weights


def gather_linear(x, weight, scales, bias, indices, *, biases=None, mode="mxfp4", group_size=32,
                  bits=4, sorted_indices=False):
    """Quantized expert linears: x (T, 1, 1, K) through experts ``indices`` (T, k) ->
    (T, k, 1, N), each expert's bias added. ``biases``: an affine mode's zero points."""
    y = mx.gather_qmm(x, weight, scales, biases, rhs_indices=indices, transpose=True,
                      group_size=group_size, bits=bits, mode=mode, sorted_indices=sorted_indices)
    return y + mx.expand_dims(bias[indices], -2)


def combine_experts(y: mx.array, weights: mx.array, residual: mx.array) -> mx.array:
    """residual + sum_j weights_j * y_j: (T, k, D), (T, k), (T, D) -> (T, D), in y's dtype (the
    router kernels give float32 weights holding values of it: metal/router.h)."""
    weights = weights.astype(y.dtype)  # a no-op where they match
    if y.shape[-2] == 1:  # one expert per token: MLX 0.32's shapeless compile crashes on a sum over one
        return residual + y.squeeze(-2) * weights
    return _combine_experts(y, weights, residual)


@partial(mx.compile, shapeless=True)
def _combine_experts(y: mx.array, weights: mx.array, residual: mx.array) -> mx.array:
    return residual + (y * mx.expand_dims(weights, -1)).sum(axis=-2)


def add_rms_norm(x: mx.array, residual: mx.array, weight: mx.array, eps: float):
    """(x + residual, rms_norm(x + residual) * weight)."""
    h = x + residual
    return h, mx.fast.rms_norm(h, weight, eps)


def window_mask(num_queries: int, num_keys: int, window: int | None) -> mx.array:
    """(L, K) bool: query i (at key index i + K - L) sees key j when j <= i + K - L and, with a
    window, j > i + K - L - window (exactly ``window`` keys, its own included)."""
    newest = mx.arange(num_keys - num_queries, num_keys)[:, None]
    key = mx.arange(num_keys)[None, :]
    visible = key <= newest
    return visible if window is None else visible & (key > newest - window)


def attention_mask(offset: int, num_queries: int, num_keys: int, window: int | None):
    """Mask for queries at positions offset .. offset+L-1 over keys that end at the last query.

    A key at position k is visible from query position q when k <= q and, on sliding layers,
    q - window < k (exactly ``window`` keys, the query's own included). Returns None when every
    key is visible, "causal" when plain causality is enough, else a boolean (L, K) array.
    """
    L, K = num_queries, num_keys
    if L == 1 and (window is None or K <= window):
        return None
    oldest_key = offset + L - K
    if window is None or (offset + L - 1) - oldest_key < window:
        return "causal"
    return window_mask(L, K, window)


def sdpa(q, k, v, sinks, scale: float, window: int | None, offset: int) -> mx.array:
    """softmax([q.k * scale over the visible keys, sink]) . v: q (B, H, L, D), k/v (B, KV, K, D)
    in position order ending at the last query -> (B, L, H, D), token-major. Sinks: an extra
    softmax column per head that takes weight but adds no value."""
    mask = attention_mask(offset, q.shape[2], k.shape[2], window)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    return out.transpose(0, 2, 1, 3)
