"""Running requests on the engine: admission (a bounded number of requests in flight, 429 when
full), one generation at a time on the engine thread in arrival order, and a pool of prompt
caches so that a conversation's follow-up reuses the cache its previous turn left.

This is the seam for continuous batching: requests enter only through :meth:`Scheduler.generate`
(a prompt and sampling parameters in, token ids out). Today a request holds the engine from its
prefill to its last token, and waiting requests queue behind it (FIFO).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from ..engine_thread import engine_thread
from ..generate import Engine, PromptCache, SamplingParams, Stats, common_prefix
from .errors import APIError

RETRY_AFTER_S = 1


@dataclass
class Run:
    """One generation: what to run, and afterwards its statistics."""
    prompt: list[int]
    params: SamplingParams
    logits_processors: list = field(default_factory=list)  # e.g. a structured-output constraint
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
    """Admits requests and runs their generations on ``engine``, one at a time."""

    def __init__(self, engine: Engine, max_concurrency: int, cache_bytes: int):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.engine = engine
        self.pool = PromptCachePool(engine.model, cache_bytes)
        self.max_concurrency = max_concurrency
        self.in_flight = 0
        self._turn = asyncio.Lock()  # FIFO: the engine's one generation at a time

    def admit(self) -> "Slot":
        """Admit a request for its whole life (queued, generating, streaming), or raise 429."""
        if self.in_flight >= self.max_concurrency:
            raise APIError(429, f"the server is busy: {self.max_concurrency} requests are in flight "
                           "(--max-concurrency); retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        return Slot(self)

    async def generate(self, run: Run) -> AsyncIterator[int]:
        """The run's tokens (stop tokens included), made on the engine thread. Leaving the loop
        early (a disconnect) stops the generation at its next token."""
        async with self._turn:
            tokens = engine_thread().astream(self._generate(run))
            try:
                async for token in tokens:
                    yield token
            finally:
                run.cancelled.set()
                await tokens.aclose()

    def _generate(self, run: Run) -> Iterator[int]:
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


class Slot:
    """A request's place among the ``max_concurrency`` in flight; released exactly once."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def release(self) -> None:
        if self._scheduler is not None:
            self._scheduler.in_flight -= 1
            self._scheduler = None
