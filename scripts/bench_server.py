#!/usr/bin/env python3
"""gptoss-mlx serve under load: time to first token through the prompt cache, and aggregate
decode speed at several concurrent streams, measured with OpenAI's client over HTTP.

    python scripts/bench_server.py --model DIR [--history 8192] [--streams 1,2,4,8] [--tokens 64]

Starts the server in this process on a free 127.0.0.1 port (the `openai` package of the test
extra is the client). Prints:
- cold TTFT for a conversation of about ``--history`` tokens, and the TTFT of its follow-up
  (the same conversation plus the reply and a short question), which the prompt cache serves:
  as the engine measured it (prompt to first sampled token) and as the client saw it (to the
  first text; random weights write no harmony header, so their text shows only once the parser
  gives up on one, up to 32 tokens later);
- for each number of concurrent streams: aggregate generated tok/s, and mean / max TTFT as the
  client saw it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def serve(model_dir: str, max_context: int, streams: int):
    import uvicorn

    from gptoss_mlx.generate import Engine
    from gptoss_mlx.loading import load
    from gptoss_mlx.server import Scheduler, Service, create_app

    model, tokenizer = load(model_dir)
    engine = Engine(model, max_context=max_context)
    service = Service("bench", tokenizer, engine, Scheduler(engine, streams, cache_bytes=8 << 30))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1", engine


def stream(client, messages, tokens: int) -> tuple[float, int, str]:
    """(TTFT seconds, generated tokens, answer text) of one streamed greedy request."""
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    for chunk in client.chat.completions.create(
            model="bench", messages=messages, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if ttft is None and chunk.choices and (chunk.choices[0].delta.content or
                                               getattr(chunk.choices[0].delta, "reasoning_content", None)):
            ttft = time.perf_counter() - t0
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return (ttft if ttft is not None else time.perf_counter() - t0), usage.completion_tokens, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--history", type=int, default=8192, help="tokens of history for the follow-up test")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    args = ap.parse_args()

    import openai

    counts = [int(n) for n in args.streams.split(",")]
    url, engine = serve(args.model, args.history * 2 + 4096, max(counts))
    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=3600)

    history = [{"role": "user", "content": "Tell me about the history of the sea. " * (args.history // 9)}]
    cold, _, answer = stream(client, history, args.tokens)
    cold_stats = engine.stats  # requests run one at a time: this one's
    follow = history + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And rivers?"}]
    warm, _, _ = stream(client, follow, args.tokens)
    warm_stats = engine.stats
    for name, a, b in (("engine", cold_stats.ttft_s, warm_stats.ttft_s), ("client", cold, warm)):
        print(f"{name}: cold TTFT {a:.3f}s ({cold_stats.prompt_tokens} prompt tokens), follow-up TTFT "
              f"{b:.3f}s ({warm_stats.prompt_tokens} tokens, {warm_stats.reused_tokens} cached): "
              f"{100 * b / a:.1f}% of cold")

    print("streams | aggregate tok/s | mean TTFT s | max TTFT s")
    for n in counts:
        results = [None] * n

        def one(i):
            results[i] = stream(client, [{"role": "user", "content": f"Count from {i} upward."}], args.tokens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        ttfts = [r[0] for r in results]
        print(f"{n:7d} | {sum(r[1] for r in results) / wall:15.1f} | {statistics.mean(ttfts):11.3f} | "
              f"{max(ttfts):10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
