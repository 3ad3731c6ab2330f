"""Expert streaming (expert_pool.py): a pool smaller than the experts computes exactly what the
resident model computes, counts what it reads, and the memory plan chooses it only when needed."""

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_mlx.config import GPT_OSS_20B, GPT_OSS_120B
from gptoss_mlx.generate import Engine, SamplingParams
from gptoss_mlx.loading import CheckpointError, load, load_model, read_config
from gptoss_mlx.memory import (
    DEVICE_MEMORY_ENV, GB, MemoryPlanError, choose_plan, cli_wording, dense_bytes, device_limit, expert_bytes, parse_size,
    kv_cache_bytes, plan, view_bytes,
)

PROMPT = [(37 * t + 11) % 500 for t in range(45)]
# what a checkpoint file written to (or touched) under a streamed model reads as
CHANGED = r"the file changed \(written to, or its modification time set\) after the model was loaded"


def streamed(directory, slots, dtype=mx.bfloat16, transfer=None, **kw):
    config = read_config(directory)
    model = load_model(directory, dtype, memory_plan=plan(config, 64, 16, 1e12, expert_slots=slots), **kw)
    if transfer:
        model.expert_pool.set_transfer(transfer)
    return model


@pytest.fixture(scope="module")
def models(checkpoints):
    """The resident tiny model and the same one streamed through one layer's worth of slots
    (8 of its 4 x 8 experts: every decode step evicts)."""
    return load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)


@pytest.fixture(scope="module")
def layouts(checkpoints, tmp_path_factory):
    """The published layouts and a `gptoss-mlx models convert` output (8-bit dense layers)."""
    from gptoss_mlx.cli import main

    converted = tmp_path_factory.mktemp("converted") / "q8"
    assert main(["models", "convert", str(checkpoints["hf"]), str(converted), "--dense-bits", "8"]) == 0
    return {**checkpoints, "converted": converted}


@pytest.mark.parametrize("layout", ["hf", "original", "converted"])
@pytest.mark.parametrize("dtype, transfer", [(mx.bfloat16, "host"), (mx.bfloat16, "mlx"), (mx.float32, "mlx")])
def test_streamed_logits_equal_the_resident_model_through_prefill_and_decode(layouts, layout, dtype, transfer):
    resident, pooled = load_model(layouts[layout], dtype), streamed(layouts[layout], 8, dtype, transfer)
    assert pooled.expert_pool.slots == 8 and resident.expert_pool is None
    caches = resident.make_cache(), pooled.make_cache()
    chunks = [PROMPT[:20], PROMPT[20:]] + [[t] for t in (5, 77, 301, 5, 499, 12)]
    pool = pooled.expert_pool
    for chunk in chunks:
        misses = pool.stats.misses
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
        assert pool.stats.misses > misses  # the pool is too small: every step reads experts


def test_greedy_tokens_equal_over_several_turns_with_the_prompt_cache(models):
    engines = [Engine(m, max_context=512, prefill_step=16) for m in models]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    histories = [list(PROMPT), list(PROMPT)]
    for turn in range(3):
        replies = []
        for engine, history in zip(engines, histories):
            replies.append(list(engine.generate(history, greedy, stop_tokens=())))
            assert engine.stats.reused_tokens == (0 if turn == 0 else len(history) - 4 - 1)
            history += replies[-1] + [turn + 7, 400 - turn, 3, 9]
        assert replies[0] == replies[1] and len(replies[0]) == 8


def test_the_pool_is_written_through_host_memory_where_the_bytes_are_the_checkpoints(checkpoints):
    """On the CPU (as on a Mac) the pool's memory is the host's: bf16 pools are written by one
    copy from the mapped file; a float32 pool holds cast biases, so MLX writes it; the CUDA driver
    is never taken off a CUDA device."""
    assert streamed(checkpoints["hf"], 8).expert_pool.transfer == "host"
    pool = streamed(checkpoints["hf"], 8, mx.float32).expert_pool
    assert pool.transfer == "mlx"
    for transfer in ("host", "cuda"):
        with pytest.raises(ValueError, match=f"the {transfer} transfer does not reach the expert pool"):
            pool.set_transfer(transfer)
    with pytest.raises(ValueError, match="transfer must be one of cuda, host, mlx, got 'disk'"):
        pool.set_transfer("disk")


class QueuedCopies:
    """A stand-in for the CUDA driver on the CPU: copies land only when ``finish`` is called
    (as DMA on a stream does), and page-locking is recorded (or refused). An array's address is
    its host view's (the CPU's memory is the host's)."""

    def __init__(self, pins: bool):
        self.pins, self.queued, self.pinned, self.unpinned = pins, [], [], []

    @staticmethod
    def addresses(arrays):
        from gptoss_mlx.expert_pool import host_view

        return mx.array([host_view(a).ctypes.data for a in arrays], dtype=mx.uint64)

    def copy(self, dst, src, n):
        self.queued.append((dst, ctypes.string_at(src, n)))

    def finish(self):
        for dst, data in self.queued:
            ctypes.memmove(dst, data, len(data))
        self.queued.clear()

    def pin(self, buffer):
        if self.pins:
            self.pinned.append(buffer.nbytes)
        return self.pins

    def unpin(self, buffers):
        self.unpinned += [b.nbytes for b in buffers]


@pytest.mark.parametrize("transfer", ["host", "cuda"])
def test_reads_ahead_land_before_the_next_layer_computes(checkpoints, monkeypatch, transfer):
    """Decode guesses the next layer's experts and copies them while the device computes: with
    copies that land late (a slow worker thread, or a stream waited for only at the next
    layer), every logit still equals the resident model's, and the guesses are counted."""
    import threading
    import time

    from gptoss_mlx import expert_pool

    driver = QueuedCopies(pins=True)
    monkeypatch.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: driver))
    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8, transfer=transfer)
    pool = pooled.expert_pool
    pool.guess = 4
    if transfer == "host":
        read_into = pool._copy

        def late(dst, *expert):  # the worker's reads land well after the engine goes on
            if threading.current_thread().name.startswith("expert-reads"):
                time.sleep(0.002)
            read_into(dst, *expert)

        pool._copy = late
    caches = resident.make_cache(), pooled.make_cache()
    for chunk in [PROMPT[:20], [5], [77], [301], [12], [499], [5]]:
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    s = pool.stats
    assert s.guessed > 0 and 0 < s.guessed_used <= s.guessed and "read ahead" in s.summary()
    assert not driver.queued and not pool._pending


def test_reads_ahead_start_once_the_layers_experts_are_queued(checkpoints, monkeypatch):
    """A decode step hands each layer's experts to the device before it starts copying the next
    layer's guessed experts: the copies' bookkeeping and calls no longer keep the device waiting
    for the experts (then read back the next layer's routing, as before)."""
    model = streamed(checkpoints["hf"], 8)
    pool = model.expert_pool
    pool.guess = 4
    events = []

    def spy(name, call):
        def logged(*args, **kwargs):
            events.append(name if name == "queued" else f"{name} {args[0]}")
            return call(*args, **kwargs)
        return logged

    monkeypatch.setattr(mx, "async_eval", spy("queued", mx.async_eval))
    monkeypatch.setattr(pool, "_read_ahead", spy("ahead", pool._read_ahead))
    monkeypatch.setattr(pool, "fetch", spy("fetch", pool.fetch))
    cache = model.make_cache()
    model(mx.array([PROMPT[:20]]), cache=cache)
    for token in (5, 77):
        events.clear()
        model(mx.array([[token]]), cache=cache)
        layers = len(model.layers)
        assert events == [e for layer in range(layers) for e in (
            f"fetch {layer}", "queued", *([f"ahead {layer + 1}"] if layer + 1 < layers else []))]
    assert pool.stats.guessed > 0


def test_the_host_and_cuda_transfers_guess_by_default_and_mlx_s_does_not(checkpoints, monkeypatch):
    from gptoss_mlx import expert_pool

    assert streamed(checkpoints["hf"], 8).expert_pool.guess == 4
    with monkeypatch.context() as m:
        m.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: QueuedCopies(pins=True)))
        pool = streamed(checkpoints["hf"], 8).expert_pool
        assert pool.transfer == "cuda" and pool.guess == 4
    assert streamed(checkpoints["hf"], 8, transfer="mlx").expert_pool.guess == 4  # chosen at load: host
    config = read_config(checkpoints["hf"])
    from gptoss_mlx.expert_pool import ExpertPool

    mlx_pool = ExpertPool(config, streamed(checkpoints["hf"], 8).expert_pool.source, 8, transfer="mlx")
    assert mlx_pool.transfer == "mlx" and mlx_pool.guess == 0


@pytest.mark.parametrize("pins", [True, False])
def test_the_cuda_transfer_waits_for_its_copies_and_page_locks_the_checkpoint(checkpoints, monkeypatch, pins):
    """Where the CUDA driver is found, the pool copies by DMA from the page-locked files: the
    copies are queued and waited for once per layer, before the layer computes; a driver that
    refuses to page-lock still copies (from pageable memory)."""
    import gc

    from gptoss_mlx import expert_pool

    driver = QueuedCopies(pins)
    monkeypatch.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: driver))
    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    pool = pooled.expert_pool
    files = sum(f.stat().st_size for f in checkpoints["hf"].glob("*.safetensors"))
    assert pool.transfer == "cuda" and pool.pinned_bytes == (files if pins else 0)
    caches = resident.make_cache(), pooled.make_cache()
    for chunk in [PROMPT[:20], [5], [77], [301], [12]]:
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    assert pool.stats.misses > 8 and not driver.queued
    del pooled, pool
    gc.collect()
    assert driver.unpinned == driver.pinned  # a collected pool unlocks what it locked


