"""Continuous batching in the server: sequences decoded in one batch give exactly the tokens they
give alone, join and leave it between steps, keep their own sampling, seeds and stop conditions,
and a newcomer's long prompt is prefilled between the others' decode steps."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import mlx.core as mx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FP32_ATOL
from gptoss_mlx.cache import KVCache, merge_caches
from gptoss_mlx.engine_thread import engine_thread
from gptoss_mlx.generate import Engine, Prefill, PromptCache, SamplingParams, forward
from gptoss_mlx.loading import load, load_model
from gptoss_mlx.server import Scheduler
from gptoss_mlx.server.scheduler import Run
from gptoss_mlx.tokenizer import SPECIAL_TOKENS
from test_server import client, eventually_served, serving


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hf"])  # vocabulary 512, window 8: prompts outgrow the ring


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load(tiny_checkpoint)


def greedy_step(model, tokens: mx.array, cache) -> tuple[mx.array, mx.array]:
    """One decode step for tokens (B,): (logits (B, V), the greedy next tokens (B,))."""
    logits = model(tokens[:, None], cache=cache)[:, -1, :]
    return logits, mx.argmax(logits, axis=-1)


SEQUENCES = st.lists(st.tuples(st.integers(1, 30), st.integers(0, 6), st.integers(1, 8)),
                     min_size=1, max_size=5)  # (prompt length, step it joins at, steps in the batch)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequences=SEQUENCES)
def test_a_decode_batch_computes_what_each_sequence_computes_alone(model, sequences):
    """Rows join after their prefill and leave at their own step; a row that leaves goes on alone
    from its extracted cache. Every logit equals the sequence's own decode, alone throughout."""
    prompts = [[(13 * i + 7 * j) % 500 for j in range(n)] for i, (n, _, _) in enumerate(sequences)]
    extra = 2  # steps alone after leaving the batch

    def alone(prompt, steps):
        pc = PromptCache(model.make_cache())
        y = mx.argmax(forward(model, pc, prompt), axis=-1)
        out = []
        for _ in range(steps):
            logits, y = greedy_step(model, y, pc.cache)
            out.append(logits)
        return out

    expected = [alone(p, steps + extra) for p, (_, _, steps) in zip(prompts, sequences)]
    got = [[] for _ in sequences]
    rows, batch, tokens = [], None, None
    for t in range(max(join + steps for _, join, steps in sequences) + 1):
        for i, (_, join, _) in enumerate(sequences):
            if join == t:  # prefilled alone, then joins
                pc = PromptCache(model.make_cache())
                y = mx.argmax(forward(model, pc, prompts[i]), axis=-1)
                row = merge_caches([pc.cache])
                if batch is None:
                    batch, tokens = row, y
                else:
                    for layer, new in zip(batch, row):
                        layer.extend(new)
                    tokens = mx.concatenate([tokens, y])
                rows.append(i)
        if not rows:
            continue
        logits, tokens = greedy_step(model, tokens, batch)
        for r, i in enumerate(rows):
            got[i].append(logits[r : r + 1])
        leaving = [r for r, i in enumerate(rows) if len(got[i]) == sequences[i][2]]
        for r in leaving:  # the rest of its decode alone, from its own cache again
            cache, y = [layer.extract(r) for layer in batch], tokens[r : r + 1]
            # each takes its own storage along, not the longest row's
            assert all(c.keys.shape[2] == (-(-c.offset // KVCache.step) * KVCache.step
                                           if isinstance(c, KVCache) else c.window) for c in cache)
            for _ in range(extra):
                step_logits, y = greedy_step(model, y, cache)
                got[rows[r]].append(step_logits)
        keep = [r for r in range(len(rows)) if r not in leaving]
        if leaving and keep:
            for layer in batch:
                layer.filter(keep)
            tokens = tokens[mx.array(keep)]
        elif leaving:
            batch = None
        rows = [rows[r] for r in keep]
    for want, have in zip(expected, got):
        assert len(want) == len(have)
        assert all(mx.array_equal(a, b).item() for a, b in zip(want, have))


# -- through the server


def concurrently(*calls):
    """Run the calls in threads started together; their results in order."""
    results = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i):
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def chat(c, prompt: str, **kw):
    """(content, reasoning, finish_reason, completion tokens) of one request."""
    r = c.chat.completions.create(model="gpt-oss-tiny", messages=[{"role": "user", "content": prompt}], **kw)
    message = r.choices[0].message
    return (message.content or "", getattr(message, "reasoning_content", None) or "",
            r.choices[0].finish_reason, r.usage.completion_tokens)


