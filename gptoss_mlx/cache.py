"""Key/value caches: a growing one for full-attention layers, a ring buffer for sliding layers.

Both take keys and values of shape (batch, kv_heads, tokens, head_dim) after RoPE and return the
keys and values the new queries attend to. ``offset`` counts the tokens seen so far. A layer's
keys and values share one buffer ``kv`` (batch, 2 * kv_heads, slots, head_dim): the keys' heads,
then the values', so that a token's key and value go in with one write (one kernel a layer at
decode instead of two: ``update_and_fetch_kv`` takes them as the attention's first kernel makes
them, side by side); ``keys`` and ``values`` are views of it. The engine's decode steps of one
sequence hold the layers of a kind in one buffer and write them once a token (grouped decode
steps, below).

For a multi-token update the returned keys are in temporal order and end at the last new token,
so the caller knows key ``j`` sits at position ``offset + L - K + j`` (see ``ops.attention_mask``).
For a single-token update on a sliding layer they are the ring buffer's slots in slot order: every
slot is inside the window, so no mask is needed and order does not matter.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx


_POSITIONS: list[mx.array] = []  # one evaluated int32 arange, grown by doubling
_GROWING = threading.Lock()


def device_positions(start: int, count: int = 1) -> mx.array:
    """Positions ``start .. start + count`` as an int32 (count,) view of one arange made by the
    device: where a per-call position must be an array (RoPE's offset, the compiled step's
    position), use this instead of ``mx.array(start)``. On MLX-CUDA every array of 8 bytes or less
    lives in one pool of managed memory that the host writes whenever it makes a scalar, and a
    kernel reading that pool then waits for the page to come back (docs/measurements.md); a slice
    of a larger array made on the device stays in device memory. (Evaluated when made, the table
    carries no thread's stream; a slice is a view, no kernel. The views are memoized per thread,
    since every layer of a step asks for the same one; keyed by the thread object, whose id a
    later thread may reuse while a view made here was never evaluated.)"""
    return _thread_positions(start, count, threading.current_thread())


@lru_cache(maxsize=8)
def _thread_positions(start: int, count: int, thread: threading.Thread) -> mx.array:
    end = start + count
    with _GROWING:
        if not _POSITIONS or _POSITIONS[0].size < end:
            table = mx.arange(max(4096, 2 * end), dtype=mx.int32)
            mx.eval(table)
            _POSITIONS[:] = [table]
        table = _POSITIONS[0]
    return table[start:end]


def joined(keys: mx.array, values: mx.array) -> mx.array:
    """Keys and values (B, KV, L, D) as one (B, 2 KV, L, D) array, as a cache holds them."""
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must have one shape")
    return mx.concatenate([keys, values], axis=1)


def split(kv: mx.array | None) -> tuple[mx.array | None, mx.array | None]:
    """The keys' and the values' halves of ``kv`` (views)."""
    if kv is None:
        return None, None
    heads = kv.shape[1] // 2
    return kv[:, :heads], kv[:, heads:]


class KVStorage:
    """``keys`` and ``values``: views of ``kv``: the layer's own buffer, or its row of a
    :class:`KVGroup`'s while the engine's decode steps hold the layers of its kind together.
    Assigning ``kv`` gives the layer its own buffer again."""

    _kv: mx.array | None = None
    group: "KVGroup | None" = None
    index = 0  # the layer's row in its group

    @property
    def kv(self) -> mx.array | None:
        return self._kv if self.group is None else self.group.row(self.index)

    @kv.setter
    def kv(self, value: mx.array | None) -> None:
        self._kv, self.group = value, None

    def _write(self, slot: int, kv: mx.array) -> None:
        """``kv`` (B, 2 KV, L, D) into slots slot .. slot + L - 1: in place in the layer's own
        buffer (a row of a group's is copied out first, once)."""
        buffer = self.kv
        buffer[..., slot : slot + kv.shape[2], :] = kv
        self.kv = buffer

    @property
    def keys(self) -> mx.array | None:
        return split(self.kv)[0]

    @property
    def values(self) -> mx.array | None:
        return split(self.kv)[1]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """keys, values (B, KV, L, D) -> the keys and values the new queries attend to."""
        return self.update_and_fetch_kv(joined(keys, values))

    def update_and_fetch_kv(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        raise NotImplementedError


class KVCache(KVStorage):
    """Full attention: keeps every position. Storage grows in steps to avoid a copy per token."""

    step = 256

    def __init__(self):
        self.kv: mx.array | None = None
        self.offset = 0

    def update_and_fetch_kv(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        """kv (B, 2 KV, L, D), keys then values -> the keys and values up to the last new one."""
        B, H2, L, D = kv.shape
        start, end = self.offset, self.offset + L
        if self.kv is None:
            self.kv = mx.zeros((B, H2, 0, D), kv.dtype)
        self.reserve(end)
        self._write(start, kv)
        self.offset = end
        return split(self.kv[..., :end, :])

    @classmethod
    def capacity(cls, end: int) -> int:
        """The slots storage for positions up to ``end`` has: a multiple of ``step``."""
        return -(-end // cls.step) * cls.step

    def reserve(self, end: int) -> None:
        """Room for positions up to ``end``: the storage grows to capacity(end) slots, keeping
        the first ``offset`` positions."""
        if end > self.kv.shape[2]:
            self.kv = _pad_slots(self.kv[..., : self.offset, :], self.capacity(end))

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def is_trimmable(self) -> bool:
        """mlx-lm's protocol (mlx_lm.models.cache.can_trim_prompt_cache): any of its tokens can go."""
        return True

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (later writes overwrite them), at most those it holds;
        how many, as mlx-lm's trim does."""
        if n < 0:
            raise ValueError(f"cannot trim {n} tokens: a count from 0")
        n = min(n, self.offset)
        self.offset -= n
        return n

    def snapshot(self):
        return self.offset  # earlier positions are never overwritten

    def restore(self, snapshot) -> None:
        self.trim(self.offset - snapshot)

    def fork(self, snapshot) -> "KVCache":
        """A new cache holding this one's positions up to ``snapshot``: views of its storage,
        which writes to either cache then copy (MLX arrays are values), so neither sees the other's."""
        other = KVCache()
        if self.kv is not None:
            other.kv = self.kv[..., :snapshot, :]
        other.offset = snapshot
        return other

    @property
    def state(self) -> list[mx.array]:
        return [] if self.kv is None else [self.kv]


class RotatingKVCache(KVStorage):
    """Sliding-window attention: a ring buffer of ``window`` slots. Position p lives in slot
    ``p % window``, so the buffer always holds exactly the keys the next query may see."""

    def __init__(self, window: int):
        self.window = window
        self.kv: mx.array | None = None
        self._offset = 0
        # The highest offset the slots were written up to: after a rewind the slots of positions
        # offset .. high - 1 still hold the dropped tokens' keys, over the older positions that
        # shared their slots.
        self.high = 0

    @property
    def offset(self) -> int:
        return self._offset

    @offset.setter
    def offset(self, value: int) -> None:
        self._offset = value
        self.high = max(self.high, value)

    def update_and_fetch_kv(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        return self._append_one(kv) if kv.shape[2] == 1 else self._append_many(kv)

    def _append_one(self, kv):
        if self.kv is None:
            B, H2, _, D = kv.shape
            self.kv = mx.zeros((B, H2, self.window, D), kv.dtype)
        self._write(self.offset % self.window, kv)
        self.offset += 1
        filled = min(self.offset, self.window)
        return split(self.kv[..., :filled, :])

    def _in_order(self, buffer: mx.array) -> mx.array:
        """The cached positions max(0, offset - window) .. offset - 1, oldest first."""
        if self.offset <= self.window:
            return buffer[..., : self.offset, :]
        split = self.offset % self.window  # slot of the oldest position
        return mx.concatenate([buffer[..., split:, :], buffer[..., :split, :]], axis=2)

    def _append_many(self, kv):
        # The first new query needs the window - 1 positions before it.
        L = kv.shape[2]
        if self.kv is not None and self.offset > 0:
            kv = mx.concatenate([self._in_order(self.kv)[..., -(self.window - 1):, :], kv], axis=2)
        self.offset += L
        self.kv = self._to_ring(kv)
        self.high = self.offset  # the ring rebuilt: no slot holds a later position
        return split(kv)

    def _to_ring(self, ordered: mx.array) -> mx.array:
        """Ring buffer holding the last ``window`` of ``ordered`` (which ends at offset - 1)."""
        W = self.window
        if self.offset <= W:  # nothing has wrapped: slot = position
            pad = W - ordered.shape[2]
            if pad == 0:
                return ordered
            padding = mx.zeros(ordered.shape[:2] + (pad,) + ordered.shape[3:], ordered.dtype)
            return mx.concatenate([ordered, padding], axis=2)
        last = ordered[..., -W:, :]  # positions offset - W .. offset - 1
        shift = self.offset % W  # slot of position offset - W
        return mx.concatenate([last[..., W - shift :, :], last[..., : W - shift, :]], axis=2)

    def can_trim(self, n: int) -> bool:
        """Whether the ring still holds the window before offset - n: the next token at that
        position needs positions offset - n - window + 1 .. offset - n - 1. Once the slots have
        wrapped (written past ``window`` positions), only one token before the highest written
        position qualifies: every slot of an earlier position holds a later one's key (rewinding
        further is the classic prompt-cache bug, also after several one-token rewinds)."""
        return 0 <= n <= self.offset and (self.high <= self.window or self.offset - n >= self.high - 1)

    def is_trimmable(self) -> bool:
        """mlx-lm's protocol: any of its tokens can go while the ring has not wrapped."""
        return self.high <= self.window

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise ValueError(
                f"cannot rewind a {self.window}-slot ring buffer by {n} tokens at offset "
                f"{self.offset}: those keys were overwritten; restore a snapshot instead")
        self._offset -= n
        return n

    def snapshot(self):
        """(offset, a copy of the ring (small: window slots), high) to rewind to later."""
        if self.kv is None:
            return (0, None, 0)
        return (self.offset, mx.array(self.kv), self.high)

    def restore(self, snapshot) -> None:
        self._offset, kv, self.high = snapshot
        # copies again, so a restored snapshot can be restored a second time
        self.kv = None if kv is None else mx.array(kv)

    def fork(self, snapshot) -> "RotatingKVCache":
        """A new ring buffer restored to ``snapshot`` (one of this cache's)."""
        other = RotatingKVCache(self.window)
        other.restore(snapshot)
        return other

    @property
    def state(self) -> list[mx.array]:
        return [] if self.kv is None else [self.kv]


# ---- grouped decode steps ----------------------------------------------------------------------
#
# A decode step of one sequence writes each layer's new key and value into its cache: 24 writes a
# token on gpt-oss-20b, each a kernel launch. Where the one-pass step attention runs
# (kernels.attention.attention_step), the layers of a kind keep their storage in one buffer (a
# KVGroup), each layer's attention reads its row as it was before the token and takes the
# token's own key and value from the qkv output, and passes them on with those of the kind's
# earlier layers; the last layer's are written once for the kind, when the buffer is next read
# (the next step's first operation). So 2 writes a token instead of 24. The write waits for the
# next read because MLX writes in place only into a buffer nothing else refers to: a write after
# the step's attention in the same graph copied the whole buffer.


class KVGroup:
    """The storage of ``layers`` layers of one kind in one buffer ``kv`` (layers, 1, 2 KV, slots,
    D); row i is layer i's (KVStorage.group, .index). ``pending``: the last step's keys and
    values of every layer (layers, 2 KV, D) and their slot, written when ``kv`` is next read.
    ``passing``: during a step, those of the layers done so far."""

    def __init__(self, kv: mx.array):
        self._kv = kv
        self.layers = kv.shape[0]
        self.pending: tuple[mx.array, int] | None = None
        self.passing: mx.array | None = None

    @property
    def kv(self) -> mx.array:
        if self.pending is not None:
            passed, slot = self.pending
            self.pending = None
            layers, kv2, D = passed.shape
            self._kv[:, :, :, slot : slot + 1, :] = passed.reshape(layers, 1, kv2, 1, D)
        return self._kv

    def row(self, i: int, kv: mx.array | None = None) -> mx.array:
        """Layer i's storage (1, 2 KV, slots, D): a view of ``kv`` (the group's, by default; a
        slice, where an integer index would be a gather, a copy)."""
        kv = self.kv if kv is None else kv
        return kv[i : i + 1].squeeze(0)

    @classmethod
    def holding(cls, caches: list, slots: int) -> "KVGroup":
        """The group ``caches`` (one sequence's, one kind, in layer order) are rows 0, 1, .. of,
        with room for ``slots`` slots; else a new one holding their storage (copied once: after
        a prefill, a fork or anything else gave a layer its own buffer)."""
        group = caches[0].group
        if group is None or group.layers != len(caches) or any(
                c.group is not group or c.index != i for i, c in enumerate(caches)):
            buffers = [c.kv for c in caches]
            slots = max(slots, *(b.shape[2] for b in buffers))
            group = cls(mx.stack([_pad_slots(b, slots) for b in buffers]))
            for i, c in enumerate(caches):
                c._kv, c.group, c.index = None, group, i
        if group._kv.shape[3] < slots:
            group._kv = _pad_slots(group.kv, slots)
        return group


class GroupedStep:
    """One layer's cache in a grouped decode step: ``buffer`` its storage before the token (a
    view of its group's row), the token's position ``offset`` (an int, or a () int32 array inside
    the compiled step) and ``position``, a (1,) int32 view of device memory (device_positions),
    ``ring`` (a sliding layer's ring buffer: the token's slot is position % slots), its ``index``
    in ``group``. kernels.attention.attention_step reads it."""

    def __init__(self, group: KVGroup, index: int, buffer: mx.array, offset: int | mx.array, ring: bool,
                 position: mx.array | None = None):
        self.group, self.index, self.buffer, self.offset, self.ring = group, index, buffer, offset, ring
        self.position = device_positions(offset) if position is None else position


class KindStep(NamedTuple):
    """A grouped step's layers of one kind: their ``group``, their caches ``layers`` (the model's
    layers ``rows``), ``ring`` (sliding layers) and the token's ``slot`` in their storage."""

    group: KVGroup
    layers: list
    rows: list[int]
    ring: bool
    slot: int


def step_kinds(caches: list, full: bool) -> list[KindStep] | None:
    """For one decode step of one sequence: the groups to write its layers' keys and values
    through, the rings' and, if ``full``, the full layers' (each held in one buffer now); None
    where the caches are not one sequence's plain caches at one position (a batch's rows, a
    cache not filled yet)."""
    # (a group's layers are one sequence's; a layer's own buffer is checked without a view of it)
    if not all(type(c) in (KVCache, RotatingKVCache) and (c.group is not None or (c._kv is not None
                                                                                  and c._kv.shape[0] == 1))
               for c in caches):
        return None
    position = caches[0].offset
    if any(c.offset != position for c in caches):
        return None
    kinds = []
    for ring in (True, False) if full else (True,):
        rows = [i for i, c in enumerate(caches) if isinstance(c, RotatingKVCache) == ring]
        if not rows:
            continue
        layers = [caches[i] for i in rows]
        slots = layers[0].window if ring else KVCache.capacity(position + 1)
        kinds.append(KindStep(KVGroup.holding(layers, slots), layers, rows, ring,
                              position % slots if ring else position))
    return kinds


def grouped_step(caches: list, kinds: list[KindStep]) -> list:
    """The caches to run one decode step's layers with: a GroupedStep for each layer of
    ``kinds`` (:func:`step_kinds`), the others as they are."""
    stepped, position = list(caches), caches[0].offset
    for kind in kinds:
        buffer = kind.group.kv  # the last step's keys and values written first
        for j, i in enumerate(kind.rows):
            stepped[i] = GroupedStep(kind.group, j, kind.group.row(j, buffer), position, kind.ring)
    return stepped


def end_grouped_step(kinds: list[KindStep]) -> None:
    """After the layers of a grouped step: each group's keys and values pending, offsets on."""
    for kind in kinds:
        group = kind.group
        group.pending, group.passing = (group.passing, kind.slot), None
        for c in kind.layers:
            c.offset += 1


# ---- decode batches -----------------------------------------------------------------------------
#
# A decode batch runs B sequences one token each per step through one forward pass. Each layer's
# batch cache holds the B sequences' caches as rows of one buffer (B, kv_heads, K, head_dim); row b
# is written at its own position. ``offset`` is then an array of the B positions (RoPE takes it as
# it is), and ``mask`` (B, 1, 1, K) hides the keys a row does not have, or is None when every row
# has the same number of keys (then the attention is exactly what each sequence alone computes).
# Sequences join with ``extend`` and leave with ``extract`` + ``filter``; outside a batch each
# sequence keeps its own KVCache / RotatingKVCache (prefill, the prompt-cache pool, rewinding).


@lru_cache(maxsize=16)
def _positions(values: tuple[int, ...]) -> mx.array:
    """``values`` as a (B,) array. Every layer of a batch holds the same positions, so a step
    builds each such array once, not once per layer."""
    return mx.array(values)


def _padding_mask(filled: tuple[int, ...]) -> mx.array | None:
    """(B, 1, 1, K) bool, K = max(filled): row b sees its first filled[b] slots; None when all
    rows see all K."""
    K = max(filled)
    if min(filled) == K:
        return None
    # A lazy array must not reach another thread: one memo per thread.
    return _thread_padding_mask(filled, threading.current_thread())


@lru_cache(maxsize=16)
def _thread_padding_mask(filled: tuple[int, ...], thread: threading.Thread) -> mx.array:
    return (mx.arange(max(filled)) < _positions(filled)[:, None]).reshape(len(filled), 1, 1, -1)


class _BatchRows(KVStorage):
    """What both batch caches share: the buffer, each row's number of positions, the mask."""

    def __init__(self, kv: mx.array, lengths: list[int]):
        self.kv, self.lengths = kv, lengths
        self.mask: mx.array | None = None

    @property
    def offset(self) -> int | mx.array:
        """Each row's next position: one int when the rows agree (RoPE then runs as for one
        sequence), else a (B,) array."""
        if min(self.lengths) == max(self.lengths):
            return self.lengths[0]
        return _positions(tuple(self.lengths))

    def _write_rows(self, slots: list[int], kv: mx.array) -> None:
        """Row b's new key and value (B, 2 KV, 1, D) into slot ``slots[b]``: a slice update in
        place when every row writes the same slot (always at B = 1), as KVCache does, else a
        scatter."""
        if min(slots) == max(slots):
            self.kv[..., slots[0] : slots[0] + 1, :] = kv
            return
        index = _positions(tuple(slots)).reshape(-1, 1, 1, 1)
        self.kv = mx.put_along_axis(self.kv, index, kv, axis=2)

    def _fetch(self, filled: list[int]) -> tuple[mx.array, mx.array]:
        """The first max(filled) slots of every row, and the mask of each row's ``filled``."""
        self.mask = _padding_mask(tuple(filled))
        return split(self.kv[..., :max(filled), :])

    def _row(self, i: int, slots: int) -> mx.array:
        """Row i's first ``slots`` keys and values (1, 2 KV, slots, D), copied: a slice would keep
        the whole batch's buffer alive (and uncounted) in the prompt-cache pool."""
        return self.kv[:, :, :slots][mx.array([i])]

    def filter(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order)."""
        self.kv = self.kv[mx.array(keep)]
        self.lengths = [self.lengths[i] for i in keep]

    def extend(self, other: "_BatchRows") -> None:
        """Append ``other``'s rows (padding the shorter buffers with empty slots)."""
        K = max(self.kv.shape[2], other.kv.shape[2])
        self.kv = mx.concatenate([_pad_slots(self.kv, K), _pad_slots(other.kv, K)])
        self.lengths = self.lengths + other.lengths


def _pad_slots(buffer: mx.array, slots: int) -> mx.array:
    """``buffer`` (..., K, D) with empty slots appended up to ``slots``."""
    pad = slots - buffer.shape[-2]
    if pad <= 0:
        return buffer
    return mx.concatenate([buffer, mx.zeros(buffer.shape[:-2] + (pad,) + buffer.shape[-1:], buffer.dtype)], axis=-2)


class BatchKVCache(_BatchRows):
    """Full attention for a decode batch: row b holds its sequence's keys in position order, then
    empty slots. Storage grows in KVCache.step slots for all rows at once."""

    @classmethod
    def merge(cls, caches: list[KVCache]) -> "BatchKVCache":
        K = max(c.kv.shape[2] for c in caches)
        return cls(mx.concatenate([_pad_slots(c.kv, K) for c in caches]), [c.offset for c in caches])

    def update_and_fetch_kv(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        """kv (B, 2 KV, 1, D) at each row's next position -> every row's keys and values so far."""
        end = max(self.lengths) + 1
        if end > self.kv.shape[2]:
            self.kv = _pad_slots(self.kv, KVCache.capacity(end))
        self._write_rows(self.lengths, kv)
        self.lengths = [n + 1 for n in self.lengths]
        return self._fetch(self.lengths)

    def extract(self, i: int) -> KVCache:
        """Row ``i`` as a sequence's own cache again."""
        cache = KVCache()
        slots = KVCache.capacity(self.lengths[i])  # its own storage, not the longest row's
        cache.kv, cache.offset = self._row(i, slots), self.lengths[i]
        return cache


class BatchRotatingKVCache(_BatchRows):
    """Sliding-window attention for a decode batch: row b is its sequence's ring buffer (position
    p in slot p % window). At decode every filled slot is inside the window and order does not
    matter, so only a row that has not filled its ring yet needs the mask."""

    def __init__(self, kv: mx.array, lengths: list[int], window: int, highs: list[int]):
        super().__init__(kv, lengths)
        self.window = window
        # each row's RotatingKVCache.high when it joined: a row extracted again must not allow
        # the rewinds its ring can no longer serve
        self.highs = highs

    @classmethod
    def merge(cls, caches: list[RotatingKVCache]) -> "BatchRotatingKVCache":
        return cls(mx.concatenate([c.kv for c in caches]), [c.offset for c in caches], caches[0].window,
                   [c.high for c in caches])

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        self.highs = [self.highs[i] for i in keep]

    def extend(self, other: "BatchRotatingKVCache") -> None:
        super().extend(other)
        self.highs = self.highs + other.highs

    def update_and_fetch_kv(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        self._write_rows([n % self.window for n in self.lengths], kv)
        self.lengths = [n + 1 for n in self.lengths]
        return self._fetch([min(n, self.window) for n in self.lengths])

    def extract(self, i: int) -> RotatingKVCache:
        cache = RotatingKVCache(self.window)
        cache.kv, cache.offset = self._row(i, self.window), self.lengths[i]
        cache.high = max(self.highs[i], self.lengths[i])
        return cache


def merge_caches(caches: list[list]) -> list:
    """Per layer, one batch cache holding the given sequences' caches (each a model.make_cache()
    list, filled by a prefill) as rows, in order."""
    batch_type = {KVCache: BatchKVCache, RotatingKVCache: BatchRotatingKVCache}
    return [batch_type[type(layer[0])].merge(list(layer)) for layer in zip(*caches)]
