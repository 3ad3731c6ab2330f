"""Incremental decoding with the KV cache gives the logits of one full forward pass."""

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.cache import KVCache, RotatingKVCache
from conftest import FP32_ATOL
from gptoss_mlx.loading import load_model

TOKENS = [(i * 37 + 11) % 512 for i in range(40)]  # 40 tokens, window 8: wraps the ring 5 times


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hf"], mx.float32)


@pytest.fixture(scope="module")
def full_logits(model):
    return np.array(model(mx.array([TOKENS]))[0])


def run_in_chunks(model, sizes):
    cache = model.make_cache()
    out, start = [], 0
    for size in sizes:
        out.append(np.array(model(mx.array([TOKENS[start : start + size]]), cache=cache)[0]))
        start += size
    assert start == len(TOKENS)
    assert all(c.offset == len(TOKENS) for c in cache)
    return np.concatenate(out)


def test_make_cache_has_ring_buffers_on_sliding_layers(model, tiny_config):
    cache = model.make_cache()
    kinds = [type(c) for c in cache]
    assert kinds == [RotatingKVCache if s else KVCache for s in tiny_config.sliding_layers]
    assert kinds[0] is RotatingKVCache  # sliding on even layers, as the reference


def test_token_by_token_matches_full_forward(model, full_logits):
    logits = run_in_chunks(model, [1] * len(TOKENS))
    np.testing.assert_allclose(logits, full_logits, atol=FP32_ATOL)


@pytest.mark.parametrize(
    "sizes",
    [
        [3] * 13 + [1],  # chunks shorter than the window
        [8] * 5,  # exactly the window
        [13, 13, 14],  # longer than the window
        [7, 1, 9, 1, 1, 21],  # a mix, crossing the window boundary at odd places
        [1, 39],  # one token, then a long chunk over a barely-filled ring
    ],
)
def test_chunked_prefill_matches_full_forward(model, full_logits, sizes):
    np.testing.assert_allclose(run_in_chunks(model, sizes), full_logits, atol=FP32_ATOL)


def test_ring_buffer_holds_exactly_the_window():
    cache = RotatingKVCache(window=4)
    for pos in range(10):
        k = mx.full((1, 1, 1, 1), float(pos))
        keys, _ = cache.update_and_fetch(k, k)
    assert sorted(np.array(keys)[0, 0, :, 0].tolist()) == [6.0, 7.0, 8.0, 9.0]
    keys, _ = cache.update_and_fetch(*(2 * [mx.arange(10, 13, dtype=mx.float32).reshape(1, 1, 3, 1)]))
    # a chunk sees the 3 previous positions (window - 1) in order, then itself
    assert np.array(keys)[0, 0, :, 0].tolist() == [7, 8, 9, 10, 11, 12]
    assert sorted(np.array(cache.keys)[0, 0, :, 0].tolist()) == [9, 10, 11, 12]
    assert cache.keys[0, 0, 12 % 4, 0].item() == 12  # slot = position % window


def test_full_cache_grows_past_its_step():
    cache = KVCache()
    k = mx.ones((1, 2, 300, 4))
    keys, _ = cache.update_and_fetch(k, k)
    keys, _ = cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert keys.shape == (1, 2, 301, 4) and cache.offset == 301


def test_a_wrapped_ring_refuses_every_rewind_it_cannot_serve(model, full_logits):
    """Window 8, 10 tokens one at a time: the ring holds positions 2..9. One token back (to 9)
    is servable; a second one-token rewind (to 8) is not, since position 8's query needs position
    1, whose slot holds 9 now. Each refused rewind falls back to a snapshot, and decoding on
    gives the logits of one full pass."""
    from gptoss_mlx.generate import PromptCache, forward

    pc = PromptCache(model.make_cache())
    for t in TOKENS[:10]:
        forward(model, pc, [t])
    assert pc.rewind_to(9) == 9
    assert not any(c.can_trim(1) for c in pc.cache if isinstance(c, RotatingKVCache))
    kept = pc.rewind_to(8)
    assert kept == 0  # the only snapshot: an empty cache
    logits = np.array(forward(model, pc, TOKENS[kept:12]))
    np.testing.assert_allclose(logits[-1], full_logits[11], atol=FP32_ATOL)

    ring = RotatingKVCache(window=4)  # several rewinds of a ring that never wrapped: all servable
    k = mx.zeros((1, 1, 3, 1))
    ring.update_and_fetch(k, k)
    assert ring.can_trim(3) and ring.can_trim(1)
    ring.trim(1)
    assert ring.can_trim(2) and not ring.can_trim(3)


def test_a_ring_keeps_what_it_can_serve_through_a_decode_batch():
    """A ring rewound by one token after wrapping, through a decode batch and out again (no step
    in between): still only that one token back is servable; a snapshot brings back its state."""
    from gptoss_mlx.cache import BatchRotatingKVCache

    ring = RotatingKVCache(window=4)
    for pos in range(6):
        k = mx.full((1, 1, 1, 1), float(pos))
        ring.update_and_fetch(k, k)
    snap = ring.snapshot()
    ring.trim(1)
    batch = BatchRotatingKVCache.merge([ring, ring])
    batch.filter([1])
    back = batch.extract(0)
    assert back.offset == 5 and back.can_trim(0) and not back.can_trim(1)
    back.restore(snap)
    assert back.offset == 6 and back.can_trim(1) and not back.can_trim(2)


def test_mlx_lms_prompt_cache_trimming_works_and_refuses_what_a_ring_lost(model, full_logits):
    """The caches bear mlx-lm's class names, but mlx_lm.models.cache.can_trim_prompt_cache raised
    AttributeError on them (no is_trimmable). Trimmed through mlx-lm, the cache gives the logits
    of a fresh run; a ring that has wrapped says it cannot be trimmed."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    cache = model.make_cache()
    model(mx.array([TOKENS[:7]]), cache=cache)
    assert can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 3) == 3
    again = np.array(model(mx.array([TOKENS[4:7]]), cache=cache)[0])
    np.testing.assert_allclose(again, full_logits[4:7], atol=FP32_ATOL)
    model(mx.array([TOKENS[7:20]]), cache=cache)  # past the 8-slot window
    assert not can_trim_prompt_cache(cache)
    full = KVCache()  # (a re-attack) as mlx-lm's: at most what it holds, and no negative count
    full.update_and_fetch(mx.zeros((1, 2, 5, 4)), mx.zeros((1, 2, 5, 4)))
    assert trim_prompt_cache([full], 100) == 5 and full.offset == 0
    with pytest.raises(ValueError):
        full.trim(-3)
    assert not full.can_trim(-3) and full.offset == 0
