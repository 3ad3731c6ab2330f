"""A stand-in model that "generates" a fixed token script, for testing the engine, the Chat
and the CLI without depending on what a random model happens to sample."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from gptoss_mlx.cache import KVCache

VOCAB = 201088


@dataclass
class ScriptConfig:
    vocab_size: int = VOCAB
    max_position_embeddings: int = 4096
    sliding_window: int = 128


class ScriptedModel:
    """After any prompt, emits ``replies[k]`` token by token on the k-th call to generate."""

    def __init__(self, replies: list[list[int]], max_context: int = 4096):
        self.config = ScriptConfig(max_position_embeddings=max_context)
        self.replies = replies
        self.turn = 0
        self._step = 0

    def make_cache(self):
        return [KVCache()]

    def __call__(self, inputs: mx.array, cache=None):
        B, L = inputs.shape
        cache[0].update_and_fetch(*(2 * [mx.zeros((1, 1, L, 1))]))
        return self._logits(L)

    def begin_turn(self):
        """Call before each reply (prompts in tests are one prefill chunk: one call)."""
        self.turn += 1
        self._step = 0

    def _logits(self, L: int) -> mx.array:
        script = self.replies[min(self.turn, len(self.replies) - 1)]
        token = script[min(self._step, len(script) - 1)]
        self._step += 1
        logits = mx.full((1, L, self.config.vocab_size), -1e9)
        logits[:, -1, token] = 0.0
        return logits
