"""Dev timing on a GPU: the MoE decode kernels A and B alone, as shipped in metal/ (lanes over
packed words, one output per simdgroup) against the variants in scripts/dev/moe_variants/
(lanes over whole MX blocks read as uint4; COLS / OUTS outputs per simdgroup, B's covering all
of an output's experts) and the shipped kernel A with 2, 4 or 16 simdgroups per threadgroup
instead of 8, plus the router kernel and an empty launch. 20b size, bf16, batch 1 and 4. Interleaved rounds; median µs per
launch (each round: --iters launches of the same inputs, evaluated together).

    python scripts/dev/moe_variants.py

On the GPU machine (H100, MLX 0.32.4; wall time per launch, an empty launch 10 µs) the shipped
kernels were the fastest: A 32.5 µs vs 35.5/37.3/41.5 (COLS 1/2/4; 31.5-32.9 with 2/4/16
simdgroups per threadgroup), B 23.3 µs vs 26.1/29.0 (OUTS 1/2) at batch 1; at batch 4 A 94 vs
103-130, B 65 vs 80/89.
"""
import dataclasses
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import mlx.core as mx  # noqa: E402

from gptoss_mlx.kernels import moe  # noqa: E402
from gptoss_mlx.kernels.source import BODY_MARKER, Kernel, Launch, read_metal_file  # noqa: E402

VARIANTS = Path(__file__).resolve().parent / "moe_variants"
ITERS, ROUNDS = 50, 7


def variant_kernel(spec):
    """The variant of spec's kernel in VARIANTS, under its own name (MLX caches kernels by name)."""
    def read(name):  # the variants' own files, else metal/'s
        return (VARIANTS / name).read_text() if (VARIANTS / name).exists() else read_metal_file(name)

    def inline(text):
        return re.sub(r'^\s*#include\s+"([^"]+)"\s*$', lambda m: inline(read(m.group(1))), text, flags=re.MULTILINE)
    k = spec.kernel
    header, body = read(f"{k.name}.metal").split(BODY_MARKER, 1)
    header = "\n".join(line for line in header.splitlines() if not line.lstrip().startswith("//"))
    return Kernel(k.name + "_variant", k.input_names, k.output_names, source=(inline(header), body))


def with_simdgroups(plan: Launch, n: int) -> Launch:
    """plan with n simdgroups per threadgroup (the shipped kernels read it at run time)."""
    gx, gy, gz = plan.grid
    outputs = gy * (gx // 32)  # one output per simdgroup
    return dataclasses.replace(plan, grid=(32 * n, -(-outputs // n), gz), threadgroup=(32 * n, 1, 1))


def with_rows(plan: Launch, name: str, n: int, outputs: int) -> Launch:
    """A variant's plan: 8 simdgroups of n outputs each (of ``outputs``), template name=n."""
    gz = plan.grid[2]
    template = [(k, v) for k, v in plan.template if k not in ("OUTS", "COLS")] + [(name, n)]
    return dataclasses.replace(plan, grid=(256, -(-outputs // (8 * n)), gz), threadgroup=(256, 1, 1),
                               template=template)


FLOOR = Kernel("floor", ["inp"], ["out"], source=("", "if (thread_position_in_grid.x == 0) { out[0] = inp[0]; }\n"))
D = I = 2880
E, K = 32, 4
k1, k2 = mx.random.split(mx.random.key(0))
gu = moe.random_experts(k1, E, 2 * I, D, mx.bfloat16)
down = moe.random_experts(k2, E, D, I, mx.bfloat16)
router_w = (mx.random.normal((E, D)) * D ** -0.5).astype(mx.bfloat16)
router_b = mx.zeros((E,), mx.bfloat16)
mx.eval(gu, down, router_w, router_b)
var_a, var_b = variant_kernel(moe.GATE_UP_SPEC), variant_kernel(moe.DOWN_SPEC)
print(f"device {mx.default_device()}, MLX {mx.__version__}")
for T in (1, 4):
    kx, ki, kw = mx.random.split(mx.random.key(T), 3)
    x = mx.random.normal((T, D), key=kx).astype(mx.bfloat16)
    indices = mx.argsort(mx.random.uniform(shape=(T, E), key=ki), axis=-1)[:, :K].astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((T, K), key=kw), axis=-1).astype(mx.bfloat16)
    a_plan = moe.gate_up_swiglu_plan(x, indices, *gu, 7.0)
    act = moe.GATE_UP_SPEC.launch(x, indices, *gu, 7.0)[0]
    b_plan = moe.down_combine_plan(act, indices, weights, *down, x)
    cases = {"floor (an empty launch)": (FLOOR, Launch(inputs=[x], output_shapes=[(1,)], output_dtypes=[x.dtype],
                                                    grid=(32, 1, 1), threadgroup=(32, 1, 1))),
             "router": (moe.ROUTER_SPEC.kernel, moe.router_plan(x, router_w, router_b, K)),
             "A shipped": (moe.GATE_UP_SPEC.kernel, a_plan)}
    for c in (1, 2, 4):
        cases[f"A COLS={c}"] = (var_a, with_rows(a_plan, "COLS", c, I))
    for n in (2, 4, 16):
        cases[f"A shipped, {n} simdgroups"] = (moe.GATE_UP_SPEC.kernel, with_simdgroups(a_plan, n))
    cases["B shipped"] = (moe.DOWN_SPEC.kernel, b_plan)
    for o in (1, 2):
        cases[f"B OUTS={o}"] = (var_b, with_rows(b_plan, "OUTS", o, D))
    outs = {name: kern(plan)[0] for name, (kern, plan) in cases.items()}
    for name in outs:
        if name[0] in "AB" and name not in ("A shipped", "B shipped"):
            shipped = outs[f"{name[0]} shipped"]
            diff = mx.abs(outs[name].astype(mx.float32) - shipped.astype(mx.float32)).max().item()
            print(f"T={T} {name}: max |variant - shipped| {diff:.3g}")
    times = {name: [] for name in cases}
    for r in range(ROUNDS + 1):
        for name, (kern, plan) in cases.items():
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval([kern(plan)[0] for _ in range(ITERS)])
            if r:  # round 0 warms up
                times[name].append((time.perf_counter() - t0) / ITERS * 1e6)
    for name, ts in times.items():
        print(f"T={T} {name}: median {statistics.median(ts):7.1f} µs  (min {min(ts):.1f}, max {max(ts):.1f})")
