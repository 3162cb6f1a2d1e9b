"""End-to-end training step: FOOF and KFAC vs SGD with momentum, AdamW and compiled models.

One row per (model, precision, optimizer); a row times one full training step (zero_grad, forward,
loss, backward, optimizer step; CUDA synchronised) over `inv_period` = 100 rounds, i.e. one whole
FOOF period, so the row's mean is FOOF's amortised step (S observed steps and one inversion) and its
median a typical unobserved step. Before every timed step an untimed-for-the-row step of the
baseline runs (SGD; AdamW for SGD's own row; compiled SGD for the compiled rows): the optimizers
alternate in one process, and each row divides its own median and mean by the medians of the
baseline steps interleaved with it (extra_info "ratio_median"/"ratio_mean"), so drift or background
load hits both sides alike.

Rows: SGD+M (foreach), AdamW (fused on CUDA, foreach on CPU), FOOF (T=100, S=10; S=100; on CUDA the
paper's ResNet schedule T=500, S=10 over 500 rounds), FOOF through the reference ops (CUDA: what the
Triton kernels buy), KFAC (heuristic damping, Monte Carlo Fisher, T=100, S=10: its extra backward
on observed steps included), with the model under `torch.compile` (inductor): SGD+M and FOOF, and
FOOF at its cost floor: `stats_batch` = B/4, `rank` 256 and 512 (the top-r eigenpairs for layers
with D' > 2r), rank 256 with B/4; ResNet-18 only, on CPU at batch 16 and, as the model
resnet18_cifar_b128, at 128 next to full FOOF (not rank 512 there: 10 minutes a row). A FOOF row
also records its plain, observed and inverting steps apart (extra_info "plain_median_s",
"observed_mean_s", "inverting_mean_s", and "observed_extra_baseline_steps": the observed mean less
the plain median, in baseline steps). Precisions: fp32, and on CUDA bf16 autocast with
channels_last model and inputs. On CUDA (where the GPU check's time is short) only ResNet-18 runs,
and its compiled rows only in bf16.

Models: torchvision-style ResNet-18 on CIFAR-10-shaped inputs (batch 128 on CUDA; on CPU batch 16,
extra_info["reduced"]) and the examples' small conv net (batch 128). Peak memory: CUDA's
`max_memory_allocated` over the row's first two steps alone, above what was allocated before; on
CPU the allocator's peak over one observed step, from the profiler's memory events.
FASTFOOF_BENCH_SMOKE=1: narrow models, batch 4, 3 rounds, no compiled rows, no CPU peak memory (the
profiler's start-up would dominate).

`test_inversion_round` times one inversion round of every layer of ResNet-18 from the statistics of
one batch: FOOF (one factor per layer; with rank 256 and 512, the top eigenpairs of the wide ones), KFAC
heuristic (two factors) and KFAC exact (two eigendecompositions).

`test_final_loss` trains the examples' nets on digits and MNIST-1D (CNN and MLP) as
examples/compare_optimizers.py does, with full FOOF and with the cost floor options (`rank` 256 and 32,
`stats_batch` B/4, both) at the same lr and damping, three seeds each, and records the final training
loss (extra_info "final_train_loss"): what the savings cost in training.
"""
from __future__ import annotations

import gc
import math
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastfoof
from fastfoof import ops
from fastfoof.core import KroneckerOptimizer
from fastfoof.preconditioners import LowRank, input_inverse

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
    # ResNet-18 at CUDA's batch on CPU too, for the rows of what FOOF's cost floor options buy (COST_FLOOR)
    "resnet18_cifar_b128": (lambda: resnet18(width=8 if SMOKE else 64), 128, 128),
    "smallconv_cifar": (lambda: SmallConvNet(in_channels=3, width=8 if SMOKE else 32), 128, 128),
}
# precision -> (autocast dtype or None, channels_last); bf16 rows need CUDA
PRECISIONS = {"fp32": (None, False), "bf16_channels_last": (torch.bfloat16, True)}


