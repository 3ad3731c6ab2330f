"""The MoE at decode: the router (alone, or with the add + RMSNorm before it) and two fused MXFP4
expert kernels (metal/moe_*.metal, metal/add_rms_norm_route.metal). :func:`add_rms_norm_route`,
:func:`route` and :func:`experts` are what the model calls; each runs the kernels for small
batches and the plain-MLX path of ``ops`` otherwise. The references are what the model's
generic path computes (``gather_qmm`` on the packed experts, bias gathers, the clamped SwiGLU,
the weighted sum): what the kernels must equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .. import ops
from . import registry
from .add_rms_norm import add_rms_norm
from .launch import Kernel, Launch
from .dense import plain_linear


@dataclass(frozen=True)
class Variant:
    """How the expert kernels spread the work (metal/moe_*.metal headers). Every variant computes
    the same sums in float32 in the same order; scripts/bench_moe.py --ncu --variants times them
    side by side on the GPU."""

    rows_a: int = 1  # kernel A: output columns per simdgroup (their gate and linear rows)
    simdgroups_a: int = 8  # kernel A: simdgroups per threadgroup
    rows_b: int = 2  # kernel B: outputs per simdgroup
    groups_b: int = 1  # kernel B: groups of top-k simdgroups per threadgroup


# "base": kernel A one column per simdgroup, 8 simdgroups a threadgroup; kernel B two outputs
# per simdgroup, one group of top-k simdgroups. Lanes take whole MX blocks (16-byte loads). In
# the 20b model on the GPU machine (Nsight Compute, GPU time per decode token) this layout took
# kernel A from 797 to 708 µs a token; of the variants below none did better than "base" by more
# than B's 16 µs (groups of 1 instead of 2), and more rows per simdgroup cost 270-340 µs more
# (more registers, fewer warps: both kernels are latency-bound; docs/measurements.md).
VARIANTS = {
    "base": Variant(),
    "a-rows2": Variant(rows_a=2),
    "a-sg4": Variant(simdgroups_a=4),
    "a-rows2-sg4": Variant(rows_a=2, simdgroups_a=4),
    "b-rows1": Variant(rows_b=1),
    "b-rows4": Variant(rows_b=4),
    "b-g2": Variant(groups_b=2),
    "b-rows4-g2": Variant(rows_b=4, groups_b=2),
}
VARIANT = VARIANTS["base"]  # what the model runs

# Up to this many tokens the kernels replace gather_qmm (each token re-reads its experts' rows,
# as gather_qmv does); above it the sorted gather_qmm path shares rows between tokens.
# Measured by scripts/bench_moe.py (see its docstring).
MAX_TOKENS = 16

# add_rms_norm_route: at most this many simdgroups per threadgroup (it holds a router row's slice,
# 96 floats at D = 2880, in registers: 142 of them per thread on CUDA, where a threadgroup's
# 65536 registers allow 384 such threads), hence D <= 12 * 256 (a chunk of 8 values per thread).
NORM_ROUTER_SIMDGROUPS = 12
NORM_ROUTER_MAX_D = 32 * 8 * NORM_ROUTER_SIMDGROUPS

ROUTER = Kernel("moe_router", ["x", "weight", "bias"], ["indices", "weights"])
NORM_ROUTER = Kernel("add_rms_norm_route", ["x", "residual", "gain", "eps", "weight", "bias"],
                     ["h", "y", "indices", "weights"], constants=("eps",))
GATE_UP = Kernel("moe_gate_up_swiglu", ["x", "w", "scales", "bias", "indices", "limit"], ["act"],
                 constants=("limit",))
DOWN = Kernel("moe_down_combine", ["act", "w", "scales", "bias", "indices", "weights", "residual"], ["y"])


# ---- the router -------------------------------------------------------------------------------

def router_reference(x, weight, bias, k):
    """x (T, D), the router's weight (E, D) and bias (E,) -> (indices, weights), each (T, k)."""
    return ops.top_k_softmax(mx.addmm(bias, x, weight.T), k)


