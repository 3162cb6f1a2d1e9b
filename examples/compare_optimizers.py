"""FOOF vs KFAC vs SGD with momentum vs Adam vs Muon on small nets, each over a small grid, over seeds.

    python examples/compare_optimizers.py --dataset mnist1d    # the MNIST-1D benchmark's CNN and MLP
    python examples/compare_optimizers.py                      # scikit-learn's digits, bundled
    python examples/compare_optimizers.py --dataset cifar10 --data-dir ~/data --device cuda

FOOF and KFAC take SGD's learning rates: with their default graft="sgd" each layer's step is
rescaled to its gradient's norm, so lr means what it means for SGD, and damping only shapes the
direction. Their grid is SGD's lr grid at their default damping (FOOF 3, KFAC 1) and at 0.1.

Within a seed every run of a model starts from the same initial weights and sees the same batches in
the same order (--seeds, default 0 1 2: three seeds). The runs of a seed take turns step by step
(every run takes its step k before any takes step k+1), so that a change in background load hits
every run alike and the step times compare. Prints a table per model (each setting's final training
loss and test accuracy as the median over the seeds with their min and max, time per step, time to a
target training loss) and writes a PNG of the training loss per epoch and against training seconds on
a log scale (--plot).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastfoof  # noqa: E402
from data import channel_stats, normalise, read_cifar10  # noqa: E402
from models import MNIST1DConvNet, MNIST1DMLP, SmallConvNet  # noqa: E402


# FOOF's and KFAC's dampings: each one's default, and one other (smaller: preconditions more).
DAMPINGS = {"FOOF": (3.0, 0.1), "KFAC": (1.0, 0.1)}


def sgd_lr_grid(sgd_lrs: tuple[float, ...], dampings: tuple[float, ...]) -> list[tuple[float, float]]:
    """(lr, damping) for FOOF and KFAC: SGD's learning rates at each damping. With their default
    graft="sgd" every preconditioned layer steps as far as SGD would (its update rescaled to the
    gradient's norm), so SGD's lr carries over and the damping only shapes the direction."""
    return [(lr, damping) for damping in dampings for lr in sgd_lrs]


# lr per run, 3x apart, placed so that SGD's, Adam's and Muon's best setting on the dataset lies inside
# its grid (README: the sweeps that placed them); FOOF and KFAC take SGD's. KFAC uses Martens & Grosse's
# heuristic damping and the Monte Carlo Fisher (the paper's choice). The parameters Muon does not take
# step with AdamW at a tenth of Muon's rate.
MNIST1D_SGD_LRS = (0.03, 0.1, 0.3)
DIGITS_SGD_LRS = (0.1, 0.3, 1.0)
MNIST1D_GRIDS = {
    "SGD": [(lr, None) for lr in MNIST1D_SGD_LRS],
    "Adam": [(3e-3, None), (1e-2, None), (3e-2, None)],
    "Muon": [(3e-3, None), (0.01, None), (0.03, None)],
    "FOOF": sgd_lr_grid(MNIST1D_SGD_LRS, DAMPINGS["FOOF"]),
    "KFAC": sgd_lr_grid(MNIST1D_SGD_LRS, DAMPINGS["KFAC"]),
}
DIGITS_GRIDS = {
    "SGD": [(lr, None) for lr in DIGITS_SGD_LRS],
    "Adam": [(3e-3, None), (1e-2, None), (3e-2, None)],
    "Muon": [(0.03, None), (0.1, None), (0.3, None)],
    "FOOF": sgd_lr_grid(DIGITS_SGD_LRS, DAMPINGS["FOOF"]),
    "KFAC": sgd_lr_grid(DIGITS_SGD_LRS, DAMPINGS["KFAC"]),
}
SEEDS = (0, 1, 2)
MOMENTUM = 0.9
PERIOD, STATS_STEPS = 100, 10  # FOOF's and KFAC's inv_period T and stats_steps S (their defaults)
# dataset -> models, grids, epochs, batch size, target training loss per model
DATASETS = {
    "mnist1d": dict(models={"CNN": MNIST1DConvNet, "MLP": MNIST1DMLP}, grids=MNIST1D_GRIDS, epochs=20,
                    batch_size=100, target_loss={"CNN": 0.1, "MLP": 0.1}),
    "digits": dict(models={"SmallConvNet": lambda: SmallConvNet(in_channels=1)}, grids=DIGITS_GRIDS, epochs=10,
                   batch_size=64, target_loss={"SmallConvNet": 0.05}),
    # Not swept on CIFAR-10: the digits grids, for the same net.
    "cifar10": dict(models={"SmallConvNet": lambda: SmallConvNet(in_channels=3)}, grids=DIGITS_GRIDS, epochs=5,
                    batch_size=64, target_loss={"SmallConvNet": 1.0}),
}
SMOKE_EPOCHS, SMOKE_STEPS_PER_EPOCH = 2, 3
# Steps of every optimizer on a throwaway model before the race, so that the process's one-time costs
# (first calls into each kernel library) are charged to no run.
WARM_UP_STEPS = 3
COLORS = {"SGD": "tab:blue", "Adam": "tab:green", "Muon": "tab:purple", "FOOF": "tab:red", "KFAC": "tab:orange"}


def muon_kinds(model: torch.nn.Module, flattened: list) -> dict[str, int]:
    """What Muon takes, by kind: conv filters (flattened) and hidden weight matrices."""
    filters = sum(p.ndim > 2 for p, _ in flattened)
    return {"conv filters (flattened to [O, C·k·k])": filters, "hidden weight matrices": len(flattened) - filters}


def adamw_kinds(model: torch.nn.Module, rest: list, classifier: set) -> dict[str, int]:
    """What AdamW takes, by kind: the classifier's parameters, normalisation layers' and the other biases."""
    norms = {id(p) for m in model.modules()
             if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm))
             for p in m.parameters(recurse=False)}
    counts = {"classifier parameters": 0, "normalisation parameters": 0, "biases": 0}
    for p in rest:
        kind = "classifier parameters" if id(p) in classifier else "normalisation parameters" if id(p) in norms \
            else "biases"
        counts[kind] += 1
    return counts


class MuonWithAdamW:
    """torch.optim.Muon for the hidden weight matrices, AdamW for everything else, as the Muon reference
    does: conv filters are flattened to [O, C·k·k] (Muon takes 2-d parameters only, so it updates a 2-d
    view that shares the filter's storage), the classifier, biases and BatchNorm go to AdamW."""

    def __init__(self, model: torch.nn.Module, lr: float, adamw_lr: float):
        classifier = {id(p) for p in model.classifier.parameters()}
        self.flattened = []  # (filter, its [O, C·k·k] view that Muon updates)
        matrices, rest = [], []
        for p in model.parameters():
            if p.ndim >= 2 and id(p) not in classifier:
                view = p.detach().view(p.shape[0], -1)
                self.flattened.append((p, view))
                matrices.append(view)
            else:
                rest.append(p)
        self.muon = torch.optim.Muon(matrices, lr=lr, momentum=0.95, weight_decay=0.0)
        self.adamw = torch.optim.AdamW(rest, lr=adamw_lr, weight_decay=0.0)
        self.description = f"Muon: {self.counted(muon_kinds(model, self.flattened))}; AdamW: " \
                           f"{self.counted(adamw_kinds(model, rest, classifier))}"

    @staticmethod
    def counted(kinds: dict[str, int]) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n) or "nothing"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        for p, view in self.flattened:
            p.grad = view.grad = None

    def step(self) -> None:
        for p, view in self.flattened:
            view.grad = p.grad.reshape(view.shape)
        self.muon.step()
        self.adamw.step()


def make_optimizer(name: str, model: torch.nn.Module, lr: float, damping: float | None):
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "Muon":
        return MuonWithAdamW(model, lr, adamw_lr=lr / 10)
    if name == "KFAC":
        return fastfoof.KFAC(model, lr=lr, damping=damping, damping_mode="heuristic", fisher="mc", momentum=MOMENTUM)
    return fastfoof.FOOF(model, lr=lr, damping=damping, momentum=MOMENTUM)


def load_digits_data():
    """scikit-learn's 1797 8x8 digit images: a fixed 80/20 split, standardised."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    mean, std = x[train].mean(), x[train].std()
    return (x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test]


def load_mnist1d_data():
    """MNIST-1D with its default arguments: 4000 training and 1000 test signals of length 40, generated
    locally by the mnist1d package (make_dataset computes them; it downloads nothing), standardised."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    signals = lambda key: torch.tensor(data[key], dtype=torch.float32).unsqueeze(1)  # noqa: E731
    labels = lambda key: torch.tensor(data[key], dtype=torch.int64)  # noqa: E731
    return signals("x"), labels("y"), signals("x_test"), labels("y_test")


def load_cifar10_data(data_dir: Path):
    x_train, y_train, x_test, y_test = read_cifar10(data_dir)
    mean, std = channel_stats(x_train)
    return normalise(x_train, mean, std), y_train, normalise(x_test, mean, std), y_test


@dataclass
class Run:
    optimizer: str
    lr: float
    damping: float | None
    epoch_losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    steps_per_epoch: int = 0
    test_accuracy: float = math.nan
    period: int = PERIOD  # FOOF's T and S, which amortised_step weighs the kinds of steps by
    stats_steps: int = STATS_STEPS

    @property
    def label(self) -> str:
        return f"{self.optimizer} lr={self.lr:g}" + ("" if self.damping is None else f" λ={self.damping:g}")

    @property
    def median_step(self) -> float:
        """A typical step: the median over the run's steps after its first epoch."""
        return statistics.median(seconds for _, seconds in self.timed_steps())

    @cached_property  # read once training is over
    def amortised_step(self) -> float:
        """The median step of each kind in FOOF's schedule (DESIGN §1.5: plain, observed, observed and
        inverting), weighted by its share of a period, over the run's steps after its first epoch: the
        observed steps and the inversion count as often as they occur, and a step that another process
        slowed down does not count. For an optimizer without a schedule it is about its median step."""
        shares = {"plain": self.period - self.stats_steps, "observed": self.stats_steps - 1, "inverting": 1}
        steps = {kind: [] for kind in shares}
        for index, seconds in self.timed_steps():
            position = (index + 1) % self.period  # index + 1: the optimizer's step count t
            kind = "inverting" if position == 0 else "observed" if position > self.period - self.stats_steps else "plain"
            steps[kind].append(seconds)
        measured = [kind for kind in shares if steps[kind] and shares[kind]]
        return sum(shares[kind] * statistics.median(steps[kind]) for kind in measured) / sum(
            shares[kind] for kind in measured)

    def timed_steps(self) -> list[tuple[int, float]]:
        """(step index, seconds) of the steps after the first epoch (all of them if there was one only)."""
        steps = list(enumerate(self.step_seconds))
        return steps[self.steps_per_epoch:] or steps

    @property
    def epoch_seconds(self) -> list[float]:
        """Training seconds at each epoch's end, at the amortised step time: what the run's steps cost
        without the noise of whatever else ran on the machine."""
        return [(epoch + 1) * self.steps_per_epoch * self.amortised_step for epoch in range(len(self.epoch_losses))]

    def seconds_to(self, target: float) -> float:
        """Training seconds until an epoch's mean loss first reached `target` (inf if none did)."""
        return next((t for loss, t in zip(self.epoch_losses, self.epoch_seconds) if loss <= target), math.inf)

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train()
    return correct / len(x)


def train_step(model, optimizer, x, y) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    if isinstance(optimizer, fastfoof.KFAC):
        optimizer.backward_fisher(logits)  # G from labels sampled from the model
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def epoch_steps(examples: int, args) -> int:
    steps = examples // args.batch_size
    return min(steps, SMOKE_STEPS_PER_EPOCH) if args.smoke else steps


def optimizer_for(run: Run, model: torch.nn.Module):
    return make_optimizer(run.optimizer, model, run.lr, run.damping)


def warm_up_process(runs: list[Run], make_model, optimizer_for, x, y, device: torch.device) -> None:
    for run in {run.optimizer: run for run in runs}.values():  # one of each optimizer
        model = make_model().to(device)
        optimizer = optimizer_for(run, model)
        for _ in range(WARM_UP_STEPS):
            train_step(model, optimizer, x, y)
    sync(device)


def race(name: str, runs: list[Run], make_model, data, args, device: torch.device, bar: tqdm,
         optimizer_for=optimizer_for) -> list:
    """Train every run for args.epochs on the same batches, the runs taking turns step by step.
    Returns the optimizers."""
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = epoch_steps(len(x_train), args)
    models, optimizers = [], []
    for run in runs:
        run.steps_per_epoch = steps_per_epoch
        torch.manual_seed(args.seed)  # the same initial weights for every run
        models.append(make_model().to(device))
        optimizers.append(optimizer_for(run, models[-1]))
    warm_up_process(runs, make_model, optimizer_for, x_train[:args.batch_size], y_train[:args.batch_size], device)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every run
    # On a CPU the process's CPU time: with one thread it is the step's own work, where the wall clock
    # also counts the time the OS gives the cores to other processes (on a busy machine that tripled
    # some optimizers' steps and not others'). On a GPU the wall clock, synchronised.
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    live = list(range(len(runs)))
    for epoch in range(args.epochs):
        bar.set_description(f"{name} ({len(runs)} runs), epoch {epoch + 1}/{args.epochs}")
        perm = torch.randperm(len(x_train), generator=order)
        totals = [torch.zeros((), device=device) for _ in runs]
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size].to(device)
            x, y = x_train[idx], y_train[idx]
            for k in live:
                sync(device)
                start = clock()
                loss = train_step(models[k], optimizers[k], x, y)
                sync(device)
                runs[k].step_seconds.append(clock() - start)
                totals[k] += loss
            bar.update(len(live))
        for k in list(live):
            run = runs[k]
            run.epoch_losses.append(totals[k].item() / steps_per_epoch)
            if not math.isfinite(run.epoch_losses[-1]):  # diverged: this setting is out of the race
                live.remove(k)
                bar.total -= (args.epochs - epoch - 1) * steps_per_epoch
    for run, model in zip(runs, models):
        run.test_accuracy = accuracy(model, x_test, y_test)
    return optimizers