def low_rank(opt: KroneckerOptimizer, layer) -> bool:
    """Whether the layer's input factor is kept low rank (DESIGN §1.3)."""
    return isinstance(input_inverse(layer, opt.rank), LowRank)


def foof(backend="auto", stats_steps=10, stats_quarter=False, inv_period=INV_PERIOD, **options):
    """FOOF's row factory; `stats_quarter`: statistics from a quarter of the batch (stats_batch = B/4)."""
    return lambda m, batch: fastfoof.FOOF(m, lr=LR, momentum=0.9, inv_period=inv_period, stats_steps=stats_steps,
                                          backend=backend, stats_batch=batch // 4 if stats_quarter else None, **options)


# name -> (factory(model, batch size) -> optimizer, compiled model, needs CUDA)
OPTIMIZERS = {
    "sgd": (lambda m, _: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, foreach=True), False, False),
    "adamw": (lambda m, _: torch.optim.AdamW(m.parameters(), lr=LR / 10, fused=CUDA, foreach=not CUDA), False, False),
    "foof_T100_S10": (foof(), False, False),
    "foof_T100_S100": (foof(stats_steps=INV_PERIOD), False, False),
    # The same FOOF through the plain-PyTorch reference ops (on CPU it is the foof_T100_S10 row).
    "foof_T100_S10_reference": (foof(backend="reference"), False, True),
    # The paper's schedule on ResNets (one inversion per epoch), on CUDA: a row of 500 rounds
    "foof_T500_S10": (foof(inv_period=500), False, True),
    "foof_T500_S10_reference": (foof(inv_period=500, backend="reference"), False, True),
    "kfac_T100_S10": (lambda m, _: fastfoof.KFAC(m, lr=LR, momentum=0.9, inv_period=INV_PERIOD, stats_steps=10,
                                              damping_mode="heuristic", fisher="mc"), False, False),
    "sgd_compiled": (lambda m, _: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, foreach=True), True, False),
    "foof_T100_S10_compiled": (foof(), True, False),
    # FOOF at its cost floor (DESIGN §1.2, §1.3): statistics from B/4 samples per observed forward, a
    # low-rank preconditioner for layers with D' > 2·rank, and both
    "foof_T100_S10_stats_quarter": (foof(stats_quarter=True), False, False),
    "foof_T100_S10_rank256": (foof(rank=256), False, False),
    "foof_T100_S10_rank512": (foof(rank=512), False, False),
    "foof_T100_S10_rank256_stats_quarter": (foof(rank=256, stats_quarter=True), False, False),
    # The paper's eq. 6 without grafting (DESIGN §1.4): timed against the grafted default in test_graft_cost
    "foof_T100_S10_graft_none": (foof(graft=None), False, False),
}
PERIODS = {"foof_T500_S10": 500, "foof_T500_S10_reference": 500}  # rows whose period is not INV_PERIOD
# The rows that compare the cost floor options with full FOOF: the only ones resnet18_cifar_b128 runs
COST_FLOOR = ("foof_T100_S10", "foof_T100_S10_stats_quarter", "foof_T100_S10_rank256", "foof_T100_S10_rank512",
              "foof_T100_S10_rank256_stats_quarter")


