"""Memory planning: will this model, at this context length, fit in what the GPU may use?

Estimated before loading from the config alone, so a 16 GB Mac gets options instead of swap:
a shorter ``--max-context``, ``--dense-bits 8|4`` (affine-quantize attention, router, embedding
and unembedding at load time; experts stay MXFP4), or raising ``iogpu.wired_limit_mb``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import mlx.core as mx

from .config import MXFP4_BLOCK, ModelConfig

GB = 1e9
WORKING_BYTES = 1.0 * GB  # activations of a 512-token prefill chunk, logits, MLX's own buffers
AFFINE_GROUP = 64
DEFAULT_CONTEXT = 32768  # tokens the front ends plan memory for and allow without --max-context


class MemoryPlanError(RuntimeError):
    """The model will not fit; the message lists what to do instead."""


@dataclass
class MemoryPlan:
    weights: float
    kv_cache: float
    working: float
    limit: float
    limit_source: str

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.working

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    def describe(self) -> str:
        return (f"weights {self.weights / GB:.1f} GB + KV cache {self.kv_cache / GB:.2f} GB + "
                f"working {self.working / GB:.1f} GB = {self.total / GB:.1f} GB of "
                f"{self.limit / GB:.1f} GB ({self.limit_source})")


def _dense_bytes(n_params: int, dense_bits: int | None) -> float:
    if dense_bits is None:
        return 2.0 * n_params  # bf16
    return n_params * (dense_bits + 32 / AFFINE_GROUP) / 8  # + fp16 scale and bias per group


def weight_bytes(config: ModelConfig, dense_bits: int | None = None) -> float:
    D, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    mxfp4 = (4 + 8 / MXFP4_BLOCK) / 8  # 4-bit values + one uint8 scale per 32
    experts = E * (2 * I * D + D * I) * mxfp4 + E * (2 * I + D) * 2
    attn_weights = D * H * hd * 2 + D * KV * hd * 2
    attn_other = (H * hd + 2 * KV * hd + D + H) * 2 + 2 * D * 4  # biases, sinks, fp32 norms
    router = E * D
    per_layer = experts + _dense_bytes(attn_weights + router, dense_bits) + attn_other + E * 2
    embed = _dense_bytes(2 * config.vocab_size * D, dense_bits)
    return config.num_hidden_layers * per_layer + embed + D * 4


def checkpoint_dense_bits(config: ModelConfig, dense_bits: int | None = None) -> int | None:
    """--dense-bits if given, else the bits a converted checkpoint stores its dense layers in."""
    return dense_bits or (config.quantization or {}).get("bits")


def kv_cache_bytes(config: ModelConfig, context: int, bytes_per_value: int = 2) -> float:
    per_token = 2 * config.num_key_value_heads * config.head_dim * bytes_per_value  # K and V
    total = 0
    for sliding in config.sliding_layers:
        total += per_token * (min(context, config.sliding_window) if sliding else context)
    return total


def device_limit() -> tuple[float, str]:
    """Bytes the GPU may use and where that number comes from."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get("max_recommended_working_set_size"):
        return float(info["max_recommended_working_set_size"]), "Metal recommended working set"
    if mx.default_device() == mx.gpu and info.get("memory_size"):
        return float(info["memory_size"]), "GPU memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(ram), "system RAM"


def plan(config: ModelConfig, context: int, dense_bits: int | None = None,
         limit: float | None = None) -> MemoryPlan:
    source = "given"
    if limit is None:
        limit, source = device_limit()
    return MemoryPlan(weight_bytes(config, dense_bits), kv_cache_bytes(config, context),
                      WORKING_BYTES, limit, source)


def check_fits(config: ModelConfig, context: int, dense_bits: int | None = None,
               limit: float | None = None) -> MemoryPlan:
    """The plan, or a MemoryPlanError that says what would fit."""
    p = plan(config, context, dense_bits, limit)
    if p.fits:
        return p
    options = []
    for ctx in (32768, 16384, 8192, 4096, 2048):
        if ctx < context and plan(config, ctx, dense_bits, p.limit).fits:
            options.append(f"  --max-context {ctx}")
            break
    for bits in (8, 4):
        if dense_bits in (None, 16) or bits < dense_bits:
            q = plan(config, context, bits, p.limit)
            if q.fits:
                options.append(f"  --dense-bits {bits}  ({q.total / GB:.1f} GB; attention, router "
                               "and embeddings quantized, experts stay MXFP4)")
                break
    if platform.system() == "Darwin":
        need_mb = int(p.total / 2**20) + 512
        options.append(
            f"  sudo sysctl iogpu.wired_limit_mb={need_mb}  (lets the GPU wire more memory until "
            "reboot; leave macOS at least 3-4 GB or it may freeze or swap - close other apps)")
    hint = "\n".join(options) if options else "  use a machine with more memory"
    raise MemoryPlanError(f"the model will not fit: {p.describe()}.\nOptions:\n{hint}")
