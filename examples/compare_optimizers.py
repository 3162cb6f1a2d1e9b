"""FOOF vs KFAC vs SGD with momentum vs Adam vs Muon on a small conv net, each over a small grid.

    python examples/compare_optimizers.py                       # scikit-learn's digits, bundled
    python examples/compare_optimizers.py --dataset cifar10 --data-dir ~/data --device cuda

Every run starts from the same initial weights and sees the same batches in the same order.
Prints a table (the best final training loss per optimizer, time per step, time to a target
training loss) and writes a PNG of the training loss per epoch and against wall-clock seconds on a
log scale (--plot).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastfoof  # noqa: E402
from data import channel_stats, normalise, read_cifar10  # noqa: E402
from models import SmallConvNet  # noqa: E402

# Learning rates swept per optimizer, about 3x apart (on digits, SGD at 0.6 and Adam at 3e-2 did worse
# than these). FOOF's and KFAC's damping λ = 1: parameters without a preconditioner (BatchNorm) then
# step with lr/λ = lr, as under SGD. KFAC uses Martens & Grosse's heuristic damping and the Monte Carlo
# Fisher (the paper's choice). Muon's grid pairs its learning rate with the AdamW rate of the
# parameters it does not take.
SWEEPS = {
    "SGD": [0.1, 0.3, 1.0],
    "Adam": [1e-3, 3e-3, 1e-2],
    "Muon": [0.01, 0.03, 0.1],
    "FOOF": [0.1, 0.3, 1.0],
    "KFAC": [0.1, 0.3, 1.0],
}
MUON_ADAMW_LR = {0.01: 1e-3, 0.03: 3e-3, 0.1: 1e-2}
MOMENTUM = 0.9
DAMPING = 1.0
DEFAULT_EPOCHS = {"digits": 10, "cifar10": 5}
DEFAULT_TARGET_LOSS = {"digits": 0.05, "cifar10": 1.0}
SMOKE_EPOCHS, SMOKE_STEPS_PER_EPOCH = 2, 3
COLORS = {"SGD": "tab:blue", "Adam": "tab:green", "Muon": "tab:purple", "FOOF": "tab:red", "KFAC": "tab:orange"}


class MuonWithAdamW:
    """torch.optim.Muon for the hidden weight matrices, AdamW for everything else, as the Muon reference
    does: conv filters are flattened to [O, C·k·k] (Muon takes 2-d parameters only, so it updates a 2-d
    view that shares the filter's storage), the classifier, biases and BatchNorm go to AdamW."""

    def __init__(self, model: torch.nn.Module, lr: float, adamw_lr: float):
        classifier = {id(p) for p in model.classifier.parameters()}
        self.flattened = []  # (filter, its [O, C·k·k] view that Muon updates)
        matrices, rest = [], []
        for name, p in model.named_parameters():
            if p.ndim >= 2 and id(p) not in classifier:
                view = p.detach().view(p.shape[0], -1)
                self.flattened.append((p, view))
                matrices.append(view)
            else:
                rest.append(p)
        self.muon = torch.optim.Muon(matrices, lr=lr, momentum=0.95, weight_decay=0.0)
        self.adamw = torch.optim.AdamW(rest, lr=adamw_lr, weight_decay=0.0)
        self.description = (f"Muon: {len(matrices)} conv filters and hidden weight matrices (flattened to "
                            f"[O, C·k·k]); AdamW: {len(rest)} others (classifier, biases, BatchNorm)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        for p, view in self.flattened:
            p.grad = view.grad = None

    def step(self) -> None:
        for p, view in self.flattened:
            view.grad = p.grad.reshape(view.shape)
        self.muon.step()
        self.adamw.step()


def make_optimizer(name: str, model: torch.nn.Module, lr: float):
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "Muon":
        return MuonWithAdamW(model, lr, MUON_ADAMW_LR[lr])
    if name == "KFAC":
        return fastfoof.KFAC(model, lr=lr, damping=DAMPING, damping_mode="heuristic", fisher="mc", momentum=MOMENTUM)
    return fastfoof.FOOF(model, lr=lr, damping=DAMPING, momentum=MOMENTUM)


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


def load_cifar10_data(data_dir: Path):
    x_train, y_train, x_test, y_test = read_cifar10(data_dir)
    mean, std = channel_stats(x_train)
    return normalise(x_train, mean, std), y_train, normalise(x_test, mean, std), y_test


@dataclass
class Run:
    optimizer: str
    lr: float
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # training time (steps only) at each epoch's end
    test_accuracy: float = math.nan
    seconds_per_step: float = math.nan  # median over the run's steps: robust to a busy machine

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


def train(run: Run, data, args, device: torch.device) -> Run:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = SmallConvNet(in_channels=x_train.shape[1], num_classes=10).to(device)
    optimizer = make_optimizer(run.optimizer, model, run.lr)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every run
    steps_per_epoch = len(x_train) // args.batch_size
    if args.smoke:
        steps_per_epoch = min(steps_per_epoch, SMOKE_STEPS_PER_EPOCH)
    step_seconds = []
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=f"{run.optimizer:4s} lr={run.lr:g}", file=sys.stderr,
               leave=False, dynamic_ncols=True)
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_train), generator=order)
        total = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size].to(device)
            x, y = x_train[idx], y_train[idx]
            sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            if isinstance(optimizer, fastfoof.KFAC):
                optimizer.backward_fisher(logits)  # G from labels sampled from the model
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            sync(device)
            step_seconds.append(time.perf_counter() - start)
            total += loss.detach()
            bar.update()
        run.epoch_losses.append(total.item() / steps_per_epoch)
        run.epoch_seconds.append(sum(step_seconds))
        bar.set_postfix(loss=f"{run.epoch_losses[-1]:.3g}")
        if not math.isfinite(run.epoch_losses[-1]):
            break  # diverged: this learning rate is out of the race
    bar.close()
    if isinstance(optimizer, MuonWithAdamW) and run.lr == SWEEPS["Muon"][0]:
        print(optimizer.description)
    run.seconds_per_step = statistics.median(step_seconds)
    run.test_accuracy = accuracy(model, x_test, y_test)
    return run


