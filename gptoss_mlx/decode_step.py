"""One sequence's decode step (batch 1, one token) as an ``mx.compile``d function.

Building a decode token's graph in Python (24 layers of module calls, kernel launches, cache
updates) costs the host about as much as the GPU needs to run it. Compiled, the graph is traced
once and replayed from MLX's compile cache, and its elementwise operations are fused.

A trace must not bake in what changes per token. Inside the compiled function every layer's cache
is a :class:`StepCache`: the layer's storage as it is (a full layer's KVCache buffer, a sliding
layer's 128-slot ring), the position as an array, the new key and value written at an array
index. Attention covers the filled slots in one of two ways: where the decode attention kernels
run (a GPU), they read the number of keys from the device and skip the rest; elsewhere a mask
over the storage does. A ring once full needs neither (every slot is inside the window: a second
traced step, on MLX's one-pass attention). So MLX traces again only when a full layer's storage
grows (every ``KVCache.step`` tokens) and once when the rings fill. The logits equal the
uncompiled step's bit for bit on the CPU (tests/test_decode_step.py).

``GPTOSS_MLX_COMPILE=off`` (or ``Engine(compile_decode=False)``) keeps the uncompiled step; on a
GPU it is off unless ``GPTOSS_MLX_COMPILE=on`` (see :func:`enabled`).
"""

from __future__ import annotations

import os
import warnings
from functools import partial

import mlx.core as mx

from .cache import KVCache, KVStorage, RotatingKVCache, device_positions
from .kernels import registry
from .kernels.attention import decode_kernels_fit

ENV_VAR = "GPTOSS_MLX_COMPILE"


