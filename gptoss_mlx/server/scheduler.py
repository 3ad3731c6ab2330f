"""Running requests on the engine: admission (a bounded number of requests in flight, 429 when
full), continuous batching on the engine thread, and a pool of prompt caches so that a
conversation's follow-up reuses the cache its previous turn left.

Requests enter through :meth:`Scheduler.generate` (a prompt and sampling parameters in, token
ids out). On the engine thread one loop runs every admitted sequence: each step it prefills
newcomers, the one with the fewest prompt tokens left first (a one-line question waits for no
more of another's long tool result than the chunk under way, about a second), within a budget
of prompt tokens (while others decode, a chunk of about a tenth of a second, so a long prompt
never stops them for its whole length), then runs one decode step for all the sequences past
their prefill: one forward pass over their B current tokens, each row attending to its own
cache (``cache.merge_caches``), each sampled with its own parameters, random key, logits
processors and stop conditions (the plain greedy rows in one argmax). As in Engine.generate,
step n+1 is queued, fed with step n's tokens still on the device, before the host reads step
n's tokens and hands them to the clients (one call into each event loop per step). A sequence
joins the batch when its prefill ends and leaves it at a stop token, its max_tokens, or the
step after its client went away; it then returns its cache to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import AsyncIterator

import mlx.core as mx

from ..cache import merge_caches
from ..engine_thread import engine_thread
from ..generate import (Engine, NonFiniteLogitsError, Prefill, PromptCache, SamplingParams,
                        SequenceSampler, Stats, common_prefix, end_reason, make_sampler, token_budget)
from ..harmony import STOP_TOKENS_FOR_SAMPLING, ends_reply
from .errors import APIError

log = logging.getLogger("gptoss_mlx.server")

RETRY_AFTER_S = 1
# A request that finds every slot taken waits this long for one before its 429: a client that
# drops a stream and asks again at once (an agent's interrupted turn) would otherwise race the
# server's noticing of the disconnect. Slots freed meanwhile go to the waiters, oldest first.
ADMIT_WAIT_S = 2.0
# While other sequences are decoding, each of their steps waits for a chunk of a newcomer's
# prompt: the chunk is sized to take about INTERLEAVED_S, from the prefill rate of the chunks
# before it, between MIN_INTERLEAVED and INTERLEAVED_CHUNK tokens (a fixed 512 made every step of
# the others wait seconds on a slow machine: 0.2 tok/s beside an 11k-token prompt on a CPU).
# Alone, a prompt goes in chunks of about ALONE_S (at least MIN_ALONE tokens, at most the
# engine's prefill_step): a newcomer waits for the chunk under way, and so does a client's
# going away (2048 tokens took 15 s on a slow CPU).
INTERLEAVED_CHUNK = 512
INTERLEAVED_S = 0.1
MIN_INTERLEAVED = 16
ALONE_S = 1.0
MIN_ALONE = 256


@dataclass
class Run:
    """One generation: what to run, and afterwards its statistics."""
    prompt: list[int]
    params: SamplingParams
    logits_processors: list = field(default_factory=list)  # see generate.SequenceSampler
    instructions: int = 0  # the prompt's instructions' length (generate.Prefill), 0: not given
    stats: Stats | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def cache_bytes(pc: PromptCache) -> int:
    """Memory a prompt cache holds: its layers' keys and values, and its ring snapshots."""
    arrays = [a for c in pc.cache for a in c.state]
    arrays += [s[1] for snap in pc.snapshots.values() for s in snap
               if isinstance(s, tuple) and s[1] is not None]  # (offset, kv, high)
    return sum(a.nbytes for a in arrays)


