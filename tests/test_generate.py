"""The engine: sampling, stop tokens, limits, the prompt cache across turns, the engine thread."""

import asyncio
import sys
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import FP32_ATOL
from gptoss_mlx.engine_thread import SWITCH_INTERVAL_S, EngineThread, engine_thread
from gptoss_mlx.generate import (
    ContextLengthError, Engine, Prefill, SamplingParams, banned_token_mask, make_sampler,
)
from gptoss_mlx.harmony import ASSISTANT_ROLE_ID
from gptoss_mlx.loading import load_model
from gptoss_mlx.server.scheduler import PromptCachePool
from gptoss_mlx.tokenizer import SPECIAL_TOKENS
from scripted import ScriptedModel, SlowChunks

RETURN, CALL, END = SPECIAL_TOKENS["<|return|>"], SPECIAL_TOKENS["<|call|>"], SPECIAL_TOKENS["<|end|>"]


# ------------------------------------------------------------------ sampling
def test_greedy_and_top_k_1_pick_the_argmax():
    logits = mx.random.normal((1, 1000))
    best = mx.argmax(logits, axis=-1).item()
    assert make_sampler(SamplingParams(temperature=0), 1000)(logits).item() == best
    assert make_sampler(SamplingParams(top_k=1), 1000)(logits).item() == best
    assert make_sampler(SamplingParams(top_p=1e-6), 1000)(logits).item() == best
    assert make_sampler(SamplingParams(min_p=0.999), 1000)(logits).item() == best


@pytest.mark.parametrize("bad", [{"top_k": 2.5}, {"max_tokens": 2.5}, {"max_tokens": "10"}, {"temperature": "hot"},
                                 {"seed": "abc"}, {"max_tokens": True}, {"temperature": True}])
def test_sampling_settings_of_the_wrong_type_are_named(bad):
    """They failed later, inside MLX or a comparison, or (True) were taken as 1."""
    with pytest.raises(TypeError, match=next(iter(bad))):
        SamplingParams(**bad)


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
    start, assistant = SPECIAL_TOKENS["<|start|>"], ASSISTANT_ROLE_ID
    model = ScriptedModel([[11, END, start, assistant, 12, 13, RETURN, 99]])
    tokens, stats = run(model, [1, 2, 3])
    assert tokens == [11, END, start, assistant, 12, 13, RETURN] and stats.finish_reason == "stop"
    # after <|end|>, anything but the next message's <|start|> (or its role, or a header without
    # one) ends the reply there, and the token that ended it is not counted
    tokens, stats = run(ScriptedModel([[11, END, 12, 13, RETURN, 99]]), [1, 2, 3])
    assert tokens == [11, END] and stats.generated_tokens == 2 and stats.finish_reason == "stop"
    channel = SPECIAL_TOKENS["<|channel|>"]
    assert run(ScriptedModel([[11, END, channel, 12, RETURN, 99]]), [1, 2, 3])[0] == [11, END, channel, 12, RETURN]
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


def test_a_prompt_or_settings_of_another_shape_are_named_or_taken_as_mlx_lm_takes_them():
    """Engine.generate("text") failed inside with "'<=' not supported between int and str", an
    mx.array prompt with "[convert] Only length-1 arrays...", a dict of settings with an
    AttributeError, and Engine(prefill_step=0) with ZeroDivisionError: text and a bad step are
    named; a 1-D array of ids and a dict of settings are taken (mlx-lm's generate takes both)."""
    assert run(ScriptedModel([[11, RETURN]]), mx.array([1, 2, 3]))[0] == [11, RETURN]
    engine = Engine(ScriptedModel([[11, RETURN]]))
    assert list(engine.generate([1, 2, 3], {"temperature": 0, "max_tokens": 1})) == [11]
    for prompt, says in (("hello", "got text"), (mx.array([[1, 2]]), "got array of shape \\(1, 2\\)"), ([1, "2"], "list of token ids")):
        with pytest.raises(TypeError, match=says):
            engine.generate(prompt, SamplingParams())
    with pytest.raises(ValueError, match="prefill_step must be a whole number >= 1"):
        Engine(ScriptedModel([[7]]), prefill_step=0)


