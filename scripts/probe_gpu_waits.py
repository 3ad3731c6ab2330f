#!/usr/bin/env python3
"""Issue 21's next design, probed: can the GPU wait for the host's per-layer expert decision,
instead of the host waiting for the GPU (the streamed layer's routing read-back)?

    source .device/setup.sh && python3 scripts/probe_gpu_waits.py [--work-us 250] [--switch 2e-5]

Synthetic 20b-shaped layers on MLX-CUDA (qkv and o_proj GEMVs in bf16, a 32-expert router, the
four chosen experts' MXFP4 gate/up and down through ``gather_qmm``), each layer's weights its own:

- ``R``: resident: the routing goes to the experts on the device, no host in between.
- ``S``: a read-back per layer, as ``expert_pool.ExpertPool.fetch`` does now: ``np.array`` of the
  routing (the host waits for the GPU), ``--work-us`` of host time (the pool's own Python:
  ~230 µs a layer measured in the thirtieth session), the slots back as an ``mx.array``.
- ``F``: the whole token queued at once; a layer's routing is written by a kernel into
  page-locked host memory (``cuMemHostAlloc``, mapped), and a one-block kernel spins until the
  host has written that layer's slots and a flag there; a host thread (numpy only, no MLX: the
  engine-thread rule holds) polls, spends ``--work-us``, answers. The GPU then waits for the host
  instead of the host for the GPU, and the launches of a whole token overlap the host's work.

The slots here are the expert ids themselves, so every variant computes the same thing (checked:
the first tokens equal R's bit for bit). What this does not have: DMA copies of missing experts
(the pool's ``cuda`` transfer, on its own stream, overlapping either way), the attention's cache.

Two things the probe found on the way (2026-12-07, H100): MLX-CUDA blocks in ``async_eval`` the
first time it launches a kernel (its JIT), and in a later token once enough work is queued, so
the host must answer from another thread than the one in ``async_eval``; that thread waits for
the GIL, so the interpreter's switch interval (``--switch``; 5 ms by default, the engine thread
sets 0.5 ms) bounds each answer. A watchdog ends the process if a wait never ends.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import sys
import threading
import time

import mlx.core as mx
import numpy as np

from gptoss_mlx.expert_pool import CudaDriver

K, E, D, I = 4, 32, 2880, 2880  # 20b: experts a token, experts, hidden, intermediate
SLOTS_AT, FLAG, ROUTED = 16, 1, 0  # words of a layer's 64 in the exchange buffer

EXPORT = """
    unsigned int* h = (unsigned int*)(hostp[0]);
    unsigned int t = threadIdx.x;
    if (t < 4) h[2 + t] = (unsigned int)idx[t];
    __threadfence_system();
    __syncthreads();
    if (t == 0) { ((volatile unsigned int*)h)[0] = seq[0]; __threadfence_system(); out[0] = seq[0]; }
