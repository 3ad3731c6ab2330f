"""Every damaged checkpoint of tests/damaged_checkpoints.py gives one clear line naming the
file or field: never a traceback, a hang, or a model that loads and prints '!!!'."""

import gzip
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damaged_checkpoints import (
    DAMAGES, make_damaged, make_healthy, read_safetensors, try_load, write_safetensors,
)
from gptoss_mlx.generate import Engine, NonFiniteLogitsError
from gptoss_mlx.loading import CheckpointError, load_model, read_safetensors_header


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("damaged")
    tokenizer = root / "tokenizer.json"
    tokenizer.write_bytes(gzip.decompress(tokenizer_json.read_bytes()))
    single, sharded = make_healthy(root)
    return {case.name: case for case in make_damaged(single, sharded, root / "cases", tokenizer)}


def test_the_sweep_is_large_enough():
    assert len(DAMAGES) >= 59
    assert {category for _, category, *_ in DAMAGES} == {
        "files", "header", "dtype", "values", "index", "config", "tokenizer"}


@pytest.mark.parametrize("name", [name for name, *_ in DAMAGES])
def test_damaged_checkpoint_gives_one_clear_error(damaged, name):
    outcome, message = try_load(damaged[name])
    assert outcome == "clear", f"{outcome}: {message}"


def test_healthy_checkpoints_still_load(tmp_path):
    single, sharded = make_healthy(tmp_path)
    for path in (single, sharded):
        logits = Engine(load_model(path)).prefill([1, 2, 3])
        assert mx.isfinite(logits).all().item()


def test_nan_the_load_sample_misses_is_caught_at_the_first_step(checkpoints):
    """The load-time check samples; the first step's logits catch the rest."""
    model = load_model(checkpoints["hf"])
    engine = Engine(model)
    good = engine.prefill([1, 2, 3])
    weight = model.layers[1].self_attn.o_proj.weight
    poisoned = mx.concatenate([mx.full((1, weight.shape[1]), float("nan"), weight.dtype), weight[1:]])
    mx.eval(poisoned)  # evaluated here: the engine thread cannot evaluate this thread's lazy arrays
    model.layers[1].self_attn.o_proj.weight = poisoned
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite logits"):
        engine.prefill([1, 2, 3, 4])
    assert engine.prompt_cache.tokens == []  # the poisoned cache is dropped
    model.layers[1].self_attn.o_proj.weight = weight
    assert mx.array_equal(engine.prefill([1, 2, 3]), good).item()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["model.layers.0.input_layernorm.weight", "lm_head.weight",
                             "model.layers.1.mlp.experts.down_proj_blocks", "__metadata__"]),
       key=st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]), value=JSON_VALUES)
def test_any_header_damage_is_a_checkpoint_error(checkpoints, name, key, value):
    """Hypothesis over header entries: a CheckpointError or a header that checks out, never
    another exception."""
    header, data = read_safetensors(checkpoints["hf"] / "model.safetensors")
    if key is None:
        header[name] = value
    elif isinstance(header.get(name), dict):
        header[name][key] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        write_safetensors(path, header, data)
        try:
            read_safetensors_header(path)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(path) in str(e)
