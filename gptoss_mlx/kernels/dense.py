"""Dense linear layers with a bias on a few rows (metal/linear_decode.metal, and with the RMSNorm
before them metal/rms_norm_linear_decode.metal): the attention's qkv and output projections at
decode. References: nn.Linear's ``addmm(bias, x, weight.T)``, after ``mx.fast.rms_norm``."""

from __future__ import annotations

import mlx.core as mx

from . import registry
from .launch import Kernel, Launch

LINEAR = Kernel("linear_decode", ["x", "weight", "bias"], ["y"])
NORM_LINEAR = Kernel("rms_norm_linear_decode", ["x", "weight", "bias", "gain", "eps"], ["y"])

# Rows of x up to which the kernels replace MLX's matmul: each simdgroup re-reads x's rows for
# its weight row, and above a few rows MLX's GEMM shares them.
MAX_TOKENS = 4
SIMDGROUPS = 8  # per threadgroup: one output each


def linear_reference(x, weight, bias):
    """x (T, K), weight (N, K), bias (N,) -> (T, N)."""
    return (mx.addmm(bias, x, weight.T),)


def norm_linear_reference(x, weight, bias, gain, eps):
    """linear_reference of rms_norm(x) * gain."""
    return linear_reference(mx.fast.rms_norm(x, gain, eps), weight, bias)


def _plan(inputs, x, weight) -> Launch:
    T, K = x.shape
    N = weight.shape[0]
    return Launch(
        inputs=inputs, output_shapes=[(T, N)], output_dtypes=[x.dtype],
        grid=(32 * SIMDGROUPS, -(-N // SIMDGROUPS), 1), threadgroup=(32 * SIMDGROUPS, 1, 1),
        template=[("T_", x.dtype), ("K", K), ("N", N), ("TOKENS", T)],
    )


def linear_plan(x, weight, bias) -> Launch:
    return _plan([x, weight, bias], x, weight)


def norm_linear_plan(x, weight, bias, gain, eps) -> Launch:
    return _plan([x, weight, bias, gain, float(eps)], x, weight)


def linear_sample(shape, key, dtype):
    """Random (x, weight, bias) for ``shape`` (tokens, K, N)."""
    T, K, N = shape
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((T, K), key=k1).astype(dtype)
    weight = (mx.random.normal((N, K), key=k2) * K ** -0.5).astype(dtype)
    bias = (0.1 * mx.random.normal((N,), key=k3)).astype(dtype)
    return x, weight, bias


def norm_linear_sample(shape, key, dtype):
    """Random (x, weight, bias, gain, eps) for ``shape`` (tokens, K, N); x of rms 4."""
    k1, k2 = mx.random.split(key)
    x, weight, bias = linear_sample(shape, k1, dtype)
    gain = (1 + 0.2 * mx.random.normal((shape[1],), key=k2)).astype(dtype)
    return (4 * x).astype(dtype), weight, bias, gain, 1e-5


LINEAR_SPEC = registry.register(registry.KernelSpec(
    "linear_decode", LINEAR, linear_plan, linear_reference, linear_sample, check=((1, 64, 24), 700),
    description="dense linear + bias on a few rows: the attention's output projection at decode",
    reference_in_float32=True,
))
NORM_LINEAR_SPEC = registry.register(registry.KernelSpec(
    "rms_norm_linear_decode", NORM_LINEAR, norm_linear_plan, norm_linear_reference, norm_linear_sample,
    check=((1, 64, 24), 800),
    description="RMSNorm + dense linear + bias on a few rows: the attention's input norm and qkv",
    reference_in_float32=True,
))


def plain_linear(layer, dtype: mx.Dtype) -> bool:
    """Whether the kernels can read ``layer``'s weight: an nn.Linear with a bias, in the
    activations' dtype. A quantized layer (--dense-bits) runs its own path, and so does an
    adapted one (lora.LoRALinear holds no weight of its own)."""
    return "weight" in layer and "bias" in layer and layer.weight.dtype == dtype


def linear(x: mx.array, layer, norm=None) -> mx.array:
    """``layer(norm(x))`` (``layer(x)`` without a norm) for x (..., K): one kernel when x has a
    few rows and ``layer`` (and ``norm``, an RMSNorm) are plain."""
    K = x.shape[-1]
    rows = x.size // K
    if rows <= MAX_TOKENS and K % 8 == 0 and plain_linear(layer, x.dtype):
        flat = x.reshape(rows, K)
        if norm is None and registry.active(LINEAR_SPEC.name, x.dtype):
            (y,) = LINEAR_SPEC.launch(flat, layer.weight, layer.bias)
            return y.reshape(*x.shape[:-1], -1)
        if norm is not None and norm.weight.dtype == x.dtype and registry.active(NORM_LINEAR_SPEC.name, x.dtype):
            (y,) = NORM_LINEAR_SPEC.launch(flat, layer.weight, layer.bias, norm.weight, norm.eps)
            return y.reshape(*x.shape[:-1], -1)
    return layer(x if norm is None else norm(x))
