#!/usr/bin/env python3
"""Servers under load: gptoss-mlx serve (continuous batching) against mlx_lm.server on the same
checkpoint, driven by the same load generator over HTTP.

    python scripts/bench_server.py --model DIR [--make --preset 20b --tokenizer-dir D]
        [--engines ours,mlx_lm] [--streams 1,4,8,16] [--tokens 256] [--history 8192] [--rounds N]
    python scripts/bench_server.py --model DIR --scheduler [--streams 1,8] [--rounds N]

Each server runs in its own process on a free 127.0.0.1 port, all of them at once, and the load
rounds interleave: for each round, each stream count, engine after engine (ours: the
library's Engine, Scheduler and Service under uvicorn, as `gptoss-mlx serve` builds them;
mlx-lm: `python -m mlx_lm.server`). The load generator is the standard library's http.client
(streaming Chat Completions, greedy, a fixed max_tokens; random weights almost never sample a
stop token, so each reply runs to max_tokens). For each number of concurrent streams it prints:

- aggregate tok/s: all streams' generated tokens over the wall time from the first request to
  the last reply's end (the median of the rounds, and each round's), and that over the same
  server's single-stream figure; ours over mlx-lm is the median of the rounds' ratios;
- newcomer TTFT: the latency of a one-token request sent while the streams decode (a newcomer's
  time to first token under that load: its queueing, its prefill, one step).

Then the follow-up TTFT after ``--history`` tokens: a one-token request on a long conversation
(cold), then on the same conversation plus a reply and a question (what a prompt cache serves);
and a new conversation with instructions (a system message) of about that many tokens, then
another new conversation with the same instructions (an agent's next task).

``--scheduler`` measures the scheduler alone, in this process (no HTTP, no output parsing):
for each number of streams, concurrent greedy runs of ``--tokens`` tokens through
``Scheduler.generate``; it prints aggregate tok/s, the wall time per decode step and the engine
thread's CPU time per step (the host work of a step: graph building, sampling, handing out
tokens; the device's work runs on other threads, or on the GPU). ``--rounds`` repeats it,
interleaving the stream counts, on a noisy machine.

In the HTTP rounds, the server process's CPU time per generated token is split by thread: its
event loop (HTTP, SSE, output parsing; the main thread) and, for ours, the engine thread.

``--make`` writes a random checkpoint of ``--preset`` first, with the tokenizer and chat template
from ``--tokenizer-dir`` (gpt-oss-tokenizer.json.gz, gpt-oss-tokenizer_config.json and
gpt-oss-chat_template.jinja, as in ../shared/data; mlx_lm.server needs the template, which goes
into tokenizer_config.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXACT_STREAMS = 8  # greedy replies compared alone and in one batch
STARTED_S = 0.5  # after every stream's first event, before the newcomer is sent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_ours(model_dir: str, port: int, max_context: int, max_concurrency: int) -> None:
    """The server process for ``ours`` (what `gptoss-mlx serve` builds, without the CLI)."""
    from gptoss_mlx.generate import Engine
    from gptoss_mlx.loading import load
    from gptoss_mlx.server import Scheduler, Service, serve

    from gptoss_mlx.engine_thread import engine_thread

    engine_thread()  # started: it sets its switch interval, which BENCH_SWITCH_INTERVAL overrides
    apply_switch_interval()
    model, tokenizer = load(model_dir)
    engine = Engine(model, max_context=max_context)
    scheduler = Scheduler(engine, max_concurrency, cache_bytes=16 << 30)
    service = Service(model_dir, tokenizer, engine, scheduler)
    if os.environ.get("BENCH_STEP_TIMES"):
        report_step_times(time_steps(scheduler), Path(os.environ["BENCH_STEP_TIMES"]))
    # the engine thread's id, for the parent's per-thread CPU accounting
    tid_file(port).write_text(str(engine_thread().call(threading.get_native_id)))
    serve(service, "127.0.0.1", port)


def apply_switch_interval() -> None:
    """BENCH_SWITCH_INTERVAL (seconds): the interpreter's GIL switch interval in the process that
    runs the engine (engine_thread.SWITCH_INTERVAL_S unless set; Python's default is 0.005). A
    thread that wants the GIL waits that long before it asks the holder to let go."""
    if os.environ.get("BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))


def time_steps(scheduler) -> Counter:
    """Wall seconds of the engine loop's decode steps, split: building the forward graph,
    building the sampling, handing the tokens out, and the rest of the step (mostly waiting for
    the device to finish the step before: the read of its tokens); and the time between decode
    steps (prefill, admitting). Counts accumulate in the returned Counter."""
    import gptoss_mlx.server.scheduler as sm

    acc, in_decode = Counter(), [False]
    model = scheduler.engine.model

    class TimedModel:
        def __call__(self, *a, **k):
            t = time.perf_counter()
            try:
                return model(*a, **k)
            finally:
                if in_decode[0]:
                    acc["forward"] += time.perf_counter() - t

        def __getattr__(self, name):
            return getattr(model, name)

    def timed(name, f):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t
        return wrapper

    scheduler.engine.model = TimedModel()
    sample, hand_out, decode = scheduler._sample, sm.hand_out, scheduler._decode
    scheduler._sample = timed("sample", sample)
    sm.hand_out = timed("hand_out", hand_out)
    last_end = [None]

    def timed_decode():
        t = time.perf_counter()
        if last_end[0] is not None:
            acc["between"] += t - last_end[0]
        in_decode[0] = True
        try:
            decode()
        finally:
            in_decode[0] = False
            last_end[0] = time.perf_counter() if scheduler.batch_size else None
            acc["decode"] += time.perf_counter() - t
            acc["steps"] += 1 if scheduler.batch_size else 0

    scheduler._decode = timed_decode
    return acc


def step_time_table(acc: Counter) -> str:
    steps = max(acc["steps"], 1)
    rest = acc["decode"] - acc["forward"] - acc["sample"] - acc["hand_out"]
    parts = {"forward graph": acc["forward"], "sampling graph": acc["sample"], "hand out": acc["hand_out"],
             "read tokens + rest": rest, "between steps": acc["between"]}
    return "; ".join(f"{name} {1e3 * v / steps:.2f}" for name, v in parts.items()) + f" (ms per step, {steps} steps)"


def report_step_times(acc: Counter, path: Path) -> None:
    """Keep ``path`` holding the step-time counts as JSON (a server has no other way out for
    them); read_step_times() reads them back."""
    def write():
        while True:
            time.sleep(0.2)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(acc))
            tmp.replace(path)
    threading.Thread(target=write, daemon=True).start()


def step_times_file(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"bench-server-steps-{port}.json"


def read_step_times(path: Path) -> Counter:
    time.sleep(0.5)  # the server writes them every 0.2 s
    return Counter(json.loads(path.read_text())) if path.exists() else Counter()


def tid_file(port: int) -> Path:
    """Where the server on ``port`` writes its engine thread's id."""
    return Path(tempfile.gettempdir()) / f"bench-server-engine-tid-{port}"


def thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds (user + system) thread ``tid`` of process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(engine: str, model_dir: str, port: int, max_context: int, max_concurrency: int) -> subprocess.Popen:
    if engine == "ours":
        cmd = [sys.executable, __file__, "--serve-ours", "--model", model_dir, "--port", str(port),
               "--max-context", str(max_context), "--max-concurrency", str(max_concurrency)]
    else:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model_dir, "--port", str(port),
               "--decode-concurrency", str(max_concurrency), "--log-level", "WARNING"]
    # its log goes to a file, not a pipe nobody reads while it runs (a full pipe would block the
    # server); server_log() reads it back when the server fails
    log = tempfile.TemporaryFile("w+")
    env = {**os.environ, "BENCH_STEP_TIMES": str(step_times_file(port))} if engine == "ours" else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    proc.log = log
    deadline = time.monotonic() + 600
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{engine} server did not start:\n{server_log(proc)}")
        time.sleep(0.5)


