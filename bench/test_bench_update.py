"""The preconditioned update U = Ĝ·P + SGD epilogue of a whole network, and the optimizer step.

Layer sets of ResNet-18 and ResNet-50 (ImageNet shapes: their convolutions and fc, plus the
BatchNorm weights and biases that take U = G/λ). Two suites:
- `test_update`: one `preconditioned_update_` over all blocks: the reference (a per-layer loop of
  `bmm` + SGD) vs the grouped Triton kernel, for contiguous and channels_last conv weights, fp32
  and bf16 parameters, P padded to 16-byte rows as the inverse returns it (the kernel's vector
  variant where D allows) or at a 4-byte offset (all scalar), and on sm_90 both tile configs of
  `fastfoof.kernels.update` (HOPPER_CONFIG "registers" or "async": which is faster is what these
  rows are for); grafted rows (graft="sgd": two passes through a U workspace, against graft=None's
  one). extra_info: GEMM flops (2·M·D'² per layer group), TFLOP/s, bytes of P, the config and the
  problems per variant of the Triton rows (grafted: the U workspace's bytes), and on CUDA the peak
  memory the call allocated.
- `test_step`: `optimizer.step()` of FOOF (reference or triton backend, steady state: no inversion
  in the timed steps) vs `torch.optim.SGD(momentum=0.9, foreach=True)` on the same parameters.

Triton rows run where CUDA is present (the only skip). FASTFOOF_BENCH_SMOKE=1 divides every
channel count by 32 and keeps the first few layers.
"""
import os

import pytest
import torch
from torch import nn

import fastfoof
from fastfoof import ops
from fastfoof.layers import Block

SMOKE = os.environ.get("FASTFOOF_BENCH_SMOKE") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
WIDTH_DIV = 32 if SMOKE else 1
LR, DAMPING = 0.1, 1.0