def baseline_of(optimizer: str) -> str:
    if optimizer == "sgd":
        return "adamw"
    return "sgd_compiled" if OPTIMIZERS[optimizer][1] and optimizer != "sgd_compiled" else "sgd"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Trainer:
    """A model, its optimizer and one fixed batch; every Trainer of a row starts from the same weights."""

    def __init__(self, model_name: str, optimizer_name: str, precision: str, batch: tuple[torch.Tensor, torch.Tensor]):
        torch.manual_seed(0)
        factory, compiled, _ = OPTIMIZERS[optimizer_name]
        autocast_dtype, channels_last = PRECISIONS[precision]
        model = MODELS[model_name][0]().to(DEVICE)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = factory(model, len(batch[0]))
        self.timed: list[tuple[str, float]] = []  # (step_kind, seconds) of every step
        self.model = torch.compile(model) if compiled else model
        self.autocast = torch.autocast(DEVICE.type, dtype=autocast_dtype or torch.float32,
                                       enabled=autocast_dtype is not None)
        self.x, self.y = batch
        if channels_last:
            self.x = self.x.to(memory_format=torch.channels_last)

    def step_kind(self) -> str:
        """Which of FOOF's steps the coming one is (DESIGN §1.5); "plain" for other optimizers."""
        opt = self.optimizer
        if not isinstance(opt, KroneckerOptimizer):
            return "plain"
        r = (opt.schedule.steps + 1) % opt.inv_period
        return "inverting" if r == 0 else "observed" if r > opt.inv_period - opt.stats_steps else "plain"

    def step(self) -> torch.Tensor:
        kind, start = self.step_kind(), time.perf_counter()
        loss = self._step()
        self.timed.append((kind, time.perf_counter() - start))
        return loss

    def _step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            logits = self.model(self.x)
        if isinstance(self.optimizer, fastfoof.KFAC):
            self.optimizer.backward_fisher(logits)
        loss = F.cross_entropy(logits.float(), self.y)
        loss.backward()
        self.optimizer.step()
        sync()
        return loss.detach()


def fixed_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    return x.to(DEVICE), y.to(DEVICE)


