"""The engine: sampling, stop tokens, limits, and the prompt cache across turns."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import FP32_ATOL
from gptoss_mlx.generate import (
    ContextLengthError, Engine, SamplingParams, banned_token_mask, make_sampler,
)
from gptoss_mlx.loading import load_model
from gptoss_mlx.tokenizer import SPECIAL_TOKENS
from scripted import ScriptedModel

RETURN, CALL, END = SPECIAL_TOKENS["<|return|>"], SPECIAL_TOKENS["<|call|>"], SPECIAL_TOKENS["<|end|>"]


# ------------------------------------------------------------------ sampling
def test_greedy_and_top_k_1_pick_the_argmax():
    logits = mx.random.normal((1, 1000))
    best = mx.argmax(logits, axis=-1).item()
    assert make_sampler(SamplingParams(temperature=0), 1000)(logits).item() == best
    assert make_sampler(SamplingParams(top_k=1), 1000)(logits).item() == best
    assert make_sampler(SamplingParams(top_p=1e-6), 1000)(logits).item() == best
    assert make_sampler(SamplingParams(min_p=0.999), 1000)(logits).item() == best


def test_seeded_sampling_repeats_and_follows_the_distribution():
    logits = mx.log(mx.array([[0.7, 0.2, 0.1]]))
    sampler = make_sampler(SamplingParams(), 3)
    mx.random.seed(5)
    draws = [sampler(logits).item() for _ in range(2000)]
    mx.random.seed(5)
    assert [sampler(logits).item() for _ in range(50)] == draws[:50]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.04)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    sampler = make_sampler(SamplingParams(top_p=0.75), 4)
    assert set(sampler(mx.repeat(logits, 400, axis=0)).tolist()) == {0, 1}


def test_reserved_tokens_are_never_sampled():
    mask = banned_token_mask(201088)
    assert mask[200013].item() == float("-inf") and mask[201087].item() == float("-inf")
    assert mask[RETURN].item() == 0 and mask[5].item() == 0
    logits = mx.zeros((1, 201088))
    logits[0, 200500] = 100.0  # the model "prefers" a reserved id
    assert make_sampler(SamplingParams(temperature=0), 201088)(logits).item() != 200500


def test_bad_sampling_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


# ------------------------------------------------------------------ stop tokens and limits
def run(model, prompt, **kw):
    engine = Engine(model)
    return list(engine.generate(prompt, SamplingParams(temperature=0, **kw))), engine.stats


def test_stops_on_return_and_call_but_not_end():
    model = ScriptedModel([[11, END, 12, 13, RETURN, 99]])
    tokens, stats = run(model, [1, 2, 3])
    assert tokens == [11, END, 12, 13, RETURN] and stats.finish_reason == "stop"
    model = ScriptedModel([[11, CALL, 99]])
    assert run(model, [1, 2, 3])[0] == [11, CALL]


def test_max_tokens():
    tokens, stats = run(ScriptedModel([[7] * 50]), [1, 2], max_tokens=5)
    assert tokens == [7] * 5 and stats.finish_reason == "length"


def test_context_guard():
    with pytest.raises(ContextLengthError, match="10 tokens but the context limit is 8"):
        run(ScriptedModel([[7]], max_context=8), list(range(10)))
    tokens, stats = run(ScriptedModel([[7] * 50], max_context=8), [1, 2, 3])
    assert len(tokens) == 5 and stats.finish_reason == "context"


# ------------------------------------------------------------------ prompt cache
@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hf"], mx.float32)


def fresh_logits(model, prompt):
    return np.array(model(mx.array([prompt]))[0, -1])


def test_follow_up_reuses_the_cache_and_matches_a_fresh_run(model, tiny_config):
    engine = Engine(model)
    turn1 = [(i * 7) % 500 for i in range(150)]  # longer than the window: the ring wrapped
    reply = list(engine.generate(turn1, SamplingParams(temperature=0, max_tokens=30)))
    assert engine.prompt_cache.tokens == turn1 + reply[:-1]
    # next turn: the reply's reasoning was dropped, so the prompt diverges right after turn1
    turn2 = turn1 + [11, 12, 13] + [(i * 5) % 500 for i in range(40)]
    logits = np.array(engine.prefill(turn2))
    assert engine.stats.reused_tokens >= len(turn1) - 1
    np.testing.assert_allclose(logits[0], fresh_logits(model, turn2), atol=FP32_ATOL)


def test_follow_up_that_keeps_the_whole_reply(model):
    """A tool-call turn keeps everything: only the last token (the stop token) is rewound."""
    engine = Engine(model)
    turn1 = [(i * 3) % 500 for i in range(140)]
    reply = list(engine.generate(turn1, SamplingParams(temperature=0, max_tokens=12)))
    turn2 = turn1 + reply + [21, 22, 23]
    logits = np.array(engine.prefill(turn2))
    assert engine.stats.reused_tokens == len(turn1) + len(reply) - 1
    np.testing.assert_allclose(logits[0], fresh_logits(model, turn2), atol=FP32_ATOL)


def test_rewind_into_the_middle_of_a_reply_restores_a_snapshot(model):
    engine = Engine(model)
    turn1 = [(i * 11) % 500 for i in range(130)]
    reply = list(engine.generate(turn1, SamplingParams(temperature=0, max_tokens=40)))
    turn2 = turn1 + reply[:20] + [9, 9, 9]  # diverges 20 tokens into a 40-token reply
    logits = np.array(engine.prefill(turn2))
    assert engine.stats.reused_tokens == len(turn1)  # the snapshot at the end of turn1
    np.testing.assert_allclose(logits[0], fresh_logits(model, turn2), atol=FP32_ATOL)


def test_identical_prompt_feeds_one_token(model):
    engine = Engine(model)
    prompt = list(range(1, 60))
    engine.prefill(prompt)
    logits = np.array(engine.prefill(prompt))
    assert engine.stats.reused_tokens == len(prompt) - 1
    np.testing.assert_allclose(logits[0], fresh_logits(model, prompt), atol=FP32_ATOL)


def test_chunked_prefill_matches(model):
    engine = Engine(model, prefill_step=16)
    prompt = [(i * 13) % 500 for i in range(100)]
    np.testing.assert_allclose(np.array(engine.prefill(prompt))[0], fresh_logits(model, prompt),
                               atol=FP32_ATOL)
