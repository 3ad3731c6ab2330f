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
grows (every ``KVCache.step`` tokens) and once when the rings fill. Where the one-pass step
attention runs (kernels.attention.attention_step), the layers of a kind go in as one buffer
instead and are written once a kind, as in the uncompiled step (cache.py, grouped decode steps).
The logits equal the uncompiled step's bit for bit on the CPU (tests/test_decode_step.py).

``GPTOSS_MLX_COMPILE=off`` (or ``Engine(compile_decode=False)``) keeps the uncompiled step; on a
GPU it is off unless ``GPTOSS_MLX_COMPILE=on`` (see :func:`enabled`).
"""

from __future__ import annotations

import os
import warnings
from functools import partial

import mlx.core as mx

from .cache import GroupedStep, KVCache, KVGroup, KVStorage, RotatingKVCache, device_positions, end_grouped_step
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
    if value not in ("auto", ""):  # (a typo was taken as auto without a word: a tester's, helper-152)
        warnings.warn(f"{ENV_VAR}={value!r} is not one of auto, on, off; using 'auto'", stacklevel=2)
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
    model as usual). ``traces`` counts how often MLX traced the step.

    Where the one-pass step attention runs, the step is a grouped one, as the uncompiled step
    is (cache.py): the rings' storage (and the full layers', while the one pass covers their
    keys) goes in as one buffer a kind, the last step's keys and values written into it first
    (outside the trace, in place), and the token's come out for the next step to write."""

    def __init__(self, model, compiled: bool = True):
        # compiled=False runs the same step (grouped kinds, StepCache with masked attention over
        # the storage) through the plain forward: what scripts/check_compiled_decode.py tells
        # apart from mx.compile
        self.model = model
        self.compiled = compiled
        self.traces = 0
        self.failed = False
        self._kernels_decided = False
        # One step per arrangement: (the kinds grouped, whether the rings' slots are all filled;
        # MLX-CUDA runs a masked sdpa as several kernels instead of its one-pass kernel).
        self._steps: dict = {}

    def _step(self, key: tuple):
        if key not in self._steps:
            step = partial(self._trace, key)
            self._steps[key] = mx.compile(step) if self.compiled else step
        return self._steps[key]

    def _trace(self, key: tuple, token: mx.array, ahead: mx.array, buffers: list, storage: list) -> tuple:
        """token (1, 1), ahead (4,) the position and the three after it, buffers: a kind's
        storage (layers, 1, 2 KV, slots, D) per grouped kind (``key[0]``: (ring, the model's
        layers of the kind) each), storage: [kv] of every other layer -> logits (1, V), the
        token's keys and values of each grouped kind (layers, 2 KV, D), and the others' updated
        storage; ``key[1]``: every ring's slots are filled once this step's key is written.
        Python runs this only while MLX traces it."""
        kinds, rings_full = key
        self.traces += 1
        attn = self.model.layers[0].self_attn
        kernels = decode_kernels_fit(attn.num_heads, attn.num_kv_heads, attn.head_dim, self.model.norm_dtype())
        offset = ahead[:1].reshape(())
        caches = [None] * len(self.model.layers)
        groups = []
        for (ring, rows), buffer in zip(kinds, buffers):
            group = KVGroup(buffer)  # its ``passing`` collects the token's keys and values
            for j, i in enumerate(rows):
                caches[i] = GroupedStep(group, j, group.row(j), offset, ring, position=ahead[:1])
            groups.append(group)
        own = [i for i, c in enumerate(caches) if c is None]
        sizes = set() if kernels else {kv.shape[2] for kv in storage}  # rings' and full layers' slots
        masks = {K: (mx.arange(K) <= ahead[:1]).reshape(1, 1, 1, K) for K in sizes}
        for i, kv in zip(own, storage):
            ring = self.model.layers[i].self_attn.window is not None
            caches[i] = StepCache(kv, ahead, ring, ring and rings_full, masks.get(kv.shape[2]), kernels)
        logits = self.model(token, cache=caches, sampled=True)
        return logits[:, -1, :], [g.passing for g in groups], [caches[i].kv for i in own]

    def applies(self, cache: list) -> bool:
        """Whether this step can run compiled: a filled KVCache / RotatingKVCache per layer, all
        at one position."""
        if self.failed or not all(type(c) in (KVCache, RotatingKVCache)
                                  and (c.group is not None or c._kv is not None) for c in cache):
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
        kinds = self.model.step_kinds(cache) or []
        grouped = {i for kind in kinds for i in kind.rows}
        own = [c for i, c in enumerate(cache) if i not in grouped]
        for c in own:
            if isinstance(c, KVCache):
                c.reserve(position + 1)  # a new capacity: MLX traces once more
        rings_full = all(position + 1 >= c.kv.shape[2] for c in own if isinstance(c, RotatingKVCache))
        key = (tuple((kind.ring, tuple(kind.rows)) for kind in kinds), rings_full)
        try:
            logits, passed, storage = self._step(key)(token.reshape(1, 1), device_positions(position, 4),
                                                      [kind.group.kv for kind in kinds], [c.kv for c in own])
        except Exception as e:
            # any failure to trace (the caches are untouched): the uncompiled step computes the same
            self.failed = True
            warnings.warn(f"gptoss-mlx: compiling the decode step failed ({type(e).__name__}: "
                          f"{str(e).strip()[:200]}); decoding uncompiled (set {ENV_VAR}=off to skip it).",
                          RuntimeWarning, stacklevel=2)
            return None
        for kind, keys_values in zip(kinds, passed):
            kind.group.passing = keys_values
        end_grouped_step(kinds)
        for c, kv in zip(own, storage):
            c.kv, c.offset = kv, position + 1
        return logits