def test_no_model_instructions_outside_the_prompt_and_a_prompt_past_the_context_are_named():
    """A tester's (helper-156): Engine(None) was "'NoneType' object has no attribute 'config'";
    instructions=999 for a 3-token prompt (or -1) was taken; token_budget after a prompt past
    the context was -999967232."""
    with pytest.raises(TypeError, match="model must be a loaded model .* got NoneType"):
        Engine(None)
    engine = Engine(ScriptedModel([[11, RETURN]] * 3))
    for bad in (999, -1, 1.5, True):
        with pytest.raises(ValueError, match="instructions must be a whole number of tokens from 0 to the prompt's 3"):
            engine.generate([1, 2, 3], {"max_tokens": 1}, instructions=bad)
        with pytest.raises(ValueError, match="instructions must be"):
            engine.prefill([1, 2, 3], instructions=bad)
    assert list(engine.generate([1, 2, 3], {"temperature": 0, "max_tokens": 1}, instructions=3)) == [11]
    assert engine.token_budget(10**9, SamplingParams(max_tokens=5)) == 0


# ------------------------------------------------------------------ prompt cache
@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hf"], mx.float32)


def fresh_logits(model, prompt):
    return np.array(model(mx.array([prompt]))[0, -1])


def test_a_cache_of_another_batch_or_no_cache_at_all_is_named(model):
    """model(ids, cache=5) said "object of type 'int' has no len()", and a batch of 2 on a cache
    made for one failed in MLX's [concatenate]."""
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="the cache holds 1 sequence\\(s\\) and the ids have 2 rows"):
        model(mx.array([[4], [5]]), cache=cache)
    with pytest.raises(ValueError, match="the cache must be the model's own, one per layer .* got int 5"):
        model(mx.array([[4]]), cache=5)


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


def test_the_same_prompt_after_a_reply_feeds_one_token(model):
    """A retry or a regenerated reply: the ring wrapped during the first reply, and the snapshot
    one token before the prompt's end brings it back, instead of the previous turn's."""
    engine = Engine(model)
    first = [(i * 13) % 500 for i in range(40)]
    list(engine.generate(first, SamplingParams(temperature=0, max_tokens=10)))
    prompt = first + [(i * 17) % 500 for i in range(30)]
    reply = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=20)))
    again = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=20)))
    assert engine.stats.reused_tokens == len(prompt) - 1
    assert again == reply
    logits = np.array(engine.prefill(prompt))
    np.testing.assert_allclose(logits[0], fresh_logits(model, prompt), atol=FP32_ATOL)


# One turn of a conversation against the cache: which earlier prompt it continues, how much of
# that prompt and of the reply it keeps (a retry keeps all of the prompt and none of the reply;
# a follow-up the prompt, maybe part of the reply, then new tokens), how many new tokens, and how
# long a reply it gets (the window is 8: most replies wrap the rings).
TURNS = st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1), st.integers(0, 20), st.integers(0, 12),
                           st.integers(1, 12)), min_size=2, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=TURNS)
def test_any_series_of_turns_gives_the_logits_of_a_fresh_run(model, turns):
    """Retries, follow-ups, edits of an earlier turn, in any order: the cache rewinds (by
    trimming or to a snapshot) and every prompt's logits are those of the model without a cache."""
    engine = Engine(model)
    history = [([(i * 31) % 500 for i in range(20)], [])]  # (prompt, reply)
    for which, keep, reply_kept, new, reply_len in turns:
        prompt, reply = history[which % len(history)]
        prompt = prompt[:max(1, round(keep * len(prompt)))] + reply[:reply_kept] + [
            (7 * len(history) + 3 * i) % 500 for i in range(new)]
        logits = np.array(engine.prefill(prompt))
        np.testing.assert_allclose(logits[0], fresh_logits(model, prompt), atol=FP32_ATOL)
        reply = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=reply_len)))
        assert engine.stats.reused_tokens == len(prompt) - 1  # the prefill just before left it there
        history.append((prompt, reply))