def server_log(proc: subprocess.Popen, chars: int = 3000) -> str:
    """The end of a server's stderr."""
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()[-chars:]


class Client:
    """Streaming Chat Completions over http.client (no third-party package on the GPU machine)."""

    def __init__(self, port: int, model: str):
        self.port, self.model = port, model

    def stream(self, messages: list[dict], max_tokens: int, on_started=None) -> dict:
        """One greedy streamed reply: its send, first-text and end times, token count and text.
        ``on_started()`` is called at its first event (of any kind): random weights rarely write
        a channel header, and ours then holds their text until the end (it does not know
        whether it is reasoning or answer), so a first text can be the last event."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
        sent = time.perf_counter()
        for attempt in range(5):
            # mlx_lm.server listens with socketserver's backlog of 5: a burst of connections
            # can be reset before it accepts them; retrying is what a client would do
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
            try:
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                break
            except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
                conn.close()
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        first, chunks, usage, text = None, 0, None, ""
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if on_started:
                on_started()
                on_started = None
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            delta = data["choices"][0].get("delta", {}) if data.get("choices") else {}
            piece = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
            if piece:
                chunks += 1
                text += piece
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        conn.close()
        tokens = usage["completion_tokens"] if usage else chunks
        return {"sent": sent, "first": first or end, "end": end, "tokens": tokens, "text": text}

    def latency(self, messages: list[dict]) -> float:
        """Seconds to a one-token reply: the time to first token as the client sees it."""
        t0 = time.perf_counter()
        self.stream(messages, 1)
        return time.perf_counter() - t0


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def concurrent_streams(client: Client, prompts: list[list[dict]], tokens: int, while_running=None) -> list[dict]:
    """The prompts' streams, all at once; ``while_running()`` is called once each has sent its
    first event and then STARTED_S more have passed (every stream's prefill then done: a
    newcomer then meets them decoding)."""
    results = [None] * len(prompts)
    started = threading.Semaphore(0)

    def one(i):
        try:
            results[i] = client.stream(prompts[i], tokens, on_started=started.release)
        except Exception as e:  # noqa: BLE001 - raised below, in the caller's thread
            results[i] = e
            started.release()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    if while_running:
        for _ in prompts:
            started.acquire(timeout=120)
        time.sleep(STARTED_S)
        while_running()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def load_round(client: Client, n: int, tokens: int, threads: dict[str, tuple[int, int]]) -> dict:
    """n concurrent streams, and a newcomer sent once all of them are generating; ``threads``:
    the server threads (name: (pid, tid)) whose CPU seconds per generated token are counted."""
    newcomer = []
    cpu = {name: thread_cpu(*ids) for name, ids in threads.items()}
    results = concurrent_streams(client, [user(f"Count from {i} upward, one number per line.") for i in range(n)],
                                 tokens, lambda: newcomer.append(client.latency(user("What is two plus two?"))))
    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
    generated = sum(r["tokens"] for r in results)
    cpu = {name: (thread_cpu(*threads[name]) - t0) / (generated + 1) for name, t0 in cpu.items()}
    return {"tokens": generated, "wall": wall, "newcomer": newcomer[0], "cpu": cpu}


def same_alone_and_together(client: Client, n: int, tokens: int) -> tuple[int, list[float]]:
    """How many of n greedy replies are the same text in one batch as alone, and for each the
    share of its text (alone) that the batched reply repeats before they part."""
    prompts = [user(f"Write about the number {i}.") for i in range(n)]
    alone = [client.stream(p, tokens)["text"] for p in prompts]
    together = [r["text"] for r in concurrent_streams(client, prompts, tokens)]
    shared = [len(os.path.commonprefix([a, b])) / max(1, len(a)) for a, b in zip(alone, together)]
    return sum(a == b for a, b in zip(alone, together)), shared


class Server:
    """One engine's server process under test, its client, and the threads whose CPU is counted."""

    def __init__(self, engine: str, args, max_concurrency: int):
        self.engine, self.port = engine, free_port()
        self.proc = start(engine, str(args.model), self.port, args.history * 2 + 4096, max_concurrency)
        self.threads = {"event loop": (self.proc.pid, self.proc.pid)}
        if engine == "ours":
            self.threads["engine thread"] = (self.proc.pid, int(tid_file(self.port).read_text()))
            tid_file(self.port).unlink()
        self.client = Client(self.port, str(args.model))

    def round(self, n: int, tokens: int) -> dict:
        """One load round; for ours, with the engine loop's step-time split."""
        before = read_step_times(step_times_file(self.port))
        row = load_round(self.client, n, tokens, self.threads)
        row["steps"] = read_step_times(step_times_file(self.port))
        row["steps"].subtract(before)
        return row

    def failed(self, e: Exception) -> RuntimeError:
        return RuntimeError(f"{e}\n--- {self.engine} server's log, last lines:\n{server_log(self.proc)}")

    def stop(self) -> None:
        self.proc.terminate()
        step_times_file(self.port).unlink(missing_ok=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench(args) -> tuple[dict, dict]:
    """Every engine's server up at once; the load rounds interleaved (each stream count, engine
    after engine, ``--rounds`` times), so a machine that slows down for a while slows them alike.
    Returns each engine's results and each failed engine's error."""
    counts = [int(n) for n in args.streams.split(",")]
    servers, failed = {}, {}
    for engine in args.engines.split(","):
        try:  # a peer's server that dies must not take the other engine's figures with it
            servers[engine] = Server(engine, args, max(*counts, EXACT_STREAMS) + 1)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - reported, the run goes on
            failed[engine] = f"{type(e).__name__}: {e}"
    rounds = {engine: {n: [] for n in counts} for engine in servers}

    def each(what, f):
        for engine, server in list(servers.items()):
            try:
                f(engine, server)
            except Exception as e:  # noqa: BLE001
                failed[engine] = f"{what}: {server.failed(e)}"
                print(f"{engine}: failed: {failed[engine]}", flush=True)
                server.stop()
                del servers[engine]

    try:
        for n in counts:  # warm-up: every batch size compiles its shapes once
            each("warm-up", lambda engine, server: server.round(n, 8))
        for _ in range(args.rounds):
            for n in counts:
                each(f"{n} streams", lambda engine, server: rounds[engine][n].append(server.round(n, args.tokens)))
                print(f"round {len(next(iter(rounds.values()))[n]) if rounds else 0}, {n} streams: "
                      + ", ".join(f"{engine} {rate(rs[n][-1]):.1f} tok/s" for engine, rs in rounds.items()
                                  if engine in servers and rs[n]), flush=True)
        results = {engine: {"rounds": rounds[engine]} for engine in servers}

        def rest(engine, server):
            r = results[engine]
            r["exact"], r["shared"] = same_alone_and_together(server.client, EXACT_STREAMS, 64)
            r["cold"] = r["follow"] = None
            if args.history:
                history = user("Tell me about the history of the sea. " * (args.history // 9))
                r["cold"] = server.client.latency(history)
                r["follow"] = server.client.latency(history + [{"role": "assistant", "content": "It is very old."},
                                                              {"role": "user", "content": "And rivers?"}])
                rules = [{"role": "system", "content": "Answer as a harbour pilot would. " * (args.history // 7)}]
                r["new_cold"] = server.client.latency(rules + user("Where is the channel?"))
                r["new_same"] = server.client.latency(rules + user("When is high tide?"))
        each("exactness and follow-up", rest)
    finally:
        for server in servers.values():
            server.stop()
    return {engine: results[engine] for engine in servers}, failed


def scheduler_round(scheduler, tokenizer, n: int, tokens: int) -> dict:
    """n concurrent greedy runs straight through Scheduler.generate: tokens made, wall seconds,
    decode steps, and the engine thread's CPU seconds (prefill included: short prompts)."""
    import asyncio

    from gptoss_mlx.engine_thread import engine_thread
    from gptoss_mlx.generate import SamplingParams
    from gptoss_mlx.server.scheduler import Run

    runs = [Run(tokenizer.encode(f"Count from {i} upward, one number per line."),
                SamplingParams(temperature=0, max_tokens=tokens)) for i in range(n)]

    async def generate_all():
        async def one(run):
            return sum([1 async for _ in scheduler.generate(run)])
        return await asyncio.gather(*map(one, runs))

    steps, cpu = sum(scheduler.steps.values()), engine_thread().call(time.thread_time)
    t0 = time.perf_counter()
    generated = sum(asyncio.run(generate_all()))
    wall = time.perf_counter() - t0
    return {"tokens": generated, "wall": wall, "steps": sum(scheduler.steps.values()) - steps,
            "cpu": engine_thread().call(time.thread_time) - cpu}


def bench_scheduler(args) -> None:
    """The scheduler's decode loop alone, ``--rounds`` times over the stream counts, interleaved."""
    import statistics

    import mlx.core as mx

    from gptoss_mlx.engine_thread import engine_thread
    from gptoss_mlx.generate import Engine
    from gptoss_mlx.loading import load
    from gptoss_mlx.server import Scheduler

    engine_thread()  # started: it sets its switch interval, which BENCH_SWITCH_INTERVAL overrides
    apply_switch_interval()
    model, tokenizer = engine_thread().call(load, str(args.model))
    counts = [int(n) for n in args.streams.split(",")]
    scheduler = Scheduler(Engine(model, max_context=4096), max(counts), cache_bytes=1 << 30)
    acc = time_steps(scheduler)
    for n in counts:  # warm-up
        scheduler_round(scheduler, tokenizer, n, 8)
    rounds = {n: [] for n in counts}
    split = {n: Counter() for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            acc.clear()
            rounds[n].append(scheduler_round(scheduler, tokenizer, n, args.tokens))
            split[n].update(acc)
    print(f"device: {mx.default_device()}, MLX {mx.__version__}, checkpoint {args.model}; scheduler alone, "
          f"{args.tokens} greedy tokens per stream, median of {args.rounds} rounds")
    print("| streams | aggregate tok/s | decode steps | wall ms/step | engine-thread CPU ms/step |")
    print("|---|---|---|---|---|")
    for n, rs in rounds.items():
        median = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        print(f"| {n} | {median(lambda r: r['tokens'] / r['wall']):.1f} | {median(lambda r: r['steps']):.0f} "
              f"| {median(lambda r: 1e3 * r['wall'] / r['steps']):.2f} "
              f"| {median(lambda r: 1e3 * r['cpu'] / r['steps']):.2f} |")
    for n in counts:
        print(f"{n} streams: {step_time_table(split[n])}")


def make_checkpoint(args) -> None:
    from gptoss_mlx.testing import checkpoints as mtc

    mtc.write_hf(args.model, mtc.PRESETS[args.preset])
    add_tokenizer(args)


def add_tokenizer(args) -> None:
    """The tokenizer and chat template into the checkpoint: mlx_lm.server loads them from there
    (without them it dies at its first request, "generation thread died")."""
    from gptoss_mlx.testing import checkpoints as mtc

    mtc.copy_tokenizer(args.model, args.tokenizer_dir / "gpt-oss-tokenizer.json.gz")
    # mlx_lm.server renders chats with the template; in tokenizer_config.json every transformers
    # version finds it
    path = args.model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = (args.tokenizer_dir / "gpt-oss-chat_template.jinja").read_text()
    path.unlink()  # copied read-only from the shared folder
    path.write_text(json.dumps(config))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--make", action="store_true", help="write a random checkpoint there first")
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--tokenizer-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--engines", default="ours,mlx_lm")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per reply")
    ap.add_argument("--history", type=int, default=8192, help="tokens of history for the follow-up (0: skip it)")
    ap.add_argument("--scheduler", action="store_true", help="measure the scheduler alone, in process")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, interleaved (HTTP: engine after engine)")
    ap.add_argument("--serve-ours", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-context", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-concurrency", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = set(args.engines.split(",")) - {"ours", "mlx_lm"}
    if unknown:
        ap.error(f"--engines: unknown engine {', '.join(sorted(unknown))} (ours, mlx_lm)")
    if args.serve_ours:
        serve_ours(str(args.model), args.port, args.max_context, args.max_concurrency)
        return 0

    import mlx.core as mx

    if args.make:
        make_checkpoint(args)
    elif not (args.model / "tokenizer.json").exists():
        add_tokenizer(args)
    if args.scheduler:
        bench_scheduler(args)
        return 0
    print(f"device: {mx.default_device()}, MLX {mx.__version__}, checkpoint {args.model}; "
          f"{args.tokens} greedy tokens per stream, prompts of about 100 tokens; {args.rounds} rounds, "
          "the engines' servers up together and their rounds interleaved", flush=True)
    results, failed = bench(args)
    for engine, error in failed.items():
        print(f"{engine}: failed: {error}", flush=True)
    for engine, r in results.items():
        print_engine(engine, r, args.history)
    engines = list(results)
    if len(engines) == 2:
        import statistics

        a, b = engines
        for n in results[a]["rounds"]:
            ratios = [rate(ra) / rate(rb) for ra, rb in zip(results[a]["rounds"][n], results[b]["rounds"][n])]
            print(f"{a} / {b} at {n} streams: {statistics.median(ratios):.2f}x (median of the rounds' ratios: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)})")
    return 1 if failed else 0


def rate(row: dict) -> float:
    return row["tokens"] / row["wall"]


def print_engine(engine: str, r: dict, history: int) -> None:
    """One engine's rows (medians over the rounds): throughput by streams, exactness, follow-up TTFT."""
    import statistics

    print("\n| engine | streams | aggregate tok/s (median; rounds) | x its 1 stream | newcomer TTFT s "
          "| server CPU ms/token: event loop | engine thread |")
    print("|---|---|---|---|---|---|---|")
    single = None
    for n, rows in r["rounds"].items():
        rates = [rate(row) for row in rows]
        median = statistics.median(rates)
        single = single or (median if n == 1 else None)
        ratio = f"{median / single:.2f}x" if single else "-"
        cpu = [f"{1e3 * statistics.median(row['cpu'][name] for row in rows):.2f}" if name in rows[0]["cpu"] else "-"
               for name in ("event loop", "engine thread")]
        newcomer = statistics.median(row["newcomer"] for row in rows)
        print(f"| {engine} | {n} | {median:.1f} ({', '.join(f'{x:.0f}' for x in rates)}) | {ratio} "
              f"| {newcomer:.3f} | {' | '.join(cpu)} |")
    for n, rows in r["rounds"].items():
        steps = sum((row["steps"] for row in rows), Counter())
        if steps["steps"]:
            print(f"{engine}, {n} streams, engine loop: {step_time_table(steps)}")
    # On a GPU the batch's dense matmuls round differently from one row's (cuBLAS GEMM vs GEMV),
    # and with random weights a router near-tie then sends a token to another expert: replies part.
    print(f"{engine}: {r['exact']}/{EXACT_STREAMS} greedy replies (64 tokens) the same in a batch of "
          f"{EXACT_STREAMS} as alone; the batched reply repeats "
          f"{', '.join(f'{100 * x:.0f}%' for x in r['shared'])} of each reply alone before they part")
    if r["cold"] is None:
        return
    print(f"{engine}: cold TTFT with a {history}-token history {r['cold']:.3f} s, follow-up "
          f"{r['follow']:.3f} s ({100 * r['follow'] / r['cold']:.1f}% of cold)", flush=True)
    print(f"{engine}: TTFT of a new conversation with {history}-token instructions {r['new_cold']:.3f} s, "
          f"of another with the same instructions {r['new_same']:.3f} s "
          f"({100 * r['new_same'] / r['new_cold']:.1f}%)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
