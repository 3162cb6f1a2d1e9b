"""Patch gram Σ a aᵀ of one layer input: reference (unfold + matmul) vs each path of the kernels.

Layer inputs of ResNet-18 on CIFAR-10 (batch 128), ResNet-50 on ImageNet (batch 64) and a
MobileNet depthwise 3×3 (batch 64); conv inputs both contiguous (NCHW) and channels_last, each in
fp32 and bf16. The reference has one row per input and dtype; the Triton backend one row per path
that can run the input (`applicable_paths`; "channels_last" only for channel-contiguous inputs),
with extra_info["chosen"] marking the path that `choose_path`, i.e. `ops.patch_gram_`, takes: the
rows a GPU run compares to set that rule. extra_info records the shapes, D', the SYRK floor
(groups·D'²·N multiply-adds), TFLOP/s against it (2 flops per multiply-add), the im2col bytes the
reference materialises and, on CUDA, the peak memory the call allocated.

Triton rows run where CUDA is present (the only skip). On CPU the reference runs with fewer
samples, so that each call stays under CPU_MACS multiply-adds and the suite within a minute
(extra_info["samples"] and ["reduced"] say so). FASTFOOF_BENCH_SMOKE=1 uses one sample and
spatial sizes of at most 8.

`test_reference_at_batch` (CPU only) times the reference on the ResNet layers' fp32 inputs at the
training batch sizes of bench/test_bench_e2e.py, 16 and 128, with the allocator's peak of one call
above what was allocated before (the workspace: the chunk of patch vectors and its padded input).
"""
import math
import os

import pytest
import torch
from torch import nn

from fastfoof import ops
from fastfoof.geometry import patch_dim, patch_input
from fastfoof.kernels import patch_gram as pg

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
DTYPES = (torch.float32, torch.bfloat16)


def layouts(module: nn.Module) -> tuple[str, ...]:
    return ("contiguous", "channels_last") if isinstance(module, nn.Conv2d) else ("contiguous",)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def kernel_paths(module: nn.Module, shape: tuple[int, ...], layout: str) -> tuple[str, ...]:
    """The Triton paths worth timing on this input (shape and strides decide, so a meta tensor does)."""
    x, geom = patch_input(with_layout(torch.empty(shape, device="meta"), layout), module)
    return tuple(path for path in pg.applicable_paths(x, geom) if path != "channels_last" or x.stride(1) == 1)


# (layer, layout, path or "reference", dtype)
CASES = [(layer, layout, path, dtype)
         for layer, (make, full) in sorted(LAYERS.items()) for layout in layouts(make())
         for path in ("reference",) + kernel_paths(make(), full, layout) for dtype in DTYPES]


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


@pytest.mark.parametrize("layer,layout,path,dtype", CASES,
                         ids=[f"{layer}-{layout}-{path}-{str(dtype)[6:]}" for layer, layout, path, dtype in CASES])
def test_patch_gram(benchmark, layer, layout, path, dtype):
    if path != "reference" and not CUDA:
        pytest.skip("Triton rows need CUDA")
    device = "cuda" if CUDA else "cpu"
    make, full = LAYERS[layer]
    module = make().to(device)
    shape, reduced = input_shape(module, full, device)
    x = with_layout(torch.randn(shape, device=device).to(dtype), layout)
    bias = getattr(module, "bias", None) is not None
    groups, dim = patch_dim(module)
    dim_p = dim + bias
    out = torch.empty(groups, dim_p, dim_p, device=device)
    _, geom = patch_input(x, module)
    positions = shape[0] * geom.positions

    def run():
        if path == "reference":
            ops.patch_gram_(out, x, module, bias=bias, backend="reference")
        else:
            pg.launch_patch_gram(out, x, module, alpha=1.0, beta=0.0, bias=bias, path=path,
                                 input_precision=pg.default_input_precision(x))
        if CUDA:
            torch.cuda.synchronize()

    run()  # compile / warm up outside the timed rounds
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - baseline
    benchmark.pedantic(run, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)

    macs = groups * dim_p ** 2 * positions
    benchmark.extra_info.update(
        input_shape=list(shape), samples=shape[0], reduced=reduced, groups=groups, dim_p=dim_p, layout=layout,
        chosen=path == pg.choose_path(*patch_input(x, module)),
        positions=positions, syrk_macs=macs, im2col_bytes=positions * groups * dim * x.element_size(),
        device=torch.cuda.get_device_name() if CUDA else "cpu")
    if benchmark.stats is not None:  # absent under --benchmark-disable
        benchmark.extra_info["tflops"] = 2 * macs / benchmark.stats.stats.mean / 1e12
    assert torch.isfinite(out).all()


BATCH_LAYERS = [name for name in sorted(LAYERS) if name.startswith("resnet")]
BATCHES = (16, 128)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", BATCH_LAYERS)
def test_reference_at_batch(benchmark, layer, batch):
    if CUDA:
        pytest.skip("CPU rows: on CUDA the patch gram rows are the Triton paths'")
    from test_bench_e2e import cpu_peak_bytes

    make, full = LAYERS[layer]
    module = make()
    shape = (1, full[1]) + tuple(min(s, SMOKE_SIZE) for s in full[2:]) if SMOKE else (batch,) + full[1:]
    x = torch.randn(shape)
    groups, dim = patch_dim(module)
    bias = getattr(module, "bias", None) is not None
    out = torch.empty(groups, dim + bias, dim + bias)

    def run():
        ops.patch_gram_(out, x, module, bias=bias, backend="reference")

    run()
    benchmark.pedantic(run, rounds=1 if SMOKE else 3, iterations=1, warmup_rounds=0)
    _, geom = patch_input(x, module)
    benchmark.extra_info.update(input_shape=list(shape), samples=shape[0], groups=groups, dim_p=dim + bias,
                                positions=shape[0] * geom.positions, device="cpu",
                                im2col_bytes=shape[0] * geom.positions * groups * dim * x.element_size(),
                                peak_memory_bytes=None if SMOKE else cpu_peak_bytes(run))
    assert torch.isfinite(out).all()
