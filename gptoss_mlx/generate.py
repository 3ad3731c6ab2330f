"""Token generation: chunked prefill, KV-cache decoding, sampling, stop tokens, a context guard,
and a prompt cache that reuses the longest common prefix across turns.

    engine = Engine(model, max_context=8192)  # from any thread: the work runs on the engine thread
    for token in engine.generate(prompt_ids, SamplingParams(temperature=1.0)):
        ...
    engine.stats  # prompt tokens, reused tokens, TTFT, prefill/decode tok/s, peak memory
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from numbers import Integral, Real
from typing import Callable, Iterator

import mlx.core as mx

from . import decode_step, kernels
from .engine_thread import engine_thread
from .harmony import STOP_TOKENS_FOR_SAMPLING, ends_reply
from .tokenizer import NUM_BPE_TOKENS, SPECIAL_TOKENS


# Bytes of attention scores one prefill chunk may need where MLX's sdpa materializes them: on
# the CPU it is composed of ops (scores, softmax, matmul). Its GPU kernels (Metal's steel
# attention, cuDNN on CUDA; sliding layers our sdpa_prefill) never hold the (chunk, keys) scores:
# a 2048-token chunk over 32768 keys needed 17 MB above its inputs on the GPU machine
# (scripts/bench_attention.py), so there the chunk keeps its full size.
ATTENTION_BUDGET = 1 << 30


# The way out of a full context, in the CLI's terms and the library's.
RAISE_CONTEXT = "raise --max-context (from Python: max_context=)"  # (memory.cli_wording)


class ContextLengthError(ValueError):
    """The prompt does not fit the context window."""


class NonFiniteLogitsError(ValueError):
    """The model computed NaN or infinite logits (corrupt weights, or float16 overflow)."""


def non_finite_message(model) -> str:
    """What NonFiniteLogitsError says: a streamed model also names where its experts are read
    from as it runs (files changed after loading are read as they are now)."""
    message = ("the model computed NaN or infinite logits: its weights are corrupt, or float16 "
               "overflowed (use bfloat16 or float32)")
    pool = getattr(model, "expert_pool", None)
    if pool is not None:
        message += (f"; its experts are read from {pool.source.directory} while it runs: if those "
                    "files changed after it was loaded, load it again")
    return message


_UNSET = object()


# Within float32, where the logits are divided: below MIN_TEMPERATURE the division overflowed
# them (and the distribution is one token's anyway): that is greedy decoding.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-30, 1e38


@dataclass
class SamplingParams:
    temperature: float = 1.0  # OpenAI's recommendation for gpt-oss: temperature 1, top_p 1
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    max_tokens: int | None = None  # None: until a stop token or the context is full

    def __setattr__(self, name: str, value) -> None:
        """A field changed later is checked as the constructor checks it (chat.sampling.
        temperature = -1 sampled the least likely tokens; max_tokens = 0 ran to the context's
        end); a bad value leaves the field as it was."""
        before = self.__dict__.get(name, _UNSET)
        object.__setattr__(self, name, value)
        if "max_tokens" in self.__dict__:  # (the constructor sets the fields in order: all there)
            try:
                self.__post_init__()
            except (TypeError, ValueError):
                if before is _UNSET:
                    object.__delattr__(self, name)
                else:
                    object.__setattr__(self, name, before)
                raise

    def __post_init__(self):
        for name, kinds, what in (("temperature", Real, "a number"), ("top_p", Real, "a number"),
                                  ("min_p", Real, "a number"), ("top_k", Integral, "a whole number"),
                                  ("seed", (Integral, type(None)), "a whole number or None"),
                                  ("max_tokens", (Integral, type(None)), "a whole number or None")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise TypeError(f"{name} must be {what}, got {value!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.temperature > MAX_TEMPERATURE:  # (the logits are divided in float32: past its range a
            # temperature became inf, and -inf / inf made the reserved ids NaN, then sampled)
            raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:g}, got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # what mx.random.seed takes
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@lru_cache(maxsize=8)
def banned_token_mask(vocab_size: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive mask: 0 for tokens the model may emit, -inf for reserved ids (gpt-oss.md 7.11).
    Built once per vocabulary size and dtype."""
    mask = mx.where(mx.arange(vocab_size) < NUM_BPE_TOKENS, 0.0, float("-inf"))
    never = SPECIAL_TOKENS["<|startoftext|>"]
    allowed = [i for i in SPECIAL_TOKENS.values() if i < vocab_size and i != never]
    if allowed:
        mask[mx.array(allowed)] = 0.0
    mask = mask.astype(dtype)
    mx.eval(mask)  # cached: evaluated, so that no thread's stream is baked into it
    return mask


