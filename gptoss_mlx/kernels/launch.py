"""A kernel's Metal source, and how it is launched: as an MLX Metal kernel or its CUDA mirror.

``metal/<name>.metal`` holds, in this order: a header comment (grid, threadgroup, layout, what
it fuses), optional helper functions (``#include "x.h"`` lines name other files in metal/ and are
inlined), a line ``// ---- body ----``, and the body that ``mx.fast.metal_kernel`` wraps in the
signature it generates. On CUDA the same helpers and body are compiled by
``mx.fast.cuda_kernel`` after metal/msl_cuda.h, with a short preamble that defines the Metal
thread attributes the body uses (metal/README.md lists the supported subset).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import mlx.core as mx

BODY_MARKER = "// ---- body ----"

# The thread attributes MLX adds to a Metal signature when their name appears in the body
# (mlx/backend/common/metal_kernel.cpp), with the CUDA expression each one mirrors as.
_CUDA_ATTRIBUTES = {
    "thread_position_in_grid": "uint3 thread_position_in_grid = make_uint3("
    "blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y, "
    "blockIdx.z * blockDim.z + threadIdx.z);",
    "thread_position_in_threadgroup": "uint3 thread_position_in_threadgroup = "
    "make_uint3(threadIdx.x, threadIdx.y, threadIdx.z);",
    "threadgroup_position_in_grid": "uint3 threadgroup_position_in_grid = "
    "make_uint3(blockIdx.x, blockIdx.y, blockIdx.z);",
    "threads_per_threadgroup": "uint3 threads_per_threadgroup = "
    "make_uint3(blockDim.x, blockDim.y, blockDim.z);",
    "threadgroups_per_grid": "uint3 threadgroups_per_grid = make_uint3(gridDim.x, gridDim.y, gridDim.z);",
    "threads_per_grid": "uint3 threads_per_grid = make_uint3("
    "gridDim.x * blockDim.x, gridDim.y * blockDim.y, gridDim.z * blockDim.z);",
    "thread_index_in_threadgroup": "uint thread_index_in_threadgroup = threadIdx.x + "
    "blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);",
    "thread_index_in_simdgroup": "uint thread_index_in_simdgroup = (threadIdx.x + "
    "blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32;",
    "simdgroup_index_in_threadgroup": "uint simdgroup_index_in_threadgroup = (threadIdx.x + "
    "blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) / 32;",
    "simdgroups_per_threadgroup": "uint simdgroups_per_threadgroup = "
    "(blockDim.x * blockDim.y * blockDim.z) / 32;",
    "threads_per_simdgroup": "uint threads_per_simdgroup = 32;",
    "thread_execution_width": "uint thread_execution_width = 32;",
}

_CUDA_TYPES = {
    mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int32_t", mx.uint32: "uint32_t", mx.uint8: "uint8_t", mx.int64: "int64_t",
    mx.uint16: "uint16_t", mx.int8: "int8_t", mx.bool_: "bool",
}


class KernelSourceError(ValueError):
    pass


def metal_dir() -> Path:
    """Installed: the gptoss_mlx.metal package; a bare checkout on PYTHONPATH: its metal/."""
    try:
        return Path(str(resources.files("gptoss_mlx.metal")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "metal"


def read_metal_file(name: str) -> str:
    return (metal_dir() / name).read_text()


def _inline_includes(text: str, seen: set[str]) -> str:
    def include(match: re.Match) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _inline_includes(read_metal_file(name), seen)

    return re.sub(r'^\s*#include\s+"([^"]+)"\s*$', include, text, flags=re.MULTILINE)


@cache
def kernel_source(name: str) -> tuple[str, str]:
    """(header, body) of metal/<name>.metal, includes inlined."""
    text = read_metal_file(f"{name}.metal")
    if BODY_MARKER not in text:
        raise KernelSourceError(f"metal/{name}.metal has no '{BODY_MARKER}' line")
    header, body = text.split(BODY_MARKER, 1)
    # The header comment documents the file; MLX re-sends the source on every call, so the
    # comment lines stay out of what it compiles.
    header = "\n".join(line for line in header.splitlines() if not line.lstrip().startswith("//"))
    return _inline_includes(header, set()).strip() + "\n", body.strip() + "\n"


@dataclass
class Launch:
    """One call of a kernel: its inputs (arrays or Python scalars) and launch geometry.

    ``grid`` counts threads, as in mx.fast.metal_kernel; it must be a multiple of
    ``threadgroup`` (whole threadgroups, whole simdgroups: metal/README.md).
    """

    inputs: list
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: list[tuple[str, object]] = field(default_factory=list)
    init_value: float | None = None

    def __post_init__(self):  # runs for every launch: plain arithmetic, no generators
        tx, ty, tz = self.threadgroup
        gx, gy, gz = self.grid
        size = tx * ty * tz
        if size % 32 or size > 1024:
            raise KernelSourceError(f"threadgroup {self.threadgroup}: size must be a multiple of 32, at most 1024")
        if gx % tx or gy % ty or gz % tz:
            raise KernelSourceError(f"grid {self.grid} is not a multiple of threadgroup {self.threadgroup}")


class Kernel:
    """The kernel in metal/<name>.metal, built once per backend and launched with a Launch."""

    def __init__(self, name: str, input_names: list[str], output_names: list[str],
                 source: tuple[str, str] | None = None, constants: tuple[str, ...] = ()):
        """``source`` (header, body) replaces metal/<name>.metal (tests plant mutants this way).
        ``constants``: scalar inputs whose value is fixed for a model (an eps, a limit). On CUDA
        they are compiled into the kernel (a template argument per value) instead of passed in
        memory: MLX-CUDA keeps every array of 8 bytes or less in one pool of managed memory that
        the host writes each time it makes a scalar, so a kernel reading one waits on a page
        migration (about 10 µs a launch on the H200; docs/measurements.md)."""
        self.name = name
        self.source = source
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.constants = tuple(constants)
        unknown = set(self.constants) - set(self.input_names)
        if unknown:
            raise KernelSourceError(f"kernel {name!r}: constants {sorted(unknown)} are not inputs")
        self._metal = None
        self._cuda = {}

    def metal(self):
        if self._metal is None:
            header, body = self.source or kernel_source(self.name)
            self._metal = mx.fast.metal_kernel(
                name=self.name, input_names=self.input_names, output_names=self.output_names,
                source=body, header=header,
            )
        return self._metal

    def cuda(self, scalar_dtypes: tuple):
        """The CUDA mirror. Scalar inputs arrive as pointers there, so they are renamed and
        read back under their own name in a preamble (one build per scalar-dtype pattern)."""
        if scalar_dtypes not in self._cuda:
            header, body = self.source or kernel_source(self.name)
            names, preamble = [], []
            for name, dtype in zip(self.input_names, scalar_dtypes):
                if dtype is None:
                    names.append(name)
                elif name in self.constants:
                    preamble.append(cuda_constant(name, dtype))
                else:
                    names.append(f"{name}__ptr")
                    preamble.append(f"const {_CUDA_TYPES[dtype]} {name} = *{name}__ptr;")
            preamble += [decl for attr, decl in _CUDA_ATTRIBUTES.items() if attr in body]
            self._cuda[scalar_dtypes] = mx.fast.cuda_kernel(
                name=self.name, input_names=names, output_names=self.output_names,
                source="\n".join(preamble) + "\n" + body,
                header=read_metal_file("msl_cuda.h") + "\n" + header,
            )
        return self._cuda[scalar_dtypes]

    def __call__(self, launch: Launch, backend: str | None = None) -> list[mx.array]:
        backend = backend or gpu_backend()
        kwargs = dict(
            output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes,
            grid=launch.grid, threadgroup=launch.threadgroup, init_value=launch.init_value,
        )
        if launch.template:
            kwargs["template"] = launch.template
        if backend == "metal":
            return self.metal()(inputs=launch.inputs, **kwargs)
        if backend == "cuda":
            scalar_dtypes = tuple(map(_scalar_dtype, launch.inputs))
            inputs = launch.inputs
            if any(d is not None for d in scalar_dtypes):
                inputs, template = [], list(launch.template)
                for name, x, d in zip(self.input_names, launch.inputs, scalar_dtypes):
                    if d is None:
                        inputs.append(x)
                    elif name in self.constants:
                        template += constant_template(name, x, d)
                    elif isinstance(x, mx.array):  # a () array: as it is (a view of a
                        inputs.append(x)  # device array stays out of the pool of small arrays)
                    else:
                        inputs.append(mx.array(x, dtype=d))
                kwargs["template"] = template
            return self.cuda(scalar_dtypes)(inputs=inputs, **kwargs)
        raise KernelSourceError(f"no GPU backend to run kernel {self.name!r} on")


def constant_bits(x, dtype) -> int | bool:
    """A constant scalar's value as the device reads it: a float32 by its bits (an unsigned
    32-bit int; a finite float beyond float32's range rounds to an infinity, as mx.array does)."""
    if isinstance(x, mx.array):
        x = x.item()
    if dtype == mx.float32:
        try:
            packed = struct.pack("<f", float(x))
        except OverflowError:
            packed = struct.pack("<f", math.copysign(math.inf, x))
        return struct.unpack("<I", packed)[0]
    if dtype == mx.bool_:
        return bool(x)
    if dtype == mx.int32:
        return int(x) & 0xFFFFFFFF
    raise KernelSourceError(f"a constant of dtype {dtype} cannot be a template argument")