@pytest.fixture(scope="module")
def served(tiny):
    scheduler = Scheduler(Engine(tiny[0], max_context=4096), max_concurrency=8, cache_bytes=1 << 30)
    with serving(*tiny, scheduler=scheduler) as url:
        yield client(url), scheduler


def test_each_sequence_keeps_its_sampling_parameters_and_seed_in_a_batch(served):
    c, scheduler = served
    settings_ = [dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2),
                 dict(temperature=0.7, top_p=0.5, seed=1), dict(temperature=0), dict(temperature=1.0, seed=1)]
    calls = [lambda s=s: chat(c, "Tell me a story", max_tokens=24, **s) for s in settings_]
    alone = [call() for call in calls]
    steps = scheduler.steps.copy()
    together = concurrently(*calls)
    assert together == alone  # a seeded sample is the same alone and in a batch
    assert alone[0] == alone[4] and len({a[:2] for a in alone[:4]}) == 4  # seeds and settings matter
    assert max(scheduler.steps - steps) >= 4  # and they were decoded together


def test_stop_strings_and_max_tokens_end_each_sequence_on_its_own(served):
    c, scheduler = served
    text = chat(c, "Name a river", max_tokens=40, temperature=0)[0]
    stop = text[12:15]
    assert len(text) > 20 and stop
    steps = scheduler.steps.copy()
    cut, short, long = concurrently(
        lambda: chat(c, "Name a river", max_tokens=40, temperature=0, stop=[stop]),
        lambda: chat(c, "Name a lake", max_tokens=5, temperature=0),
        lambda: chat(c, "Name a sea", max_tokens=40, temperature=0))
    assert cut[0] == text[:text.find(stop)] and cut[2] == "stop"
    assert (short[2], short[3]) == ("length", 5) and (long[2], long[3]) == ("length", 40)
    assert max(scheduler.steps - steps) >= 2


def test_a_client_that_leaves_frees_its_row_while_the_others_go_on(tiny):
    scheduler = Scheduler(Engine(tiny[0], max_context=4096), max_concurrency=2, cache_bytes=1 << 30)
    with serving(*tiny, scheduler=scheduler) as url:
        c = client(url)
        streams = [c.chat.completions.create(model="gpt-oss-tiny", max_tokens=3000, stream=True,
                                             messages=[{"role": "user", "content": text}])
                   for text in ("Go on", "Keep going")]
        a, b = (iter(s) for s in streams)
        for _ in range(5):
            next(a), next(b)
        assert scheduler.batch_size == 2
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="gpt-oss-tiny", max_tokens=2, messages=[{"role": "user", "content": "Me"}])
        streams[0].close()  # the first client goes away mid-reply
        deadline = time.monotonic() + 10
        while scheduler.batch_size != 1:
            assert time.monotonic() < deadline, "the row of the client that left was never freed"
            next(b)
        for _ in range(20):  # the other one goes on
            next(b)
        assert scheduler.batch_size == 1
        assert eventually_served(c).usage.completion_tokens == 2  # its admission slot is free too
        streams[1].close()
        deadline = time.monotonic() + 10
        while scheduler.batch_size:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_long_prompt_is_prefilled_between_the_others_decode_steps(tiny):
    scheduler = Scheduler(Engine(tiny[0], max_context=8192), max_concurrency=2, cache_bytes=1 << 30,
                          interleaved_chunk=64)
    with serving(*tiny, scheduler=scheduler) as url:
        c = client(url)
        first = c.chat.completions.create(model="gpt-oss-tiny", max_tokens=3000, stream=True,
                                          messages=[{"role": "user", "content": "Go on"}])
        chunks = iter(first)
        for _ in range(3):
            next(chunks)
        steps = sum(scheduler.steps.values())
        r = c.chat.completions.create(model="gpt-oss-tiny", max_tokens=1,
                                      messages=[{"role": "user", "content": "word " * 1500}])
        decoded = sum(scheduler.steps.values()) - steps
        assert r.usage.prompt_tokens > 1500
        # its ~1500 prompt tokens went in 64-token chunks, each followed by a decode step of the
        # first stream (in one piece the first stream would have waited for all of it)
        assert decoded >= r.usage.prompt_tokens // 64 - 2
        for _ in range(5):
            next(chunks)  # and it still streams
        first.close()