def loss_key(run: Run) -> float:
    """Lower is better; a diverged run (non-finite loss) never wins."""
    return run.final_loss if math.isfinite(run.final_loss) else math.inf


@dataclass
class Setting:
    """One grid point of one optimizer: its run on each seed."""
    runs: list[Run]

    @property
    def optimizer(self) -> str:
        return self.runs[0].optimizer

    @property
    def lr(self) -> float:
        return self.runs[0].lr

    @property
    def damping(self) -> float | None:
        return self.runs[0].damping

    @property
    def label(self) -> str:
        return self.runs[0].label

    @property
    def losses(self) -> list[float]:
        """Each seed's final training loss (inf where the run diverged)."""
        return [loss_key(run) for run in self.runs]

    @property
    def final_loss(self) -> float:
        """The median over the seeds (a diverged seed counts as inf)."""
        return statistics.median(self.losses)

    @property
    def accuracies(self) -> list[float]:
        return [run.test_accuracy for run in self.runs]

    @property
    def test_accuracy(self) -> float:
        return statistics.median(self.accuracies)

    @property
    def median_step(self) -> float:
        return statistics.median(run.median_step for run in self.runs)

    @property
    def amortised_step(self) -> float:
        return statistics.median(run.amortised_step for run in self.runs)

    def seconds_to(self, target: float) -> float:
        """The median over the seeds of the training seconds until the loss first reached `target`."""
        return statistics.median(run.seconds_to(target) for run in self.runs)

    @property
    def epoch_losses(self) -> list[float]:
        """Per epoch the median over the seeds of the epoch's mean loss, as long as every seed is finite."""
        losses = []
        for epoch in range(max(len(run.epoch_losses) for run in self.runs)):
            values = [run.epoch_losses[epoch] if epoch < len(run.epoch_losses) else math.inf for run in self.runs]
            if not all(math.isfinite(v) for v in values):
                break
            losses.append(statistics.median(values))
        return losses

    def epoch_band(self) -> tuple[list[float], list[float]]:
        """Per epoch (as long as every seed is finite) the lowest and highest seed's loss."""
        count = len(self.epoch_losses)
        return ([min(run.epoch_losses[e] for run in self.runs) for e in range(count)],
                [max(run.epoch_losses[e] for run in self.runs) for e in range(count)])

    @property
    def epoch_seconds(self) -> list[float]:
        """Training seconds at each epoch's end, at the median amortised step over the seeds."""
        steps = self.runs[0].steps_per_epoch
        return [(epoch + 1) * steps * self.amortised_step for epoch in range(len(self.epoch_losses))]