def serve_turn(engine, pool, prompt, instructions=0, reply_len=6):
    """One request as the server's scheduler runs it, on the engine thread: a cache from the
    pool, the prompt prefilled (its logits and the tokens reused returned), a greedy reply, the
    cache back in the pool."""
    return engine_thread().call(_serve_turn, engine, pool, prompt, instructions, reply_len)


def _serve_turn(engine, pool, prompt, instructions, reply_len):
    pc = pool.take(prompt)
    prefill = Prefill(engine, pc, prompt, instructions)
    while (logits := prefill.step(5)) is None:  # small chunks, as between other sequences' steps
        pass
    engine.prompt_cache = pc
    list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=reply_len)))
    pool.put(engine.prompt_cache)
    return np.array(logits), prefill.reused


def test_a_new_conversation_with_the_same_instructions_starts_from_a_fork(model):
    """Two conversations with the same 30-token instructions (longer than the window of 8): the
    second starts from the first's snapshot at their end; the first goes on from its own cache."""
    engine, pool = Engine(model), PromptCachePool(model, 1 << 30)
    instructions = [(i * 11) % 500 for i in range(30)]
    first = instructions + [(i * 3 + 1) % 500 for i in range(20)]
    logits, reused = serve_turn(engine, pool, first, len(instructions))
    assert reused == 0
    second = instructions + [(i * 5 + 2) % 500 for i in range(25)]
    logits, reused = serve_turn(engine, pool, second, len(instructions))
    assert reused == len(instructions)
    np.testing.assert_allclose(logits[0], fresh_logits(model, second), atol=FP32_ATOL)
    follow_up = first + [7, 8, 9]  # the first conversation's cache is still its own
    logits, reused = serve_turn(engine, pool, follow_up)
    assert reused == len(first)
    np.testing.assert_allclose(logits[0], fresh_logits(model, follow_up), atol=FP32_ATOL)


def test_a_retry_of_an_earlier_turn_starts_from_a_fork_at_that_turn(model):
    engine, pool = Engine(model), PromptCachePool(model, 1 << 30)
    turn1 = [(i * 7) % 500 for i in range(40)]
    serve_turn(engine, pool, turn1, reply_len=12)
    turn2 = engine.prompt_cache.tokens + [(i * 9) % 500 for i in range(20)]
    serve_turn(engine, pool, turn2, reply_len=12)
    edited = turn1 + [(i * 13) % 500 for i in range(15)]  # turn 2 edited: a new reply to turn 1
    logits, reused = serve_turn(engine, pool, edited)
    assert reused == len(turn1)
    np.testing.assert_allclose(logits[0], fresh_logits(model, edited), atol=FP32_ATOL)


def test_forks_leave_the_pool_room_for_every_conversation(model):
    """A plain request (its instructions end with the system message every prompt starts with),
    then ten conversations with their own instructions, each forked from the system message,
    then each one's follow-up: each continues its own cache. (Every fork kept its donor fresh,
    and eight entries held about four conversations: the follow-ups reused the system message.)"""
    engine, pool = Engine(model), PromptCachePool(model, 1 << 30)
    system = [(i * 11) % 500 for i in range(12)]
    serve_turn(engine, pool, system + [1, 2, 3], len(system), reply_len=2)
    conversations = []
    for k in range(10):
        instructions = system + [(k * 37 + i * 7) % 500 for i in range(10)]
        prompt = instructions + [4, 5, k]
        assert serve_turn(engine, pool, prompt, len(instructions), reply_len=2)[1] == len(system)
        conversations.append(list(engine.prompt_cache.tokens))
    for tokens in conversations:
        follow_up = tokens + [9, 9]
        assert serve_turn(engine, pool, follow_up, reply_len=2)[1] == len(tokens)


