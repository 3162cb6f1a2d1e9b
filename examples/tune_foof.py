"""The sweeps behind the README's Use snippet and tuning guide, on a net that is not the README example's.

    python examples/tune_foof.py settings   # FOOF's lr x damping against SGD at the same lrs, 3 seeds
    python examples/tune_foof.py schedule   # T and S: final loss and amortised step time against SGD

FOOF runs with its default graft="sgd": each preconditioned layer's update is rescaled to its
gradient's norm, so FOOF's lr is SGD's learning rate and the damping λ only shapes the direction
(small: preconditions more; large: closer to SGD's direction). `settings` therefore puts FOOF and SGD
on the same lr grid, one column per lr, and FOOF's rows are its dampings.

The net is a standard BatchNorm CNN, ResNet-18 (narrow: width 8), on scikit-learn's digits. Within a
seed every run starts from the same weights and sees the same batches, and the runs take turns step
by step (compare_optimizers.race), so that their step times compare.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastfoof  # noqa: E402
from compare_optimizers import MOMENTUM, Run, epoch_steps, load_digits_data, loss_key, race  # noqa: E402
from models import resnet18  # noqa: E402

SNIPPET = dict(lr=0.1, damping=3.0)  # the README's Use snippet, FOOF(model, lr=0.1, momentum=0.9): damping its default
SGD_LR = 0.1  # the reference: torch.optim.SGD(lr=0.1, momentum=0.9), the snippet's lr
SETTINGS_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)  # FOOF's and SGD's: with grafting, FOOF's lr is SGD's
SETTINGS_DAMPINGS = (1.0, 3.0, 10.0)
SEEDS = (0, 1, 2)
# (T, S): inverting every 10 steps from every step's statistics, the default, S = T, and the paper's
# ResNet setting (once per epoch there; T=500 is 23 of these digits epochs).
SCHEDULES = ((10, 10), (100, 10), (100, 100), (500, 10))
DEFAULT_EPOCHS = {"settings": 10, "schedule": 30}
BATCH_SIZE = 64
WIDTH = 8


class FOOFRun(Run):
    """A run whose label names FOOF's T and S."""

    @property
    def label(self) -> str:
        return f"{super().label} T={self.period} S={self.stats_steps}" if self.optimizer == "FOOF" else super().label


def make_model() -> torch.nn.Module:
    return resnet18(num_classes=10, in_channels=1, width=WIDTH)


def optimizer_for(run: FOOFRun, model: torch.nn.Module):
    if run.optimizer == "SGD":
        return torch.optim.SGD(model.parameters(), lr=run.lr, momentum=MOMENTUM)
    return fastfoof.FOOF(model, lr=run.lr, damping=run.damping, momentum=MOMENTUM, inv_period=run.period,
                         stats_steps=run.stats_steps)


def train_all(runs_per_seed, seeds, args, data, title: str) -> list[list[FOOFRun]]:
    """runs_per_seed() -> fresh runs; each seed's runs race on that seed's initial weights and batches."""
    results = [runs_per_seed() for _ in seeds]
    bar = tqdm(total=sum(len(runs) for runs in results) * args.epochs * epoch_steps(len(data[0]), args),
               unit="step", file=sys.stderr, dynamic_ncols=True)
    for seed, runs in zip(seeds, results):
        args.seed = seed
        race(f"{title}, seed {seed}", runs, make_model, data, args, torch.device("cpu"), bar, optimizer_for)
    bar.close()
    return results


def median_loss(runs: list[FOOFRun]) -> float:
    """The median final training loss over the seeds; a diverged seed counts as inf."""
    return statistics.median(loss_key(run) for run in runs)


def cell(runs: list[FOOFRun]) -> str:
    """'median loss (mean test accuracy)', or 'diverged' where the median is."""
    loss = median_loss(runs)
    return f"{loss:.2e} ({mean_accuracy(runs):.1%})" if math.isfinite(loss) else "diverged"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if math.isfinite(a) and math.isfinite(b) else "—"


def mean_accuracy(runs: list[FOOFRun]) -> float:
    return statistics.mean(run.test_accuracy for run in runs)