def make_sampler(params: SamplingParams, vocab_size: int):
    """(logits (B, V), random key or None for MLX's global one) -> token ids (B,). Greedy at
    temperature 0 (and under MIN_TEMPERATURE)."""
    banned = banned_token_mask(vocab_size)

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        if params.temperature < MIN_TEMPERATURE:  # 0, or as good as
            # In the logits' own dtype: adding 0 or -inf is exact there and keeps their order, so
            # the token is the float32 one's, without a cast; the add and the argmax are one kernel.
            return kernels.greedy_token(logits, banned_token_mask(vocab_size, logits.dtype), NUM_BPE_TOKENS)
        logits = logits.astype(mx.float32) + banned
        logits = logits / params.temperature
        if params.top_k:
            kth = mx.sort(logits, axis=-1)[:, -min(params.top_k, logits.shape[-1])][:, None]
            logits = mx.where(logits < kth, float("-inf"), logits)
        if params.min_p:
            top = logits.max(axis=-1, keepdims=True)
            logits = mx.where(logits < top + mx.log(mx.array(params.min_p)), float("-inf"), logits)
        if params.top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            sorted_probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
            before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass ranked above each
            # keep the smallest set reaching top_p, and the likeliest token always (a top_p below
            # float32's smallest value was 0 there: every token dropped, then drawn uniformly)
            drop_sorted = (before >= params.top_p) & (mx.arange(before.shape[-1]) > 0)
            drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
            logits = mx.where(drop, float("-inf"), logits)
        return mx.random.categorical(logits, axis=-1, key=key)

    return sample


