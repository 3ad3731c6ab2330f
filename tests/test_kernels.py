"""Every kernel in metal/: clang type-checks the Metal source MLX generates for it, and the CPU
emulator runs that same source against the plain-MLX reference, in both scheduling orders.
Planted bugs (a missing barrier, an off-by-one, a typo) must be caught; the run-time safety
check must disable a kernel that is wrong."""

from __future__ import annotations

import math
import os
import shutil
import struct
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_mlx import kernels
from gptoss_mlx.kernels import moe, registry
from gptoss_mlx.kernels.launch import Kernel, Launch, kernel_source
from gptoss_mlx.testing import toolchain
from gptoss_mlx.testing.samples import MODEL_SHAPES, emulated_dtypes, samples

REQUIRE = os.environ.get("GPTOSS_MLX_REQUIRE_TOOLCHAIN") == "1"  # set by .ci/run


def _need(tool, what):
    if tool is None:
        if REQUIRE:
            pytest.fail(f"{what} not found, and GPTOSS_MLX_REQUIRE_TOOLCHAIN=1")
        pytest.skip(f"{what} not found")
    return tool


@pytest.fixture(scope="module")
def clang():
    return _need(toolchain.find_clang(), "clang++ >= 15 (apt-get install clang-16)")


@pytest.fixture(scope="module")
def cxx():
    return _need(toolchain.find_cxx(), "a C++ compiler (g++ >= 12)")


CASES = [
    (name, dtype, i)
    for name, spec in registry.REGISTRY.items()
    for dtype in spec.dtypes
    for i in range(len(samples(name, dtype)))
]


def _ids(case):
    name, dtype, i = case
    return f"{name}-{str(dtype).split('.')[-1]}-sample{i}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_generated_metal_source_type_checks(case, clang):
    name, dtype, i = case
    spec = registry.REGISTRY[name]
    source = toolchain.generated_metal_source(spec.kernel, spec.plan(*samples(name, dtype)[i]))
    assert "[[kernel]]" in source
    toolchain.check_metal_syntax(source, clang)


# float16 on the first sample only (the run-time check's; every sample is still type-checked): the
# same source as bfloat16's for another 16-bit type, and each sample is an emulator build of its
# own (a fresh clone's suite built 277, 1-2 s each).
EMULATED = [(name, dtype, i) for name, dtype, i in CASES
            if dtype in emulated_dtypes(name) and (dtype != mx.float16 or i == 0)]


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("case", EMULATED, ids=_ids)
def test_emulated_kernel_matches_reference(case, order, cxx):
    name, dtype, i = case
    spec = registry.REGISTRY[name]
    args = samples(name, dtype)[i]
    got = toolchain.emulate(spec.kernel, spec.plan(*args), order)
    err = registry.max_error(got, spec.expected(*args))
    assert err <= registry.tolerance(dtype), f"{name} {dtype} sample {i}: error {err}"


def _variant_kernels(name: str) -> list[str]:
    """The expert kernels whose launch a variant changes (the others run as in "base")."""
    v, base = moe.VARIANTS[name], moe.VARIANTS["base"]
    changed = []
    if (v.rows_a, v.simdgroups_a) != (base.rows_a, base.simdgroups_a):
        changed.append("moe_gate_up_swiglu")
    if (v.rows_b, v.groups_b) != (base.rows_b, base.groups_b):
        changed.append("moe_down_combine")
    return changed


# Each variant on the sample with the model's input width (2880: every lane strides over
# several packed words, split-K has parts to combine) and on the one with several tokens and a
# ragged last threadgroup (gptoss_mlx/testing/samples.py), in bfloat16 (the dtypes' loads are the
# default variant's). The base kernels run every sample in both dtypes above.
VARIANT_CASES = [
    (variant, name, mx.bfloat16, i)
    for variant in moe.VARIANTS if variant != "base"
    for name in _variant_kernels(variant)
    for i in (1, 2)
]


@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: f"{c[0]}-" + _ids(c[1:]))
def test_every_expert_kernel_variant_type_checks_and_matches_the_reference(case, clang, cxx, monkeypatch):
    """The variants scripts/bench_moe.py times on the GPU pass the same checks as the default:
    clang on the generated source, the emulator in both orders on every sample."""
    variant, name, dtype, i = case
    monkeypatch.setattr(moe, "VARIANT", moe.VARIANTS[variant])
    spec = registry.REGISTRY[name]
    args = samples(name, dtype)[i]
    launch = spec.plan(*args)
    toolchain.check_metal_syntax(toolchain.generated_metal_source(spec.kernel, launch), clang)
    for order in ("forward", "reverse"):
        err = registry.max_error(toolchain.emulate(spec.kernel, launch, order), spec.expected(*args))
        assert err <= registry.tolerance(dtype), f"{variant} {name} {dtype} sample {i} {order}: error {err}"


@pytest.mark.parametrize("scale", [241, 254])
@pytest.mark.parametrize("name", ["moe_gate_up_swiglu", "moe_down_combine"])
def test_expert_kernels_take_the_largest_block_scales(name, scale, cxx):
    """E8M0 scale bytes up to 254 (2^127) with activations small enough that every output is
    finite: the kernels match MLX's dequantization (2^14 folded into the scale overflowed float
    from byte 241: NaN and inf)."""
    spec = registry.REGISTRY[name]
    sample = moe.gate_up_sample if name == "moe_gate_up_swiglu" else moe.down_sample
    args = list(sample((1, 64, 64, 4, 2), mx.random.key(0), mx.float32))
    first, scales = (0, 3) if name == "moe_gate_up_swiglu" else (0, 4)
    args[first] = args[first] * 2.0 ** -110  # x or act: the true outputs are of order 1 to 2^17
    args[scales] = mx.full(args[scales].shape, scale, mx.uint8)
    got = toolchain.emulate(spec.kernel, spec.plan(*args))
    assert registry.max_error(got, spec.expected(*args)) <= registry.tolerance(mx.float32)


def test_the_gate_up_kernel_keeps_a_nan_activation_nan(cxx):
    """A NaN in a token's x makes its SwiGLU outputs NaN, as MLX's path does (min and clamp
    returned the limit for NaN, so the token's outputs came out finite)."""
    spec = registry.REGISTRY["moe_gate_up_swiglu"]
    x, *rest = moe.gate_up_sample((2, 64, 64, 4, 2), mx.random.key(0), mx.float32)
    x = mx.concatenate([mx.full((1, 64), float("nan")), x[1:]])
    (act,) = toolchain.emulate(spec.kernel, spec.plan(x, *rest))
    assert mx.isnan(act[0]).all().item() and not mx.isnan(act[1]).any().item()
    assert registry.max_error([act], spec.expected(x, *rest)) <= registry.tolerance(mx.float32)


@pytest.mark.parametrize("name", ["moe_router", "add_rms_norm_route"])
def test_a_nan_row_routes_to_experts_that_exist(cxx, name):
    """A token whose activations are NaN (float16 overflow, corrupt weights) has no logit above
    -inf: the top-k once returned expert E, one past the last, which the expert kernels read
    out of bounds and the streamed pool indexed with (IndexError). Now ids stay below E, the
    weights NaN (so the outputs are, as on MLX's path), and the other tokens route as before."""
    spec = registry.REGISTRY[name]
    args = list(spec.sample((2, 64, 8, 4), mx.random.key(3), mx.float32))
    args[0] = mx.concatenate([mx.full((1, 64), float("nan")), args[0][1:]])
    *_, indices, weights = toolchain.emulate(spec.kernel, spec.plan(*args))
    *_, ref_indices, ref_weights = spec.expected(*args)
    assert (np.array(indices) < 8).all(), np.array(indices)
    assert mx.isnan(weights[0]).all().item()
    assert sorted(np.array(indices[1]).tolist()) == sorted(np.array(ref_indices[1]).tolist())
    assert mx.allclose(mx.sort(weights[1]), mx.sort(ref_weights[1].astype(mx.float32)), atol=1e-6).item()