def loss_key(run: Run) -> float:
    """Lower is better; a diverged run (non-finite loss) never wins."""
    return run.final_loss if math.isfinite(run.final_loss) else math.inf


def best_runs(runs: list[Run]) -> dict[str, Run]:
    """Per optimizer, the run with the lowest final training loss."""
    best = {}
    for run in runs:
        if run.optimizer not in best or loss_key(run) < loss_key(best[run.optimizer]):
            best[run.optimizer] = run
    return best


def format_seconds(seconds: float) -> str:
    return f"{seconds:.2f}" if math.isfinite(seconds) else "never"


def print_table(runs: list[Run], epochs: int, target: float) -> None:
    print(f"\nAll runs ({epochs} epochs each):")
    print(f"{'optimizer':<10} {'lr':>8} {'final train loss':>17} {'test acc':>9} {'ms/step':>8} "
          f"{'s to target':>12}")
    for run in runs:
        print(f"{run.optimizer:<10} {run.lr:>8g} {run.final_loss:>17.3e} {run.test_accuracy:>9.2%} "
              f"{1e3 * run.seconds_per_step:>8.2f} {format_seconds(run.seconds_to(target)):>12}")
    best = best_runs(runs)
    sgd_step = best["SGD"].seconds_per_step
    print(f"\nBest learning rate per optimizer (lowest final training loss; target loss {target:g}):")
    print(f"{'optimizer':<10} {'best lr':>8} {'final train loss':>17} {'test acc':>9} {'ms/step':>8} "
          f"{'step / SGD':>11} {'s to target':>12}")
    for name, run in sorted(best.items(), key=lambda item: loss_key(item[1])):
        print(f"{name:<10} {run.lr:>8g} {run.final_loss:>17.3e} {run.test_accuracy:>9.2%} "
              f"{1e3 * run.seconds_per_step:>8.2f} {run.seconds_per_step / sgd_step:>10.2f}x "
              f"{format_seconds(run.seconds_to(target)):>12}")


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(runs)
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in runs:
        is_best = best[run.optimizer] is run
        style = dict(color=COLORS[run.optimizer], alpha=1.0 if is_best else 0.3, linewidth=2.0 if is_best else 1.0,
                     marker="o" if is_best else None, markersize=3)
        by_epoch.plot(range(1, len(run.epoch_losses) + 1), run.epoch_losses,
                      label=f"{run.optimizer} lr={run.lr:g}" + (" (best)" if is_best else ""), **style)
        by_time.plot(run.epoch_seconds, run.epoch_losses, **style)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training seconds (optimizer steps, wall clock)")
    by_epoch.set_ylabel("training loss (mean over the epoch)")
    for ax in (by_epoch, by_time):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    by_epoch.legend(fontsize=6, ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--data-dir", type=Path, help="folder holding cifar-10-batches-py (for --dataset cifar10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, help="default: 10 for digits, 5 for cifar10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("compare_optimizers.png"), help="where the PNG goes")
    parser.add_argument("--target-loss", type=float,
                        help="training loss whose time to reach is reported (default: 0.05 digits, 1.0 cifar10)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_EPOCHS} epochs of {SMOKE_STEPS_PER_EPOCH} steps (a quick check that it runs)")
    args = parser.parse_args(argv)
    if args.dataset == "cifar10" and args.data_dir is None:
        parser.error("--dataset cifar10 needs --data-dir (the folder holding cifar-10-batches-py)")
    if args.epochs is None:
        args.epochs = SMOKE_EPOCHS if args.smoke else DEFAULT_EPOCHS[args.dataset]
    if args.target_loss is None:
        args.target_loss = DEFAULT_TARGET_LOSS[args.dataset]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    data = load_digits_data() if args.dataset == "digits" else load_cifar10_data(args.data_dir)
    data = tuple(t.to(device) for t in data)
    print(f"{args.dataset}: {len(data[0])} training / {len(data[2])} test images of shape "
          f"{tuple(data[0].shape[1:])}; batch {args.batch_size}, {args.epochs} epochs, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    runs = [train(Run(name, lr), data, args, device) for name, lrs in SWEEPS.items() for lr in lrs]
    print_table(runs, args.epochs, args.target_loss)
    plot(runs, args.plot, f"{args.dataset}: SmallConvNet, batch {args.batch_size}")
    print(f"\nplot: {args.plot.resolve()}")


if __name__ == "__main__":
    main()
