#!/usr/bin/env python3
"""Across machines: the bytes each rank sends per prefill token and per decode token, and the decode
time per token, for tensor and pipeline parallel with N local ranks (the ring backend on
127.0.0.1, each rank started the way mlx.launch starts it); then gpt-oss-120b on two Macs
projected from those bytes and public link figures.

    python scripts/bench_distributed.py --dir /tmp/dbench --make [--ranks 2] [--prompt 256] [--decode 32]

``--make`` writes a random checkpoint at gpt-oss width (hidden 2880, 64 query and 8 KV heads of
64) with ``--layers`` layers, ``--experts`` experts and a 1024-id vocabulary: each layer sends
what a layer of the real model sends, so the bytes scale to 120b's 36 layers. The bytes are the
kernel's count (TCP_INFO bytes_acked summed over the rank's sockets; Linux), heartbeats included.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from gptoss_mlx.config import GPT_OSS_120B

TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info

# Public link figures: per-message latency (s) and bandwidth (bytes/s). JACCL: RDMA over
# Thunderbolt 5, "single-digit microsecond latency", 50-60 Gbps (MLX's JACCL README; Apple,
# macOS 26.2). TCP over 10 GbE and over Thunderbolt (IP over Thunderbolt 5, the ring backend):
# about 10x the latency of RDMA per the same sources; 10 GbE at its line rate, Thunderbolt IP at
# the 20-25 Gbps users measure with iperf.
LINKS = {"Thunderbolt 5 RDMA (jaccl)": (10e-6, 6.5e9),
         "Thunderbolt 5 IP (ring)": (100e-6, 2.8e9),
         "10 GbE (ring)": (100e-6, 1.15e9)}
MAC_BANDWIDTH = 546e9  # M4 Max (a Mac with Thunderbolt 5 and 64 GB or more: 2 hold 120b)
BANDWIDTH_USE = 0.6  # share of it a decode step reaches (weights streamed once per token)
FOLLOWER_STEP_S = 1e-3  # a follower builds its step graph after it has the token (Python)


def sent_bytes() -> int:
    """Bytes this process's TCP sockets have had acknowledged."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            with socket.socket(fileno=os.dup(int(fd))) as s:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            continue
        if len(info) >= TCPI_BYTES_ACKED + 8:
            total += struct.unpack_from("<Q", info, TCPI_BYTES_ACKED)[0]
    return total


def rank_worker(directory: Path, sharding: str, prompt_len: int, decode: int) -> None:
    """One rank: a warm-up, then a prefill, then a decode, each ended by rank 0's close() so
    that every rank can read its byte count between them."""
    import mlx.core as mx

    from gptoss_mlx import distributed
    from gptoss_mlx.engine_thread import engine_thread
    from gptoss_mlx.generate import Engine, SamplingParams
    from gptoss_mlx.loading import load_model

    group = distributed.join()
    model = engine_thread().call(load_model, directory, mx.bfloat16, group=group, sharding=sharding)
    vocab = model.config.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(prompt_len)]
    greedy = SamplingParams(temperature=0, max_tokens=decode)
    rank = group.rank()
    if rank == 0:
        engine = distributed.Leader(model, group, max_context=prompt_len + decode + 64)
        phases = [lambda: list(engine.generate(prompt[:8], SamplingParams(temperature=0, max_tokens=4), ())),
                  lambda: engine.prefill(prompt),
                  lambda: list(engine.generate(prompt + [1], greedy, stop_tokens=()))]
    else:
        engine = Engine(model, max_context=prompt_len + decode + 64)
    counts, prefilled = [], 0
    for phase in range(3):
        counts.append(sent_bytes())
        if rank == 0:
            phases[phase]()
            engine.close()
            if phase == 1:  # what the prefill fed (the warm-up's first tokens were cached)
                prefilled = engine.stats.prompt_tokens - engine.stats.reused_tokens
        else:
            engine_thread().call(distributed.follow, engine, group)
    counts.append(sent_bytes())
    result = {"rank": rank, "prefill_bytes": counts[2] - counts[1], "decode_bytes": counts[3] - counts[2]}
    if rank == 0:
        result.update(prefilled=prefilled, decode_tokens=engine.stats.generated_tokens,
                      decode_s=engine.stats.decode_s)
    print("RESULT " + json.dumps(result), flush=True)