# The model-sized launches (gpt-oss-20b and 120b at one and four tokens) of every kernel whose
# threadgroup is large or whose registers hold rows: MLX compiles CUDA kernels without launch
# bounds, so more than 65536 registers per threadgroup would fail to launch on the GPU machine.
MODEL_LAUNCHES = [(name, shape) for name, shapes in MODEL_SHAPES.items() for shape in shapes]


@pytest.mark.parametrize("launch,variant", [
    (launch, variant) for launch in MODEL_LAUNCHES for variant in moe.VARIANTS
    if variant == "base" or launch[0] in _variant_kernels(variant)
], ids=lambda c: f"{c[0]}-{c[1]}" if isinstance(c, tuple) else c)
def test_cuda_mirror_fits_a_threadgroups_registers(launch, variant, monkeypatch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (the CUDA toolkit)")
    name, shape = launch
    monkeypatch.setattr(moe, "VARIANT", moe.VARIANTS[variant])
    spec = registry.REGISTRY[name]
    plan = spec.plan(*spec.sample(shape, mx.random.key(0), mx.bfloat16))
    registers, spilled = toolchain.cuda_registers(spec.kernel, plan, nvcc)
    threads = plan.threadgroup[0] * plan.threadgroup[1] * plan.threadgroup[2]
    assert registers * threads <= 65536, f"{registers} registers x {threads} threads"
    assert spilled == 0


def test_constant_scalars_reach_cuda_compiled_in_and_the_others_in_memory(monkeypatch):
    """On CUDA a kernel's constants (the SwiGLU limit, the norms' eps, the attention scale) are
    template arguments, not arrays: MLX-CUDA keeps arrays of up to 8 bytes in managed memory the
    host writes, and a kernel reading one waited on a page migration. A scalar that changes per
    call (the attention's key count) stays an input; every value reads back exactly."""
    import importlib

    from gptoss_mlx.kernels import launch as kl

    attention = importlib.import_module("gptoss_mlx.kernels.attention")

    built, called = [], []

    def cuda_kernel(**spec):
        built.append(spec)
        return lambda **kw: called.append(kw) or [mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]

    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_kernel)
    args = moe.gate_up_sample((1, 64, 64, 4, 2), mx.random.key(0), mx.float32)
    fresh = Kernel(moe.GATE_UP.name, moe.GATE_UP.input_names, moe.GATE_UP.output_names, constants=("limit",))
    fresh(moe.GATE_UP_SPEC.plan(*args[:-1], 7.25), backend="cuda")
    assert "limit" not in built[-1]["input_names"] and len(called[-1]["inputs"]) == 5
    assert _constant_value(called[-1]["template"], "limit") == 7.25
    assert "const float limit = __uint_as_float(" in built[-1]["source"]

    q = mx.zeros((1, 64, 1, 64)); kv = mx.zeros((1, 8, 4096, 64))
    partial = Kernel(attention.PARTIAL.name, attention.PARTIAL.input_names, attention.PARTIAL.output_names,
                     constants=attention.PARTIAL.constants)
    partial(kl.Launch([q, kv, kv, 0.125, 2049], [(1,)], [mx.float32], (32, 1, 1), (32, 1, 1)), backend="cuda")
    assert built[-1]["input_names"] == ["q", "k", "v", "n_keys__ptr"]
    assert called[-1]["inputs"][-1].item() == 2049
    assert _constant_value(called[-1]["template"], "scale") == 0.125
    # A () array (a view of the device's positions) goes in as it is: a copy would be a new
    # array of 4 bytes, in MLX-CUDA's pool of small arrays.
    n_keys = mx.arange(4096, dtype=mx.int32)[2049:2050].reshape(())
    partial(kl.Launch([q, kv, kv, 0.125, n_keys], [(1,)], [mx.float32], (32, 1, 1), (32, 1, 1)), backend="cuda")
    assert called[-1]["inputs"][-1] is n_keys


def _constant_value(template, name: str) -> float:
    """What the CUDA preamble reads back from constant ``name``'s template arguments."""
    args = dict(template)
    return struct.unpack("<f", struct.pack("<I", (args[f"{name}__hi"] << 16) | args[f"{name}__lo"]))[0]


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_a_float_constant_survives_its_trip_through_template_arguments(value):
    """Any float (signed zeros, subnormals, infinities, NaN, beyond float32's range) compiles in
    as the float32 mx.array makes of it, in template arguments that are all non-negative: MLX-CUDA
    names the kernel after them, and a negative float's bits as one int put a minus sign in the
    name, which NVRTC refused."""
    from gptoss_mlx.kernels import launch as kl

    template = kl.constant_template("limit", value, mx.float32)
    assert all(0 <= v < 2**16 for _, v in template)
    expected = mx.array(value, mx.float32).item()
    got = _constant_value(template, "limit")
    assert (got == expected and math.copysign(1, got) == math.copysign(1, expected)) or (got != got and expected != expected)


def test_a_negative_constant_compiles_in_the_cuda_mirror():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (the CUDA toolkit)")
    args = moe.gate_up_sample((1, 64, 64, 4, 2), mx.random.key(0), mx.bfloat16)
    launch = moe.GATE_UP_SPEC.plan(*args[:-1], -7.0)
    from gptoss_mlx.kernels import launch as kl

    assert "-" not in "".join(str(v) for _, v in kl.constant_template("limit", -7.0, mx.float32))
    registers, spilled = toolchain.cuda_registers(moe.GATE_UP, launch, nvcc)
    assert registers > 0 and spilled == 0


def test_every_variant_changes_one_expert_kernel():
    assert all(len(_variant_kernels(v)) == 1 for v in moe.VARIANTS if v != "base")


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_the_run_time_check_is_the_first_tested_sample(name):
    """What a Mac checks on first use is among what CI proves (and equal to it)."""
    spec = registry.REGISTRY[name]
    for dtype in spec.dtypes:
        check, first = spec.check_args(dtype), samples(name, dtype)[0]
        assert len(check) == len(first)
        for a, b in zip(check, first):
            if isinstance(a, mx.array):
                assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()
            else:
                assert a == b


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_the_run_time_check_launches_threadgroups_as_wide_as_the_model(name):
    """A threadgroup wider than the device runs for the kernel's registers fails at evaluation:
    in the run-time check, which then leaves the kernel off, if the check launches threadgroups
    as wide as any sample does (the samples hold gpt-oss's shapes); else at a decode step."""
    from math import prod

    spec = registry.REGISTRY[name]
    check = prod(spec.plan(*spec.check_args(mx.bfloat16)).threadgroup)
    assert check >= max(prod(spec.plan(*args).threadgroup) for args in samples(name, mx.bfloat16))


# ---- planted bugs ----------------------------------------------------------------------------

BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def _mutant(body: str, name: str = "add_rms_norm") -> Kernel:
    header, _ = kernel_source(name)
    spec = registry.REGISTRY[name]
    return Kernel(name, spec.kernel.input_names, spec.kernel.output_names, (header, body), spec.kernel.constants)


