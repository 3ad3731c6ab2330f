"""Expert streaming: the experts of every layer share a fixed GPU pool of slots, filled on demand
from the checkpoint, so that a model whose experts do not all fit still runs on the GPU.

A token uses ``top_k`` of a layer's experts (4 of 32 on 20b, 4 of 128 on 120b). Each layer's
``mlp.experts`` is a :class:`StreamedExperts`: after the router, the layer's expert ids are read
back once, the missing experts are read from the checkpoint's safetensors (memory-mapped: the
OS page cache keeps what RAM allows) into free or evicted slots, one read per missing expert,
and the gather runs on the pool's :class:`~gptoss_mlx.model.Experts` with slot indices instead
of expert ids. The bytes are the checkpoint's own, so the logits equal the resident model's.

Eviction (``policy``): ``lru`` (least recently used), ``lfu`` (least often used), or ``decay``
(use counts halved every ``half_life`` steps, the default); a step is a decode token or a
prefill chunk. The slots a step needs are never
evicted in that step, so the pool must hold one layer's experts at least.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import ModelConfig
from .model import Experts

# One expert's six tensors, as the model names them under ``layers.N.mlp.experts``.
EXPERT_TENSORS = ("gate_up_proj.weight", "gate_up_proj.scales", "gate_up_proj.bias",
                  "down_proj.weight", "down_proj.scales", "down_proj.bias")
POLICIES = ("lru", "lfu", "decay")
LOAD_BATCH = 16  # experts staged per copy into the pool: bounds the staging memory (~210 MB)

_NUMPY_DTYPES = {"U8": np.uint8, "U32": np.uint32, "BF16": np.uint16, "F16": np.float16,
                 "F32": np.float32}  # bf16 is read as its bits, then viewed in MLX


@dataclass(frozen=True)
class ExpertTensor:
    """Where one layer's [E, ...] tensor lies in its safetensors file."""
    file: Path
    offset: int  # of expert 0's bytes in the file
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]  # one expert's, as stored

    @property
    def expert_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(_NUMPY_DTYPES[self.dtype]).itemsize


