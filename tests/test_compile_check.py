"""Every kernel config compiles for sm_80 and sm_90 with no spills and the expected tensor cores, with
the specialisation Triton's launcher gives real arguments, and the SASS has the load widths we need.

Runs `python -m fastfoof.kernels.compile_check --json` in a subprocess (the interpreter, which the
other tests switch on, cannot compile), so CI catches kernels only the interpreter accepts. Those tests
(marked `aot`, minutes) run apart: `python -m pytest -m aot`; the default run checks the helpers and specs.
`kernel_rows` and `wide_load_share` are the helpers for regression tests on a kernel's builds.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastfoof.kernels import compile_check

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def rows():
    """Every build's row, from one run of the compile check (minutes: the tests that take it are marked `aot`,
    which the default run leaves out and .ci/run runs as its own step)."""
    done = subprocess.run([sys.executable, "-m", "fastfoof.kernels.compile_check", "--json"], env=ENV,
                          capture_output=True, text=True, timeout=900)
    rows = json.loads(done.stdout)
    assert done.returncode == (0 if all(row["ok"] for row in rows) else 1), done.stderr[-2000:]
    return rows


def kernel_rows(rows, kernel, arch="sm_90", config=""):
    """The build rows of one kernel (exact name) on one arch whose config contains `config`."""
    found = [row for row in rows if row["kernel"] == kernel and row["arch"] == arch and config in row["config"]]
    assert found, f"no build of {kernel} [{config}] for {arch}"
    return found


def wide_load_share(row, min_bits):
    """Fraction of a build's global load instructions that are at least `min_bits` wide (TMA counts)."""
    loads = row["global_loads"]
    wide = loads["tma"] + sum(n for width, n in loads.items() if width != "tma" and int(width) >= min_bits)
    return wide / max(1, sum(loads.values()))