class SequenceSampler:
    """One sequence's way from logits (1, V) to its next token (1,): its logits processors, then
    its sampler with its own random key, so that a seeded sequence draws the same tokens whatever
    else runs beside it. A processor (mlx-lm's convention) is called as ``processor(tokens,
    logits)``, ``tokens`` the sequence's ids so far (prompt included), and returns logits.

    ``tokens`` was evaluated with the token before: read in place (``memoryview(tokens)``) it is
    there at once, while an op on it (a slice) would queue behind the step's forward and wait for
    it, and the processor's work would no longer overlap the forward's."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: list[int],
                 logits_processors=None):
        self.sample = make_sampler(params, vocab_size)
        self.greedy = params.temperature < MIN_TEMPERATURE
        # a seed gives the key; otherwise one drawn from the engine thread's generator (MLX's random
        # state is per thread: mx.random.seed in another thread does not reach it; pass seed=)
        self.key = (mx.random.key(params.seed) if params.seed is not None
                    else mx.random.randint(0, 1 << 31, (2,)).astype(mx.uint32))
        if callable(logits_processors) or not isinstance(logits_processors, (list, tuple, type(None))):
            raise TypeError(f"logits_processors must be a list of functions (processor(tokens, logits) -> logits), "
                            f"got {type(logits_processors).__name__}")
        self.processors = list(logits_processors or [])
        self.tokens = mx.array(prompt) if self.processors else None

    def __call__(self, logits: mx.array) -> mx.array:
        if self.processors:
            # The step's forward is queued first: the processors (a grammar's mask, computed on
            # the CPU) then run while the device computes it.
            mx.async_eval(logits)
        for processor in self.processors:
            shape = logits.shape
            logits = processor(self.tokens, logits)
            if not isinstance(logits, mx.array) or logits.shape != shape:  # (None: an AttributeError from the sampler)
                raise TypeError(f"a logits processor must return the logits, an mx.array of shape {shape}, got "
                                + (f"one of shape {logits.shape}" if isinstance(logits, mx.array) else type(logits).__name__))
        key = None
        if not self.greedy:
            self.key, key = mx.random.split(self.key)
        y = self.sample(logits, key)
        if self.processors:
            self.tokens = mx.concatenate([self.tokens, y.astype(self.tokens.dtype)])
            mx.async_eval(self.tokens)  # with y, before anything else is queued
        return y

    def stop_reason(self) -> str:
        """Why a sequence that sampled a stop token ended: "stop", or "length" when a processor
        shortened it to fit the token budget (its ``cut_short``: a structured answer closed
        early, valid but not what the model would have written)."""
        return "length" if any(getattr(p, "cut_short", False) for p in self.processors) else "stop"


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens found in the prompt cache
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str | None = None  # "stop", "length", "context", "interrupted"
    batch_size: float = 1.0  # sequences per decode step it took part in, on average (server)

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token's time is the TTFT
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens ({self.reused_tokens} cached), "
                f"TTFT {self.ttft_s:.2f}s, prefill {self.prefill_tps:.0f} tok/s, "
                f"{self.generated_tokens} tokens at {self.decode_tps:.1f} tok/s, "
                f"peak {self.peak_memory_gb:.2f} GB")


@dataclass
class PromptCache:
    """The model's KV cache, the tokens it holds, and snapshots to rewind sliding layers to.

    A ring buffer cannot be rewound by more than one token (its older keys are overwritten), so
    snapshots are taken at the end of every prefill (the next turn usually diverges right after
    it: earlier reasoning is dropped from the history) and one token before it (the same prompt
    again, a retry or a regenerated reply, feeds its last token again for the logits), and at
    the end of a prompt's instructions when the caller names it (``Prefill``'s
    ``instructions``): that one is kept while later ones come and go, so that a new
    conversation with the same instructions can start from a :meth:`fork` there.
    """

    cache: list
    tokens: list[int] = field(default_factory=list)
    snapshots: dict[int, list] = field(default_factory=dict)
    max_snapshots: int = 16  # two a turn
    instructions: int = 0  # the snapshot at the end of the instructions, kept (0: none)

    def __post_init__(self):
        self.take_snapshot()  # position 0: rewinding can always fall back to an empty cache

    def rewind_to(self, keep: int) -> int:
        """Drop cached tokens past ``keep``; returns how many remain (possibly fewer)."""
        extra = len(self.tokens) - keep
        if extra <= 0:
            return len(self.tokens)
        if all(c.can_trim(extra) for c in self.cache):
            for c in self.cache:
                c.trim(extra)
        else:
            keep = max(p for p in self.snapshots if p <= keep)
            for c, state in zip(self.cache, self.snapshots[keep]):
                c.restore(state)
        del self.tokens[keep:]
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= keep}
        return keep

    def clear(self, cache: list) -> None:
        """Start over from ``cache`` (empty)."""
        self.cache, self.tokens, self.snapshots = cache, [], {}
        self.take_snapshot()

    def recover(self) -> None:
        """After a pass that failed part-way, whose first layers took its tokens and the others
        not: back to the latest snapshot at or before the tokens held (the end of the last
        prefill, usually), where every layer agrees, so the next turn reuses what came before."""
        keep = max(p for p in self.snapshots if p <= len(self.tokens))
        for c, state in zip(self.cache, self.snapshots[keep]):
            c.restore(state)
        del self.tokens[keep:]
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= keep}

    def take_snapshot(self) -> None:
        self.snapshots[len(self.tokens)] = [c.snapshot() for c in self.cache]
        while len(self.snapshots) > self.max_snapshots:
            del self.snapshots[min(p for p in self.snapshots if p not in (0, self.instructions))]

    def fork(self, keep: int) -> "PromptCache":
        """A new prompt cache holding this one's first ``keep`` tokens, ``keep`` one of its
        snapshots; this one is left as it is (the two share no state either writes)."""
        snapshots = {p: s for p, s in self.snapshots.items() if p <= keep}
        cache = [c.fork(state) for c, state in zip(self.cache, snapshots[keep])]
        return PromptCache(cache, self.tokens[:keep], snapshots, self.max_snapshots,
                           self.instructions if self.instructions <= keep else 0)


def check_max_context(max_context: int | None, limit: int) -> int:
    """The context window to use: ``max_context`` tokens, or the model's ``limit``
    (config ``max_position_embeddings``) when None; anything outside 1..limit is a ValueError."""
    if max_context is None:
        return limit
    if isinstance(max_context, bool) or not isinstance(max_context, int) or not 0 < max_context <= limit:
        raise ValueError(f"max_context must be a whole number of tokens from 1 to {limit} "
                         f"(the model's max_position_embeddings), got {max_context!r}")
    return max_context


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start (slices compared first: a pool of
    long conversations is scanned for every request)."""
    n, i, step = min(len(a), len(b)), 0, 2048
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prompt_ids(prompt) -> list[int]:
    """A prompt as a list of token ids (a list or tuple of ints, or a 1-D array of them: mlx-lm
    takes an mx.array), or a TypeError naming what it is instead."""
    if isinstance(prompt, (str, bytes)):
        raise TypeError("prompt must be token ids, got text: tokenize it first (tokenizer.encode, or "
                        "harmony's rendering of a conversation)")
    ids = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # (an array: a host copy)
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, Integral) and not isinstance(t, bool) for t in ids):
        shape = f" of shape {tuple(prompt.shape)}" if hasattr(prompt, "shape") else ""
        raise TypeError(f"prompt must be a list of token ids (ints), got {type(prompt).__name__}{shape}")
    return [int(t) for t in ids]


