#!/usr/bin/env python3
"""Where the MoE decode time goes on the GPU machine: per-launch cost of a built-in op, of a
trivial custom kernel, of each MoE kernel and of each gather_qmm, at 20b size, batch 1.

    python scripts/dev/kernel_overhead.py

Each line: N independent calls built into one graph and evaluated once, µs per call.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx  # noqa: E402

from gptoss_mlx.kernels import moe  # noqa: E402
from gptoss_mlx.kernels.source import Kernel, Launch  # noqa: E402

N = 200
D = I = 2880
E, K = 32, 4


def per_call(label, make):
    mx.eval([make(i) for i in range(3)])
    t0 = time.perf_counter()
    outs = [make(i) for i in range(N)]
    t_build = time.perf_counter() - t0
    mx.eval(outs)
    total = time.perf_counter() - t0
    print(f"{label:<44} {total / N * 1e6:8.1f} µs/call  (graph building {t_build / N * 1e6:6.1f})")


xs = [mx.random.normal((1, D)).astype(mx.bfloat16) for _ in range(8)]
mx.eval(xs)
copy = Kernel("probe_copy", ["x"], ["out"], ("", "uint i = thread_position_in_grid.x;\nout[i] = x[i];\n"))
per_call("built-in: x * 2", lambda i: xs[i % 8] * 2)
per_call("custom kernel: copy 2880 values", lambda i: copy(Launch([xs[i % 8].reshape(-1)], [(D,)], [mx.bfloat16], (D, 1, 1), (64, 1, 1)))[0])
scalar_copy = Kernel("probe_scalar", ["x", "s"], ["out"], ("", "uint i = thread_position_in_grid.x;\nout[i] = static_cast<bfloat16_t>(static_cast<float>(x[i]) * s);\n"))
per_call("custom kernel: copy with a float scalar", lambda i: scalar_copy(Launch([xs[i % 8].reshape(-1), 2.0], [(D,)], [mx.bfloat16], (D, 1, 1), (64, 1, 1)))[0])

wgu, sgu, bgu = moe.random_experts(mx.random.key(1), E, 2 * I, D, mx.bfloat16)
wd, sd, bd = moe.random_experts(mx.random.key(2), E, D, I, mx.bfloat16)
idx = [mx.random.permutation(E)[:K].reshape(1, K).astype(mx.uint32) for _ in range(8)]
wts = mx.softmax(mx.random.normal((1, K)), axis=-1).astype(mx.bfloat16)
acts = [mx.random.normal((1, K, I)).astype(mx.bfloat16) for _ in range(8)]
mx.eval(wgu, sgu, bgu, wd, sd, bd, idx, wts, acts)

per_call("kernel A (gate/up + SwiGLU)", lambda i: moe.GATE_UP_SPEC.launch(xs[i % 8], idx[i % 8], wgu, sgu, bgu, 7.0)[0])
per_call("kernel B (down + combine)", lambda i: moe.DOWN_SPEC.launch(acts[i % 8], idx[i % 8], wts, wd, sd, bd, xs[i % 8])[0])
per_call("gather_qmm gate_up (no bias)", lambda i: mx.gather_qmm(mx.expand_dims(xs[i % 8], (-2, -3)), wgu, sgu, rhs_indices=idx[i % 8], transpose=True, group_size=32, bits=4, mode="mxfp4"))
per_call("gather_qmm down (no bias)", lambda i: mx.gather_qmm(mx.expand_dims(acts[i % 8], -2), wd, sd, rhs_indices=idx[i % 8], transpose=True, group_size=32, bits=4, mode="mxfp4"))
per_call("reference A (gather_qmm+bias+swiglu)", lambda i: moe.gate_up_swiglu_reference(xs[i % 8], idx[i % 8], wgu, sgu, bgu, 7.0)[0])
per_call("reference B (gather_qmm+bias+combine)", lambda i: moe.down_combine_reference(acts[i % 8], idx[i % 8], wts, wd, sd, bd, xs[i % 8])[0])
