"""Ahead-of-time build of every kernel config for sm_80 and sm_90, without a GPU.

`python -m fastfoof.kernels.compile_check [--json]` compiles each spec of each module in
KERNEL_MODULES (its `compile_specs()`) with `triton.compile` for a `GPUTarget("cuda", cc, 32)`, then
reads the cubin with the `cuobjdump` shipped in Triton's wheel: registers, spilled (local/stack)
bytes, shared memory, global load instructions by width, and the tensor-core instructions. It exits
non-zero if a build fails, spills, needs more shared memory than the arch has, or lacks the MMA
instructions its spec expects.

A spec is a dict: `kernel`, `config` (names for the report), `fn` (the @triton.jit function),
`args` (representative run-time arguments, by name: real CPU tensors and Python numbers of the
kind the launcher passes), `constexprs`, `num_warps`, `num_stages`, optional `options` (e.g.
`enable_fp_fusion`) and `mma` (whether tensor-core instructions are expected). The build gets
exactly the specialisation Triton's launcher derives from such arguments: `tt.divisibility` = 16
for 16-byte-aligned pointers and integers divisible by 16, integers equal to 1 as constants
(`launcher_specialization`). So the SASS read here is the code that runs for such arguments.
Works on Triton 3.3 through 3.9 (run on 3.3.1, 3.5.1 and 3.9.0: the launcher's binder and
`parse_attr` have this shape there; 3.1 and 3.2 specialise differently and are not supported).
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # The interpreter replaces @triton.jit functions (Triton's own included) by Python ones, which
    # cannot be compiled: the command line drops it before Triton is imported. A program importing
    # this module for builds must do the same; the tests use only its pure helpers in-process.
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

KERNEL_MODULES = ("fastfoof.kernels.patch_gram", "fastfoof.kernels.damped_inverse", "fastfoof.kernels.update",
                  "fastfoof.kernels.fold_statistics")
ARCHS = (80, 90)
# Largest dynamic shared memory one block may opt into (CUDA programming guide, per compute capability).
SHARED_LIMIT = {80: 166912, 90: 232448}
# Tensor-core instruction families in SASS: HMMA (fp16/bf16/tf32), HGMMA (Hopper wgmma), IMMA (int8),
# and the other warpgroup (…GMMA) and warp-level (…MMA) forms.
MMA_OPCODE = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|QGMMA|BMMA|DMMA)\b")
WGMMA_OPCODE = re.compile(r"\b[HIQ]GMMA\b")
RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# Global loads: LDG (to registers), LDGSTS (to shared memory, sm_80+), UTMALDG (TMA, sm_90). Not
# LDGDEPBAR (a barrier). The modifiers carry the width: .U8/.S8, .U16/.S16, .64, .128, none = 32 bits
# (.LTC128B is an L2 prefetch hint, not a width).
GLOBAL_LOAD = re.compile(r"\b(LDGSTS|LDG|UTMALDG)((?:\.\w+)*)(?=\s)")
LOAD_WIDTHS = {"U8": "8", "S8": "8", "U16": "16", "S16": "16", "64": "64", "128": "128"}
LOAD_KEYS = ("8", "16", "32", "64", "128", "tma")


def collect_specs() -> list[dict]:
    specs = []
    for name in KERNEL_MODULES:
        specs.extend(importlib.import_module(name).compile_specs())
    return specs


def launcher_specialization(fn, args: dict, constexprs: dict, target: GPUTarget) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the launcher of `fn` builds them for these arguments on
    `target`: Triton's own binder specialises each argument (type, alignment, value 1), and the
    backend's `parse_attr` turns that into the attributes the compiler sees."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(**args, **constexprs)
    signature, constants, attrs = {}, {}, {}
    for index, (name, (kind, value, *_)) in enumerate(zip(bound, specialization)):
        signature[name] = kind
        if kind == "constexpr":  # declared constexpr, or an integer specialised to a constant (1)
            constants[(index,)] = bound[name]
        elif isinstance(value, str):
            attrs[(index,)] = backend.parse_attr(value)
    return signature, constants, attrs


def ast_source(spec: dict, target: GPUTarget):
    signature, constants, attrs = launcher_specialization(spec["fn"], spec["args"], spec["constexprs"], target)
    return triton.compiler.ASTSource(fn=spec["fn"], signature=signature, constexprs=constants, attrs=attrs)


def global_loads(sass: str) -> dict[str, int]:
    """Global load instructions of a SASS listing by width in bits ("tma": TMA tensor loads)."""
    counts = dict.fromkeys(LOAD_KEYS, 0)
    for opcode, modifiers in GLOBAL_LOAD.findall(sass):
        if opcode == "UTMALDG":
            counts["tma"] += 1
        else:
            widths = [LOAD_WIDTHS[m] for m in modifiers.split(".") if m in LOAD_WIDTHS]
            counts[widths[0] if widths else "32"] += 1
    return counts


def mma_kind(sass: str) -> str:
    """"wgmma" (Hopper warpgroup MMA), "mma" (warp-level MMA) or "none"."""
    if WGMMA_OPCODE.search(sass):
        return "wgmma"
    return "mma" if MMA_OPCODE.search(sass) else "none"


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
    """`build` of spec `index` of SPECS (worker processes get the index, not the spec)."""
    return build(SPECS[index], arch)


def build(spec: dict, arch: int) -> dict:
    """Compile `spec` for `arch` and read its resource usage and instructions from the cubin."""
    row = {"kernel": spec["kernel"], "config": spec["config"], "arch": f"sm_{arch}", "ok": False,
           "regs": None, "spills": None, "shared_bytes": None, "mma": None, "mma_kind": None, "global_loads": None}
    target = GPUTarget("cuda", arch, 32)
    try:
        kernel = triton.compile(ast_source(spec, target), target=target,
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
               mma=bool(MMA_OPCODE.search(sass)), mma_kind=mma_kind(sass), global_loads=global_loads(sass))
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


def format_loads(counts: dict[str, int]) -> str:
    """"128b:6 32b:2 tma:1": the non-zero counts."""
    return " ".join(f"{key}{'' if key == 'tma' else 'b'}:{n}" for key, n in counts.items() if n) or "none"


def table(rows: list[dict]) -> str:
    header = ("kernel", "config", "arch", "ok", "regs", "spills", "shared_bytes", "mma_kind", "global_loads")
    cells = [header] + [tuple("-" if row[k] is None else format_loads(row[k]) if k == "global_loads" else str(row[k])
                              for k in header) for row in rows]
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