def sampling_params(value, name: str = "params") -> SamplingParams | None:
    """``value`` (a SamplingParams, a dict of its fields, or None) as a SamplingParams or None;
    a TypeError naming ``name`` for anything else."""
    if isinstance(value, dict):
        return SamplingParams(**value)  # a TypeError names a key it does not have
    if value is not None and not isinstance(value, SamplingParams):
        raise TypeError(f"{name} must be a SamplingParams or a dict of its fields, got {type(value).__name__}")
    return value


class Engine:
    """Runs a model over a growing token sequence with a reusable KV cache.

    Any thread may call it: :meth:`generate`, :meth:`prefill` and :meth:`reset` run on the
    process's engine thread (gptoss_mlx/engine_thread.py), where all MLX work happens."""

    batches = True  # whether the server may run it in a decode batch (distributed.Leader: no)
    forks = True  # whether the server may fork its prompt caches (distributed.Leader: no)

    def __init__(self, model, max_context: int | None = None, prefill_step: int = 2048,
                 compile_decode: bool | None = None):
        """``compile_decode``: run decode steps compiled (decode_step.py) where the model allows;
        None: as ``GPTOSS_MLX_COMPILE`` says (decode_step.enabled: on the CPU, on a GPU only when asked)."""
        check_model(model)
        self.model = model
        if max_context is None:  # load(max_context=...) planned the memory for that many tokens
            max_context = getattr(model, "planned_context", None)
        self.max_context = check_max_context(max_context, model.config.max_position_embeddings)
        if isinstance(prefill_step, bool) or not isinstance(prefill_step, int) or prefill_step < 1:
            raise ValueError(f"prefill_step must be a whole number >= 1 (tokens a prefill chunk holds), "
                             f"got {prefill_step!r}")
        self.prefill_step = prefill_step
        if compile_decode is None:
            compile_decode = decode_step.enabled()
        self.compiled_decode = (decode_step.CompiledDecode(model)
                                if compile_decode and decode_step.compilable(model) else None)
        self.prompt_cache = PromptCache(model.make_cache())
        self.stats = Stats()

    def reset(self) -> None:
        engine_thread().call(self._reset)

    def _reset(self) -> None:
        self.prompt_cache = PromptCache(self.model.make_cache())

    def prefill(self, prompt: list[int], instructions: int = 0) -> mx.array:
        """Bring the cache to ``prompt``, reusing the longest common prefix; returns the logits
        for the token after it (evaluated when called from another thread than the engine's).
        ``instructions``: the length of the prompt's system and developer messages, where the
        cache keeps a snapshot for the next conversation that has them (see :class:`Prefill`)."""
        check_instructions(instructions, _prompt_ids(prompt))
        return engine_thread().call(self._prefill, prompt, instructions)

    def _prefill(self, prompt: list[int], instructions: int = 0,
                 stop: Callable[[], bool] | None = None) -> mx.array | None:
        """``stop()`` true between two chunks: None, the cache holding the chunks so far (a later
        prompt with the same beginning reuses them)."""
        prefill = Prefill(self, self.prompt_cache, prompt, instructions)
        self.stats = Stats(prompt_tokens=len(prompt), reused_tokens=prefill.reused)
        try:
            while (logits := prefill.step()) is None:
                if stop is not None and stop():
                    return None
        except NonFiniteLogitsError:
            self.reset()  # the cache holds the same NaNs
            raise
        return logits

    def _chunk_size(self, cached: int) -> int:
        """Prefill chunk: ``prefill_step`` tokens; on the CPU fewer late in a long prompt, so
        that attention scores (heads x chunk x keys, float32) stay within ATTENTION_BUDGET."""
        if mx.default_device() != mx.cpu:
            return self.prefill_step
        heads = getattr(self.model.config, "num_attention_heads", 64)
        keys = cached + self.prefill_step
        fit = ATTENTION_BUDGET // (4 * heads * keys)
        return max(128, min(self.prefill_step, fit))

    def generate(self, prompt: list[int], params: SamplingParams | None = None,
                 stop_tokens=STOP_TOKENS_FOR_SAMPLING, logits_processors=None,
                 instructions: int = 0, stop: Callable[[], bool] | None = None) -> Iterator[int]:
        """Yield sampled tokens until a stop token (yielded too), max_tokens or the context end.
        They are made on the engine thread; closing the iterator stops at the next token, or
        during the prompt's prefill at the next chunk, as ``stop()`` becoming true does (then
        nothing is yielded: a long prompt never holds a Ctrl-C for its whole prefill).
        ``logits_processors``: see :class:`SequenceSampler`; ``instructions``: see :meth:`prefill`.
        ``prompt``: token ids (a list, or a 1-D ``mx.array`` as mlx-lm takes); ``params``: a
        SamplingParams or a dict of its fields."""
        prompt, params = _prompt_ids(prompt), sampling_params(params)
        check_instructions(instructions, prompt)
        if stop is not None and not callable(stop):  # (stop=True was taken and never looked at)
            raise TypeError(f"stop must be a function returning True to stop (such as an Event's is_set), "
                            f"got {type(stop).__name__}")
        return engine_thread().stream(
            self._generate(prompt, params, stop_tokens, logits_processors, instructions, stop))

    def _generate(self, prompt: list[int], params: SamplingParams | None, stop_tokens,
                  logits_processors=None, instructions: int = 0,
                  stop: Callable[[], bool] | None = None) -> Iterator[int]:
        """The decoding loop, on the engine thread. The next step's graph is built and queued before the host waits for the current
        token, so the GPU never idles on Python (asynchronous evaluation)."""
        params = params or SamplingParams()
        sampler = SequenceSampler(params, self.model.config.vocab_size, prompt, logits_processors)
        mx.reset_peak_memory()
        start = time.perf_counter()
        thread = engine_thread()
        logits = self._prefill(prompt, instructions,
                               stop=lambda: thread.cancelled() or (stop is not None and stop()))
        if logits is None:  # stopped during the prefill: the consumer left, or stop() said so
            self.stats.finish_reason = "interrupted"
            return
        y = sampler(logits)
        mx.async_eval(y)
        stats = self.stats
        budget = token_budget(params, self.max_context, len(prompt))
        first_token_at = None
        previous = None
        try:
            for n in range(1, budget + 1):
                next_y = None
                if n < budget:
                    # queue the next step before blocking on this token
                    next_y = sampler(self._forward_async(y))
                    mx.async_eval(next_y)
                token = y.item()
                if next_y is not None:
                    self.prompt_cache.tokens[-1] = token
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    stats.prefill_s = stats.ttft_s = first_token_at - start
                if ends_reply(previous, token):  # <|start|> and another role than the assistant's
                    stats.finish_reason = sampler.stop_reason()
                    break
                stats.generated_tokens = n
                yield token
                if token in stop_tokens:
                    stats.finish_reason = sampler.stop_reason()
                    break
                if stop is not None and stop():  # (it was asked only in the prefill: 300 tokens after it said stop)
                    stats.finish_reason = "interrupted"
                    break
                y, previous = next_y, token
            else:
                stats.finish_reason = end_reason(params, budget)
        except GeneratorExit:
            stats.finish_reason = "interrupted"
            raise
        finally:
            if first_token_at is not None:
                stats.decode_s = time.perf_counter() - first_token_at
            stats.peak_memory_gb = mx.get_peak_memory() / 1e9

    def token_budget(self, prompt_tokens: int, params: SamplingParams) -> int:
        """Tokens a generation after a ``prompt_tokens``-token prompt may make at most."""
        return token_budget(params, self.max_context, prompt_tokens)

    def _forward_async(self, y: mx.array) -> mx.array:
        """Queue one decode step for token ``y``, whose id the host does not know yet."""
        cache = self.prompt_cache.cache
        try:
            logits = self.compiled_decode(y, cache) if self.compiled_decode else None
            if logits is None:
                logits = self.model(y.reshape(1, 1), cache=cache, sampled=True)[:, -1, :]
        except Exception:  # a streamed expert's file failed, say: no layer may keep the token
            self.prompt_cache.recover()
            raise
        self.prompt_cache.tokens.append(-1)  # the caller writes the id once it has it
        return logits


