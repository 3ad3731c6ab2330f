"""Custom kernels for the hot paths: Metal sources in metal/, verified before they are trusted.

The model calls ``qkv_rope`` (the input norm, the qkv projection and RoPE), ``linear`` (the
attention's output projection), ``attention`` (``attention_step`` in a grouped decode step:
cache.py), ``add_rms_norm_route`` and ``experts`` (``add_rms_norm`` and ``route`` are the
second's two halves, for when its kernel does not apply and for a block called alone); the
sampler calls ``greedy_token``. Each runs its kernels where they apply (and ``registry`` has them
active, see its docstring for ``GPTOSS_MLX_KERNELS``) and the plain-MLX form otherwise. Each
kernel module holds the launch plan, the reference the kernel must equal and a builder of random
inputs for its checks.
"""

from . import registry
from .add_rms_norm import add_rms_norm
from .moe import add_rms_norm_route, experts, fused_fits, route  # registered before attention: doctor's order
from .attention import attention, attention_step, step_covers, step_fits
from .dense import linear
from .qkv import qkv_rope
from .sampling import greedy_token

__all__ = ["add_rms_norm", "add_rms_norm_route", "attention", "attention_step", "experts", "fused_fits", "greedy_token", "linear", "qkv_rope", "registry", "route", "step_covers", "step_fits"]
