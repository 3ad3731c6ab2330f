"""The MoE at decode: a router kernel and two fused MXFP4 expert kernels (metal/moe_*.metal).
:func:`route` and :func:`experts` are what the model calls; each runs the kernels for small
batches and the plain-MLX path of ``ops`` otherwise. The references are what the model's
generic path computes (``gather_qmm`` on the packed experts, bias gathers, the clamped SwiGLU,
the weighted sum): what the kernels must equal.
"""

from __future__ import annotations

import mlx.core as mx

from .. import ops
from . import registry
from .launch import Kernel, Launch

# Per threadgroup: 256 threads; one simdgroup per output row — A: per column (its gate and
# linear row), B: per (output, expert). On the GPU machine this beat two or four outputs per
# simdgroup and whole MX blocks (uint4) per lane by 10-25 % (docs/measurements.md).
SIMDGROUPS = 8

# Up to this many tokens the kernels replace gather_qmm (each token re-reads its experts' rows,
# as gather_qmv does); above it the sorted gather_qmm path shares rows between tokens.
# Measured by scripts/bench_moe.py (see its docstring).
MAX_TOKENS = 16

ROUTER = Kernel("moe_router", ["x", "weight", "bias"], ["indices", "weights"])
GATE_UP = Kernel("moe_gate_up_swiglu", ["x", "w", "scales", "bias", "indices", "limit"], ["act"])
DOWN = Kernel("moe_down_combine", ["act", "w", "scales", "bias", "indices", "weights", "residual"], ["y"])


# ---- the router -------------------------------------------------------------------------------

def router_reference(x, weight, bias, k):
    """x (T, D), the router's weight (E, D) and bias (E,) -> (indices, weights), each (T, k)."""
    return ops.top_k_softmax(mx.addmm(bias, x, weight.T), k)


def router_plan(x, weight, bias, k) -> Launch:
    T, D = x.shape
    E = weight.shape[0]
    simdgroups = min(E, 32)
    return Launch(
        inputs=[x, weight, bias],
        output_shapes=[(T, k), (T, k)], output_dtypes=[mx.uint32, x.dtype],
        grid=(32 * simdgroups, T, 1), threadgroup=(32 * simdgroups, 1, 1),
        template=[("T_", x.dtype), ("D", D), ("E", E), ("TOP_K", k), ("SG", simdgroups)],
    )


def router_sample(shape, key, dtype):
    """Random (x, weight, bias, k) for ``shape`` (tokens, D, experts, top-k)."""
    T, D, E, k = shape
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((T, D), key=k1).astype(dtype)
    weight = (mx.random.normal((E, D), key=k2) * D ** -0.5).astype(dtype)
    bias = (0.1 * mx.random.normal((E,), key=k3)).astype(dtype)
    return x, weight, bias, k


# ---- kernel A: gate/up + SwiGLU ----------------------------------------------------------------

def gate_up_swiglu_reference(x, indices, w, scales, bias, limit):
    """x (T, D), indices (T, k), w [E, 2I, D/8] interleaved rows -> act (T, k, I)."""
    h = ops.gather_linear(mx.expand_dims(x, (-2, -3)), w, scales, bias, indices)  # (T, k, 1, 2I)
    return (ops.swiglu(h[..., ::2], h[..., 1::2], limit).squeeze(-2),)