def token_budget(params: SamplingParams, max_context: int, prompt_tokens: int) -> int:
    """How many tokens a reply may have: max_tokens, or what is left of the context (none, not
    a negative count, after a prompt past it: a tester's, helper-156)."""
    return max(0, min(params.max_tokens or max_context, max_context - prompt_tokens))


def check_model(model) -> None:
    """A TypeError naming what was passed where a loaded model belongs (Engine(None) was an
    AttributeError about 'config', helper-156)."""
    if not hasattr(model, "config") or not callable(model):
        raise TypeError(f"model must be a loaded model (model, tokenizer = gptoss_mlx.load(...)), "
                        f"got {type(model).__name__}")


def check_instructions(instructions, prompt: list[int]) -> None:
    """``instructions`` (the length of a prompt's system and developer messages) within it."""
    if isinstance(instructions, bool) or not isinstance(instructions, int) or not 0 <= instructions <= len(prompt):
        raise ValueError(f"instructions must be a whole number of tokens from 0 to the prompt's "
                         f"{len(prompt)}, got {instructions!r:.40}")


def end_reason(params: SamplingParams, budget: int) -> str:
    """Why a reply that used its whole budget ended: "length" (max_tokens) or "context"."""
    return "length" if params.max_tokens and budget == params.max_tokens else "context"