def test_the_cuda_transfer_copies_to_where_the_pool_is_now(checkpoints, monkeypatch):
    """On CUDA a host access moves an array's buffer (into managed memory): the pool reads its
    arrays' addresses with each layer's routing, so copies follow a buffer that moved instead of
    writing the old one. Here a pool array is replaced by a copy (the old buffer kept alive):
    every logit still equals the resident model's."""
    from gptoss_mlx import expert_pool

    driver = QueuedCopies(pins=True)
    monkeypatch.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: driver))
    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    pool = pooled.expert_pool
    caches = resident.make_cache(), pooled.make_cache()
    old = []
    for step, chunk in enumerate([PROMPT[:20], [5], [77], [301], [12]]):
        if step == 2:
            for proj in (pool.experts.gate_up_proj, pool.experts.down_proj):
                old.append(proj.weight)
                proj.weight = mx.array(np.array(proj.weight))  # the same bytes, another buffer
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    assert pool._rows["down_proj.weight"][0] == int(np.array(driver.addresses([pool.experts.down_proj.weight]))[0])


def test_reads_ahead_under_way_when_the_pool_moves_are_read_again(checkpoints, monkeypatch):
    """The reads ahead for layer 1 are queued during layer 0's fetch, at the addresses of then;
    a pool array that moves before layer 1's fetch (found by a helper's attack) leaves them in
    the old buffer: their slots are released and read again, and every logit still equals the
    resident model's."""
    from gptoss_mlx import expert_pool

    driver = QueuedCopies(pins=True)
    monkeypatch.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: driver))
    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    pool = pooled.expert_pool
    assert pool.guess > 0
    old, state = [], {"move": False, "moved_with_copies_queued": 0}
    fetch = expert_pool.StreamedExperts.resident

    def resident_then_move(self, indices, x, residual):
        if self.layer == 1 and state["move"] and driver.queued:
            for proj in (pool.experts.gate_up_proj, pool.experts.down_proj):
                old.append(proj.weight)
                proj.weight = mx.array(np.array(proj.weight))  # the same bytes, another buffer
            state["move"], state["moved_with_copies_queued"] = False, len(driver.queued)
        return fetch(self, indices, x, residual)

    monkeypatch.setattr(expert_pool.StreamedExperts, "resident", resident_then_move)
    caches = resident.make_cache(), pooled.make_cache()
    for step, chunk in enumerate([PROMPT[:20], [5], [77], [301], [12], [499], [5], [8]]):
        state["move"] = state["move"] or (step == 2 and not old)
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    assert state["moved_with_copies_queued"] > 0


def test_the_cuda_transfer_page_locks_only_within_its_share_of_memory(checkpoints, monkeypatch):
    from gptoss_mlx import expert_pool

    driver = QueuedCopies(pins=True)
    monkeypatch.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: driver))
    monkeypatch.setattr(expert_pool, "PIN_SHARE", 1e-12)
    assert streamed(checkpoints["hf"], 8).expert_pool.pinned_bytes == 0 and driver.pinned == []


def test_a_host_view_that_copies_is_detected_and_mlx_writes_the_pool(checkpoints, monkeypatch):
    """If numpy's view of the pool ever stopped being the pool's own memory (a silent copy),
    writes through it would never reach the device: the pool notices when it sets up, uses
    MLX's copy instead, and computes what the resident model computes."""
    from gptoss_mlx import expert_pool

    real_view = expert_pool.host_view
    monkeypatch.setattr(expert_pool, "host_view", lambda array: real_view(array).copy())
    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    assert pooled.expert_pool.transfer == "mlx"
    caches = resident.make_cache(), pooled.make_cache()
    for chunk in [PROMPT[:20], [5], [77], [301]]:
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    assert pooled.expert_pool.stats.misses > 8


def test_changing_the_transfer_between_steps_keeps_every_slot_right(models):
    """Setting up a transfer writes a check pattern into slot 0: the expert it held is read again."""
    from gptoss_mlx.expert_pool import ExpertPool

    resident, pooled = models
    pool = ExpertPool(resident.config, pooled.expert_pool.source, 8)
    pool.fetch(0, mx.array([[0, 1, 2, 3]]))
    assert 0 in pool.slot_of[0]
    pool.set_transfer("host")
    slots = np.array(pool.fetch(0, mx.array([[0, 1, 2, 3]])))
    assert pool.stats.misses == 5
    for expert, slot in enumerate(slots.ravel()):
        for name in ("gate_up_proj", "down_proj"):
            ours, theirs = getattr(pool.experts, name), getattr(resident.layers[0].mlp.experts, name)
            assert mx.array_equal(ours.weight[int(slot)], theirs.weight[expert]).item()


def test_a_pass_left_unevaluated_survives_later_passes_rewriting_its_slots(models):
    """Slots are rewritten in place, so a pass's output that nobody has evaluated yet must not
    read experts a later pass has put in its slots since: the model queues each pass's work
    before it returns."""
    resident, pooled = models
    tokens = [PROMPT[:12], PROMPT[12:30], [3, 1, 4, 1, 5]]
    lazy = [pooled(mx.array([t]), cache=pooled.make_cache()) for t in tokens]  # none evaluated
    for t, logits in zip(tokens, lazy):
        want = resident(mx.array([t]), cache=resident.make_cache())
        np.testing.assert_array_equal(np.array(want.astype(mx.float32)), np.array(logits.astype(mx.float32)))


def test_the_pool_counts_hits_misses_and_bytes(checkpoints):
    model = streamed(checkpoints["hf"], 8)  # 4 layers x 8 experts, 8 slots
    pool, per_expert = model.expert_pool, expert_bytes(model.config)
    slots = pool.fetch(0, mx.array([[0, 1, 2, 3], [3, 2, 1, 0]]))  # two tokens, four experts
    assert (pool.stats.hits, pool.stats.misses, pool.stats.bytes_read) == (0, 4, 4 * per_expert)
    assert pool.stats.tokens == 2
    assert np.array_equal(np.array(slots), pool.slot_of[0][[[0, 1, 2, 3], [3, 2, 1, 0]]])
    pool.fetch(0, mx.array([[3, 2, 1, 0]]))
    assert (pool.stats.hits, pool.stats.misses, pool.stats.tokens) == (4, 4, 3)
    earlier = replace(pool.stats)
    pool.fetch(1, mx.array([[4, 5, 6, 7]]))  # the four free slots
    pool.fetch(2, mx.array([[0, 1, 2, 3]]))  # evicts four
    assert (pool.stats.hits, pool.stats.misses, pool.stats.bytes_read) == (4, 12, 12 * per_expert)
    assert (pool.slot_of >= 0).sum() == 8 and (pool.slot_of[2, :4] >= 0).all()
    assert "hit rate 25.0%" in pool.stats.summary()
    # a tiny model's experts are a few KB: the bytes per token in KB, not "0 MB"
    assert f"{pool.stats.bytes_per_token / 1e3:.0f} KB read per token" in pool.stats.summary()
    recent = pool.stats.since(earlier)  # what one request did
    assert (recent.tokens, recent.hits, recent.misses, recent.bytes_read) == (0, 0, 8, 8 * per_expert)
    assert recent.hit_rate == 0.0 and recent.read_s > 0


@pytest.mark.parametrize("transfer", ["host", "cuda"])
def test_a_checkpoint_cut_short_while_streaming_is_an_error_naming_it(checkpoints, tmp_path, monkeypatch, transfer):
    """Reading an expert past the end of a file truncated after loading would kill the process
    (SIGBUS from the mapping; the cuda stand-in reads the source when a copy is queued): it is a
    CheckpointError naming the file instead."""
    import shutil

    from gptoss_mlx import expert_pool

    monkeypatch.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: QueuedCopies(pins=False)))
    directory = tmp_path / "cut"
    shutil.copytree(checkpoints["hf"], directory)
    model = streamed(directory, 8, transfer=transfer)
    assert model.expert_pool.transfer == transfer
    engine = Engine(model)
    list(engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2), stop_tokens=frozenset()))
    for shard in directory.glob("*.safetensors"):
        with open(shard, "r+b") as f:
            f.truncate(1000)
    with pytest.raises(CheckpointError, match=r"safetensors: the file was cut to 1000 bytes"):
        list(engine.generate(PROMPT[::-1], SamplingParams(temperature=0, max_tokens=4), stop_tokens=frozenset()))