def _planted(name: str, old: str, new: str) -> Kernel:
    """Kernel ``name`` with ``old`` (once in its body or its helpers) replaced by ``new``."""
    header, body = kernel_source(name)
    assert (header + body).count(old) == 1, f"{old!r} is not in metal/{name}.metal once"
    if old in header:
        spec = registry.REGISTRY[name]
        return Kernel(name, spec.kernel.input_names, spec.kernel.output_names,
                      (header.replace(old, new), body), spec.kernel.constants)
    return _mutant(body.replace(old, new), name)


def _worst_error(kernel: Kernel) -> float:
    """The largest error over both scheduling orders and the first three samples."""
    spec = registry.REGISTRY["add_rms_norm"]
    worst = 0.0
    for order in ("forward", "reverse"):
        for args in samples("add_rms_norm", mx.float32)[:3]:
            got = toolchain.emulate(kernel, spec.plan(*args), order)
            worst = max(worst, registry.max_error(got, spec.reference(*args)))
    return worst


def _drop_barrier(body: str, which: int) -> str:
    start = -1
    for _ in range(which + 1):
        start = body.index(BARRIER, start + 1)
    return body[:start] + body[start + len(BARRIER):]


@pytest.mark.parametrize("which", [0, 1], ids=["first-barrier", "second-barrier"])
def test_emulator_catches_a_missing_barrier(which, cxx):
    _, body = kernel_source("add_rms_norm")
    assert body.count(BARRIER) == 2
    assert _worst_error(_mutant(body)) <= registry.tolerance(mx.float32)  # the unmutated source passes
    assert _worst_error(_mutant(_drop_barrier(body, which))) > 1e-2


def test_emulator_catches_an_off_by_one(cxx):
    _, body = kernel_source("add_rms_norm")
    old = "for (uint k = 0; k < PER; ++k) {\n  const uint col"
    assert body.count(old) == 1
    mutant = body.replace(old, "for (uint k = 1; k < PER; ++k) {\n  const uint col")
    assert _worst_error(_mutant(mutant)) == float("inf")  # the first columns never written: NaN


def test_emulator_catches_a_partial_reduction(cxx):
    _, body = kernel_source("add_rms_norm")
    mutant = body.replace("lane < TG / 32", "lane < TG / 32 - 1")
    assert mutant != body
    assert _worst_error(_mutant(mutant)) > 1e-2


# Memory errors that leave the result right on some runs (or on the CPU) and wrong on a Mac: the
# checked emulator reports them by kernel, buffer and index (metal/msl_emulate.h).
MEMORY_MUTANTS = {
    "router-one-expert-past-the-block": (
        "moe_router", "if (c < EB && e0 + c < E) {", "if (c <= EB && e0 + c <= E) {",
        r"kernel 'moe_router' failed in the emulator: out-of-bounds access: "
        r"(buffer 'bias'|threadgroup array 'partial'|threadgroup array 'logits') at index \d+, outside \[0, \d+\)"),
    "linear-one-chunk-past-the-row": (
        "linear_decode", "if (chunk < CH) {\n      load8(w_row", "if (chunk <= CH) {\n      load8(w_row",
        r"kernel 'linear_decode' failed in the emulator: out-of-bounds access: buffer 'weight' at index \d+, outside \[0, \d+\)"),
    "decode-q-staging-past-the-tile": (
        "sdpa_decode_partial", "i < GQA * D; i += threads", "i <= GQA * D; i += threads",
        r"kernel 'sdpa_decode_partial' failed in the emulator: out-of-bounds access: "
        r"(buffer 'q'|threadgroup array 'q_tile') at index \d+, outside \[0, \d+\)"),
    "prefill-acc-initialised-one-off": (
        "sdpa_prefill", "acc[i] = 0.0f;", "acc[i + 1] = 0.0f;",
        r"kernel 'sdpa_prefill' failed in the emulator: out-of-bounds access: "
        r"thread array 'acc' at index (\d+), outside \[0, \1\)"),
}


@pytest.mark.parametrize("mutant", list(MEMORY_MUTANTS))
def test_emulator_reports_an_out_of_bounds_access(mutant, cxx):
    name, old, new, message = MEMORY_MUTANTS[mutant]
    spec = registry.REGISTRY[name]
    args = samples(name, mx.float32)[0]
    for order in ("forward", "reverse"):
        with pytest.raises(toolchain.ToolchainError, match=message):
            toolchain.emulate(_planted(name, old, new), spec.plan(*args), order)


# Bugs in the expert kernels' variants: each is caught by the emulator on the variant's samples.
VARIANT_MUTANTS = {
    "gate-up-second-column-written-over-the-first": (
        "moe_gate_up_swiglu", "a-rows2", "act[size_t(slot) * I + first + r]", "act[size_t(slot) * I + first]"),
    "gate-up-second-column-reads-the-first-columns-rows": (
        "moe_gate_up_swiglu", "a-rows2", "2 * metal::min(first + r, uint(I - 1))", "2 * metal::min(first, uint(I - 1))"),
    "down-second-row-reads-the-first-rows-scales": (
        "moe_down_combine", "b-rows4", "mxfp4_scale(sc[r * STEPS + step])", "mxfp4_scale(sc[step])"),
    "down-second-group-written-over-the-first": (
        "moe_down_combine", "b-rows4-g2", "partial[(group * ROWS + r) * TOP_K + j]", "partial[r * TOP_K + j]"),
}


@pytest.mark.parametrize("mutant", list(VARIANT_MUTANTS))
def test_emulator_catches_a_bug_in_a_kernel_variant(mutant, cxx, monkeypatch):
    name, variant, old, new = VARIANT_MUTANTS[mutant]
    monkeypatch.setattr(moe, "VARIANT", moe.VARIANTS[variant])
    spec = registry.REGISTRY[name]
    kernel = _planted(name, old, new)
    worst = 0.0
    for i in (1, 2, 4):
        args = samples(name, mx.float32)[i]
        for order in ("forward", "reverse"):
            try:
                worst = max(worst, registry.max_error(toolchain.emulate(kernel, spec.plan(*args), order),
                                                      spec.expected(*args)))
            except toolchain.ToolchainError:
                worst = float("inf")  # an access outside a buffer or array
    assert worst > 1e-2


@pytest.mark.parametrize("old,new", [
    ("  sums[sg] = sumsq;\n}\n" + BARRIER, "  sums[sg] = sumsq;\n}\n"),  # the norm's sum read too early
    ("xv = static_cast<float>(static_cast<T_>(gv[n]", "xv = static_cast<float>(static_cast<T_>(hv[n]"),
], ids=["norm-barrier-dropped", "router-reads-h-not-y"])
def test_emulator_catches_a_bug_in_the_fused_norm_and_router(old, new, cxx):
    assert _worst_planted_error("add_rms_norm_route", old, new) > 1e-2


def _worst_planted_error(name: str, old: str, new: str) -> float:
    """The largest error of kernel ``name`` with ``old`` replaced by ``new`` over its float32
    samples in both orders (inf where the emulator reports a bad access), up to the first sample
    that shows an error over 1e-2: each sample is an emulator build, and one that catches the
    bug is enough."""
    spec, kernel = registry.REGISTRY[name], _planted(name, old, new)
    worst = 0.0
    for args in samples(name, mx.float32):
        for order in ("forward", "reverse"):
            try:
                worst = max(worst, registry.max_error(toolchain.emulate(kernel, spec.plan(*args), order),
                                                      spec.expected(*args)))
            except toolchain.ToolchainError:
                worst = float("inf")
        if worst > 1e-2:
            break
    return worst


