"""The MLX model against an independent NumPy implementation of the reference."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import FP32_ATOL
from gptoss_mlx.loading import load_model
from numpy_reference import NumpyGptOss

PROMPT = [5, 77, 300, 12, 9, 401, 33, 250, 7, 7, 18, 111, 64, 2, 499, 123, 45, 6, 310, 88, 17]


@pytest.fixture(scope="module")
def reference_logits(checkpoints):
    return NumpyGptOss(checkpoints["hf"])(PROMPT)


def test_float32_logits_match_numpy_reference(checkpoints, tiny_config, reference_logits):
    assert len(PROMPT) > 2 * tiny_config.sliding_window  # the window really cuts keys off
    model = load_model(checkpoints["hf"], mx.float32)
    logits = np.array(model(mx.array([PROMPT]))[0])
    diff = np.abs(logits - reference_logits).max()
    print(f"max abs logit difference vs NumPy float64 reference: {diff:.3e}")
    assert diff < 10 * FP32_ATOL
    assert (logits.argmax(-1) == reference_logits.argmax(-1)).all()


def test_bfloat16_model_stays_close_to_reference(checkpoints, reference_logits):
    model = load_model(checkpoints["hf"])  # bf16 activations and dense weights
    logits = np.array(model(mx.array([PROMPT]))[0].astype(mx.float32))
    # bf16 rounding can flip a near-tied expert choice on a few tokens, so compare in bulk.
    assert np.corrcoef(logits.ravel(), reference_logits.ravel())[0, 1] > 0.995
    assert np.median(np.abs(logits - reference_logits).max(axis=-1)) < 0.1


def test_sliding_window_changes_the_result(checkpoints, tiny_config):
    """Guard against a window that silently does nothing: widening it changes the logits."""
    from gptoss_mlx.loading import build_model
    model = load_model(checkpoints["hf"], mx.float32)
    wide = build_model(tiny_config.replace(sliding_window=1000))
    wide.update(model.parameters())
    a = model(mx.array([PROMPT]))[0, -1]
    b = wide(mx.array([PROMPT]))[0, -1]
    assert mx.abs(a - b).max().item() > 1e-3
