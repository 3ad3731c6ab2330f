"""``gptoss-mlx doctor``: MLX, memory limits, what fits, the python sandbox, and kernel status."""

from __future__ import annotations

import platform

import mlx.core as mx

from ..config import PRESETS
from ..kernels import registry
from ..memory import (
    DEFAULT_CONTEXT, DENSE_BITS, GB, MemoryPlanError, choose_plan, device_limit, expert_bytes, limit_size, plan,
    size, system_ram,
)
from ..tools.sandbox import sandbox_status
from .common import CLIError


def register(sub) -> None:
    p = sub.add_parser("doctor", help="MLX, memory limits, what fits, and kernel status",
                       description="Print the MLX version and device, the memory the model may "
                                   "use, which model sizes fit, and the custom kernels' status.")
    p.set_defaults(func=cmd_doctor)


def page_cache_room(limit: float, source: str) -> float:
    """RAM the OS page cache may hold streamed experts in: the machine's RAM less the GPU's share
    (a simulated device: a Mac whose recommended working set, about two thirds of its RAM, is
    ``limit``)."""
    ram = 1.5 * limit if source.startswith("simulated") else system_ram()
    return max(ram - limit, 0.0)


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
    print(f"Memory the model may use: {limit_size(limit)} ({source})")  # as the plan lines give it
    print("\nWhat fits with everything resident (weights + KV cache + 1 GB working memory):")
    header = f"  {'model':<14}{'context':>9}  " + "  ".join(f"{b:>14}" for b in ("bf16 dense", "--dense-bits 8", "--dense-bits 4"))
    print(header)
    rows = [(name, config, ctx) for name, config in PRESETS.items()
            for ctx in (4096, DEFAULT_CONTEXT, config.max_position_embeddings)]
    for name, config, ctx in rows:
        cells = []
        for bits in DENSE_BITS:
            p = plan(config, ctx, bits)  # the device's limit, as device_limit() read it
            cells.append(f"{('yes ' if p.fits else 'no  ') + f'{p.total / GB:5.1f} GB':>14}")
        print(f"  {name:<14}{ctx:>9}  " + "  ".join(cells))
    print(f"\nMemory plan (the first arrangement that fits in {limit_size(limit)}; "
          "--memory-limit and --dense-bits change it;\n serve also counts its other conversations' and "
          "saved prompt caches, and prints the plan it loads):")
    room = page_cache_room(limit, source)
    from_disk = False
    for name, config, ctx in rows:
        try:
            p = choose_plan(config, ctx)
        except MemoryPlanError as e:
            print(f"  {name:<14}{ctx:>9}  does not fit (needs at least {e.smallest_limit / GB:.2f} GB)")
            continue
        off_gpu = (p.total_experts - p.expert_slots) * expert_bytes(config)
        mark = " *" if off_gpu > room else ""
        from_disk = from_disk or bool(mark)
        print(f"  {name:<14}{ctx:>9}  {p.arrangement}, {p.total / GB:.1f} GB{mark}")
    if from_disk:
        room_said = f"about {size(room)} of RAM" if room >= GB else "no RAM: the limit is all of it"
        print(f"  * more experts off the GPU than the OS page cache can keep beside it\n"
              f"    ({room_said}): most tokens wait on the disk")
    print(f"\nPython tool sandbox: {sandbox_status()}")
    print(f"\nCustom kernels ({registry.ENV_VAR}={registry.mode()}; checked on a small input before use):")
    kernels = registry.status(mx.bfloat16)
    width = max(len(name) for name, _, _ in kernels)
    for name, state, description in kernels:
        print(f"  {name:<{width}}  {state}\n  {'':<{width}}  {description}")
    return 0