@pytest.mark.parametrize("old,new", [
    ("const float wq = simd_shuffle(w, ushort(q));", "const float wq = w;"),  # each lane its own weight
    ("const int turn = metal::min(32, n_parts - p0);", "const int turn = metal::min(31, n_parts - p0);"),
    ("L += simd_sum(p < n_parts", "L += (p < n_parts"),  # each lane sums only its own partition
], ids=["weight-not-shuffled", "a-partition-per-turn-dropped", "denominator-not-summed"])
def test_emulator_catches_a_bug_in_the_decode_combine_kernel(old, new, cxx):
    assert _worst_planted_error("sdpa_decode_combine", old, new) > 1e-2


@pytest.mark.parametrize("old,new", [
    ("y[row] = static_cast<T_>(y1 * c - y2 * s);", "y[row] = static_cast<T_>(y1 * c + y2 * s);"),  # turned backwards
    ("position = positions[e_token];", "position = positions[0];"),  # every token at the first's position
    ("position = positions[e_token];", "position = positions[e_token] & 0xffff;"),  # positions cut to 16 bits
    ("period = periods[e_pair % HALF];", "period = periods[0];"),  # one frequency for the whole head
    ("e_pair / HALF < ROPE_HEADS;", "e_pair / HALF <= ROPE_HEADS;"),  # the first value head rotated
    ("const float y2 = ys[e_token * SG + PAIRS + tid % PAIRS];", "const float y2 = ys[e_token * SG + tid % PAIRS];"),
    ("+ (sg < PAIRS ? 0 : HALF);", "+ (sg < PAIRS ? 0 : 1);"),  # the pair's rows confused
    ("threadgroup_barrier(mem_flags::mem_threadgroup);\nif (tid < PAIRS", "if (tid < PAIRS"),  # the rows read too early
    ("rsqrt(simd_sum(sumsq[t])", "rsqrt((sumsq[t])"),  # a lane's squares only
    ("rsqrt(simd_sum(sumsq[t])", "rsqrt(simd_sum(sumsq[0])"),  # every token normed as the first
    ("acc[t] = simd_sum(acc[t]) * inv;", "acc[t] = simd_sum(acc[t]);"),  # the norm's factor left out
    ("xv[i] * gv[i]", "xv[i]"),  # the norm's gain left out
    ("simd_sum(sumsq[t]) / float(K) + eps", "simd_sum(sumsq[t]) / float(CH) + eps"),  # the mean over chunks
], ids=["rope-backwards", "one-position", "16-bit-positions", "one-frequency", "value-head-rotated", "pair-partner-wrong",
        "pair-rows-confused", "barrier-dropped", "norm-sum-not-shared", "norm-of-the-first-token", "norm-dropped",
        "gain-dropped", "mean-over-chunks"])
def test_emulator_catches_a_bug_in_the_qkv_rope_kernel(old, new, cxx):
    assert _worst_planted_error("qkv_rope_decode", old, new) > 1e-2


@pytest.mark.parametrize("old,new", [
    ("if (t < n && t == skip) {", "if (false) {"),  # a wrapped ring's slot of position p - window attended
    ("const float s = simd_sum(dot);", "const float s = dot;"),  # a score of one lane's dimensions
    ("l = l * correction + weight;", "l = l + weight;"),  # the running sum not rescaled
    ("passed[i] = pending[i];", "passed[i] = static_cast<T>(0.0f);"),  # the earlier layers' keys dropped
    ("threadgroup_barrier(mem_flags::mem_threadgroup);\n", ""),  # merged before every simdgroup wrote
    ("+ metal::exp(sink - M);", ";"),  # the sink left out
    ("const float wi = simd_shuffle(w, ushort(i));", "const float wi = w;"),  # one simdgroup's weight for all
    ("for (uint t = sg; t <= n; t += SG)", "for (uint t = sg; t < n; t += SG)"),  # the token's own key left out
], ids=["ring-slot-not-skipped", "score-not-summed", "sum-not-rescaled", "pending-dropped",
        "barrier-dropped", "sink-dropped", "merge-weight-not-shuffled", "own-key-left-out"])
def test_emulator_catches_a_bug_in_the_decode_step_kernel(old, new, cxx):
    assert _worst_planted_error("sdpa_decode_step", old, new) > 1e-2


@pytest.mark.parametrize("old,new", [
    ("return a > b || (a == b && ia < ib);", "return a > b || (a == b && ia > ib);"),  # a tie to the later id
    ("return a_nan && (!b_nan || ia < ib);", "return false;"),  # a NaN passed over (mx.argmax takes it)
    ("v[j] + static_cast<float>(banned[i - FIRST])", "v[j]"),  # the reserved ids not masked
    ("best = lane < TG / 32 ? best_values[lane] : -INFINITY;", "best = best_values[0];"),  # one simdgroup's best
    ("v[j] = base + j < V ?", "v[j] = base + j < V - 1 ?"),  # the last id never read
], ids=["tie-to-later-id", "nan-passed-over", "mask-not-added", "simdgroups-not-reduced", "last-id-skipped"])
def test_emulator_catches_a_bug_in_the_greedy_sampler_kernel(old, new, cxx):
    assert _worst_planted_error("greedy_token", old, new) > 1e-2


def test_emulator_shows_a_thread_array_element_never_written(cxx):
    """acc[0] left uninitialised (no access out of bounds): it starts as NaN, so the output is."""
    name = "sdpa_prefill"
    mutant = _planted(name, "for (uint i = 0; i < DL; ++i) {\n  acc[i] = 0.0f;",
                      "for (uint i = 1; i < DL; ++i) {\n  acc[i] = 0.0f;")
    args = samples(name, mx.float32)[0]
    got = toolchain.emulate(mutant, registry.REGISTRY[name].plan(*args))
    assert registry.max_error(got, registry.REGISTRY[name].expected(*args)) == float("inf")


def test_compile_check_reports_a_planted_error_with_its_line(clang):
    spec = registry.REGISTRY["add_rms_norm"]
    _, body = kernel_source("add_rms_norm")
    bad = _mutant(body.replace("v = simd_sum(v);", "v = simd_summ(v);"))
    source = toolchain.generated_metal_source(bad, spec.plan(*samples("add_rms_norm", mx.float16)[0]))
    with pytest.raises(toolchain.ToolchainError, match=r"kernel\.metal\.cpp:\d+:\d+: error: use of undeclared identifier 'simd_summ'"):
        toolchain.check_metal_syntax(source, clang)
    bad = _mutant(body.replace("h_row[col] = hi;", "h_row[col] = hi"))
    source = toolchain.generated_metal_source(bad, spec.plan(*samples("add_rms_norm", mx.float16)[0]))
    with pytest.raises(toolchain.ToolchainError, match="expected ';'"):
        toolchain.check_metal_syntax(source, clang)


# ---- what the emulator refuses (undefined on Metal, or unportable to CUDA) ---------------------

def _tiny_kernel(body: str, n: int = 64, threadgroup=64):
    k = Kernel("emulator_probe", ["x"], ["out"], ("", body))
    x = mx.arange(n, dtype=mx.float32)
    return k, Launch([x], [(n,)], [mx.float32], (n, 1, 1), (threadgroup, 1, 1))


def test_emulator_rejects_a_barrier_after_an_early_return(cxx):
    k, launch = _tiny_kernel("""
uint i = thread_position_in_grid.x;
if (i % 2 == 1) return;
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i] = x[i];
""")
    with pytest.raises(toolchain.ToolchainError, match="threadgroup_barrier"):
        toolchain.emulate(k, launch)


def test_emulator_rejects_a_simd_op_with_an_inactive_lane(cxx):
    k, launch = _tiny_kernel("""
uint i = thread_position_in_grid.x;
if (thread_index_in_simdgroup == 3) return;
out[i] = simd_sum(x[i]);
""")
    with pytest.raises(toolchain.ToolchainError, match=r"lane.*simd_\* operation|simd_\* operation with an inactive lane"):
        toolchain.emulate(k, launch)


