"""Every damaged checkpoint of tests/damaged_checkpoints.py gives one clear line naming the
file or field: never a traceback, a hang, or a model that loads and prints '!!!'."""

import gzip

import mlx.core as mx
import pytest

from damaged_checkpoints import DAMAGES, make_damaged, make_healthy, try_load
from gptoss_mlx.generate import Engine, NonFiniteLogitsError
from gptoss_mlx.loading import load_model


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