def router_plan(x, weight, bias, k) -> Launch:
    T, D = x.shape
    E = weight.shape[0]
    simdgroups = -(-D // 256)  # a chunk of 8 values of x per thread
    return Launch(
        inputs=[x, weight, bias],
        output_shapes=[(T, k), (T, k)], output_dtypes=[mx.uint32, mx.float32],  # weights: T_ values (router.h)
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


# ---- the add + RMSNorm before the MoE, and the router, in one launch -------------------------

def norm_router_reference(x, residual, gain, eps, weight, bias, k):
    """(h, y) = ops.add_rms_norm(x, residual, gain, eps); (indices, weights) of y's rows."""
    h, y = ops.add_rms_norm(x, residual, gain, eps)
    return (h, y, *router_reference(y.reshape(-1, y.shape[-1]), weight, bias, k))


def norm_router_plan(x, residual, gain, eps, weight, bias, k) -> Launch:
    D = x.shape[-1]
    T = x.size // D
    E = weight.shape[0]
    # A chunk of 8 values of the row per thread; up to 12 simdgroups share the router's rows.
    simdgroups = max(-(-D // 256), min(E, NORM_ROUTER_SIMDGROUPS))
    return Launch(
        inputs=[x, residual, gain, float(eps), weight, bias],
        output_shapes=[x.shape, x.shape, (T, k), (T, k)], output_dtypes=[x.dtype, x.dtype, mx.uint32, mx.float32],
        grid=(32 * simdgroups, T, 1), threadgroup=(32 * simdgroups, 1, 1),
        template=[("T_", x.dtype), ("D", D), ("E", E), ("TOP_K", k), ("SG", simdgroups)],
    )


def norm_router_sample(shape, key, dtype):
    """Random (x, residual, gain, eps, weight, bias, k) for ``shape`` (tokens, D, experts, top-k)."""
    T, D, E, k = shape
    k1, k2, k3 = mx.random.split(key, 3)
    x, weight, bias, _ = router_sample(shape, k1, dtype)
    residual = mx.random.normal((T, D), key=k2).astype(dtype)
    gain = (1 + 0.2 * mx.random.normal((D,), key=k3)).astype(dtype)
    return x, residual, gain, 1e-5, weight, bias, k


# ---- kernel A: gate/up + SwiGLU ----------------------------------------------------------------

def gate_up_swiglu_reference(x, indices, w, scales, bias, limit):
    """x (T, D), indices (T, k), w [E, 2I, D/8] interleaved rows -> act (T, k, I)."""
    h = ops.gather_linear(mx.expand_dims(x, (-2, -3)), w, scales, bias, indices)  # (T, k, 1, 2I)
    return (ops.swiglu(h[..., ::2], h[..., 1::2], limit).squeeze(-2),)


def gate_up_swiglu_plan(x, indices, w, scales, bias, limit) -> Launch:
    T, D = x.shape
    k = indices.shape[-1]
    I = w.shape[1] // 2
    v = VARIANT
    return Launch(
        inputs=[x, w, scales, bias, indices, float(limit)],
        output_shapes=[(T, k, I)], output_dtypes=[x.dtype],
        grid=(32 * v.simdgroups_a, -(-I // (v.simdgroups_a * v.rows_a)), T * k),
        threadgroup=(32 * v.simdgroups_a, 1, 1),
        template=[("T_", x.dtype), ("D", D), ("I", I), ("TOP_K", k), ("ROWS", v.rows_a)],
    )


# ---- kernel B: down + routing weights + sum over experts ----------------------------------------

def down_combine_reference(act, indices, weights, w, scales, bias, residual):
    """act (T, k, I), indices/weights (T, k), w [E, D, I/8], residual (T, D) -> (T, D)."""
    y = ops.gather_linear(mx.expand_dims(act, -2), w, scales, bias, indices).squeeze(-2)  # (T, k, D)
    return (ops.combine_experts(y, weights, residual),)


def down_combine_plan(act, indices, weights, w, scales, bias, residual) -> Launch:
    T, k, I = act.shape
    D = w.shape[1]
    v = VARIANT
    groups = max(1, min(v.groups_b, 8 // k))  # at most 8 simdgroups, or one group (k > 8)
    outs = groups * v.rows_b  # outputs per threadgroup
    threads = 32 * k * groups
    if outs > threads:  # a thread per output adds the experts (metal/moe_down_combine.metal)
        raise ValueError(f"moe_down_combine: {outs} outputs per threadgroup need at most as many threads ({threads})")
    return Launch(
        inputs=[act, w, scales, bias, indices, weights, residual],
        output_shapes=[(T, D)], output_dtypes=[act.dtype],
        grid=(threads, -(-D // outs), T), threadgroup=(threads, 1, 1),
        template=[("T_", act.dtype), ("D", D), ("I", I), ("TOP_K", k), ("OUTS", outs), ("ROWS", v.rows_b)],
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
    # as the router kernels give them: values of dtype, stored as float32 (metal/router.h)
    return act, indices, weights.astype(dtype).astype(mx.float32), w, scales, bias, residual


ROUTER_SPEC = registry.register(registry.KernelSpec(
    "moe_router", ROUTER, router_plan, router_reference, router_sample, check=((1, 2880, 32, 4), 500),
    description="MoE router: logits, top-k experts and their softmax in one launch",
))
NORM_ROUTER_SPEC = registry.register(registry.KernelSpec(
    "add_rms_norm_route", NORM_ROUTER, norm_router_plan, norm_router_reference, norm_router_sample,
    check=((1, 2880, 32, 4), 600),
    description="residual add + RMSNorm + MoE router: one launch per layer before the experts",
))
GATE_UP_SPEC = registry.register(registry.KernelSpec(
    "moe_gate_up_swiglu", GATE_UP, gate_up_swiglu_plan, gate_up_swiglu_reference, gate_up_sample,
    check=((1, 64, 64, 4, 2), 100),
    description="MoE decode A: MXFP4 gate/up rows in one pass + biases + clamped SwiGLU",
    reference_in_float32=True,
))
DOWN_SPEC = registry.register(registry.KernelSpec(
    "moe_down_combine", DOWN, down_combine_plan, down_combine_reference, down_sample,
    check=((1, 64, 2880, 8, 4), 200),
    description="MoE decode B: MXFP4 down + bias, weighted sum over experts, residual add",
    reference_in_float32=True,
))


# ---- what the model calls ----------------------------------------------------------------------

def route(x: mx.array, router, k: int) -> tuple[mx.array, mx.array]:
    """The top-k experts of each token of x (T, D), highest first, and their softmaxed weights,
    through ``router`` (an nn.Linear, or a quantized one): one kernel for small batches. The
    kernel's weights are float32 holding values of x's dtype (metal/router.h); the plain path's
    are x's dtype: the same numbers."""
    if x.shape[0] <= MAX_TOKENS and x.shape[1] <= 8192 and plain_linear(router, x.dtype) \
            and registry.active(ROUTER_SPEC.name, x.dtype):
        return tuple(ROUTER_SPEC.launch(x, router.weight, router.bias, k))
    return ops.top_k_softmax(router(x), k)


def add_rms_norm_route(x, residual, gain, eps: float, router, k: int):
    """(h, y, routing): ``add_rms_norm(x, residual, gain, eps)`` and, from the same kernel for
    decode-sized batches, routing = :func:`route` of y's rows (indices, weights); where that
    kernel does not apply, routing is None and the caller routes y (the MoE block does)."""
    D = x.shape[-1]
    if (x.size // D <= MAX_TOKENS and D % 8 == 0 and D <= NORM_ROUTER_MAX_D and x.shape == residual.shape
            and x.dtype == residual.dtype == gain.dtype and plain_linear(router, x.dtype)
            and registry.active(NORM_ROUTER_SPEC.name, x.dtype)):
        h, y, indices, weights = NORM_ROUTER_SPEC.launch(x, residual, gain, eps, router.weight,
                                                         router.bias, k)
        return h, y, (indices, weights)
    return (*add_rms_norm(x, residual, gain, eps), None)


MAX_TOP_K = 32  # kernel B runs a simdgroup per (token, expert slot): at most 1024 threads


def fused_fits(x: mx.array, layer, top_k: int) -> bool:
    """Whether :func:`experts` runs the fused kernels for ``x`` (T, D) and ``top_k`` experts a
    token through ``layer``."""
    gu = layer.gate_up_proj
    return (
        x.shape[0] <= MAX_TOKENS
        and top_k <= MAX_TOP_K
        and getattr(gu, "mode", None) == "mxfp4"  # not an adapted layer (lora.LoRASwitchLinear)
        and x.dtype == gu.bias.dtype
        and registry.active(GATE_UP_SPEC.name, x.dtype)
        and registry.active(DOWN_SPEC.name, x.dtype)
    )


def experts(x, indices, weights, layer, residual) -> mx.array:
    """residual + sum_j weights[:, j] * expert_{indices[:, j]}(x): (T, D) -> (T, D), through
    ``layer`` (the model's Experts): :func:`fused_experts` for decode-sized batches of MXFP4
    experts, else ``layer`` and ``ops.combine_experts``."""
    if fused_fits(x, layer, indices.shape[-1]):
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
    (y,) = DOWN_SPEC.launch(act, indices, weights, down.weight, down.scales, down.bias, residual)
    return y