def test_emulator_poisons_threadgroup_memory_for_every_threadgroup(cxx):
    """Threadgroup 0 writes its threadgroup array, threadgroup 1 only reads it: on Metal it gets
    whatever that memory held, so here it gets NaN (not threadgroup 0's values)."""
    k, launch = _tiny_kernel("""
threadgroup float shared[64];
uint t = thread_index_in_threadgroup;
if (threadgroup_position_in_grid.x == 0) {
  shared[t] = x[thread_position_in_grid.x];
}
threadgroup_barrier(mem_flags::mem_threadgroup);
out[thread_position_in_grid.x] = shared[t];
""", n=128)
    got = np.array(toolchain.emulate(k, launch)[0])
    assert got[:64].tolist() == list(range(64))
    assert np.isnan(got[64:]).all()


def test_emulator_poisons_thread_arrays(cxx):
    k, launch = _tiny_kernel("""
uint i = thread_position_in_grid.x;
float f[2];
uint u[2];
f[0] = x[i];
u[0] = 1;
out[i] = i % 2 == 0 ? f[1] : (u[1] == 0xFFFFFFFFu ? f[0] : 0.0f);
""")
    got = np.array(toolchain.emulate(k, launch)[0])
    assert np.isnan(got[0::2]).all()
    assert got[1::2].tolist() == list(range(1, 64, 2))


@pytest.mark.parametrize("access,message", [
    ("out[i] = x[i + 1];", r"buffer 'x' at index 64, outside \[0, 64\) \(elements of 4 bytes\)"),
    ("out[i] = x[int(i) - 1];", r"buffer 'x' at index -1, outside \[0, 64\) \(elements of 4 bytes\)"),
    ("out[i + 1] = x[i];", r"buffer 'out' at index 64, outside \[0, 64\) \(elements of 4 bytes\)"),
    ("out[i] = ((const device float4*)x)[i / 4 + 1].x;",
     r"buffer 'x' at index 16, outside \[0, 16\) \(elements of 16 bytes\)"),
    ("threadgroup float t[64];\nt[i + 1] = x[i];\nout[i] = 0.0f;",
     r"threadgroup array 't' at index 64, outside \[0, 64\) \(elements of 4 bytes\)"),
    ("float a[3];\nfor (uint j = 0; j <= 3; ++j) a[j] = x[i];\nout[i] = a[0];",
     r"thread array 'a' at index 3, outside \[0, 3\) \(elements of 4 bytes\)"),
], ids=["read-past-end", "read-before-start", "write-past-end", "vector-read-past-end", "threadgroup-array",
        "thread-array"])
def test_emulator_reports_the_buffer_and_index_of_a_bad_access(access, message, cxx):
    k, launch = _tiny_kernel("uint i = thread_position_in_grid.x;\n" + access)
    with pytest.raises(toolchain.ToolchainError, match=r"kernel 'emulator_probe' failed in the emulator: "
                       r"out-of-bounds access: " + message + r", by thread \d+ of threadgroup \(0, 0, 0\)$"):
        toolchain.emulate(k, launch, "reverse")


def test_emulator_reports_a_misaligned_vector_load(cxx):
    k, launch = _tiny_kernel("""
uint i = thread_position_in_grid.x;
out[i] = ((const device float4*)(x + 1))[0].x;
""")
    with pytest.raises(toolchain.ToolchainError, match=r"misaligned access: buffer 'x' at byte offset 4 as a 16-byte type"):
        toolchain.emulate(k, launch)


@pytest.mark.parametrize("declaration", ["float a[2][2];", "float a[2], b[2];", "threadgroup float s;"])
def test_emulator_refuses_memory_it_cannot_check(declaration):
    source = f"void k() {{\n{declaration}\n}}\n"
    with pytest.raises(toolchain.ToolchainError, match="the emulator cannot check"):
        toolchain.checked_source(source)


def test_emulator_simd_functions(cxx):
    k, launch = _tiny_kernel("""
uint i = thread_position_in_grid.x;
uint lane = thread_index_in_simdgroup;
float v = x[i];
float r = simd_sum(v) + 1000.0f * simd_max(v) + simd_shuffle_down(v, 1) * 0.5f
        + simd_shuffle_xor(v, 5) * 0.25f + simd_broadcast(v, 7) * 0.125f + simd_shuffle_up(v, 2) * 2.0f;
out[i] = r + float(lane);
""")
    got = toolchain.emulate(k, launch)[0].tolist()
    for i in range(64):
        base, lane = i - i % 32, i % 32
        group = list(range(base, base + 32))
        down = i + 1 if lane + 1 < 32 else i
        up = i - 2 if lane >= 2 else i
        expect = (sum(group) + 1000 * max(group) + 0.5 * down + 0.25 * (base + (lane ^ 5))
                  + 0.125 * (base + 7) + 2 * up + lane)
        assert got[i] == pytest.approx(expect), i


def test_launch_geometry_is_checked():
    x = mx.zeros((8,))
    with pytest.raises(ValueError, match="multiple of 32"):
        Launch([x], [(8,)], [mx.float32], (48, 1, 1), (48, 1, 1))
    with pytest.raises(ValueError, match="not a multiple"):
        Launch([x], [(8,)], [mx.float32], (96, 1, 1), (64, 1, 1))


# ---- the run-time safety check, with the emulator standing in for the GPU -----------------------

