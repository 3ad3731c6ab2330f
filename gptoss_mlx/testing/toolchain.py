"""Checking Metal kernels without a Mac (metal/README.md, steps 2 and 3).

- :func:`generated_metal_source` — the exact source MLX would hand the Metal compiler for one
  launch, obtained by tracing the call under ``mx.export_function(verbose=True)``, which works
  without Metal.
- :func:`check_metal_syntax` — type-checks that source with clang against metal/msl_check.h.
- :func:`emulate` — compiles the same source as C++ against metal/msl_emulate.h and runs it on
  the CPU (one fiber per kernel thread, real barriers, 32-lane simdgroups) on NumPy inputs.

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


# Rewrites of the generated source for the emulator (metal/msl_emulate.h, "checked memory"):
# every address-space pointer becomes msl_emu::ptr, every array a checked msl_emu array.
_POINTER = re.compile(r"\b(const\s+)?(?:device|constant|thread)\s+(const\s+)?(\w+)\s*\*")
_THREADGROUP_ARRAY = re.compile(r"\bthreadgroup\s+(\w+)\s+(\w+)\s*\[([^\[\]]+)\]\s*;")
_NOT_A_TYPE = r"(?!(?:return|else|case|goto|delete|throw)\b)"
_LOCAL_ARRAY = re.compile(
    r"^(\s*)(const\s+)?" + _NOT_A_TYPE + r"(\w+)\s+(\w+)\s*\[([^\[\]]+)\]\s*(?:=\s*\{([^{};]*)\})?\s*;",
    re.MULTILINE)
_ANY_ARRAY = re.compile(r"\b" + _NOT_A_TYPE + r"\w+\s+\w+\s*\[(?!\[)")


def checked_source(source: str) -> str:
    """The generated source with every pointer and array in the checked types of msl_emulate.h.

    ``const device T* p`` (also ``constant``, ``thread``, and casts) becomes
    ``msl_emu::ptr<const T> p``; ``threadgroup T a[N];`` a static ``threadgroup_array``;
    ``T a[N];`` and ``T a[N] = {...};`` an ``array``. Any other array or threadgroup declaration
    would escape the checks, so it is refused (metal/README.md, the supported subset)."""
    source = re.sub(r"//[^\n]*", "", source)  # comments may say "threadgroup" or "a[i]"
    source = _THREADGROUP_ARRAY.sub(
        lambda m: f'static msl_emu::threadgroup_array<{m[1]}, ({m[3]})> {m[2]}("{m[2]}");', source)
    source = _POINTER.sub(lambda m: f"msl_emu::ptr<{'const ' if m[1] or m[2] else ''}{m[3]}>", source)

    def local_array(m: re.Match) -> str:
        init = f", {{{m[6]}}}" if m[6] is not None else ""
        return f'{m[1]}{m[2] or ""}msl_emu::array<{m[3]}, ({m[5]})> {m[4]}("thread array", "{m[4]}"{init});'

    source = _LOCAL_ARRAY.sub(local_array, source)
    for pattern, what in ((r"\bthreadgroup\b[^;{]*", "threadgroup declaration"), (_ANY_ARRAY, "array declaration")):
        left = re.search(pattern, source)
        if left:
            line = source[source.rfind("\n", 0, left.start()) + 1:source.find("\n", left.start())].strip()
            raise ToolchainError(
                f"the emulator cannot check the {what} {line!r}: declare threadgroup memory as "
                "`threadgroup T name[N];` and thread arrays as `T name[N];`, one per statement, "
                "one-dimensional (metal/README.md)")
    return source


def _driver(sig: Signature) -> str:
    args, buffer = [], 0
    for ctype, name, attr in sig.params:
        if attr.startswith("buffer("):
            base = re.sub(r"\b(const|device|constant)\b", "", ctype).replace("*", "").replace("&", "").strip()
            if ctype.endswith("&"):
                args.append(f"*reinterpret_cast<const {base}*>(bufs[{buffer}])")
            else:
                const = "const " if re.match(r"\s*const\b", ctype) else ""
                args.append(f'msl_emu::ptr<{const}{base}>(bufs[{buffer}], sizes[{buffer}], "buffer", "{name}")')
            buffer += 1
        elif attr in _CONSTANT_ATTRIBUTES:
            args.append(_CONSTANT_ATTRIBUTES[attr])
        elif attr in _THREAD_ATTRIBUTES:
            args.append(f"ids.{attr}")
        else:
            raise ToolchainError(f"the emulator does not provide the attribute [[{attr}]]")
    template = f"<{sig.template_args}>" if sig.template_args else ""
    return (
        '\nextern "C" int gptoss_emulate(void** bufs, const long* sizes, const int* grid, const int* tg,'
        " int reverse, char* err, int errlen) {\n"
        "  return msl_emu::launch(grid, tg, reverse != 0, [&](const msl_emu::Ids& ids) {\n"
        f"    {sig.function}{template}({', '.join(args)});\n"
        "  }, err, errlen);\n}\n"
    )


_EMULATOR_FLAGS = ("-std=c++17", "-O1", "-g0", "-fPIC", "-pthread", "-Wno-attributes")


def _precompiled_header(cxx: str, header: str) -> Path | None:
    """A folder holding msl_emulate.h and g++'s precompiled form of it, made once per header and
    compiler (parsing the header was 0.7 s of a kernel's 1.8 s build, and a fresh clone builds
    about 280); None where it cannot be made, or the compiler is not g++ (the build parses it)."""
    if "g++" not in os.path.basename(cxx):
        return None
    key = hashlib.sha256("\0".join((header, os.path.realpath(cxx), *_EMULATOR_FLAGS)).encode()).hexdigest()[:24]
    folder = _cache_dir() / f"pch_{key}"
    if (folder / "msl_emulate.h.gch").exists():
        return folder
    work = Path(tempfile.mkdtemp(dir=_cache_dir(), prefix=".pch-"))
    try:
        (work / "msl_emulate.h").write_text(header)
        proc = subprocess.run([cxx, *_EMULATOR_FLAGS, "-x", "c++-header", str(work / "msl_emulate.h"),
                               "-o", str(work / "msl_emulate.h.gch")], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return None
        try:
            os.rename(work, folder)  # whole, or not at all (another worker may have made it first)
        except OSError:
            pass
        return folder if (folder / "msl_emulate.h.gch").exists() else None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_emulator(source: str, cxx: str | None = None) -> ctypes.CDLL:
    """Compile generated Metal source + a driver into a shared library (cached by content)."""
    cxx = cxx or find_cxx()
    if cxx is None:
        raise ToolchainError("no C++ compiler found for the emulator (g++ >= 12 or clang++ >= 15)")
    sig = parse_signature(source)
    # The explicit instantiation line carries Metal-only attributes; the driver instantiates.
    body = re.sub(r"^template \[\[host_name.*$", "", source, flags=re.MULTILINE)
    unit = '#include "msl_emulate.h"\n' + checked_source(body) + _driver(sig)
    header = (metal_dir() / "msl_emulate.h").read_text()
    key = hashlib.sha256((unit + header + cxx).encode()).hexdigest()[:24]
    lib = _cache_dir() / f"k_{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:  # (renamed into place whole)
            src = Path(tmp) / "kernel.cpp"
            src.write_text(unit)
            tmp_lib = Path(tmp) / "kernel.so"
            pch = _precompiled_header(cxx, header)
            cmd = [
                cxx, *_EMULATOR_FLAGS, "-shared", *(["-I", str(pch)] if pch else []),
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
    (0xFF bytes), so an element the kernel forgets to write shows up; an access outside a buffer
    or array raises ToolchainError naming the kernel, the buffer, the index and the thread.
    """
    source = generated_metal_source(kernel, launch)
    sig = parse_signature(source)
    lib = build_emulator(source)
    inputs = [_as_mx(x) for x in launch.inputs]
    buffers = []  # NumPy arrays in binding order; the kernel sees each one's exact extent
    for name, x in zip(kernel.input_names, inputs):
        a = mx.array(x) if not isinstance(x, mx.array) else x
        buffers.append(np.ascontiguousarray(_to_numpy(a)))
        for suffix, values, dtype in (
            ("_shape", a.shape, np.int32), ("_strides", _strides(a.shape), np.int64), ("_ndim", [a.ndim], np.int32),
        ):
            if any(p[1] == f"{name}{suffix}" for p in sig.params):  # MLX added the buffer
                buffers.append(np.array(values if values else [0], dtype=dtype))
    outputs = []
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
        if launch.init_value is None:
            raw = np.full(int(np.prod(shape, dtype=np.int64)) * dtype.size, 0xFF, dtype=np.uint8)
        else:
            raw = np.array(mx.full(shape, launch.init_value, dtype=dtype).view(mx.uint8)).reshape(-1).copy()
        outputs.append(raw)
    buffers += outputs
    bufs = (ctypes.c_void_p * len(buffers))(*(a.ctypes.data for a in buffers))
    sizes = (ctypes.c_long * len(buffers))(*(a.nbytes for a in buffers))
    grid = (ctypes.c_int * 3)(*launch.grid)
    tg = (ctypes.c_int * 3)(*launch.threadgroup)
    err = ctypes.create_string_buffer(1024)
    rc = lib.gptoss_emulate(bufs, sizes, grid, tg, ctypes.c_int(order == "reverse"), err, ctypes.c_int(1024))
    if rc != 0:
        raise ToolchainError(f"kernel {kernel.name!r} failed in the emulator: {err.value.decode()}")
    return [mx.array(raw).view(dtype).reshape(shape)
            for raw, shape, dtype in zip(outputs, launch.output_shapes, launch.output_dtypes)]


