"""Running requests on the engine: admission (a bounded number of requests in flight, 429 when
full), continuous batching on the engine thread, and a pool of prompt caches so that a
conversation's follow-up reuses the cache its previous turn left.

Requests enter through :meth:`Scheduler.generate` (a prompt and sampling parameters in, token
ids out). On the engine thread one loop runs every admitted sequence: each step it prefills
newcomers, oldest first, within a budget of prompt tokens (while others decode a small one, so
a long prompt never stops them for its whole length), then runs one decode step for all the sequences past their prefill: one forward pass over their
B current tokens, each row attending to its own cache (``cache.merge_caches``), each sampled with
its own parameters, random key, logits processors and stop conditions. A sequence joins the
batch when its prefill ends and leaves it at a stop token, its max_tokens, or the step after its
client went away; it then returns its cache to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import mlx.core as mx

from ..cache import merge_caches
from ..engine_thread import engine_thread
from ..generate import (Engine, NonFiniteLogitsError, Prefill, PromptCache, SamplingParams,
                        SequenceSampler, Stats, common_prefix, end_reason, token_budget)
from ..harmony import STOP_TOKENS_FOR_SAMPLING
from .errors import APIError

log = logging.getLogger("gptoss_mlx.server")

RETRY_AFTER_S = 1
# Prompt tokens prefilled per step while other sequences are decoding: each step's decode waits
# for this chunk. Alone, a prompt goes in the engine's full prefill_step chunks.
INTERLEAVED_CHUNK = 512


@dataclass
class Run:
    """One generation: what to run, and afterwards its statistics."""
    prompt: list[int]
    params: SamplingParams
    logits_processors: list = field(default_factory=list)  # see generate.SequenceSampler
    stats: Stats | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def cache_bytes(pc: PromptCache) -> int:
    """Memory a prompt cache holds: its layers' keys and values, and its ring snapshots."""
    arrays = [a for c in pc.cache for a in c.state]
    arrays += [a for snap in pc.snapshots.values() for s in snap if isinstance(s, tuple)
               for a in s[1:] if a is not None]
    return sum(a.nbytes for a in arrays)


