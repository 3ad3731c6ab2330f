"""Key/value caches: a growing one for full-attention layers, a ring buffer for sliding layers.

Both take keys and values of shape (batch, kv_heads, tokens, head_dim) after RoPE and return the
keys and values the new queries attend to. ``offset`` counts the tokens seen so far.

For a multi-token update the returned keys are in temporal order and end at the last new token,
so the caller knows key ``j`` sits at position ``offset + L - K + j`` (see ``ops.attention_mask``).
For a single-token update on a sliding layer they are the ring buffer's slots in slot order: every
slot is inside the window, so no mask is needed and order does not matter.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Full attention: keeps every position. Storage grows in steps to avoid a copy per token."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape
        start, end = self.offset, self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            capacity = ((end + self.step - 1) // self.step) * self.step
            grow = (B, H, capacity - (0 if self.keys is None else start), D)
            new_k = mx.zeros(grow, keys.dtype)
            new_v = mx.zeros(grow[:3] + (values.shape[3],), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :start, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :start, :], new_v], axis=2)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def can_trim(self, n: int) -> bool:
        return n <= self.offset

    def trim(self, n: int) -> None:
        """Forget the last ``n`` tokens (later writes overwrite them)."""
        if not self.can_trim(n):
            raise ValueError(f"cannot trim {n} tokens from a cache holding {self.offset}")
        self.offset -= n

    def snapshot(self):
        return self.offset  # earlier positions are never overwritten

    def restore(self, snapshot) -> None:
        self.trim(self.offset - snapshot)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class RotatingKVCache:
    """Sliding-window attention: a ring buffer of ``window`` slots. Position p lives in slot
    ``p % window``, so the buffer always holds exactly the keys the next query may see."""

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1:
            return self._append_one(keys, values)
        return self._append_many(keys, values)

    def _allocate(self, keys: mx.array, values: mx.array) -> None:
        B, H, _, D = keys.shape
        self.keys = mx.zeros((B, H, self.window, D), keys.dtype)
        self.values = mx.zeros((B, H, self.window, values.shape[3]), values.dtype)

    def _append_one(self, keys, values):
        if self.keys is None:
            self._allocate(keys, values)
        slot = self.offset % self.window
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.offset += 1
        filled = min(self.offset, self.window)
        return self.keys[..., :filled, :], self.values[..., :filled, :]

    def _in_order(self, buffer: mx.array) -> mx.array:
        """The cached positions max(0, offset - window) .. offset - 1, oldest first."""
        if self.offset <= self.window:
            return buffer[..., : self.offset, :]
        split = self.offset % self.window  # slot of the oldest position
        return mx.concatenate([buffer[..., split:, :], buffer[..., :split, :]], axis=2)

    def _append_many(self, keys, values):
        # The first new query needs the window - 1 positions before it.
        L = keys.shape[2]
        if self.keys is not None and self.offset > 0:
            keep = self.window - 1
            keys = mx.concatenate([self._in_order(self.keys)[..., -keep:, :], keys], axis=2)
            values = mx.concatenate([self._in_order(self.values)[..., -keep:, :], values], axis=2)
        else:
            self._allocate(keys, values)
        self.offset += L
        self.keys = self._to_ring(keys)
        self.values = self._to_ring(values)
        return keys, values

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
        """Rewinding past one token would need keys the ring has already overwritten (the
        classic prompt-cache bug), unless nothing has wrapped yet."""
        return n <= self.offset and (n <= 1 or self.offset <= self.window)

    def trim(self, n: int) -> None:
        if not self.can_trim(n):
            raise ValueError(
                f"cannot rewind a {self.window}-slot ring buffer by {n} tokens at offset "
                f"{self.offset}: those keys were overwritten; restore a snapshot instead")
        self.offset -= n

    def snapshot(self):
        """A copy of the ring (small: window slots) to rewind to this position later."""
        if self.keys is None:
            return (0, None, None)
        return (self.offset, mx.array(self.keys), mx.array(self.values))

    def restore(self, snapshot) -> None:
        self.offset, keys, values = snapshot
        # copies again, so a restored snapshot can be restored a second time
        self.keys = None if keys is None else mx.array(keys)
        self.values = None if values is None else mx.array(values)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]
