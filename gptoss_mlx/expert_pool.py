"""Expert streaming: the experts of every layer share a fixed GPU pool of slots, filled on demand
from the checkpoint, so that a model whose experts do not all fit still runs on the GPU.

A token uses ``top_k`` of a layer's experts (4 of 32 on 20b, 4 of 128 on 120b). Each layer's
``mlp.experts`` is a :class:`StreamedExperts`: after the router, the layer's expert ids are read
back once, the missing experts are read from the checkpoint's safetensors (through the OS
page cache, which keeps what RAM allows) into free or evicted slots, one read per missing expert,
and the gather runs on the pool's :class:`~gptoss_mlx.model.Experts` with slot indices instead
of expert ids. The bytes are the checkpoint's own, so the logits equal the resident model's.

How the bytes reach a slot (``transfer``, the first that works, checked once per pool by
writing a pattern and reading it back through MLX): ``host`` reads each missing expert from the
file (``pread``) straight into the slot's memory, found through a numpy view of the pool (unified
memory on a Mac, the CPU: that read is the whole transfer); ``cuda`` copies by DMA with the CUDA
driver's ``cuMemcpyAsync`` from the checkpoint's files, mapped and page-locked, into the pool's
device memory, whose address a kernel reads (the host never touches the pool: see
:class:`CudaDriver`); ``mlx``, where
the pool's memory cannot be written from the host, stages each expert in an MLX array and copies
it into the pool on the device. Writing the pool in place is safe because nothing that reads it
is still to run: a layer's slots are written right after its routing is read back, which waited
for everything the device was given before it (every earlier layer's experts), and the model
queues each pass's last layer before it returns (``Model.__call__``), so a later pass never
rewrites a slot under an earlier pass's unevaluated output.

On CUDA (the ``cuda`` transfer) a decode pass reads nothing back: it is queued whole, each
layer's routing written by a kernel into host memory the device maps, and a kernel waiting there
for the slots, which a thread of the pool's answers as each layer's routing arrives
(:class:`HostWaits`; ``GPTOSS_MLX_STREAM_WAITS=off`` reads back instead). The same invariant
holds: a layer's routing comes after every earlier layer's experts in the pass's data chain, and
the pass ends evaluated. A Mac's Metal offers no safe wait on host writes: there each layer's
routing is read back.

Eviction (``policy``): ``lru`` (least recently used), ``lfu`` (least often used), or ``decay``
(use counts halved every ``half_life`` steps, the default); a step is a decode token or a
prefill chunk. The slots a step needs are never
evicted in that step, so the pool must hold one layer's experts at least.

Reads ahead (``guess``: experts per layer and token, decode only): the residual stream changes
little from one layer to the next, so the next layer's router applied to this layer's residual
(normed with the next layer's gain) names most of the experts it will choose: 75% of the top 4 on
20b's random weights, 81% on the tiny test model. They are read back with this layer's routing,
and the missing ones are copied while the device computes this layer (the ``host`` transfer on
a worker thread, the ``cuda`` transfer on the driver's own stream); the next layer waits for
them. The ``host`` and ``cuda`` transfers guess by default (a CPU thread, or the GPU's copy
engine, copies while the GPU computes); the ``mlx`` transfer copies in the device's own queue,
where nothing overlaps, and does not. (The ``cuda`` transfer once copied into MLX's managed
memory, where the DMA held up the kernels for as long as it ran and reads ahead saved no time;
into device memory they run side by side: docs/measurements.md.)
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import threading
import time
import weakref
from dataclasses import astuple, dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels, ops
from .config import ModelConfig
from .files import CheckpointError
from .generate import NonFiniteLogitsError
from .kernels import fused_fits
from .memory import system_ram
from .model import SORTED_GATHER_ROWS, Experts

# One expert's six tensors, as the model names them under ``layers.N.mlp.experts``.
EXPERT_TENSORS = ("gate_up_proj.weight", "gate_up_proj.scales", "gate_up_proj.bias",
                  "down_proj.weight", "down_proj.scales", "down_proj.bias")
POLICIES = ("lru", "lfu", "decay")
TRANSFERS = ("cuda", "host", "mlx")  # tried in this order
PIN_SHARE = 0.5  # of the machine's RAM: the most checkpoint bytes the cuda transfer page-locks
LOAD_BATCH = 16  # experts staged per copy into the pool: bounds the staging memory (~210 MB)
_ADDRESS_KERNELS: dict = {}  # CudaDriver.addresses's kernels by number of arrays, built on first use
_WAIT_KERNELS: dict = {}  # HostWaits.queue's (export, wait) kernels by (words, slots), built on first use
PREFETCH_TOKENS = 4  # guesses are made for steps of up to this many tokens (decode)


@dataclass(frozen=True)
class ExpertTensor:
    """Where one layer's [E, ...] tensor lies in its safetensors file."""
    file: Path
    offset: int  # of expert 0's bytes in the file
    dtype: mx.Dtype  # as stored
    shape: tuple[int, ...]  # one expert's, as stored

    @cached_property  # read for every expert copied
    def expert_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


