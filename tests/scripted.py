"""A stand-in model that "generates" fixed token scripts, for testing the engine, the Chat and
the CLI without depending on what a random model happens to sample."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from gptoss_mlx.cache import KVCache

VOCAB = 201088
START_ASSISTANT = [200006, 173781]  # <|start|>assistant, how every prompt ends
FINAL_HEADER = [200005, 17196, 200008]  # <|channel|>final<|message|>, a header the server may force


@dataclass
class ScriptConfig:
    vocab_size: int = VOCAB
    max_position_embeddings: int = 4096
    sliding_window: int = 128


class ScriptedModel:
    """The k-th reply (a new one starts after each prompt's ``<|start|>assistant``, or after its
    forced ``<|start|>assistant<|channel|>final<|message|>``) is
    ``replies[k]`` (the last one repeats). The next token continues whatever prefix of the
    current script the fed tokens end with, so prefill chunking does not matter."""

    def __init__(self, replies: list[list[int]], max_context: int = 4096):
        self.config = ScriptConfig(max_position_embeddings=max_context)
        self.replies = replies
        self.turn = -1
        self.fed: list[int] = []

    def make_cache(self):
        self.fed = []
        return [KVCache()]

    def __call__(self, inputs: mx.array, cache=None, evaluate_layers: bool = False, sampled: bool = False):
        L = inputs.shape[1]
        cache[0].update_and_fetch(*(2 * [mx.zeros((1, 1, L, 1))]))
        offset = cache[0].offset
        if not isinstance(offset, int):  # the server's decode batch (of one conversation here)
            offset = offset.item()
        del self.fed[offset - L:]  # the engine may have rewound the cache
        self.fed += inputs[0].tolist()
        progress = self._progress()
        if progress == 0 and (self.fed[-2:] == START_ASSISTANT  # a prompt ended: next reply
                              or self.fed[-5:] == START_ASSISTANT + FINAL_HEADER):  # its answer forced
            self.turn += 1
        token = self._script[progress]
        logits = mx.full((1, L, self.config.vocab_size), -1e9)
        logits[:, -1, token] = 0.0
        return logits

    @property
    def _script(self) -> list[int]:
        return self.replies[max(0, min(self.turn, len(self.replies) - 1))]

    def _progress(self) -> int:
        script = self._script
        for k in range(min(len(script) - 1, len(self.fed)), 0, -1):
            if self.fed[-k:] == script[:k]:
                return k
        return 0


class SlowChunks:
    """``model``, each prefill chunk (a pass over more than one token) taking ``pause`` s more,
    and waiting until ``hold`` (a threading.Event) is set, if given."""

    def __init__(self, model, pause: float, hold=None):
        self.model, self.pause, self.hold = model, pause, hold

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kw):
        if inputs.shape[1] > 1:
            time.sleep(self.pause)
            assert self.hold is None or self.hold.wait(timeout=60), "the test never let the chunk end"
        return self.model(inputs, cache=cache, **kw)
