"""Damped inversion of a whole network's preconditioners: the batched pipeline's methods vs per-layer loops.

Size sets are (groups, D) per preconditioned layer (no conv biases, as with BatchNorm; a biased
classifier): ResNet-18, ResNet-50 (ImageNet) and MobileNet-v1 (depthwise 3×3: D = 9, one matrix per
channel). On CPU the sets drop the layers with D > CPU_MAX_DIM so the suite finishes in minutes
(recorded in extra_info["reduced"]); FASTFOOF_BENCH_SMOKE=1 keeps the first 6 layers, at most 4
groups and D ≤ 32 each.

Rows "cholesky", "blocked", "blocked_tf32x3" and "newton_schulz" are `fastfoof.linalg`'s inverse
methods through the dispatch (the Triton backend on CUDA, the reference on CPU); "batched_reference"
forces the reference backend. Newton–Schulz starts from 0.7·P (residual 0.3·I, about the steady state
of FOOF's rounds measured on digits); extra_info["newton_schulz_served"] counts the matrices its
result served (the others took Cholesky, timed too). test_blocked_leaf sweeps the recursion's leaf
size on CUDA.
"""
import os

import pytest
import torch

from fastfoof import linalg, ops

SMOKE = os.environ.get("FASTFOOF_BENCH_SMOKE") == "1"
CPU_MAX_DIM = 2304  # the 4608-sized 3×3 convs take seconds each on a 2-core CPU
SMOKE_MAX_DIM = 32
DAMPING = 1e-3


def resnet(blocks: list[int], bottleneck: bool) -> list[tuple[int, int]]:
    layers = [(1, 3 * 49)]
    channels = 64
    for stage, count in enumerate(blocks):
        width = 64 << stage
        out = width * 4 if bottleneck else width
        for block in range(count):
            if bottleneck:
                layers += [(1, channels), (1, width * 9), (1, width)]
            else:
                layers += [(1, channels * 9), (1, width * 9)]
            if block == 0 and channels != out:
                layers.append((1, channels))  # 1×1 downsample
            channels = out
    return layers + [(1, channels + 1)]


def mobilenet() -> list[tuple[int, int]]:
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024]
    layers = [(1, 27)]
    for c_in, c_out in zip(widths, widths[1:] + [1024]):
        layers += [(c_in, 9), (1, c_in)]
    return layers + [(1, 1025)]


SIZE_SETS = {"resnet18": resnet([2, 2, 2, 2], False), "resnet50": resnet([3, 4, 6, 3], True),
             "mobilenet": mobilenet()}


def make_mats(sizes: list[tuple[int, int]], device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mats = []
    for groups, dim in sizes:
        a = torch.randn(groups, dim, dim + 8, generator=gen)
        mats.append((a @ a.mT / (dim + 8)).to(device))
    return mats


def inv_loop(mats):
    return [torch.linalg.inv(m + DAMPING * torch.eye(m.shape[-1], device=m.device)) for m in mats]


def cholesky_inverse_loop(mats):
    out = []
    for m in mats:
        chol, _ = torch.linalg.cholesky_ex(m + DAMPING * torch.eye(m.shape[-1], device=m.device))
        out.append(torch.cholesky_inverse(chol))
    return out


def pipeline(method, backend=None):
    def run(mats, previous):
        return ops.damped_inverse_with_status(mats, DAMPING, previous=previous, backend=backend, method=method)[0]
    return run


METHODS = {
    "batched_triton": pipeline("cholesky", "triton"),
    "batched_reference": pipeline("cholesky", "reference"),
    **{method: pipeline(method) for method in linalg.INVERSE_METHODS if method != "cholesky"},
    "inv_loop": lambda mats, previous: inv_loop(mats),
    "cholesky_inverse_loop": lambda mats, previous: cholesky_inverse_loop(mats),
}


def bench_sizes(device: str, size_set: str) -> tuple[list[tuple[int, int]], str]:
    """The (groups, D) of a set on `device`, and a note on what was left out."""
    sizes = SIZE_SETS[size_set]
    if SMOKE:
        kept = [(min(g, 4), min(d, SMOKE_MAX_DIM)) for g, d in sizes[:6]]
        reduced = "smoke run"
    elif device == "cpu":
        kept = [s for s in sizes if s[1] <= CPU_MAX_DIM]
        reduced = f"dropped {len(sizes) - len(kept)} layers with D > {CPU_MAX_DIM}" if len(kept) < len(sizes) else ""
    else:
        kept, reduced = sizes, ""
    return kept, reduced


def run_benchmark(benchmark, device, size_set, fn, *, warm=False, **extra):
    kept, reduced = bench_sizes(device, size_set)
    mats = make_mats(kept, device)
    previous = None
    if warm:  # Newton–Schulz's start 0.7·P, by Cholesky (not timed)
        previous = [0.7 * p for p in ops.damped_inverse_with_status(mats, DAMPING, method="cholesky")[0]]

    def run():
        out = fn(mats, previous)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(run, rounds=3 if device == "cpu" else 10, iterations=1, warmup_rounds=1)
    assert all(torch.isfinite(p).all() for p in out)
    flops = sum(groups * dim ** 3 for groups, dim in kept)  # Cholesky D³/3 + inverse 2D³/3
    benchmark.extra_info.update(
        device=device, layers=len(kept), matrices=sum(g for g, _ in kept),
        max_dim=max(d for _, d in kept), gflop=flops / 1e9,
        reduced=reduced,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None, **extra)
    return mats, previous


def skip_unless(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("size_set", list(SIZE_SETS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_damped_inverse(benchmark, device, size_set, method):
    skip_unless(device)
    if method == "batched_triton" and device != "cuda":
        pytest.skip("CUDA is not available (the Triton kernel runs on CUDA tensors)")
    if method == "blocked_tf32x3" and device != "cuda" and not SMOKE:
        pytest.skip("CPUs have no TF32: the same arithmetic as blocked")
    mats, previous = run_benchmark(benchmark, device, size_set, METHODS[method], warm=method == "newton_schulz")
    if method == "newton_schulz":
        _, missed = linalg.newton_schulz_inverses(mats, DAMPING, [None] * len(mats), previous)
        benchmark.extra_info["newton_schulz_served"] = int(sum((~m).sum() for m in missed))


@pytest.mark.parametrize("leaf", [128, 256, 1024])
@pytest.mark.parametrize("size_set", ["resnet18", "resnet50"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_blocked_leaf(benchmark, monkeypatch, device, size_set, leaf):
    """blocked_tf32x3 with other leaf sizes than linalg.BLOCKED_LEAF_MAX (its row above)."""
    skip_unless(device)
    if device != "cuda" and not SMOKE:
        pytest.skip("CUDA only (a choice for GPUs)")
    monkeypatch.setattr(linalg, "BLOCKED_LEAF_MAX", leaf)
    run_benchmark(benchmark, device, size_set, pipeline("blocked_tf32x3"), leaf=leaf)