def cpu_peak_bytes(fn) -> int:
    """The CPU allocator's peak during `fn` above its level when `fn` starts: the largest "Total
    Allocated" of the profiler's memory events (the allocator's own running total, which counts what
    was allocated before `fn` too) less the level before the first event."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})),
                    key=lambda e: e["ts"])
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


def skip_reason(model: str, precision: str, optimizer: str) -> str | None:
    if optimizer == "foof_T100_S10_graft_none":
        return "timed against the grafted default, step by step, in test_graft_cost"
    if model == "resnet18_cifar_b128" and (CUDA or SMOKE or optimizer not in COST_FLOOR
                                           or optimizer == "foof_T100_S10_rank512"):  # 10 min a row here
        return "CPU rows of the cost floor options at full size (on CUDA resnet18_cifar runs at batch 128)"
    if optimizer in COST_FLOOR[1:] and (not model.startswith("resnet") or CUDA and PRECISIONS[precision][0] is None):
        return "the cost floor rows are ResNet-18's (on CUDA in bf16 with channels_last)"
    if OPTIMIZERS[optimizer][2] and not CUDA:
        return "needs CUDA (on CPU this row is foof_T100_S10)"
    if PRECISIONS[precision][0] is not None and not CUDA:
        return "bf16 autocast rows need CUDA"
    if OPTIMIZERS[optimizer][1] and SMOKE:
        return "compiled rows are not run at smoke sizes (compilation would dominate)"
    # The GPU check's time is short: on CUDA the rows are ResNet-18's, compiled in its bf16 setting only.
    if CUDA and model != "resnet18_cifar":
        return "on CUDA the end-to-end rows are ResNet-18's"
    if CUDA and OPTIMIZERS[optimizer][1] and PRECISIONS[precision][0] is None:
        return "on CUDA the compiled rows run in bf16 with channels_last"
    return None


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model", list(MODELS))
def test_e2e_step(benchmark, model, precision, optimizer):
    reason = skip_reason(model, precision, optimizer)
    if reason:
        pytest.skip(reason)
    _, cuda_batch, cpu_batch = MODELS[model]
    batch_size = 4 if SMOKE else cuda_batch if CUDA else cpu_batch
    rounds = 3 if SMOKE else PERIODS.get(optimizer, INV_PERIOD)
    batch = fixed_batch(batch_size)
    if CUDA:
        torch.backends.cudnn.benchmark = True
        gc.collect()
        torch.cuda.empty_cache()
        allocated_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    subject = Trainer(model, optimizer, precision, batch)
    for _ in range(WARM_STEPS):
        loss = subject.step()
    peak_memory = torch.cuda.max_memory_allocated() - allocated_before if CUDA else None
    baseline_name = baseline_of(optimizer)
    baseline = Trainer(model, baseline_name, precision, batch)
    for _ in range(WARM_STEPS):
        baseline.step()

    baseline_seconds = []

    def baseline_step():
        start = time.perf_counter()
        baseline.step()
        baseline_seconds.append(time.perf_counter() - start)

    subject.timed.clear()
    loss = benchmark.pedantic(subject.step, setup=baseline_step, rounds=rounds, warmup_rounds=1)
    timed = subject.timed[1:]  # [0] is the warm-up round's
    assert torch.isfinite(loss), f"{optimizer} diverged on {model}"
    if not (CUDA or SMOKE):  # one step inside the stats window, after the timed rounds (they end at an inversion)
        if isinstance(subject.optimizer, KroneckerOptimizer):
            subject.optimizer.schedule.steps = subject.optimizer.inv_period - 1  # the coming step observes and inverts
        peak_memory = cpu_peak_bytes(subject.step)

    info = benchmark.extra_info
    info.update(model=model, optimizer=optimizer, amp=precision, batch_size=batch_size,
                input_shape=[batch_size, 3, 32, 32], reduced=batch_size < cuda_batch, rounds=rounds, smoke=SMOKE,
                parameters=sum(p.numel() for p in subject.model.parameters()),
                device=f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}" if CUDA else "cpu",
                compiled=OPTIMIZERS[optimizer][1], interleaved_with=baseline_name, peak_memory_bytes=peak_memory,
                backend=None)
    if isinstance(subject.optimizer, KroneckerOptimizer):
        opt = subject.optimizer
        info.update(inv_period=opt.inv_period, stats_steps=opt.stats_steps,
                    backend=ops.resolve_backend(opt.backend, DEVICE), diagnostics=opt.diagnostics)
    if benchmark.stats is not None:  # absent under --benchmark-disable
        row = benchmark.stats.stats
        baseline_median = statistics.median(baseline_seconds[1:])  # [0] is the warm-up round's
        info[f"{baseline_name}_interleaved_median_s"] = baseline_median
        if baseline_name != "adamw":
            info["ratio_median"] = row.median / baseline_median
            info["ratio_mean"] = row.mean / baseline_median
        # FOOF's three kinds of step apart: what an observed step adds to a plain one, in baseline steps
        by_kind = {kind: [seconds for k, seconds in timed if k == kind] for kind in ("plain", "observed", "inverting")}
        if by_kind["observed"] and by_kind["plain"]:  # S < T
            info.update(plain_median_s=statistics.median(by_kind["plain"]),
                        observed_mean_s=statistics.mean(by_kind["observed"]),
                        inverting_mean_s=statistics.mean(by_kind["inverting"]) if by_kind["inverting"] else None)
            info["observed_extra_baseline_steps"] = (info["observed_mean_s"] - info["plain_median_s"]) / baseline_median


@pytest.mark.parametrize("model", ["resnet18_cifar", "smallconv_cifar"])
def test_graft_cost(benchmark, model):
    """What grafting costs: FOOF's default step (graft="sgd": two norms per layer and the rescaling) against
    the same FOOF with graft=None, interleaved step by step over one period in one process, fp32.
    extra_info "ratio_plain_median": the grafted plain step's median over the ungrafted one's."""
    if CUDA and model != "resnet18_cifar":
        pytest.skip("on CUDA the end-to-end rows are ResNet-18's")
    _, cuda_batch, cpu_batch = MODELS[model]
    batch = fixed_batch(4 if SMOKE else cuda_batch if CUDA else cpu_batch)
    trainers = {name: Trainer(model, name, "fp32", batch) for name in ("foof_T100_S10_graft_none", "foof_T100_S10")}
    for trainer in trainers.values():
        for _ in range(WARM_STEPS):
            trainer.step()
        trainer.timed.clear()
    grafted, ungrafted = trainers["foof_T100_S10"], trainers["foof_T100_S10_graft_none"]

    def ungrafted_step():  # (what a setup returns, pytest-benchmark takes for the step's arguments)
        ungrafted.step()

    loss = benchmark.pedantic(grafted.step, setup=ungrafted_step, rounds=3 if SMOKE else INV_PERIOD, warmup_rounds=1)
    assert torch.isfinite(loss)
    medians = {name: statistics.median([s for kind, s in trainer.timed[1:] if kind == "plain"] or [math.nan])
               for name, trainer in trainers.items()}
    benchmark.extra_info.update(model=model, batch_size=len(batch[0]), rounds=INV_PERIOD, smoke=SMOKE,
                                device=torch.cuda.get_device_name() if CUDA else "cpu",
                                backend=ops.resolve_backend(grafted.optimizer.backend, DEVICE),
                                plain_median_s=medians["foof_T100_S10"],
                                graft_none_plain_median_s=medians["foof_T100_S10_graft_none"],
                                ratio_plain_median=medians["foof_T100_S10"] / medians["foof_T100_S10_graft_none"])


BLOCKS = 3  # test_alternating_blocks: pairs of one whole period of SGD+M, then one of FOOF


def test_alternating_blocks(benchmark):
    """smallconv_cifar, FOOF T=100 S=10 against SGD+M in blocks of one period each, alternating in one
    process (the interleaved rows alternate single steps): FOOF's blocks' time over SGD's."""
    if CUDA:
        pytest.skip("a CPU row: on CUDA the end-to-end rows are ResNet-18's")
    batch = fixed_batch(4 if SMOKE else MODELS["smallconv_cifar"][2])
    period = 3 if SMOKE else INV_PERIOD
    trainers = {name: Trainer("smallconv_cifar", name, "fp32", batch) for name in ("sgd", "foof_T100_S10")}
    for trainer in trainers.values():
        for _ in range(WARM_STEPS):
            trainer.step()
    seconds = {name: 0.0 for name in trainers}
    pairs = 1 if SMOKE else BLOCKS

    def blocks():
        for _ in range(pairs):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                for _ in range(period):
                    loss = trainer.step()
                seconds[name] += time.perf_counter() - start
                assert torch.isfinite(loss)

    benchmark.pedantic(blocks, rounds=1, iterations=1)
    benchmark.extra_info.update(model="smallconv_cifar", batch_size=len(batch[0]), blocks=pairs,
                                block_steps=period, sgd_block_s=seconds["sgd"] / pairs,
                                foof_block_s=seconds["foof_T100_S10"] / pairs,
                                ratio=seconds["foof_T100_S10"] / seconds["sgd"], smoke=SMOKE, device="cpu")