def test_a_read_ahead_that_fails_is_an_error_and_the_next_turn_reads_those_experts_again(checkpoints):
    """The worker thread's copy of a guessed expert fails (a file cut short, then restored): the
    error reaches the caller at the next layer, the slots it was filling count as empty, and the
    model then computes exactly what the resident model does."""
    import threading

    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    pool = pooled.expert_pool
    real_read, failures = pool._copy, []

    def flaky_read(address, layer, name, expert):  # the host transfer's read of one tensor
        if threading.current_thread() is not threading.main_thread() and not failures:
            failures.append((layer, expert))
            raise CheckpointError("the file was cut (simulated)")
        return real_read(address, layer, name, expert)

    pool._copy = flaky_read
    pooled(mx.array([PROMPT[:20]]), cache=pooled.make_cache())
    with pytest.raises(CheckpointError, match="simulated"):
        pooled(mx.array([[5]]), cache=pooled.make_cache())
    layer, expert = failures[0]
    assert pool.slot_of[layer, expert] == -1 and not pool._pending
    caches = resident.make_cache(), pooled.make_cache()  # the failed pass's cache is not kept
    for chunk in [PROMPT[:20], [5], [77], [301], [12]]:
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_expert_biases_stored_in_another_dtype_in_one_layer_are_cast_not_copied(checkpoints, tmp_path, dtype):
    """A checkpoint whose layer 1 keeps its expert biases in another dtype than layer 0's: the
    pool cannot copy those bytes as they are (a float32 row is twice a bf16 slot's), so it casts
    them through MLX, and the logits equal the resident model's."""
    import shutil

    directory = tmp_path / "mixed"
    shutil.copytree(checkpoints["hf"], directory)
    (shard,) = directory.glob("*.safetensors")
    tensors = mx.load(str(shard))
    for name in tensors:
        if name.startswith("model.layers.1.mlp.experts.") and name.endswith("_bias"):
            tensors[name] = tensors[name].astype(dtype)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})
    resident, pooled = load_model(directory), streamed(directory, 8)
    assert pooled.expert_pool.transfer == "mlx"
    caches = resident.make_cache(), pooled.make_cache()
    for chunk in [PROMPT[:20], [5], [77], [301]]:
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_after_a_pass_that_failed_part_way_the_engine_goes_on_exactly(checkpoints, when):
    """A streamed expert's read fails in the middle of a pass (prefill: a demand read; decode:
    a read ahead on the worker thread): the first layers have taken the tokens, the others not.
    The engine's cache goes back to its last snapshot (the end of the prompt's prefill), so the
    next turn reuses what came before it and makes the resident model's tokens."""
    import threading

    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    pool = pooled.expert_pool
    real_read, armed = pool._copy, []

    def flaky_read(address, layer, name, expert):  # the host transfer's read of one tensor
        ahead = threading.current_thread().name.startswith("expert-reads")  # the pool's worker
        if armed and layer == 2 and ahead == (when == "decode"):
            armed.clear()
            raise CheckpointError("the file was cut (simulated)")
        return real_read(address, layer, name, expert)

    pool._copy = flaky_read
    engines = [Engine(m, max_context=512, prefill_step=16) for m in (resident, pooled)]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    tokens = iter(engines[1].generate(list(PROMPT), greedy, stop_tokens=()))
    if when == "decode":
        made = [next(tokens), next(tokens)]
    armed.append(True)
    with pytest.raises(CheckpointError, match="simulated"):
        made = list(tokens) if when == "decode" else list(engines[1].generate(PROMPT[::-1], greedy, stop_tokens=()))
    pc = engines[1].prompt_cache
    assert {c.offset for c in pc.cache} == {len(pc.tokens)}
    history = list(PROMPT) + [7, 400, 3]
    assert [list(e.generate(history, greedy, stop_tokens=())) for e in engines][1] == \
        list(engines[0].generate(history, greedy, stop_tokens=()))
    # decode: the prompt stayed cached; prefill: the pass failed in its first prompt
    assert engines[1].stats.reused_tokens == (len(PROMPT) if when == "decode" else 0)


def test_the_pool_holds_the_checkpoint_bytes_of_each_expert(checkpoints):
    resident, model = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    slots = np.array(model.expert_pool.fetch(3, mx.array([[6, 1, 4, 2]])))[0]
    for proj in ("gate_up_proj", "down_proj"):
        mine, theirs = getattr(model.expert_pool.experts, proj), getattr(resident.layers[3].mlp.experts, proj)
        for name in ("weight", "scales", "bias"):
            for expert, slot in zip((6, 1, 4, 2), slots):
                assert mx.array_equal(mine[name][int(slot)], theirs[name][expert]).item(), (proj, name)


@pytest.mark.parametrize("policy, half_life, kept", [
    ("lru", None, 2), ("lfu", None, 4), ("decay", 1.0, 2), ("decay", 100.0, 4)])
def test_eviction_policies_keep_what_they_should(models, policy, half_life, kept):
    """Layer 0's experts 0-3 used in 4 tokens, then 4-7 in the 2 tokens after (the pool is full);
    then layer 1 needs 2 slots: recency evicts two of 0-3, frequency two of 4-7."""
    from gptoss_mlx.expert_pool import ExpertPool

    pool = models[1].expert_pool
    pool = ExpertPool(pool.config, pool.source, 8, policy=policy, half_life=half_life or 1.0)
    for _ in range(4):
        pool.fetch(0, mx.array([[0, 1, 2, 3]]))
    for _ in range(2):
        pool.fetch(0, mx.array([[4, 5, 6, 7]]))
    pool.fetch(1, mx.array([[0, 1]]))
    assert (pool.slot_of[0, :4] >= 0).sum() == kept
    assert (pool.slot_of[0, 4:] >= 0).sum() == 6 - kept


def test_a_pool_smaller_than_one_layer_is_refused(models):
    from gptoss_mlx.expert_pool import ExpertPool

    with pytest.raises(ValueError, match="at least one layer's 8 experts, got 7"):
        ExpertPool(models[1].config, models[1].expert_pool.source, 7)


def test_split_expert_checkpoints_cannot_stream_and_say_so(checkpoints):
    with pytest.raises(CheckpointError, match=r"experts can be streamed only from MXFP4 experts .* "
                                              r"needs every expert on the GPU, --memory-limit 1.0\dGB or more "
                                              r"\(from Python: memory_limit=\"1.0\dGB\"\)"):
        streamed(checkpoints["mlx"], 8)


# ---- the plan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("10GB", 10e9), ("8.5G", 8.5e9), ("800MB", 8e8), ("800mb", 8e8),
                                        ("12GiB", 12 * 2**30), ("2", 2e9), (" 1.5 gb ", 1.5e9),
                                        ("1.5GIB", 1.5 * 2**30), ("1.5gib", 1.5 * 2**30)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "10 GBs", "-1GB", "0GB", "1e9", "GB", "10PB", "10iB", "10i",
                                  "\uff11\uff10GB"])  # (fullwidth digits were taken)
def test_bad_sizes_are_one_clear_error(text):
    with pytest.raises(ValueError, match="expected a size such as 10GB|more than 0"):
        parse_size(text)


@pytest.mark.parametrize("text", ["99999999999999999999TB", "1001TB", "2000000GiB"])
def test_a_size_beyond_any_machine_is_refused(text):
    """A tester's 99999999999999999999TB was taken, and the plan printed '... of
    100000000000000008388608.00 GB' (while 1PB was refused: no such unit)."""
    with pytest.raises(ValueError, match=r"is more memory than any machine has \(at most 1000 TB\)"):
        parse_size(text)


@pytest.mark.parametrize("text", ["1073741824", "16384", "1024", " 2048.5 "])
def test_a_count_of_bytes_or_mb_without_its_unit_is_not_read_as_gb(text):
    """A bare number is GB (10 = 10GB); bytes or MB written without their unit would be read
    as thousands of GB, a plan with no limit at all: an error asking for the unit."""
    with pytest.raises(ValueError, match=rf"a size without a unit is in GB, and {text.strip()} GB is more "
                                         rf"memory than a Mac has: give the unit \(e.g. {text.strip()}B"):
        parse_size(text)
    assert parse_size(text.strip() + "B") == float(text)
    assert parse_size("1023") == 1023e9


@pytest.mark.parametrize("limit, example", [(0.5, "'0.5GB'"), (10, "'10GB'"),
                                            # (it suggested '999999GB'; a tester's, helper-140)
                                            (999_999, "'10GB' or '800MB'")])
def test_a_numeric_limit_is_bytes_and_a_tiny_one_asks_for_the_unit(limit, example):
    from gptoss_mlx.memory import resolve_limit

    with pytest.raises(ValueError, match=rf"memory_limit={limit} is in bytes, less than any model needs: "
                                         rf"give a size with its unit, such as {example}$"):
        resolve_limit(limit)
    assert resolve_limit(12_000_000_000) == (12e9, "memory_limit")


@given(st.text(max_size=12))
def test_any_text_is_a_size_or_one_clear_error(text):
    try:
        assert parse_size(text) > 0
    except ValueError as e:
        assert "size" in str(e)