@pytest.fixture
def emulated_gpu(monkeypatch, cxx):
    """Pretend a GPU backend exists and run kernels in the emulator."""
    monkeypatch.setattr(registry, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(Kernel, "__call__", lambda self, launch, backend=None: toolchain.emulate(self, launch))
    registry.reset()
    yield
    registry.reset()


def test_a_correct_kernel_is_checked_once_and_used(emulated_gpu, monkeypatch):
    spec = registry.REGISTRY["add_rms_norm"]
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.active("add_rms_norm", mx.float16)
    assert registry.status(mx.float16)[0][1].startswith("active")
    calls = []
    monkeypatch.setattr(registry, "verify", lambda *a: calls.append(a) or "active")
    assert registry.active("add_rms_norm", mx.float16)  # remembered: no second check
    assert calls == []
    x, r, w, eps = samples("add_rms_norm", mx.float16)[0]
    h, y = kernels.add_rms_norm(x, r, w, eps)
    assert registry.max_error([h, y], spec.reference(x, r, w, eps)) < registry.tolerance(mx.float16)


def test_a_wrong_kernel_is_disabled_with_one_warning(emulated_gpu, monkeypatch):
    spec = registry.REGISTRY["add_rms_norm"]
    _, body = kernel_source("add_rms_norm")
    monkeypatch.setattr(spec, "kernel", _mutant(_drop_barrier(body, 0)))
    with pytest.warns(RuntimeWarning, match="add_rms_norm.*differs from the reference.*plain-MLX"):
        assert not registry.active("add_rms_norm", mx.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        x, r, w, eps = samples("add_rms_norm", mx.float32)[0]
        h, y = kernels.add_rms_norm(x, r, w, eps)  # the reference runs
    assert registry.max_error([h, y], spec.reference(x, r, w, eps)) == 0.0
    assert "disabled" in registry.status(mx.float32)[0][1]


def test_a_kernel_that_fails_to_compile_is_disabled(emulated_gpu, monkeypatch):
    spec = registry.REGISTRY["add_rms_norm"]
    _, body = kernel_source("add_rms_norm")
    monkeypatch.setattr(spec, "kernel", _mutant(body.replace("h_row[col] = hi;", "h_row[col] = hi")))
    with pytest.warns(RuntimeWarning, match="failed to run"):
        assert not registry.active("add_rms_norm", mx.bfloat16)


@pytest.mark.parametrize("value,expect", [("off", False), ("on", True)])
def test_the_environment_variable_chooses(emulated_gpu, monkeypatch, value, expect):
    monkeypatch.setenv(registry.ENV_VAR, value)
    monkeypatch.setattr(registry, "verify", lambda *a: pytest.fail("no check in 'on' or 'off' mode"))
    assert registry.active("add_rms_norm", mx.float16) is expect


def test_on_the_cpu_the_reference_runs(monkeypatch):
    registry.reset()
    monkeypatch.setattr(registry, "gpu_backend", lambda: None)
    assert not registry.active("add_rms_norm", mx.float32)
    assert registry.status()[0][1] == "reference path (no GPU backend here)"


def test_model_forward_with_emulated_kernels_matches_the_reference(emulated_gpu, checkpoints, monkeypatch):
    """By default (each kernel checked on first use) every kernel passes its check and is wired
    into the model (shapes, routing, the residual) to give the same logits."""
    from gptoss_mlx.loading import load_model

    model = load_model(checkpoints["hf"], dtype=mx.float32)
    tokens = mx.array([[1, 200, 77]])
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    with_kernels = model(tokens)
    assert all(state.startswith("active") for _, state, _ in registry.status(mx.float32))
    os.environ[registry.ENV_VAR] = "off"
    try:
        registry.reset()
        reference = model(tokens)
    finally:
        del os.environ[registry.ENV_VAR]
    assert mx.abs(with_kernels - reference).max().item() < 1e-4


def test_doctor_lists_every_kernel_and_its_state(capsys, monkeypatch):
    from gptoss_mlx.cli import main

    registry.reset()
    monkeypatch.setenv(registry.ENV_VAR, "off")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "Custom kernels (GPTOSS_MLX_KERNELS=off" in out
    for name in registry.REGISTRY:
        assert name in out
    assert ("reference path (no GPU backend here)" in out) or ("off (GPTOSS_MLX_KERNELS=off)" in out)


def _attention_test_model(seed: int, kernels: tuple[str, ...]):
    """A two-layer tiny model (sliding window 8, then full attention) with random weights, in
    which only ``kernels`` may run."""
    import mlx.nn as nn

    from conftest import TINY
    from gptoss_mlx.model import Model

    config = TINY.replace(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"),
                          head_dim=32, num_attention_heads=8, num_key_value_heads=2)
    mx.random.seed(seed)
    model = Model(config)
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.2 if p.dtype == mx.float32 else p,
                                   model.parameters()))
    for name in registry.REGISTRY:
        if name not in kernels:
            registry._state[(name, mx.float32)] = "off (this test)"
    return model


def _kernels_vs_reference(run, kernel: str) -> float:
    """Max |difference| between ``run()`` with the kernels (``kernel`` must have been active)
    and with GPTOSS_MLX_KERNELS=off."""
    with_kernels = run()
    assert registry._state[(kernel, mx.float32)].startswith("active")
    os.environ[registry.ENV_VAR] = "off"
    try:
        registry.reset()
        reference = run()
    finally:
        del os.environ[registry.ENV_VAR]
    return mx.abs(with_kernels - reference).max().item()


def test_decode_attention_kernel_in_the_model_across_the_window(emulated_gpu, monkeypatch):
    """Decode steps through the attention kernels (emulated) equal MLX's sdpa path, on a sliding
    layer (window 8: positions 7/8/9 and the ring wrapping) and a full layer."""
    import importlib

    sdpa_module = importlib.import_module("gptoss_mlx.kernels.attention")
    monkeypatch.setattr(sdpa_module, "MIN_KEYS", 1)  # the kernels for every cache length here
    model = _attention_test_model(3, ("sdpa_decode_partial", "sdpa_decode_combine"))

    def decode():  # positions 6..11: the window of 8 fills at 7, wraps from 8 on
        cache = model.make_cache()
        logits = [model(mx.array([[5, 9, 2, 7, 1, 3]]), cache=cache)[:, -1]]
        for t in range(6):
            logits.append(model(mx.array([[10 + t]]), cache=cache)[:, -1])
        return mx.stack(logits)

    assert _kernels_vs_reference(decode, "sdpa_decode_partial") < 1e-4


def test_prefill_attention_kernel_in_the_model_across_the_window(emulated_gpu):
    """Chunked prefill through the prefill kernel (emulated) equals MLX's masked sdpa path on a
    sliding layer (window 8): chunks that start before, at and after the window fills, with the
    ring's history prepended, and a full layer alongside."""
    model = _attention_test_model(4, ("sdpa_prefill",))
    tokens = [(7 * t + 3) % model.config.vocab_size for t in range(23)]

    def prefill():  # positions 0-5 (window not yet full), 6-12 (fills at 7), 13-22 (ring wraps)
        cache = model.make_cache()
        return mx.concatenate([model(mx.array([tokens[a:b]]), cache=cache)
                               for a, b in ((0, 6), (6, 13), (13, 23))], axis=1)

    assert _kernels_vs_reference(prefill, "sdpa_prefill") < 1e-4


# ---- scripts/check_kernels_gpu.py --sanitize, without the GPU ------------------------------------

