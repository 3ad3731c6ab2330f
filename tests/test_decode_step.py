"""The compiled decode step (decode_step.py): the same logits as the uncompiled step, bit for bit,
through ring wraps, cache growth and rewinds; one trace per full-layer capacity, not per token."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY
from gptoss_mlx import decode_step
from gptoss_mlx.decode_step import CompiledDecode
from gptoss_mlx.generate import Engine, PromptCache, SamplingParams, forward
from gptoss_mlx.loading import load_model
from gptoss_mlx.testing import checkpoints as mtc


@pytest.fixture(scope="module")
def window_128(tmp_path_factory):
    """The tiny model with gpt-oss's 128-token window (TINY's is 8)."""
    path = tmp_path_factory.mktemp("w128") / "ckpt"
    mtc.write_hf(path, TINY.replace(sliding_window=128), seed=3)
    return path


@pytest.fixture
def kernels_standing_in(monkeypatch):
    """As on a GPU backend: the kernels on, each launch standing in as its reference in plain
    MLX; yields the names launched."""
    from gptoss_mlx.kernels import registry

    launched = []

    def launch(spec, *args):
        launched.append(spec.name)
        return list(spec.reference(*args))

    monkeypatch.setenv(registry.ENV_VAR, "on")
    monkeypatch.setattr(registry, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(registry.KernelSpec, "launch", launch)
    registry.reset()
    yield launched
    registry.reset()


def decode_both(model, prompt: list[int], steps: int, rewinds: dict[int, int] = {}):
    """Greedy decode ``steps`` tokens after ``prompt`` twice side by side, uncompiled and compiled,
    asserting equal logits at every step; at step n in ``rewinds`` both prompt caches rewind to
    that many tokens first. Returns the compiled step."""
    plain, compiled = PromptCache(model.make_cache()), PromptCache(model.make_cache())
    step = CompiledDecode(model)
    a = forward(model, plain, prompt)
    b = forward(model, compiled, prompt)
    plain.take_snapshot(), compiled.take_snapshot()  # as a prefill does
    for n in range(steps):
        if n in rewinds:
            assert plain.rewind_to(rewinds[n]) == compiled.rewind_to(rewinds[n])
        y = mx.argmax(a, axis=-1)
        a = forward(model, plain, [y.item()])
        b = step(y, compiled.cache)
        compiled.tokens.append(y.item())
        assert b is not None
        assert mx.array_equal(a, b).item(), f"step {n}: the compiled logits differ"
    return step


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_compiled_logits_equal_uncompiled_through_wraps_growth_and_rewinds(window_128, dtype):
    """From a 3-token prompt: a rewind (trim) before the 128-slot rings wrap, then they fill and
    wrap, and the full layers' 256 slots grow to 512. Three traces: the rings filling (masked)
    and full (unmasked) at 256 slots, full at 512."""
    model = load_model(window_128, dtype)
    step = decode_both(model, [5, 9, 2], 330, rewinds={100: 60})
    assert step.traces == 3


def test_rewinding_a_wrapped_ring_to_a_snapshot(checkpoints):
    """Window 8: the rings wrap at once; rewinding into the reply restores the prompt's snapshot."""
    model = load_model(checkpoints["hf"], mx.float32)
    step = decode_both(model, list(range(1, 30)), 60, rewinds={40: 29, 45: 31})
    assert step.traces == 1


def test_engine_replies_are_the_same_compiled_and_not(checkpoints):
    """Several turns with the prompt cache reused and rewound: the same greedy tokens, and the
    step traced once per capacity (prompts and replies stay under 512 positions)."""
    model = load_model(checkpoints["hf"], mx.float32)
    replies = {}
    for compiled in (False, True):
        engine = Engine(model, compile_decode=compiled)
        assert (engine.compiled_decode is not None) == compiled
        history, out = [(i * 7) % 500 for i in range(140)], []
        for turn in range(3):
            reply = list(engine.generate(history, SamplingParams(temperature=0, max_tokens=60)))
            out.append(reply)
            history = history + reply[:30] + [11 + turn, 12]  # drops the end of the reply
        replies[compiled] = out
        if compiled:
            assert engine.compiled_decode.traces == 2  # 256 slots, then 512
    assert replies[True] == replies[False]


