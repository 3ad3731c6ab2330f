"""One rank of tests/test_distributed.py: a three-turn greedy chat with the tiny checkpoint, split
over the ranks mlx.launch's environment names (or in one process without it).

    python tests/distributed_worker.py CHECKPOINT OUT.safetensors tensor|pipeline

Rank 0 saves, per turn, the reply's tokens and the logits of a prefill of the next prompt (which
reuses the cache the turn left: its ring buffers rewound through snapshots), and every rank
saves the bytes of the parameters it holds (OUT with .rankN.json).
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import mlx.nn as nn

from gptoss_mlx import distributed
from gptoss_mlx.chat import Chat
from gptoss_mlx.engine_thread import engine_thread
from gptoss_mlx.generate import Engine, SamplingParams
from gptoss_mlx.loading import load

QUESTIONS = ["Why is the sky blue?", "And at sunset?", "Say it in one word."]


def main(checkpoint: str, out: str, sharding: str) -> None:
    group = distributed.join() if distributed.launched_backend() else None
    model, tokenizer = engine_thread().call(load, checkpoint, "float32", group=group, sharding=sharding)
    held = {name: p.nbytes for name, p in nn.utils.tree_flatten(model.parameters())}
    rank = group.rank() if group else 0
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(held, f)
    if rank > 0:
        engine_thread().call(distributed.follow, Engine(model, max_context=512), group)
        return
    engine = distributed.Leader(model, group, max_context=512) if group else Engine(model, max_context=512)
    chat = Chat(model, tokenizer, engine=engine, reasoning_effort="low",
                sampling=SamplingParams(temperature=0, max_tokens=12))
    results = {}
    for turn, question in enumerate(QUESTIONS):
        for _ in chat.send(question):
            pass
        results[f"tokens{turn}"] = mx.array(engine.prompt_cache.tokens)
        results[f"reused{turn}"] = mx.array(engine.stats.reused_tokens)
        results[f"logits{turn}"] = engine.prefill(chat.prompt_tokens())
    engine_thread().call(mx.save_safetensors, out, results)
    if group:
        engine.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
