"""One rank of tests/test_distributed.py: a three-turn greedy chat (six tokens a reply) with a
tiny checkpoint, split over the ranks that mlx.launch's environment names (or in one process
without it), once per sharding mode.

    python tests/distributed_worker.py CHECKPOINT OUT_PREFIX tensor,pipeline

Rank 0 saves OUT_PREFIX-MODE.safetensors: per turn the tokens in the cache (prompt and reply)
and the logits of a prefill of the next prompt, which reuses the cache the turn left (its ring
buffers rewound through a snapshot). Every rank saves OUT_PREFIX-MODE.rankR.json: the bytes of
each parameter it holds, and its peak memory while loading.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from gptoss_mlx import distributed
from gptoss_mlx.chat import Chat
from gptoss_mlx.engine_thread import engine_thread
from gptoss_mlx.generate import Engine, SamplingParams
from gptoss_mlx.loading import load_model
from gptoss_mlx.tokenizer import load_tokenizer

QUESTIONS = ["Why is the sky blue?", "And at sunset?", "Say it in one word."]
CONTEXT = 512


def run(checkpoint: Path, out: str, group, sharding: str) -> None:
    rank = group.rank() if group else 0
    mx.reset_peak_memory()
    model = load_model(checkpoint, mx.float32, group=group, sharding=sharding)
    held = {name: p.nbytes for name, p in nn.utils.tree_flatten(model.parameters())}
    with open(f"{out}-{sharding}.rank{rank}.json", "w") as f:
        json.dump({"held": held, "peak": mx.get_peak_memory()}, f)
    if rank > 0:
        distributed.follow(Engine(model, max_context=CONTEXT), group)
        return
    engine = distributed.Leader(model, group, CONTEXT) if group else Engine(model, CONTEXT)
    # one date for every process: the system message carries it, and a run that crossed midnight
    # compared replies to different prompts (CI failed at 00:05 UTC)
    chat = Chat(model, load_tokenizer(checkpoint), engine=engine, reasoning_effort="low", date="2026-12-01",
                sampling=SamplingParams(temperature=0, max_tokens=6))
    results = {}
    for turn, question in enumerate(QUESTIONS):
        for _ in chat.send(question):
            pass
        results[f"tokens{turn}"] = mx.array(engine.prompt_cache.tokens)
        results[f"reused{turn}"] = mx.array(engine.stats.reused_tokens)
        results[f"logits{turn}"] = engine.prefill(chat.prompt_tokens())
    mx.save_safetensors(f"{out}-{sharding}.safetensors", results)
    if group:
        engine.close()


def main(checkpoint: str, out: str, shardings: str) -> None:
    group = distributed.join() if distributed.launched_backend() else None
    for sharding in shardings.split(","):
        engine_thread().call(run, Path(checkpoint), out, group, sharding)


if __name__ == "__main__":
    main(*sys.argv[1:])
