"""What a kernel's CUDA mirror compiles to: registers, spills and its SASS instruction mix.

The CUDA mirror (`toolchain.cuda_mirror_source`: the source `mx.fast.cuda_kernel` builds for a
launch) compiled by nvcc for sm_90a at the model's size, disassembled with nvdisasm, instructions
counted by opcode and grouped by what they do. Static counts (each instruction of the unrolled
code once, not as often as it runs): for the instructions a call executes, Nsight Compute's
`smsp__inst_executed.sum` (docs/measurements.md, "where the expert kernels' time goes").

    python scripts/kernel_sass.py                                   # every model-sized kernel, 1 token
    python scripts/kernel_sass.py --kernels moe_gate_up_swiglu --tokens 4 --variant a-seq2 --top 20

Needs nvcc and nvdisasm (the CUDA toolkit; triton's wheel bundles an nvdisasm too).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from gptoss_mlx.kernels import moe, registry  # noqa: E402
from gptoss_mlx.testing import toolchain  # noqa: E402
from gptoss_mlx.testing.samples import MODEL_SHAPES  # noqa: E402

# Opcode (before its first '.') -> what it does, for the summary columns.
GROUPS = {
    "global loads": ("LDG", "LD"),
    "shared memory": ("LDS", "STS", "LDSM", "ATOMS"),
    "float math": ("FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "FSETP", "FSEL", "FCHK"),
    "half math": ("HFMA2", "HMUL2", "HADD2", "HMNMX2", "HSETP2"),
    "conversions": ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP"),
    "integer/bits": ("LOP3", "SHF", "IMAD", "IADD3", "PRMT", "LEA", "ISETP", "SEL", "BFE", "BMSK",
                     "IABS", "IMNMX", "POPC", "FLO", "SGXT", "LOP"),
    "moves": ("MOV", "S2R", "S2UR", "CS2R", "ULDC", "UMOV", "R2UR", "LDC"),
    "shuffles": ("SHFL",),
    "stores": ("STG", "ST", "RED", "ATOMG"),
    "control": ("BRA", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "CALL", "RET", "YIELD"),
}


def nvdisasm_path(given: str | None) -> str | None:
    if given:
        return given
    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    beside = Path(nvcc).resolve().parent / "nvdisasm" if nvcc else None
    return str(beside) if beside and beside.exists() else None


def opcodes(sass: str) -> Counter:
    """Opcode -> count over a disassembly (predicated instructions counted as their opcode)."""
    counts = Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", line)
        if m:
            op = m.group(1)
            # HADD2.F32: a half-to-float conversion by way of an add, not half math
            counts["HADD2.F32" if op == "HADD2" and ".F32" in m.group(2) else op] += 1
    return counts


def grouped(counts: Counter) -> dict[str, int]:
    out = {group: 0 for group in GROUPS} | {"other": 0}
    for op, n in counts.items():
        group = "conversions" if op == "HADD2.F32" else next((g for g, ops in GROUPS.items() if op in ops), "other")
        out[group] += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", default=",".join(MODEL_SHAPES), help="comma-separated, of " + ", ".join(MODEL_SHAPES))
    ap.add_argument("--tokens", type=int, default=1, choices=(1, 4))
    ap.add_argument("--experts", type=int, default=32, choices=(32, 128), help="the router's (20b: 32, 120b: 128)")
    ap.add_argument("--variant", default="base", help="expert-kernel variant (kernels/moe.py VARIANTS)")
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    ap.add_argument("--nvdisasm", default=None)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per kernel")
    args = ap.parse_args()
    nvdisasm = nvdisasm_path(args.nvdisasm)
    if not args.nvcc or not nvdisasm:
        sys.exit("needs nvcc and nvdisasm (the CUDA toolkit): pass --nvcc / --nvdisasm")
    if args.variant not in moe.VARIANTS:
        sys.exit(f"unknown variant {args.variant!r}: one of {', '.join(moe.VARIANTS)}")
    moe.VARIANT = moe.VARIANTS[args.variant]

    rows = []
    for name in args.kernels.split(","):
        if name not in MODEL_SHAPES:
            sys.exit(f"unknown kernel {name!r}: one of {', '.join(MODEL_SHAPES)}")
        shape = next(s for s in MODEL_SHAPES[name]
                     if s[0] == args.tokens and (name != "add_rms_norm_route" or s[2] == args.experts))
        spec = registry.REGISTRY[name]
        plan = spec.plan(*spec.sample(shape, mx.random.key(0), mx.bfloat16))
        registers, spilled, cubin = toolchain.cuda_cubin(spec.kernel, plan, args.nvcc, args.arch)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        counts = opcodes(sass)
        threads = plan.threadgroup[0] * plan.threadgroup[1] * plan.threadgroup[2]
        rows.append((name, shape, registers, spilled, threads, counts))

    groups = list(GROUPS) + ["other"]
    print(f"CUDA mirror, {args.arch}, bfloat16, {args.tokens} token(s), variant {args.variant}; static SASS counts\n")
    print("| kernel | shape | registers | spilled B | threads/TG | instructions | " + " | ".join(groups) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(groups))
    for name, shape, registers, spilled, threads, counts in rows:
        g = grouped(counts)
        print(f"| {name} | {shape} | {registers} | {spilled} | {threads} | {sum(counts.values())} | "
              + " | ".join(str(g[k]) for k in groups) + " |")
    for name, _, _, _, _, counts in rows:
        print(f"\n{name}: " + ", ".join(f"{op} {n}" for op, n in counts.most_common(args.top)))


if __name__ == "__main__":
    main()