class PromptCachePool:
    """Prompt caches of recent conversations, least recently used evicted first, within
    ``max_bytes`` and ``max_entries``. Used on the engine thread only.

    A cache continues a conversation when the new prompt extends the last prompt it was filled
    with (its newest snapshot): the engine then rewinds it to there at most (the turn's dropped
    reasoning) and prefills only the new messages, sliding-window layers included. A prompt that
    shares less with a cache (a new conversation with the same instructions, an edit or a retry
    of an earlier turn) starts from a fork of it at its last snapshot inside what they share,
    when ``forks``; the cache stays for its own conversation. Otherwise it gets a fresh cache, so
    one client never destroys another's."""

    def __init__(self, model, max_bytes: int, max_entries: int = 32, forks: bool = True):
        self.model, self.max_bytes, self.max_entries, self.forks = model, max_bytes, max_entries, forks
        self._caches: OrderedDict[int, PromptCache] = OrderedDict()

    def take(self, prompt: list[int]) -> PromptCache:
        """The cache to prefill ``prompt`` into: the one it continues that holds most of it, or
        a fork of the one with the longest snapshot inside what it shares with ``prompt`` if
        that holds more (the most recent of equals), or a new one. A fork keeps its donor's
        snapshots up to there, the instructions' among them: it serves the next conversation
        with those instructions as well, so the donor is not kept longer for it."""
        best = (0, False, -1, None)  # (tokens reused, whether it continues, recency, key)
        for recency, (key, pc) in enumerate(self._caches.items()):  # least recently used first
            n = common_prefix(pc.tokens, prompt)
            if n >= max(pc.snapshots):
                best = max(best, (n, True, recency, key))
            elif self.forks:
                best = max(best, (max(q for q in pc.snapshots if q <= n), False, recency, key))
        reused, continues, _, key = best
        if not reused:
            return PromptCache(self.model.make_cache())
        return self._caches.pop(key) if continues else self._caches[key].fork(reused)

    def put(self, pc: PromptCache) -> None:
        self._caches[id(pc)] = pc
        while len(self._caches) > 1 and (len(self._caches) > self.max_entries or
                                         sum(map(cache_bytes, self._caches.values())) > self.max_bytes):
            self._caches.popitem(last=False)
        if cache_bytes(pc) > self.max_bytes:  # even alone it is over the budget
            self._caches.clear()


