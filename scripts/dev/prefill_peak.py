#!/usr/bin/env python3
"""Peak memory of one 2048-token prefill chunk: the whole model as one graph vs evaluated
layer by layer. (GPU machine, 20b: python scripts/dev/prefill_peak.py /tmp/g20)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx  # noqa: E402

from gptoss_mlx.loading import load_model  # noqa: E402

model = load_model(Path(sys.argv[1]))
tokens = mx.random.randint(1000, 190000, (1, 2048))
weights = mx.get_active_memory() / 1e9


def run(per_layer: bool):
    cache = model.make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    x = model.embed_tokens(tokens)
    for layer, c in zip(model.layers, cache):
        x = layer(x, c)
        if per_layer:
            mx.eval(x)
    mx.eval(x, [c.state for c in cache])
    return mx.get_peak_memory() / 1e9


for per_layer in (False, True, False, True):
    print(f"weights {weights:.2f} GB; per_layer={per_layer}: peak {run(per_layer):.2f} GB")