def settings(args, data) -> None:
    def runs_per_seed():
        return ([FOOFRun("SGD", lr, None) for lr in SETTINGS_LRS]
                + [FOOFRun("FOOF", lr, damping) for damping in SETTINGS_DAMPINGS for lr in SETTINGS_LRS])

    seeds = SEEDS[:1] if args.smoke else SEEDS
    results = train_all(runs_per_seed, seeds, args, data, "settings")
    by_setting = {}  # (optimizer, lr, damping) -> that run of every seed
    for runs in results:
        for run in runs:
            by_setting.setdefault((run.optimizer, run.lr, run.damping), []).append(run)
    print(f"\nsettings: FOOF(lr, damping, momentum={MOMENTUM}) (graft='sgd', the default: lr is SGD's) and "
          f"SGD(lr, momentum={MOMENTUM}) at the same lrs; ResNet-18 (width {WIDTH}, BatchNorm) on digits, "
          f"{args.epochs} epochs of batch {BATCH_SIZE}, seeds {' '.join(map(str, seeds))}")
    print("median final training loss over the seeds (mean test accuracy):")
    print(f"{'':<14}" + "".join(f"{f'lr={lr:g}':>18}" for lr in SETTINGS_LRS))
    for damping in SETTINGS_DAMPINGS:
        cells = [by_setting[("FOOF", lr, damping)] for lr in SETTINGS_LRS]
        print(f"{f'FOOF λ={damping:g}':<14}" + "".join(f"{cell(runs):>18}" for runs in cells))
    sgd_cells = {lr: by_setting[("SGD", lr, None)] for lr in SETTINGS_LRS}
    print(f"{'SGD':<14}" + "".join(f"{cell(sgd_cells[lr]):>18}" for lr in SETTINGS_LRS))
    print("FOOF's median loss ÷ SGD's at the same lr (below 1: FOOF lower):")
    for damping in SETTINGS_DAMPINGS:
        print(f"{f'λ={damping:g} ÷ SGD':<14}" + "".join(
            f"{ratio(median_loss(by_setting[('FOOF', lr, damping)]), median_loss(sgd_cells[lr])):>18}"
            for lr in SETTINGS_LRS))
    snippet = by_setting[("FOOF", SNIPPET["lr"], SNIPPET["damping"])]
    sgd = sgd_cells[SGD_LR]
    wins = sum(loss_key(f) < loss_key(s) for f, s in zip(snippet, sgd))
    print(f"\nUse snippet FOOF(lr={SNIPPET['lr']}, damping={SNIPPET['damping']}, momentum={MOMENTUM}): final "
          f"training loss {' '.join(f'{run.final_loss:.2e}' for run in snippet)}, test accuracy "
          f"{' '.join(f'{run.test_accuracy:.1%}' for run in snippet)}")
    print(f"SGD(lr={SGD_LR:g}, momentum={MOMENTUM}): final training loss "
          f"{' '.join(f'{run.final_loss:.2e}' for run in sgd)}, test accuracy "
          f"{' '.join(f'{run.test_accuracy:.1%}' for run in sgd)}")
    print(f"the snippet's final training loss is lower than SGD's on {wins} of {len(seeds)} seeds")


def schedule(args, data) -> None:
    def runs_per_seed():
        return [FOOFRun("SGD", SGD_LR, None)] + [FOOFRun("FOOF", SNIPPET["lr"], SNIPPET["damping"], period=period,
                                                          stats_steps=stats_steps) for period, stats_steps in SCHEDULES]

    seed = SEEDS[0]
    runs = train_all(runs_per_seed, (seed,), args, data, "schedule")[0]
    sgd = runs[0]
    print(f"\nschedule: FOOF(lr={SNIPPET['lr']:g}, damping={SNIPPET['damping']:g}, momentum={MOMENTUM}) by T and S "
          f"against SGD(lr={SGD_LR:g}, momentum={MOMENTUM}); ResNet-18 (width {WIDTH}) on digits, {args.epochs} "
          f"epochs of batch {BATCH_SIZE}, seed {seed}; amortised step: the median plain, observed and inverting "
          f"step, weighted by their shares of a period, after the first epoch")
    print(f"{'run':<28} {'final train loss':>17} {'test acc':>9} {'amort. ms':>10} {'step / SGD':>11}")
    for run in runs:
        print(f"{run.label:<28} {run.final_loss:>17.3e} {run.test_accuracy:>9.2%} {1e3 * run.amortised_step:>10.2f} "
              f"{run.amortised_step / sgd.amortised_step:>10.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", choices=("settings", "schedule"))
    parser.add_argument("--epochs", type=int, help=f"default: {DEFAULT_EPOCHS}")
    parser.add_argument("--smoke", action="store_true", help="2 epochs of 3 steps, one seed (a quick check that it runs)")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.smoke else DEFAULT_EPOCHS[args.sweep])
    args.batch_size = BATCH_SIZE
    torch.set_num_threads(1)  # as compare_optimizers on digits: a layer this small gains nothing from a second
    data = load_digits_data()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread")
    (settings if args.sweep == "settings" else schedule)(args, data)


if __name__ == "__main__":
    main()