def test_a_server_across_machines_never_forks_its_caches(model):
    """Rank 0 alone would fork: the followers would prefill a fresh cache for it."""
    pool = PromptCachePool(model, 1 << 30, forks=False)
    engine = Engine(model)
    instructions = [(i * 11) % 500 for i in range(30)]
    serve_turn(engine, pool, instructions + [1, 2, 3], len(instructions))
    assert serve_turn(engine, pool, instructions + [4, 5, 6], len(instructions))[1] == 0


# A request to the server: which instructions it has (of two), whether it continues an earlier
# conversation (which one, keeping how much of its last prompt and reply) or starts a new one,
# how many new tokens, how long a reply.
REQUESTS = st.lists(st.tuples(st.integers(0, 1), st.integers(-2, 6), st.floats(0, 1), st.integers(0, 8),
                              st.integers(1, 15), st.integers(1, 10)), min_size=2, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=REQUESTS, entries=st.integers(1, 4))
def test_any_series_of_requests_gives_the_logits_of_a_fresh_run(model, requests, entries):
    """New conversations, follow-ups, edits and retries of earlier turns, in any order, through
    a pool of at most ``entries`` caches that forks them: every prompt's logits are those of
    the model without a cache, and a new conversation reuses its instructions whenever a cache
    with them is in the pool."""
    engine, pool = Engine(model), PromptCachePool(model, 1 << 30, max_entries=entries)
    instructions = [[(i * 11) % 500 for i in range(20)], [(i * 11) % 500 for i in range(12)] + [3] * 9]
    history = []  # (instructions, prompt, reply)
    for which, earlier, keep, reply_kept, new, reply_len in requests:
        text = [(17 * len(history) + 5 * i) % 500 for i in range(new)]
        if earlier < 0 or not history:  # a new conversation
            mine = instructions[which]
            prompt = mine + text
        else:
            mine, last, reply = history[earlier % len(history)]
            prompt = last[:max(len(mine) + 1, round(keep * len(last)))] + reply[:reply_kept] + text
        held = [pc.tokens[:len(mine)] == mine and len(mine) in pc.snapshots for pc in pool._caches.values()]
        logits, reused = serve_turn(engine, pool, prompt, len(mine), reply_len)
        np.testing.assert_allclose(logits[0], fresh_logits(model, prompt), atol=FP32_ATOL)
        if any(held):
            assert reused >= len(mine)
        history.append((mine, prompt, engine.prompt_cache.tokens[len(prompt):]))


def test_chunked_prefill_matches(model):
    engine = Engine(model, prefill_step=16)
    prompt = [(i * 13) % 500 for i in range(100)]
    np.testing.assert_allclose(np.array(engine.prefill(prompt))[0], fresh_logits(model, prompt),
                               atol=FP32_ATOL)


# ------------------------------------------------------------------ limits
@pytest.mark.parametrize("bad", [0, -1, 4097, 131073, 1.5, True])
def test_max_context_is_checked_against_the_model(bad):
    with pytest.raises(ValueError, match=r"max_context must be a whole number of tokens from 1 to 4096 "
                                         r"\(the model's max_position_embeddings\)"):
        Engine(ScriptedModel([[7]], max_context=4096), max_context=bad)
    assert Engine(ScriptedModel([[7]], max_context=4096), max_context=4096).max_context == 4096


def test_token_ids_outside_the_vocabulary_are_refused(model, tiny_config):
    with pytest.raises(ValueError, match=f"token id 200006 is outside the model's vocabulary of {tiny_config.vocab_size}"):
        Engine(model).prefill([1, 2, 200006])