def test_a_short_prompt_does_not_wait_behind_a_long_one(tiny):
    """A tool's long result (or a pasted file) being prefilled held every newcomer behind it: a
    client asking a one-line question waited for all of another's 30k tokens. The prompt with
    the fewest tokens left goes first."""
    model, tokenizer = tiny
    scheduler = Scheduler(Engine(model, max_context=8192, prefill_step=64), max_concurrency=2,
                          cache_bytes=1 << 30)
    firsts = {}

    async def timed(name, text):
        run = Run(tokenizer.encode(text), SamplingParams(temperature=0, max_tokens=2))
        async for _ in scheduler.generate(run):
            firsts.setdefault(name, time.perf_counter())

    async def main():
        long = asyncio.create_task(timed("long", "word " * 3000))
        while not scheduler._prefilling:  # the long prompt's prefill has begun
            await asyncio.sleep(0.001)
        await timed("short", "Hi")
        await long

    asyncio.run(main())
    assert firsts["short"] < firsts["long"]


def test_beside_decoding_sequences_a_prompt_goes_in_chunks_sized_by_time(tiny, monkeypatch):
    """Each decode step of the others waits for the chunk of a newcomer's prompt: a fixed 512
    tokens made them wait seconds a token on a slow machine (0.2 tok/s beside an 11k-token prompt
    on a CPU). The chunk is what takes about INTERLEAVED_S at the measured rate (here a model
    slowed to 2 ms a prompt token: about 50 tokens), never fewer than MIN_INTERLEAVED."""
    from gptoss_mlx.server import scheduler as sched

    model, tokenizer = tiny
    real_call = type(model).__call__

    def slow(self, inputs, *args, **kwargs):
        if inputs.shape[-1] > 1:  # prefill: 2 ms a token
            time.sleep(0.002 * inputs.shape[-1])
        return real_call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", slow)
    chunks = []  # (budget, whether others were decoding)
    real_step = Prefill.step

    def step(self, max_tokens=None):
        chunks.append((max_tokens, bool(scheduler._rows)))
        return real_step(self, max_tokens)

    monkeypatch.setattr(Prefill, "step", step)
    scheduler = Scheduler(Engine(model, max_context=8192, prefill_step=256), max_concurrency=2, cache_bytes=1 << 30)
    assert scheduler.interleaved_chunk == sched.INTERLEAVED_CHUNK == 512

    async def main():
        first = Run(tokenizer.encode("Go on " * 40), SamplingParams(temperature=0, max_tokens=4000))
        stream = scheduler.generate(first)
        await stream.__anext__()  # decoding, its prompt's chunk measured
        long = Run(tokenizer.encode("word " * 800), SamplingParams(temperature=0, max_tokens=1))
        await collect(scheduler, long)
        first.cancelled.set()
        await stream.aclose()

    asyncio.run(main())
    beside = [budget for budget, decoding in chunks if decoding]
    assert len(beside) > 10, chunks
    assert all(sched.MIN_INTERLEAVED <= b <= 80 for b in beside), beside
    assert scheduler.prefill_rate < 600


def test_alone_a_long_prompt_goes_in_chunks_of_about_a_second(tiny, monkeypatch):
    """A newcomer waits for the chunk under way, and a client that leaves is noticed after it:
    2048 tokens took 15 s on a slow CPU (the re-attack, helper-127). Alone, a chunk is about
    ALONE_S at the measured rate (here a model slowed to 2 ms a prompt token: about 500 tokens,
    not the engine's 2048), never fewer than MIN_ALONE."""
    from gptoss_mlx.server import scheduler as sched

    model, tokenizer = tiny
    real_call = type(model).__call__

    def slow(self, inputs, *args, **kwargs):
        if inputs.shape[-1] > 1:
            time.sleep(0.002 * inputs.shape[-1])
        return real_call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", slow)
    budgets = []
    real_step = Prefill.step
    monkeypatch.setattr(Prefill, "step", lambda self, n=None: budgets.append(n) or real_step(self, n))
    scheduler = Scheduler(Engine(model, max_context=8192), max_concurrency=2, cache_bytes=1 << 30)
    assert scheduler.engine.prefill_step == 2048

    async def main():
        await collect(scheduler, Run(tokenizer.encode("Go on " * 60), SamplingParams(temperature=0, max_tokens=1)))
        budgets.clear()  # (that one's chunk was sized before any rate was known)
        await collect(scheduler, Run(tokenizer.encode("word " * 900), SamplingParams(temperature=0, max_tokens=1)))

    asyncio.run(main())
    assert len(budgets) >= 3 and all(sched.MIN_ALONE <= b <= 800 for b in budgets), budgets