class ExpertSource:
    """Reads single experts from the checkpoint's files, memory-mapped once each."""

    def __init__(self, tensors: dict[tuple[int, str], ExpertTensor]):
        self.tensors = tensors  # (layer, one of EXPERT_TENSORS) -> where
        self._maps: dict[Path, mmap.mmap] = {}
        for t in tensors.values():
            if t.file not in self._maps:
                with open(t.file, "rb") as f:
                    self._maps[t.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def will_need(self, layer: int, experts) -> None:
        """Ask the OS to start reading these experts now (in parallel, from a cold page cache)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for name in EXPERT_TENSORS:
            t = self.tensors[layer, name]
            for e in experts:
                start = t.offset + int(e) * t.expert_bytes
                aligned = start - start % mmap.PAGESIZE
                self._maps[t.file].madvise(mmap.MADV_WILLNEED, aligned, start + t.expert_bytes - aligned)

    def read(self, layer: int, name: str, expert: int) -> mx.array:
        """One expert's tensor as stored, flat (one copy, out of the page cache)."""
        t = self.tensors[layer, name]
        values = np.frombuffer(self._maps[t.file], dtype=_NUMPY_DTYPES[t.dtype],
                               count=int(np.prod(t.shape)), offset=t.offset + expert * t.expert_bytes)
        array = mx.array(values)
        return array.view(mx.bfloat16) if t.dtype == "BF16" else array


@dataclass
class PoolStats:
    tokens: int = 0  # token positions that went through the model
    hits: int = 0  # (layer, expert) needs found in the pool
    misses: int = 0  # ... read from the checkpoint
    bytes_read: int = 0
    read_s: float = 0.0  # reading and copying into the pool
    readback_s: float = 0.0  # waiting for each layer's routing (the GPU's work up to it)

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

    def summary(self) -> str:
        return (f"experts: hit rate {self.hit_rate:.1%}, {self.bytes_per_token / 1e6:.0f} MB read "
                f"per token, {self.read_s:.2f}s in reads")


class ExpertPool:
    """``slots`` experts of any layers on the GPU, in one :class:`Experts` of ``slots`` experts."""

    def __init__(self, config: ModelConfig, source: ExpertSource, slots: int,
                 dtype: mx.Dtype = mx.bfloat16, policy: str = "decay", half_life: float = 32.0):
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

    def set_policy(self, policy: str, half_life: float = 32.0) -> None:
        """How slots are chosen for eviction from now on (see the module's docstring)."""
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.decay = 0.5 ** (1.0 / half_life) if policy == "decay" else 1.0

    @property
    def slots(self) -> int:
        return len(self.owner)

    def layer(self, index: int) -> "StreamedExperts":
        return StreamedExperts(self, index)

    def fetch(self, layer: int, indices: mx.array) -> mx.array:
        """Make the experts in ``indices`` (T, k) of ``layer`` resident; their slots, (T, k)."""
        t0 = time.perf_counter()
        ids = np.array(indices)  # the layer's one read-back: waits for the GPU up to here
        self.stats.readback_s += time.perf_counter() - t0
        if layer == 0:
            self.stats.tokens += ids.shape[0]
            self.clock += 1
            self.score *= self.decay
        needed = np.unique(ids)
        slots = self.slot_of[layer, needed]
        present = slots >= 0
        self.stats.hits += int(present.sum())
        missing = needed[~present]
        if len(missing):
            self._load(layer, missing, protect=slots[present])
        slots = self.slot_of[layer, needed]
        if self.policy == "lru":
            self.score[slots] = self.clock
        else:  # one use per step (a prefill chunk's thousands of tokens count once)
            self.score[slots] += 1
        table = mx.array(self.slot_of[layer].clip(0).astype(np.uint32))
        return table[indices]

    def _load(self, layer: int, missing: np.ndarray, protect: np.ndarray) -> None:
        t0 = time.perf_counter()
        E = self.config.num_local_experts
        score = self.score.copy()
        score[protect] = np.inf  # needed by this step: never evicted
        victims = np.argpartition(score, len(missing) - 1)[: len(missing)]
        for slot in victims:
            old = self.owner[slot]
            if old >= 0:
                self.slot_of[old // E, old % E] = -1
        self.source.will_need(layer, missing)
        projections = {"gate_up_proj": self.experts.gate_up_proj, "down_proj": self.experts.down_proj}
        for a in range(0, len(missing), LOAD_BATCH):
            written = []
            for expert, slot in zip(missing[a:a + LOAD_BATCH], victims[a:a + LOAD_BATCH]):
                for name in EXPERT_TENSORS:
                    module, param = name.split(".")
                    pool_array = projections[module][param]
                    values = self.source.read(layer, name, int(expert))
                    self.stats.bytes_read += values.nbytes
                    if values.dtype != pool_array.dtype:  # packed bytes: a view; biases: a cast
                        values = (values.view(pool_array.dtype) if values.dtype == mx.uint8
                                  else values.astype(pool_array.dtype))
                    pool_array[int(slot)] = values.reshape(pool_array.shape[1:])
                    written.append(pool_array)
            mx.eval(written)  # in place (the pool's buffers are donated); bounds the staging
        self.owner[victims] = layer * E + missing
        self.slot_of[layer, missing] = victims
        self.score[victims] = 0.0
        self.stats.misses += len(missing)
        self.stats.read_s += time.perf_counter() - t0


class StreamedExperts:
    """A layer's experts in an :class:`ExpertPool`: what ``MLP`` calls instead of its own
    :class:`Experts` (see ``Experts.resident``)."""

    def __init__(self, pool: ExpertPool, layer: int):
        self.pool, self.layer = pool, layer

    def resident(self, indices: mx.array) -> tuple[mx.array, Experts]:
        """(slot indices (T, k), the pool's Experts): the experts ``indices`` made resident."""
        return self.pool.fetch(self.layer, indices), self.pool.experts