def gate_up_swiglu_plan(x, indices, w, scales, bias, limit) -> Launch:
    T, D = x.shape
    k = indices.shape[-1]
    I = w.shape[1] // 2
    return Launch(
        inputs=[x, w, scales, bias, indices, float(limit)],
        output_shapes=[(T, k, I)], output_dtypes=[x.dtype],
        grid=(32 * SIMDGROUPS, -(-I // SIMDGROUPS), T * k), threadgroup=(32 * SIMDGROUPS, 1, 1),
        template=[("T_", x.dtype), ("D", D), ("I", I), ("TOP_K", k)],
    )


# ---- kernel B: down + routing weights + sum over experts ----------------------------------------

def down_combine_reference(act, indices, weights, w, scales, bias, residual):
    """act (T, k, I), indices/weights (T, k), w [E, D, I/8], residual (T, D) -> (T, D)."""
    y = ops.gather_linear(mx.expand_dims(act, -2), w, scales, bias, indices).squeeze(-2)  # (T, k, D)
    return (ops.combine_experts(y, weights, residual),)


def down_combine_plan(act, indices, weights, w, scales, bias, residual) -> Launch:
    T, k, I = act.shape
    D = w.shape[1]
    outs = max(1, SIMDGROUPS // k)  # outputs per threadgroup: one simdgroup per (output, expert)
    threads = 32 * k * outs
    return Launch(
        inputs=[act, w, scales, bias, indices, weights, residual],
        output_shapes=[(T, D)], output_dtypes=[act.dtype],
        grid=(threads, -(-D // outs), T), threadgroup=(threads, 1, 1),
        template=[("T_", act.dtype), ("D", D), ("I", I), ("TOP_K", k), ("OUTS", outs)],
    )


# ---- random inputs: packed experts and routings ---------------------------------------------------

def random_experts(key, E, N, K, dtype):
    """MXFP4 weights [E, N, K/8], scales [E, N, K/32] of 2^-9..2^-5 (outputs of order 1 for
    unit inputs at K = 2880, like the real model's), bias [E, N]."""
    k1, k2, k3 = mx.random.split(key, 3)
    w = mx.random.randint(0, 256, (E, N, K // 2), key=k1).astype(mx.uint8).view(mx.uint32)
    scales = mx.random.randint(118, 123, (E, N, K // 32), key=k2).astype(mx.uint8)
    bias = (0.5 * mx.random.normal((E, N), key=k3)).astype(dtype)
    return w, scales, bias


def _routing(key, T, E, k):
    """T tokens' top-k experts (distinct, unsorted) and softmaxed weights."""
    k1, k2 = mx.random.split(key)
    indices = mx.argsort(mx.random.uniform(shape=(T, E), key=k1), axis=-1)[:, :k].astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((T, k), key=k2), axis=-1)
    return indices, weights


def gate_up_sample(shape, key, dtype):
    """Random kernel A arguments for ``shape`` (tokens, D, I, experts, top-k)."""
    T, D, I, E, k = shape
    k1, k2, k3 = mx.random.split(key, 3)
    w, scales, bias = random_experts(k1, E, 2 * I, D, dtype)
    indices, _ = _routing(k2, T, E, k)
    x = mx.random.normal((T, D), key=k3).astype(dtype)
    return x, indices, w, scales, bias, 7.0


def down_sample(shape, key, dtype):
    """Random kernel B arguments for ``shape`` (tokens, D, I, experts, top-k)."""
    T, D, I, E, k = shape
    k1, k2, k3 = mx.random.split(key, 3)
    w, scales, bias = random_experts(k1, E, D, I, dtype)
    indices, weights = _routing(k2, T, E, k)
    k3, k4 = mx.random.split(k3)
    act = mx.random.normal((T, k, I), key=k3).astype(dtype)
    residual = mx.random.normal((T, D), key=k4).astype(dtype)
    return act, indices, weights.astype(dtype), w, scales, bias, residual


ROUTER_SPEC = registry.register(registry.KernelSpec(
    "moe_router", ROUTER, router_plan, router_reference, router_sample, check=((2, 64, 8, 4), 500),
    description="MoE router: logits, top-k experts and their softmax in one launch",
))
GATE_UP_SPEC = registry.register(registry.KernelSpec(
    "moe_gate_up_swiglu", GATE_UP, gate_up_swiglu_plan, gate_up_swiglu_reference, gate_up_sample,
    check=((1, 64, 64, 4, 2), 100),
    description="MoE decode A: MXFP4 gate/up rows in one pass + biases + clamped SwiGLU",
    reference_in_float32=True,
))
DOWN_SPEC = registry.register(registry.KernelSpec(
    "moe_down_combine", DOWN, down_combine_plan, down_combine_reference, down_sample,
    check=((1, 64, 64, 4, 2), 200),
    description="MoE decode B: MXFP4 down + bias, weighted sum over experts, residual add",
    reference_in_float32=True,
))


# ---- what the model calls ----------------------------------------------------------------------

def route(x: mx.array, router, k: int) -> tuple[mx.array, mx.array]:
    """The top-k experts of each token of x (T, D), highest first, and their softmaxed weights,
    through ``router`` (an nn.Linear, or a quantized one): one kernel for small batches."""
    # (an adapted router, lora.LoRALinear, holds no weight of its own: the ops path runs it)
    if x.shape[0] <= MAX_TOKENS and "weight" in router and router.weight.dtype == x.dtype \
            and "bias" in router and registry.active(ROUTER_SPEC.name, x.dtype):
        return tuple(ROUTER_SPEC.launch(x, router.weight, router.bias, k))
    return ops.top_k_softmax(router(x), k)


def _fused_fits(x: mx.array, layer) -> bool:
    gu = layer.gate_up_proj
    return (
        x.shape[0] <= MAX_TOKENS
        and getattr(gu, "mode", None) == "mxfp4"  # not an adapted layer (lora.LoRASwitchLinear)
        and x.dtype == gu.bias.dtype
        and registry.active(GATE_UP_SPEC.name, x.dtype)
        and registry.active(DOWN_SPEC.name, x.dtype)
    )


def experts(x, indices, weights, layer, residual) -> mx.array:
    """residual + sum_j weights[:, j] * expert_{indices[:, j]}(x): (T, D) -> (T, D), through
    ``layer`` (the model's Experts): :func:`fused_experts` for decode-sized batches of MXFP4
    experts, else ``layer`` and ``ops.combine_experts``."""
    if _fused_fits(x, layer):
        return fused_experts(x, indices, weights, layer, residual)
    return ops.combine_experts(layer(x, mx.stop_gradient(indices)), weights, residual)


def fused_experts(x, indices, weights, layer, residual) -> mx.array:
    """What :func:`experts` computes, with kernels A and B (whatever the batch size).

    They accumulate in float32 and round once, so on real decode inputs they land 2-3x closer to
    the float32 block than MLX's bf16 path does. Either rounding can still decide a near-tie in
    the next layer's router (4th and 5th logits within a bf16 ulp) differently from float32,
    which moves that token's logits visibly (docs/measurements.md)."""
    gu, down = layer.gate_up_proj, layer.down_proj
    (act,) = GATE_UP_SPEC.launch(x, indices, gu.weight, gu.scales, gu.bias, layer.swiglu_limit)
    if weights.dtype != x.dtype:
        weights = weights.astype(x.dtype)
    (y,) = DOWN_SPEC.launch(act, indices, weights, down.weight, down.scales, down.bias, residual)
    return y