def test_a_bad_simulated_device_is_one_clear_line(monkeypatch):
    proc = run("doctor", env={DEVICE_MEMORY_ENV: "lots"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"gptoss-mlx: error: {DEVICE_MEMORY_ENV}: expected a size such "
                                   "as 10GB, 8.5G or 800MB, got 'lots'")


@pytest.mark.parametrize("limit, arrangement", [
    (16e9, "everything resident, dense layers bf16"),
    (14e9, "everything resident, dense layers 8-bit"),
    (13.5e9, "everything resident, dense layers 4-bit"),
    (10e9, "experts streamed (520 of 768 on the GPU, 68%), dense layers 4-bit"),
    (6e9, "experts streamed (218 of 768 on the GPU, 28%), dense layers 4-bit"),
])
def test_the_plan_takes_the_first_arrangement_that_fits(limit, arrangement):
    p = choose_plan(GPT_OSS_20B, 32768, limit=limit)
    assert p.arrangement == arrangement and p.total <= limit


def test_dense_bits_fix_the_precision_and_leave_the_rest_to_the_plan():
    p = choose_plan(GPT_OSS_20B, 32768, 16, "10GB")
    q = choose_plan(GPT_OSS_20B, 32768, 8, "10GB")
    assert (p.dense_bits, q.dense_bits) == (16, 8) and p.streamed and q.streamed
    assert p.expert_slots < q.expert_slots < choose_plan(GPT_OSS_20B, 32768, 4, "10GB").expert_slots
    assert not choose_plan(GPT_OSS_20B, 32768, 16, "16GB").streamed


def test_120b_streams_inside_a_64gb_macs_working_set():
    p = choose_plan(GPT_OSS_120B, 32768, limit=48e9)
    assert p.streamed and p.total <= 48e9 and p.expert_slots > 0.7 * p.total_experts


def test_too_small_a_limit_names_the_smallest_that_works():
    with pytest.raises(MemoryPlanError) as e:
        choose_plan(GPT_OSS_20B, 32768, limit="3GB")
    message = str(e.value)
    assert "will not fit in 3.00 GB (memory_limit)" in message
    assert ("The smallest limit that works is 3.53 GB: pass --memory-limit 3.53GB or more (from Python: "
            "memory_limit=\"3.53GB\"), or a shorter --max-context (4096 fits) (from Python: max_context=4096)") in message
    assert cli_wording(message).endswith("pass --memory-limit 3.53GB or more, or a shorter --max-context (4096 fits)")
    smallest = choose_plan(GPT_OSS_20B, 32768, limit=e.value.smallest_limit)
    assert smallest.streamed and smallest.expert_slots >= GPT_OSS_20B.num_local_experts
    with pytest.raises(MemoryPlanError):  # rounded up to 10 MB, no more
        choose_plan(GPT_OSS_20B, 32768, limit=e.value.smallest_limit - 0.01 * GB)
    just_under = e.value.smallest_limit - 0.004 * GB
    with pytest.raises(MemoryPlanError) as e:  # it read "will not fit in 3.53 GB ... works is 3.53 GB"
        choose_plan(GPT_OSS_20B, 32768, limit=just_under)
    assert "will not fit in 3.52 GB (memory_limit)" in str(e.value) and "works is 3.53 GB" in str(e.value)


def test_a_too_small_device_limit_names_the_variable_that_set_it(monkeypatch):
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "2GB")
    with pytest.raises(MemoryPlanError, match=f"will not fit in 2.00 GB \\(simulated by {DEVICE_MEMORY_ENV}\\).* "
                                              f"set {DEVICE_MEMORY_ENV} to 3.53GB or more, or unset it"):
        choose_plan(GPT_OSS_20B, 32768)


@pytest.mark.parametrize("limit", [float("nan"), float("-inf"), 0, -1, True, "0GB", [10]])
def test_a_library_memory_limit_that_is_no_size_is_refused_by_name(tiny_checkpoint, limit):
    with pytest.raises(ValueError, match="memory_limit must be|a memory size must be more than 0"):
        load(tiny_checkpoint, memory_limit=limit)


@pytest.mark.parametrize("kw", [{"dense_bits": 8.0}, {"dense_bits": 5}, {"max_context": -5}, {"max_context": 0},
                                {"max_context": 2.5}])
def test_load_refuses_bad_arguments_by_name(tiny_checkpoint, kw):
    with pytest.raises(ValueError, match=f"{next(iter(kw))} must be"):
        load(tiny_checkpoint, **kw)


def test_sizes_read_as_a_person_means_them():
    assert parse_size("12000000000B") == 12e9 and parse_size("800 b") == 800  # B alone: bytes
    assert parse_size("10") == 10e9 and parse_size("10gb") == 10e9 and parse_size("2GiB") == 2**31


def test_the_device_limit_can_be_simulated(monkeypatch):
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "10.7GB")
    assert device_limit() == (10.7e9, f"simulated by {DEVICE_MEMORY_ENV}")
    assert choose_plan(GPT_OSS_20B, 32768).streamed


def run(*argv, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "gptoss_mlx", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_doctor_with_a_tiny_simulated_device_says_nothing_fits():
    proc = run("doctor", env={DEVICE_MEMORY_ENV: "1KB"})  # a traceback once (read as bytes)
    assert proc.returncode == 0, proc.stderr
    assert "Memory the model may use: 1 KB" in proc.stdout and "does not fit (needs at least" in proc.stdout


def test_doctor_shows_the_plans_of_a_simulated_16gb_mac():
    proc = run("doctor", env={DEVICE_MEMORY_ENV: "10.7GB"})
    assert proc.returncode == 0, proc.stderr
    assert f"Memory the model may use: 10.70 GB (simulated by {DEVICE_MEMORY_ENV})" in proc.stdout  # as plans say it
    assert "gpt-oss-20b       32768  experts streamed (573 of 768 on the GPU, 75%), dense layers 4-bit, 10.7 GB\n" in proc.stdout
    # 120b's experts off the GPU (~55 GB) are more than a 16 GB Mac's page cache keeps: said so
    assert "gpt-oss-120b      32768  experts streamed (463 of 4608 on the GPU, 10%), dense layers 4-bit, 10.7 GB *" in proc.stdout
    assert "most tokens wait on the disk" in proc.stdout
    assert "(about 5.3 GB of RAM): most tokens wait on the disk" in proc.stdout


def test_doctor_where_the_limit_is_all_of_ram(monkeypatch, capsys):
    """On a machine whose model memory is its RAM (a CPU), the page cache's room read "about 0
    bytes of RAM"."""
    from gptoss_mlx.cli import doctor, main

    monkeypatch.setattr(doctor, "device_limit", lambda: (24e9, "system RAM"))
    monkeypatch.setattr(doctor, "system_ram", lambda: 24e9)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "(no RAM: the limit is all of it): most tokens wait on the disk" in out and "0 bytes" not in out


def test_cli_memory_limit_streams_or_refuses_in_one_line(tiny_checkpoint):
    proc = run("generate", "--model", str(tiny_checkpoint), "--memory-limit", "1GB", "-p", "hi",
               "--max-tokens", "3", "--temperature", "0")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert "will not fit in 1.00 GB (--memory-limit)" in line and line.endswith("--memory-limit 1.03GB or more")
    proc = run("generate", "--model", str(tiny_checkpoint), "--memory-limit", "lots", "-p", "hi")
    assert proc.returncode == 2 and "expected a size such as 10GB" in proc.stderr
    # a size with its unit, however small, is that size (not a count of bytes missing its unit)
    proc = run("generate", "--model", str(tiny_checkpoint), "--memory-limit", "1KB", "-p", "hi")
    assert proc.returncode == 2 and "will not fit in 1 KB (--memory-limit)" in proc.stderr
    assert "memory_limit" not in proc.stderr and "--memory-limit 1.03GB or more" in proc.stderr


def test_what_the_plan_counts_is_what_loads_and_a_dropped_limit_is_refused(tiny_checkpoint, tmp_path):
    """A tester's (helper-131): a "quantization" in the config.json of an unquantized checkpoint
    made the plan count 8-bit dense layers the model then held in bf16 (and refused --dense-bits
    for them); --no-memory-check dropped a --memory-limit without a word; a link loop given as
    --model was "no such directory"."""
    copy = tmp_path / "q"
    shutil.copytree(tiny_checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": 8}}))
    with pytest.raises(CheckpointError, match="its quantization says the dense layers are stored 8-bit, but "
                                              r"the weights hold them unquantized \(no .scales tensors\)"):
        load(copy)
    proc = run("generate", "--model", str(tiny_checkpoint), "--no-memory-check", "--memory-limit", "1GB", "-p", "hi")
    assert proc.returncode == 2 and "not allowed with argument --no-memory-check" in proc.stderr
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    proc = run("generate", "--model", str(tmp_path / "loop"), "-p", "hi")
    assert proc.returncode == 2 and "is a symbolic link loop" in proc.stderr


def test_the_plan_counts_a_sliding_layers_ring_as_it_is_allocated(tiny_checkpoint):
    """A tester's (helper-131): a sliding window longer than the context was counted at the
    context's length, while each sliding layer's ring holds its whole window."""
    config = read_config(tiny_checkpoint).replace(sliding_window=4096)
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    sliding = sum(config.sliding_layers)
    full = len(config.sliding_layers) - sliding
    assert kv_cache_bytes(config, 1000) == per_token * (4096 * sliding + 1000 * full)


def test_a_library_limit_that_is_no_size_names_memory_limit(tiny_checkpoint):
    for text in ("abc", ""):
        with pytest.raises(ValueError, match="memory_limit: expected a size such as 10GB"):
            load(tiny_checkpoint, memory_limit=text)


@pytest.mark.parametrize("transfer", ["host", "mlx"])
def test_reading_experts_writes_into_the_pool_in_place(tmp_path, transfer):
    """The pool's buffers are updated in place: filling slots never holds a second copy of the
    pool, neither alone nor inside the engine's asynchronous decode loop (where a prefill chunk
    adds one layer's experts in expert order, a third of this pool: ExpertPool.view)."""
    from gptoss_mlx.testing import checkpoints as mtc

    config = mtc.TINY.replace(vocab_size=512, hidden_size=256, intermediate_size=256,
                              num_hidden_layers=4, layer_types=(), num_local_experts=8)
    mtc.write_hf(tmp_path / "m", config)
    model = streamed(tmp_path / "m", 24, transfer=transfer)  # 4 layers x 8 experts
    pool = model.expert_pool
    pool_bytes = 24 * expert_bytes(config)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    pool.fetch(0, mx.array([list(range(4)), list(range(4, 8))]))  # 8 experts staged, then written
    pool.fetch(1, mx.array([list(range(8))]))
    assert pool.stats.misses == 16
    assert mx.get_peak_memory() - before < pool_bytes / 2
    engine = Engine(model, max_context=256, prefill_step=16)
    list(engine.generate(PROMPT[:40], SamplingParams(temperature=0, max_tokens=12), stop_tokens=()))
    view = 8 * expert_bytes(config)
    assert pool.stats.misses > 40 and engine.stats.peak_memory_gb * 1e9 - before < pool_bytes / 2 + view


def test_load_plans_by_memory_limit(tiny_checkpoint):
    from gptoss_mlx import load

    config = read_config(tiny_checkpoint)
    limit = plan(config, 4096, 4, 1e12, expert_slots=12).total
    model, _ = load(tiny_checkpoint, memory_limit=limit, max_context=4096)
    assert model.expert_pool.slots == 12
    assert type(model.layers[0].self_attn.qkv_proj).__name__ == "QuantizedLinear"  # dense 4-bit
    # ... but the router stays the checkpoint's bf16: it picks the experts (and the plan counts it so)
    router = model.layers[0].mlp.router
    assert type(router).__name__ == "Linear" and router.weight.dtype == mx.bfloat16
    model, _ = load(tiny_checkpoint, memory_limit="100GB")
    assert model.expert_pool is None and model.layers[0].self_attn.qkv_proj.weight.dtype == mx.bfloat16
    with pytest.raises(MemoryPlanError, match="smallest limit that works is 1.03 GB"):
        load(tiny_checkpoint, memory_limit="0.5GB")
    with pytest.raises(MemoryPlanError, match="will not fit in 50 MB .* one layer's 8 experts 82 KB"):
        load(tiny_checkpoint, memory_limit="50MB")  # small sizes in the units a person reads


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["lru", "lfu", "decay"]), st.integers(8, 31), st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.lists(st.integers(0, 7), min_size=4, max_size=4,
                                                    unique=True), min_size=1, max_size=5)),
    min_size=1, max_size=12))