def constant_template(name: str, x, dtype) -> list[tuple[str, int | bool]]:
    """The template arguments that carry constant ``name``: a bool as itself, 32 bits as two
    16-bit halves. Every one is non-negative: MLX-CUDA names the kernel after its template
    arguments, and a minus sign (a negative float's bits) made a name NVRTC refused."""
    bits = constant_bits(x, dtype)
    if dtype == mx.bool_:
        return [(f"{name}__bits", bits)]
    return [(f"{name}__hi", bits >> 16), (f"{name}__lo", bits & 0xFFFF)]


def cuda_constant(name: str, dtype) -> str:
    """The CUDA preamble line that defines constant ``name`` from its template arguments."""
    if dtype == mx.bool_:
        return f"const bool {name} = {name}__bits;"
    bits = f"((unsigned({name}__hi) << 16) | unsigned({name}__lo))"
    if dtype == mx.float32:
        return f"const float {name} = __uint_as_float{bits};"
    return f"const {_CUDA_TYPES[dtype]} {name} = int{bits};"


def _scalar_dtype(x):
    if isinstance(x, mx.array):  # the common case first: this runs for every input of every launch
        return x.dtype if x.ndim == 0 else None
    if isinstance(x, bool):
        return mx.bool_
    if isinstance(x, int):
        return mx.int32
    if isinstance(x, float):
        return mx.float32
    return None


def gpu_backend() -> str | None:
    """'metal', 'cuda' or None (CPU only), for the default device (called per launch)."""
    return _installed_gpu_backend() if mx.default_device() == mx.gpu else None


@cache
def _installed_gpu_backend() -> str | None:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None