class PromptCachePool:
    """Prompt caches of recent conversations, least recently used evicted first, within
    ``max_bytes`` and ``max_entries``. Used on the engine thread only.

    A cache continues a conversation when the new prompt extends the last prompt it was filled
    with (its newest snapshot): the engine then rewinds it to there at most (the turn's dropped
    reasoning) and prefills only the new messages, sliding-window layers included. A prompt that
    continues none of them gets a fresh cache, so one client never destroys another's."""

    def __init__(self, model, max_bytes: int, max_entries: int = 8):
        self.model, self.max_bytes, self.max_entries = model, max_bytes, max_entries
        self._caches: OrderedDict[int, PromptCache] = OrderedDict()

    def take(self, prompt: list[int]) -> PromptCache:
        best, best_len = None, 0
        for key, pc in self._caches.items():
            n = common_prefix(pc.tokens, prompt)
            if n >= max(pc.snapshots) and n > best_len:
                best, best_len = key, n
        if best is None:
            return PromptCache(self.model.make_cache())
        return self._caches.pop(best)

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
        self.pool = PromptCachePool(engine.model, cache_bytes)
        self.max_concurrency = max_concurrency
        self.interleaved_chunk = interleaved_chunk
        self.in_flight = 0
        self.steps: Counter[int] = Counter()  # decode steps taken, by batch size
        self._lock = threading.Lock()  # guards _waiting and _looping
        self._waiting: deque[Sequence] = deque()
        self._looping = False  # whether the engine loop runs (or is queued to)
        self._prefilling: list[Sequence] = []  # engine thread only, from here on
        self._rows: list[Sequence] = []  # the decode batch, in the order of its caches' rows
        self._batch: list | None = None  # per layer, the rows' batch cache
        self._turn = asyncio.Lock()  # an engine that cannot batch: one generation at a time

    def admit(self) -> "Slot":
        """Admit a request for its whole life (queued, generating, streaming), or raise 429."""
        if self.in_flight >= self.max_concurrency:
            raise APIError(429, f"the server is busy: {self.max_concurrency} requests are in flight "
                           "(--max-concurrency); retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        return Slot(self)

    @property
    def batch_size(self) -> int:
        """Sequences in the decode batch now."""
        return len(self._rows)

    async def generate(self, run: Run) -> AsyncIterator[int]:
        """The run's tokens (stop tokens included), made on the engine thread. Leaving the loop
        early (a disconnect) takes the sequence out of the batch at the next step; this returns
        once it has (``run.stats`` is final then)."""
        if not self.engine.batches:
            async for token in self._generate_alone(run):
                yield token
            return
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self._enqueue(Sequence(run, lambda entry: loop.call_soon_threadsafe(out.put_nowait, entry)))
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
            self._rows, self._prefilling, self._batch = [], [], None
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
        """Prefill newcomers, oldest first, within one step's budget of prompt tokens: while
        others decode a small one (they wait for it), else a full chunk. A newcomer whose prompt
        is all in samples its first token and joins the batch."""
        budget = self.interleaved_chunk if self._rows else self.engine.prefill_step
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            try:
                if seq.prefill is None:
                    seq.start(self.engine, self.pool.take(seq.run.prompt))
                before = len(seq.pc.tokens)
                logits = seq.prefill.step(budget)
                budget -= len(seq.pc.tokens) - before
            except ValueError as e:  # a prompt the model cannot take, or NaN logits: this one fails
                self._prefilling.remove(seq)
                if seq.pc is not None and not isinstance(e, NonFiniteLogitsError):
                    self.pool.put(seq.pc)  # refused before any work: the cache is as it was
                seq.put(("error", e))
                continue
            if logits is not None:
                self._prefilling.remove(seq)
                self._join(seq, logits)

    def _join(self, seq: "Sequence", logits: mx.array) -> None:
        seq.pending = seq.sampler(logits)
        mx.async_eval(seq.pending)
        rows = merge_caches([seq.pc.cache])
        if self._batch is None:
            self._batch = rows
        else:
            for layer, row in zip(self._batch, rows):
                layer.extend(row)
        self._rows.append(seq)

    def _decode(self) -> None:
        """Queue the next decode step, then hand out the tokens of the step before it (the
        host waits for those while the next one runs)."""
        # A row whose token in flight is its last, or whose client has gone, leaves first.
        leaving = [s for s in self._rows if s.run.cancelled.is_set() or s.generated + 1 >= s.budget]
        self._leave(leaving)
        ready = [*self._rows, *(s for s in leaving if not s.run.cancelled.is_set())]
        for seq in leaving:
            if seq.run.cancelled.is_set():
                self._finish(seq, "interrupted")
        fed = self._rows
        if fed:
            tokens = mx.concatenate([s.pending for s in fed])  # (B,)
            logits = self.engine.model(tokens[:, None], cache=self._batch)[:, -1, :]  # (B, V)
            nexts = [s.sampler(logits[i : i + 1]) for i, s in enumerate(fed)]
            mx.async_eval(nexts)
            for seq in fed:
                seq.pc.tokens.append(-1)  # its pending token, whose id comes below
            self.steps[len(fed)] += 1
        if not ready:
            return
        now = time.perf_counter()
        done = []
        for seq, token in zip(ready, mx.concatenate([s.pending for s in ready]).tolist()):
            seq.deliver(token, now, len(fed) if seq in fed else None)
            if token in STOP_TOKENS_FOR_SAMPLING:
                done.append((seq, "stop"))
            elif seq.generated == seq.budget:
                done.append((seq, end_reason(seq.run.params, seq.budget)))
        for i, seq in enumerate(fed):
            seq.pending = nexts[i]
        self._leave([seq for seq, _ in done if seq in self._rows])
        for seq, reason in done:
            self._finish(seq, reason)

    def _leave(self, seqs: list["Sequence"]) -> None:
        """Take ``seqs`` out of the batch, each with its own cache again."""
        if not seqs:
            return
        for seq in seqs:
            i = self._rows.index(seq)
            seq.pc.cache = [layer.extract(i) for layer in self._batch]
        keep = [i for i, s in enumerate(self._rows) if s not in seqs]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
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
    """One run on the engine thread: its prompt cache, prefill, sampler, token in flight and
    statistics."""

    def __init__(self, run: Run, put: Callable[[tuple], None]):
        self.run, self.put = run, put  # put: ("token", id), ("error", exception) or ("end", None)
        self.stats = Stats(prompt_tokens=len(run.prompt))
        self.pc: PromptCache | None = None
        self.prefill: Prefill | None = None
        self.pending: mx.array | None = None  # the next token, (1,), being computed
        self.generated = 0
        self.steps = 0  # decode steps fed, and the batch sizes summed over them
        self.rows_summed = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.sampler: SequenceSampler | None = None
        self.budget = 0

    def start(self, engine: Engine, pc: PromptCache) -> None:
        """On the engine thread: its prefill into ``pc``, its sampler, its token budget."""
        run = self.run
        self.pc = pc
        self.prefill = Prefill(engine, pc, run.prompt)
        self.stats.reused_tokens = self.prefill.reused
        self.sampler = SequenceSampler(run.params, engine.model.config.vocab_size, run.prompt,
                                       run.logits_processors)
        self.budget = token_budget(run.params, engine.max_context, len(run.prompt))

    def deliver(self, token: int, now: float, batch_size: int | None) -> None:
        """Hand out the token in flight; ``batch_size``: that of the step it was just fed to."""
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
        self.put(("token", token))


class Slot:
    """A request's place among the ``max_concurrency`` in flight; released exactly once."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def release(self) -> None:
        if self._scheduler is not None:
            self._scheduler.in_flight -= 1
            self._scheduler = None