@pytest.mark.parametrize("ids, says", [
    (mx.array([[1000000000]]), "token id 1000000000 is outside"),  # one token: the embedding segfaulted
    (mx.array([[5, 512]]), "token id 512 is outside"),
    ([[3, -1]], "token id -1 is outside"),
    (np.array([[7, 600]]), "token id 600 is outside"),
    (mx.array([1, 2, 3]), r"must be a \(batch, length\) array .* got shape \(3,\)"),
    (mx.zeros((1, 0), dtype=mx.int32), r"got shape \(1, 0\)"),
    (mx.array([[1.0, 2.0]]), "token ids must be integers, got mlx.core.float32"),
    ([[1, 2], [3]], r"must be a \(batch, length\) array of integers"),
    ([[2**70]], "got one beyond 64 bits"),  # MLX's std::bad_cast
    ([[]], r"got shape \(1, 0\)")])  # was named float32
def test_the_model_names_wrong_token_ids_instead_of_reading_past_its_embedding(model, ids, says):
    """model(ids, cache=...) with an id outside the vocabulary gave NaN or meaningless logits, or
    (10**9) ended the process with a segfault; a 1-D array or numpy ids, a raw error."""
    with pytest.raises((ValueError, TypeError), match=says):
        model(ids, cache=model.make_cache())
    good = model(np.array([[1, 2, 3]]), cache=model.make_cache())  # numpy ids are taken as they are
    np.testing.assert_array_equal(np.array(good), np.array(model(mx.array([[1, 2, 3]]))))


def test_a_cache_that_is_not_one_per_layer_is_refused(model):
    """A cache list cut short ran the model on that many layers without a word; a list of
    other things gave an AttributeError."""
    for cache in (model.make_cache()[:2], [], model.make_cache() + model.make_cache(), [0] * len(model.layers)):
        with pytest.raises(ValueError, match=rf"one per layer \({len(model.layers)}\), got {len(cache)} entries"
                                             ".*make it with model.make_cache"):
            model(mx.array([[1, 2]]), cache=cache)


# ------------------------------------------------------------------ the engine thread
def test_engine_thread_calls_and_streams_with_errors_raised_here():
    thread = EngineThread()
    try:
        assert thread.call(lambda: threading.current_thread().name) == "gptoss-mlx-engine"
        with pytest.raises(KeyError, match="boom"):
            thread.call(lambda: {}["boom"])
        lazy = thread.call(lambda: mx.arange(4) * 2)  # built there, evaluated before it comes back
        assert lazy.tolist() == [0, 2, 4, 6]

        def made_there():
            yield threading.current_thread().name
            yield thread.call(lambda: "inline")  # from the engine thread itself: runs inline
            raise RuntimeError("failed mid-stream")

        items = thread.stream(made_there())
        assert next(items) == "gptoss-mlx-engine" and next(items) == "inline"
        with pytest.raises(RuntimeError, match="failed mid-stream"):
            next(items)
    finally:
        thread.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        thread.call(lambda: None)


def test_the_engine_thread_gets_the_gil_back_within_its_switch_interval():
    # A front end's thread holding the GIL would delay each decode step by up to Python's
    # default 5 ms (a whole token's step): starting the engine thread lowers it, never raises it.
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        EngineThread().shutdown()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S, rel=0.05) and SWITCH_INTERVAL_S <= 0.001
        sys.setswitchinterval(0.0001)  # a lower one set by the application stays
        EngineThread().shutdown()
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
    finally:
        sys.setswitchinterval(before)


def test_closing_a_stream_stops_the_generator_there_and_waits_for_its_clean_up():
    thread = EngineThread()
    cleaned_up = []

    def endless():
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            cleaned_up.append(threading.current_thread().name)

    try:
        items = thread.stream(endless())
        assert [next(items) for _ in range(3)] == [1, 2, 3]
        items.close()
        assert cleaned_up == ["gptoss-mlx-engine"]  # already done when close() returns
    finally:
        thread.shutdown()