"""
WAIT = """
    volatile unsigned int* h = (volatile unsigned int*)(hostp[0]);
    if (threadIdx.x == 0) {
      unsigned int want = seq[0] + dep[0] * 0;
      long long spins = 0;
      while (h[1] != want) { __nanosleep(200); if (++spins > 20000000LL) break; }  // ~4 s at most
    }
    __syncthreads();
    __threadfence_system();
    if (threadIdx.x < 4) slots[threadIdx.x] = h[16 + threadIdx.x];
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work-us", type=float, default=0.0, help="host time a layer (the pool's own work)")
    p.add_argument("--switch", type=float, default=2e-5, help="the interpreter's GIL switch interval, s")
    p.add_argument("--variants", default="R,S,F")
    p.add_argument("--watchdog-s", type=float, default=240)
    a = p.parse_args()
    faulthandler.dump_traceback_later(a.watchdog_s, exit=True)
    sys.setswitchinterval(a.switch)
    L = a.layers
    mx.eval(mx.ones(4) + 1)  # the CUDA context, current on this thread
    lib = CudaDriver.library()
    if lib is None:
        raise SystemExit("no CUDA driver in this process (run it on the GPU machine)")
    lib.cuMemHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    hp, dp = ctypes.c_void_p(), ctypes.c_uint64()
    assert lib.cuMemHostAlloc(ctypes.byref(hp), L * 256, 1 | 2) == 0  # portable, mapped
    assert lib.cuMemHostGetDevicePointer_v2(ctypes.byref(dp), hp, 0) == 0
    host = np.ctypeslib.as_array((ctypes.c_uint32 * (L * 64)).from_address(hp.value)).reshape(L, 64)
    host[:] = 0
    where = mx.array([dp.value + layer * 256 for layer in range(L)], dtype=mx.uint64)
    export = mx.fast.cuda_kernel(name="probe_export_routing", input_names=["idx", "hostp", "seq"],
                                 output_names=["out"], source=EXPORT)
    wait = mx.fast.cuda_kernel(name="probe_wait_slots", input_names=["dep", "hostp", "seq"],
                               output_names=["slots"], source=WAIT)

    mx.random.seed(0)
    layers = []
    for _ in range(L):
        w = dict(qkv=(mx.random.normal((5120, D)) * 0.02).astype(mx.bfloat16),
                 o=(mx.random.normal((D, 4096)) * 0.02).astype(mx.bfloat16),
                 router=(mx.random.normal((E, D)) * 0.05).astype(mx.bfloat16),
                 gu=mx.random.randint(0, 2**31, (E, 2 * I, D // 8), dtype=mx.uint32),
                 gus=mx.random.randint(118, 122, (E, 2 * I, D // 32), dtype=mx.uint8),
                 dn=mx.random.randint(0, 2**31, (E, D, I // 8), dtype=mx.uint32),
                 dns=mx.random.randint(118, 122, (E, D, I // 32), dtype=mx.uint8))
        mx.eval(w)
        layers.append(w)

    def attention(w, x):
        return x + ((x @ w["qkv"].T)[..., :4096] @ w["o"].T) * 0.01

    def route(w, x):
        return mx.argpartition(-(x @ w["router"].T), K - 1, axis=-1)[..., :K].astype(mx.uint32)

    def experts(w, x, slots):
        s = slots.reshape(1, K)
        h = mx.gather_qmm(mx.expand_dims(x, (-2, -3)), w["gu"], w["gus"], rhs_indices=s, transpose=True,
                          group_size=32, bits=4, mode="mxfp4")
        h = mx.clip(h[..., ::2], -7, 7) * mx.sigmoid(h[..., 1::2])
        y = mx.gather_qmm(h, w["dn"], w["dns"], rhs_indices=s, transpose=True, group_size=32, bits=4, mode="mxfp4")
        return x + (y.squeeze(-2).sum(axis=-2) * 1e-3).astype(x.dtype)

    def busy(us):
        end = time.perf_counter() + us * 1e-6
        while time.perf_counter() < end:
            pass

    def token_resident(x):
        for w in layers:
            x = attention(w, x)
            x = experts(w, x, route(w, x))
        return x

    def token_read_back(x):
        for w in layers:
            x = attention(w, x)
            ids = np.array(route(w, x))  # the host waits for the GPU
            busy(a.work_us)
            x = experts(w, x, mx.array(ids.astype(np.uint32)))
            mx.async_eval(x)
        return x

    def token_graph(x, seq):
        for layer, w in enumerate(layers):
            x = attention(w, x)
            (dep,) = export(inputs=[route(w, x).reshape(K), where[layer:layer + 1], seq + layer],
                            output_shapes=[(1,)], output_dtypes=[mx.uint32], grid=(32, 1, 1), threadgroup=(32, 1, 1))
            (slots,) = wait(inputs=[dep, where[layer:layer + 1], seq + layer], output_shapes=[(K,)],
                            output_dtypes=[mx.uint32], grid=(32, 1, 1), threadgroup=(32, 1, 1))
            x = experts(w, x, slots)
        return x

    sequence = [1000]
    primed = []

    def answer(seq0, errors):
        try:
            for layer in range(L):
                t0 = time.perf_counter()
                while host[layer, ROUTED] != seq0 + layer:
                    if time.perf_counter() - t0 > 5:
                        raise TimeoutError(f"layer {layer}: its routing never arrived")
                ids = host[layer, 2:2 + K].copy()
                busy(a.work_us)
                host[layer, SLOTS_AT:SLOTS_AT + K] = ids  # the slots: the ids themselves here
                host[layer, FLAG] = seq0 + layer
        except Exception as e:  # noqa: BLE001
            host[:, FLAG] = np.arange(L) + seq0  # let every waiting kernel go
            errors.append(e)

    def token_waits(x):
        sequence[0] += 100
        seq0 = sequence[0]
        if not primed:  # the first launch blocks in async_eval (JIT): its flags set beforehand
            primed.append(True)
            host[:, SLOTS_AT:SLOTS_AT + K] = np.arange(K)
            host[:, FLAG] = np.arange(L) + seq0
            mx.eval(token_graph(x, mx.array([seq0], dtype=mx.uint32)))
            return token_waits(x)
        out = token_graph(x, mx.array([seq0], dtype=mx.uint32))
        errors = []
        helper = threading.Thread(target=answer, args=(seq0, errors))
        helper.start()
        mx.async_eval(out)  # (may block: the helper answers meanwhile)
        helper.join()
        if errors:
            raise errors[0]
        return out

    tokens = {"R": token_resident, "S": token_read_back, "F": token_waits}
    variants = a.variants.split(",")

    def run(variant, x, n):
        t0 = time.perf_counter()
        for _ in range(n):
            x = tokens[variant](x)
            mx.eval(x)
            x = x / (mx.abs(x).max() + 1)  # bounded, and the next token depends on this one
        return (time.perf_counter() - t0) / n * 1e3, x

    x0 = mx.random.normal((1, D)).astype(mx.bfloat16)
    reference = None
    for v in variants:
        _, x = run(v, x0, 2)
        reference = x if reference is None else reference
        print(f"{v}: first two tokens equal to {variants[0]}'s: {mx.array_equal(x, reference).item()}", flush=True)
    for r in range(a.rounds):
        print(f"round {r + 1}: " + "  ".join(f"{v} {run(v, x0, a.tokens)[0]:.2f}" for v in variants)
              + f" ms/token ({L} layers, {a.work_us:.0f} µs host work a layer, switch {a.switch:g} s)", flush=True)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
