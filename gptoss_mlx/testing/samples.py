"""The inputs each kernel is checked on (tests/test_kernels.py, scripts/check_kernels_gpu.py):
shapes chosen for the kernels' edge cases, built by each kernel module's random-input builder.
The first sample of every kernel is its run-time check (``KernelSpec.check``)."""

from __future__ import annotations

import mlx.core as mx

from ..kernels import registry

# (rows, D): the model's D = 2880 (TG 1024, as wide as the model launches it: the run-time check;
# 2.8 columns a thread), then edge shapes: D not a multiple of 32, several rows, and a row just
# past 1024 columns (two columns for a few threads).
ADD_RMS_NORM_SHAPES = [(1, 2880), (1, 33), (2, 200), (5, 2880), (1, 1030), (3, 96)]

# (tokens, D, I, experts, top-k). The lanes stride over the MX blocks of the input
# dimension — D for kernel A, I for kernel B — so each kernel gets the model's 2880 there (90
# blocks: lanes 0-25 take three, the rest two), short ones (2 and 3 blocks: most lanes idle),
# 1056 (33 blocks: lane 0 takes two), and several tokens; the output dimension stays small to
# keep the emulator quick: 100 and 33 leave simdgroups of the last threadgroup without an output.
GATE_UP_SHAPES = [(1, 64, 64, 4, 2), (1, 2880, 64, 8, 4), (3, 96, 100, 4, 4), (2, 1056, 160, 6, 4),
                  (1, 64, 33, 4, 3)]
DOWN_SHAPES = [(1, 64, 2880, 8, 4), (1, 64, 64, 4, 2), (3, 100, 96, 4, 4), (2, 160, 1056, 6, 4),
               (1, 33, 64, 4, 3)]

# (tokens, D, experts, top-k): gpt-oss-20b's router (2880 x 32, top-4; the run-time check, as
# wide as the model launches it) and 120b's (128 experts: four slots per lane); an expert count
# that leaves lanes empty; a small one.
ROUTER_SHAPES = [(1, 2880, 32, 4), (2, 64, 8, 4), (3, 160, 128, 4), (2, 96, 40, 3)]

# (tokens, K, N): o_proj's K = 4096 (16 chunks a lane), qkv's 2880 (lanes 0-7 take twelve) with a
# ragged last threadgroup (33 outputs, 8 a threadgroup), short rows (most lanes idle), 4 tokens.
LINEAR_SHAPES = [(1, 64, 24), (1, 4096, 40), (2, 2880, 33), (4, 200, 16), (3, 96, 8)]

# (tokens, K, heads, rope heads, head_dim): the model's K = 2880 (lanes 0-7 take twelve
# chunks); a last threadgroup with pairs past the end (30 pairs, 4 a threadgroup); four tokens at
# their own positions; no rotated head; one head of each kind.
QKV_ROPE_SHAPES = [(1, 64, 4, 3, 16), (1, 2880, 3, 2, 64), (2, 96, 5, 3, 12), (4, 200, 3, 2, 16),
                   (3, 64, 2, 0, 8), (1, 64, 2, 1, 32)]

# (heads, kv heads, D, capacity, n_keys[, "device"]): the window's edges 127/128/129, a ring
# buffer (capacity 128) full, several partitions with a ragged last one (partitions of 32-256
# keys, by capacity: attention._chunk), a long buffer in partitions of 256; the number of keys as
# a device array (the compiled step's), so the partitions cover the buffer: one key in the third
# partition of 128 and the last two empty, and a ring not yet full.
SDPA_DECODE_SHAPES = [(8, 1, 32, 40, 33), (16, 2, 64, 256, 127), (16, 2, 64, 256, 128),
                      (64, 8, 64, 256, 129), (16, 2, 64, 128, 128), (16, 2, 64, 384, 300),
                      (8, 1, 32, 2048, 300), (8, 1, 32, 600, 257, "device"), (16, 2, 64, 128, 5, "device")]

# The combine kernel alone (its partials come from the reference): also more than 32 partitions,
# which it takes 32 at a time.
SDPA_COMBINE_SHAPES = SDPA_DECODE_SHAPES + [(8, 1, 32, 9000, 8500)]

# (rows, V, first, kind): the run-time check (8192 ids: 1024 threads, as at gpt-oss's vocabulary);
# a smaller row; a vocabulary not a multiple of 8 or of the threadgroup, ties (the lowest id wins)
# across threads and simdgroups, a row shorter than a simdgroup's sweep, a mask over every id,
# NaNs (the first wins) and +inf at a reserved id, and gpt-oss's (201088 ids, the mask from 199998).
GREEDY_SHAPES = [(2, 8192, 7000, ""), (2, 1000, 600, ""), (3, 5003, 17, "ties"), (1, 40, 0, "ties"),
                 (2, 4096, 4095, ""),
                 (2, 3000, 1000, "nan"), (1, 201088, 199998, "")]

