"""Every kernel config compiles for sm_80 and sm_90 with no spills and the expected tensor cores.

Runs `python -m fastfoof.kernels.compile_check --json` in a subprocess (the interpreter, which the
other tests switch on, cannot compile), so CI catches kernels only the interpreter accepts.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def rows():
    done = subprocess.run([sys.executable, "-m", "fastfoof.kernels.compile_check", "--json"], env=ENV,
                          capture_output=True, text=True, timeout=900)
    rows = json.loads(done.stdout)
    assert done.returncode == (0 if all(row["ok"] for row in rows) else 1), done.stderr[-2000:]
    return rows


def test_every_config_builds_for_both_archs(rows):
    failed = [row for row in rows if not row["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    for row in rows:
        assert set(row) >= {"kernel", "config", "arch", "ok", "regs", "spills", "shared_bytes", "mma"}
        assert row["spills"] == 0 and 0 < row["regs"] <= 255


def test_patch_gram_configs_use_tensor_cores(rows):
    from fastfoof.kernels import patch_gram

    partial = [row for row in rows if row["kernel"].startswith("patch_gram_partial")]
    expected = {(str(config), arch) for config in patch_gram.CONFIGS for arch in ("sm_80", "sm_90")}
    assert {(row["config"], row["arch"]) for row in partial} == expected
    assert all(row["mma"] for row in partial)


PROBE = textwrap.dedent('''
    import json
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

    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
    compile_check.SPECS[:] = [
        dict(kernel="copy", config="plain", fn=copy, signature=signature, constexprs={"BLOCK": 128},
             num_warps=4, num_stages=1, mma=False),
        dict(kernel="copy", config="claims mma", fn=copy, signature=signature, constexprs={"BLOCK": 128},
             num_warps=4, num_stages=1, mma=True),
        dict(kernel="odd_range", config="BLOCK=24", fn=odd_range, signature=signature, constexprs={"BLOCK": 24},
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
    assert not claims_mma["ok"] and "tensor-core" in claims_mma["error"]
    assert not no_build["ok"] and no_build["regs"] is None and no_build["error"]