def test_a_failing_compile_warns_once_and_decodes_uncompiled(checkpoints, monkeypatch):
    model = load_model(checkpoints["hf"], mx.float32)
    reference = list(Engine(model, compile_decode=False).generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=20)))
    engine = Engine(model, compile_decode=True)

    def broken(*args):
        raise ValueError("no such primitive")

    monkeypatch.setattr(engine.compiled_decode, "_step", lambda key: broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reply = list(engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=20)))
    assert reply == reference
    assert [str(w.message) for w in caught if "compiling the decode step failed" in str(w.message)] != []
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_an_interrupt_during_the_step_leaves_the_cache_as_it_was(checkpoints, monkeypatch):
    """Ctrl-C in the compiled step (library use on the main thread): the caches keep their
    storage and the next steps decode as if nothing happened; the step is not given up."""
    model = load_model(checkpoints["hf"], mx.float32)
    prompt = list(range(1, 12))
    plain, compiled = PromptCache(model.make_cache()), PromptCache(model.make_cache())
    a, b = forward(model, plain, prompt), forward(model, compiled, prompt)
    step = CompiledDecode(model)

    def interrupted(*args):
        raise KeyboardInterrupt

    y = mx.argmax(a, axis=-1)
    monkeypatch.setattr(step, "_step", lambda key: interrupted)
    with pytest.raises(KeyboardInterrupt):
        step(y, compiled.cache)
    assert all(c.keys is not None and c.values is not None for c in compiled.cache)
    monkeypatch.undo()
    for _ in range(5):
        a, b = forward(model, plain, [y.item()]), step(y, compiled.cache)
        assert b is not None and mx.array_equal(a, b).item()
        y = mx.argmax(a, axis=-1)
    assert not step.failed


def test_which_engines_compile(checkpoints, monkeypatch):
    """Off by GPTOSS_MLX_COMPILE=off; never for streamed experts, sharded or adapted models."""
    from gptoss_mlx.lora import LoRAConfig, apply_lora

    model = load_model(checkpoints["hf"], mx.float32)
    assert Engine(model).compiled_decode is not None
    monkeypatch.setenv(decode_step.ENV_VAR, "off")
    assert Engine(model).compiled_decode is None
    monkeypatch.delenv(decode_step.ENV_VAR)
    monkeypatch.setattr(model, "expert_pool", object())
    assert Engine(model).compiled_decode is None
    monkeypatch.setattr(model, "expert_pool", None)
    monkeypatch.setattr(model, "sharding", "tensor")
    assert Engine(model).compiled_decode is None
    monkeypatch.setattr(model, "sharding", None)
    apply_lora(model, LoRAConfig())
    assert Engine(model).compiled_decode is None


def test_the_kernels_are_launched_inside_the_compiled_step(checkpoints, kernels_standing_in):
    """As on a GPU backend (kernels on, each launch standing in as its reference in plain MLX):
    the traced step reaches the kernels through the model's calls, and its logits equal the
    uncompiled step's with the same kernels."""
    launched = kernels_standing_in
    model = load_model(checkpoints["hf"], mx.float32)
    assert decode_both(model, list(range(1, 12)), 12).traces == 1
    pc = PromptCache(model.make_cache())
    y = mx.argmax(forward(model, pc, list(range(1, 12))), axis=-1)
    launched.clear()
    step = CompiledDecode(model)
    step(y, pc.cache)  # traced: 5 launches per layer (qkv + RoPE, o_proj, add+norm+router, the two MoE halves)
    assert sorted(set(launched)) == ["add_rms_norm_route", "linear_decode", "moe_down_combine",
                                     "moe_gate_up_swiglu", "qkv_rope_decode"]
    assert len(launched) == 5 * len(model.layers)
    step(y, pc.cache)  # replayed: no Python in between
    assert len(launched) == 5 * len(model.layers) and step.traces == 1