def _strides(shape) -> list[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return list(reversed(strides))


# ---- the CUDA mirror's resources (nvcc, where installed) -------------------------------------

def cuda_mirror_source(kernel: Kernel, launch: Launch) -> str:
    """The CUDA source mx.fast.cuda_kernel compiles for this launch (launch.Kernel.cuda's body and
    header in a signature like MLX's), with CUDA's own headers in place of MLX's device headers."""
    from ..kernels import launch as kl

    header, body = kernel.source or kl.kernel_source(kernel.name)
    params, preamble = [], []
    for name, x in zip(kernel.input_names, launch.inputs):
        scalar = kl._scalar_dtype(x)
        if scalar is None:
            params.append(f"const {kl._CUDA_TYPES[x.dtype]}* {name}")
        elif name in kernel.constants:
            preamble += [f"constexpr {'bool' if scalar == mx.bool_ else 'int'} {arg} = {int(value)};"
                         for arg, value in kl.constant_template(name, x, scalar)]
            preamble.append(kl.cuda_constant(name, scalar))
        else:
            params.append(f"const {kl._CUDA_TYPES[scalar]}* {name}__ptr")
            preamble.append(f"const {kl._CUDA_TYPES[scalar]} {name} = *{name}__ptr;")
    params += [f"{kl._CUDA_TYPES[d]}* {n}" for n, d in zip(kernel.output_names, launch.output_dtypes)]
    preamble += [decl for attr, decl in kl._CUDA_ATTRIBUTES.items() if attr in body]
    template = [f"using {n} = {kl._CUDA_TYPES[v]};" if isinstance(v, mx.Dtype)
                else f"constexpr {'bool' if isinstance(v, bool) else 'int'} {n} = {int(v)};"
                for n, v in launch.template]
    # nvcc (unlike NVRTC) spells __device__ with the word `device`, which msl_cuda.h defines away.
    msl_cuda = kl.read_metal_file("msl_cuda.h").replace(
        "#define device\n", "#define device\n#undef __device__\n#define __device__ __attribute__((__device__))\n")
    return ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cooperative_groups.h>\n#include <cstdint>\n"
            "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n" + msl_cuda + "\n" + header
            + f"__global__ void kernel({', '.join(params)}) {{\n" + "\n".join(template + preamble) + "\n" + body
            + "}\n}  // namespace mlx::core::cu\n")