def _script(name: str):
    """scripts/<name>.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _gpu_script():
    return _script("check_kernels_gpu")


# compute-sanitizer's output in the layout NVIDIA documents (--print-limit, --log-file).
MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at custom_kernel_moe_router_float_64_8_4_8+0x2d0
=========     by thread (0,0,0) in block (0,1,0)
=========     Address 0x7f1c2e000800 is out of bounds
=========     and is 1 bytes after the nearest allocation at 0x7f1c2e000000 of size 2048 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: [0x2db39f] in libcuda.so.1
=========
========= Invalid __global__ read of size 16 bytes
=========     at custom_kernel_moe_router_float_64_8_4_8+0x2d0
=========     by thread (32,0,0) in block (0,1,0)
=========     Address 0x7f1c2e000800 is out of bounds
=========
========= Invalid __shared__ write of size 4 bytes
=========     at custom_kernel_moe_router_float_64_8_4_8+0x310
=========     by thread (0,0,0) in block (0,1,0)
=========
========= ERROR SUMMARY: 3 errors
"""
RACECHECK_LOG = """\
========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at custom_kernel_sanitizer_probe+0x90
=========     and Read access at custom_kernel_sanitizer_probe+0xc0 [64 hazards]
=========
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""


def test_sanitizer_log_parser():
    gpu = _gpu_script()
    memcheck = gpu.parse_sanitizer_log(MEMCHECK_LOG, "memcheck")
    assert memcheck.count == 3
    assert memcheck.findings == [
        "Invalid __global__ read of size 16 bytes at custom_kernel_moe_router_float_64_8_4_8+0x2d0",
        "Invalid __shared__ write of size 4 bytes at custom_kernel_moe_router_float_64_8_4_8+0x310",
    ]
    race = gpu.parse_sanitizer_log(RACECHECK_LOG, "racecheck")
    assert race.count == 1
    assert race.findings == ["Error: Race reported between Write access at custom_kernel_sanitizer_probe+0x90 "
                             "and Read access at custom_kernel_sanitizer_probe+0xc0 [64 hazards]"]
    clean = gpu.parse_sanitizer_log("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n", "initcheck")
    assert (clean.count, clean.findings) == (0, [])
    crashed = gpu.parse_sanitizer_log("========= COMPUTE-SANITIZER\nTraceback (most recent call last):\n", "memcheck")
    assert crashed.count is None  # no summary: the run did not finish, which is not "clean"
    assert gpu.parse_sanitizer_log(RACECHECK_LOG, "memcheck").count is None


def test_sanitizer_command_instruments_one_kernel():
    gpu = _gpu_script()
    cmd = gpu.sanitizer_command("/cuda/compute-sanitizer", "racecheck", "sdpa_prefill", "/tmp/l.log",
                                ["--kernels", "sdpa_prefill", "--iters", "0"])
    assert cmd[:7] == ["/cuda/compute-sanitizer", "--tool", "racecheck", "--kernel-name",
                       "kns=custom_kernel_sdpa_prefill", "--racecheck-report", "all"]
    init = gpu.sanitizer_command("/cuda/compute-sanitizer", "initcheck", "sdpa_prefill", "/tmp/l.log", [])
    assert "--kernel-name" not in init  # MLX's kernels write the inputs: they must be instrumented too
    assert init[init.index("--check-api-memory-access") + 1] == "no"
    assert cmd[cmd.index("--destroy-on-device-error") + 1] == "kernel"  # the other samples still run
    assert cmd[cmd.index("--log-file") + 1] == "/tmp/l.log"
    assert cmd[-6:] == [sys.executable, gpu.__file__, "--kernels", "sdpa_prefill", "--iters", "0"]


FAKE_SANITIZER = '''#!{python}
import json, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("Compute Sanitizer (fake)"); sys.exit(0)
child = args[args.index("--log-file") + 2:]
tool = args[args.index("--tool") + 1]
kernel = child[child.index("--kernels") + 1] if "--kernels" in child else "sanitizer_probe"
if "--json" in child:
    json.dump([{{}}] * 3, open(child[child.index("--json") + 1], "w"))
logs = {{("memcheck", "moe_router"): {memcheck!r}, ("racecheck", "sanitizer_probe"): {race!r}}}
summary = "RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)" if tool == "racecheck" else "ERROR SUMMARY: 1 error"
if kernel == "sanitizer_probe" and tool == "initcheck":
    summary = "ERROR SUMMARY: 0 errors"  # this tool misses its planted fault
elif kernel != "sanitizer_probe":
    summary = summary.replace("1 hazard", "0 hazards").replace("(1 error", "(0 errors").replace(": 1 error", ": 0 errors")
text = logs.get((tool, kernel), "========= COMPUTE-SANITIZER\\n========= " + summary + "\\n")
open(args[args.index("--log-file") + 1], "w").write(text)
'''


def test_sanitize_runs_every_kernel_under_every_tool_and_holds_each_tool_to_its_probe(tmp_path, capsys):
    gpu = _gpu_script()
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER.format(python=sys.executable, memcheck=MEMCHECK_LOG, race=RACECHECK_LOG))
    fake.chmod(0o755)
    rc = gpu.main(["--sanitize", "--compute-sanitizer", str(fake), "--kernels", "add_rms_norm,moe_router",
                   "--jobs", "3"])
    out = capsys.readouterr().out
    assert rc == 1
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("sanitizer_probe", "add_rms_norm",
                                                                                  "moe_router"))}
    assert rows["sanitizer_probe"].split()[2:] == ["1", "1", "error", "(caught)", "1", "hazard", "(caught)",
                                                   "0", "errors", "(MISSED)"]
    assert rows["add_rms_norm"].split()[1:] == ["3", "0", "errors", "0", "hazards", "0", "errors"]
    assert rows["moe_router"].split()[1:] == ["3", "3", "errors", "0", "hazards", "0", "errors"]
    assert "Invalid __global__ read of size 16 bytes at custom_kernel_moe_router_float_64_8_4_8+0x2d0" in out
    assert "initcheck's results here check nothing" in out
    assert "7 of 9 runs clean" in out


@pytest.mark.parametrize("argv,message", [
    (["--sanitize", "--tools", "memcheck,leakcheck"], "unknown tool leakcheck"),
    (["--sanitize", "--kernels", "moe_routr"], "unknown kernel moe_routr"),
    (["--sanitize", "--compute-sanitizer", "/nonexistent/compute-sanitizer"], "compute-sanitizer not found"),
])
def test_sanitize_refuses_bad_arguments_with_one_line(argv, message, capsys, monkeypatch):
    gpu = _gpu_script()
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(gpu.os, "access", lambda path, mode: False)  # no /usr/local/cuda here either
    try:
        rc = gpu.main(argv)
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    assert rc not in (0, None)
    assert message in (captured.err + captured.out + (rc if isinstance(rc, str) else ""))


# ---- scripts/profile_decode.py: Nsight Compute's CSV to the table, without the GPU -----------

NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _ncu_line(n: int, name: str, grid: str, value: str, unit: str = "usecond") -> str:
    return (f'"{n}","4242","python3.12","127.0.0.1","{name}","1","7","(256, 1, 1)","{grid}","0","9.0",'
            f'"Command line profiler metrics","gpu__time_duration.sum","{unit}","{value}"')


def _ncu_csv(steps: int) -> str:
    """What ncu prints for the worker: its log lines, then per engine a marker, ``steps`` tokens
    of kernels (ours: 5 a token; off: 3; mlx-lm: 4), an end marker; warm-up kernels around."""
    gemv = "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false, false>(T13, T14, T14)"
    per_token = {
        "ours": [("custom_kernel_moe_gate_up_swiglu_e3b0_bfloat16_uint32_uint8_bfloat16_uint32c_float_bfloat16",
                  "(3, 360, 4)", "35.5"),
                 ("custom_kernel_moe_down_combine_9f2c_bfloat16", "(1, 1440, 1)", "28.0"),
                 (gemv, "(1, 80, 1)", "11.25"), (gemv, "(1, 6284, 1)", "268.0"),
                 ("void mlx::core::cu::rms_norm<__nv_bfloat16, 256, 8>(const T1 *, const T1 *, T1 *, float, int, long)",
                  "(1, 1, 1)", "4,800", "nsecond")],
        "ours_kernels_off": [(gemv, "(1, 6284, 1)", "270.0"), ("void mlx::core::cu::gather_qmv<__nv_bfloat16>(const T1 *)",
                                                               "(1, 720, 4)", "60.0"),
                             ("void (anonymous namespace)::argsort_kernel<float>(int)", "(1, 1, 1)", "0.01", "msecond")],
        "mlx_lm": [(gemv, "(1, 6284, 1)", "269.0")] * 4,
    }
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3.12)", "prompt done", NCU_HEADER]
    n = 0

    def add(name, grid="(1, 1, 1)", value="2.0", unit="usecond"):
        nonlocal n
        lines.append(_ncu_line(n, name, grid, value, unit))
        n += 1

    add(gemv, "(1, 6284, 1)", "999")  # prefill: outside every range
    for engine, kernels in per_token.items():
        add(f"custom_kernel_marker__{engine}___float_float")
        for _ in range(steps):
            for k in kernels:
                add(*k)
        add("custom_kernel_marker__end___float_float")
        add(gemv, "(1, 6284, 1)", "999")  # the next engine's warm-up
    return "\n".join(lines) + "\n==PROF== Disconnected from process 4242\n"


def test_profile_decode_table_from_an_ncu_csv(tmp_path, capsys):
    prof = _script("profile_decode")
    csv_file = tmp_path / "ncu.csv"
    csv_file.write_text(_ncu_csv(steps=3))
    assert prof.main(["--from-csv", str(csv_file), "--steps", "3", "--bytes-per-token", "3.7e9"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ")}
    # ours: 35.5 + 28 + 11.25 + 268 + 4.8 = 347.55 µs a token, 5 kernels; 3.7 GB / 347.55 µs = 10.65 TB/s
    assert rows["ours"] == ["5", "0.348", "10.65"]
    assert rows["ours_kernels_off"] == ["3", "0.340", "10.88"]  # 270 + 60 + 10 µs (0.01 ms)
    assert rows["mlx_lm"] == ["4", "1.076", "3.44"]
    # Families: our kernels by their metal/ name, MLX's by function name, a GEMV split by its grids.
    assert rows["moe_gate_up_swiglu"] == ["35.5", "1", "35.5"]
    assert rows["moe_down_combine"] == ["28.0", "1", "28.0"]
    assert rows["rms_norm"] == ["4.8", "1", "4.8"]
    assert rows["gemv2T_kernel_val (1, 80, 1)"] == ["11.2", "1", "11.2"]
    assert rows["argsort_kernel"] == ["10.0", "1", "10.0"]
    assert "gemv2T_kernel_val" in rows  # mlx-lm and ours-off run it at one grid only
    assert "bytes one token must read: 3.700 GB" in out


FAKE_NCU = """#!{python}
import subprocess, sys
args = sys.argv[1:]
assert args[:5] == ["--csv", "--clock-control", "none", "--metrics", "gpu__time_duration.sum"], args
ranged = args[5:7] == ["--profile-from-start", "off"]
worker = subprocess.run(args[7 if ranged else 5:], capture_output=True, text=True)  # on the CPU here
if worker.returncode:
    sys.exit(worker.stderr)