def test_astream_delivers_on_the_event_loop():
    thread = EngineThread()

    async def collect():
        return [x async for x in thread.astream(iter(range(5)))]

    try:
        assert asyncio.run(collect()) == [0, 1, 2, 3, 4]
    finally:
        thread.shutdown()


def test_generate_from_two_threads_matches_one_thread(model):
    """Tokens made on the engine thread, whichever thread asks; the cache is reused across them."""
    prompt = [(i * 7) % 500 for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=8)
    reference = Engine(model)
    first = list(reference.generate(prompt, params))
    follow = prompt + first + [5, 6, 7]
    second = list(reference.generate(follow, params))

    engine = Engine(model)
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
        assert a.submit(lambda: list(engine.generate(prompt, params))).result() == first
        assert b.submit(lambda: list(engine.generate(follow, params))).result() == second
    assert engine.stats.reused_tokens >= len(prompt)


def test_ctrl_c_during_a_long_prefill_stops_at_the_next_chunk(model, ctrl_c):
    """The consumer's Ctrl-C waited for the whole prefill (minutes for a long prompt on a slow
    machine): the prefill now stops between chunks, and the cache keeps what it had read."""
    import signal

    engine = Engine(SlowChunks(model, 0.2), max_context=4096, prefill_step=16)
    prompt = list(range(1, 16 * 20 + 2))  # 20 chunks: 4 s
    # Ctrl-C, to the thread that handles it (os.kill may wake another thread first)
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4)):
            pass
    assert time.monotonic() - started < 1.5
    assert engine.stats.finish_reason == "interrupted"
    kept = len(engine.prompt_cache.tokens)
    assert 0 < kept < len(prompt) and engine.prompt_cache.tokens == prompt[:kept]
    # The same prompt again continues from there, and gives what an uninterrupted run gives.
    again = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4)))
    assert engine.stats.reused_tokens == kept
    assert again == list(Engine(model, max_context=4096).generate(prompt, SamplingParams(temperature=0, max_tokens=4)))


def test_stop_asked_during_the_prefill_ends_the_reply_without_tokens(model):
    engine = Engine(SlowChunks(model, 0.2), max_context=4096, prefill_step=16)
    asked = threading.Timer(0.5, lambda: stop.set())
    stop = threading.Event()
    asked.start()
    started = time.monotonic()
    tokens = list(engine.generate(list(range(1, 16 * 20 + 2)), SamplingParams(max_tokens=4), stop=stop.is_set))
    assert tokens == [] and engine.stats.finish_reason == "interrupted"
    assert time.monotonic() - started < 1.5


def test_stop_asked_during_the_decode_ends_the_reply_at_the_next_token(model):
    """A tester's (helper-146): stop() was asked only during the prefill: set after 3 tokens, the
    reply went on to its 300. And stop=True (no function) was taken and never looked at."""
    stop = threading.Event()
    tokens = []
    engine = Engine(model, max_context=4096)
    for token in engine.generate([1, 2, 3], SamplingParams(max_tokens=300, seed=1), stop_tokens=frozenset(),
                                 stop=stop.is_set):
        tokens.append(token)
        if len(tokens) == 3:
            stop.set()
    # (the engine's thread makes tokens ahead of the reader: those made before it saw stop() come too)
    assert 3 <= len(tokens) < 300 and engine.stats.finish_reason == "interrupted", len(tokens)
    with pytest.raises(TypeError, match="stop must be a function returning True to stop"):
        Engine(model).generate([1, 2, 3], SamplingParams(max_tokens=3), stop=True)