def test_the_decode_attention_kernels_read_the_number_of_keys_on_the_device(tmp_path, monkeypatch):
    """Where the decode attention kernels fit (head_dim 32; as on a GPU, each launch standing in
    as its reference), the compiled step runs them on every full layer and on the rings until
    they fill, with the number of keys as a device array (no mask, nothing baked into the trace):
    the same logits as the uncompiled step running the same kernels, bit for bit, before and after
    the rings (window 8) fill and wrap; two traces (rings filling, then full)."""
    import importlib

    from gptoss_mlx.kernels import registry

    attention = importlib.import_module("gptoss_mlx.kernels.attention")  # the module, not its function
    launched, tracing = [], []

    def launch(spec, *args):
        if tracing:
            launched.append((spec.name, args))
        return list(spec.reference(*args))

    def trace(self, *args):
        tracing.append(True)
        try:
            return trace.__wrapped__(self, *args)
        finally:
            tracing.pop()

    monkeypatch.setenv(registry.ENV_VAR, "on")
    monkeypatch.setattr(registry, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(registry.KernelSpec, "launch", launch)
    monkeypatch.setattr(attention, "MIN_KEYS", 1)  # the uncompiled step: the kernels at every length
    trace.__wrapped__ = CompiledDecode._trace
    monkeypatch.setattr(CompiledDecode, "_trace", trace)
    registry.reset()
    # the uncompiled step as the compiled one runs it: writes, then the two-pass kernels
    registry._state[(attention.STEP.name, mx.float32)] = "off (this test)"
    try:
        mtc.write_hf(tmp_path / "ckpt", TINY.replace(head_dim=32), seed=5)
        model = load_model(tmp_path / "ckpt", mx.float32)
        step = decode_both(model, [5, 9, 2], 30)
        assert step.traces == 2
        partial = [args for name, args in launched if name == "sdpa_decode_partial"]
        # traced twice, all 4 layers each time (the full rings too, with MIN_KEYS at 1 here)
        assert len(partial) == 4 + 4 and all(args[4].ndim == 0 for args in partial)
    finally:
        registry.reset()


def test_a_gpu_compiles_only_when_asked(monkeypatch):
    """auto (the default): compiled on the CPU; on a GPU only with GPTOSS_MLX_COMPILE=on, until
    the kernels inside mx.compile have been checked there."""
    monkeypatch.delenv(decode_step.ENV_VAR, raising=False)
    assert decode_step.enabled()
    monkeypatch.setattr(decode_step.mx, "default_device", lambda: mx.gpu)
    assert not decode_step.enabled()
    for value, expected in (("on", True), ("auto", False), ("off", False)):
        monkeypatch.setenv(decode_step.ENV_VAR, value)
        assert decode_step.enabled() is expected
    monkeypatch.setenv(decode_step.ENV_VAR, "bogus")  # (a typo was auto without a word: helper-152)
    with pytest.warns(UserWarning, match="GPTOSS_MLX_COMPILE='bogus' is not one of auto, on, off; using 'auto'"):
        assert not decode_step.enabled()


# ---- grouped decode steps (cache.py): the layers of a kind written once a token ----------------

@pytest.fixture(scope="module")
def head_dim_32(tmp_path_factory):
    """The tiny model with head_dim 32 (the step kernel's multiple): window 8, four layers."""
    path = tmp_path_factory.mktemp("hd32") / "ckpt"
    mtc.write_hf(path, TINY.replace(head_dim=32), seed=5)
    return path


_MODELS = {}


def _hd32_model(path):
    """The head_dim 32 model, loaded once per test module (hypothesis runs a test many times)."""
    if path not in _MODELS:
        _MODELS[path] = load_model(path, mx.float32)
    return _MODELS[path]


def _reference_steps(model, prompt, tokens, rewinds):
    """Logits of feeding ``tokens`` one at a time after ``prompt`` on per-layer caches (the step
    attention off), rewinding as ``rewinds`` says."""
    import os

    from gptoss_mlx.kernels import registry

    os.environ[registry.ENV_VAR] = "off"
    registry.reset()
    try:
        pc = PromptCache(model.make_cache())
        out = [forward(model, pc, prompt)]
        pc.take_snapshot()
        for n, t in enumerate(tokens):
            if n in rewinds:
                pc.rewind_to(rewinds[n])
            out.append(forward(model, pc, [t]))
        mx.eval(out)
        return out, pc
    finally:
        os.environ[registry.ENV_VAR] = "on"
        registry.reset()


def test_grouped_steps_give_the_per_layer_caches_logits(head_dim_32, kernels_standing_in):
    """Every decode step of one sequence runs the step attention (the token's key and value
    from the qkv output) and leaves the writes to its kind's group: the logits of 40 steps
    after a prompt equal those of per-layer writes, through the rings (window 8) wrapping and a
    rewind (a trim of a full layer's offset, a ring restored from its snapshot), and the caches
    read afterwards hold the same keys and values, the last step's included."""
    from gptoss_mlx.cache import KVGroup

    model = load_model(head_dim_32, mx.float32)
    prompt, rewinds = [5, 9, 2, 7], {25: 6}
    pc = PromptCache(model.make_cache())
    got = [forward(model, pc, prompt)]
    pc.take_snapshot()
    tokens = []
    for n in range(40):
        if n in rewinds:
            pc.rewind_to(rewinds[n])
        tokens.append(mx.argmax(got[-1], axis=-1).item())
        kernels_standing_in.clear()
        got.append(forward(model, pc, [tokens[-1]]))
        assert kernels_standing_in.count("sdpa_decode_step") == len(model.layers)
    assert all(isinstance(c.group, KVGroup) for c in pc.cache)
    expected, reference = _reference_steps(model, prompt, tokens, rewinds)
    for n, (a, b) in enumerate(zip(got, expected)):
        assert mx.abs(a - b).max().item() < 1e-4, f"step {n}"
    for c, r in zip(pc.cache, reference.cache):
        assert c.offset == r.offset
        filled = min(c.kv.shape[2], r.kv.shape[2], c.offset)
        assert mx.abs(c.kv[..., :filled, :] - r.kv[..., :filled, :]).max().item() < 1e-5


def _slice_updates(model, cache, token) -> int:
    """How many SliceUpdate operations one decode step's graph holds."""
    import re
    import tempfile
    from pathlib import Path

    logits = model(mx.array([[token]]), cache=cache)
    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "g.dot"
        mx.export_to_dot(str(dot), logits)
        labels = re.findall(r'label ="(\w+)"', dot.read_text())
    mx.eval(logits)
    return labels.count("SliceUpdate")


def test_a_grouped_step_writes_each_kind_once(head_dim_32, kernels_standing_in, monkeypatch):
    """One write for the rings and one for the full layers a token (the last token's, made
    when the next step reads the buffer), where the layers wrote one each; past
    STEP_MAX_KEYS cached keys the full layers write their own again (the two-pass attention
    reads them after), and the rings stay grouped."""
    import importlib

    attention = importlib.import_module("gptoss_mlx.kernels.attention")  # the module, not its function
    model = load_model(head_dim_32, mx.float32)
    pc = PromptCache(model.make_cache())
    forward(model, pc, [5, 9, 2, 7])
    mx.eval([c.state for c in pc.cache])
    assert _slice_updates(model, pc.cache, 3) == 0  # the first step: grouped now, nothing pending
    assert _slice_updates(model, pc.cache, 4) == 2  # the first step's keys and values, a write a kind
    assert _slice_updates(model, pc.cache, 5) == 2
    monkeypatch.setattr(attention, "STEP_MAX_KEYS", 7)  # 7 keys cached now
    assert _slice_updates(model, pc.cache, 6) == 2 + 2  # the groups' pending, then each full layer's own
    assert [c.group is not None for c in pc.cache] == [True, False, True, False]
    assert _slice_updates(model, pc.cache, 7) == 1 + 2


def test_grouped_caches_fork_rewind_and_prefill_like_per_layer_ones(head_dim_32, kernels_standing_in):
    """A fork of a grouped prompt cache (the server's, per request), a prefill after decoding
    (every layer its own buffer again) and the compiled step on grouped caches give the logits
    of per-layer caches."""
    model = load_model(head_dim_32, mx.float32)
    pc = PromptCache(model.make_cache())
    forward(model, pc, [5, 9, 2, 7])
    pc.take_snapshot()
    for t in [3, 1, 4, 1, 5, 9, 2, 6]:
        forward(model, pc, [t])
    other = pc.fork(4)  # at the prompt's snapshot
    a = [forward(model, other, [t]) for t in [8, 8, 8]]
    b = forward(model, pc, [11, 12, 13])  # a prefill on grouped caches
    c = [forward(model, pc, [t]) for t in [14, 15]]
    step = CompiledDecode(model)
    d = step(mx.array(16), pc.cache)
    pc.tokens.append(16)
    e = forward(model, pc, [17])
    expected_a, _ = _reference_steps(model, [5, 9, 2, 7], [8, 8, 8], {})
    expected, _ = _reference_steps(model, [5, 9, 2, 7, 3, 1, 4, 1, 5, 9, 2, 6], [11], {})
    rest, _ = _reference_steps(model, [5, 9, 2, 7, 3, 1, 4, 1, 5, 9, 2, 6, 11, 12, 13], [14, 15, 16, 17], {})
    for got, want in zip(a + [b] + c + [d, e], expected_a[1:] + [rest[0]] + rest[1:]):
        assert mx.abs(got - want.reshape(got.shape)).max().item() < 1e-4


def _labels(logits) -> list[str]:
    """The operations of ``logits``' graph, by name."""
    import re
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "g.dot"
        mx.export_to_dot(str(dot), logits)
        return re.findall(r'label ="(\w+)"', dot.read_text())


def test_the_compiled_step_takes_grouped_steps(head_dim_32, kernels_standing_in, monkeypatch):
    """Where the step attention runs, the compiled step is a grouped one too: every layer's
    attention is the step kernel, the kinds' keys and values are written once a kind (2 slice
    updates a token, no per-layer scatter) and the caches stay grouped; its logits equal the
    uncompiled step's bit for bit through the rings wrapping, a rewind and the full layers
    leaving their group at STEP_MAX_KEYS (one trace for each arrangement)."""
    import importlib

    attention = importlib.import_module("gptoss_mlx.kernels.attention")  # the module, not its function
    model = _hd32_model(head_dim_32)
    monkeypatch.setattr(attention, "STEP_MAX_KEYS", 24)
    monkeypatch.setattr(attention, "MIN_KEYS", 1)  # past it, the two-pass kernels compiled or not
    kernels_standing_in.clear()
    step = decode_both(model, [5, 9, 2, 7], 16, rewinds={10: 9})
    assert step.traces == 1 and kernels_standing_in.count("sdpa_decode_step") >= 2 * len(model.layers)
    plain, compiled = PromptCache(model.make_cache()), PromptCache(model.make_cache())
    y = mx.argmax(forward(model, plain, [5, 9, 2, 7]), axis=-1)
    forward(model, compiled, [5, 9, 2, 7])
    mx.eval([c.state for c in compiled.cache])  # (the prompt's own writes not in the step's graph)
    for n in range(30):
        a, b = forward(model, plain, [y.item()]), step(y, compiled.cache)
        labels = _labels(b)  # (before b is evaluated)
        assert mx.array_equal(a, b).item(), f"step {n}"
        full_own = n + 4 >= 24
        # the last step's keys and values, a write a kind (the full group's once more as it leaves)
        assert labels.count("SliceUpdate") == (n > 0) * (1 + (n + 4 <= 24))
        assert labels.count("ScatterAxis") == (2 if full_own else 0)  # the full layers' own writes
        assert [c.group is not None for c in compiled.cache] == [True, not full_own] * 2
        y = mx.argmax(a, axis=-1)
    assert step.traces == 2  # both kinds grouped (above and here, replayed), then the rings only


def test_compiled_and_uncompiled_steps_ask_for_the_step_kernel_in_one_dtype(head_dim_32, kernels_standing_in,
                                                                         monkeypatch):
    """An embedding of another dtype than the model's (an mlx-lm 8-bit one gives bfloat16 in a
    float32 model): both steps group by the queries' dtype, the model's, so they take the same
    arrangement and the same logits, whichever dtype's kernel state is off."""
    from gptoss_mlx.kernels import registry
    from gptoss_mlx.kernels.attention import STEP

    model = load_model(head_dim_32, mx.float32)
    model.embed_tokens.weight = model.embed_tokens.weight.astype(mx.bfloat16)
    registry.status(mx.float32), registry.status(mx.bfloat16)
    monkeypatch.setitem(registry._state, (STEP.name, mx.bfloat16), "off (this test)")
    decode_both(model, [5, 9, 2, 7], 6)
    pc = PromptCache(model.make_cache())
    for t in [5, 9, 2, 7, 3]:
        forward(model, pc, [t])
    assert all(c.group is not None for c in pc.cache)  # the float32 kernel runs the bfloat16 ids' steps


_OPS = st.lists(st.one_of(
    st.tuples(st.just("decode"), st.integers(1, 500)),
    st.tuples(st.just("prefill"), st.lists(st.integers(1, 500), min_size=1, max_size=12)),
    st.tuples(st.just("rewind"), st.integers(0, 40)),
    st.tuples(st.just("snapshot"), st.just(0)),
    st.tuples(st.just("fork"), st.integers(0, 40)),
    st.tuples(st.just("batch"), st.just(0)),
    st.tuples(st.just("compiled"), st.integers(1, 500)),
), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_grouped_and_per_layer_caches_agree_whatever_is_done_to_them(head_dim_32, kernels_standing_in, ops):
    """Two prompt caches of one model, one decoding through grouped steps and one writing per
    layer, given the same random mix of decode steps, prefills, rewinds (trims and snapshot
    restores), snapshots, forks, a trip through a decode batch's caches (merged, then each row
    extracted) and compiled steps: the same logits every time (1e-4), the same offsets."""
    from gptoss_mlx.cache import merge_caches
    from gptoss_mlx.kernels import registry
    from gptoss_mlx.kernels.attention import STEP

    model = _hd32_model(head_dim_32)
    step = CompiledDecode(model)

    def as_path(grouped: bool) -> None:
        registry._state[(STEP.name, mx.float32)] = "active (unchecked)" if grouped else "off (this test)"

    pcs = {}
    for grouped in (True, False):
        as_path(grouped)
        pcs[grouped] = PromptCache(model.make_cache())
        forward(model, pcs[grouped], [5, 9, 2, 7])
        pcs[grouped].take_snapshot()
    for op, arg in ops:
        out = {}
        for grouped, pc in pcs.items():
            as_path(grouped)
            if op == "decode":
                out[grouped] = forward(model, pc, [arg])
            elif op == "prefill":
                out[grouped] = forward(model, pc, arg)
            elif op == "rewind":
                pc.rewind_to(min(arg, len(pc.tokens)))
            elif op == "snapshot":
                pc.take_snapshot()
            elif op == "fork":
                keep = max(p for p in pc.snapshots if p <= min(arg, len(pc.tokens)))
                pcs[grouped] = pc.fork(keep)
            elif op == "batch" and pc.tokens:  # (the server batches sequences after their prefill)
                batch = merge_caches([pc.cache])
                pc.cache = [layer.extract(0) for layer in batch]
            elif op == "compiled":
                logits = step(mx.array(arg), pc.cache)
                if logits is not None:
                    pc.tokens.append(arg)
                    out[grouped] = logits
        if out:
            assert mx.abs(out[True] - out[False]).max().item() < 1e-4, (op, arg)
        assert [c.offset for c in pcs[True].cache] == [c.offset for c in pcs[False].cache]


def test_a_streamed_model_takes_grouped_steps_with_the_resident_logits(head_dim_32, kernels_standing_in):
    """Experts streamed through a pool smaller than one layer's (every step evicts) and the
    grouped steps together: the logits of the resident model's grouped steps, exactly."""
    from gptoss_mlx.loading import read_config
    from gptoss_mlx.memory import plan

    resident = _hd32_model(head_dim_32)
    streamed = load_model(head_dim_32, mx.float32,
                          memory_plan=plan(read_config(head_dim_32), 64, 16, 1e12, expert_slots=8))
    assert streamed.expert_pool is not None
    caches = [PromptCache(m.make_cache()) for m in (resident, streamed)]
    outs = [forward(m, pc, [5, 9, 2, 7, 11]) for m, pc in zip((resident, streamed), caches)]
    for t in [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]:
        outs = [forward(m, pc, [t]) for m, pc in zip((resident, streamed), caches)]
        assert mx.array_equal(outs[0], outs[1]).item()
    assert all(c.group is not None for c in caches[1].cache)
    assert kernels_standing_in.count("sdpa_decode_step") >= 11 * 2 * len(resident.layers)