def settings_of(runs_per_seed: list[list[Run]]) -> list[Setting]:
    """Group each seed's runs (the same grid, in the same order) by grid point."""
    return [Setting(list(runs)) for runs in zip(*runs_per_seed)]


def best_settings(settings: list[Setting]) -> dict[str, Setting]:
    """Per optimizer, the setting with the lowest median final training loss."""
    best = {}
    for setting in settings:
        if setting.optimizer not in best or setting.final_loss < best[setting.optimizer].final_loss:
            best[setting.optimizer] = setting
    return best


def format_seconds(seconds: float) -> str:
    return f"{seconds:.2f}" if math.isfinite(seconds) else "never"


def format_damping(damping: float | None) -> str:
    return "-" if damping is None else f"{damping:g}"


def format_loss(loss: float) -> str:
    return f"{loss:.2e}" if math.isfinite(loss) else "diverged"


def loss_columns(setting: Setting) -> str:
    """The median final training loss over the seeds, then the lowest and the highest seed's."""
    return " ".join(f"{format_loss(v):>9}" for v in (setting.final_loss, min(setting.losses), max(setting.losses)))


def accuracy_columns(setting: Setting) -> str:
    return " ".join(f"{v:>7.2%}" for v in (setting.test_accuracy, min(setting.accuracies), max(setting.accuracies)))


