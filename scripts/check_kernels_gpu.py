#!/usr/bin/env python3
"""Run every custom kernel on the GPU against its plain-MLX reference (step 4 of the toolchain).

    python scripts/check_kernels_gpu.py [--kernels NAME,...] [--iters 200] [--json OUT]
    python scripts/check_kernels_gpu.py --sanitize [--tools memcheck,racecheck,initcheck] [--jobs 4]

On the GPU machine (CUDA) this runs the CUDA mirror of each Metal kernel (metal/msl_cuda.h);
on a Mac it runs the Metal kernel itself. For every kernel, activation dtype and sample input
(edge shapes included) it prints the max relative error against the reference and the time per
call of kernel and reference (``--iters 0``: no timing), then the run-time check's verdict
(what GPTOSS_MLX_KERNELS=check would decide). Exits 1 if any kernel is outside its tolerance or
fails to build.

``--sanitize`` (CUDA only) runs the same check once per kernel under each compute-sanitizer tool,
in a process of its own that instruments only that kernel, and prints per kernel the errors
(memcheck: out-of-bounds and misaligned accesses; initcheck: reads of uninitialised global
memory) and the shared-memory hazards (racecheck) found over all its dtypes and samples. Each
tool is first held to a probe kernel with a planted fault of its kind: a tool that misses it
checks nothing here, and its clean results are reported as meaningless. Exits 1 on any finding.
On the GPU machine (metal/README.md; ../shared/README.md for .device):

    source .device/setup.sh && python3 scripts/check_kernels_gpu.py --sanitize --jobs 12
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("memcheck", "racecheck", "initcheck")
PROBE = "sanitizer_probe"

# One planted fault per tool, in a kernel body for the CUDA mirror (x: float[N], out: float[N]).
PROBES = {
    # A read 1 GiB past the end of x: outside any allocation.
    "memcheck": "out[i] = x[i + (1u << 28)];",
    # Threads read the slot another simdgroup writes, with no barrier between.
    "racecheck": "threadgroup float s[64];\ns[t] = x[i];\nout[i] = s[(t + 32) % 64];",
    # out is read before anything wrote it (a fresh allocation: no init_value).
    "initcheck": "out[i] = out[i] + x[i];",
}
PROBE_SIZE = 4160  # floats: a size nothing else here allocates, so the buffer is a fresh one


def time_call(fn, iters: int) -> float:
    """Microseconds per call: ``iters`` calls built into one graph and evaluated together, as a
    decode step does (graph building included, one synchronisation for all of them)."""
    import mlx.core as mx

    mx.eval([fn() for _ in range(3)])
    t0 = time.perf_counter()
    mx.eval([fn() for _ in range(iters)])
    return (time.perf_counter() - t0) / iters * 1e6


# ---- compute-sanitizer ------------------------------------------------------------------------

@dataclass
class SanitizerReport:
    """What one compute-sanitizer run printed: the count in its summary line (None when the
    summary is missing: the run did not finish) and the distinct findings."""

    count: int | None
    findings: list[str] = field(default_factory=list)


_SUMMARY = {
    "racecheck": re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed"),
    "memcheck": re.compile(r"ERROR SUMMARY: (\d+) errors?"),
    "initcheck": re.compile(r"ERROR SUMMARY: (\d+) errors?"),
}
_PREFIX = "========="
# Headlines that frame a report rather than state a finding.
_FRAMING = re.compile(r"(COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|"
                      r"Target application returned an error)")


def parse_sanitizer_log(text: str, tool: str) -> SanitizerReport:
    """Parse compute-sanitizer's output. Every line of it starts with "=========": a finding is
    a headline ("Invalid __global__ read of size 4 bytes", "Error: Race reported between Write
    access at k+0x1f0") with its first detail line when that says where ("at k+0x70 in ...",
    "and Read access at k+0x1d0"); the same finding from many threads is listed once."""
    counts = [int(c) for c in _SUMMARY[tool].findall(text)]
    lines = [line[len(_PREFIX):] for line in text.splitlines() if line.startswith(_PREFIX)]
    findings = []
    for i, line in enumerate(lines):
        if not re.match(r" \S", line) or _FRAMING.match(line.strip()):
            continue  # details are indented further; framing is no finding
        detail = lines[i + 1].strip() if i + 1 < len(lines) else ""
        findings.append(f"{line.strip()} {detail}" if detail.startswith(("at ", "and ")) else line.strip())
    return SanitizerReport(sum(counts) if counts else None, list(dict.fromkeys(findings)))


def find_sanitizer(path: str | None) -> str | None:
    for cand in (path, shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


# Measured on the H200 (compute-sanitizer 2025.3.1): racecheck's default "analysis" report shows
# no hazard for a plain cross-warp read-after-write race on shared memory; "all" reports it.
# initcheck counts memory as written only by instrumented kernels, and MLX's own kernels write
# every input: with only ours instrumented each input read is "uninitialized" (11,889 reports for
# add_rms_norm), with all instrumented none is; host-side copies of padding are not the kernels'.
TOOL_OPTIONS = {"racecheck": ["--racecheck-report", "all"], "initcheck": ["--check-api-memory-access", "no"]}


def sanitizer_command(sanitizer: str, tool: str, kernel: str, log: str, child: list[str]) -> list[str]:
    """compute-sanitizer running ``child`` (this script). memcheck and racecheck instrument only
    MLX's build of ``kernel``: mx.fast.cuda_kernel names it mlx::core::cu::custom_kernel_<name>
    <template values>, so ``custom_kernel_<name>`` is a substring of the mangled name; initcheck
    instruments every kernel (see TOOL_OPTIONS). A device error ends only that launch (the other
    samples are still checked); API errors are left out: a kernel's failure shows in the child's
    exit code."""
    only = [] if tool == "initcheck" else ["--kernel-name", f"kns=custom_kernel_{kernel}"]
    return [
        sanitizer, "--tool", tool, *only, *TOOL_OPTIONS.get(tool, []),
        "--destroy-on-device-error", "kernel", "--report-api-errors", "no", "--print-limit", "100",
        "--log-file", log, sys.executable, str(Path(__file__).resolve()), *child,
    ]


@dataclass
class SanitizedRun:
    kernel: str
    tool: str
    report: SanitizerReport
    returncode: int
    samples: int  # launches checked: every dtype x sample (the probe: 1)
    output: str  # the child's own output (errors against the reference, tracebacks)


def run_sanitized(sanitizer: str, tool: str, kernel: str, timeout: float) -> SanitizedRun:
    with tempfile.TemporaryDirectory() as tmp:
        log, rows = os.path.join(tmp, "sanitizer.log"), os.path.join(tmp, "rows.json")
        child = ["--probe", tool] if kernel == PROBE else ["--kernels", kernel, "--iters", "0", "--json", rows]
        cmd = sanitizer_command(sanitizer, tool, kernel, log, child)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            returncode, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            returncode, output = -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
        text = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
        if kernel == PROBE:
            samples = 1
        else:
            samples = len(json.loads(Path(rows).read_text())) if os.path.exists(rows) else 0
    return SanitizedRun(kernel, tool, parse_sanitizer_log(text, tool), returncode, samples, output)


def verdict(run: SanitizedRun) -> str:
    """One cell of the summary table."""
    unit = "hazard" if run.tool == "racecheck" else "error"
    if run.report.count is None:
        return "NO SUMMARY"
    found = f"{run.report.count} {unit}{'' if run.report.count == 1 else 's'}"
    if run.kernel == PROBE:
        return found + (" (caught)" if run.report.count else " (MISSED)")
    return found + ("" if run.returncode == 0 else " +FAILED")


def failed(run: SanitizedRun) -> bool:
    if run.kernel == PROBE:  # the planted fault must be reported; the probe's own exit is moot
        return not run.report.count
    return run.report.count != 0 or run.returncode != 0


def sanitize(names: list[str], tools: list[str], sanitizer: str, jobs: int, timeout: float) -> int:
    version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"{sanitizer}: {version[-1] if version else '?'}; tools: {', '.join(tools)}; "
          f"{jobs} runs at a time")
    work = [(tool, kernel) for tool in tools for kernel in [PROBE, *names]]
    with ThreadPoolExecutor(jobs) as pool:  # subprocesses only: no MLX work on these threads
        runs = list(pool.map(lambda tk: run_sanitized(sanitizer, tk[0], tk[1], timeout), work))
    by = {(r.tool, r.kernel): r for r in runs}
    print(f"\n{'kernel':<26} {'launches':>8}  " + "  ".join(f"{t:<20}" for t in tools))
    for kernel in [PROBE, *names]:
        samples = max(by[(t, kernel)].samples for t in tools)
        label = f"{kernel} (planted)" if kernel == PROBE else kernel
        print(f"{label:<26} {samples:>8}  " + "  ".join(f"{verdict(by[(t, kernel)]):<20}" for t in tools))
    bad = [r for r in runs if failed(r)]
    for r in bad:
        print(f"\n--- {r.kernel} under {r.tool}: {verdict(r)}")
        for finding in r.report.findings[:10]:
            print(f"  {finding}")
        if r.kernel == PROBE:
            print(f"  the planted fault was not reported: {r.tool}'s results here check nothing")
        if r.returncode != 0 or r.report.count is None:
            print("  " + "\n  ".join(r.output.strip().splitlines()[-15:]))
    print(f"\n{len(runs) - len(bad)} of {len(runs)} runs clean" + ("" if bad else " (every planted fault caught)"))
    return 1 if bad else 0


def run_probe(tool: str) -> int:
    """The child of a probe run: the tool's planted fault, launched once through the CUDA mirror."""
    import mlx.core as mx

    from gptoss_mlx.kernels.launch import Kernel, Launch

    body = "uint i = thread_position_in_grid.x;\nuint t = thread_index_in_threadgroup;\n" + PROBES[tool]
    kernel = Kernel(PROBE, ["x"], ["out"], ("", body))
    x = mx.arange(PROBE_SIZE, dtype=mx.float32)
    try:
        mx.eval(kernel(Launch([x], [(PROBE_SIZE,)], [mx.float32], (PROBE_SIZE, 1, 1), (64, 1, 1))))
    except Exception as e:  # memcheck stops the kernel: MLX may report that, which is expected
        print(f"probe: {e}")
    return 0