def launch(args, sharding: str) -> list[dict]:
    ports = []
    for _ in range(args.ranks):
        with socket.create_server(("127.0.0.1", 0)) as s:
            ports.append(s.getsockname()[1])
    hostfile = Path(args.dir) / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    command = [sys.executable, __file__, "--dir", args.dir, "--rank-worker", sharding,
               "--prompt", str(args.prompt), "--decode", str(args.decode)]
    ranks = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)})
             for r in range(args.ranks)]
    results = []
    for p in ranks:
        out, _ = p.communicate(timeout=1800)
        if p.returncode:
            sys.exit(f"a rank failed (exit {p.returncode})")
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted(results, key=lambda r: r["rank"])


def active_bytes(config) -> dict[str, float]:
    """Bytes of weights one decode token reads, by part (bf16 attention and unembedding,
    MXFP4 experts at 4.25 bits)."""
    D, H, KV, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = ((H + 2 * KV) * d * D + H * d * D) * 2
    expert = (2 * config.intermediate_size * D + config.intermediate_size * D) * 4.25 / 8
    return {"attention": attention * config.num_hidden_layers,
            "experts": expert * config.num_experts_per_tok * config.num_hidden_layers,
            "unembedding": config.vocab_size * D * 2}


def project(per_layer_tensor: float, per_boundary: float, prefill_per_layer: float) -> list[str]:
    """120b decode tok/s on two Macs, per link, for each mode, and the prefill time the links
    add per 1000 prompt tokens (tensor parallel; pipeline's is a 1/36 of it per boundary)."""
    config = GPT_OSS_120B
    L, parts = config.num_hidden_layers, active_bytes(config)
    speed = MAC_BANDWIDTH * BANDWIDTH_USE
    one = sum(parts.values()) / speed
    # tensor: half the attention; experts: the busier rank's share of the 4 chosen ones
    # (4 choices over 2 ranks: 2.75 on the busier one on average); the unembedding on rank 0
    tensor_compute = (parts["attention"] / 2 + parts["experts"] * 2.75 / 4 + parts["unembedding"]) / speed
    rows = [f"| one Mac (if it fitted) | {1 / one:.0f} | {1 / one:.0f} | - |"]
    for link, (latency, bandwidth) in LINKS.items():
        # each rank sends half of an all-reduce's bytes, both at once
        tensor = tensor_compute + 2 * L * (latency + per_layer_tensor / 4 / bandwidth) + latency + FOLLOWER_STEP_S
        pipeline = one + (latency + per_boundary / bandwidth) + latency + FOLLOWER_STEP_S
        prefill = 1000 * prefill_per_layer * L / 2 / bandwidth
        rows.append(f"| {link} | {1 / tensor:.0f} | {1 / pipeline:.0f} | {prefill:.2f} s |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--make", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        return rank_worker(Path(args.dir), args.rank_worker, args.prompt, args.decode)
    if args.make:
        from gptoss_mlx.testing import checkpoints

        config = GPT_OSS_120B.replace(num_hidden_layers=args.layers, num_local_experts=args.experts,
                                      layer_types=GPT_OSS_120B.layer_types[:args.layers], vocab_size=1024)
        checkpoints.write_hf(Path(args.dir), config)
    print(f"{args.ranks} local ranks, {args.layers} layers at gpt-oss width, prompt {args.prompt}, "
          f"decode {args.decode} tokens")
    print("| sharding | bytes sent per prefill token (all ranks) | per decode token | "
          "per decode token and layer | decode ms/token |")
    print("| --- | --- | --- | --- | --- |")
    measured = {}
    for sharding in ("pipeline", "tensor"):
        results = launch(args, sharding)
        prefill = sum(r["prefill_bytes"] for r in results) / results[0]["prefilled"]
        decode = sum(r["decode_bytes"] for r in results) / results[0]["decode_tokens"]
        ms = 1000 * results[0]["decode_s"] / max(results[0]["decode_tokens"] - 1, 1)
        measured[sharding] = (prefill, decode)
        print(f"| {sharding} | {prefill:.0f} | {decode:.0f} | {decode / args.layers:.0f} | {ms:.0f} |")
    print("\ngpt-oss-120b decode on two Macs (tok/s), projected; the last column: what the link adds "
          "to a 1000-token prefill in tensor parallel")
    print("| link | tensor | pipeline | tensor prefill over the link |")
    print("| --- | --- | --- | --- |")
    tensor_prefill, tensor_decode = measured["tensor"]
    for row in project(tensor_decode / args.layers, measured["pipeline"][1], tensor_prefill / args.layers):
        print(row)


if __name__ == "__main__":
    main()