LOSS_HEADER = f"{'loss med':>9} {'min':>9} {'max':>9}"
ACCURACY_HEADER = f"{'acc med':>7} {'min':>7} {'max':>7}"


def print_tables(name: str, settings: list[Setting], epochs: int, target: float, seeds: list[int]) -> None:
    print(f"{name}: every setting over seeds {' '.join(map(str, seeds))} ({epochs} epochs each; final training loss "
          f"(the last epoch's mean) and test accuracy: the median over the seeds, then the lowest and highest seed's; "
          f"ms per step after the first epoch: the median step, and amortised over FOOF's period T={PERIOD}, "
          f"S={STATS_STEPS}, median over the seeds; seconds to the target loss {target:g} at the amortised step, "
          f"median over the seeds)")
    print(f"{'optimizer':<10} {'lr':>8} {'damping':>8} {LOSS_HEADER} {ACCURACY_HEADER} {'median ms':>10} "
          f"{'amort. ms':>10} {'s to target':>12}")
    for setting in settings:
        print(f"{setting.optimizer:<10} {setting.lr:>8g} {format_damping(setting.damping):>8} {loss_columns(setting)} "
              f"{accuracy_columns(setting)} {1e3 * setting.median_step:>10.2f} {1e3 * setting.amortised_step:>10.2f} "
              f"{format_seconds(setting.seconds_to(target)):>12}")
    best = best_settings(settings)
    sgd_step = best["SGD"].amortised_step
    print(f"\n{name}: best setting per optimizer (lowest median final training loss; step / SGD: amortised step over "
          f"SGD's best setting's)")
    print(f"{'optimizer':<10} {'best lr':>8} {'damping':>8} {LOSS_HEADER} {ACCURACY_HEADER} {'amort. ms':>10} "
          f"{'step / SGD':>11} {'s to target':>12}")
    for optimizer, setting in sorted(best.items(), key=lambda item: item[1].final_loss):
        print(f"{optimizer:<10} {setting.lr:>8g} {format_damping(setting.damping):>8} {loss_columns(setting)} "
              f"{accuracy_columns(setting)} {1e3 * setting.amortised_step:>10.2f} "
              f"{setting.amortised_step / sgd_step:>10.2f}x {format_seconds(setting.seconds_to(target)):>12}")


