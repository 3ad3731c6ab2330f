"""``gptoss-mlx doctor``: MLX, memory limits, what fits, the python sandbox, and kernel status."""

from __future__ import annotations

import platform

import mlx.core as mx

from ..config import PRESETS
from ..kernels import registry
from ..memory import DEFAULT_CONTEXT, DENSE_BITS, GB, MemoryPlanError, choose_plan, device_limit, plan, size
from ..tools.sandbox import sandbox_status
from .common import CLIError


def register(sub) -> None:
    p = sub.add_parser("doctor", help="MLX, memory limits, what fits, and kernel status",
                       description="Print the MLX version and device, the memory the model may "
                                   "use, which model sizes fit, and the custom kernels' status.")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    try:
        limit, source = device_limit()
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"gptoss-mlx on {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    print(f"MLX {mx.__version__}, default device {mx.default_device()}")
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("device_name", "architecture", "memory_size", "max_recommended_working_set_size"):
        if key in info:
            value = info[key]
            print(f"  {key}: {value / GB:.1f} GB" if key.endswith("size") else f"  {key}: {value}")
    print(f"Memory the model may use: {size(limit)} ({source})")
    print("\nWhat fits with everything resident (weights + KV cache + 1 GB working memory):")
    header = f"  {'model':<14}{'context':>9}  " + "  ".join(f"{b:>14}" for b in ("bf16 dense", "--dense-bits 8", "--dense-bits 4"))
    print(header)
    rows = [(name, config, ctx) for name, config in PRESETS.items()
            for ctx in (4096, DEFAULT_CONTEXT, config.max_position_embeddings)]
    for name, config, ctx in rows:
        cells = []
        for bits in DENSE_BITS:
            p = plan(config, ctx, bits, limit)
            cells.append(f"{('yes ' if p.fits else 'no  ') + f'{p.total / GB:5.1f} GB':>14}")
        print(f"  {name:<14}{ctx:>9}  " + "  ".join(cells))
    print(f"\nMemory plan (the first arrangement that fits in {size(limit)}; "
          "--memory-limit and --dense-bits change it):")
    for name, config, ctx in rows:
        try:
            p = choose_plan(config, ctx, limit=limit)
            print(f"  {name:<14}{ctx:>9}  {p.arrangement}, {p.total / GB:.1f} GB")
        except MemoryPlanError as e:
            print(f"  {name:<14}{ctx:>9}  does not fit (needs at least {e.smallest_limit / GB:.1f} GB)")
    print(f"\nPython tool sandbox: {sandbox_status()}")
    print(f"\nCustom kernels ({registry.ENV_VAR}={registry.mode()}; checked on a small input before use):")
    kernels = registry.status(mx.bfloat16)
    width = max(len(name) for name, _, _ in kernels)
    for name, state, description in kernels:
        print(f"  {name:<{width}}  {state}\n  {'':<{width}}  {description}")
    return 0
