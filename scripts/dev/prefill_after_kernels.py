#!/usr/bin/env python3
"""Does launching a custom kernel slow later, unrelated prefill work? (GPU machine, 20b.)

    python scripts/dev/prefill_after_kernels.py /tmp/g20

Times a 2048-token prefill with every kernel off, then runs one decode step with the kernels
on, then times the same prefill again (kernels on, but none applies to 2048-token chunks).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx  # noqa: E402

from gptoss_mlx.kernels import registry  # noqa: E402
from gptoss_mlx.loading import load_model  # noqa: E402

model = load_model(Path(sys.argv[1]))
tokens = mx.random.randint(1000, 190000, (1, 2048))


def prefill(label):
    for _ in range(3):
        cache = model.make_cache()
        t0 = time.perf_counter()
        mx.eval(model(tokens, cache=cache)[:, -1])
        print(f"{label}: {2048 / (time.perf_counter() - t0):7.0f} tok/s")


for name in registry.REGISTRY:
    for dt in (mx.bfloat16, mx.float32, mx.float16):
        registry._state[(name, dt)] = "off (forced)"
prefill("kernels off, none launched yet")
registry.reset()
cache = model.make_cache()
mx.eval(model(tokens[:, :8], cache=cache))
mx.eval(model(tokens[:, 8:9], cache=cache))  # a decode step: the kernels run
print("states:", [s for _, s, _ in registry.status()])
prefill("after kernels ran")
for name in registry.REGISTRY:
    for dt in (mx.bfloat16, mx.float32, mx.float16):
        registry._state[(name, dt)] = "off (forced)"
prefill("kernels off again")
