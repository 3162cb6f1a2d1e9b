"""Patch gram Σ a aᵀ of one layer input: reference (unfold + matmul) vs the implicit-im2col kernel.

Layer inputs of ResNet-18 on CIFAR-10 (batch 128), ResNet-50 on ImageNet (batch 64) and a
MobileNet depthwise 3×3 (batch 64). extra_info records the shapes, D', the SYRK floor
(groups·D'²·N multiply-adds), TFLOP/s against it (2 flops per multiply-add), the im2col bytes the
reference materialises and, on CUDA, the peak memory the call allocated.

Triton rows run where CUDA is present (the only skip). On CPU the reference runs with fewer
samples, so that each call stays under CPU_MACS multiply-adds and the suite within a minute
(extra_info["samples"] and ["reduced"] say so). FASTFOOF_BENCH_SMOKE=1 uses one sample and
spatial sizes of at most 8.
"""
import math
import os

import pytest
import torch
from torch import nn

from fastfoof import ops
from fastfoof.geometry import patch_dim, patch_input

SMOKE = os.environ.get("FASTFOOF_BENCH_SMOKE") == "1"
CUDA = torch.cuda.is_available()
CPU_MACS = 2e8
SMOKE_SIZE = 8

# name -> (layer, input shape at full batch)
LAYERS = {
    "resnet18_cifar.conv1": (lambda: nn.Conv2d(3, 64, 3, padding=1, bias=False), (128, 3, 32, 32)),
    "resnet18_cifar.layer1": (lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (128, 64, 32, 32)),
    "resnet18_cifar.layer2_down": (lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False), (128, 64, 32, 32)),
    "resnet18_cifar.layer2": (lambda: nn.Conv2d(128, 128, 3, padding=1, bias=False), (128, 128, 16, 16)),
    "resnet18_cifar.layer3": (lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (128, 256, 8, 8)),
    "resnet18_cifar.layer4": (lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (128, 512, 4, 4)),
    "resnet18_cifar.fc": (lambda: nn.Linear(512, 10), (128, 512)),
    "resnet50_imagenet.conv1": (lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), (64, 3, 224, 224)),
    "resnet50_imagenet.layer1_1x1": (lambda: nn.Conv2d(256, 64, 1, bias=False), (64, 256, 56, 56)),
    "resnet50_imagenet.layer1_3x3": (lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 64, 56, 56)),
    "resnet50_imagenet.layer4_3x3": (lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (64, 512, 7, 7)),
    "resnet50_imagenet.fc": (lambda: nn.Linear(2048, 1000), (64, 2048)),
    "mobilenet.depthwise_3x3": (lambda: nn.Conv2d(256, 256, 3, padding=1, groups=256, bias=False), (64, 256, 28, 28)),
}
ROWS = [("reference", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)]


def input_shape(module: nn.Module, full: tuple[int, ...], device: str) -> tuple[tuple[int, ...], bool]:
    """The shape to run: smoke-sized, CPU-reduced (fewer samples), or full; and whether reduced."""
    if SMOKE:
        return (1, full[1]) + tuple(min(s, SMOKE_SIZE) for s in full[2:]), True
    if device == "cuda":
        return full, False
    groups, dim = patch_dim(module)
    per_sample = groups * (dim + 1) ** 2 * math.prod(full[2:])  # upper bound on positions per sample
    samples = max(1, min(full[0], int(CPU_MACS // per_sample)))
    return (samples,) + full[1:], samples < full[0]


@pytest.mark.parametrize("backend,dtype", ROWS, ids=[f"{b}-{str(d)[6:]}" for b, d in ROWS])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_patch_gram(benchmark, layer, backend, dtype):
    if backend == "triton" and not CUDA:
        pytest.skip("Triton rows need CUDA")
    device = "cuda" if CUDA else "cpu"
    make, full = LAYERS[layer]
    module = make().to(device)
    shape, reduced = input_shape(module, full, device)
    x = torch.randn(shape, device=device).to(dtype)
    bias = getattr(module, "bias", None) is not None
    groups, dim = patch_dim(module)
    dim_out = dim + bias
    out = torch.empty(groups, dim_out, dim_out, device=device)
    _, geom = patch_input(x, module)
    positions = shape[0] * geom.positions

    def run():
        ops.patch_gram_(out, x, module, bias=bias, backend=backend)
        if CUDA:
            torch.cuda.synchronize()

    run()  # compile / warm up outside the timed rounds
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - baseline
    benchmark.pedantic(run, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)

    macs = groups * dim_out ** 2 * positions
    benchmark.extra_info.update(
        input_shape=list(shape), samples=shape[0], reduced=reduced, groups=groups, dim_out=dim_out,
        positions=positions, syrk_macs=macs, im2col_bytes=positions * groups * dim * x.element_size(),
        device=torch.cuda.get_device_name() if CUDA else "cpu")
    if benchmark.stats is not None:  # absent under --benchmark-disable
        benchmark.extra_info["tflops"] = 2 * macs / benchmark.stats.stats.mean / 1e12
    assert torch.isfinite(out).all()
