#!/usr/bin/env python3
"""Which mx.distributed backends start here: run under `mlx.launch -n 2 --backend B`.

    mlx.launch -n 2 --backend nccl python scripts/check_distributed_backends.py nccl

Each rank prints its rank, the group size, the device its arrays live on, and an all_sum over
the ranks (expected: 3 in every element for two ranks), or the one-line error the backend gave.
"""

import sys

import mlx.core as mx

backend = sys.argv[1] if len(sys.argv) > 1 else "any"
try:
    group = mx.distributed.init(backend=backend, strict=True)
    x = mx.distributed.all_sum(mx.full((4,), group.rank() + 1.0))
    mx.eval(x)
    print(f"{backend}: rank {group.rank()} of {group.size()} on {mx.default_device()}: all_sum {x.tolist()}",
          flush=True)
except Exception as e:  # report the backend's own message; the launcher shows both ranks
    print(f"{backend}: failed: {type(e).__name__}: {e}", flush=True)
    sys.exit(1)