# ---- the reference check ------------------------------------------------------------------------

def check(names: list[str], iters: int, json_path: str | None) -> int:
    import mlx.core as mx

    from gptoss_mlx.kernels import registry
    from gptoss_mlx.testing.samples import samples

    print(f"backend: {gpu_backend_name()}, MLX {mx.__version__}, device: {mx.default_device()}")
    print(f"{'kernel':<16} {'dtype':<9} {'sample':<36} {'max err':>9} {'tol':>7} {'kernel µs':>10} {'ref µs':>9}")
    rows, failed_any = [], False
    for name in names:
        spec = registry.REGISTRY[name]
        for dtype in spec.dtypes:
            for sample in samples(name, dtype):
                shapes = " ".join(
                    "x".join(map(str, a.shape)) if isinstance(a, mx.array) and a.ndim else "s"
                    for a in sample
                )
                try:
                    got = spec.launch(*sample)
                    mx.eval(got)
                    err = registry.max_error(got, spec.expected(*sample))
                    t_kernel = time_call(lambda: spec.launch(*sample), iters) if iters else float("nan")
                    t_ref = time_call(lambda: spec.reference(*sample), iters) if iters else float("nan")
                except Exception as e:  # report and go on with the other kernels
                    print(f"{name:<16} {str(dtype).split('.')[-1]:<9} {shapes:<36} FAILED: {e}")
                    rows.append({"kernel": name, "dtype": str(dtype), "sample": shapes, "error": str(e)})
                    failed_any = True
                    continue
                ok = err <= registry.tolerance(dtype)
                failed_any |= not ok
                print(f"{name:<16} {str(dtype).split('.')[-1]:<9} {shapes:<36} {err:>9.2e} {registry.tolerance(dtype):>7.0e} "
                      f"{t_kernel:>10.1f} {t_ref:>9.1f}{'' if ok else '  <-- OUTSIDE TOLERANCE'}")
                rows.append({"kernel": name, "dtype": str(dtype), "sample": shapes, "max_error": err,
                             "tolerance": registry.tolerance(dtype), "kernel_us": t_kernel, "reference_us": t_ref})
    if iters:
        print("\nrun-time check (GPTOSS_MLX_KERNELS=check):")
        registry.reset()
        for dtype in (mx.bfloat16, mx.float16, mx.float32):
            for name, state, _ in registry.status(dtype):
                if name in names:
                    print(f"  {name:<16} {str(dtype).split('.')[-1]:<9} {state}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return 1 if failed_any else 0


def gpu_backend_name() -> str | None:
    from gptoss_mlx.kernels.launch import gpu_backend

    return gpu_backend()


def _names(value: str | None) -> list[str]:
    from gptoss_mlx.kernels import registry

    names = value.split(",") if value else list(registry.REGISTRY)
    unknown = [n for n in names if n not in registry.REGISTRY]
    if unknown:
        raise SystemExit(f"unknown kernel {', '.join(unknown)}; the kernels are: {', '.join(registry.REGISTRY)}")
    return names


def _tools(value: str) -> list[str]:
    tools = value.split(",")
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tool {', '.join(unknown)} (choose from {', '.join(TOOLS)})")
    return tools


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", help="comma-separated kernel names (default: all)")
    parser.add_argument("--iters", type=int, default=200, help="timed calls per sample (0: no timing)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--sanitize", action="store_true", help="run every kernel under compute-sanitizer")
    parser.add_argument("--tools", type=_tools, default=list(TOOLS), help="with --sanitize: which tools")
    parser.add_argument("--jobs", type=int, default=4, help="with --sanitize: runs at a time")
    parser.add_argument("--timeout", type=float, default=480, help="with --sanitize: seconds per run")
    parser.add_argument("--compute-sanitizer", help="its path (default: on PATH or in /usr/local/cuda/bin)")
    parser.add_argument("--probe", choices=TOOLS, help=argparse.SUPPRESS)  # a --sanitize child
    args = parser.parse_args(argv)
    if args.iters < 0 or args.jobs < 1:
        parser.error("--iters must be >= 0 and --jobs >= 1")
    names = _names(args.kernels)

    if args.sanitize:
        sanitizer = find_sanitizer(args.compute_sanitizer)
        if sanitizer is None:
            print("compute-sanitizer not found (CUDA's bin/; or pass --compute-sanitizer PATH)", file=sys.stderr)
            return 2
        return sanitize(names, args.tools, sanitizer, args.jobs, args.timeout)
    if gpu_backend_name() is None:
        print("no GPU backend: run this on the GPU machine or a Mac", file=sys.stderr)
        return 2
    if args.probe:
        return run_probe(args.probe)
    return check(names, args.iters, args.json)


if __name__ == "__main__":
    sys.exit(main())