def cuda_registers(kernel: Kernel, launch: Launch, nvcc: str, arch: str = "sm_90a") -> tuple[int, int]:
    """(registers per thread, bytes spilled) of the CUDA mirror, from ptxas. MLX declares no launch
    bounds, so a threadgroup whose threads need more than 65536 registers in all fails to launch."""
    registers, spilled, _ = cuda_cubin(kernel, launch, nvcc, arch)
    return registers, spilled


def cuda_cubin(kernel: Kernel, launch: Launch, nvcc: str, arch: str = "sm_90a") -> tuple[int, int, bytes]:
    """The CUDA mirror compiled by nvcc for ``arch``: (registers per thread, bytes spilled, the
    cubin; nvdisasm shows its SASS)."""
    source = cuda_mirror_source(kernel, launch)
    # cached by content (launches of other shapes often make the same source: 15 of the tests' 28)
    tool = os.path.realpath(nvcc)
    key = hashlib.sha256("\0".join((source, (metal_dir() / "msl_cuda.h").read_text(), arch, tool,
                                     str(os.stat(tool).st_mtime_ns))).encode()).hexdigest()[:24]
    cached, log = _cache_dir() / f"cu_{key}.cubin", _cache_dir() / f"cu_{key}.log"
    if not (cached.exists() and log.exists()):
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:  # (renamed into place whole)
            src, cubin = Path(tmp) / "kernel.cu", Path(tmp) / "k.cubin"
            src.write_text(source)
            out = subprocess.run([nvcc, f"-arch={arch}", "-O3", "-cubin", "-Xptxas", "-v", "-o", str(cubin),
                                  str(src)], capture_output=True, text=True, timeout=300)
            if out.returncode:
                raise ToolchainError(f"nvcc failed on kernel {kernel.name!r}:\n{out.stderr[-3000:]}")
            (Path(tmp) / "k.log").write_text(out.stderr)
            shutil.move(str(cubin), cached)  # the cubin first: a log is there only beside one
            shutil.move(str(Path(tmp) / "k.log"), log)
    stderr = log.read_text()
    registers = re.search(r"Used (\d+) registers", stderr)
    spilled = re.search(r"(\d+) bytes spill stores", stderr)
    return int(registers.group(1)), int(spilled.group(1)) if spilled else 0, cached.read_bytes()
