"""The attention's first steps at decode in one launch (metal/qkv_rope_decode.metal): the input
RMSNorm, the qkv projection with its bias, and RoPE on the query and key heads. Reference:
``mx.fast.rms_norm``, nn.Linear's ``addmm`` and ``mx.fast.rope`` with the model's frequencies.
The model calls :func:`qkv_rope`."""

from __future__ import annotations

import mlx.core as mx

from ..cache import device_positions, joined
from . import registry
from .dense import plain_linear
from .launch import Kernel, Launch

KERNEL = Kernel("qkv_rope_decode", ["x", "gain", "eps", "weight", "bias", "positions", "periods"], ["y"],
                constants=("eps",))

MAX_TOKENS = 4  # rows of x up to which the kernel runs (each simdgroup re-reads x's rows: linear_decode)
SIMDGROUPS = 8  # per threadgroup: 4 row pairs


def reference(x, gain, eps, weight, bias, positions, periods, rope_heads):
    """x (T, K) normed by the RMSNorm ``gain`` (K,), ``eps``; weight (N, K), bias (N,);
    positions (T,) int32; periods (D/2,) -> (T, N): rows of N / D heads, the first
    ``rope_heads`` rotated at their token's position.

    The norm's output stays float32 (the unfused ``mx.fast.rms_norm`` rounds it to x's dtype;
    the torch reference rounds it once, after the gain); rounded to x's dtype where the unfused
    path on a GPU rounds next: the projection's output (float32 sums, as a GEMV) and the rotated
    rows (RoPE computes in float32)."""
    dtype = x.dtype
    normed = mx.fast.rms_norm(x.astype(mx.float32), gain.astype(mx.float32), eps)
    y = mx.addmm(bias.astype(mx.float32), normed, weight.astype(mx.float32).T).astype(dtype)
    T, N = y.shape
    D = 2 * periods.size
    if rope_heads == 0:  # (MLX-CUDA's rope fails to launch on an empty array)
        return (y,)
    heads = y.reshape(T, N // D, 1, D)  # (T, heads, 1, D): a batch of T rows, row t at positions[t]
    qk = mx.fast.rope(heads[:, :rope_heads].astype(mx.float32), D, traditional=False, base=None, scale=1.0,
                      offset=positions, freqs=periods).astype(dtype)
    return (mx.concatenate([qk, heads[:, rope_heads:]], axis=1).reshape(T, N),)


def plan(x, gain, eps, weight, bias, positions, periods, rope_heads) -> Launch:
    T, K = x.shape
    N = weight.shape[0]
    half = periods.size
    if K % 8 or N % (2 * half) or positions.size != T or gain.shape != (K,):
        raise ValueError(f"qkv_rope_decode: x {x.shape}, gain {gain.shape}, weight {weight.shape}, {half} "
                         f"periods, positions {positions.shape}: needs K % 8 == 0, a gain per input, whole "
                         f"heads, a position per row")
    pairs = SIMDGROUPS // 2
    return Launch(
        inputs=[x, gain, float(eps), weight, bias, positions, periods],
        output_shapes=[(T, N)], output_dtypes=[x.dtype],
        grid=(32 * SIMDGROUPS, -(-(N // 2) // pairs), 1), threadgroup=(32 * SIMDGROUPS, 1, 1),
        template=[("T_", x.dtype), ("K", K), ("N", N), ("HALF", half), ("ROPE_HEADS", rope_heads),
                  ("TOKENS", T), ("SG", SIMDGROUPS)],
    )


def sample(shape, key, dtype):
    """Random arguments for ``shape`` (tokens, K, heads, rope heads, head_dim)."""
    T, K, heads, rope_heads, D = shape
    k1, k2, k3, k4, k5 = mx.random.split(key, 5)
    N = heads * D
    x = (3 * mx.random.normal((T, K), key=k1)).astype(dtype)  # the residual stream, not unit-sized
    gain = (1 + 0.2 * mx.random.normal((K,), key=k5)).astype(dtype)
    weight = (mx.random.normal((N, K), key=k2) * K ** -0.5).astype(dtype)
    bias = (0.1 * mx.random.normal((N,), key=k3)).astype(dtype)
    positions = mx.random.randint(0, 131072, (T,), key=k4).astype(mx.int32)
    positions[0] = 131071  # gpt-oss's last position: past 16 bits, cos and sin of ~1e5 radians
    periods = mx.array([10000.0 ** (2 * i / D) for i in range(D // 2)], dtype=mx.float32)
    return x, gain, 1e-5, weight, bias, positions, periods, rope_heads


SPEC = registry.register(registry.KernelSpec(
    "qkv_rope_decode", KERNEL, plan, reference, sample, check=((1, 64, 4, 3, 16), 800),
    description="RMSNorm + qkv + bias + RoPE on a few rows: the attention's first steps at decode",
))


def _positions(offset, B: int, L: int) -> mx.array | None:
    """Each of the B * L rows' position as an int32 (B * L,) array, or None where the kernel
    does not take these positions (several rows of several sequences)."""
    if isinstance(offset, int):
        return device_positions(offset, L) if B == 1 else None
    if L == 1 and offset.size == B:  # a decode batch's rows, or the compiled step's () position
        return offset.reshape(B).astype(mx.int32)
    return None


def qkv_rope(x: mx.array, norm, layer, rope, offset, heads: int, kv_heads: int) -> tuple[mx.array, mx.array]:
    """x (B, L, K), normed first by ``norm`` (the block's RMSNorm, or None for x as it is);
    ``layer`` the qkv projection (``heads`` query heads, then ``kv_heads`` key and ``kv_heads``
    value heads, of ``rope.dims`` rows each); positions ``offset`` + 0 .. L - 1 (an int, or a (B,)
    array at L = 1) -> (queries rotated (B, heads, L, D), keys rotated then values
    (B, 2 kv_heads, L, D): side by side, as the cache holds them (cache.py))."""
    B, L, K = x.shape
    D = rope.dims
    rope_heads = heads + kv_heads
    positions = _positions(offset, B, L) if B * L <= MAX_TOKENS else None
    if (positions is not None and norm is not None and K % 8 == 0 and plain_linear(layer, x.dtype)
            and norm.weight.dtype == x.dtype and registry.active(SPEC.name, x.dtype)):
        (y,) = SPEC.launch(x.reshape(B * L, K), norm.weight, norm.eps, layer.weight, layer.bias, positions,
                           rope.periods, rope_heads)
        y = y.reshape(B, L, -1, D).transpose(0, 2, 1, 3)  # (B, heads, L, D)
        return y[:, :heads], y[:, heads:]
    if norm is not None:
        x = norm(x)
    qkv = layer(x).reshape(B, L, -1, D).transpose(0, 2, 1, 3)
    qk = rope(qkv[:, :rope_heads], offset)
    return qk[:, :heads], joined(qk[:, heads:], qkv[:, rope_heads:])
