"""Which custom kernels run, checked once per process before they are trusted.

Every kernel is registered with its plain-MLX reference and a builder of random inputs. On a GPU
backend the first use of a kernel (per activation dtype) runs it and the reference on a small input; a
compile error or a mismatch disables that kernel with one warning, and the reference runs from
then on. ``GPTOSS_MLX_KERNELS`` chooses:

- ``check`` (default): verify on first use as above;
- ``on``: use every kernel without the first-use check;
- ``off``: always the plain-MLX reference.

On the CPU there is no GPU kernel to run: the reference path is used.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from .launch import Kernel, Launch, gpu_backend

MODES = ("check", "on", "off")
ENV_VAR = "GPTOSS_MLX_KERNELS"


@dataclass
class KernelSpec:
    name: str
    kernel: Kernel
    plan: Callable[..., Launch]  # the public function's arguments -> one launch
    reference: Callable[..., tuple]  # same arguments -> the outputs, in plain MLX
    sample: Callable[[tuple, mx.array, mx.Dtype], tuple]  # (shape, random key, dtype) -> arguments
    # the run-time check's (shape, seed): small, but launching threadgroups as wide as gpt-oss's
    # (a launch the device cannot make, its registers say, then fails the check, not a decode step)
    check: tuple[tuple, int]
    dtypes: tuple = (mx.float32, mx.float16, mx.bfloat16)
    description: str = ""
    # The kernel accumulates in float32 and rounds once; an MLX path in half precision rounds
    # (and on the CPU accumulates) in that precision at every step. Such kernels are compared
    # with the reference computed from the same inputs in float32.
    reference_in_float32: bool = False

    def check_args(self, dtype: mx.Dtype) -> tuple:
        """The arguments of the run-time check for ``dtype``."""
        shape, seed = self.check
        return self.sample(shape, mx.random.key(seed), dtype)

    def launch(self, *args) -> list[mx.array]:
        return self.kernel(self.plan(*args))

    def expected(self, *args) -> tuple:
        """What the kernel must produce for these arguments (within ``tolerance``). Computed on
        the CPU, whose float32 matmul is exact float32: MLX on CUDA multiplies float32 in TF32
        (relative error 3e-4 on the GPU machine, above float32's tolerance)."""
        with mx.stream(mx.cpu):
            if self.reference_in_float32:
                args = [a.astype(mx.float32) if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)
                        else a for a in args]
            out = self.reference(*args)
            mx.eval(out)
        return out


REGISTRY: dict[str, KernelSpec] = {}
_state: dict[tuple[str, mx.Dtype], str] = {}  # "active", "active (unchecked)", "disabled: why"


def register(spec: KernelSpec) -> KernelSpec:
    REGISTRY[spec.name] = spec
    return spec


def mode() -> str:
    value = os.environ.get(ENV_VAR, "check").strip().lower() or "check"
    if value not in MODES:
        warnings.warn(f"{ENV_VAR}={value!r} is not one of {', '.join(MODES)}; using 'check'", stacklevel=3)
        return "check"
    return value


def tolerance(dtype: mx.Dtype) -> float:
    """Allowed |kernel - reference| relative to max(1, |reference|): a few ulps of the dtype."""
    return {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1e-2}.get(dtype, 0.0)


def max_error(outputs, expected) -> float:
    """Largest |a - b| / max(1, |b|) over all outputs (inf on a shape mismatch or a NaN); an
    integer output (ids, indices) must be equal (inf otherwise)."""
    worst = 0.0
    for a, b in zip(outputs, expected, strict=True):
        if a.shape != b.shape:
            return float("inf")
        if not mx.issubdtype(b.dtype, mx.floating):
            if not mx.array_equal(a, b).item():
                return float("inf")
            continue
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        err = mx.abs(a - b) / mx.maximum(mx.abs(b), 1.0)
        err = mx.where(mx.isnan(a) != mx.isnan(b), mx.inf, mx.where(mx.isnan(b), 0.0, err))
        worst = max(worst, err.max().item() if err.size else 0.0)
    return worst


def verify(name: str, dtype: mx.Dtype) -> str:
    """Run kernel and reference on the check's input; returns and records the kernel's state."""
    spec = REGISTRY[name]
    args = spec.check_args(dtype)
    try:
        got = spec.launch(*args)
        mx.eval(got)
        err = max_error(got, spec.expected(*args))
    except Exception as e:  # a compile error surfaces here, at evaluation
        state = f"disabled: failed to run ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
    else:
        if err <= tolerance(dtype):
            state = "active"
        else:
            state = f"disabled: differs from the reference by {err:.3g} (allowed {tolerance(dtype):.1g})"
    if state.startswith("disabled"):
        warnings.warn(
            f"gptoss-mlx kernel {name!r} ({dtype}) {state}; using the plain-MLX path instead.",
            RuntimeWarning, stacklevel=3,
        )
    _state[(name, dtype)] = state
    return state


def active(name: str, dtype: mx.Dtype) -> bool:
    """Whether to launch kernel ``name`` for activations of ``dtype`` (checking it first)."""
    state = _state.get((name, dtype))  # decided once: this runs for every layer of every token
    if state is None:
        if gpu_backend() is None:
            state = "reference path (no GPU backend here)"
        elif mode() == "off":
            state = f"off ({ENV_VAR}=off)"
        elif dtype not in REGISTRY[name].dtypes:
            state = f"reference path (no {dtype} variant)"
        else:
            state = "active (unchecked)" if mode() == "on" else verify(name, dtype)
        _state[(name, dtype)] = state
    return state.startswith("active")


def status(dtype: mx.Dtype = mx.bfloat16, check: bool = True) -> list[tuple[str, str, str]]:
    """(name, state, description) of every kernel for ``dtype``, verifying them if asked."""
    backend = gpu_backend()
    rows = []
    for name, spec in REGISTRY.items():
        if (name, dtype) in _state or check or backend is None or mode() == "off":
            active(name, dtype)
            state = _state[(name, dtype)]
        else:
            state = "not used yet"
        rows.append((name, f"{state} [{backend}]" if backend and state.startswith("active") else state, spec.description))
    return rows


def reset() -> None:
    """Forget every kernel's state (tests; a changed GPTOSS_MLX_KERNELS)."""
    _state.clear()
