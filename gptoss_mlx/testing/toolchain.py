"""Checking Metal kernels without a Mac (metal/README.md, steps 2 and 3).

- :func:`generated_metal_source` — the exact source MLX would hand the Metal compiler for one
  launch, obtained by tracing the call under ``mx.export_function(verbose=True)``, which works
  without Metal.
- :func:`check_metal_syntax` — type-checks that source with clang against metal/msl_check.h.
- :func:`emulate` — compiles the same source as C++ against metal/msl_emulate.h and runs it on
  the CPU (real threads, real barriers, 32-lane simdgroups) on NumPy inputs.

Development and CI tooling (tests/test_kernels.py): the library never imports it, and never
needs a C++ compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..kernels.launch import Kernel, Launch, metal_dir


class ToolchainError(RuntimeError):
    pass


# ---- the generated source -------------------------------------------------------------------

def _as_mx(x):
    return x if isinstance(x, (int, float, bool, mx.array)) else mx.array(x)


def generated_metal_source(kernel: Kernel, launch: Launch) -> str:
    """The Metal source MLX generates for this launch (signature, header and body)."""
    inputs = [_as_mx(x) for x in launch.inputs]
    arrays = [x for x in inputs if isinstance(x, mx.array)]
    positions = [i for i, x in enumerate(inputs) if isinstance(x, mx.array)]

    def call(*traced):
        args = list(inputs)
        for i, a in zip(positions, traced):
            args[i] = a
        kwargs = dict(
            inputs=args, output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes,
            grid=launch.grid, threadgroup=launch.threadgroup, init_value=launch.init_value,
            verbose=True,
        )
        if launch.template:
            kwargs["template"] = launch.template
        return kernel.metal()(**kwargs)

    # MLX prints the source from C++: capture file descriptor 1, not sys.stdout.
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile(mode="w+b") as out:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "k.mlxfn"), call, *arrays)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        printed = out.read().decode()
    match = re.search(r"```\n(.*?)```", printed, re.DOTALL)
    if not match:
        raise ToolchainError(f"MLX printed no kernel source for {kernel.name!r}:\n{printed[:2000]}")
    return match.group(1)


@dataclass
class Signature:
    function: str  # the [[kernel]] function's name
    template_args: str  # e.g. "float16_t, 4" from the explicit instantiation, or ""
    params: list[tuple[str, str, str]]  # (type, name, attribute) in order


_PARAM = re.compile(r"^\s*(.*?)\s*(\w+)\s*\[\[(.*?)\]\]\s*[,)]", re.MULTILINE)


def parse_signature(source: str) -> Signature:
    head = re.search(r"\[\[kernel\]\] void (\w+)\((.*?)\) \{", source, re.DOTALL)
    if not head:
        raise ToolchainError("no [[kernel]] function in the generated source")
    params = [(t, n, a) for t, n, a in _PARAM.findall(head.group(2) + ",")]
    inst = re.search(r"decltype\(" + re.escape(head.group(1)) + r"<(.*?)>\)", source)
    return Signature(head.group(1), inst.group(1) if inst else "", params)


# ---- compilers ------------------------------------------------------------------------------

def find_clang() -> str | None:
    """A clang++ that knows _Float16 on this host (clang >= 15)."""
    for name in ("clang++", "clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++-15"):
        path = shutil.which(name)
        if path and _clang_major(path) >= 15:
            return path
    return None


def _clang_major(path: str) -> int:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    m = re.search(r"clang version (\d+)", out)
    return int(m.group(1)) if m else 0


def find_cxx() -> str | None:
    """A C++ compiler for the emulator: $CXX, g++ (>= 12 has _Float16 on x86-64) or clang."""
    for cand in (os.environ.get("CXX"), "g++", "c++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return find_clang()


_TYPE_SIZES = {"float": 4, "half": 2, "float16_t": 2, "bfloat16_t": 2, "int": 4, "uint": 4,
               "int32_t": 4, "uint32_t": 4, "short": 2, "ushort": 2, "char": 1, "uchar": 1,
               "uint8_t": 1, "float2": 8, "float4": 16, "uint4": 16, "half4": 8}


def check_metal_limits(source: str) -> None:
    """Metal limits clang cannot see: at most 31 buffers, at most 32 KB of threadgroup memory
    (arrays whose size is a literal; a template-sized array is not counted)."""
    buffers = [int(b) for b in re.findall(r"\[\[buffer\((\d+)\)\]\]", source)]
    if buffers and max(buffers) > 30:
        raise ToolchainError(f"the kernel binds buffer({max(buffers)}); Metal allows buffer indices up to 30")
    total = 0
    for type_, size in re.findall(r"threadgroup\s+(\w+)\s+\w+\s*\[\s*(\d+)\s*\]", source):
        total += _TYPE_SIZES.get(type_, 4) * int(size)
    if total > 32768:
        raise ToolchainError(f"{total} bytes of threadgroup memory; Metal allows 32768")


def check_metal_syntax(source: str, clang: str | None = None) -> None:
    """Type-check generated Metal source with clang; raises ToolchainError with clang's
    diagnostics (line numbers refer to the generated source)."""
    check_metal_limits(source)
    clang = clang or find_clang()
    if clang is None:
        raise ToolchainError("no clang++ >= 15 found (on Debian: apt-get install clang-16)")
    # The explicit instantiation carries attribute lists that only Metal allows there; without
    # them it still instantiates the template, so the body is checked with concrete types.
    source = re.sub(r"^template \[\[host_name\(.*?\)\]\] \[\[kernel\]\]", "template", source, flags=re.MULTILINE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.metal.cpp"
        path.write_text(source)
        cmd = [
            clang, "-x", "c++", "-std=c++17", "-fsyntax-only", "-Werror", "-Wno-unknown-attributes",
            "-Wno-unused-variable", "-Wno-unused-parameter", "-Wno-unused-function",
            "-include", str(metal_dir() / "msl_check.h"), str(path),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ToolchainError(f"clang rejected the Metal source:\n{proc.stderr.strip()}")


# ---- the emulator ---------------------------------------------------------------------------

_NP_TYPES = {
    "float": np.float32, "float16_t": np.float16, "half": np.float16, "bfloat16_t": np.uint16,
    "int": np.int32, "int32_t": np.int32, "uint": np.uint32, "uint32_t": np.uint32,
    "uint8_t": np.uint8, "int64_t": np.int64, "uint16_t": np.uint16, "int8_t": np.int8,
    "bool": np.bool_,
}
_THREAD_ATTRIBUTES = {
    "thread_position_in_grid", "thread_position_in_threadgroup", "threadgroup_position_in_grid",
    "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid",
    "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup", "threads_per_simdgroup", "thread_execution_width",
}
_CONSTANT_ATTRIBUTES = {"threads_per_simdgroup": "32", "thread_execution_width": "32"}


def _cache_dir() -> Path:
    root = os.environ.get("GPTOSS_MLX_EMULATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptoss-mlx", "emulator")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _driver(sig: Signature) -> str:
    args, buffer = [], 0
    for ctype, name, attr in sig.params:
        if attr.startswith("buffer("):
            base = re.sub(r"\b(const|device|constant)\b", "", ctype).replace("*", "").replace("&", "").strip()
            if ctype.endswith("&"):
                args.append(f"*reinterpret_cast<const {base}*>(bufs[{buffer}])")
            else:
                args.append(f"reinterpret_cast<{ctype.replace('device', '').replace('constant', '')}>(bufs[{buffer}])")
            buffer += 1
        elif attr in _CONSTANT_ATTRIBUTES:
            args.append(_CONSTANT_ATTRIBUTES[attr])
        elif attr in _THREAD_ATTRIBUTES:
            args.append(f"ids.{attr}")
        else:
            raise ToolchainError(f"the emulator does not provide the attribute [[{attr}]]")
    template = f"<{sig.template_args}>" if sig.template_args else ""
    return (
        '\nextern "C" int gptoss_emulate(void** bufs, const int* grid, const int* tg, int reverse,'
        " char* err, int errlen) {\n"
        "  return msl_emu::launch(grid, tg, reverse != 0, [&](const msl_emu::Ids& ids) {\n"
        f"    {sig.function}{template}({', '.join(args)});\n"
        "  }, err, errlen);\n}\n"
    )


def build_emulator(source: str, cxx: str | None = None) -> ctypes.CDLL:
    """Compile generated Metal source + a driver into a shared library (cached by content)."""
    cxx = cxx or find_cxx()
    if cxx is None:
        raise ToolchainError("no C++ compiler found for the emulator (g++ >= 12 or clang++ >= 15)")
    sig = parse_signature(source)
    # The explicit instantiation line carries Metal-only attributes; the driver instantiates.
    body = re.sub(r"^template \[\[host_name.*$", "", source, flags=re.MULTILINE)
    unit = '#include "msl_emulate.h"\n' + body + _driver(sig)
    header = (metal_dir() / "msl_emulate.h").read_text()
    key = hashlib.sha256((unit + header + cxx).encode()).hexdigest()[:24]
    lib = _cache_dir() / f"k_{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.cpp"
            src.write_text(unit)
            tmp_lib = Path(tmp) / "kernel.so"
            cmd = [
                cxx, "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-pthread", "-Wno-attributes",
                "-I", str(metal_dir()), str(src), "-o", str(tmp_lib),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise ToolchainError(f"the emulator build failed:\n{proc.stderr.strip()[:6000]}")
            shutil.move(str(tmp_lib), lib)
    return ctypes.CDLL(str(lib))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            return np.array(x.view(mx.uint16))
        return np.array(x)
    return np.asarray(x)


def emulate(kernel: Kernel, launch: Launch, order: str = "forward") -> list[mx.array]:
    """Run the kernel's generated Metal source on the CPU; returns MLX arrays like the kernel.

    ``order``: "forward" or "reverse" scheduling priority (msl_emulate.h). Outputs start as NaN
    (0xFF bytes), so an element the kernel forgets to write shows up.
    """
    source = generated_metal_source(kernel, launch)
    sig = parse_signature(source)
    lib = build_emulator(source)
    inputs = [_as_mx(x) for x in launch.inputs]
    buffers, keep = [], []
    for name, x in zip(kernel.input_names, inputs):
        a = mx.array(x) if not isinstance(x, mx.array) else x
        arr = np.ascontiguousarray(_to_numpy(a))
        keep.append(arr)
        buffers.append(arr.ctypes.data)
        for suffix, values, dtype in (
            ("_shape", a.shape, np.int32), ("_strides", _strides(a.shape), np.int64), ("_ndim", [a.ndim], np.int32),
        ):
            if any(p[1] == f"{name}{suffix}" for p in sig.params):  # MLX added the buffer
                extra = np.array(values if values else [0], dtype=dtype)
                keep.append(extra)
                buffers.append(extra.ctypes.data)
    outputs = []
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
        if launch.init_value is None:
            raw = np.full(max(1, int(np.prod(shape, dtype=np.int64)) * dtype.size), 0xFF, dtype=np.uint8)
        else:
            raw = np.array(mx.full(shape, launch.init_value, dtype=dtype).view(mx.uint8)).reshape(-1).copy()
        outputs.append(raw)
        buffers.append(raw.ctypes.data)
    bufs = (ctypes.c_void_p * len(buffers))(*buffers)
    grid = (ctypes.c_int * 3)(*launch.grid)
    tg = (ctypes.c_int * 3)(*launch.threadgroup)
    err = ctypes.create_string_buffer(1024)
    rc = lib.gptoss_emulate(bufs, grid, tg, ctypes.c_int(order == "reverse"), err, ctypes.c_int(1024))
    if rc != 0:
        raise ToolchainError(f"kernel {kernel.name!r} failed in the emulator: {err.value.decode()}")
    results = []
    for raw, shape, dtype in zip(outputs, launch.output_shapes, launch.output_dtypes):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.size
        results.append(mx.array(raw[:nbytes]).view(dtype).reshape(shape))
    return results


def _strides(shape) -> list[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return list(reversed(strides))