def test_a_logits_processor_that_returns_no_logits_is_named(model):
    """A tester's (helper-146): a processor returning None was an AttributeError from the sampler,
    a narrower shape MLX's broadcast error, and one function instead of a list 'not iterable'."""
    engine = Engine(model, max_context=4096)
    for processors, says in (([lambda tokens, logits: None], "got NoneType"),
                             ([lambda tokens, logits: logits[:, :10]], "got one of shape (1, 10)"),
                             (lambda tokens, logits: logits, "logits_processors must be a list of functions")):
        with pytest.raises(TypeError, match=re.escape(says)):
            list(engine.generate([1, 2, 3], SamplingParams(max_tokens=3), logits_processors=processors))
    assert len(list(engine.generate([1, 2, 3], SamplingParams(max_tokens=3), stop_tokens=frozenset()))) == 3


def test_greedy_sampling_takes_the_float32_token_without_a_cast():
    """Greedy sampling adds the banned-id mask in the logits' own dtype (bf16 here): the token
    is the one the float32 logits give, ties (the first) and a banned id at the top included,
    and the step's graph has no cast (a kernel a token on a GPU)."""
    import re
    import tempfile
    from pathlib import Path

    from gptoss_mlx.generate import banned_token_mask, make_sampler

    vocab = 201088
    sample = make_sampler(SamplingParams(temperature=0), vocab)
    mx.random.seed(4)
    for i in range(40):
        logits = (mx.random.normal((1, vocab)) * 3).astype(mx.bfloat16)
        if i % 2:
            logits = mx.round(logits)  # many ties at the top
        logits[0, 200010] = 1000.0  # a reserved id: never sampled
        expected = mx.argmax(logits.astype(mx.float32) + banned_token_mask(vocab), axis=-1)
        assert sample(logits).item() == expected.item() != 200010
    with tempfile.TemporaryDirectory() as tmp:
        mx.export_to_dot(str(Path(tmp) / "g.dot"), sample(logits))
        assert "AsType" not in re.findall(r'label ="(\w+)"', (Path(tmp) / "g.dot").read_text())


def test_the_greedy_sampler_runs_one_kernel_where_kernels_run(monkeypatch):
    """As on a GPU backend (the kernel standing in as its reference): greedy sampling is one
    launch of greedy_token, with the mask in the logits' dtype, and gives the same tokens."""
    from gptoss_mlx.generate import make_sampler
    from gptoss_mlx.kernels import registry

    launched = []

    def launch(spec, *args):
        launched.append((spec.name, args[1].dtype))
        return list(spec.reference(*args))

    vocab = 201088
    sample = make_sampler(SamplingParams(temperature=0), vocab)
    logits = (mx.random.normal((3, vocab), key=mx.random.key(2)) * 3).astype(mx.bfloat16)
    expected = sample(logits)
    monkeypatch.setenv(registry.ENV_VAR, "on")
    monkeypatch.setattr(registry, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(registry.KernelSpec, "launch", launch)
    registry.reset()
    try:
        assert mx.array_equal(sample(logits), expected).item()
    finally:
        registry.reset()
    assert launched == [("greedy_token", mx.bfloat16)]


def test_a_temperature_or_top_p_past_float32s_small_end_samples_the_likeliest_token():
    """A tester's (helper-135): temperature 1e-40 (inside OpenAI's 0-2) was refused below the
    request checks, a 500; a top_p under float32's smallest value was 0 there, so every token was
    dropped and one was drawn uniformly. Both are the greedy token, as 1e-30 already was."""
    logits = mx.random.normal((1, 300), key=mx.random.key(3)) * 4
    greedy = make_sampler(SamplingParams(temperature=0), 300)(logits).item()
    for params in (SamplingParams(temperature=1e-40), SamplingParams(temperature=5e-324),
                   SamplingParams(temperature=1.0, top_p=1e-46), SamplingParams(temperature=1.0, top_p=5e-324)):
        drawn = {make_sampler(params, 300)(logits, mx.random.key(seed)).item() for seed in range(8)}
        assert drawn == {greedy}, params
