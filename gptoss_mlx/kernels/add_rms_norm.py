"""Residual add + RMSNorm in one dispatch (metal/add_rms_norm.metal); reference: ops.add_rms_norm."""

from __future__ import annotations

import mlx.core as mx

from .. import ops
from . import registry
from .launch import Kernel, Launch

KERNEL = Kernel("add_rms_norm", ["x", "residual", "weight", "eps"], ["h", "y"], constants=("eps",))

# The fusion saves a dispatch, which counts at decode; long prefills keep MLX's tuned rms_norm
# (measured on the GPU machine: no gain there, and a loss at 16k tokens).
MAX_ROWS = 16


def plan(x: mx.array, residual: mx.array, weight: mx.array, eps: float) -> Launch:
    D = x.shape[-1]
    rows = x.size // D
    threads = min(1024, -(-D // 32) * 32)  # a column per thread where D allows: one load round
    return Launch(
        inputs=[x, residual, weight, float(eps)],
        output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype],
        grid=(threads, rows, 1), threadgroup=(threads, 1, 1),
        template=[("T", x.dtype), ("D", D), ("TG", threads)],
    )


def sample(shape: tuple[int, int], key: mx.array, dtype: mx.Dtype) -> tuple:
    """Random (x, residual, weight, eps) of ``shape`` (rows, D)."""
    rows, D = shape
    k1, k2, k3, _ = mx.random.split(key, 4)
    x = (4 * mx.random.normal((rows, D), key=k1)).astype(dtype)
    r = mx.random.normal((rows, D), key=k2).astype(dtype)
    w = (1 + 0.2 * mx.random.normal((D,), key=k3)).astype(dtype)
    return x, r, w, 1e-5


SPEC = registry.register(registry.KernelSpec(
    "add_rms_norm", KERNEL, plan, ops.add_rms_norm, sample, check=((1, 2880), 7),
    description="residual add + RMSNorm, one dispatch per norm",
))


def add_rms_norm(x: mx.array, residual: mx.array, weight: mx.array, eps: float):
    """(x + residual, rms_norm(x + residual) * weight): one kernel for decode-sized batches."""
    if (x.size // x.shape[-1] <= MAX_ROWS and x.dtype == residual.dtype == weight.dtype
            and x.shape == residual.shape and registry.active(SPEC.name, x.dtype)):
        h, y = SPEC.launch(x, residual, weight, eps)
        return h, y
    return ops.add_rms_norm(x, residual, weight, eps)