async def collect(scheduler, run) -> list[int]:
    """A run's tokens, straight from the scheduler (no HTTP)."""
    return [t async for t in scheduler.generate(run)]


def test_logits_processors_steer_their_own_sequence_only(tiny):
    """Run.logits_processors (mlx-lm's convention) see their sequence's ids so far and change
    only its logits; the sequence beside it in the batch is untouched."""
    model, tokenizer = tiny
    scheduler = Scheduler(Engine(model, max_context=4096), max_concurrency=2, cache_bytes=1 << 30)
    forced = tokenizer.encode("A")[0]
    seen = []

    def only_forced(tokens, logits):
        seen.append(tokens.shape[0])
        return mx.where(mx.arange(logits.shape[-1]) == forced, logits, -mx.inf)

    def run(text, processors=()):
        return Run(tokenizer.encode(text), SamplingParams(temperature=0, max_tokens=12), list(processors))

    async def main():
        alone = await collect(scheduler, run("Name a colour"))
        steps = scheduler.steps.copy()
        steered, beside = await asyncio.gather(collect(scheduler, run("Name a colour", [only_forced])),
                                               collect(scheduler, run("Name a colour")))
        return alone, steered, beside, scheduler.steps - steps

    alone, steered, beside, shared = asyncio.run(main())
    assert steered == [forced] * 12 and beside == alone != steered
    prompt = len(tokenizer.encode("Name a colour"))
    assert seen == list(range(prompt, prompt + 12)) and max(shared) == 2
    solo = scheduler.engine.generate(tokenizer.encode("Hi"), SamplingParams(temperature=0, max_tokens=5),
                                     logits_processors=[only_forced])
    assert list(solo) == [forced] * 5  # Engine.generate takes them too


def test_sequences_leave_the_batch_with_their_caches_whole(tiny_checkpoint):
    """One samples a stop token (forced by a processor) while fed to the next step, the other
    runs to max_tokens: each leaves its cache in the pool holding exactly what it was fed, and a
    follow-up on it prefills only its new tokens and computes what a fresh model computes."""
    model, tokenizer = load(tiny_checkpoint, dtype=mx.float32)
    engine = Engine(model, max_context=4096)
    scheduler = Scheduler(engine, max_concurrency=2, cache_bytes=1 << 30)
    first, second = tokenizer.encode("Name a colour " * 20), tokenizer.encode("Name a river " * 20)
    stop = SPECIAL_TOKENS["<|return|>"]

    def stop_after_5(tokens, logits):
        if tokens.shape[0] < len(first) + 5:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == stop, logits, -mx.inf)

    runs = [Run(first, SamplingParams(temperature=0, max_tokens=12), [stop_after_5]),
            Run(second, SamplingParams(temperature=0, max_tokens=12))]

    async def main():
        steps = scheduler.steps.copy()
        outs = await asyncio.gather(*(collect(scheduler, r) for r in runs))
        return outs, scheduler.steps - steps

    (stopped, full), shared = asyncio.run(main())
    assert len(stopped) == 6 and stopped[-1] == stop and len(full) == 12 and max(shared) == 2
    assert [r.stats.finish_reason for r in runs] == ["stop", "length"]

    def follow_up(turn2):
        prefill = Prefill(engine, scheduler.pool.take(turn2), turn2)
        while (logits := prefill.step()) is None:
            pass
        fresh = model(mx.array([turn2]))[:, -1]
        mx.eval(logits, fresh)
        return prefill.reused, logits, fresh

    # the stop token was fed to the step queued beside it; the last token of a full reply was not
    for turn1, reply, fed in ((first, stopped, len(stopped)), (second, full, len(full) - 1)):
        reused, logits, fresh = engine_thread().call(follow_up, turn1 + reply + tokenizer.encode(" more"))
        assert reused == len(turn1) + fed
        assert mx.allclose(logits, fresh, atol=FP32_ATOL).item()


# -- the one-step lag: step n+1 is queued with step n's tokens before the host has read them


STOP = SPECIAL_TOKENS["<|return|>"]
LAST = 1000  # the counting model's last token before it stops