def test_any_sequence_of_steps_keeps_the_pool_consistent(models, policy, slots, steps):
    """Whatever the routing, after each step every expert it needs holds that expert's bytes in
    the slot it was given, the bookkeeping agrees both ways, and each miss read one expert."""
    from gptoss_mlx.expert_pool import ExpertPool

    resident, streamed_model = models
    pool = ExpertPool(resident.config, streamed_model.expert_pool.source, slots, policy=policy)
    for layer, routing in steps:
        got = np.array(pool.fetch(layer, mx.array(routing)))
        theirs = resident.layers[layer].mlp.experts.down_proj
        for expert, slot in zip(np.array(routing).ravel(), got.ravel()):
            assert pool.owner[slot] == layer * 8 + expert and pool.slot_of[layer, expert] == slot
            assert mx.array_equal(pool.experts.down_proj.weight[int(slot)], theirs.weight[int(expert)]).item()
        held = np.flatnonzero(pool.owner >= 0)
        assert len(held) <= slots and len(np.unique(pool.owner[held])) == len(held)
        assert all(pool.slot_of[o // 8, o % 8] == s for s, o in zip(held, pool.owner[held]))
        assert (pool.slot_of >= 0).sum() == len(held)
    assert pool.stats.bytes_read == pool.stats.misses * expert_bytes(resident.config)


def test_chat_stats_show_the_pools_reads(tiny_checkpoint, tmp_path):
    """A streamed model's /stats in `gptoss-mlx chat` says what the expert pool read."""
    import io

    from gptoss_mlx.chat import Chat
    from gptoss_mlx.cli.chat import Repl
    from gptoss_mlx.store import ConversationStore
    from gptoss_mlx.tokenizer import load_tokenizer

    chat = Chat(streamed(tiny_checkpoint, 8), load_tokenizer(tiny_checkpoint / "tokenizer.json"),
                sampling=SamplingParams(temperature=0, max_tokens=6))
    lines, out = iter(["hello", "/stats", "/exit"]), io.StringIO()
    assert Repl(chat, ConversationStore(tmp_path), lambda prompt="": next(lines), out=out).run() == 0
    assert "prompt tokens" in out.getvalue() and "experts: hit rate" in out.getvalue(), out.getvalue()


def test_a_chat_takes_its_message_back_when_the_checkpoint_fails_under_it(tiny_checkpoint, tmp_path):
    """The checkpoint is cut while a streamed chat runs, then restored: the turn that failed
    leaves no trace in the history; the next turn says the file was written to (its bytes are
    not known to be the ones loaded: a tester's change between the sampled runs of the old
    check went on with other logits), and the chat goes on once the model is loaded again."""
    import shutil

    from gptoss_mlx.chat import Chat
    from gptoss_mlx.tokenizer import load_tokenizer

    directory = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint, directory)
    (shard,) = directory.glob("*.safetensors")
    original = shard.read_bytes()
    chat = Chat(streamed(directory, 8), load_tokenizer(directory / "tokenizer.json"),
                sampling=SamplingParams(temperature=0, max_tokens=6))
    list(chat.send("Hello there"))
    before = list(chat.messages)
    with open(shard, "r+b") as f:
        f.truncate(len(original) // 2)
    with pytest.raises(CheckpointError, match="the file was cut"):
        list(chat.send("Second question"))
    assert chat.messages == before
    shard.write_bytes(original)
    with pytest.raises(CheckpointError, match=CHANGED):
        list(chat.send("Second question"))
    assert chat.messages == before
    chat.engine = Engine(streamed(directory, 8))
    list(chat.send("Second question"))
    assert [m.role for m in chat.messages[len(before):]][:2] == ["user", "assistant"]


def test_a_model_that_routes_each_token_to_one_expert_runs_resident_and_streamed(tmp_path):
    """num_experts_per_tok = 1 (a config of one's own): MLX's shapeless compile crashed the
    process on the experts' weighted sum over one expert; now both arrangements run, equal."""
    from gptoss_mlx.testing import checkpoints as mtc

    config = mtc.TINY.replace(vocab_size=512, num_local_experts=8, num_experts_per_tok=1)
    mtc.write_hf(tmp_path / "m", config, seed=3)
    resident, pooled = load_model(tmp_path / "m"), streamed(tmp_path / "m", 8)
    caches = resident.make_cache(), pooled.make_cache()
    for chunk in [PROMPT[:20], [5], [77]]:
        a, b = (m(mx.array([chunk]), cache=c) for m, c in zip((resident, pooled), caches))
        assert mx.isfinite(a).all().item()
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


def test_a_prefill_chunk_copies_one_projection_of_the_layer_at_a_time(tmp_path):
    """Through MLX's sorted gather a streamed layer computes on a copy of its experts in expert
    order (ExpertPool.view): the down projections are copied only after the gate/up copy is
    freed, so the copy costs at most the plan's view_bytes above the resident layer's own
    computation (both copies at once were 1.5 times that), and the outputs are the same."""
    from gptoss_mlx.testing import checkpoints as mtc

    config = mtc.TINY.replace(vocab_size=512, hidden_size=512, intermediate_size=512,
                              num_hidden_layers=2, layer_types=(), num_local_experts=8)
    mtc.write_hf(tmp_path / "m", config)
    resident = load_model(tmp_path / "m").layers[0].mlp.experts
    pool = streamed(tmp_path / "m", 12).expert_pool
    T, k = 64, 4  # 256 rows: the sorted gather
    indices = mx.array([[(3 * t + 2 * j) % 8 for j in range(k)] for t in range(T)]).astype(mx.uint32)
    x = mx.random.normal((T, 512), key=mx.random.key(0)).astype(mx.bfloat16)
    pool.fetch(0, indices)
    mx.eval(x, indices)

    def peak(run):
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        y = run()
        mx.eval(y)
        return y, mx.get_peak_memory() - before

    expected, resident_peak = peak(lambda: resident(x, indices))
    got, view_peak = peak(lambda: pool.view(0)(x, indices))
    assert mx.array_equal(got, expected).item()
    assert view_peak - resident_peak <= 1.05 * view_bytes(config)


def test_an_expert_id_past_the_last_is_one_clear_error_and_a_guess_past_it_is_dropped(checkpoints):
    """Ids of E or more (a top-k over NaN logits once gave E) named in one error, not an
    IndexError from the pool's tables; the same in a guess is only a hint, dropped."""
    model = streamed(checkpoints["hf"], 8)  # 4 layers x 8 experts, 8 slots
    pool = model.expert_pool
    with pytest.raises(ValueError, match="routed a token to expert 8 of 8: its activations are not finite"):
        pool.fetch(0, mx.array([[0, 1, 2, 8]]))
    slots = pool.fetch(0, mx.array([[0, 1, 2, 3]]), guess=mx.array([[8, 9, 4, 5]]))
    assert np.array_equal(np.array(slots), pool.slot_of[0][[[0, 1, 2, 3]]])
    pool.read_ahead()
    pool._wait_for_copies()
    assert (pool.slot_of[1, [4, 5]] >= 0).all()  # the guesses that exist were read ahead


@pytest.mark.parametrize("tensor,value", [("model.layers.1.mlp.experts.down_proj_bias", float("nan")),
                                          ("model.layers.2.mlp.experts.gate_up_proj_scales", 255)])
def test_a_corrupt_expert_is_refused_at_load_when_streamed_as_when_resident(checkpoints, tmp_path, tensor, value):
    """NaN biases and E8M0 scale 255 in experts that stream: one error naming file and tensor at
    load, as the resident load gives (its check samples only what is resident), not NaN logits
    later that name nothing."""
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hf"], directory, ignore=shutil.ignore_patterns("original"))
    file = next(f for f in sorted(directory.glob("*.safetensors")) if tensor in mx.load(str(f)))
    tensors = mx.load(str(file))
    flat = tensors[tensor].reshape(-1)
    flat = mx.concatenate([flat[:5], mx.full((1,), value, flat.dtype), flat[6:]])  # expert 0, one value
    tensors[tensor] = flat.reshape(tensors[tensor].shape)
    mx.save_safetensors(str(file), tensors, metadata={"format": "pt"})
    message = f"{file}: tensor {tensor} holds NaN or infinite values; the checkpoint is corrupt"
    with pytest.raises(CheckpointError) as resident:
        load_model(directory)
    with pytest.raises(CheckpointError) as streaming:
        streamed(directory, 8)
    assert str(resident.value) == str(streaming.value) == message


def test_experts_damaged_after_a_streamed_load_are_an_error_naming_where_they_are_read(checkpoints, tmp_path):
    """Files rewritten in place after loading (same size and inode, as `cp` over them does)
    would feed new experts to the layers loaded from the old ones: the next read names the file
    instead. Where the rewrite kept its modification time, the bytes are read as they are now:
    NaN biases give NaN logits, and that error says the experts are read from that directory as
    the model runs, where a resident model's could only blame its weights."""
    from gptoss_mlx.generate import NonFiniteLogitsError

    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hf"], directory, ignore=shutil.ignore_patterns("original"))
    model = streamed(directory, 8)
    engine = Engine(model)
    greedy = SamplingParams(temperature=0, max_tokens=2)
    list(engine.generate(PROMPT, greedy, stop_tokens=frozenset()))
    stamps = {}
    for (layer, name), t in model.expert_pool.source.tensors.items():
        if name.endswith(".bias"):  # every expert's, in place: bf16 NaN
            stamps.setdefault(t.file, os.stat(t.file))
            n = model.config.num_local_experts * t.expert_bytes
            with open(t.file, "r+b") as f:
                f.seek(t.offset)
                f.write(b"\xc0\x7f" * (n // 2))
    for file, stat in stamps.items():
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(CheckpointError, match="model.safetensors: " + CHANGED + ", .* restore the checkpoint and load it again"):
        list(engine.generate(PROMPT[::-1], greedy, stop_tokens=frozenset()))
    for file, stat in stamps.items():  # a rewrite that kept the time: the bytes as they are now
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(NonFiniteLogitsError) as error:
        list(engine.generate(PROMPT[::-1], greedy, stop_tokens=frozenset()))
    assert str(error.value).endswith(f"its experts are read from {directory} while it runs: if those files "
                                     "changed after it was loaded, load it again")


SHARD_CHANGED_MID_COPY = """
import os, sys
from pathlib import Path
from gptoss_mlx.generate import Engine, SamplingParams
from gptoss_mlx.loading import CheckpointError, load_model, read_config
from gptoss_mlx.memory import plan

directory, prompt = Path(sys.argv[1]), list(range(1, 40))
model = load_model(directory, memory_plan=plan(read_config(directory), 64, 16, 1e12, expert_slots=8))
engine, greedy = Engine(model), SamplingParams(temperature=0, max_tokens=2)
list(engine.generate(prompt, greedy, stop_tokens=frozenset()))
source = model.expert_pool.source
first, second = (source.tensors[layer, "gate_up_proj.weight"].file for layer in (0, 1))
assert first != second
os.truncate(second, 1000)  # the next file, part-way through its copy
os.utime(first, ns=(0, 10**9))  # copied over again: the same bytes, a new time
for _ in range(2):
    try:
        list(engine.generate(prompt[::-1], greedy, stop_tokens=frozenset()))
    except CheckpointError as e:
        print(e)
    os.utime(first, ns=(0, source._stamps[first][0]))  # (its time set back: the cut one is seen)
"""


def test_a_sharded_checkpoint_changed_part_way_through_a_copy_is_an_error_not_sigbus(tmp_path):
    """`cp fresh/* ck/` part-way: one shard copied again (same bytes, new time) and the next cut
    short. Checking the first for a rewrite read the sample of every file through its mapping,
    the cut one too, and the process died of SIGBUS (a server: exit 135, no word in its log).
    Each is said as what happened to it. (In a process of its own: SIGBUS would end the test run.)"""
    from gptoss_mlx.testing import checkpoints as mtc

    directory = tmp_path / "sharded"
    mtc.write_hf(directory, mtc.TINY.replace(vocab_size=512), seed=1, shard_bytes=1)  # a shard per layer
    proc = subprocess.run([sys.executable, "-c", SHARD_CHANGED_MID_COPY, str(directory)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    first, second = proc.stdout.splitlines()
    assert re.search("safetensors: " + CHANGED, first), first
    assert "safetensors: the file was cut to 1000 bytes after the model was loaded" in second


def test_expert_weights_written_to_in_place_are_an_error_until_the_model_is_loaded_again(checkpoints, tmp_path):
    """The rewrite check sampled only biases and scales: the packed weights (*_blocks) rewritten
    in place, same size, went on silently with other tokens than the resident model's; then a
    sample of them was compared, and a change between its runs went on (a tester's: logits 0.2
    to 1.3 off, helper-140). Any write is an error, the same bytes written back too (nothing tells
    them from others without reading them all); loaded again, the model is exact."""
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hf"], directory, ignore=shutil.ignore_patterns("original"))
    resident, model = load_model(directory), streamed(directory, 8)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    want = list(Engine(resident).generate(PROMPT, greedy, stop_tokens=frozenset()))
    engine = Engine(model)
    assert list(engine.generate(PROMPT, greedy, stop_tokens=frozenset())) == want
    saved = {}
    for (layer, name), t in model.expert_pool.source.tensors.items():
        if name.endswith(".weight"):  # every expert's packed weights, in place
            n = model.config.num_local_experts * t.expert_bytes
            with open(t.file, "r+b") as f:
                f.seek(t.offset)
                saved[t.file, t.offset] = f.read(n)
                f.seek(t.offset)
                f.write(np.random.default_rng(layer).integers(0, 256, n, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="model.safetensors: " + CHANGED):
        list(engine.generate(PROMPT[::-1], greedy, stop_tokens=frozenset()))
    for (file, offset), data in saved.items():
        with open(file, "r+b") as f:
            f.seek(offset)
            f.write(data)
    with pytest.raises(CheckpointError, match=CHANGED):
        list(Engine(model).generate(PROMPT, greedy, stop_tokens=frozenset()))
    assert list(Engine(streamed(directory, 8)).generate(PROMPT, greedy, stop_tokens=frozenset())) == want
    # one byte between where the old check sampled, its time set on
    (layer, name), t = next((k, t) for k, t in model.expert_pool.source.tensors.items() if k[1].endswith(".weight"))
    model = streamed(directory, 8)
    engine = Engine(model)
    assert list(engine.generate(PROMPT, greedy, stop_tokens=frozenset())) == want
    with open(t.file, "r+b") as f:
        f.seek(t.offset + 1500)
        byte = f.read(1)
        f.seek(t.offset + 1500)
        f.write(bytes([byte[0] ^ 0x77]))
    os.utime(t.file, ns=(0, os.stat(t.file).st_mtime_ns + 1))
    with pytest.raises(CheckpointError, match=CHANGED):
        list(engine.generate(PROMPT[::-1], greedy, stop_tokens=frozenset()))


@pytest.mark.parametrize("dtype,bits", [(mx.bfloat16, 16), (mx.float32, 16), (mx.float32, 4), (mx.bfloat16, 4)])
def test_the_plan_counts_the_dense_layers_at_the_models_own_width(checkpoints, dtype, bits):
    """A float32 model's dense layers (and their quantization's scales and biases) take twice a
    bfloat16 one's bytes: the plan counted bf16 for both, so a float32 load could pass a limit
    it then overran. Planned against what the loaded model holds (the norms are float32 in the
    model, counted so; the plan is within 2%)."""
    model = load_model(checkpoints["hf"], dtype, dense_bits=None if bits == 16 else bits)
    held = sum(v.nbytes for k, v in nn.utils.tree_flatten(model.parameters()) if ".experts." not in k)
    planned = dense_bytes(model.config, bits, dtype.size)
    assert abs(planned - held) <= 0.02 * held, (planned, held)


def test_serve_plans_its_sequences_and_prompt_caches_inside_the_limit(tiny_checkpoint):
    """serve holds --max-concurrency KV caches and saved prompt caches beside the model: its plan
    counts them. Without --prompt-cache-gb the saved caches get 4 GiB where everything stays
    resident, else one conversation's worth (the expert pool keeps the rest)."""
    from gptoss_mlx.cli import build_parser
    from gptoss_mlx.cli.common import CLIError, prepare

    config = read_config(tiny_checkpoint)
    kv = kv_cache_bytes(config, 32768)

    def serve_plan(*flags):
        args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint), *flags])
        return prepare(args)[2], args.prompt_cache_bytes

    roomy, cache = serve_plan("--memory-limit", "100GB", "--max-concurrency", "4")
    assert not roomy.streamed and cache == 4e9 and roomy.server == 3 * kv + cache  # GB as --memory-limit's
    assert f"+ server caches {roomy.server / GB:.1f} GB = " in roomy.describe()
    limit = 1.02307 * GB + 4 * kv  # the limit that streams 8 of 32 experts alone, plus 3 + 1 caches
    tight, cache = serve_plan("--memory-limit", f"{limit:.0f}B", "--max-concurrency", "4", "--dense-bits", "4")
    assert tight.streamed and cache == int(kv) and tight.total <= limit and tight.expert_slots == 8
    assert f"+ server caches {4 * kv / 1e6:.0f} MB = " in tight.describe()
    with pytest.raises(CLIError, match=rf"will not fit .* server caches {(3 * kv + 4e9) / GB:.1f} GB.* or fewer "
                                      r"caches: with --max-concurrency 1 --prompt-cache-gb 0 serve fits "
                                      r"\(everything resident, dense layers 4-bit\)$"):
        serve_plan("--memory-limit", f"{limit:.0f}B", "--max-concurrency", "4", "--dense-bits", "4",
                   "--prompt-cache-gb", "4")
    alone = 1.02307 * GB  # one sequence, no saved caches: nothing else to give up
    with pytest.raises(CLIError, match=r"will not fit .* The smallest limit that works is [\d.]+ GB: pass "
                                       r"--memory-limit [\d.]+GB or more$"):
        serve_plan("--memory-limit", f"{alone / 2:.0f}B", "--max-concurrency", "1", "--prompt-cache-gb", "0",
                   "--dense-bits", "4")


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_the_front_ends_load_the_plan_they_print(tiny_checkpoint, command):
    """serve's plan counts its caches; the loader then planned again from the limit alone and
    kept more experts on the GPU than printed (here all of them), over the limit with the
    caches. The plan printed is the one loaded."""
    import io

    from gptoss_mlx.cli import build_parser
    from gptoss_mlx.cli.common import load_chat

    kv = kv_cache_bytes(read_config(tiny_checkpoint), 32768)
    limit = 1.02307 * GB + (4 * kv if command == "serve" else 0)  # 8 of 32 experts, with serve's 4 caches
    flags = ["--memory-limit", f"{limit:.0f}B", "--dense-bits", "4"]
    args = build_parser().parse_args([command, "--model", str(tiny_checkpoint), *flags,
                                      *(["--max-concurrency", "4"] if command == "serve" else ["-p", "hi"])])
    out = io.StringIO()
    model = load_chat(args, out=out).engine.model
    assert "Memory plan: experts streamed (8 of 32 on the GPU" in out.getvalue()
    assert model.expert_pool is not None and model.expert_pool.slots == 8


def test_a_plan_given_to_load_is_applied_as_it_is_and_must_be_this_models(tiny_checkpoint, checkpoints):
    config = read_config(tiny_checkpoint)
    model, _ = load(tiny_checkpoint, memory_plan=plan(config, 4096, 4, 1e12, expert_slots=12), max_context=4096)
    assert model.expert_pool.slots == 12
    with pytest.raises(ValueError, match="give it alone"):
        load(tiny_checkpoint, memory_plan=plan(config, 4096, 4, 1e12, expert_slots=12), memory_limit="10GB")
    with pytest.raises(ValueError, match="made for another model or dtype"):
        load(tiny_checkpoint, dtype="float32", memory_plan=plan(config, 4096, 4, 1e12, expert_slots=12),
             max_context=4096)
    with pytest.raises(ValueError, match="made for another model or dtype"):
        load(tiny_checkpoint, memory_plan=plan(GPT_OSS_20B, 4096, 4, 1e12), max_context=4096)
    # from the re-attack: each of these loaded without a word
    with pytest.raises(ValueError, match="made for another context than max_context=131072"):
        load(tiny_checkpoint, memory_plan=plan(config, 512, 4, 1e12, expert_slots=12), max_context=131072)
    with pytest.raises(ValueError, match="memory_plan does not hold"):
        load(tiny_checkpoint, memory_plan=plan(config, 4096, 4, 1e8, expert_slots=12), max_context=4096)
    with pytest.raises(ValueError, match="memory_plan does not hold"):
        load(tiny_checkpoint, memory_plan=replace(plan(config, 4096, 4, 1e12), expert_slots=1000), max_context=4096)
    with pytest.raises(TypeError, match="memory_plan must be a MemoryPlan"):
        load(tiny_checkpoint, memory_plan={"dense_bits": 4})


def test_a_fused_checkpoint_with_its_expert_adapter_is_planned_resident(tiny_checkpoint, tmp_path):
    """A fused checkpoint that keeps its expert adapter cannot stream: the plan streamed it,
    and the loader then refused the limit the plan had named."""
    import shutil

    fused = tmp_path / "fused"
    shutil.copytree(tiny_checkpoint, fused)
    (fused / "expert_adapter").mkdir()
    with pytest.raises(MemoryPlanError, match=r"is a fused checkpoint whose experts keep their adapter "
                                              r"\(expert_adapter/\).* so every expert must be on the GPU"):
        load(fused, memory_limit="1GB")


@pytest.fixture(scope="module")
def mlx_lm_checkpoint(tokenizer_json, tmp_path_factory):
    """An mlx-lm style conversion (gate and up stored apart: its experts cannot stream) of a tiny
    model with the real tokenizer, and experts enough (24 x 64, 16 MB) that the smallest limit
    with all of them resident is not the streamed one rounded up."""
    from gptoss_mlx.testing import checkpoints as mtc

    root, config = tmp_path_factory.mktemp("mlxlm"), mtc.TINY.replace(num_hidden_layers=24, layer_types=(),
                                                                      num_local_experts=64)
    mtc.write_mlx(root / "mlx", config, mtc.write_hf(root / "hf", config, keep=True))
    mtc.copy_tokenizer(root / "mlx", tokenizer_json)
    return root / "mlx"


def test_a_checkpoint_whose_experts_cannot_stream_names_the_limit_that_loads(mlx_lm_checkpoint):
    """An mlx-lm conversion: "too small" named the smallest *streamed* limit, and that limit
    then failed naming another (every expert resident); its "shorter --max-context" led into
    the same error. One error, naming the limit (and context) with every expert on the GPU;
    those load."""
    config = read_config(mlx_lm_checkpoint)
    with pytest.raises(MemoryPlanError, match=r"will not fit in 1.00 GB \(memory_limit\), and its experts cannot "
                                              r"be streamed from .*model.safetensors .* so every expert must be on "
                                              r"the GPU: .* all 1536 experts") as e:
        load(mlx_lm_checkpoint, memory_limit="1GB")
    model, _ = load(mlx_lm_checkpoint, memory_limit=e.value.smallest_limit)
    assert model.expert_pool is None
    at_4096 = plan(config, 4096, 4, 1e12).total  # resident, 4-bit dense: fits at 4096 tokens, not at 32768
    with pytest.raises(MemoryPlanError, match=r"or a shorter --max-context \(4096 fits\)") as e:
        load(mlx_lm_checkpoint, memory_limit=at_4096)
    assert e.value.smallest_limit > at_4096
    model, _ = load(mlx_lm_checkpoint, memory_limit=at_4096, max_context=4096)
    assert model.expert_pool is None


def test_the_cli_plans_a_checkpoint_that_cannot_stream_with_its_experts_resident(mlx_lm_checkpoint):
    proc = run("generate", "--model", str(mlx_lm_checkpoint), "--memory-limit", "1GB", "-p", "hi")
    assert proc.returncode == 2
    need = proc.stderr.strip().rsplit("--memory-limit ", 1)[1].split("GB")[0]
    proc = run("generate", "--model", str(mlx_lm_checkpoint), "--memory-limit", f"{need}GB", "-p", "hi",
               "--max-tokens", "2", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Memory plan: everything resident" in proc.stderr


def test_an_adapter_that_trains_the_experts_names_the_limit_that_keeps_them_resident(tiny_checkpoint, tmp_path):
    """Its experts' updates would miss streamed experts: the error said so with no number."""
    from gptoss_mlx.lora import LoRAConfig, apply_lora, save_adapter

    base = load_model(tiny_checkpoint)
    adapter = LoRAConfig(rank=2, targets=("experts",))
    apply_lora(base, adapter)
    save_adapter(base, tmp_path / "adapter", adapter)
    with pytest.raises(MemoryPlanError, match=r"the adapter .*adapter trains the experts, which streamed experts do "
                                              r"not reach, so every expert must be on the GPU.* The smallest limit "
                                              r"that works is [\d.]+ GB") as e:
        load(tiny_checkpoint, memory_limit="1GB", adapter=tmp_path / "adapter")
    model, _ = load(tiny_checkpoint, memory_limit=e.value.smallest_limit, adapter=tmp_path / "adapter")
    assert model.expert_pool is None


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e400", "1e30", "lots", "1024"])
def test_a_bad_prompt_cache_size_is_one_line_naming_the_flag(value, capsys):
    from gptoss_mlx.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", "/nonexistent", "--prompt-cache-gb", value])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gptoss-mlx serve: error: argument --prompt-cache-gb: ")
    assert ("from 0 (no saved prompt caches) to under 1024 GB" in err) or ("expected a number of GB" in err)


def test_a_streamed_model_called_from_several_threads_computes_what_the_resident_one_does(checkpoints):
    """A tester's (helper-140): four threads, each with its own cache (MLX's rule: a cache stays
    on its thread), ran one streamed model at once and got other logits than the resident model,
    silently: their passes rewrote each other's slots. One pass at a time, finished first."""
    from concurrent.futures import ThreadPoolExecutor

    resident, pooled = load_model(checkpoints["hf"]), streamed(checkpoints["hf"], 8)
    prompts = [PROMPT[k:k + 5] for k in range(0, 40, 10)]

    def run(model, prompt):
        cache = model.make_cache()
        out = [np.array(model(mx.array([prompt]), cache=cache).astype(mx.float32))]
        for token in prompt[:2]:
            out.append(np.array(model(mx.array([[token]]), cache=cache).astype(mx.float32)))
        return out

    want = [run(resident, p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: run(pooled, p), prompts))
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            np.testing.assert_array_equal(a, b)


def _device_side(waits, layers_words: list, answered: list, computes=None) -> None:
    """What a pass's kernels do with the exchange (HostWaits), layer by layer: export the
    layer's words, then wait for its slots (a layer's routing needs the layer before it), then
    ``computes(layer, ids, slots)`` with them."""
    for layer, words, n in layers_words:
        row, number = waits.host[layer], waits.number(layer)
        row[waits.IDS:waits.IDS + len(words)] = words
        row[waits.ROUTED] = number
        while row[waits.ANSWERED] != number:
            time.sleep(0)
        answered.append(row[waits.SLOTS:waits.SLOTS + n].copy())
        if computes is not None:
            computes(layer, words[:n], answered[-1])


class StreamOfCopies:
    """A stand-in for the CUDA driver whose copies and writes land one by one, in order, on a
    thread of its own (as a stream's DMA does while the host goes on), each a little late;
    ``finish`` waits for all of them and is counted."""

    def __init__(self):
        import queue
        import threading

        self.ops, self.finishes = queue.Queue(), 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            dst, data = self.ops.get()
            time.sleep(0.002)
            ctypes.memmove(dst, data, len(data))
            self.ops.task_done()

    addresses = staticmethod(QueuedCopies.addresses)

    def copy(self, dst, src, n):
        self.ops.put((dst, ctypes.string_at(src, n)))

    def write(self, address, value):
        self.ops.put((address, np.uint32(value).tobytes()))

    def finish(self):
        self.finishes += 1
        self.ops.join()

    def use_here(self):
        pass

    def mapped(self, nbytes):
        view = np.zeros(nbytes, dtype=np.uint8)
        return view, view.ctypes.data

    def pin(self, buffer):
        return False

    def unpin(self, buffers):
        pass


@pytest.mark.parametrize("answers", ["host", "stream"])
def test_a_pass_whose_device_waits_is_answered_as_a_read_back_would_be(checkpoints, monkeypatch, answers):
    """The host's side of a pass queued whole (CUDA's HostWaits; no such device here, so a
    thread plays the kernels on the same exchange): fed what each layer of a read-back model
    exported, pass after pass (a prefill, then decode steps that evict and read ahead), it
    answers every layer with that model's slots, and the pool ends holding the same bytes.
    With the copy stream answering (copies that land late, in order), the host never waits for
    a copy in a pass, and each layer's kernels find every expert they were given whole."""
    import threading

    from gptoss_mlx import expert_pool
    from gptoss_mlx.expert_pool import HostWaits

    reading = streamed(checkpoints["hf"], 8)
    driver = StreamOfCopies()
    if answers == "stream":
        monkeypatch.setattr(expert_pool.CudaDriver, "find", classmethod(lambda cls: driver))
    answering = streamed(checkpoints["hf"], 8)
    pool = answering.expert_pool
    layers = len(answering.layers)
    passes = []
    decide = reading.expert_pool._decide

    def recorded(layer, back, shape, m):
        slots = decide(layer, back, shape, m)
        if layer == 0:
            passes.append([])
        passes[-1].append((layer, back.copy(), shape, m, slots.copy()))
        return slots

    reading.expert_pool._decide = recorded
    cache = reading.make_cache()
    for chunk in [PROMPT[:20], [5], [77], [301], [12], [499]]:
        reading(mx.array([chunk]), cache=cache)
    assert len(passes) == 6 and all(len(p) == layers for p in passes)
    assert any(m for p in passes[1:] for _, _, _, m, _ in p)  # decode steps guessed

    for layer, back, shape, m, _ in passes[0]:  # the prefill: too wide to wait, read back
        pool._decide(layer, back, shape, m)
    if answers == "stream":
        assert pool.transfer == "cuda"
        pool.waits = HostWaits.mapped(driver, layers)
        assert pool.waits.stream is not None  # the driver's write was seen: the stream answers
    else:
        pool.waits = HostWaits(np.zeros((layers, HostWaits.WORDS), dtype=np.uint32), None)
    views = {name: expert_pool.host_view(pool._array(name)) for name in expert_pool.EXPERT_TENSORS}
    source, torn = pool.source, []

    def computes(layer, ids, slots):  # the bytes a layer's kernels read in its slots
        for expert, slot in zip(ids.tolist(), slots.tolist()):
            for name, view in views.items():
                t = source.tensors[layer, name]
                n = t.expert_bytes // t.dtype.size
                if view[slot].tobytes() != source._read_values(layer, name, expert * n, n):
                    torn.append((layer, expert, name))

    finishes = driver.finishes
    for recorded_pass in passes[1:]:
        pool.waits.begin()
        answered, stop, errors = [], threading.Event(), []
        device = threading.Thread(target=_device_side, args=(
            pool.waits, [(layer, back, int(np.prod(shape))) for layer, back, shape, _, _ in recorded_pass],
            answered, computes))
        device.start()
        pool._answer([(layer, shape, m, len(back)) for layer, back, shape, m, _ in recorded_pass], stop, errors)
        device.join(10)
        assert not errors and not device.is_alive()
        for got, (_, _, _, _, slots) in zip(answered, recorded_pass, strict=True):
            np.testing.assert_array_equal(got, slots.ravel())
    assert not torn
    assert driver.finishes == finishes  # (the host transfer: never a driver's)
    pool._wait_for_copies()
    reading.expert_pool._wait_for_copies()
    np.testing.assert_array_equal(pool.slot_of, reading.expert_pool.slot_of)
    for name in expert_pool.EXPERT_TENSORS:
        np.testing.assert_array_equal(np.array(pool._array(name).view(mx.uint8)),
                                      np.array(reading.expert_pool._array(name).view(mx.uint8)))
    assert pool.stats.hits == reading.expert_pool.stats.hits and pool.stats.guessed > 0


def test_an_error_answering_a_pass_lets_every_waiting_layer_go(checkpoints):
    """A layer routed to an expert that does not exist (activations not finite): the error is
    kept for the engine's thread and every layer of the pass is answered (slot 0), so that no
    kernel is left waiting; a pass whose routing never comes ends when told to stop."""
    import threading

    from gptoss_mlx import expert_pool
    from gptoss_mlx.expert_pool import HostWaits

    model = streamed(checkpoints["hf"], 8)
    pool, layers = model.expert_pool, len(model.layers)
    pool.waits = HostWaits(np.zeros((layers, HostWaits.WORDS), dtype=np.uint32), None)
    pool.waits.begin()
    words = [(0, np.array([1, 2], dtype=np.uint32), 2), (1, np.array([3, 999], dtype=np.uint32), 2)]
    answered, stop, errors = [], threading.Event(), []
    device = threading.Thread(target=_device_side, args=(pool.waits, words, answered))
    device.start()
    pool._answer([(layer, (1, 2), 0, 2) for layer in range(layers)], stop, errors)
    device.join(10)
    assert len(errors) == 1 and "routed a token to expert 999" in str(errors[0])
    assert all(pool.waits.host[layer, HostWaits.ANSWERED] == pool.waits.number(layer) for layer in range(layers))
    assert answered[1].tolist() == [0, 0]

    pool.waits.begin()
    stop, errors = threading.Event(), []
    threading.Timer(0.2, stop.set).start()
    t0 = time.perf_counter()
    pool._answer([(layer, (1, 2), 0, 2) for layer in range(layers)], stop, errors)
    assert time.perf_counter() - t0 < 5 and not errors