@pytest.mark.aot
def test_every_config_builds_for_both_archs(rows):
    failed = [row for row in rows if not row["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    for row in rows:
        assert set(row) >= {"kernel", "config", "arch", "ok", "regs", "spills", "shared_bytes", "mma", "mma_kind",
                            "global_loads"}
        assert row["spills"] == 0 and 0 < row["regs"] <= 255
        assert set(row["global_loads"]) == {"8", "16", "32", "64", "128", "tma"}
        assert sum(row["global_loads"].values()) > 0  # every kernel reads global memory
        assert row["mma_kind"] in ({"wgmma", "mma"} if row["mma"] else {"none"})


@pytest.mark.aot
def test_patch_gram_configs_use_tensor_cores(rows):
    from fastfoof.kernels import patch_gram

    partial = [row for row in rows if row["kernel"].startswith("patch_gram_partial[")]
    expected = {(str(config), arch) for config in patch_gram.CONFIGS for arch in ("sm_80", "sm_90")}
    assert {(row["config"], row["arch"]) for row in partial} == expected
    assert all(row["mma"] for row in partial)


@pytest.mark.aot
def test_update_builds_keep_wide_loads_and_wgmma_on_sm90(rows):
    """The vector variant sm_90 runs (tf32 dots): over half its global loads are 128-bit, wgmma."""
    from fastfoof.kernels import update

    for dtype in ("fp32", "bf16"):
        row, = kernel_rows(rows, "grouped_update_kernel", config=f"{dtype},{update.HOPPER_CONFIG},vector,")
        assert wide_load_share(row, 128) > 0.5, row
    for row in kernel_rows(rows, "grouped_update_kernel"):
        if "ieee" not in row["config"] and "BLOCK_M=64,BLOCK_N=64" in row["config"]:
            assert row["mma_kind"] == "wgmma", row


@pytest.mark.aot
def test_low_rank_update_builds_keep_tensor_cores_and_wide_loads(rows):
    """Both passes of the low-rank update: wgmma on sm_90 for the tf32 configs, and the vector variant
    that sm_90 runs loads wide: over half the second pass's loads 128-bit, over half the first's at
    least 64-bit (its Q tiles are N-major, which tf32 wgmma transposes through shared memory)."""
    from fastfoof.kernels import update

    for kernel, bits in (("low_rank_update_kernel", 128), ("low_rank_project_kernel", 64)):
        for dtype in ("fp32", "bf16"):
            row, = kernel_rows(rows, kernel, config=f"{dtype},{update.HOPPER_CONFIG},vector,")
            assert wide_load_share(row, bits) > 0.5, row
        for row in kernel_rows(rows, kernel):
            assert row["mma_kind"] == ("none" if ",ieee," in row["config"] else "wgmma"), row


@pytest.mark.aot
def test_graft_builds_keep_tensor_cores_and_wide_loads(rows):
    """Grafting's first pass (the GEMM kernels with GRAFT on) keeps wgmma on sm_90 for the tf32 configs,
    and the vector variant sm_90 runs loads at least 64 bits at a time (over half its loads; without
    the epilogue's parameter and buffer reads, bf16's 128-bit share is about half). The second pass
    (U, parameters, buffers: elementwise) loads 128 bits at a time in its vector variants."""
    from fastfoof.kernels import update

    for kernel in ("grouped_update_kernel", "low_rank_update_kernel"):
        for dtype in ("fp32", "bf16"):
            row, = kernel_rows(rows, kernel, config=f"{dtype},graft,{update.HOPPER_CONFIG},vector,")
            assert wide_load_share(row, 64) > 0.5, row
        grafted = [row for row in kernel_rows(rows, kernel) if ",graft," in row["config"]]
        assert len(grafted) == 3 * len(update.CONFIGS) * 2  # dtypes × configs × variants
        for row in grafted:
            assert row["mma_kind"] == ("none" if ",ieee," in row["config"] else "wgmma"), row
    for arch in ("sm_80", "sm_90"):
        for dtype in ("fp32", "bf16"):
            for table in ("dense", "low_rank"):
                row, = kernel_rows(rows, "graft_step_kernel", arch=arch, config=f"{dtype},{table},vector,")
                assert wide_load_share(row, 128) > 0.5, row


@pytest.mark.aot
def test_fold_builds_keep_wide_loads(rows):
    for kernel in ("fold_kernel", "nonfinite_flags_kernel"):
        for arch in ("sm_80", "sm_90"):
            row, = kernel_rows(rows, kernel, arch=arch, config="fp32,vector,")
            assert wide_load_share(row, 128) > 0.5, row


# ---- the specs carry what the launcher passes ---------------------------------------------------

def jit_twin(fn):
    """The JITFunction of a kernel (this process runs kernels in the interpreter)."""
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn, **fn.kwargs)


def recorded_launches(module, names, run):
    """(kernel name, run-time args, constexprs, options) of every launch of module.<name> in run()."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name, self.fn = name, getattr(module, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                arg_names = jit_twin(self.fn).arg_names
                bound = dict(zip(arg_names, args), **{k: v for k, v in kwargs.items() if k in arg_names})
                constexprs = {p.name: bound.pop(p.name) for p in jit_twin(self.fn).params if p.is_constexpr}
                options = {k: v for k, v in kwargs.items() if k not in arg_names}
                launches.append((self.name, bound, constexprs, options))
            return launch

    saved = {name: getattr(module, name) for name in names}
    try:
        for name in names:
            setattr(module, name, Recorder(name))
        run()
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    return launches


def assert_specs_match_launches(module, launches):
    """Each launch has a spec with its constexprs, launch options and the same specialisation."""
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    specs = module.compile_specs()
    for name, args, constexprs, options in launches:
        matching = [spec for spec in specs if spec["kernel"] == name and spec["constexprs"] == constexprs]
        assert len(matching) == 1, (name, constexprs)
        spec = matching[0]
        fn = jit_twin(spec["fn"])
        assert compile_check.launcher_specialization(fn, spec["args"], spec["constexprs"], target) == \
            compile_check.launcher_specialization(fn, args, constexprs, target)
        # options as the backend resolves them (defaults for what is not passed), on both sides
        built = backend.parse_options({"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                       **spec.get("options", {})})
        run = backend.parse_options(options)
        assert (built.num_warps, built.num_stages, built.enable_fp_fusion) == \
            (run.num_warps, run.num_stages, run.enable_fp_fusion), name


def update_blocks(low_rank):
    """A Linear block with bias per dtype (fp32, bf16) and variant (vector: D = 16; scalar: D = 7), with a
    dense P padded as the inverse returns it, or a low-rank (Q, s)."""
    from fastfoof.layers import Block

    group = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
    blocks = []
    for dtype in (torch.float32, torch.bfloat16):
        for rows, dim, rank in ((8, 16, 4), (5, 7, 3)):  # vector and scalar variants
            weight, bias = torch.randn(rows, dim, dtype=dtype), torch.randn(rows, dtype=dtype)
            weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
            if low_rank:
                q = torch.linalg.qr(torch.randn(1, dim + 1, rank)).Q.contiguous()
                blocks.append(Block([weight, bias], [group, group], 1, eigvecs=q, eigvals=torch.rand(1, rank)))
            else:
                precond = torch.empty(1, dim + 1, -(-(dim + 1) // 4) * 4)[..., :dim + 1].copy_(torch.eye(dim + 1))
                blocks.append(Block([weight, bias], [group, group], 1, precond))
    return blocks


def test_update_specs_carry_the_launchers_arguments():
    from fastfoof.kernels import update

    blocks = update_blocks(low_rank=False)
    launches = recorded_launches(update, ["grouped_update_kernel"],
                                 lambda: update.preconditioned_update_(blocks, [None] * 8, damping=1.0))
    assert sorted(launch[2]["VEC"] for launch in launches) == [1, 1, 4, 8]
    assert_specs_match_launches(update, launches)


def test_low_rank_update_specs_carry_the_launchers_arguments():
    from fastfoof.kernels import update

    blocks = update_blocks(low_rank=True)
    names = ["low_rank_project_kernel", "low_rank_update_kernel"]
    launches = recorded_launches(update, names, lambda: update.preconditioned_update_(blocks, [None] * 8, damping=1.0))
    assert sorted((name, constexprs["VEC"]) for name, _, constexprs, _ in launches) == \
        sorted((name, vec) for name in names for vec in (1, 1, 4, 8))
    assert_specs_match_launches(update, launches)


def test_graft_specs_carry_the_launchers_arguments():
    """A grafted call: the GEMM kernels with GRAFT on (dense and low-rank), then graft_step_kernel over
    both kinds of table, each in both variants and dtypes."""
    from fastfoof.kernels import update

    blocks = update_blocks(low_rank=False) + update_blocks(low_rank=True)
    names = ["grouped_update_kernel", "low_rank_project_kernel", "low_rank_update_kernel", "graft_step_kernel"]
    launches = recorded_launches(update, names, lambda: update.preconditioned_update_(blocks, [None] * 16, damping=1.0,
                                                                                      graft=2.5))
    passes = sorted((name, constexprs.get("GRAFT"), constexprs.get("FIELDS"), constexprs["VEC"])
                    for name, _, constexprs, _ in launches)
    fields = {"dense": update.PROBLEM_FIELDS.value, "low_rank": update.LOW_RANK_FIELDS.value}
    assert passes == sorted([(name, graft, None, vec) for name, graft in (("grouped_update_kernel", True),
                                                                         ("low_rank_project_kernel", None),
                                                                         ("low_rank_update_kernel", True))
                             for vec in (1, 1, 4, 8)]
                            + [("graft_step_kernel", None, f, vec) for f in fields.values() for vec in (1, 1, 4, 8)])
    assert_specs_match_launches(update, launches)


def test_fold_specs_carry_the_launchers_arguments():
    from fastfoof.kernels import fold_statistics

    def run():
        for dtype in (torch.float32, torch.float64):
            emas = [torch.zeros(2, 5, 5, dtype=dtype), torch.zeros(26, dtype=dtype)[1:].view(1, 5, 5)]
            fold_statistics.fold_statistics_(emas, [torch.zeros((), dtype=dtype)] * 2,
                                             [torch.ones_like(e) for e in emas], [1.0, 1.0], 0.9)

    launches = recorded_launches(fold_statistics, ["nonfinite_flags_kernel", "fold_kernel"], run)
    assert len(launches) == 8
    assert_specs_match_launches(fold_statistics, launches)


def test_patch_gram_specs_carry_the_launchers_arguments(monkeypatch):
    """The representative inputs of patch_gram.compile_specs, launched as on a 132-SM GPU: every launch
    has a build with its constexprs, options and specialisation."""
    from torch import nn

    from fastfoof.geometry import patch_input
    from fastfoof.kernels import patch_gram

    monkeypatch.setattr(patch_gram, "INTERPRETER_SMS", 132)  # split counts as on an H100/H200
    names = ["_partial_gram_kernel", "_dense_partial_kernel", "_reduce_kernel"]
    kernels = {name: getattr(patch_gram, name) for name in names}
    conv3, conv1 = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.Conv2d(256, 256, 1, bias=False)
    cases = [(torch.empty(128, 64, 32, 32, device="meta"), conv3, "implicit"),
             (torch.empty(128, 64, 32, 32, device="meta").to(memory_format=torch.channels_last), conv3, "channels_last"),
             (torch.empty(128, 256, 32, 32, device="meta"), conv1, "dense")]

    def run():
        for x, module, path in cases:
            patches, geom = patch_input(x, module)
            out = torch.empty(1, geom.dim, geom.dim, device="meta")
            assert patch_gram.choose_path(patches, geom) == path
            patch_gram.run_patch_gram(out, patches, geom, alpha=1.0, beta=0.0, bias=False, input_precision="tf32")

    launches = recorded_launches(patch_gram, names, run)
    assert len(launches) == 6
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    for name, args, constexprs, options in launches:
        matching = [spec for spec in patch_gram.compile_specs() if spec["fn"] is kernels[name]
                    and spec["constexprs"] == constexprs
                    and compile_check.launcher_specialization(jit_twin(spec["fn"]), spec["args"], constexprs, target)
                    == compile_check.launcher_specialization(jit_twin(spec["fn"]), args, constexprs, target)]
        assert matching, (name, constexprs)
        built = backend.parse_options({"num_warps": matching[0]["num_warps"], "num_stages": matching[0]["num_stages"]})
        run_options = backend.parse_options(options)
        assert (built.num_warps, built.num_stages) == (run_options.num_warps, run_options.num_stages), name


@pytest.mark.aot
def test_patch_gram_dense_row_builds_keep_wide_loads_and_wgmma(rows):
    """sm_90: the dense and channels_last builds load at least 64 bits at a time (over half their
    global loads), and every patch-gram build with BLOCK_D ≥ 64 uses wgmma."""
    for kernel in ("patch_gram_dense", "patch_gram_tap_major"):
        for dtype in ("fp32,tf32", "bf16,ieee", "fp16,ieee"):
            for row in kernel_rows(rows, f"{kernel}[{dtype}]"):
                assert wide_load_share(row, 64) > 0.5, row
    partial = [row for row in rows if row["kernel"].startswith("patch_gram_") and "reduce" not in row["kernel"]
               and row["arch"] == "sm_90"]
    assert partial
    for row in partial:
        if int(row["config"].split(",")[0].split("=")[1]) >= 64:
            assert row["mma_kind"] == "wgmma", row


# ---- the SASS reader ---------------------------------------------------------------------------

SASS = """
        /*0110*/              @!P0 LDG.E.128 R4, desc[UR4][R8.64] ;              /* 0x0000000408048981 */
        /*0120*/                   LDG.E R9, desc[UR4][R4.64+0x4] ;              /* 0x00000404040b8981 */
        /*0130*/                   LDG.E.64.CONSTANT R2, desc[UR4][R4.64] ;      /* 0x0000000404027981 */
        /*0140*/              @!P1 LDG.E.U16 R3, desc[UR4][R6.64] ;              /* 0x0000000406039981 */
        /*0150*/                   LDG.E.S8 R3, desc[UR4][R6.64] ;               /* 0x0000000406039981 */
        /*0160*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;  /* 0x00000000 */
        /*0170*/                   LDGSTS.E.LTC128B [R1+0x4], desc[UR4][R2.64+0x4] ;     /* 0x00000000 */
        /*0180*/                   LDGDEPBAR ;                                    /* 0x00000000000079af */
        /*0190*/                   UTMALDG.2D [UR8], [UR4] ;                      /* 0x00000000 */
        /*01a0*/                   STG.E.128 desc[UR4][R2.64], R4 ;              /* 0x0000000402008986 */
        /*01b0*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], R24 ; /* 0x00000000 */
"""


def test_global_loads_reads_each_width():
    assert compile_check.global_loads(SASS) == {"8": 1, "16": 1, "32": 2, "64": 1, "128": 2, "tma": 1}
    assert compile_check.mma_kind(SASS) == "wgmma"
    assert compile_check.mma_kind(SASS.replace("HGMMA.64x64x8", "HMMA.1688")) == "mma"
    assert compile_check.mma_kind(SASS.replace("HGMMA.64x64x8.F32.TF32", "NOP")) == "none"


def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)


def probe(x_ptr, n, one, step, scale, flag, BLOCK: tl.constexpr):
    pass


def test_launcher_specialization_is_the_launchers():
    """Aligned pointers and multiples of 16 get divisibility 16, an int equal to 1 becomes a constant,
    floats, bools and do_not_specialize ints get nothing, as Triton's own launcher packs them."""
    fn = JITFunction(probe, do_not_specialize=["step"])
    x = torch.empty(64)
    args = dict(x_ptr=x, n=48, one=1, step=32, scale=0.5, flag=True)
    signature, constants, attrs = compile_check.launcher_specialization(fn, args, {"BLOCK": 128},
                                                                       GPUTarget("cuda", 90, 32))
    assert x.data_ptr() % 16 == 0
    assert signature == {"x_ptr": "*fp32", "n": "i32", "one": "constexpr", "step": "i32", "scale": "fp32",
                         "flag": "u1", "BLOCK": "constexpr"}
    assert constants == {(2,): 1, (6,): 128}
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    _, _, unaligned = compile_check.launcher_specialization(fn, dict(args, x_ptr=x[1:], n=47), {"BLOCK": 128},
                                                            GPUTarget("cuda", 90, 32))
    assert unaligned == {(0,): [], (1,): []}
    if hasattr(fn, "_pack_args"):  # Triton 3.5+: the launcher's own packing of the same binding
        backend = make_backend(GPUTarget("cuda", 90, 32))
        bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
            **args, BLOCK=128)
        _, want_signature, want_constants, want_attrs = fn._pack_args(backend, {}, bound, specialization, options)
        assert (signature, constants) == (want_signature, want_constants)
        assert {k: v for k, v in attrs.items() if v} == {k: v for k, v in want_attrs.items() if v}