def enabled() -> bool:
    """Whether ``GPTOSS_MLX_COMPILE`` asks for the compiled step: ``on``, ``off`` (or 0, false,
    no), or ``auto`` (the default): on the CPU, and not yet on a GPU, where our kernels launched
    inside ``mx.compile`` have not been checked against the uncompiled step on the device
    (scripts/check_compiled_decode.py); ``on`` takes it there."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes"):
        return True
    return mx.default_device() == mx.cpu


def compilable(model) -> bool:
    """Whether ``model``'s decode step may be compiled: a gpt-oss Model (model.py; not imported
    here, it imports the engine through distributed.py), unless its experts stream (a pass
    rewrites the pool's slots), it is sharded across processes, or it carries an adapter
    (lora.py's modules, which hold ``lora_a``)."""
    return (getattr(model, "expert_pool", False) is None and getattr(model, "sharding", False) is None
            and not any("lora_a" in m for _, m in model.named_modules()))


class StepCache(KVStorage):
    """A layer's cache inside the compiled step: its storage ``kv`` (1, 2 KV, K, D), keys then
    values, and the position (a () int32 array) the new key is written at: slot ``position`` of a full
    layer's buffer, ``position % K`` of a sliding layer's ring. Attention reads ``offset`` for
    RoPE and attends over the filled slots, the first ``position + 1`` (a ring's only until it is
    full): the decode kernels over the first ``n_keys`` (a () array), or MLX's attention over the
    whole storage through ``mask`` (1, 1, 1, K), ``arange(K) <= position``. A ring whose slots are
    all filled has neither (every slot is inside the window)."""

    def __init__(self, kv: mx.array, ahead: mx.array, ring: bool, filled: bool,
                 mask: mx.array | None, kernels: bool):
        # ahead: (4,) the position and the three after it, so that the slot computed from them is
        # 16 bytes, not a scalar in MLX-CUDA's pool of small arrays (cache.device_positions)
        self.kv, self.offset = kv, ahead[:1].reshape(())
        self.slot = (ahead % kv.shape[2])[:1] if ring else ahead[:1]
        self.mask = self.n_keys = None
        if not filled:
            if kernels:
                self.n_keys = ahead[1:2].reshape(())  # position + 1, a view of device memory
            else:
                self.mask = mask

    def update_and_fetch_kv(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        # A scatter at the slot, not mx.slice_update: MLX-CUDA's slice update at an array index
        # launches a thread per element of the whole storage, not of the update (10-17 µs a layer
        # at 256 slots on the H200, growing with the context; docs/measurements.md).
        self.kv = mx.put_along_axis(self.kv, self.slot.reshape(1, 1, 1, 1), kv, axis=2)
        return self.keys, self.values


class CompiledDecode:
    """``model``'s decode step for one sequence, compiled. :meth:`__call__` queues a step and
    returns its logits, or None where this step must run uncompiled (then the caller runs the
    model as usual). ``traces`` counts how often MLX traced the step."""

    def __init__(self, model, compiled: bool = True):
        # compiled=False runs the same step (StepCache, masked attention over the storage)
        # through the plain forward: what scripts/check_compiled_decode.py tells apart from mx.compile
        self.model = model
        self.traces = 0
        self.failed = False
        self._kernels_decided = False
        # One step while the rings still have empty slots, one after (their attention then needs
        # no mask: MLX-CUDA runs a masked sdpa as several kernels instead of its one-pass kernel).
        self._steps = {full: (mx.compile(step) if compiled else step)
                       for full in (False, True) for step in [partial(self._trace, full)]}

    def _trace(self, rings_full: bool, token: mx.array, ahead: mx.array, storage: list) -> tuple[mx.array, list]:
        """token (1, 1), ahead (4,) the position and the three after it, storage [kv] per layer
        -> logits (1, V) and the updated storage; ``rings_full``: every ring's slots are filled
        once this step's key is written. Python runs this only while MLX traces it."""
        self.traces += 1
        attn = self.model.layers[0].self_attn
        kernels = decode_kernels_fit(attn.num_heads, attn.num_kv_heads, attn.head_dim, self.model.norm_dtype())
        sizes = set() if kernels else {kv.shape[2] for kv in storage}  # rings' and full layers' slots
        masks = {K: (mx.arange(K) <= ahead[:1]).reshape(1, 1, 1, K) for K in sizes}
        caches = [StepCache(kv, ahead, ring := layer.self_attn.window is not None,
                            ring and rings_full, masks.get(kv.shape[2]), kernels)
                  for kv, layer in zip(storage, self.model.layers)]
        logits = self.model(token, cache=caches, sampled=True)
        return logits[:, -1, :], [c.kv for c in caches]

    def applies(self, cache: list) -> bool:
        """Whether this step can run compiled: a filled KVCache / RotatingKVCache per layer, all
        at one position."""
        if self.failed or not all(type(c) in (KVCache, RotatingKVCache) and c.kv is not None for c in cache):
            return False
        position = cache[0].offset
        return all(c.offset == position for c in cache)

    def __call__(self, token: mx.array, cache: list) -> mx.array | None:
        """Queue the step for ``token`` (any shape of one id) on ``cache`` (updated in place)."""
        if not self._kernels_decided:
            # Every kernel checked now: a first-use check evaluates, which a trace cannot.
            registry.status(self.model.norm_dtype())
            self._kernels_decided = True
        if not self.applies(cache):
            return None
        position = cache[0].offset
        for c in cache:
            if isinstance(c, KVCache):
                c.reserve(position + 1)  # a new capacity: MLX traces once more
        rings_full = all(position + 1 >= c.kv.shape[2] for c in cache if isinstance(c, RotatingKVCache))
        try:
            logits, storage = self._steps[rings_full](token.reshape(1, 1), device_positions(position, 4),
                                                      [c.kv for c in cache])
        except Exception as e:
            # any failure to trace (the caches are untouched): the uncompiled step computes the same
            self.failed = True
            warnings.warn(f"gptoss-mlx: compiling the decode step failed ({type(e).__name__}: "
                          f"{str(e).strip()[:200]}); decoding uncompiled (set {ENV_VAR}=off to skip it).",
                          RuntimeWarning, stacklevel=2)
            return None
        for c, kv in zip(cache, storage):
            c.kv, c.offset = kv, position + 1
        return logits
