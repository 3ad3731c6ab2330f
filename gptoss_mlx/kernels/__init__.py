"""Custom kernels for the hot paths: Metal sources in metal/, verified before they are trusted.

The model makes four calls; each runs its kernels where they apply (and ``registry`` has them
active, see its docstring for ``GPTOSS_MLX_KERNELS``) and the plain-MLX form in ``ops``
otherwise. Each kernel module holds the launch plan, the reference the kernel must equal and a
builder of random inputs for its checks.
"""

from . import registry
from .add_rms_norm import add_rms_norm
from .moe import experts, route  # registered before attention: the order `gptoss-mlx doctor` lists
from .attention import attention

__all__ = ["add_rms_norm", "attention", "experts", "registry", "route"]