class Scheduler:
    """Admits requests and runs their generations on ``engine``, batched."""

    def __init__(self, engine: Engine, max_concurrency: int, cache_bytes: int,
                 interleaved_chunk: int = INTERLEAVED_CHUNK):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.engine = engine
        self.pool = PromptCachePool(engine.model, cache_bytes, forks=engine.forks)
        self.max_concurrency = max_concurrency
        self.interleaved_chunk = interleaved_chunk
        self.prefill_rate: float | None = None  # prompt tokens a second, of the last chunks
        self.in_flight = 0
        self.steps: Counter[int] = Counter()  # decode steps taken, by batch size
        self._lock = threading.Lock()  # guards _waiting and _looping
        self._waiting: deque[Sequence] = deque()
        self._looping = False  # whether the engine loop runs (or is queued to)
        self._prefilling: list[Sequence] = []  # engine thread only, from here on
        self._rows: list[Sequence] = []  # the decode batch, in the order of its caches' rows
        self._batch: list | None = None  # per layer, the rows' batch cache
        self._tokens: mx.array | None = None  # (B,): each row's token in flight
        self._turn = asyncio.Lock()  # an engine that cannot batch: one generation at a time
        self._runs: list[Run] = []  # the runs under way (see close)
        self._admitting: deque[asyncio.Future] = deque()  # requests waiting for a slot, oldest first
        self.closing = False
        self.closed = asyncio.Event()  # set by close(), on the event loop

    async def admit(self) -> "Slot":
        """Admit a request for its whole life (queued, generating, streaming): at once, or when
        a slot is freed within ADMIT_WAIT_S; else raise 429. (On the event loop's thread, as is
        Slot.release.)"""
        if self.in_flight < self.max_concurrency and not self._admitting:
            self.in_flight += 1
            return Slot(self)
        handed = asyncio.get_running_loop().create_future()  # set by _free: the slot is ours
        self._admitting.append(handed)
        try:
            await asyncio.wait_for(asyncio.shield(handed), ADMIT_WAIT_S)
        except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
            pass
        except asyncio.CancelledError:  # the client went away while it waited
            if handed.done():
                Slot(self).release()  # to the next waiter
            raise
        finally:
            if not handed.done():
                self._admitting.remove(handed)
                handed.cancel()
        if handed.cancelled():
            raise APIError(429, f"the server is busy: {self.max_concurrency} requests are in flight "
                           "(--max-concurrency); retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        return Slot(self)

    def _free(self) -> None:
        """A slot is given back: to the oldest request waiting for one, else to the pool."""
        if self._admitting:
            self._admitting.popleft().set_result(None)  # in_flight stays: the slot changes hands
        else:
            self.in_flight -= 1

    def close(self) -> None:
        """The server is shutting down: every run under way stops at its next step (its client
        gets a 503 saying so), and no new one starts."""
        self.closing = True
        self.closed.set()  # a tool the server runs for a reply is not waited for
        for run in self._runs:
            run.cancelled.set()

    @property
    def running(self) -> bool:
        """Whether any run is under way (queued, prefilling or decoding)."""
        return bool(self._runs)

    @property
    def batch_size(self) -> int:
        """Sequences in the decode batch now."""
        return len(self._rows)

    async def generate(self, run: Run) -> AsyncIterator[int]:
        """The run's tokens (stop tokens included), made on the engine thread. Leaving the loop
        early (a disconnect) takes the sequence out of the batch at the next step; this returns
        once it has (``run.stats`` is final then). Stopped by :meth:`close`, it raises a 503."""
        if self.closing:
            raise shutting_down()
        self._runs.append(run)
        try:
            tokens = self._generate_batched(run) if self.engine.batches else self._generate_alone(run)
            async with contextlib.aclosing(tokens):
                async for token in tokens:
                    yield token
        finally:
            self._runs.remove(run)
        if self.closing and run.cancelled.is_set():
            raise shutting_down()

    async def _generate_batched(self, run: Run) -> AsyncIterator[int]:
        """The run as one row of the engine loop's batch."""
        out: asyncio.Queue = asyncio.Queue()
        self._enqueue(Sequence(run, asyncio.get_running_loop(), out))
        entry = ("token", None)
        try:
            while (entry := await out.get())[0] == "token":
                yield entry[1]
        finally:
            if entry[0] == "token":  # left early: wait until the engine has let the sequence go
                run.cancelled.set()
                while (entry := await out.get())[0] == "token":
                    pass
        if entry[0] == "error":
            raise entry[1]

    async def _generate_alone(self, run: Run) -> AsyncIterator[int]:
        """For an engine that cannot batch (across machines: its followers replay one
        sequence's operations): the requests take turns, each with the engine's own decoding."""
        async with self._turn:
            tokens = engine_thread().astream(self._engine_generate(run))
            try:
                async for token in tokens:
                    yield token
            finally:
                run.cancelled.set()
                await tokens.aclose()

    def _engine_generate(self, run: Run):
        """On the engine thread: the best cache for the prompt, then the engine's decoding."""
        engine = self.engine
        engine.prompt_cache = self.pool.take(run.prompt)
        stream = engine.generate(run.prompt, run.params, logits_processors=run.logits_processors)
        try:
            for token in stream:
                yield token
                if run.cancelled.is_set():
                    break
        finally:
            stream.close()
            run.stats = engine.stats
            self.pool.put(engine.prompt_cache)

    def _enqueue(self, seq: "Sequence") -> None:
        with self._lock:
            self._waiting.append(seq)
            start, self._looping = not self._looping, True
        if start:
            engine_thread().submit(self._loop)

    # -- on the engine thread

    def _loop(self) -> None:
        """Steps until no sequence is left. A failure ends every sequence with the error."""
        try:
            while self._step():
                pass
        except BaseException as e:  # noqa: BLE001 - each client gets it
            log.exception("the engine loop failed")
            with self._lock:
                failed, self._looping = [*self._rows, *self._prefilling, *self._waiting], False
                self._waiting.clear()
            self._rows, self._prefilling, self._batch, self._tokens = [], [], None, None
            for seq in failed:
                seq.put(("error", e))

    def _step(self) -> bool:
        """Admit newcomers, prefill within the step's budget, decode one step; False once there is
        nothing to do."""
        with self._lock:
            self._prefilling += self._waiting
            self._waiting.clear()
            if not self._rows and not self._prefilling:
                self._looping = False
                return False
        for seq in [s for s in self._prefilling if s.run.cancelled.is_set()]:
            self._prefilling.remove(seq)
            self._finish(seq, "interrupted")
        self._prefill()
        self._decode()
        return True

    def _prefill(self) -> None:
        """Prefill newcomers, fewest tokens left first (oldest first among equals), within one
        step's budget of prompt tokens: while others decode a small one (they wait for it:
        :meth:`interleaved_budget`), else about a second's (:meth:`alone_budget`). A newcomer
        whose prompt is all in samples its first token and joins the batch."""
        # (this step's budgets: not what its chunks measure)
        spent, interleaved, alone = 0, self.interleaved_budget(), self.alone_budget()
        while self._prefilling:
            # a newcomer that joined in this step decodes in it: the rest waits as others' would
            budget = (interleaved if self._rows else alone) - spent
            if budget <= 0:
                break
            seq = min(self._prefilling, key=Sequence.prefill_left)
            try:
                if seq.prefill is None:
                    seq.start(self.engine, self.pool.take(seq.run.prompt))
                before, started = len(seq.pc.tokens), time.perf_counter()
                logits = seq.prefill.step(budget)
                spent += len(seq.pc.tokens) - before
                self._measure(len(seq.pc.tokens) - before, time.perf_counter() - started)
            except ValueError as e:  # a prompt the model cannot take, or NaN logits: this one fails
                self._prefilling.remove(seq)
                if seq.pc is not None and not isinstance(e, NonFiniteLogitsError):
                    self.pool.put(seq.pc)  # as it was, or back at a snapshot (forward)
                seq.put(("error", e))
                continue
            if logits is not None:
                self._prefilling.remove(seq)
                self._join(seq, logits)

    def interleaved_budget(self) -> int:
        """Prompt tokens to prefill in a step while others decode: about INTERLEAVED_S's worth at
        the measured rate, within MIN_INTERLEAVED and ``interleaved_chunk``."""
        return self._timed_budget(INTERLEAVED_S, MIN_INTERLEAVED, self.interleaved_chunk)

    def alone_budget(self) -> int:
        """Prompt tokens to prefill in a step with nothing decoding: about ALONE_S's worth at the
        measured rate, within MIN_ALONE and the engine's prefill_step."""
        return self._timed_budget(ALONE_S, MIN_ALONE, self.engine.prefill_step)

    def _timed_budget(self, seconds: float, least: int, most: int) -> int:
        """About ``seconds`` of prompt tokens at the measured rate, within ``least`` and ``most``
        (``most`` before any rate is known)."""
        if self.prefill_rate is None:
            return most
        return max(min(least, most), min(most, int(self.prefill_rate * seconds)))

    def _measure(self, tokens: int, seconds: float) -> None:
        """The prefill rate, from a chunk of ``tokens`` that took ``seconds`` (it slows as the
        context grows: the average leans on the latest chunks)."""
        if tokens >= MIN_INTERLEAVED and seconds > 0:
            rate = tokens / seconds
            self.prefill_rate = rate if self.prefill_rate is None else (self.prefill_rate + rate) / 2

    def _join(self, seq: "Sequence", logits: mx.array) -> None:
        first = seq.sampler(logits)  # (1,)
        mx.async_eval(first)
        rows = merge_caches([seq.pc.cache])
        if self._batch is None:
            self._batch, self._tokens = rows, first
        else:
            for layer, row in zip(self._batch, rows):
                layer.extend(row)
            self._tokens = mx.concatenate([self._tokens, first])
        self._rows.append(seq)

    def _decode(self) -> None:
        """Queue the next decode step, fed with the rows' tokens in flight, then hand those
        tokens out: the host waits for them while the device runs the step just queued (one
        step of lag, as in Engine.generate). A row's token in flight is fed only while the row
        may go on; a row whose handed-out token ends it leaves with the token sampled for it in
        the queued step, which nobody sees."""
        rows, tokens = self._rows, self._tokens  # (B,): each row's token in flight
        # A row whose token in flight is its last, or whose client has gone, leaves unfed.
        cancelled = [s.run.cancelled.is_set() for s in rows]
        leaving = [gone or s.generated + 1 >= s.budget for s, gone in zip(rows, cancelled)]
        self._leave(leaving)
        if self._rows:
            fed = tokens if not any(leaving) else tokens[mx.array(self._kept(leaving))]
            logits = self.engine.model(fed[:, None], cache=self._batch, sampled=True)[:, -1, :]  # (B', V)
            self._tokens = self._sample(logits)
            mx.async_eval(self._tokens)
            for seq in self._rows:
                seq.pc.tokens.append(-1)  # its token in flight, whose id comes below
            self.steps[len(self._rows)] += 1
        if not rows:
            return
        now, batch_size = time.perf_counter(), len(self._rows)
        ended, out = {}, []
        for seq, gone, unfed, token in zip(rows, cancelled, leaving, tokens.tolist()):
            if gone:
                ended[seq] = "interrupted"
                continue
            seq.deliver(token, now, None if unfed else batch_size)
            if ends_reply(seq.previous, token):  # <|start|> and another role than the assistant's
                ended[seq] = seq.sampler.stop_reason()
                continue
            seq.previous = token
            out.append((seq, ("token", token)))
            if token in STOP_TOKENS_FOR_SAMPLING:
                ended[seq] = seq.sampler.stop_reason()
            elif seq.generated == seq.budget:
                ended[seq] = end_reason(seq.run.params, seq.budget)
        stopped = [seq in ended for seq in self._rows]
        if any(stopped):
            self._leave(stopped)
            if self._rows:
                self._tokens = self._tokens[mx.array(self._kept(stopped))]
        hand_out(out)
        for seq, reason in ended.items():
            self._finish(seq, reason)

    def _sample(self, logits: mx.array) -> mx.array:
        """(B, V) -> the rows' next tokens (B,): the greedy rows (no logits processors) in one
        argmax, every other row with its own sampler (its random key, its processors)."""
        own = [not s.plain_greedy for s in self._rows]
        if not any(own):
            return self._greedy(logits)
        greedy = self._greedy(logits) if not all(own) else None
        return mx.concatenate([s.sampler(logits[i : i + 1]) if own[i] else greedy[i : i + 1]
                               for i, s in enumerate(self._rows)])

    @cached_property
    def _greedy(self):
        """The greedy sampler, made on the engine thread (its mask is an MLX array)."""
        return make_sampler(SamplingParams(temperature=0), self.engine.model.config.vocab_size)

    @staticmethod
    def _kept(leaving: list[bool]) -> list[int]:
        return [i for i, gone in enumerate(leaving) if not gone]

    def _leave(self, leaving: list[bool]) -> None:
        """Take the rows marked in ``leaving`` (one flag per row) out of the batch, each with its
        own cache again."""
        if not any(leaving):
            return
        for i, (seq, gone) in enumerate(zip(self._rows, leaving)):
            if gone:
                seq.pc.cache = [layer.extract(i) for layer in self._batch]
        keep = self._kept(leaving)
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = self._tokens = None
            return
        for layer in self._batch:
            layer.filter(keep)

    def _finish(self, seq: "Sequence", reason: str) -> None:
        stats = seq.stats
        stats.finish_reason = reason
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        seq.run.stats = stats
        if seq.pc is not None:
            self.pool.put(seq.pc)
        seq.put(("end", None))


class Sequence:
    """One run on the engine thread: its prompt cache, prefill, sampler and statistics, and the
    queue on its event loop that its tokens go to."""

    def __init__(self, run: Run, loop: asyncio.AbstractEventLoop, out: asyncio.Queue):
        # out receives ("token", id), ("error", exception) or ("end", None)
        self.run, self.loop, self.out = run, loop, out
        self.stats = Stats(prompt_tokens=len(run.prompt))
        self.pc: PromptCache | None = None
        self.prefill: Prefill | None = None
        self.generated = 0
        self.previous: int | None = None  # the last token handed out
        self.steps = 0  # decode steps fed, and the batch sizes summed over them
        self.rows_summed = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.sampler: SequenceSampler | None = None
        self.plain_greedy = False
        self.budget = 0

    def start(self, engine: Engine, pc: PromptCache) -> None:
        """On the engine thread: its prefill into ``pc``, its sampler, its token budget."""
        run = self.run
        self.pc = pc
        self.prefill = Prefill(engine, pc, run.prompt, run.instructions)
        self.stats.reused_tokens = self.prefill.reused
        self.sampler = SequenceSampler(run.params, engine.model.config.vocab_size, run.prompt,
                                       run.logits_processors)
        # sampled with the other such rows of the batch, in one argmax
        self.plain_greedy = self.sampler.greedy and not self.sampler.processors
        self.budget = token_budget(run.params, engine.max_context, len(run.prompt))

    def prefill_left(self) -> int:
        """Prompt tokens still to go in (the whole prompt before its prefill starts)."""
        return len(self.run.prompt) if self.prefill is None else len(self.prefill.rest) + 1

    def put(self, entry: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the server has ended: nobody is waiting
            self.loop.call_soon_threadsafe(self.out.put_nowait, entry)

    def deliver(self, token: int, now: float, batch_size: int | None) -> None:
        """Count the token in flight as made (the caller hands it out); ``batch_size``: that of
        the step it was just fed to."""
        if batch_size is not None:
            self.pc.tokens[-1] = token
            self.steps += 1
            self.rows_summed += batch_size
        self.generated += 1
        stats = self.stats
        if self.first_token_at is None:
            self.first_token_at = now
            stats.prefill_s = stats.ttft_s = now - self.started
        stats.generated_tokens = self.generated
        stats.decode_s = now - self.first_token_at
        stats.batch_size = self.rows_summed / self.steps if self.steps else 1.0


def hand_out(entries: list[tuple[Sequence, tuple]]) -> None:
    """Put each entry into its sequence's queue, with one call into each event loop for all of
    them: each call wakes the loop's thread, which then competes for the GIL with the engine
    thread building the next step."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for seq, entry in entries:
        by_loop.setdefault(seq.loop, []).append((seq.out, entry))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
    for out, entry in batch:
        out.put_nowait(entry)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: the reply was stopped", type="server_error",
                    code="server_shutting_down")


class Slot:
    """A request's place among the ``max_concurrency`` in flight; released exactly once."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def release(self) -> None:
        if self._scheduler is not None:
            self._scheduler._free()
            self._scheduler = None
