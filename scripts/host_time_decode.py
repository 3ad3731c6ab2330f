"""Where a decode token's time goes on the host, on a real checkpoint: building the step's graph
(Python), queueing it (mx.async_eval: MLX encodes the kernels) and waiting for the device, for
our model or mlx-lm's, batch 1.

    python scripts/host_time_decode.py --dir /tmp/g20 [--engine ours|mlx_lm] [--steps 30] [--profile]

Two loops after a 128-token prompt: "serialized" waits for each step before building the next
(the device idles while the host builds: build + queue is the host's whole cost, wait what the
device still needed after the queue returned), "pipelined" builds and queues step n+1 before
reading step n's token, as Engine.generate does (its wall time per token is the decode rate's). For ours, then Engine.generate itself (the engine
thread, the sampler, the prompt cache) greedy and at temperature 1.
Run it once per setting: MLX reads its environment (MLX_USE_CUDA_GRAPHS, MLX_MAX_OPS_PER_BUFFER,
GPTOSS_MLX_KERNELS) once. ``--profile`` adds cProfile's view of the build.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import mlx.core as mx


def load(engine: str, path: str):
    if engine == "ours":
        from gptoss_mlx.loading import load_model

        model = load_model(path)
        return model, model.make_cache()
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_lm_load(path)
    return model, make_prompt_cache(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--engine", choices=["ours", "mlx_lm"], default="ours")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    model, cache = load(args.engine, args.dir)

    def step(y):
        return mx.argmax(model(y.reshape(1, 1), cache=cache, sampled=True)[:, -1, :], axis=-1)

    vocab = model.args.vocab_size if hasattr(model, "args") else model.config.vocab_size
    prompt = mx.array([[(i * 7919) % (vocab - 1000) + 100 for i in range(128)]])
    y = mx.argmax(model(prompt, cache=cache)[:, -1, :], axis=-1)
    for _ in range(10):  # warm-up: kernels built, shapes seen
        y = step(y)
        mx.eval(y)

    n = args.steps

    def steps(y, pipelined: bool):
        """n steps from token y: (last token, build, queue, wait seconds, wall seconds)."""
        build = queue = wait = 0.0
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            nxt = step(y)
            t1 = time.perf_counter()
            mx.async_eval(nxt)
            t2 = time.perf_counter()
            # pipelined: read step n's token while step n+1 runs; else wait for step n+1 itself
            y.item() if pipelined else mx.eval(nxt)
            t3 = time.perf_counter()
            build, queue, wait, y = build + t1 - t0, queue + t2 - t1, wait + t3 - t2, nxt
        y.item()
        return y, build, queue, wait, time.perf_counter() - start

    y, build, queue, wait, _ = steps(y, pipelined=False)
    print(f"{args.engine} on {mx.default_device()}, ms per token, serialized: build {1e3 * build / n:.2f}, "
          f"queue {1e3 * queue / n:.2f}, wait {1e3 * wait / n:.2f}", flush=True)
    y, build, queue, wait, wall = steps(y, pipelined=True)
    print(f"{args.engine} on {mx.default_device()}, ms per token, pipelined: build {1e3 * build / n:.2f}, "
          f"queue {1e3 * queue / n:.2f}, wait {1e3 * wait / n:.2f}, wall {1e3 * wall / n:.2f}", flush=True)

    if args.engine == "ours":  # the library's own loop: engine thread, sampler, prompt cache
        from gptoss_mlx.generate import Engine, SamplingParams

        for temperature in (0.0, 1.0):
            engine = Engine(model)
            params = SamplingParams(temperature=temperature, seed=0, max_tokens=n + 1)
            for _ in engine.generate(prompt[0].tolist(), params, stop_tokens=frozenset()):
                pass
            print(f"ours on {mx.default_device()}, Engine.generate at temperature {temperature:g}: "
                  f"{1e3 / engine.stats.decode_tps:.2f} ms per token", flush=True)

    if args.profile:
        profile = cProfile.Profile()
        for _ in range(n):
            profile.enable()
            nxt = step(y)
            profile.disable()
            mx.eval(nxt)
            y = nxt
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