@pytest.mark.parametrize("kind", ["foof", "foof_rank256", "foof_rank512", "kfac_heuristic", "kfac_exact"])
def test_inversion_round(benchmark, kind):
    torch.manual_seed(0)
    model = MODELS["resnet18_cifar"][0]().to(DEVICE)
    if kind.startswith("foof"):
        rank = int(kind.removeprefix("foof_rank")) if "rank" in kind else None
        opt = fastfoof.FOOF(model, lr=LR, inv_period=INV_PERIOD, rank=rank)
    else:
        opt = fastfoof.KFAC(model, lr=LR, inv_period=INV_PERIOD, damping_mode=kind.split("_")[1])
    x, y = fixed_batch(4 if SMOKE else 16)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # statistics and a first preconditioner for every layer

    def round_():
        opt._invert(opt._active)
        sync()

    benchmark.pedantic(round_, rounds=2 if SMOKE else 5, warmup_rounds=1)
    dims = [layer.dim_p for layer in opt._active]
    benchmark.extra_info.update(kind=kind, layers=len(dims), max_dim=max(dims), smoke=SMOKE,
                                low_rank_layers=sum(low_rank(opt, layer) for layer in opt._active),
                                device=torch.cuda.get_device_name() if CUDA else "cpu",
                                backend=ops.resolve_backend(opt.backend, DEVICE))


