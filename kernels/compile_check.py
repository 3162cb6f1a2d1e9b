"""Ahead-of-time build of every kernel config for sm_80 and sm_90, without a GPU.

`python -m fastfoof.kernels.compile_check [--json]` compiles each spec of each module in
KERNEL_MODULES (its `compile_specs()`, see the helpers' contract) with `triton.compile` for a
`GPUTarget("cuda", cc, 32)` (with the spec's optional
"options", e.g. `enable_fp_fusion`, as the launcher passes them), then reads the cubin with the `cuobjdump` shipped in Triton's wheel:
registers, spilled (local/stack) bytes, shared memory, and whether the SASS holds tensor-core
instructions. It exits non-zero if a build fails, spills, needs more shared memory than the arch
has, or lacks the MMA instructions its spec expects. Works on Triton 3.1 through 3.9.
"""
from __future__ import annotations

import os

# The interpreter replaces @triton.jit functions by Python ones, which cannot be compiled: make sure
# the kernel modules imported below get real JIT functions.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

KERNEL_MODULES = ("fastfoof.kernels.patch_gram", "fastfoof.kernels.damped_inverse", "fastfoof.kernels.update",
                  "fastfoof.kernels.fold_statistics")
ARCHS = (80, 90)
# Largest dynamic shared memory one block may opt into (CUDA programming guide, per compute capability).
SHARED_LIMIT = {80: 166912, 90: 232448}
# Tensor-core instruction families in SASS: HMMA (fp16/bf16/tf32), HGMMA (Hopper wgmma), IMMA (int8).
MMA_OPCODE = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|QGMMA|BMMA|DMMA)\b")
RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def collect_specs() -> list[dict]:
    specs = []
    for name in KERNEL_MODULES:
        specs.extend(importlib.import_module(name).compile_specs())
    return specs


def ast_source(spec: dict):
    """The spec as Triton's ASTSource: 3.3+ takes the full signature with "constexpr" entries plus
    `constexprs`; 3.1/3.2 take only the run-time arguments plus `constants` by name."""
    params = inspect.signature(triton.compiler.ASTSource.__init__).parameters
    if "constexprs" in params:
        return triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
    signature = {name: ty for name, ty in spec["signature"].items() if ty != "constexpr"}
    return triton.compiler.ASTSource(fn=spec["fn"], signature=signature, constants=spec["constexprs"])


def tool(name: str) -> str:
    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = shipped if os.path.exists(shipped) else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not in Triton's wheel nor on PATH")
    return found


def metadata_shared(kernel) -> int:
    metadata = kernel.metadata
    return int(metadata["shared"] if isinstance(metadata, dict) else metadata.shared)


def check(index: int, arch: int) -> dict:
    """Compile spec `index` for `arch` and read its resource usage from the cubin."""
    spec = SPECS[index]
    row = {"kernel": spec["kernel"], "config": spec["config"], "arch": f"sm_{arch}", "ok": False,
           "regs": None, "spills": None, "shared_bytes": None, "mma": None}
    try:
        kernel = triton.compile(ast_source(spec), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                         **spec.get("options", {})})
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                                   check=True).stdout
            sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                                  check=True).stdout
    except Exception as error:  # a build failure is a result to report, not a crash
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        return row
    match = RESOURCE_LINE.search(usage)
    if match is None:
        row["error"] = f"no resource line in cuobjdump output: {usage.strip()[:200]}"
        return row
    regs, stack, static_shared, local = map(int, match.groups())
    row.update(regs=regs, spills=stack + local, shared_bytes=static_shared + metadata_shared(kernel),
               mma=bool(MMA_OPCODE.search(sass)))
    problems = []
    if row["spills"]:
        problems.append(f"spills {row['spills']} bytes")
    if row["shared_bytes"] > SHARED_LIMIT[arch]:
        problems.append(f"shared memory {row['shared_bytes']} > {SHARED_LIMIT[arch]}")
    if spec["mma"] and not row["mma"]:
        problems.append("expected tensor-core instructions, found none")
    if problems:
        row["error"] = "; ".join(problems)
    row["ok"] = not problems
    return row


SPECS: list[dict] = []


def run_all(workers: int | None = None) -> list[dict]:
    """Every (spec, arch), compiled in parallel worker processes (forked: they share SPECS)."""
    SPECS[:] = collect_specs()
    jobs = [(i, arch) for i in range(len(SPECS)) for arch in ARCHS]
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(check, *zip(*jobs)))


def table(rows: list[dict]) -> str:
    header = ("kernel", "config", "arch", "ok", "regs", "spills", "shared_bytes", "mma")
    cells = [header] + [tuple("-" if row[k] is None else str(row[k]) for k in header) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    lines += [f"FAILED {row['kernel']} {row['config']} {row['arch']}: {row['error']}" for row in rows if not row["ok"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastfoof.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list of results instead of a table")
    args = parser.parse_args(argv)
    rows = run_all()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"triton {triton.__version__}")
        print(table(rows))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