def resnet_layers(name: str) -> list[nn.Module]:
    """The Linear/Conv layers and BatchNorms of torchvision's ResNet-18 / ResNet-50 (ImageNet)."""
    w = lambda c: max(1, c // WIDTH_DIV)  # noqa: E731
    layers = [nn.Conv2d(3, w(64), 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(w(64))]
    inplanes = 64
    bottleneck = name == "resnet50"
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)):
        for b in range(blocks):
            if bottleneck:
                shapes = [(inplanes, planes, 1), (planes, planes, 3), (planes, 4 * planes, 1)]
                out = 4 * planes
            else:
                shapes = [(inplanes, planes, 3), (planes, planes, 3)]
                out = planes
            if b == 0 and inplanes != out:
                shapes.append((inplanes, out, 1))  # downsample
            for cin, cout, k in shapes:
                layers += [nn.Conv2d(w(cin), w(cout), k, padding=k // 2, bias=False), nn.BatchNorm2d(w(cout))]
            inplanes = out
    layers.append(nn.Linear(w(inplanes), 1000))
    return layers[:6] if SMOKE else layers


def make_model(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*resnet_layers(name)).to(DEVICE, dtype)


def fill_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2


def place_precond(p: torch.Tensor, placement: str) -> torch.Tensor:
    """P [1, D', D'] with rows padded to a multiple of 4 fp32 ("padded", as the inverse returns it),
    or contiguous 4 bytes past a 16-byte boundary ("unaligned", e.g. a P sliced out of a buffer)."""
    dim = p.shape[-1]
    if placement == "padded":
        return torch.empty(1, dim, -(-dim // 4) * 4, device=p.device)[..., :dim].copy_(p)
    return torch.empty(p.numel() + 1, device=p.device)[1:].view(p.shape).copy_(p)


def blocks_of(model: nn.Module, placement: str = "padded") -> list[Block]:
    """FOOF's blocks: [weight, bias] of each Linear/Conv with a random P, the BatchNorm params alone."""
    group = dict(lr=LR, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4)
    blocks = []
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            params = [m.weight] + ([m.bias] if m.bias is not None else [])
            dim = m.weight[0].numel() + len(params) - 1
            a = torch.randn(dim, dim, device=DEVICE) / dim ** 0.5
            precond = torch.linalg.inv(a @ a.T + DAMPING * torch.eye(dim, device=DEVICE))[None]
            blocks.append(Block(params, [group] * len(params), 1, place_precond(precond, placement)))
        else:
            blocks += [Block([p], [group]) for p in m.parameters()]
    return blocks


def gemm_flops(blocks: list[Block]) -> int:
    return sum(2 * b.params[0].shape[0] * b.precond.shape[-1] ** 2 for b in blocks if b.precond is not None)


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


# (backend, dtype, conv weight layout, P placement, sm_90 tile config of the Triton kernel, graft)
UPDATE_ROWS = [
    ("reference", torch.float32, "contiguous", "padded", None, None),
    ("reference", torch.float32, "channels_last", "padded", None, None),
    ("triton", torch.float32, "contiguous", "padded", "registers", None),
    ("triton", torch.float32, "contiguous", "padded", "async", None),
    ("triton", torch.float32, "contiguous", "unaligned", "registers", None),
    ("triton", torch.float32, "channels_last", "padded", "registers", None),
    ("triton", torch.float32, "contiguous", "padded", "registers", "sgd"),
    ("triton", torch.bfloat16, "contiguous", "padded", "registers", None),
    ("triton", torch.bfloat16, "contiguous", "padded", "async", None),
    ("triton", torch.bfloat16, "channels_last", "padded", "registers", None),
    ("triton", torch.bfloat16, "contiguous", "padded", "registers", "sgd"),
]
UPDATE_IDS = ["-".join([backend, str(dtype)[6:], layout, placement] + ([f"sm90_{config}"] if config else [])
                       + ([f"graft_{graft}"] if graft else []))
              for backend, dtype, layout, placement, config, graft in UPDATE_ROWS]


@pytest.mark.parametrize("backend,dtype,layout,placement,hopper_config,graft", UPDATE_ROWS, ids=UPDATE_IDS)
@pytest.mark.parametrize("model_name", ["resnet18", "resnet50"])
def test_update(benchmark, monkeypatch, model_name, backend, dtype, layout, placement, hopper_config, graft):
    if backend == "triton" and not CUDA:
        pytest.skip("Triton rows need CUDA")
    model = make_model(model_name, dtype)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    fill_grads(model)
    blocks = blocks_of(model, placement)
    buffers = [None] * sum(len(b.params) for b in blocks)
    plans = ops.KernelPlans()  # this row's tables, kept between its runs as an optimizer keeps its own
    bound = None if graft is None else fastfoof.FOOF.GRAFT_BOUND  # graft="sgd": FOOF's default step
    if backend == "triton":
        from fastfoof.kernels import update

        monkeypatch.setattr(update, "HOPPER_CONFIG", hopper_config)

    def run():
        ops.preconditioned_update_(blocks, buffers, damping=DAMPING, graft=bound, backend=backend, plans=plans)
        synchronize()

    run()  # creates the momentum buffers and the device tables
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark(run)
    flops = gemm_flops(blocks)
    benchmark.extra_info.update(
        layers=sum(b.precond is not None for b in blocks), blocks=len(blocks), gemm_gflop=flops / 1e9,
        precond_mbytes=sum(b.precond.numel() * 4 for b in blocks if b.precond is not None) / 2 ** 20,
        device=torch.cuda.get_device_name() if CUDA else "cpu")
    if backend == "triton":
        benchmark.extra_info["config"] = update.launch_config(torch.device(DEVICE))
        for name in plans.names():
            if name[2:3] == ("problems",):  # (device, dtype, "problems", VEC)
                benchmark.extra_info[f"problems_vec{name[3]}"] = len(plans.key(name))
        if graft is not None:
            benchmark.extra_info["update_workspace_mbytes"] = \
                plans.held((blocks[0].params[0].device, "updates")).numel() * 4 / 2 ** 20
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
    if CUDA:
        benchmark.extra_info["peak_extra_mbytes"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20


STEP_ROWS = ["sgd_foreach", "foof_reference", "foof_triton"]


@pytest.mark.parametrize("optimizer", STEP_ROWS)
@pytest.mark.parametrize("model_name", ["resnet18", "resnet50"])
def test_step(benchmark, model_name, optimizer):
    if optimizer == "foof_triton" and not CUDA:
        pytest.skip("Triton rows need CUDA")
    model = make_model(model_name, torch.float32)
    fill_grads(model)
    if optimizer == "sgd_foreach":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, foreach=True)
    else:
        opt = fastfoof.FOOF(model, lr=LR, damping=DAMPING, momentum=0.9, weight_decay=5e-4,
                            inv_period=10 ** 9, backend=optimizer.split("_")[1])

    def run():
        opt.step()
        synchronize()

    run()  # FOOF: computes P (identity/λ: no statistics were observed) and the momentum buffers
    benchmark(run)
    benchmark.extra_info.update(params=sum(p.numel() for p in model.parameters()),
                                device=torch.cuda.get_device_name() if CUDA else "cpu")