# Prefill chunks of up to this many tokens are evaluated as one graph (see Prefill.step).
EVALUATE_ALL_LAYERS_UP_TO = 128


def forward(model, pc: PromptCache, tokens: list[int], evaluate_layers: bool = False) -> mx.array:
    """Feed tokens through the model (updating the cache); logits of the last one, (1, V). If
    the pass fails part-way (a streamed expert's file, say), the cache goes back to its last
    snapshot (PromptCache.recover)."""
    try:
        logits = model(mx.array([tokens]), cache=pc.cache, evaluate_layers=evaluate_layers)
    except Exception:
        pc.recover()
        raise
    pc.tokens.extend(tokens)
    return logits[:, -1, :]


class Prefill:
    """Bringing a prompt cache to a prompt, reusing their longest common prefix, a chunk at a
    time: :meth:`Engine.prefill` runs every chunk at once, the server's scheduler interleaves them
    with other sequences' decode steps. All but the last token go in bounded chunks that evaluate
    only the cache (the unembedding, 201088 x 2880, never runs for them); the last token alone
    gives the logits."""

    def __init__(self, engine: Engine, pc: PromptCache, prompt: list[int], instructions: int = 0):
        """``instructions``: the length of the prompt's instructions (its leading system and
        developer messages): the cache takes a snapshot there (see :class:`PromptCache`)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = engine.model.config.vocab_size
        if not 0 <= min(prompt) <= max(prompt) < vocab:  # out of range, the embedding reads past its end
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab} ids: "
                             "the tokenizer does not belong to this checkpoint")
        if len(prompt) >= engine.max_context:
            raise ContextLengthError(
                f"the conversation is {len(prompt)} tokens but the context limit is "
                f"{engine.max_context}: start a new chat, shorten it, or {RAISE_CONTEXT}")
        self.engine, self.pc, self.prompt = engine, pc, prompt
        self.reused = pc.rewind_to(min(common_prefix(pc.tokens, prompt), len(prompt) - 1))  # feed >= 1
        self.rest = prompt[self.reused:-1]
        self.instructions = instructions if self.reused <= instructions < len(prompt) else 0

    def step(self, max_tokens: int | None = None) -> mx.array | None:
        """Prefill the next chunk (at most ``max_tokens``), and the last token once the rest is
        in: then returns the logits for the token after the prompt (1, V), before that None."""
        pc, model = self.pc, self.engine.model
        self._snapshot_instructions()
        if self.rest:
            size = min(self.engine._chunk_size(len(pc.tokens)), max_tokens or self.engine.prefill_step)
            if self.instructions > len(pc.tokens):  # the chunk ends there, for its snapshot
                size = min(size, self.instructions - len(pc.tokens))
            chunk, self.rest = self.rest[:size], self.rest[size:]
            # A long chunk is evaluated layer by layer, which bounds its temporaries to one
            # layer's; a short one (a newcomer's message) in one go: 24 waits for the device
            # fewer, and its layers' temporaries (about 0.8 GB at 128 tokens on 20b) fit in the
            # memory plan's working allowance (memory.WORKING_BYTES).
            forward(model, pc, chunk, evaluate_layers=len(chunk) > EVALUATE_ALL_LAYERS_UP_TO)
            mx.eval([c.state for c in pc.cache])
            self._snapshot_instructions()
            if self.rest:
                return None
        if len(pc.tokens) not in pc.snapshots:  # a retry of this prompt resumes here, feeding one token
            pc.take_snapshot()
        logits = forward(model, pc, self.prompt[-1:])
        if not mx.isfinite(logits).all().item():
            raise NonFiniteLogitsError(non_finite_message(model))
        pc.take_snapshot()
        return logits

    def _snapshot_instructions(self) -> None:
        """At the end of the instructions: a snapshot there, which the cache keeps."""
        pc = self.pc
        if self.instructions and len(pc.tokens) == self.instructions:
            pc.instructions = self.instructions
            if self.instructions not in pc.snapshots:
                pc.take_snapshot()