sys.stdout.write(worker.stdout)
if not ranged or {ranges_work}:  # a driver without cuProfilerStart profiles nothing in a range
    sys.stdout.write(open({csv!r}).read())
"""


@pytest.mark.parametrize("ranges_work", [True, False], ids=["profiler-range", "profile-everything"])
def test_profile_decode_runs_every_engine_under_ncu(ranges_work, tmp_path, capsys):
    """The whole script with a stand-in for ncu that runs the worker (all three engines decode
    on a tiny checkpoint, on the CPU) and then prints a saved profile; when profiling only the
    ranges gives nothing, the script profiles everything."""
    from gptoss_mlx.testing import checkpoints as mtc

    prof = _script("profile_decode")
    ckpt = tmp_path / "tiny"
    mtc.write_hf(ckpt, mtc.TINY.replace(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention")))
    (tmp_path / "ncu.csv").write_text(_ncu_csv(steps=2))
    fake = tmp_path / "ncu"
    fake.write_text(FAKE_NCU.format(python=sys.executable, csv=str(tmp_path / "ncu.csv"), ranges_work=ranges_work))
    fake.chmod(0o755)
    assert prof.main(["--dir", str(ckpt), "--steps", "2", "--ncu", str(fake)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert ("profiling everything" in captured.err) is not ranges_work
    assert "| ours | 5 | 0.348 |" in out and "| mlx_lm | 4 | 1.076 |" in out
    per_token = float(out.split("bytes one token must read: ")[1].split()[0]) * 1e9
    model_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert 0 < per_token < model_bytes  # one embedding row and 4 of 8 experts: less than the file


def test_profile_decode_says_what_is_missing_without_ncu(tmp_path, capsys):
    prof = _script("profile_decode")
    assert prof.main(["--dir", str(tmp_path), "--ncu", str(tmp_path / "no-ncu")]) == 1
    assert "no-ncu not found: Nsight Compute is needed" in capsys.readouterr().err


def test_more_experts_a_token_than_a_threadgroup_holds_take_mlx_s_path(monkeypatch):
    """Kernel B runs a simdgroup per expert slot of a token: past 32 slots (1024 threads) the
    MoE runs MLX's path, even where the kernels are active."""
    from gptoss_mlx.model import Experts
    from gptoss_mlx.testing.checkpoints import TINY

    config = TINY.replace(num_local_experts=40, num_experts_per_tok=33)
    layer = Experts(config)
    x = mx.random.normal((1, config.hidden_size)).astype(layer.gate_up_proj.bias.dtype)
    indices = mx.arange(33).astype(mx.uint32).reshape(1, 33)
    weights = mx.full((1, 33), 1 / 33, dtype=x.dtype)
    layer.update({"gate_up_proj": {"bias": mx.random.normal((40, 2 * config.intermediate_size))},
                  "down_proj": {"bias": mx.random.normal((40, config.hidden_size))}})
    expected = moe.experts(x, indices, weights, layer, x)  # the kernels inactive on the CPU
    monkeypatch.setattr(registry, "active", lambda name, dtype: True)
    assert moe.fused_fits(x, layer, 32) and not moe.fused_fits(x, layer, 33)
    got = moe.experts(x, indices, weights, layer, x)  # the kernels would need 33 x 32 threads
    assert mx.array_equal(got, expected).item()


def test_qkv_rope_kernel_in_the_model_for_a_sequence_and_a_batch_at_two_positions(emulated_gpu):
    """Decode through the fused qkv + RoPE kernel (emulated) equals the GEMV + mx.fast.rope path:
    one sequence (positions from the device table), a few tokens at once, and a decode batch whose
    rows stand at different positions (a (B,) position array)."""
    from gptoss_mlx.cache import merge_caches

    model = _attention_test_model(5, ("qkv_rope_decode",))

    def decode():
        a, b = model.make_cache(), model.make_cache()
        out = [model(mx.array([[5, 9, 2, 7, 1, 3, 4, 8, 6]]), cache=a)[0, -1],
               model(mx.array([[11, 12, 13]]), cache=b)[0, -1]]
        out += list(model(mx.array([[21, 22, 23]]), cache=a)[0])  # 3 tokens at 9, 10, 11
        batch = merge_caches([a, b])  # rows at positions 12 and 3
        for t in range(3):
            out += list(model(mx.array([[30 + t], [40 + t]]), cache=batch)[:, -1])
        return mx.stack(out)

    assert _kernels_vs_reference(decode, "qkv_rope_decode") < 1e-4


def test_device_positions_are_views_of_one_table_that_grows():
    import threading

    from gptoss_mlx.cache import device_positions

    assert device_positions(5, 3).tolist() == [5, 6, 7] and device_positions(5, 3).dtype == mx.int32
    assert device_positions(9000, 4).tolist() == [9000, 9001, 9002, 9003]  # past the first table
    assert device_positions(0).tolist() == [0]
    seen = []
    thread = threading.Thread(target=lambda: seen.append(device_positions(130000, 2).tolist()))
    thread.start()
    thread.join()
    assert seen == [[130000, 130001]]
    # A view made on a thread that ends before evaluating it carries that thread's stream; a later
    # thread (which may get the same id) must not be handed it.
    for _ in range(3):
        first = threading.Thread(target=lambda: device_positions(777, 2))
        first.start()
        first.join()
        second = threading.Thread(target=lambda: seen.append(device_positions(777, 2).tolist()))
        second.start()
        second.join()
    assert seen[1:] == [[777, 778]] * 3


def test_the_step_attention_takes_only_head_dims_whose_sums_fit_a_threadgroup(monkeypatch):
    """32 simdgroups' partial sums of head_dim floats must fit Apple's 32 KB of threadgroup memory:
    head_dim 224 at most (256 would need 33,024 bytes), and a multiple of 32."""
    from gptoss_mlx.kernels.attention import STEP, step_fits

    monkeypatch.setitem(registry._state, (STEP.name, mx.float32), "active")
    assert step_fits(64, 8, 64, mx.float32) and step_fits(64, 8, 224, mx.float32)
    assert not step_fits(64, 8, 256, mx.float32) and not step_fits(64, 8, 48, mx.float32)