def test_aligned_copy_gets_128_bit_loads_and_unaligned_32():
    """What the issue found: the same copy kernel loads 128 bits at a time only with the launcher's
    attributes for aligned arguments."""
    fn = JITFunction(copy)
    x = torch.empty(4096)
    builds = {}
    for name, args in (("aligned", dict(x_ptr=x, y_ptr=x, n=4096)), ("unaligned", dict(x_ptr=x[1:], y_ptr=x, n=4095))):
        spec = dict(kernel="copy", config=name, fn=fn, args=args, constexprs={"BLOCK": 1024}, num_warps=4,
                    num_stages=1, mma=False)
        builds[name] = compile_check.build(spec, 90)
    assert builds["aligned"]["global_loads"]["128"] > 0
    assert builds["aligned"]["global_loads"]["128"] == sum(builds["aligned"]["global_loads"].values())
    assert builds["unaligned"]["global_loads"]["32"] > 0
    assert builds["unaligned"]["global_loads"]["32"] == sum(builds["unaligned"]["global_loads"].values())


# ---- the harness ------------------------------------------------------------------------------

PROBE = textwrap.dedent('''
    import json
    import torch
    import triton
    import triton.language as tl
    from fastfoof.kernels import compile_check

    @triton.jit
    def copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i))

    @triton.jit
    def odd_range(x_ptr, y_ptr, BLOCK: tl.constexpr):  # tl.arange needs a power of 2: no build
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i))

    args = dict(x_ptr=torch.empty(512), y_ptr=torch.empty(512))
    compile_check.SPECS[:] = [
        dict(kernel="copy", config="plain", fn=copy, args=args, constexprs={"BLOCK": 512},
             num_warps=4, num_stages=1, mma=False),
        dict(kernel="copy", config="claims mma", fn=copy, args=args, constexprs={"BLOCK": 128},
             num_warps=4, num_stages=1, mma=True),
        dict(kernel="odd_range", config="BLOCK=24", fn=odd_range, args=args, constexprs={"BLOCK": 24},
             num_warps=4, num_stages=1, mma=False),
    ]
    print(json.dumps([compile_check.check(i, 80) for i in range(3)]))
''')


def test_harness_reports_failures(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = subprocess.run([sys.executable, str(probe)], env=ENV, capture_output=True, text=True, timeout=300)
    plain, claims_mma, no_build = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain["ok"] and plain["regs"] > 0 and plain["spills"] == 0 and plain["mma"] is False
    assert plain["global_loads"]["128"] > 0 and plain["mma_kind"] == "none"
    assert not claims_mma["ok"] and "tensor-core" in claims_mma["error"]
    assert not no_build["ok"] and no_build["regs"] is None and no_build["error"]
