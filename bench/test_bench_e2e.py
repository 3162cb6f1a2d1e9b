"""End-to-end training step: FOOF vs SGD with momentum (foreach) vs Adam (foreach), same model and data.

One row per (model, optimizer); a row times one full training step (zero_grad, forward, loss,
backward, optimizer step; CUDA synchronised) over `inv_period` = 100 rounds, i.e. one whole FOOF
period, so the row's mean is FOOF's amortised step (S observed steps and one inversion per period)
and its median a typical unobserved step. Before every timed step an untimed-for-the-row step of the
baseline runs (SGD; Adam for SGD's own row): the optimizers alternate in one process, and each FOOF
row divides its own median and mean by the medians of the SGD steps interleaved with it
(extra_info "ratio_median"/"ratio_mean"), so drift or background load hits both sides alike.

Models: torchvision-style ResNet-18 on CIFAR-10-shaped inputs (batch 128 on CUDA; on CPU batch 16,
extra_info["reduced"]) and the examples' small conv net (batch 128). Peak memory (CUDA): the most
allocated while building the model and optimizer and taking their first two steps alone, above
what was allocated before. FASTFOOF_BENCH_SMOKE=1: narrow models, batch 4, 3 rounds. At full size
on a 2-core CPU the suite took 23 minutes (a busy machine),
mostly the ResNet row with S=T, which observes statistics at every step.
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastfoof
from fastfoof import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import SmallConvNet, resnet18  # noqa: E402

SMOKE = os.environ.get("FASTFOOF_BENCH_SMOKE") == "1"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INV_PERIOD = 100
WARM_STEPS = 2  # the first includes FOOF's first inversion; neither is timed
LR = 0.01  # small enough that no run diverges over the rounds (a diverged run would time fallbacks)

# name -> (model factory, batch size on CUDA, batch size on CPU)
MODELS = {
    "resnet18_cifar": (lambda: resnet18(width=8 if SMOKE else 64), 128, 16),
    "smallconv_cifar": (lambda: SmallConvNet(in_channels=3, width=8 if SMOKE else 32), 128, 128),
}
# name -> (factory(model) -> optimizer, needs CUDA)
OPTIMIZERS = {
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, foreach=True), False),
    "adam": (lambda m: torch.optim.Adam(m.parameters(), lr=LR / 10, foreach=True), False),
    "foof_T100_S10": (lambda m: fastfoof.FOOF(m, lr=LR, momentum=0.9, inv_period=INV_PERIOD, stats_steps=10), False),
    "foof_T100_S100": (lambda m: fastfoof.FOOF(m, lr=LR, momentum=0.9, inv_period=INV_PERIOD,
                                               stats_steps=INV_PERIOD), False),
    # The same FOOF through the plain-PyTorch reference ops: what the Triton kernels buy (on CPU it is
    # the foof_T100_S10 row).
    "foof_T100_S10_reference": (lambda m: fastfoof.FOOF(m, lr=LR, momentum=0.9, inv_period=INV_PERIOD,
                                                        stats_steps=10, backend="reference"), True),
}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Trainer:
    """A model, its optimizer and one fixed batch; every Trainer of a row starts from the same weights."""

    def __init__(self, model_name: str, optimizer_name: str, batch: tuple[torch.Tensor, torch.Tensor]):
        torch.manual_seed(0)
        self.model = MODELS[model_name][0]().to(DEVICE)
        self.optimizer = OPTIMIZERS[optimizer_name][0](self.model)
        self.x, self.y = batch

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        sync()
        return loss.detach()


def fixed_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    return x.to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_e2e_step(benchmark, model, optimizer):
    if OPTIMIZERS[optimizer][1] and not CUDA:
        pytest.skip("needs CUDA (on CPU this row is foof_T100_S10)")
    _, cuda_batch, cpu_batch = MODELS[model]
    batch_size = 4 if SMOKE else cuda_batch if CUDA else cpu_batch
    rounds = 3 if SMOKE else INV_PERIOD
    batch = fixed_batch(batch_size)
    if CUDA:
        torch.backends.cudnn.benchmark = True
        gc.collect()
        torch.cuda.empty_cache()
        allocated_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    subject = Trainer(model, optimizer, batch)
    for _ in range(WARM_STEPS):
        loss = subject.step()
    if CUDA:
        peak_memory = torch.cuda.max_memory_allocated() - allocated_before
    baseline_name = "adam" if optimizer == "sgd" else "sgd"
    baseline = Trainer(model, baseline_name, batch)
    for _ in range(WARM_STEPS):
        baseline.step()

    baseline_seconds = []

    def baseline_step():
        start = time.perf_counter()
        baseline.step()
        baseline_seconds.append(time.perf_counter() - start)

    loss = benchmark.pedantic(subject.step, setup=baseline_step, rounds=rounds, warmup_rounds=1)
    assert torch.isfinite(loss), f"{optimizer} diverged on {model}"

    info = benchmark.extra_info
    info.update(model=model, optimizer=optimizer, batch_size=batch_size, input_shape=[batch_size, 3, 32, 32],
                reduced=batch_size < cuda_batch, rounds=rounds, smoke=SMOKE,
                parameters=sum(p.numel() for p in subject.model.parameters()),
                device=torch.cuda.get_device_name() if CUDA else "cpu",
                interleaved_with=baseline_name)
    if isinstance(subject.optimizer, fastfoof.FOOF):
        foof = subject.optimizer
        info.update(inv_period=foof.inv_period, stats_steps=foof.stats_steps,
                    backend=ops.resolve_backend(foof.backend, DEVICE), diagnostics=foof.diagnostics)
    if CUDA:
        info["peak_memory_bytes"] = peak_memory
    else:
        info["peak_memory_bytes"] = None
        info["memory_note"] = ("not measured on CPU: a process's peak RSS only grows, so one optimizer's "
                               "peak cannot be told apart from the rows before it")
    if benchmark.stats is not None:  # absent under --benchmark-disable
        row = benchmark.stats.stats
        baseline_median = statistics.median(baseline_seconds[1:])  # [0] is the warm-up round's
        info[f"{baseline_name}_interleaved_median_s"] = baseline_median
        if baseline_name == "sgd":
            info["ratio_median"] = row.median / baseline_median
            info["ratio_mean"] = row.mean / baseline_median
