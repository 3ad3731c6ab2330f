#!/usr/bin/env python3
"""The ways from a memory-mapped file into an MLX-CUDA buffer (managed memory), each timed to the
GPU's first read of what it wrote: what the expert pool's ``cuda`` transfer is built on.

    source .device/setup.sh && python3 scripts/bench_transfer.py [--mb 13.2] [--n 24] [--rounds 2]

Methods: ``host`` (numpy writes through the host view; the GPU's first touch faults the pages
over), ``host-mt4`` (four threads), ``+prefetch`` (then ``cuMemPrefetchAsync`` to the GPU),
``pinned-stage`` (through a page-locked staging buffer, async DMA), ``memcpy`` (``cuMemcpy``
from the pageable mapping), ``register-each`` (each buffer page-locked around its copy) and
``register-once`` (the whole file page-locked once, then ``cuMemcpyAsync``, as the pool does);
``register-once-wait-each`` waits for each buffer's copy (as a layer's missing experts are).
``register-once`` leaves the file locked, so the two run last in each round. CUDA machines only.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from gptoss_mlx.expert_pool import CudaDriver


class Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def driver() -> ctypes.CDLL:
    lib = CudaDriver.library()
    if lib is None:
        raise SystemExit("no CUDA driver in this process (run it on the GPU machine)")
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=13.2, help="MB per buffer (an expert is 13.2)")
    ap.add_argument("--n", type=int, default=24, help="buffers per method and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--file", default="/tmp/bench_transfer.bin")
    args = ap.parse_args()
    size, n = int(args.mb * 1e6) // 4096 * 4096, args.n
    if not os.path.exists(args.file) or os.path.getsize(args.file) != size * n * 2:
        rng = np.random.default_rng(0)
        with open(args.file, "wb") as f:
            for _ in range(2 * n):
                f.write(rng.integers(0, 255, size, dtype=np.uint8).tobytes())
    with open(args.file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    src = np.frombuffer(mapped, dtype=np.uint8).reshape(2 * n, size)
    src.sum()  # the page cache holds it

    pool = mx.zeros((n, size), mx.uint8)
    mx.eval(pool)
    view = np.array(pool, copy=False)
    cu = driver()

    def fn(name, *argtypes):
        f = getattr(cu, name)
        f.argtypes, f.restype = list(argtypes), ctypes.c_int
        return f

    u64, sz, vp = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
    memcpy_sync = fn("cuMemcpy", u64, u64, sz)
    memcpy = fn("cuMemcpyAsync", u64, u64, sz, vp)
    synchronize = fn("cuCtxSynchronize")
    prefetch = fn("cuMemPrefetchAsync_v2", u64, sz, Location, ctypes.c_uint, vp)
    register = fn("cuMemHostRegister_v2", vp, sz, ctypes.c_uint)
    unregister = fn("cuMemHostUnregister", vp)
    alloc_host = fn("cuMemAllocHost_v2", ctypes.POINTER(vp), sz)

    def ok(error, what):
        if error:
            raise RuntimeError(f"{what}: CUresult {error}")

    staging = vp()
    ok(alloc_host(ctypes.byref(staging), 4 * size), "cuMemAllocHost")
    pinned = np.ctypeslib.as_array(ctypes.cast(staging, ctypes.POINTER(ctypes.c_uint8)), shape=(4 * size,))
    threads = ThreadPoolExecutor(4)
    gpu = Location(1, 0)  # CU_MEM_LOCATION_TYPE_DEVICE, device 0
    locked = []

    def source(r, i):
        return src[(i + r) % (2 * n)]

    def host(r):
        for i in range(n):
            np.copyto(view[i], source(r, i))

    def host_mt(r):
        list(threads.map(lambda i: np.copyto(view[i], source(r, i)), range(n)))

    def with_prefetch(write):
        def run(r):
            write(r)
            ok(prefetch(view.ctypes.data, view.nbytes, gpu, 0, None), "cuMemPrefetchAsync")
            ok(synchronize(), "sync")
        return run

    def pageable(r):
        for i in range(n):
            ok(memcpy_sync(view[i].ctypes.data, source(r, i).ctypes.data, size), "cuMemcpy")
        ok(synchronize(), "sync")

    def pinned_stage(r):
        for i in range(n):
            if i and i % 4 == 0:
                ok(synchronize(), "sync")  # the staging buffer's four parts are free again
            part = pinned[(i % 4) * size:(i % 4 + 1) * size]
            np.copyto(part, source(r, i))
            ok(memcpy(view[i].ctypes.data, part.ctypes.data, size, None), "cuMemcpyAsync")
        ok(synchronize(), "sync")

    def register_each(r):
        for i in range(n):
            p = source(r, i).ctypes.data
            ok(register(p, size, CudaDriver.READ_ONLY), "cuMemHostRegister")
            ok(memcpy(view[i].ctypes.data, p, size, None), "cuMemcpyAsync")
            ok(synchronize(), "sync")
            ok(unregister(p), "cuMemHostUnregister")

    def register_once(r):
        if not locked:
            t0 = time.perf_counter()
            ok(register(src.ctypes.data, src.nbytes, CudaDriver.READ_ONLY), "cuMemHostRegister")
            locked.append(src)
            print(f"  page-locking {src.nbytes / 1e9:.2f} GB took {time.perf_counter() - t0:.3f}s")
        for i in range(n):
            ok(memcpy(view[i].ctypes.data, source(r, i).ctypes.data, size, None), "cuMemcpyAsync")
        ok(synchronize(), "sync")

    def register_once_each(r):  # after register_once (the file locked): one wait per buffer
        for i in range(n):
            ok(memcpy(view[i].ctypes.data, source(r, i).ctypes.data, size, None), "cuMemcpyAsync")
            ok(synchronize(), "sync")

    def touch():
        mx.eval(pool.view(mx.uint32).sum(axis=1))

    methods = {"host": host, "host-mt4": host_mt, "host+prefetch": with_prefetch(host),
               "host-mt4+prefetch": with_prefetch(host_mt), "pinned-stage": pinned_stage,
               "memcpy": pageable, "register-each": register_each, "register-once": register_once,
               "register-once-wait-each": register_once_each}
    print(f"{n} buffers of {size / 1e6:.1f} MB ({n * size / 1e9:.2f} GB) per method; device {mx.default_device()}")
    for rnd in range(args.rounds):
        for name, run in methods.items():
            if locked and not name.startswith("register-once"):
                continue  # the file is page-locked now: the other methods would measure that
            touch()
            t0 = time.perf_counter()
            run(rnd + 1)
            t1 = time.perf_counter()
            touch()
            t2 = time.perf_counter()
            right = all(bool((np.array(pool[i]) == source(rnd + 1, i)).all()) for i in (0, n // 2, n - 1))
            print(f"round {rnd} {name:18s} write {t1 - t0:.3f}s + first touch {t2 - t1:.3f}s = "
                  f"{n * size / 1e9 / (t2 - t0):5.1f} GB/s; bytes right: {right}", flush=True)
    for buffer in locked:
        unregister(buffer.ctypes.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