# (heads, kv heads, D, slots, position, ring, index, layers): the run-time check (a full layer's
# buffer, a ragged last tile, a middle layer); a first token (nothing cached); a ring not yet
# full, full, and wrapped (the token's slot holds a position outside the window, skipped); a
# full layer over several tiles as the first and the last of its kind; GQA 8, head_dim 64 as
# in gpt-oss; one layer of its kind.
SDPA_STEP_SHAPES = [(8, 2, 32, 40, 37, 0, 1, 3), (8, 2, 32, 32, 0, 0, 0, 2), (8, 2, 32, 16, 9, 1, 2, 4),
                    (8, 2, 32, 16, 16, 1, 1, 2), (8, 2, 32, 16, 21, 1, 3, 4), (16, 2, 64, 256, 200, 0, 0, 3),
                    (16, 2, 64, 256, 129, 0, 2, 3), (64, 8, 64, 128, 300, 1, 1, 2), (8, 1, 32, 64, 63, 0, 0, 1)]

# (heads, kv heads, D, L, K, window): a first chunk over several tiles; query positions
# 127/128/129 around a 128-key window; a chunk after history (K > L) whose L is not a multiple of
# the query block; a full (causal) layer over several tiles; GQA 8 as in gpt-oss. Kept small:
# the emulator runs every sample in two orders and two dtypes.
SDPA_PREFILL_SHAPES = [(8, 2, 32, 12, 20, 8), (4, 2, 32, 24, 24, 16), (8, 2, 64, 3, 130, 128),
                       (4, 2, 32, 7, 135, 128), (4, 2, 32, 10, 70, None), (16, 2, 64, 5, 40, 16)]


# The model-sized launches of the kernels whose threadgroup is large or whose registers hold rows
# (tests/test_kernels.py: their CUDA mirrors must fit a threadgroup's registers; scripts/
# kernel_sass.py: their instruction mix): gpt-oss-20b and 120b (E 32 and 128) at one and four tokens.
MODEL_SHAPES = {
    "add_rms_norm_route": [(T, 2880, E, 4) for T in (1, 4) for E in (32, 128)],
    "linear_decode": [(T, K, N) for T in (1, 4) for K, N in ((2880, 5120), (4096, 2880))],
    "qkv_rope_decode": [(T, 2880, 80, 72, 64) for T in (1, 4)],
    "moe_gate_up_swiglu": [(T, 2880, 2880, 32, 4) for T in (1, 4)],
    "moe_down_combine": [(T, 2880, 2880, 32, 4) for T in (1, 4)],
}


def _seeded(shapes, seed):
    """Sample n gets the key ``seed + n``."""
    return [(shape, mx.random.key(seed + n)) for n, shape in enumerate(shapes)]


def _chained(shapes, seed):
    """Each sample's key is split from the previous one's."""
    out, key = [], mx.random.key(seed)
    for shape in shapes:
        out.append((shape, key))
        key = mx.random.split(key, 4)[3]
    return out


CASES = {
    "add_rms_norm": lambda: _chained(ADD_RMS_NORM_SHAPES, 7),
    "moe_router": lambda: _seeded(ROUTER_SHAPES, 500),
    "add_rms_norm_route": lambda: _seeded(ROUTER_SHAPES, 600),
    "linear_decode": lambda: _seeded(LINEAR_SHAPES, 700),
    "qkv_rope_decode": lambda: _seeded(QKV_ROPE_SHAPES, 800),
    "moe_gate_up_swiglu": lambda: _seeded(GATE_UP_SHAPES, 100),
    "moe_down_combine": lambda: _seeded(DOWN_SHAPES, 200),
    "sdpa_decode_partial": lambda: _seeded(SDPA_DECODE_SHAPES, 300),
    "sdpa_decode_combine": lambda: _seeded(SDPA_COMBINE_SHAPES, 300),
    "sdpa_prefill": lambda: _seeded(SDPA_PREFILL_SHAPES, 400),
    "sdpa_decode_step": lambda: _seeded(SDPA_STEP_SHAPES, 350),
    "greedy_token": lambda: _seeded(GREEDY_SHAPES, 900),
}

# Dtypes the CPU emulator runs every sample in (the compile check covers all of a kernel's
# dtypes); these two are the slowest to emulate.
EMULATED_DTYPES = {
    "sdpa_decode_partial": (mx.float32, mx.bfloat16),
    "sdpa_prefill": (mx.float32, mx.bfloat16),
    "sdpa_decode_step": (mx.float32, mx.bfloat16),
}


def samples(name: str, dtype: mx.Dtype) -> list[tuple]:
    """Argument tuples for kernel ``name`` in ``dtype``; the first is its run-time check."""
    spec = registry.REGISTRY[name]
    return [spec.sample(shape, key, dtype) for shape, key in CASES[name]()]


def emulated_dtypes(name: str) -> tuple:
    return EMULATED_DTYPES.get(name, registry.REGISTRY[name].dtypes)
