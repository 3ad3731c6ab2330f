"""Custom kernels for the hot paths: Metal sources in metal/, verified before they are trusted.

Each kernel module pairs a launcher with its plain-MLX reference; ``registry`` decides at run
time which one runs (see its docstring for ``GPTOSS_MLX_KERNELS``).
"""

from . import registry
from .add_rms_norm import add_rms_norm, add_rms_norm_reference
from .moe import combine_experts, fused_experts, fused_experts_apply, gather_linear, route, swiglu
from .sdpa_decode import sdpa_decode, sdpa_decode_apply
from .sdpa_prefill import sdpa_prefill, sdpa_prefill_apply, window_mask

__all__ = [
    "add_rms_norm", "add_rms_norm_reference", "combine_experts", "fused_experts", "fused_experts_apply",
    "gather_linear", "registry", "route", "sdpa_decode", "sdpa_decode_apply", "sdpa_prefill",
    "sdpa_prefill_apply", "swiglu", "window_mask",
]
