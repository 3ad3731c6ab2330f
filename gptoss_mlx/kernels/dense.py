"""A dense linear layer with a bias on a few rows (metal/linear_decode.metal): the attention's
qkv and output projections at decode. Reference: nn.Linear's ``addmm(bias, x, weight.T)``."""

from __future__ import annotations

import mlx.core as mx

from . import registry
from .launch import Kernel, Launch

KERNEL = Kernel("linear_decode", ["x", "weight", "bias"], ["y"])

# Rows of x up to which the kernel replaces MLX's matmul: each simdgroup re-reads x's rows for
# its weight row, and above a few rows MLX's GEMM shares them.
MAX_TOKENS = 4
SIMDGROUPS = 8  # per threadgroup: one output each


def reference(x, weight, bias):
    """x (T, K), weight (N, K), bias (N,) -> (T, N)."""
    return (mx.addmm(bias, x, weight.T),)


def plan(x, weight, bias) -> Launch:
    T, K = x.shape
    N = weight.shape[0]
    return Launch(
        inputs=[x, weight, bias],
        output_shapes=[(T, N)], output_dtypes=[x.dtype],
        grid=(32 * SIMDGROUPS, -(-N // SIMDGROUPS), 1), threadgroup=(32 * SIMDGROUPS, 1, 1),
        template=[("T_", x.dtype), ("K", K), ("N", N), ("TOKENS", T)],
    )


def sample(shape, key, dtype):
    """Random (x, weight, bias) for ``shape`` (tokens, K, N)."""
    T, K, N = shape
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((T, K), key=k1).astype(dtype)
    weight = (mx.random.normal((N, K), key=k2) * K ** -0.5).astype(dtype)
    bias = (0.1 * mx.random.normal((N,), key=k3)).astype(dtype)
    return x, weight, bias


SPEC = registry.register(registry.KernelSpec(
    "linear_decode", KERNEL, plan, reference, sample, check=((1, 64, 24), 700),
    description="dense linear + bias on a few rows: the attention's projections at decode",
    reference_in_float32=True,
))


def plain_linear(layer, dtype: mx.Dtype) -> bool:
    """Whether the kernels can read ``layer``'s weight: an nn.Linear with a bias, in the
    activations' dtype. A quantized layer (--dense-bits) runs its own path, and so does an
    adapted one (lora.LoRALinear holds no weight of its own)."""
    return "weight" in layer and "bias" in layer and layer.weight.dtype == dtype


def linear(x: mx.array, layer) -> mx.array:
    """``layer(x)`` for x (..., K): one kernel when x has a few rows and ``layer`` is plain."""
    K = x.shape[-1]
    rows = x.size // K
    if rows <= MAX_TOKENS and K % 8 == 0 and plain_linear(layer, x.dtype) and registry.active(SPEC.name, x.dtype):
        (y,) = SPEC.launch(x.reshape(rows, K), layer.weight, layer.bias)
        return y.reshape(*x.shape[:-1], -1)
    return layer(x)