# What the cost floor options cost in training: the final training loss (last epoch's mean) of each
# against full FOOF at the same lr and damping, trained as examples/compare_optimizers.py trains (its
# data, nets, epochs, batch size, momentum 0.9; same init and batches for every variant), at the best
# FOOF setting of its grid (README). rank 256 takes only digits' last conv (D' = 577); rank 32 takes
# every layer with D' > 64 (digits: 289, 577, 65; MNIST-1D CNN: 76, 76, 126; MLP: 101, 101).
# dataset -> (net name in compare_optimizers.DATASETS, lr, damping)
FINAL_LOSS_RUNS = {"digits": ("SmallConvNet", 1.0, 1.0), "mnist1d": ("CNN", 0.1, 0.1), "mnist1d_mlp": ("MLP", 0.1, 0.1)}
FINAL_LOSS_SEEDS = (0, 1, 2)  # the init's and the batch order's: losses near 1e-3 vary by more than 1.5× between seeds
FINAL_LOSS_VARIANTS = {"foof": {}, "rank256": {"rank": 256}, "rank32": {"rank": 32}, "stats_batch_quarter": {"stats_batch": 4},
                       "rank256_stats_batch_quarter": {"rank": 256, "stats_batch": 4}}


@pytest.mark.parametrize("seed", FINAL_LOSS_SEEDS)
@pytest.mark.parametrize("variant", list(FINAL_LOSS_VARIANTS))
@pytest.mark.parametrize("run", list(FINAL_LOSS_RUNS))
def test_final_loss(benchmark, run, variant, seed):
    if CUDA:
        pytest.skip("CPU rows: these nets' losses need no GPU, and the GPU check's time is short")
    import compare_optimizers as co

    dataset = run.removesuffix("_mlp")
    net, lr, damping = FINAL_LOSS_RUNS[run]
    config = co.DATASETS[dataset]
    x_train, y_train, _, _ = co.load_digits_data() if dataset == "digits" else co.load_mnist1d_data()
    batch = config["batch_size"]
    options = dict(FINAL_LOSS_VARIANTS[variant])
    if "stats_batch" in options:
        options["stats_batch"] = batch // options["stats_batch"]  # B/4
    torch.manual_seed(seed)
    model = config["models"][net]()
    # graft=None: the lr and damping of FINAL_LOSS_RUNS were FOOF's best by eq. 6, before grafting was the default
    opt = fastfoof.FOOF(model, lr=lr, damping=damping, momentum=co.MOMENTUM, graft=None, **options)
    order = torch.Generator().manual_seed(seed)
    epochs, steps = (1, 3) if SMOKE else (config["epochs"], len(x_train) // batch)

    def train() -> list[float]:
        losses = []
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=order)
            total = 0.0
            for i in range(steps):
                idx = perm[i * batch:(i + 1) * batch]
                total += co.train_step(model, opt, x_train[idx], y_train[idx]).item()
            losses.append(total / steps)
        return losses

    losses = benchmark.pedantic(train, rounds=1, iterations=1)
    assert all(math.isfinite(loss) for loss in losses)
    benchmark.extra_info.update(dataset=dataset, net=net, variant=variant, seed=seed, options=options, lr=lr, damping=damping,
                                epochs=epochs, batch_size=batch, final_train_loss=losses[-1], epoch_losses=losses,
                                smoke=SMOKE, low_rank_layers=[layer.name for layer in opt.layers if low_rank(opt, layer)],
                                diagnostics=opt.diagnostics)