class CountingModel:
    """The tiny model's caches and shapes, with logits that make the next token the fed one
    plus 1, and <|return|> after LAST: a prompt ending in token p gives p+1 .. LAST, <|return|>,
    so each sequence's reply and the step it stops at are known in advance."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kw):
        logits = self.model(inputs, cache=cache, **kw)  # (B, L, V): updates the caches
        target = mx.where(inputs >= LAST, STOP, inputs + 1)[..., None]
        return mx.where(mx.arange(logits.shape[-1]) == target, 0.0, -1e9) + 0 * logits


def counting(p: int) -> list[int]:
    return list(range(p + 1, LAST + 1)) + [STOP]


def counting_run(p: int, max_tokens: int = 64) -> Run:
    """A greedy run on ``[<|start|>, p]``, bounded so that a reply that misses its stop token
    shows as one too long."""
    return Run([200006, p], SamplingParams(temperature=0, max_tokens=max_tokens))


def assert_pool_caches_hold_what_was_fed(scheduler):
    """Every cache the scheduler gave back holds exactly the token ids it lists: a token fed
    in a step whose id was never read (an extra step after the end) would leave a -1."""
    for pc in scheduler.pool._caches.values():
        assert -1 not in pc.tokens
        assert all(c.offset == len(pc.tokens) for c in pc.cache)


@pytest.fixture
def counter(tiny):
    return Scheduler(Engine(CountingModel(tiny[0]), max_context=4096), max_concurrency=8,
                     cache_bytes=1 << 30)


def test_a_stop_token_ends_a_row_without_the_token_queued_after_it(counter):
    """Rows stop at different steps; each reply ends at its stop token although the step
    after it was already queued with that token, and the others go on."""
    starts = [LAST - 2, LAST - 9, LAST - 5, LAST]

    async def main():
        steps = counter.steps.copy()
        outs = await asyncio.gather(*(collect(counter, counting_run(p)) for p in starts))
        return outs, counter.steps - steps

    outs, shared = asyncio.run(main())
    assert outs == [counting(p) for p in starts] and max(shared) == 4
    assert_pool_caches_hold_what_was_fed(counter)


def test_max_tokens_ends_a_row_at_exactly_that_many_tokens(counter):
    limits = [1, 2, 5, 7]
    runs = [counting_run(LAST - 20, max_tokens=n) for n in limits]

    async def main():
        return await asyncio.gather(*(collect(counter, r) for r in runs))

    outs = asyncio.run(main())
    assert outs == [counting(LAST - 20)[:n] for n in limits]
    assert [r.stats.finish_reason for r in runs] == ["length"] * 4
    assert [r.stats.generated_tokens for r in runs] == limits
    assert_pool_caches_hold_what_was_fed(counter)


def test_a_client_that_leaves_mid_pipeline_gets_no_more_tokens_and_frees_its_row(counter):
    leaving, staying = counting_run(LAST - 40), counting_run(LAST - 30)

    async def main():
        got = []
        other = asyncio.ensure_future(collect(counter, staying))
        async with contextlib.aclosing(counter.generate(leaving)) as tokens:
            async for token in tokens:
                got.append(token)
                if len(got) == 3:
                    break  # a step fed with its third token's successor may be in flight
        rows_after = counter.batch_size
        return got, await other, rows_after

    got, other, rows_after = asyncio.run(main())
    assert got == counting(LAST - 40)[:3] and other == counting(LAST - 30)
    assert leaving.stats.finish_reason == "interrupted" and rows_after <= 1
    assert leaving.stats.generated_tokens in (3, 4)  # the token in flight may have been read
    assert_pool_caches_hold_what_was_fed(counter)


def test_a_sequence_joins_while_a_step_is_in_flight(counter):
    """A newcomer's prefill and first token go in between steps of a running row, whose next
    step is already queued: both replies are what they are alone."""
    first, second = counting_run(LAST - 30), counting_run(LAST - 12)

    async def main():
        late = None
        out = []
        async for token in counter.generate(first):
            out.append(token)
            if len(out) == 5:
                late = asyncio.ensure_future(collect(counter, second))
        return out, await late

    steps = counter.steps.copy()
    a, b = asyncio.run(main())
    assert a == counting(LAST - 30) and b == counting(LAST - 12)
    assert (counter.steps - steps)[2] >= 5  # they were decoded together
    assert_pool_caches_hold_what_was_fed(counter)