class ExpertSource:
    """Reads single experts from the checkpoint's files: by ``pread`` into the caller's memory
    (:meth:`read_into`: a file cut short meanwhile gives a short read, where a copy out of a
    mapping would die of SIGBUS), or, for the CUDA driver's DMA, from the files memory-mapped
    once each (:meth:`spans`)."""

    def __init__(self, tensors: dict[tuple[int, str], ExpertTensor]):
        self.tensors = tensors  # (layer, one of EXPERT_TENSORS) -> where
        self._maps: dict[Path, mmap.mmap] = {}
        self._bytes: dict[Path, np.ndarray] = {}  # each mapping's bytes: where it lies in memory
        self._fds: dict[Path, int] = {}
        self._pinned: set[Path] = set()
        for t in tensors.values():
            if t.file not in self._maps:
                with open(t.file, "rb") as f:
                    self._maps[t.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._bytes[t.file] = np.frombuffer(self._maps[t.file], dtype=np.uint8)
                self._fds[t.file] = os.open(t.file, os.O_RDONLY)
        self._address = {file: int(b.ctypes.data) for file, b in self._bytes.items()}
        # (modification time, size) as loaded: a file rewritten in place later (same inode, as
        # `cp` over it does) would feed new experts to the layers loaded from the old one
        self._stamps = {file: _stamp(fd) for file, fd in self._fds.items()}
        self._layer_files: dict[int, dict[Path, None]] = {}  # each layer's files, in order
        for (layer, _), t in tensors.items():
            self._layer_files.setdefault(layer, {})[t.file] = None
        weakref.finalize(self, lambda fds: [os.close(fd) for fd in fds], list(self._fds.values()))

    @property
    def directory(self) -> Path:
        """Where the files lie (the checkpoint's directory, or its ``original/``)."""
        return next(iter(self._maps)).parent

    def samples(self, experts: int, count: int, runs: int = 16) -> dict[str, mx.array]:
        """About ``count`` values of each layer's expert biases and scales as stored, in ``runs``
        contiguous runs spread over all ``experts`` (a few reads of each file, not every page),
        by the model's parameter name: for the finite check every load makes
        (loading._check_finite_sample). The packed E2M1 weights need none: every code is a number.
        Read by ``pread``: a file cut short meanwhile gives a short read (a CheckpointError),
        where a read from its mapping would die of SIGBUS."""
        out = {}
        for (layer, name), t in self.tensors.items():
            if name.endswith(".weight"):
                continue
            n = experts * t.expert_bytes // t.dtype.size
            run = max(1, count // runs)
            starts = np.linspace(0, max(0, n - run), runs, dtype=int).tolist()
            raw = b"".join(self._read_values(layer, name, i, min(run, n - i)) for i in starts)
            picked = np.frombuffer(raw, {1: np.uint8, 2: np.uint16, 4: np.uint32}[t.dtype.size])
            out[f"layers.{layer}.mlp.experts.{name}"] = mx.array(picked).view(t.dtype)
        return out

    def _read_values(self, layer: int, name: str, start: int, count: int) -> bytes:
        """``count`` values of one layer's tensor as stored, from its ``start``-th, by ``pread``."""
        t = self.tensors[layer, name]
        first, size = t.offset + start * t.dtype.size, count * t.dtype.size
        data = os.pread(self._fds[t.file], size, first)
        if len(data) != size:
            raise self._cut(layer, name, (first - t.offset + len(data)) // t.expert_bytes)
        return data

    def pin(self, driver: CudaDriver, budget: int) -> int:
        """Page-lock whole files for ``driver``'s DMA, in order, while their sizes stay within
        ``budget`` bytes (reading them in now if the page cache lacks them); the bytes locked.
        Unlocked when this source is collected."""
        pinned, locked = [], 0
        for file, buffer in self._bytes.items():
            if locked + buffer.nbytes <= budget and driver.pin(buffer):
                pinned.append(buffer)
                self._pinned.add(file)
                locked += buffer.nbytes
        if pinned:
            weakref.finalize(self, driver.unpin, pinned).atexit = False  # the process's end unlocks
        return locked

    def will_need(self, layer: int, experts) -> None:
        """Ask the OS to start reading these experts now (in parallel, from a cold page cache)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for name in EXPERT_TENSORS:
            t = self.tensors[layer, name]
            if t.file in self._pinned:
                continue  # page-locked: in memory already
            for e in experts:
                start = t.offset + int(e) * t.expert_bytes
                aligned = start - start % mmap.PAGESIZE
                self._maps[t.file].madvise(mmap.MADV_WILLNEED, aligned, start + t.expert_bytes - aligned)

    def check_unchanged(self, layer: int) -> None:
        """Raise CheckpointError if a file ``layer``'s experts are read from was written since
        loading (one ``fstat`` per file, once per batch of copies): its size or modification
        time moved. Whatever was written, the bytes it holds may no longer be the ones loaded,
        and no part of the file is known to be unchanged without them all (a sample of it
        compared equal, and a change between its runs went on with other logits than the
        resident model's): the model must be loaded again. A file replaced by a new one
        (``mv``, a new download, ``models rm``) is not written: the open descriptors and
        mappings keep the old bytes, and the model goes on. (A time set back after a write,
        ``touch -r``, goes unseen: nothing else tells it from a rename.)"""
        for file in self._layer_files[layer]:
            stamp = _stamp(self._fds[file])
            if stamp == self._stamps[file]:
                continue
            cut = stamp[1] < self._stamps[file][1]
            change = f"was cut to {stamp[1]} bytes" if cut else "changed (written to, or its modification time set)"
            raise CheckpointError(f"{file}: the file {change} after the model was loaded, and the "
                                  "model reads its experts from it as it runs: restore the checkpoint "
                                  "and load it again")

    def spans(self, layer: int, experts: list[int]) -> list[tuple[int, int]]:
        """For each of EXPERT_TENSORS, (address of expert 0's bytes in the mapped file, bytes per
        expert), once every one of ``experts`` is checked to lie inside its file: one ``fstat``
        per file, not one per copy."""
        # A file cut short after loading: reading past its end would kill the process (SIGBUS).
        last, sizes, out = max(experts), {}, []
        for name in EXPERT_TENSORS:
            t = self.tensors[layer, name]
            if t.file not in sizes:
                sizes[t.file] = self._maps[t.file].size()  # the file's size now (fstat)
            if sizes[t.file] < t.offset + (last + 1) * t.expert_bytes:  # name the first one cut off
                raise self._cut(layer, name, min(e for e in experts
                                                 if sizes[t.file] < t.offset + (e + 1) * t.expert_bytes))
            out.append((self._address[t.file] + t.offset, t.expert_bytes))
        return out

    def read_into(self, address: int, layer: int, name: str, expert: int) -> None:
        """One expert's tensor as stored into the memory at ``address`` (its bytes), by ``pread``
        (which lets go of the GIL)."""
        t = self.tensors[layer, name]
        buffer = (ctypes.c_char * t.expert_bytes).from_address(address)
        start = t.offset + expert * t.expert_bytes
        if hasattr(os, "preadv"):
            n = os.preadv(self._fds[t.file], [buffer], start)
        else:  # without preadv (older macOS): through a bytes object
            data = os.pread(self._fds[t.file], t.expert_bytes, start)
            n = len(data)
            ctypes.memmove(address, data, n)
        if n != t.expert_bytes:
            raise self._cut(layer, name, expert)

    def read(self, layer: int, name: str, expert: int) -> mx.array:
        """One expert's tensor as stored, flat, in MLX."""
        t = self.tensors[layer, name]
        values = np.empty(t.expert_bytes, np.uint8)
        self.read_into(values.ctypes.data, layer, name, expert)
        return mx.array(values).view(t.dtype)

    def _cut(self, layer: int, name: str, expert: int) -> CheckpointError:
        file = self.tensors[layer, name].file
        return CheckpointError(f"{file}: the file was cut to {os.fstat(self._fds[file]).st_size} bytes "
                               f"while the model was using it (expert {expert} of layer {layer} lies past "
                               "its end): restore the checkpoint and load it again")


def _stamp(fd: int) -> tuple[int, int]:
    """(modification time in ns, size) of an open file."""
    st = os.fstat(fd)
    return st.st_mtime_ns, st.st_size


def host_view(array: mx.array) -> np.ndarray:
    """``array``'s own memory as numpy bytes, one row per slot (S, bytes): no copy where the
    device's memory is visible to the host (a Mac's unified memory, CUDA's managed memory, the
    CPU). Whether writing it reaches ``array`` is checked by :meth:`ExpertPool.set_transfer`."""
    if array.dtype == mx.bfloat16:  # numpy has no bfloat16: the same bytes as uint16
        array = array.view(mx.uint16)
    return np.array(array, copy=False).reshape(len(array), -1).view(np.uint8)


class CudaDriver:
    """The CUDA driver this process has loaded (MLX's CUDA backend links its runtime statically
    and loads ``libcuda``), for the ``cuda`` transfer; ``find()`` gives None on a Mac or the CPU.

    Why: bytes written through a host view of an MLX-CUDA array reach the GPU by page faults
    at its first touch (about 2 GB/s on an H200 machine): any host access moves an array's
    buffer into managed memory for good. ``cuMemcpyAsync`` from the mapped checkpoint moves them
    by DMA instead: 6.9 GB/s from pageable memory, 45-54 GB/s from page-locked memory, so the
    checkpoint's files are page-locked first (:meth:`pin`, read-only) within a share of the
    machine's RAM. The pool is never touched by the host: :meth:`addresses` has a kernel read
    where its device memory lies, and a DMA there runs beside MLX's kernels, where a DMA into
    managed memory held them up for as long as it ran (docs/measurements.md)."""

    READ_ONLY = 0x08  # CU_MEMHOSTREGISTER_READ_ONLY
    NON_BLOCKING = 0x01  # CU_STREAM_NON_BLOCKING

    @classmethod
    def find(cls) -> "CudaDriver | None":
        lib = cls.library()
        try:
            return cls(lib) if lib else None
        except AttributeError:  # a driver without these entry points
            return None

    @staticmethod
    def library() -> ctypes.CDLL | None:
        """The libcuda this process has loaded (never another), or None."""
        if sys.platform != "linux" or mx.default_device() != mx.gpu:
            return None
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "/libcuda.so" in line), None)
        try:
            return ctypes.CDLL(path, mode=os.RTLD_NOLOAD) if path else None
        except OSError:
            return None

    def __init__(self, lib: ctypes.CDLL):
        def function(name, *argtypes):
            f = getattr(lib, name)
            f.argtypes, f.restype = list(argtypes), ctypes.c_int
            return f

        pointer, size = ctypes.c_void_p, ctypes.c_size_t
        self._memcpy = function("cuMemcpyAsync", ctypes.c_uint64, ctypes.c_uint64, size, pointer)
        self._synchronize = function("cuStreamSynchronize", pointer)
        self._register = function("cuMemHostRegister_v2", pointer, size, ctypes.c_uint)
        self._unregister = function("cuMemHostUnregister", pointer)
        # The copies' own stream, created by the first copy (on the thread whose CUDA context
        # MLX made current); non-blocking: it neither waits for MLX's work nor holds it up.
        self._create_stream = function("cuStreamCreate", ctypes.POINTER(pointer), ctypes.c_uint)
        self._stream = None
        try:  # (HostWaits' answers on the copy stream; without it, the host answers)
            self._memset = function("cuMemsetD32Async", ctypes.c_uint64, ctypes.c_uint, size, pointer)
        except AttributeError:
            self._memset = None
        # MLX's context, made current on the thread that found the driver (the engine's), so
        # that the thread answering a pass's waits (HostWaits) copies in it too
        self._set_context = function("cuCtxSetCurrent", pointer)
        get_context = function("cuCtxGetCurrent", ctypes.POINTER(pointer))
        self._context = ctypes.c_void_p()
        if get_context(ctypes.byref(self._context)) or not self._context.value:
            raise AttributeError("no CUDA context is current on this thread")
        self._host_alloc = function("cuMemHostAlloc", ctypes.POINTER(pointer), size, ctypes.c_uint)
        self._device_pointer = function("cuMemHostGetDevicePointer_v2", ctypes.POINTER(ctypes.c_uint64),
                                        pointer, ctypes.c_uint)
        self._free_host = function("cuMemFreeHost", pointer)

    @staticmethod
    def addresses(arrays: list[mx.array]) -> mx.array:
        """Where each array's memory lies on the device, (n,) uint64, as a kernel there sees it
        (so that the host never touches the arrays, which would move them into managed memory);
        not evaluated."""
        n = len(arrays)
        if n not in _ADDRESS_KERNELS:
            names = [f"a{i}" for i in range(n)]
            _ADDRESS_KERNELS[n] = mx.fast.cuda_kernel(
                name=f"gptoss_addresses_{n}", input_names=names, output_names=["out"],
                source="if (threadIdx.x == 0 && blockIdx.x == 0) {\n"
                       + "".join(f"  out[{i}] = (unsigned long long)({a});\n" for i, a in enumerate(names)) + "}")
        (out,) = _ADDRESS_KERNELS[n](inputs=arrays, output_shapes=[(n,)], output_dtypes=[mx.uint64],
                                     grid=(32, 1, 1), threadgroup=(32, 1, 1))
        return out

    def copy(self, dst: int, src: int, n: int) -> None:
        """Queue ``n`` bytes from address ``src`` to ``dst`` (a slot's device memory);
        :meth:`finish` waits."""
        if error := self._memcpy(dst, src, n, self._queue()):
            raise OSError(f"cuMemcpyAsync into the expert pool failed: CUresult {error}")

    def write(self, address: int, value: int) -> None:
        """Queue a write of the uint32 ``value`` at ``address`` (as the device sees it: mapped
        host memory too), done once the copies queued before it are."""
        if self._memset is None:
            raise OSError("this CUDA driver has no cuMemsetD32Async")
        if error := self._memset(address, value, 1, self._queue()):
            raise OSError(f"cuMemsetD32Async after the expert pool's copies failed: CUresult {error}")

    def _queue(self) -> ctypes.c_void_p:
        """The copies' stream, made by the first call."""
        if self._stream is None:
            stream = ctypes.c_void_p()
            if error := self._create_stream(ctypes.byref(stream), self.NON_BLOCKING):
                raise OSError(f"cuStreamCreate for the expert pool's copies failed: CUresult {error}")
            self._stream = stream
        return self._stream

    def finish(self) -> None:
        """Wait for the copies queued: MLX then reads the new bytes."""
        if self._stream is not None and (error := self._synchronize(self._stream)):
            raise OSError(f"waiting for the expert pool's copies failed: CUresult {error}")

    def use_here(self) -> None:
        """Make MLX's context current on this thread (another than the one that found the
        driver), for copies and waits from it."""
        if error := self._set_context(self._context):
            raise OSError(f"cuCtxSetCurrent for the expert pool's copies failed: CUresult {error}")

    def mapped(self, nbytes: int) -> tuple[np.ndarray, int] | None:
        """``nbytes`` of page-locked host memory that the device reads and writes in place
        (zeroed, as uint8), and its address on the device; None if refused. Freed with the view."""
        host, device = ctypes.c_void_p(), ctypes.c_uint64()
        if self._host_alloc(ctypes.byref(host), nbytes, 0x01 | 0x02):  # CU_MEMHOSTALLOC_PORTABLE | DEVICEMAP
            return None
        if self._device_pointer(ctypes.byref(device), host, 0):
            self._free_host(host)
            return None
        view = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(host.value))
        view[:] = 0
        weakref.finalize(view, self._free_host, ctypes.c_void_p(host.value))
        return view, device.value

    def pin(self, buffer: np.ndarray) -> bool:
        """Page-lock ``buffer`` (a mapped file, from its first page) for DMA; False if refused."""
        length = -(-buffer.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE  # the mapping's whole last page
        return self._register(buffer.ctypes.data, length, self.READ_ONLY) == 0

    def unpin(self, buffers: list[np.ndarray]) -> None:
        for buffer in buffers:
            self._unregister(buffer.ctypes.data)


WAITS_ENV = "GPTOSS_MLX_STREAM_WAITS"  # "off": a CUDA pool's decode passes read back, not wait (HostWaits)
WAIT_LIMIT_S = 60  # the longest a layer's kernel waits for the host's slots (the pass then fails)

# A layer's routing written into the exchange (HostWaits): its words, then the sequence number.
_EXPORT = """
    unsigned int* h = (unsigned int*)(row[0]);
    for (unsigned int i = threadIdx.x; i < N; i += blockDim.x) h[IDS + i] = words[i];
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      ((volatile unsigned int*)h)[ROUTED] = seq[0];
      __threadfence_system();
      done[0] = seq[0];
    }
"""
# ... and its slots, once the host has written them and the sequence number after them; a wait
# past LIMIT_NS gives up (slots 0, and the GAVE_UP word set: the host fails the pass).
_WAIT = """
    volatile unsigned int* h = (volatile unsigned int*)(row[0]);
    __shared__ unsigned int answered;
    if (threadIdx.x == 0) {
      unsigned int want = seq[0] + done[0] * 0u;  // (done: after the export, in the graph)
      unsigned long long start, now;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
      answered = 1;
      while (h[ANSWERED] != want) {
        __nanosleep(256);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (now - start > LIMIT_NS) { h[GAVE_UP] = want; answered = 0; break; }
      }
    }
    __syncthreads();
    __threadfence_system();
    for (unsigned int i = threadIdx.x; i < N; i += blockDim.x) slots[i] = answered ? h[SLOTS + i] : 0u;
"""


class HostWaits:
    """Where a streamed pass's kernels wait for the host, instead of the host for them (CUDA).

    Read back per layer (:meth:`ExpertPool.fetch`), the host waits for each layer's routing, so
    a token's layers reach the device one at a time, and the device idles while the host reads
    the routing, decides and queues the next layer. Here a whole decode pass is queued at once:
    each layer's routing is written by a kernel into page-locked host memory that the device
    maps (one row of WORDS words a layer), and a one-block kernel spins until the host has
    written that layer's slots there; a thread of the pool's (numpy and the CUDA driver, no
    MLX) answers each layer as its routing arrives (:meth:`ExpertPool.evaluate`). Measured on
    synthetic 20b-shaped layers (scripts/probe_gpu_waits.py, H100): 13.6-14.0 ms a token against
    23.7-33.0 read back, 5.2-5.8 resident.

    A row: ROUTED and ANSWERED (the pass's sequence number for the layer, written last by each
    side), GAVE_UP (set by a kernel that stopped waiting), the exported words from IDS (the
    routing, the guesses, on the first layer the pool's addresses), the slots from SLOTS. A
    Mac's Metal has no safe way for a kernel to wait on host writes: there the pool reads back.

    ANSWERED is written by the pool's copy stream after the layer's copies (:meth:`answer` with
    a driver, ``stream``): the host queues the missing experts' copies and goes on, and the
    layer's kernels start as the last copy lands, where the host would wait for the copies,
    then write it (a round trip through the host's thread, and the pool's Python after the
    reads ahead instead of beside them).
    """

    WORDS, ROUTED, ANSWERED, GAVE_UP, SPARE, IDS, SLOTS = 128, 0, 1, 2, 3, 4, 64

    def __init__(self, host: np.ndarray, rows: mx.array | None, stream: tuple | None = None):
        self.host = host  # (layers, WORDS) uint32
        self.rows = rows  # each row's address on the device, (layers,) uint64; None: no device (tests)
        self.stream = stream  # (a driver with copy/write/finish, the exchange's device address), or None
        self.sequence = 1  # the pass's first layer's number; a layer's is this + its index
        self._numbers = None  # this pass's numbers on the device, (layers,) uint32

    @classmethod
    def mapped(cls, driver: CudaDriver, layers: int) -> "HostWaits | None":
        """An exchange the device maps, or None where the driver gives no such memory; its
        answers written by the driver's copy stream where a write there is seen here."""
        got = driver.mapped(layers * cls.WORDS * 4)
        if got is None:
            return None
        view, address = got
        host = view.view(np.uint32).reshape(layers, cls.WORDS)
        rows = mx.array([address + layer * cls.WORDS * 4 for layer in range(layers)], dtype=mx.uint64)
        try:
            driver.write(address + cls.SPARE * 4, 0x5A17)
            driver.finish()
            stream = (driver, address) if host[0, cls.SPARE] == 0x5A17 else None
        except (OSError, AttributeError):  # a driver without cuMemsetD32Async: the host answers
            stream = None
        return cls(host, rows, stream)

    def fits(self, exported: int, slots: int) -> bool:
        return exported <= self.SLOTS - self.IDS and slots <= self.WORDS - self.SLOTS

    def begin(self) -> None:
        """A new pass: numbers no row holds yet."""
        layers = len(self.host)
        self.sequence = (self.sequence + layers + 1) % 2**31 or 1
        self._numbers = mx.array(self.sequence + np.arange(layers), dtype=mx.uint32)

    def number(self, layer: int) -> int:
        return self.sequence + layer

    def queue(self, layer: int, words: mx.array, slots: int) -> mx.array:
        """The kernels that export ``words`` (n,) uint32 for ``layer`` and wait for its ``slots``
        (slots,) uint32 from the host; not evaluated."""
        key = (words.size, slots)
        if key not in _WAIT_KERNELS:
            defines = "".join(f"#define {name} {getattr(self, name)}\n"
                              for name in ("ROUTED", "ANSWERED", "GAVE_UP", "IDS", "SLOTS"))
            defines += f"#define LIMIT_NS {int(WAIT_LIMIT_S * 1e9)}ULL\n"
            _WAIT_KERNELS[key] = (
                mx.fast.cuda_kernel(name="gptoss_export_routing", input_names=["words", "row", "seq"],
                                    output_names=["done"], source=_EXPORT, header=defines),
                mx.fast.cuda_kernel(name="gptoss_wait_for_slots", input_names=["done", "row", "seq"],
                                    output_names=["slots"], source=_WAIT, header=defines))
        export, wait = _WAIT_KERNELS[key]
        row, number = self.rows[layer:layer + 1], self._numbers[layer:layer + 1]
        launch = dict(grid=(32, 1, 1), threadgroup=(32, 1, 1), output_dtypes=[mx.uint32])
        (done,) = export(inputs=[words, row, number], output_shapes=[(1,)], template=[("N", words.size)], **launch)
        (out,) = wait(inputs=[done, row, number], output_shapes=[(slots,)], template=[("N", slots)], **launch)
        return out

    def routed(self, layer: int, count: int, stop: threading.Event) -> np.ndarray | None:
        """The ``count`` words ``layer`` exported this pass, once they are there; None once
        ``stop`` is set."""
        row, number = self.host[layer], self.number(layer)
        while row[self.ROUTED] != number:
            if stop.is_set():
                return None
            time.sleep(0)  # lets the GIL go, to the engine's thread (its own work)
        return row[self.IDS:self.IDS + count].copy()

    def answer(self, layer: int, slots: np.ndarray, now: bool = False) -> None:
        """``layer``'s slots, written here; its kernels let go once the copies queued so far have
        landed (by the copy stream: ``stream``), or ``now`` (the caller has waited for them)."""
        row = self.host[layer]
        row[self.SLOTS:self.SLOTS + slots.size] = slots.ravel()
        if self.stream is None or now:
            row[self.ANSWERED] = self.number(layer)  # last: the kernel reads the slots after it
        else:
            driver, address = self.stream
            driver.write(address + (layer * self.WORDS + self.ANSWERED) * 4, self.number(layer))

    def gave_up(self, layers: list[int]) -> list[int]:
        return [layer for layer in layers if self.host[layer, self.GAVE_UP] == self.number(layer)]


@dataclass
class PoolStats:
    tokens: int = 0  # token positions that went through the model
    hits: int = 0  # (layer, expert) needs found in the pool
    misses: int = 0  # ... read from the checkpoint
    bytes_read: int = 0
    read_s: float = 0.0  # copying from the checkpoint into host memory: the pool's, or staging
    migrate_s: float = 0.0  # moving it into the device's pool: MLX's copy, or the CUDA driver's DMA
    readback_s: float = 0.0  # waiting for each layer's routing (the GPU's work up to it)
    fetch_s: float = 0.0  # all of the above and the pool's own bookkeeping: the time in fetch
    guessed: int = 0  # experts read ahead for the next layer on a guess (not misses: one chosen is a hit)
    guessed_used: int = 0  # ... that the next layer then chose

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    def since(self, earlier: "PoolStats") -> "PoolStats":
        """What happened after ``earlier`` (a copy of these stats taken then)."""
        return PoolStats(*(now - then for now, then in zip(astuple(self), astuple(earlier))))

    @property
    def transfer_gbps(self) -> float:
        """Bytes into the pool per second of reading and migrating them."""
        seconds = self.read_s + self.migrate_s
        return self.bytes_read / seconds / 1e9 if seconds else 0.0

    @property
    def guess_rate(self) -> float:
        """Of the experts read ahead on a guess, the share the next layer chose."""
        return self.guessed_used / self.guessed if self.guessed else 0.0

    def summary(self) -> str:
        ahead = f", {self.guessed} read ahead ({self.guess_rate:.0%} chosen)" if self.guessed else ""
        per_token = self.bytes_per_token  # a tiny model's experts are a few KB
        read = f"{per_token / 1e6:.0f} MB" if per_token >= 1e6 else f"{per_token / 1e3:.0f} KB"
        return (f"experts: hit rate {self.hit_rate:.1%}, {read} read "
                f"per token, {self.read_s + self.migrate_s:.2f}s in reads "
                f"({self.transfer_gbps:.1f} GB/s){ahead}")


class ExpertPool:
    """``slots`` experts of any layers on the GPU, in one :class:`Experts` of ``slots`` experts."""

    def __init__(self, config: ModelConfig, source: ExpertSource, slots: int,
                 dtype: mx.Dtype = mx.bfloat16, policy: str = "decay", half_life: float = 32.0,
                 transfer: str | None = None, guess: int | None = None):
        L, E = config.num_hidden_layers, config.num_local_experts
        if slots < E:
            raise ValueError(f"an expert pool needs at least one layer's {E} experts, got {slots} slots")
        self.config, self.source = config, source
        self.set_policy(policy, half_life)
        self.experts = Experts(config.replace(num_local_experts=slots))
        for proj in (self.experts.gate_up_proj, self.experts.down_proj):
            proj.bias = proj.bias.astype(dtype)
        mx.eval(self.experts.parameters())
        self.slot_of = np.full((L, E), -1, dtype=np.int64)  # (layer, expert) -> slot, -1: absent
        self.owner = np.full(slots, -1, dtype=np.int64)  # slot -> layer * E + expert, -1: free
        self.score = np.full(slots, -np.inf)  # eviction takes the lowest; free slots first
        self.clock = 0
        self.stats = PoolStats()
        self.pinned_bytes = 0  # of the checkpoint, page-locked for the cuda transfer
        self._pending: list = []  # copies still under way: the host transfer's worker's (future, slots)
        self._queued = False  # ... or the cuda transfer's stream holds some
        self._driver = None  # the cuda transfer's CudaDriver
        self._worker = None  # the host transfer's thread for reads ahead, made when first needed
        self._guessed = (-1, frozenset())  # (layer, experts read ahead for it)
        self._ahead = None  # (layer, guessed experts, slots to keep): what read_ahead() starts
        self.one_pass = threading.RLock()  # held by a model pass from its first layer to its logits
        self.waits = None  # a HostWaits: decode passes queued whole, the device waiting for the host
        self._waiting = None  # this pass's layers queued with waits: [(layer, ids shape, guesses, words)], or None
        self.set_transfer(transfer)
        if guess is None:  # where copies run beside the device's work (module docstring)
            guess = config.num_experts_per_tok if self.transfer in ("host", "cuda") else 0
        self.guess = guess  # experts guessed and read ahead per layer and token (module docstring)
        if self.transfer == "cuda" and os.environ.get(WAITS_ENV, "on") != "off":
            try:
                self.set_waits(True)
            except ValueError:  # no memory for the exchange: each layer read back, as on a Mac
                pass

    def set_policy(self, policy: str, half_life: float = 32.0) -> None:
        """How slots are chosen for eviction from now on (see the module's docstring)."""
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.decay = 0.5 ** (1.0 / half_life) if policy == "decay" else 1.0

    def set_transfer(self, transfer: str | None = None) -> None:
        """How missing experts reach their slots from now on (see the module's docstring): the
        one named, or the first of TRANSFERS that works here; a ValueError if the one named
        does not."""
        if transfer not in (None, *TRANSFERS):
            raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
        self._wait_for_copies()
        self.waits = None  # the cuda transfer's alone (set_waits)
        mx.synchronize()  # the check below writes slot 0: nothing queued may still read it
        self._release(np.array([0]))
        self._views = {}  # released first: MLX donates (writes in place) only unshared buffers
        for name in [transfer] if transfer else TRANSFERS:
            if name == "mlx" or self._host_copy(name):
                self.transfer = name
                return
        raise ValueError(f"the {transfer} transfer does not reach the expert pool on {mx.default_device()}")

    def set_waits(self, on: bool, host_answers: bool = False) -> None:
        """Whether decode passes from now on queue every layer at once, each layer's kernels
        waiting on the device for the host's slots (:class:`HostWaits`), instead of reading each
        layer's routing back; a ValueError where the transfer is not ``cuda``. ``host_answers``:
        the host waits for a layer's copies and lets its kernels go itself, not the copy stream
        (as before that was measured; for comparison)."""
        if not on:
            self.waits = None
            return
        if self.transfer != "cuda" or not isinstance(self._driver, CudaDriver):  # (its kernels are CUDA's)
            raise ValueError(f"the device can wait for the host only with the cuda transfer, not {self.transfer}")
        self.waits = HostWaits.mapped(self._driver, self.config.num_hidden_layers)
        if self.waits is None:
            raise ValueError("the CUDA driver gave no page-locked memory for the device to wait on")
        if host_answers:
            self.waits.stream = None

    def _host_copy(self, transfer: str) -> bool:
        """Set up the ``host`` or ``cuda`` transfer (the host's reads ``self._copy(dst address,
        layer, name, expert)`` or the driver's DMA, then ``self._finish()``; the views in
        ``self._views``) and say whether it works here: if the pool holds every layer's stored
        bytes (no cast), and a pattern it writes into slot 0 of each of the pool's arrays is what
        the device then reads there."""
        driver = CudaDriver.find() if transfer == "cuda" else None
        if transfer == "cuda" and driver is None:
            return False
        # (dst, src, bytes) by address; ctypes' memmove lets go of the GIL while it copies
        copy, finish = (driver.copy, driver.finish) if driver else (ctypes.memmove, lambda: None)
        try:
            if driver:  # the device memory itself, which the host never touches
                views = {}
                where = np.array(driver.addresses([self._array(name) for name in EXPERT_TENSORS]))
                rows = {name: (int(address), a.nbytes // len(a))
                        for name, address in zip(EXPERT_TENSORS, where.tolist()) for a in [self._array(name)]}
            else:
                views = {name: host_view(self._array(name)) for name in EXPERT_TENSORS}
                rows = {name: (int(view.ctypes.data), view.strides[0]) for name, view in views.items()}
            for (_, name), stored in self.source.tensors.items():  # every layer's: dtypes may differ
                if (stored.dtype not in (mx.uint8, self._array(name).dtype)
                        or rows[name][1] != stored.expert_bytes):
                    return False  # the pool holds a cast of the checkpoint's bytes
            for name, (address, row_bytes) in rows.items():
                pattern = (np.arange(row_bytes) * 7 + 1).astype(np.uint8)
                copy(address, pattern.ctypes.data, pattern.nbytes)
                finish()
                device = self._array(name)[0].view(mx.uint8).flatten()
                if not mx.array_equal(device, mx.array(pattern)).item():
                    return False  # the view was a copy: the pool never saw the write
        except (ValueError, TypeError, BufferError, OSError, RuntimeError):  # no view or address, or no copy
            return False
        if driver and not self.pinned_bytes:
            self.pinned_bytes = self.source.pin(driver, int(PIN_SHARE * system_ram()))
        # the host transfer's read of one tensor: (dst address, layer, tensor name, expert)
        self._copy, self._finish, self._views, self._rows = self.source.read_into, finish, views, rows
        self._driver = driver
        return True

    def _pool_addresses(self) -> mx.array | None:
        """The cuda transfer's pool addresses as the device sees them now (queued, read back with
        a layer's routing: :meth:`_check_addresses`); None for the other transfers."""
        if self.transfer != "cuda" or self._driver is None:
            return None
        return self._driver.addresses([self._array(name) for name in EXPERT_TENSORS])

    def _check_addresses(self, where: np.ndarray) -> None:
        """Copy into where the pool is now. Any host access to an MLX-CUDA array (a numpy view,
        ``.item()``) moves its buffer into managed memory and frees the old one: a DMA to the old
        address would write freed memory. Checked before each layer's copies (nothing in the
        pool's own code touches the arrays from the host; this keeps a future caller that does
        from corrupting memory: it only makes the copies slower). Reads ahead queued before the
        move went to the old buffer: their slots are released, to be read again when chosen."""
        moved = False
        for name, address in zip(EXPERT_TENSORS, where.tolist()):
            if self._rows[name][0] != address:
                self._rows[name] = (int(address), self._rows[name][1])
                moved = True
        if moved and self._guessed[1]:
            self._wait_for_copies()
            layer, experts = self._guessed
            slots = self.slot_of[layer, sorted(experts)]
            self._release(slots[slots >= 0])
            self._guessed = (-1, frozenset())

    def _array(self, name: str) -> mx.array:
        """The pool's (slots, ...) array for one of EXPERT_TENSORS."""
        module, param = name.split(".")
        return getattr(self.experts, module)[param]

    @property
    def slots(self) -> int:
        return len(self.owner)

    def layer(self, index: int, following=None) -> "StreamedExperts":
        return StreamedExperts(self, index, following)

    def fetch(self, layer: int, indices: mx.array, guess: mx.array | None = None) -> mx.array:
        """Make the experts in ``indices`` (T, k) of ``layer`` resident; their slots, (T, k).
        ``guess``: experts the next layer will likely choose (T, m), read ahead while the device
        computes this layer."""
        t0 = time.perf_counter()
        try:
            # Read back together, as uint32: the routing, the guesses and (cuda transfer) the
            # pool's addresses as uint32 pairs; one wait for the GPU, one copy to the host.
            back = np.array(self._exported(indices, guess, self._pool_addresses()))  # waits for the GPU up to here
            self.stats.readback_s += time.perf_counter() - t0
            slots = self._decide(layer, back, indices.shape, 0 if guess is None else guess.size)
            where = mx.array(slots)
            if self._ahead is not None and self.transfer == "mlx":  # now, while no queued work holds the pool (read_ahead())
                self.read_ahead()
            return where
        finally:
            self.stats.fetch_s += time.perf_counter() - t0

    @staticmethod
    def _exported(indices: mx.array, guess: mx.array | None, where: mx.array | None) -> mx.array:
        """What the host needs of a layer, in one uint32 array: its routing, the guesses for the
        next layer, the pool's addresses as uint32 pairs (where given)."""
        parts = [indices.reshape(-1)] + ([guess.reshape(-1)] if guess is not None else [])
        parts += [where.view(mx.uint32)] if where is not None else []
        parts = [p if p.dtype == mx.uint32 else p.astype(mx.uint32) for p in parts]
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    def _decide(self, layer: int, back: np.ndarray, shape: tuple, m: int, wait: bool = True) -> np.ndarray:
        """The slots (uint32, ``shape``) of the experts a layer chose, from what it exported
        (:meth:`_exported`): the missing ones copied in, the guessed ones of the next layer
        left for :meth:`read_ahead`. No MLX here: the thread answering a pass's waits runs it.
        Unless ``wait``, the copies (the reads ahead for this layer, the missing experts) are
        only queued: the caller's device work must wait for them on the device (HostWaits)."""
        self._ahead = None  # the last layer's guesses, if the caller never started them: stale now
        n = math.prod(shape)
        ids, guessed = back[:n].reshape(shape), back[n:n + m]
        if back.size > n + m:  # the cuda transfer's pool addresses
            self._check_addresses(back[n + m:].copy().view(np.uint64))
        if wait:
            self._wait_for_copies()  # the reads ahead for this layer
        if layer == 0:
            self.stats.tokens += ids.shape[0]
            self.clock += 1
            self.score *= self.decay
        needed = _distinct(ids)
        if len(needed) and needed[-1] >= self.slot_of.shape[1]:  # (sorted) never from MLX's top-k
            raise NonFiniteLogitsError(f"layer {layer} routed a token to expert {needed[-1]} of "
                             f"{self.slot_of.shape[1]}: its activations are not finite (corrupt "
                             "weights, or float16 overflow)")
        if self._guessed[0] == layer:
            self.stats.guessed_used += len(self._guessed[1].intersection(needed.tolist()))
            self._guessed = (-1, frozenset())
        slots = self.slot_of[layer, needed]
        present = slots >= 0
        self.stats.hits += int(present.sum())
        missing = needed[~present]
        if len(missing):
            self._load(layer, missing, protect=slots[present], wait=wait)
            self.stats.misses += len(missing)
        slots = self.slot_of[layer, needed]
        if self.policy == "lru":
            self.score[slots] = self.clock
        else:  # one use per step (a prefill chunk's thousands of tokens count once)
            self.score[slots] += 1
        if m and layer + 1 < self.config.num_hidden_layers:
            self._ahead = (layer + 1, _distinct(guessed), slots)
        return self.slot_of[layer][ids].astype(np.uint32)  # every one is in the pool now

    def begin_pass(self, may_wait: bool) -> None:
        """A model pass begins: its layers may be queued with waits (:class:`HostWaits`) unless
        ``may_wait`` is False (each layer evaluated as it is built)."""
        self._waiting = [] if may_wait and self.waits is not None else None

    @property
    def waiting(self) -> bool:
        """Whether this pass's layers are queued with waits (none evaluated before its logits)."""
        return bool(self._waiting)

    def queue(self, layer: int, indices: mx.array, guess: mx.array | None) -> mx.array | None:
        """The slots of the experts ``indices`` (T, k) of ``layer``, as kernels that wait for the
        host to answer once the pass runs (:meth:`evaluate`), (T, k); None where this pass reads
        back instead: no waits, or a pass too wide for the exchange (decided at its first layer,
        for all of them)."""
        if self._waiting is None:
            return None
        first = not self._waiting
        m = 0 if guess is None else guess.size
        if first:
            if not (indices.size < SORTED_GATHER_ROWS
                    and self.waits.fits(indices.size + m + 2 * len(EXPERT_TENSORS), indices.size)):
                self._waiting = None  # (the fused kernels and MLX's gather of few rows take slots)
                return None
            self.waits.begin()
        words = self._exported(indices, guess, self._pool_addresses() if first else None)
        self._waiting.append((layer, indices.shape, m, words.size))
        return self.waits.queue(layer, words, indices.size).reshape(indices.shape)

    def evaluate(self, logits: mx.array) -> None:
        """Evaluate a pass's ``logits``; where its layers wait for the host, a thread of the pool's
        answers each as its routing arrives (no MLX on it), and its error, if any, is raised here."""
        waiting, self._waiting = self._waiting, None
        if not waiting:
            mx.eval(logits)
            return
        stop, errors = threading.Event(), []
        helper = threading.Thread(target=self._answer, args=(waiting, stop, errors),
                                  name="expert-waits", daemon=True)
        helper.start()
        try:
            mx.eval(logits)  # (lets the GIL go while it waits for the device)
        finally:
            stop.set()  # (the device stopped early: an error above)
            helper.join()
        if errors:
            raise errors[0]
        if late := self.waits.gave_up([layer for layer, *_ in waiting]):
            raise RuntimeError(f"layer {late[0]}'s kernels stopped waiting for the host's expert slots "
                               f"after {WAIT_LIMIT_S} s: this pass's output is wrong, discarded")

    def _answer(self, waiting: list, stop: threading.Event, errors: list) -> None:
        """The host's side of a pass's waits: each layer's slots once its routing arrives, then
        the next layer's guesses started; on an error, every layer let go (slots 0) and the
        error kept for :meth:`evaluate`."""
        try:
            if self._driver is not None:
                self._driver.use_here()
            streamed = self.waits.stream is not None  # the copy stream lets each layer go
            for layer, shape, m, count in waiting:
                t0 = time.perf_counter()
                back = self.waits.routed(layer, count, stop)
                if back is None:
                    return
                t1 = time.perf_counter()
                self.stats.readback_s += t1 - t0
                self.waits.answer(layer, self._decide(layer, back, shape, m, wait=not streamed))
                self.read_ahead()
                self.stats.fetch_s += time.perf_counter() - t1
        except BaseException as error:  # noqa: BLE001 (raised on the engine's thread)
            errors.append(error)
            for layer, shape, *_ in waiting:
                self.waits.answer(layer, np.zeros(shape, dtype=np.uint32), now=True)
            try:  # nothing of this pass left on the copy stream to write an answer in the next
                self._wait_for_copies()
            except Exception:  # noqa: BLE001 (the first error is the one raised)
                pass

    def read_ahead(self) -> None:
        """Start reading the experts the last :meth:`fetch` guessed for the next layer, without
        waiting (the next fetch does). The model calls this once the layer's experts are queued
        on the device (``Model.__call__``): started in fetch, their bookkeeping and copy calls
        (about 0.1 ms a layer) kept the device waiting for the experts to be queued. The ``mlx``
        transfer's copies start in fetch all the same: queued work that reads the pool's arrays
        would make MLX's update of a slot copy the whole array instead of writing in place."""
        if self._ahead is not None:
            layer, guessed, protect = self._ahead
            self._ahead = None
            self._read_ahead(layer, guessed, protect)

    def _read_ahead(self, layer: int, guessed: np.ndarray, protect: np.ndarray) -> None:
        """Start reading the guessed experts of ``layer`` that the pool lacks, without waiting
        (the next :meth:`fetch` does). ``protect``: the slots this step computes with."""
        guessed = guessed[guessed < self.slot_of.shape[1]]  # a guess is only a hint
        present = self.slot_of[layer, guessed]
        protect = _distinct(np.concatenate([protect, present[present >= 0]]))
        missing = guessed[present < 0][: self.slots - len(protect)]  # never evicting what is protected
        if len(missing):
            self._load(layer, missing, protect, wait=False)
            self.stats.guessed += len(missing)
        self._guessed = (layer, frozenset(missing.tolist()))

    def _load(self, layer: int, missing: np.ndarray, protect: np.ndarray, wait: bool = True) -> None:
        E = self.config.num_local_experts
        score = self.score.copy()
        score[protect] = np.inf  # needed by this step: never evicted
        victims = np.argpartition(score, len(missing) - 1)[: len(missing)]
        self.source.check_unchanged(layer)
        self._release(victims)
        self.source.will_need(layer, missing)
        if self.transfer == "mlx":
            self._copy_through_mlx(layer, missing, victims)
        else:
            self._write(layer, missing, victims, wait)
        self.owner[victims] = layer * E + missing
        self.slot_of[layer, missing] = victims
        self.score[victims] = 0.0
        self.stats.bytes_read += len(missing) * sum(self.source.tensors[layer, n].expert_bytes
                                                    for n in EXPERT_TENSORS)

    def view(self, layer: int) -> Experts:
        """``layer``'s experts as the resident model holds them: a copy of the pool's slots in
        expert order (experts not in the pool read slot 0's bytes: the caller must not choose
        them). A layer through MLX's gather computes on it with the expert ids themselves:
        MLX-CUDA's gather rounds a few sums differently for the same experts in an array of
        another size (its sorted path, from SORTED_GATHER_ROWS rows: scripts/check_streamed_exact.py),
        and on this copy nothing differs."""
        table = mx.array(self.slot_of[layer].clip(0).astype(np.uint32))
        view = Experts(self.config)
        view.gate_up_proj = _CopiedOnCall(self, table, EXPERT_TENSORS[:3])
        view.down_proj = _CopiedOnCall(self, table, EXPERT_TENSORS[3:], after_input=True)
        return view

    def _release(self, slots: np.ndarray) -> None:
        """Forget what ``slots`` hold: free, first in line to be filled."""
        held = self.owner[slots]
        E = self.config.num_local_experts
        self.slot_of[held[held >= 0] // E, held[held >= 0] % E] = -1
        self.owner[slots] = -1
        self.score[slots] = -np.inf

    def _write(self, layer: int, missing: np.ndarray, victims: np.ndarray, wait: bool = True) -> None:
        """Each missing expert's bytes from the checkpoint straight into its slot's memory, one
        read or copy per tensor. Nothing still to run reads these slots (see the module's docstring):
        this runs after the layer's routing read-back. Unless ``wait``, the copies run while the
        caller goes on (the host transfer's on a worker thread), until :meth:`_wait_for_copies`."""
        experts, slots = missing.tolist(), victims.tolist()
        rows = [self._rows[name] for name in EXPERT_TENSORS]  # (slot 0's address, bytes per slot)

        def copies():
            if self._driver is not None:  # DMA out of the mapped file
                copy, spans = self._driver.copy, self.source.spans(layer, experts)
                for expert, slot in zip(experts, slots):
                    for (base, stride), (first, size) in zip(rows, spans):
                        copy(base + slot * stride, first + expert * size, size)
                return
            for expert, slot in zip(experts, slots):  # pread into the slot's memory
                for (base, stride), name in zip(rows, EXPERT_TENSORS):
                    self._copy(base + slot * stride, layer, name, expert)

        if not wait:
            if self.transfer == "cuda":
                copies()  # queued on the driver's stream
                self._queued = True
            else:
                if self._worker is None:
                    from concurrent.futures import ThreadPoolExecutor
                    self._worker = ThreadPoolExecutor(1, thread_name_prefix="expert-reads")
                self._pending.append((self._worker.submit(copies), victims))
            return
        t0 = time.perf_counter()
        copies()
        self._finish()
        self._account(time.perf_counter() - t0)

    def _wait_for_copies(self) -> None:
        """Wait for the copies started without waiting (reads ahead): their slots are then whole."""
        if not (self._pending or self._queued):
            return
        t0 = time.perf_counter()
        pending, self._pending, self._queued = self._pending, [], False
        failed = [(future.exception(), slots) for future, slots in pending if future.exception()]
        for _, slots in failed:
            self._release(slots)  # never whole: read again when chosen
        self._finish()
        self._account(time.perf_counter() - t0)
        if failed:
            raise failed[0][0]  # (a file cut short) here, where the model waits for the copies

    def _account(self, seconds: float) -> None:
        if self.transfer == "cuda":  # read and migrated in one copy
            self.stats.migrate_s += seconds
        else:
            self.stats.read_s += seconds

    def _copy_through_mlx(self, layer: int, missing: np.ndarray, victims: np.ndarray) -> None:
        """Each missing expert staged in MLX, then copied into its slot on the device, at most
        LOAD_BATCH at a time (bounds the staging memory). The pool's buffers are donated: in place."""
        for a in range(0, len(missing), LOAD_BATCH):
            t0 = time.perf_counter()
            written = []
            for expert, slot in zip(missing[a:a + LOAD_BATCH], victims[a:a + LOAD_BATCH]):
                for name in EXPERT_TENSORS:
                    pool_array = self._array(name)
                    values = self.source.read(layer, name, int(expert))
                    if values.dtype != pool_array.dtype:  # packed bytes: a view; biases: a cast
                        values = (values.view(pool_array.dtype) if values.dtype == mx.uint8
                                  else values.astype(pool_array.dtype))
                    pool_array[int(slot)] = values.reshape(pool_array.shape[1:])
                    written.append(pool_array)
            t1 = time.perf_counter()
            mx.eval(written)
            self.stats.read_s += t1 - t0
            self.stats.migrate_s += time.perf_counter() - t1


def _distinct(ids: np.ndarray) -> np.ndarray:
    """The distinct values of ``ids``, sorted (np.unique; for a decode step's few ids a set is
    several times faster, and this runs once or twice per layer and token)."""
    if ids.size > 64:
        return np.unique(ids)
    return np.array(sorted(set(ids.ravel().tolist())), dtype=ids.dtype)


class _CopiedOnCall(nn.Module):
    """A projection of :meth:`ExpertPool.view`: its tensors ``names`` copied out of the pool when
    it is called, so that only the graph holds the copy. ``after_input``: the input (the gate/up
    projection's output) is evaluated first, which frees the gate/up copy before this one is
    made: a prefill chunk holds one of the two at a time, not both (``memory.view_bytes``)."""

    def __init__(self, pool: "ExpertPool", table: mx.array, names: tuple, after_input: bool = False):
        super().__init__()
        self._pool, self._table, self._names, self._after_input = pool, table, names, after_input

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if self._after_input:
            mx.eval(x)
        weight, scales, bias = (self._pool._array(name)[self._table] for name in self._names)
        return ops.gather_linear(x, weight, scales, bias, indices, sorted_indices=sorted_indices)


class StreamedExperts:
    """A layer's experts in an :class:`ExpertPool`: what ``MLP`` calls instead of its own
    :class:`Experts` (see ``Experts.resident``). ``following``: the next TransformerBlock, whose
    router guesses its experts from this layer's residual."""

    def __init__(self, pool: ExpertPool, layer: int, following=None):
        self.pool, self.layer, self.following = pool, layer, following

    def resident(self, indices: mx.array, x: mx.array, residual: mx.array) -> tuple[mx.array, Experts]:
        """The experts ``indices`` (T, k) made resident, and where the MoE finds them: the
        pool's Experts and slot indices for the fused kernels (decode) and MLX's gather of few
        rows, else (MLX's sorted gather, a prefill chunk) a copy of the layer's experts in expert
        order and ``indices`` themselves (:meth:`ExpertPool.view`)."""
        guess = None
        m = min(self.pool.guess, self.pool.config.num_local_experts)
        if m and self.following is not None and len(indices) <= PREFETCH_TOKENS:
            guess = self._guess(residual, m)
        slots = self.pool.queue(self.layer, indices, guess)  # a decode pass whose device waits for the host
        if slots is None:
            slots = self.pool.fetch(self.layer, indices, guess)
        if indices.size < SORTED_GATHER_ROWS or fused_fits(x, self.pool.experts, indices.shape[-1]):
            return slots, self.pool.experts
        return indices, self.pool.view(self.layer)

    def _guess(self, residual: mx.array, m: int) -> mx.array:
        """The next layer's router on this residual, normed with the next layer's gain: its top
        ``m`` experts (T, m), in any order. One kernel where the fused add + norm + router one
        applies (the residual plus zeros: exactly the residual; m no more than the model's own
        top-k), else MLX's norm, router and argpartition (four launches)."""
        norm, router = self.following.post_attention_layernorm, self.following.mlp.router
        if m <= self.following.mlp.top_k:  # the kernel's instantiations the model itself runs
            _, _, routing = kernels.add_rms_norm_route(residual, _zeros(residual.shape, residual.dtype),
                                                       norm.weight, norm.eps, router, m)
            if routing is not None:
                return routing[0]
        logits = router(mx.fast.rms_norm(residual, norm.weight, norm.eps))
        E = logits.shape[-1]
        return mx.argpartition(logits, E - m, axis=-1)[..., E - m:]


@lru_cache(maxsize=8)
def _zeros(shape: tuple, dtype: mx.Dtype) -> mx.array:
    """Zeros made once per shape (evaluated: no thread's lazy graph), not a fill per layer."""
    zeros = mx.zeros(shape, dtype)
    mx.eval(zeros)
    return zeros