def figure(results: dict[str, list[Setting]], targets: dict[str, float], title: str):
    """Per model: every setting's median loss per epoch, faint in its optimizer's colour, each optimizer's best
    in bold with its seeds' band (left); the best settings against training seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results) + 0.8), squeeze=False)
    for (name, settings), (by_epoch, by_time) in zip(results.items(), axes):
        best = best_settings(settings)
        for setting in settings:
            if best[setting.optimizer] is not setting:
                by_epoch.plot(range(1, len(setting.epoch_losses) + 1), setting.epoch_losses,
                              color=COLORS[setting.optimizer], alpha=0.3, linewidth=0.8)
        for setting in best.values():  # on top of the others
            epochs = range(1, len(setting.epoch_losses) + 1)
            style = dict(color=COLORS[setting.optimizer], linewidth=2.0)
            by_epoch.plot(epochs, setting.epoch_losses, **style)
            by_epoch.fill_between(epochs, *setting.epoch_band(), color=COLORS[setting.optimizer], alpha=0.15,
                                  linewidth=0)
            by_time.plot(setting.epoch_seconds, setting.epoch_losses, label=setting.label, **style)
        # Runs on their way to diverging would stretch the axis: it ends just above the best runs' start.
        top = 1.5 * max(max(run.epoch_losses[0] for run in setting.runs if run.epoch_losses)
                        for setting in best.values())
        for ax in (by_epoch, by_time):
            ax.axhline(targets[name], color="black", linestyle="--", linewidth=1.0)
            ax.set_yscale("log")
            ax.set_ylim(top=top)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylabel("training loss (mean over the epoch)")
        seeds = len(settings[0].runs)
        by_epoch.set_title(f"{name}, median of {seeds} seeds per setting\nbold: each optimizer's best (band: its seeds' "
                           f"min to max)\nfaint: its other settings, in its optimizer's colour", fontsize=9)
        by_time.set_title(f"{name}: the best settings against their own training time", fontsize=10)
        by_epoch.set_xlabel("epoch")
        by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
        by_time.set_xlabel("training seconds at the setting's amortised step (forward, backward, optimizer step)")
        handles, labels = by_time.get_legend_handles_labels()
        for optimizer in best:
            handles.append(Line2D([], [], color=COLORS[optimizer], alpha=0.3, linewidth=0.8))
            labels.append(f"{optimizer}: its other settings (faint)")
        handles += [Patch(color="gray", alpha=0.15), Line2D([], [], color="black", linestyle="--", linewidth=1.0)]
        labels += ["best setting's seeds, min to max (left)", f"target loss {targets[name]:g}"]
        by_time.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title)
    fig.text(0.01, 0.005, "Right: steps taken × the setting's amortised step time (on a CPU its CPU time), measured "
             "while the runs took turns step by step. A run that needs fewer epochs arrives later if its steps cost "
             "enough more.", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def plot(results: dict[str, list[Setting]], targets: dict[str, float], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(results, targets, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="digits")
    parser.add_argument("--data-dir", type=Path, help="folder holding cifar-10-batches-py (for --dataset cifar10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, help="default: " + ", ".join(
        f"{name} {setting['epochs']}" for name, setting in DATASETS.items()))
    parser.add_argument("--batch-size", type=int, help="default: " + ", ".join(
        f"{name} {setting['batch_size']}" for name, setting in DATASETS.items()))
    parser.add_argument("--seeds", type=int, nargs="+",
                        help=f"seeds of the initial weights and the batch order (default: {' '.join(map(str, SEEDS))}; "
                             "with --smoke: 0)")
    parser.add_argument("--plot", type=Path, default=Path("compare_optimizers.png"), help="where the PNG goes")
    parser.add_argument("--target-loss", type=float,
                        help="training loss whose time to reach is reported (default: per dataset and model)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_EPOCHS} epochs of {SMOKE_STEPS_PER_EPOCH} steps, one seed (a quick check that it "
                             "runs)")
    args = parser.parse_args(argv)
    if args.dataset == "cifar10" and args.data_dir is None:
        parser.error("--dataset cifar10 needs --data-dir (the folder holding cifar-10-batches-py)")
    setting = DATASETS[args.dataset]
    if args.epochs is None:
        args.epochs = SMOKE_EPOCHS if args.smoke else setting["epochs"]
    if args.batch_size is None:
        args.batch_size = setting["batch_size"]
    if args.seeds is None:
        args.seeds = [0] if args.smoke else list(SEEDS)
    return args


def main(argv=None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if device.type == "cpu":
        # Layers this small gain little from a second thread, and while other processes share the cores,
        # waiting for it made steps several times slower (README).
        torch.set_num_threads(1)
    loaders = {"digits": load_digits_data, "mnist1d": load_mnist1d_data,
               "cifar10": lambda: load_cifar10_data(args.data_dir)}
    data = tuple(t.to(device) for t in loaders[args.dataset]())
    setting = DATASETS[args.dataset]
    seeds = args.seeds
    print(f"{args.dataset}: {len(data[0])} training / {len(data[2])} test examples of shape "
          f"{tuple(data[0].shape[1:])}; batch {args.batch_size}, {args.epochs} epochs, seeds "
          f"{' '.join(map(str, seeds))}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads; step times: {'CPU time' if device.type == 'cpu' else 'wall clock'}")
    grids = setting["grids"]
    sgd_lrs = [lr for lr, _ in grids["SGD"]]
    print(f"FOOF and KFAC take SGD's learning rates ({', '.join(f'{lr:g}' for lr in sgd_lrs)}): with their default "
          f"graft='sgd' each layer steps as far as under SGD; "
          + "; ".join(f"{name} at damping {ds[0]:g} (its default) and {', '.join(f'{d:g}' for d in ds[1:])}"
                      for name, ds in DAMPINGS.items()))
    runs_per_model = sum(len(grid) for grid in grids.values())
    bar = tqdm(total=len(setting["models"]) * len(seeds) * runs_per_model * args.epochs
               * epoch_steps(len(data[0]), args), unit="step", file=sys.stderr, dynamic_ncols=True)
    results, targets, muon_parameters = {}, {}, {}
    for name, make_model in setting["models"].items():
        runs_per_seed = []
        for seed in seeds:
            args.seed = seed  # race's initial weights and batch order
            runs = [Run(optimizer, lr, damping) for optimizer, grid in grids.items() for lr, damping in grid]
            optimizers = race(f"{name}, seed {seed}", runs, make_model, data, args, device, bar)
            muon_parameters[name] = next(o.description for o in optimizers if isinstance(o, MuonWithAdamW))
            runs_per_seed.append(runs)
        results[name] = settings_of(runs_per_seed)
        targets[name] = args.target_loss if args.target_loss is not None else setting["target_loss"][name]
    bar.close()
    for name, settings in results.items():
        parameters = sum(p.numel() for p in setting["models"][name]().parameters())
        print(f"\n{name}: {parameters:,} parameters. {muon_parameters[name]}")
        print_tables(name, settings, args.epochs, targets[name], seeds)
    plot(results, targets, args.plot, f"{args.dataset}: batch {args.batch_size}, {args.epochs} epochs, seeds "
         f"{' '.join(map(str, seeds))}, {device}, {torch.get_num_threads()} CPU threads")
    print(f"\nplot: {args.plot.resolve()}")
    print(f"wall time: {time.perf_counter() - started:.0f} s (data, every run, tables and plot)")


if __name__ == "__main__":
    main()
