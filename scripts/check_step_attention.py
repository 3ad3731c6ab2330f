#!/usr/bin/env python3
"""Grouped decode steps (the one-pass step attention, the layers of a kind written once a token:
gptoss_mlx/cache.py) against per-layer writes, on a checkpoint, in lockstep from the same prompt,
each fed the per-layer path's greedy token:

- ``off``: every kernel off (the plain-MLX reference);
- ``per-layer``: the kernels on but the step attention (each layer writes its key and value,
  then MLX's attention or the two-pass kernels read the cache);
- ``grouped``: the kernels on, the step attention too (what the engine runs).

    python scripts/check_step_attention.py --dir /tmp/g20 [--prompt 120] [--steps 300]

Per pair it prints the steps with bit-identical logits, the largest difference relative to the
step's largest |logit| (median and max over steps) and the steps whose argmax differs. off vs
per-layer is the kernels' rounding, which sets the scale; per-layer vs grouped is what the step
attention changes: it must stay at that scale. A prompt just under 128 tokens crosses the rings'
wrap early; past 256 positions the full layers' storage grows; past STEP_MAX_KEYS (1024) the full
layers leave their group. Also the median host ms per step (build + queue) of per-layer and
grouped. Exits 1 when per-layer vs grouped is more than 10x off vs per-layer at its worst step.
"""

from __future__ import annotations

import sys


def main() -> int:
    from check_compiled_decode import compare, setup

    args, model, prompt = setup(__doc__)

    from gptoss_mlx.kernels import registry
    from gptoss_mlx.kernels.attention import STEP

    dtype = model.norm_dtype()
    registry.status(dtype)  # every kernel checked once, now
    active = {name: state for (name, d), state in registry._state.items() if d == dtype}

    def kernels(path: str):
        def prepare() -> None:  # the kernels' states for ``path``
            for name, state in active.items():
                off = path == "off" or (path == "per-layer" and name == STEP.name)
                registry._state[(name, dtype)] = "off (this check)" if off else state
        return prepare

    def step(token, pc):
        return model(token.reshape(1, 1), cache=pc.cache, sampled=True)[:, -1, :]

    paths = {name: (kernels(name), step) for name in ("off", "per-layer", "grouped")}

    def summary(result) -> str:
        grouped = sum(c.group is not None for c in result["caches"]["grouped"].cache)
        return f"step kernel {active.get(STEP.name)}; {grouped} of {len(model.layers)} layers grouped at the end"

    return compare(model, prompt, args, paths, "per-layer", ("per-layer", "grouped"), summary)


if __name__ == "__main__":
    sys.exit(main())
