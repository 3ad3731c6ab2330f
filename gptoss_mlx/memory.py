"""Memory planning: how to arrange this model, at this context length, in what the GPU may use.

Estimated before loading from the config alone. The plan takes the first arrangement that fits
(:data:`DENSE_BITS`, then streaming): everything resident with bf16 dense layers, then dense layers (attention,
embedding and unembedding; the router stays bf16) affine-quantized to 8 and to 4 bits at load time, then experts
streamed: the dense layers resident and a fixed GPU pool of expert slots, the other experts read
on demand from the checkpoint (``expert_pool.py``). ``--dense-bits`` fixes the dense precision
and ``--memory-limit`` the budget; by default the budget is the device's (on a Mac, Metal's
recommended working set), and the KV cache and working memory are planned inside it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from .config import MXFP4_BLOCK, ModelConfig

GB = 1e9
WORKING_BYTES = 1.0 * GB  # activations of a 512-token prefill chunk, logits, MLX's own buffers
AFFINE_GROUP = 64
DEFAULT_CONTEXT = 32768  # tokens the front ends plan memory for and allow without --max-context
PROMPT_CACHE_GB = 4.0  # GB (1e9 bytes) of a server's saved prompt caches, where the experts need not stream
DENSE_BITS = (16, 8, 4)  # 16: the checkpoint's own bf16 dense layers
# Sets the device's limit (e.g. 10.7GB, a 16 GB Mac's working set), to see a smaller Mac's plans.
DEVICE_MEMORY_ENV = "GPTOSS_MLX_DEVICE_MEMORY"

MIN_NUMERIC_LIMIT = 1e6  # a memory_limit number (bytes) below 1 MB is a size in GB without its unit
BARE_GB_MAX = 1024  # a size without a unit is GB; from this many it is bytes or MB without their unit
_UNITS = {"": GB, "K": 1e3, "M": 1e6, "G": GB, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
          "TI": 2**40}


class MemoryPlanError(RuntimeError):
    """The model will not fit; the message says what would. ``smallest_limit``: bytes that would."""

    def __init__(self, message: str, smallest_limit: float):
        super().__init__(message)
        self.smallest_limit = smallest_limit


def size(n: float) -> str:
    """Bytes for a person: "3.3 GB", "420 MB", "12 KB", "512 bytes"."""
    if not math.isfinite(n):
        return "no limit"
    if n >= 1e12:
        return f"{n / 1e12:.3g} TB"
    if n >= 0.1 * GB:
        return f"{n / GB:.1f} GB" if n >= GB else f"{n / GB:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} KB" if n >= 1e3 else f"{n:.3g} byte{'' if n == 1 else 's'}"


def limit_size(n: float) -> str:
    """A limit for a person, to 10 MB from 0.1 GB up, rounded down (as the plan line gives it):
    a limit just under what fits must not read as the number an error asks for (rounded up)."""
    return f"{floor_gb(n):.2f} GB" if math.isfinite(n) and n >= 0.1 * GB else size(n)


def floor_gb(n: float) -> float:
    """``n`` bytes in GB, rounded down to 10 MB (10.7 GB stays 10.70, float error aside)."""
    return math.floor(n / GB * 100 + 1e-6) / 100


def round_up_gb(n: float) -> float:
    """``n`` bytes in GB, rounded up to 10 MB: a limit that holds them, and no more than that."""
    return math.ceil(n / GB * 100) / 100


def limit_or_more(gb: float) -> str:
    """The limit to ask for, as the CLI and the library each take it (the CLI's messages drop
    the library's part: :func:`cli_wording`)."""
    return f'--memory-limit {gb:.2f}GB or more (from Python: memory_limit="{gb:.2f}GB")'


def shorter_context(n: int) -> str:
    """A context that fits, as the CLI and the library each take it (see :func:`limit_or_more`)."""
    return f"a shorter --max-context ({n} fits) (from Python: max_context={n})"


GIVEN = "memory_limit"  # a plan's limit_source when the caller gave the limit (the CLI: --memory-limit)


def cli_wording(message: str) -> str:
    """``message`` as the CLI says it: without the library's spelling of a limit
    (:func:`limit_or_more`), and a given limit named by its flag."""
    message = re.sub(r" \(from Python: [^()]*\)", "", message)
    return message.replace(f"({GIVEN})", "(--memory-limit)")


MAX_SIZE = 1e15  # bytes: a size beyond is a typo (a Mac has at most 0.5 TB)


def parse_size(text: str) -> float:
    """Bytes of a size such as ``10GB``, ``8.5G``, ``800MB`` or ``12GiB`` (a bare number is GB,
    a number with only ``B`` bytes). A bare number of BARE_GB_MAX or more is an error: it is a
    count of bytes or MB without its unit, not that many GB."""
    # ASCII digits only (\d took fullwidth ones); any case of the unit (1.5GIB as 1.5GiB)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kKmMgGtT])([iI]?))?([bB]?)\s*", str(text))
    if not match:
        raise ValueError(f"expected a size such as 10GB, 8.5G or 800MB, got {text!r:.40}")
    number, unit, binary, b = match.groups()
    if not (unit or b) and float(number) >= BARE_GB_MAX:
        raise ValueError(f"a size without a unit is in GB, and {number:.30} GB is more memory than "
                         f"a Mac has: give the unit (e.g. {number:.30}B for bytes, {number:.30}MB)")
    size = float(number) * (_UNITS[(unit + binary).upper()] if unit else 1.0 if b else GB)
    if size <= 0:
        raise ValueError(f"a memory size must be more than 0, got {text!r:.40}")
    if size > MAX_SIZE:
        raise ValueError(f"{text.strip():.40} is more memory than any machine has (at most "
                         f"{MAX_SIZE / 1e12:.0f} TB)")
    return size


def device_limit() -> tuple[float, str]:
    """Bytes the GPU may use and where that number comes from."""
    if os.environ.get(DEVICE_MEMORY_ENV):
        try:
            return parse_size(os.environ[DEVICE_MEMORY_ENV]), f"simulated by {DEVICE_MEMORY_ENV}"
        except ValueError as e:
            raise ValueError(f"{DEVICE_MEMORY_ENV}: {e}") from None
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get("max_recommended_working_set_size"):
        return float(info["max_recommended_working_set_size"]), "Metal recommended working set"
    if mx.default_device() == mx.gpu and info.get("memory_size"):
        return float(info["memory_size"]), "GPU memory"
    return system_ram(), "system RAM"


def system_ram() -> float:
    """The machine's memory, in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ---- sizes -------------------------------------------------------------------------------------

def _dense_bytes(n_params: int, dense_bits: int, value_bytes: int = 2) -> float:
    """``n_params`` weights unquantized (``value_bytes`` each: bf16, or float32 for a float32
    model) or affine-quantized to ``dense_bits`` with a scale and a bias of that width per group."""
    if dense_bits == 16:
        return float(value_bytes) * n_params
    return n_params * (dense_bits + 2 * 8 * value_bytes / AFFINE_GROUP) / 8


def _projection_bytes(rows: int, cols: int) -> float:
    """One expert's MXFP4 projection (4 bits + a uint8 scale per 32 values) and its bf16 bias."""
    return rows * cols * (4 + 8 / MXFP4_BLOCK) / 8 + rows * 2


def expert_bytes(config: ModelConfig) -> float:
    """One expert of one layer: MXFP4 gate/up and down + bf16 biases."""
    D, I = config.hidden_size, config.intermediate_size
    return _projection_bytes(2 * I, D) + _projection_bytes(D, I)


def view_bytes(config: ModelConfig) -> float:
    """What a streamed prefill chunk copies out of the pool at once (ExpertPool.view): one layer's
    experts' gate/up projections (the larger of the two, copied before the down projections and
    freed before those are copied)."""
    return config.num_local_experts * _projection_bytes(2 * config.intermediate_size, config.hidden_size)


def dense_bytes(config: ModelConfig, dense_bits: int = 16, value_bytes: int = 2) -> float:
    """Everything but the experts: attention, router, norms, sinks, embedding and unembedding.
    ``value_bytes``: the model's float width (2: bfloat16 or float16, 4: float32)."""
    D, E = config.hidden_size, config.num_local_experts
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attn_weights = D * H * hd * 2 + D * KV * hd * 2
    attn_other = (H * hd + 2 * KV * hd + D + H) * value_bytes + 2 * D * 4  # biases, sinks, fp32 norms
    router = (E * D + E) * value_bytes  # unquantized at any dense_bits (loading.quantize_dense)
    per_layer = _dense_bytes(attn_weights, dense_bits, value_bytes) + attn_other + router
    embed = _dense_bytes(2 * config.vocab_size * D, dense_bits, value_bytes)
    return config.num_hidden_layers * per_layer + embed + D * 4


def total_experts(config: ModelConfig) -> int:
    return config.num_hidden_layers * config.num_local_experts


def kv_cache_bytes(config: ModelConfig, context: int, bytes_per_value: int = 2) -> float:
    per_token = 2 * config.num_key_value_heads * config.head_dim * bytes_per_value  # K and V
    total = 0
    for sliding in config.sliding_layers:
        total += per_token * (config.sliding_window if sliding else context)  # (a ring holds window slots)
    return total


def server_bytes(config: ModelConfig, context: int, sequences: int, prompt_cache: float) -> float:
    """What a server holds beside one sequence's KV cache (which every plan counts): its other
    ``sequences - 1`` at the full context, and ``prompt_cache`` bytes of saved caches."""
    return (sequences - 1) * kv_cache_bytes(config, context) + prompt_cache


def checkpoint_dense_bits(config: ModelConfig, dense_bits: int | None = None) -> int | None:
    """--dense-bits if given, else the bits a converted checkpoint stores its dense layers in.
    Those bits cannot be changed at load: asking for others is a ValueError (a plan of them would
    count bytes the model does not have)."""
    stored = (config.quantization or {}).get("bits")
    if stored and dense_bits is not None and dense_bits != stored:
        raise ValueError(f"the checkpoint's dense layers are stored {stored}-bit (a converted checkpoint), "
                         f"so they cannot be loaded at {dense_bits} bits: leave the dense precision out, "
                         "or load the original checkpoint")
    return dense_bits or stored


# ---- plans -------------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    dense_bits: int  # 16: bf16 as in the checkpoint; 8 or 4: affine-quantized
    expert_slots: int  # experts held on the GPU; fewer than total_experts: the rest are streamed
    total_experts: int
    dense: float  # bytes of everything but the experts
    experts: float  # bytes of the resident experts (all of them, or the pool's slots)
    kv_cache: float
    working: float
    limit: float
    limit_source: str
    server: float = 0.0  # a server's other sequences' KV caches and its saved prompt caches

    @property
    def streamed(self) -> bool:
        return self.expert_slots < self.total_experts

    @property
    def weights(self) -> float:
        return self.dense + self.experts

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.working + self.server

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    @property
    def arrangement(self) -> str:
        dense = "bf16" if self.dense_bits == 16 else f"{self.dense_bits}-bit"
        if not self.streamed:
            return f"everything resident, dense layers {dense}"
        share = self.expert_slots / self.total_experts
        return (f"experts streamed ({self.expert_slots} of {self.total_experts} on the GPU, "
                f"{share:.0%}), dense layers {dense}")

    def describe(self) -> str:
        of = f" of {limit_size(self.limit)}" if math.isfinite(self.limit) else ""
        server = f" + server caches {size(self.server)}" if self.server else ""
        return (f"{self.arrangement}: weights {size(self.weights)} + KV cache {size(self.kv_cache)} + "
                f"working {size(self.working)}{server} = {floor_gb(self.total):.2f} GB{of} ({self.limit_source})")


def resolve_limit(limit: float | str | None = None) -> tuple[float, str]:
    """(bytes, where they come from): ``limit`` (bytes, or a size such as "10GB"), else the device's."""
    if limit is None:
        return device_limit()
    if isinstance(limit, str):
        try:
            limit = parse_size(limit)
        except ValueError as e:
            raise ValueError(f"memory_limit: {e}") from None
    elif isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise ValueError(f"memory_limit must be a number of bytes above 0 (inf: not checked) or a size "
                         f"such as '10GB', got {limit!r:.40}")
    elif limit < MIN_NUMERIC_LIMIT:  # (GB meant, most likely, where it is a plausible count of them)
        example = f"'{limit:g}GB'" if limit < BARE_GB_MAX else "'10GB' or '800MB'"
        raise ValueError(f"memory_limit={limit!r:.40} is in bytes, less than any model needs: give a "
                         f"size with its unit, such as {example}")
    limit = float(limit)
    return limit, GIVEN if math.isfinite(limit) else "memory not checked"


def _arrange(config, context, bits, slots, limit, source, value_bytes=2, server=0.0) -> MemoryPlan:
    n = total_experts(config)
    slots = min(slots, n)
    # Streamed, a prefill chunk's gather reads a layer's experts from a copy in expert order
    # (ExpertPool.view), one projection at a time: that much more working memory.
    working = WORKING_BYTES + (view_bytes(config) if slots < n else 0)
    return MemoryPlan(bits, slots, n, dense_bytes(config, bits, value_bytes), slots * expert_bytes(config),
                      kv_cache_bytes(config, context, value_bytes), working, limit, source, server)


def plan(config: ModelConfig, context: int, dense_bits: int | None = None,
         limit: float | str | None = None, expert_slots: int | None = None,
         value_bytes: int = 2) -> MemoryPlan:
    """One arrangement: dense layers at ``dense_bits`` (None: unquantized), ``expert_slots``
    experts on the GPU (None: all of them); ``value_bytes`` the model's float width (4: float32)."""
    limit, source = resolve_limit(limit)
    slots = total_experts(config) if expert_slots is None else expert_slots
    return _arrange(config, context, dense_bits or 16, slots, limit, source, value_bytes)


def choose_plan(config: ModelConfig, context: int, dense_bits: int | None = None,
                limit: float | str | None = None, value_bytes: int = 2, server: float = 0.0,
                unstreamable: str | None = None) -> MemoryPlan:
    """The first arrangement that fits: everything resident with bf16, 8-bit, then 4-bit dense
    layers, then experts streamed (4-bit dense layers, the largest pool that fits).
    ``dense_bits`` fixes the dense precision. The pool holds at least one layer's experts (a
    prefill chunk may route to all of them); below that, a MemoryPlanError names the smallest
    limit that works. ``server``: bytes a server keeps beside the model (its other sequences' KV
    caches, its saved prompt caches: :func:`server_bytes`). ``unstreamable``: why this
    checkpoint's experts cannot be streamed (loading.stream_problem), None where they can; then
    the plan never streams, and the limit an error names is the one with every expert resident."""
    limit, source = resolve_limit(limit)
    ladder = DENSE_BITS if dense_bits is None else (dense_bits,)
    n = total_experts(config)
    arrange = partial(_arrange, value_bytes=value_bytes, server=server)  # float32: twice the dense bytes
    for bits in ladder:
        p = arrange(config, context, bits, n, limit, source)
        if p.fits:
            return p
    bits = ladder[-1]
    if unstreamable is None:
        without_experts = arrange(config, context, bits, 0, limit, source)
        slots = math.floor((limit - without_experts.total) / expert_bytes(config))
        if slots >= config.num_local_experts:
            return arrange(config, context, bits, slots, limit, source)
    least = config.num_local_experts if unstreamable is None else n  # experts the GPU must hold
    smallest = arrange(config, context, bits, least, limit, source)
    need = round_up_gb(smallest.total)
    if source == GIVEN:
        fix = f"pass {limit_or_more(need)}"
    elif source.startswith("simulated by"):
        fix = f"set {DEVICE_MEMORY_ENV} to {need}GB or more, or unset it"
    else:
        fix = "use a Mac with more memory"
    shorter = arrange(config, 4096, bits, least, limit, source)
    if context > 4096 and shorter.fits:
        fix += f", or {shorter_context(4096)}"
    if unstreamable is None:
        why, experts = "not even with its experts streamed", f"one layer's {config.num_local_experts} experts"
    else:
        why, experts = f"and {unstreamable}, so every expert must be on the GPU", f"all {n} experts"
    raise MemoryPlanError(
        f"the model will not fit in {limit_size(limit)} ({source}), {why}: dense layers ({bits}-bit) "
        f"{size(smallest.dense)} + {experts} {size(smallest.experts)} + KV cache "
        f"{size(smallest.kv_cache)} ({context} tokens) + working {size(smallest.working)}"
        f"{f' + server caches {size(server)}' if server else ''}. "
        f"The smallest limit that works is {need:.2f} GB: {fix}", need * GB)
