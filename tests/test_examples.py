"""The examples run end to end in their --smoke modes and print what they promise."""
from __future__ import annotations

import inspect
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastfoof

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import compare_optimizers  # noqa: E402  (the grids and settings that the printed tables must show)
import sweep_graft  # noqa: E402
import tune_foof  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALLCONV_MUON = "Muon: 3 conv filters (flattened to [O, C·k·k]); AdamW: 2 classifier parameters, 6 normalisation parameters"
# The examples pick CUDA when present; CPU always runs (and is the device where runs are bit-reproducible).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_example(script: str, *args: str, cwd: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    if expect_ok:
        assert result.returncode == 0, f"{script} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def table_rows(stdout: str, title: str) -> list[list[str]]:
    """The whitespace-split rows of the table printed under the line that starts with `title`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 2  # title, header
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def approx_ratio(ms: float, baseline_ms: float):
    """ms / baseline_ms as printed with two decimals, from two numbers printed with two decimals."""
    ratio = ms / baseline_ms
    return pytest.approx(ratio, abs=0.005 + ratio * (0.005 / ms + 0.005 / baseline_ms))


def loss_value(text: str) -> float:
    return math.inf if text == "diverged" else float(text)


def percent(text: str) -> float:
    return float(text.rstrip("%"))


def check_comparison(stdout: str, dataset: str, model: str, muon: str, plot: Path, seeds: int = 1) -> None:
    """One model's two tables: every grid point once (median, min and max over the seeds), then the best of
    each optimizer."""
    grids = compare_optimizers.DATASETS[dataset]["grids"]
    runs = table_rows(stdout, f"{model}: every setting over seeds {' '.join(map(str, range(seeds)))} (")
    points = sorted((r[0], float(r[1]), None if r[2] == "-" else float(r[2])) for r in runs)
    assert points == sorted((name, lr, damping) for name, grid in grids.items() for lr, damping in grid)
    for row in runs:
        loss, low, high = map(loss_value, row[3:6])
        assert math.isfinite(loss) and low <= loss <= high, row
        accuracy, low, high = map(percent, row[6:9])
        assert 0 <= low <= accuracy <= high <= 100, row
        if seeds == 1:
            assert row[3] == row[4] == row[5] and row[6] == row[7] == row[8], row
        assert float(row[9]) > 0 and float(row[10]) > 0, row
        assert row[11] == "never" or float(row[11]) > 0
    best = table_rows(stdout, f"{model}: best setting")
    assert sorted(row[0] for row in best) == sorted(grids)
    losses = [loss_value(row[3]) for row in best]
    assert losses == sorted(losses), "the best-per-optimizer table is sorted by median loss"
    sgd_mean_ms = float(next(row for row in best if row[0] == "SGD")[9])
    for row in best:
        own = [r for r in runs if r[0] == row[0]]
        assert loss_value(row[3]) == min(loss_value(r[3]) for r in own)
        assert row[1:9] in [r[1:9] for r in own]  # the best setting's lr, damping, losses and accuracies
        assert row[9] in [r[10] for r in own]  # and its amortised step
        assert float(row[10].rstrip("x")) == approx_ratio(float(row[9]), sgd_mean_ms)
        assert row[11] in [r[11] for r in own]
    assert f"{model}: " in stdout and f"parameters. {muon}\n" in stdout
    sgd_lrs = ", ".join(f"{lr:g}" for lr, _ in grids["SGD"])
    assert f"FOOF and KFAC take SGD's learning rates ({sgd_lrs})" in stdout
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_foof_and_kfac_take_sgds_learning_rates():
    """The issue's grid: SGD's lrs at the default damping and one other."""
    defaults = {name: inspect.signature(cls).parameters["damping"].default
                for name, cls in (("FOOF", fastfoof.FOOF), ("KFAC", fastfoof.KFAC))}
    assert defaults == {"FOOF": 3.0, "KFAC": 1.0}
    for name in ("FOOF", "KFAC"):
        dampings = compare_optimizers.DAMPINGS[name]
        assert dampings[0] == defaults[name] and len(dampings) == len(set(dampings)) == 2, name
    for dataset, setting in compare_optimizers.DATASETS.items():
        grids = setting["grids"]
        sgd_lrs = [lr for lr, _ in grids["SGD"]]
        for name in ("FOOF", "KFAC"):
            assert sorted(grids[name]) == sorted((lr, d) for lr in sgd_lrs for d in compare_optimizers.DAMPINGS[name]), \
                (dataset, name)
    assert compare_optimizers.SEEDS == (0, 1, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_compare_optimizers_smoke_on_digits(tmp_path, device):
    result = run_example("compare_optimizers.py", "--smoke", "--device", device, "--plot", "plots/loss.png",
                         "--seeds", "0", "1", cwd=tmp_path)
    assert result.stdout.startswith("digits: 1437 training / 360 test examples of shape (1, 8, 8); batch 64")
    assert f"seeds 0 1, device {device}" in result.stdout.splitlines()[0]
    check_comparison(result.stdout, "digits", "SmallConvNet", SMALLCONV_MUON, tmp_path / "plots" / "loss.png", seeds=2)


def test_compare_optimizers_smoke_on_mnist1d(tmp_path):
    result = run_example("compare_optimizers.py", "--smoke", "--dataset", "mnist1d", "--device", "cpu", cwd=tmp_path)
    assert result.stdout.startswith("mnist1d: 4000 training / 1000 test examples of shape (1, 40); batch 100")
    assert "seeds 0, device cpu" in result.stdout.splitlines()[0]
    assert "1 CPU threads" in result.stdout.splitlines()[0]
    for model, parameters, muon in (
            ("CNN", 5_210, "Muon: 3 conv filters (flattened to [O, C·k·k]); AdamW: 2 classifier parameters, 3 biases"),
            ("MLP", 15_210, "Muon: 2 hidden weight matrices; AdamW: 2 classifier parameters, 2 biases")):
        assert f"\n{model}: {parameters:,} parameters." in result.stdout
        check_comparison(result.stdout, "mnist1d", model, muon, tmp_path / "compare_optimizers.png")
    assert [p.name for p in tmp_path.iterdir()] == ["compare_optimizers.png"], "MNIST-1D is neither cached nor downloaded"


def fake_run(optimizer: str, lr: float, damping, losses: list[float]):
    run = compare_optimizers.Run(optimizer, lr, damping, epoch_losses=losses, step_seconds=[1e-3] * 4 * len(losses),
                                 steps_per_epoch=4, test_accuracy=0.9)
    return run


def test_plot_draws_every_faint_setting_in_its_optimizers_colour():
    """Every setting that is not its optimizer's best is a faint line in that optimizer's colour, and the
    legend names each optimizer's faint lines."""
    from matplotlib.colors import to_rgba

    grid = [("SGD", 0.1, None), ("SGD", 0.3, None), ("FOOF", 0.1, 1.0), ("FOOF", 0.1, 0.1), ("KFAC", 0.1, 1.0),
            ("KFAC", 0.3, 1.0)]
    runs_per_seed = [[fake_run(name, lr, damping, [2.0 / (k + 1 + seed), 1.0 / (k + 2 + seed), 0.5 / (k + 3)])
                      for k, (name, lr, damping) in enumerate(grid)] for seed in range(3)]
    settings = compare_optimizers.settings_of(runs_per_seed)
    best = compare_optimizers.best_settings(settings)
    fig = compare_optimizers.figure({"net": settings}, {"net": 0.1}, "title")
    try:
        by_epoch, by_time = fig.axes[:2]
        faint = [setting for setting in settings if best[setting.optimizer] is not setting]
        assert len(faint) == 3
        for setting in faint:
            lines = [line for line in by_epoch.lines if list(line.get_ydata()) == setting.epoch_losses]
            assert len(lines) == 1 and lines[0].get_alpha() < 1
            assert to_rgba(lines[0].get_color())[:3] == to_rgba(compare_optimizers.COLORS[setting.optimizer])[:3]
        legend = by_time.get_legend()
        labels = [text.get_text() for text in legend.get_texts()]
        for name in ("SGD", "FOOF", "KFAC"):
            handle = legend.legend_handles[labels.index(f"{name}: its other settings (faint)")]
            assert to_rgba(handle.get_color())[:3] == to_rgba(compare_optimizers.COLORS[name])[:3]
        assert "faint: its other settings, in its optimizer's colour" in by_epoch.get_title()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def write_fake_cifar10(folder: Path, per_batch: int) -> None:
    """The python-pickle layout of cifar-10-batches-py, with random images."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist(), "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_compare_optimizers_reads_cifar10_batches(tmp_path):
    write_fake_cifar10(tmp_path / "data" / "cifar-10-batches-py", per_batch=16)
    result = run_example("compare_optimizers.py", "--smoke", "--dataset", "cifar10", "--data-dir", "data",
                         "--batch-size", "8", "--device", "cpu", cwd=tmp_path)
    assert result.stdout.startswith("cifar10: 80 training / 16 test examples of shape (3, 32, 32)")
    check_comparison(result.stdout, "cifar10", "SmallConvNet", SMALLCONV_MUON, tmp_path / "compare_optimizers.png")


def test_missing_cifar10_is_a_clear_error(tmp_path):
    result = run_example("compare_optimizers.py", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                         cwd=tmp_path, expect_ok=False)
    assert result.returncode != 0
    assert "CIFAR-10 not found" in result.stderr and "data_batch_1" in result.stderr


def training_losses(line: str) -> list[float]:
    """The per-seed numbers after "final training loss" in a line of tune_foof.py."""
    return [float(v) for v in line.split("final training loss ")[1].split(",")[0].split()]


def grid_cells(line: str, width: int = 18, label: int = 14) -> list[str]:
    """The fixed-width cells of a row of tune_foof.py's settings grid, after its label."""
    return [line[i:i + width].strip() for i in range(label, len(line), width)]


def test_tune_foof_settings_smoke(tmp_path):
    result = run_example("tune_foof.py", "settings", "--smoke", cwd=tmp_path)
    lines = result.stdout.splitlines()
    lr, damping = tune_foof.SNIPPET["lr"], tune_foof.SNIPPET["damping"]
    snippet = next(line for line in lines if line.startswith(f"Use snippet FOOF(lr={lr}, damping={damping}, "))
    sgd = next(line for line in lines if line.startswith(f"SGD(lr={tune_foof.SGD_LR}, momentum=0.9): "))
    wins = sum(f < s for f, s in zip(training_losses(snippet), training_losses(sgd)))
    assert f"lower than SGD's on {wins} of 1 seeds" in result.stdout
    assert "graft='sgd', the default: lr is SGD's" in result.stdout
    # With one seed the grid's cell is that seed's loss: the snippet's row, at the snippet's lr.
    header = next(line for line in lines if line.strip().startswith("lr="))
    assert grid_cells(header) == [f"lr={lr:g}" for lr in tune_foof.SETTINGS_LRS]
    column = tune_foof.SETTINGS_LRS.index(lr)
    rows = {line[:14].strip(): grid_cells(line) for line in lines if line.startswith(("FOOF λ=", "SGD ", "λ="))}
    snippet_cell = rows[f"FOOF λ={damping:g}"][column]
    assert float(snippet_cell.split()[0]) == pytest.approx(training_losses(snippet)[0], rel=1e-2)
    assert float(rows["SGD"][column].split()[0]) == pytest.approx(training_losses(sgd)[0], rel=1e-2)
    # FOOF and SGD share the lr grid (grafting: FOOF's lr is SGD's), and the ratio rows divide the two.
    for d in tune_foof.SETTINGS_DAMPINGS:
        foof, ratios = rows[f"FOOF λ={d:g}"], rows[f"λ={d:g} ÷ SGD"]
        assert len(foof) == len(ratios) == len(rows["SGD"]) == len(tune_foof.SETTINGS_LRS)
        for f, s, r in zip(foof, rows["SGD"], ratios):
            if "diverged" not in (f, s):
                assert float(r) == pytest.approx(float(f.split()[0]) / float(s.split()[0]), rel=0.02, abs=0.01)
    assert len([line for line in lines if line.startswith("FOOF λ=")]) == len(tune_foof.SETTINGS_DAMPINGS)


def test_readme_use_snippet_is_the_swept_one():
    """The README's snippet is tune_foof's SNIPPET: its lr, and the default damping it leaves out."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    lr, damping = tune_foof.SNIPPET["lr"], tune_foof.SNIPPET["damping"]
    assert damping == inspect.signature(fastfoof.FOOF).parameters["damping"].default
    assert f"opt = fastfoof.FOOF(model, lr={lr}, momentum=0.9)" in readme


def test_tune_foof_schedule_smoke(tmp_path):
    result = run_example("tune_foof.py", "schedule", "--smoke", cwd=tmp_path)
    rows = table_rows(result.stdout, "schedule:")
    assert [row[0] for row in rows] == ["SGD"] + ["FOOF"] * len(tune_foof.SCHEDULES)
    assert [" ".join(row[3:5]) for row in rows[1:]] == [f"T={t} S={s}" for t, s in tune_foof.SCHEDULES]
    sgd_ms = float(rows[0][-2])
    assert rows[0][-1] == "1.00x"
    for row in rows:
        assert math.isfinite(float(row[-4])) and float(row[-2]) > 0
        assert float(row[-1].rstrip("x")) == approx_ratio(float(row[-2]), sgd_ms)


EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): train loss (\S+) acc .* test loss (\S+) acc", re.M)


@pytest.mark.parametrize("device", DEVICES)
def test_train_resnet_smoke_resumes(tmp_path, device):
    straight = run_example("train_resnet_cifar.py", "--smoke", "--device", device, "--checkpoint", "straight.pt",
                           cwd=tmp_path)
    epochs = EPOCH_LINE.findall(straight.stdout)
    assert [(e[0], e[1]) for e in epochs] == [("1", "2"), ("2", "2")]
    assert all(math.isfinite(float(e[2])) and math.isfinite(float(e[3])) for e in epochs)
    assert "warm-up: FOOF statistics from 2 batches" in straight.stdout
    assert (tmp_path / "straight.pt").is_file()

    first = run_example("train_resnet_cifar.py", "--smoke", "--device", device, "--checkpoint", "ckpt/run.pt",
                        "--stop-after", "1", cwd=tmp_path)
    assert [e[0] for e in EPOCH_LINE.findall(first.stdout)] == ["1"]
    resumed = run_example("train_resnet_cifar.py", "--smoke", "--device", device, "--checkpoint", "ckpt/run.pt",
                          "--resume", cwd=tmp_path)
    assert "resumed from ckpt/run.pt after epoch 1" in resumed.stdout
    assert "warm-up" not in resumed.stdout
    resumed_epochs = EPOCH_LINE.findall(resumed.stdout)
    assert [e[0] for e in resumed_epochs] == ["2"]
    if device == "cpu":
        # Model, FOOF state (EMA, P, momentum, step count), schedule and data order all resume: the
        # interrupted run's second epoch is the straight run's, bit for bit. (On CUDA, cuDNN's choice of
        # algorithms differs between processes, and bf16 autocast rounds differently.)
        assert resumed_epochs[0][2:] == epochs[1][2:]
    else:
        assert "bf16 autocast" in straight.stdout
        assert float(resumed_epochs[0][2]) == pytest.approx(float(epochs[1][2]), rel=0.05)


@pytest.mark.parametrize("args, message", [
    ((), "--data-dir is required"),
    (("--smoke", "--resume", "--checkpoint", "missing.pt"), "no checkpoint at missing.pt"),
])
def test_train_resnet_argument_errors(tmp_path, args, message):
    result = run_example("train_resnet_cifar.py", *args, cwd=tmp_path, expect_ok=False)
    assert result.returncode != 0 and message in result.stderr


SWEEP_RECORD_KEYS = {"net", "held_out", "group", "held_out_schedule", "dataset", "schedule", "lr", "seed", "optimizer", "epochs",
                     "batch_size", "steps", "initial_train_loss", "final_train_loss", "final_train_accuracy",
                     "test_accuracy", "last_epoch_mean_loss", "diverged", "seconds_per_step", "total_step_seconds"}


def test_sweep_graft_kfac_is_kfacs_defaults():
    """"KFAC" in the sweep is fastfoof.KFAC with nothing but SGD's lr and momentum: its own defaults (damping 1,
    graft="sgd"), whatever they are, and the constructor the report prints."""
    model = sweep_graft.NETS["SmallConvNet (digits)"][1]()
    optimizer = sweep_graft.make_optimizer("KFAC", model, 0.1)
    defaults = inspect.signature(fastfoof.KFAC).parameters
    assert type(optimizer) is fastfoof.KFAC and optimizer.damping == defaults["damping"].default == 1.0
    assert optimizer.graft == defaults["graft"].default == "sgd"
    assert [(g["lr"], g["momentum"]) for g in optimizer.param_groups] == [(0.1, sweep_graft.MOMENTUM)]
    assert sweep_graft.describe("KFAC") == f"fastfoof.KFAC(model, lr=lr, momentum={sweep_graft.MOMENTUM})"
    record = sweep_graft.train("SmallConvNet (digits)", "constant", 0.1, 0, "KFAC", epochs=1, steps_per_epoch=3)
    assert record["optimizer"] == "KFAC" and record["steps"] == 3
    assert record["final_train_loss"] < record["initial_train_loss"]


def test_sweep_graft_tiny_end_to_end(tmp_path):
    """The sweep at a tiny size: every run in the JSON with the machine, and the markdown generated from it."""
    nets, schedules, lrs = ["SmallConvNet (digits)", "LayerNorm-GELU MLP (digits)"], ["constant", "step"], [0.1, 0.3]
    run_example("sweep_graft.py", "run", "-o", "out/sweep.json", "--jobs", "1", "--nets", *nets, "--schedules",
                *schedules, "--lrs", *map(str, lrs), "--seeds", "0", "--epochs", "1", "--steps-per-epoch", "2",
                cwd=tmp_path)
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    machine = data["machine"]
    assert machine["torch"] == torch.__version__ and machine["cores"] >= 1 and machine["cpu"] and machine["date"]
    runs = data["runs"]
    assert len(runs) == len(nets) * len(schedules) * len(lrs) * len(sweep_graft.OPTIMIZERS)
    assert sorted({(r["net"], r["schedule"], r["lr"], r["optimizer"]) for r in runs}) == sorted(
        (n, s, lr, o) for n in nets for s in schedules for lr in lrs for o in sweep_graft.OPTIMIZERS)
    for r in runs:
        assert set(r) == SWEEP_RECORD_KEYS, r
        assert r["steps"] == 2 and r["seconds_per_step"] > 0 and math.isfinite(r["final_train_loss"])
        assert r["held_out"] == (r["net"] not in sweep_graft.IN_REPO) and r["group"] == sweep_graft.GROUPS[r["net"]]
        assert r["held_out_schedule"] == (r["schedule"] in sweep_graft.HELD_OUT_SCHEDULES)
    for n in nets:  # the same initial weights for every optimizer and lr
        assert len({r["initial_train_loss"] for r in runs if r["net"] == n}) == 1
    run_example("sweep_graft.py", "report", "out/sweep.json", "-o", "out/sweep.md", cwd=tmp_path)
    markdown = (tmp_path / "out" / "sweep.md").read_text()
    assert machine["cpu"] in markdown and f"torch {machine['torch']}" in markdown
    # summary: in-repo and held-out nets x in-repo (constant) and held-out (step) schedules, at SGD's best lr
    # and at every lr
    assert markdown.count("| FOOF | ") == 4 * 2
    for n in nets:
        for s in schedules:
            loss = {(r["lr"], r["optimizer"]): r["final_train_loss"] for r in runs
                    if r["net"] == n and r["schedule"] == s}
            best = min(lrs, key=lambda lr: loss[(lr, "SGD")])
            row = f"| {n} | {s} | {best:g} | {loss[(best, 'SGD')]:.2e} | {loss[(best, 'FOOF')]:.2e} | "
            assert row in markdown, row


def test_a_diverged_kfac_run_leaves_the_race_instead_of_raising():
    """Non-finite logits: KFAC's backward_fisher draws labels anyway (DESIGN §1.3: nothing raises on bad
    numbers), and the step's NaN loss takes the run out of the race at the epoch's end."""
    torch.manual_seed(0)
    model = compare_optimizers.MNIST1DMLP()
    optimizer = compare_optimizers.make_optimizer("KFAC", model, 0.1, 1.0)
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    with torch.no_grad():
        model.classifier.weight.fill_(math.inf)
    loss = compare_optimizers.train_step(model, optimizer, x, y)
    assert math.isnan(loss.item())


@pytest.mark.parametrize("net, description", [
    ("MLP", "Muon: 2 hidden weight matrices; AdamW: 2 classifier parameters, 2 biases"),
    ("SmallConvNet", "Muon: 3 conv filters (flattened to [O, C·k·k]); AdamW: 2 classifier parameters, "
                     "6 normalisation parameters"),
])
def test_muon_says_what_it_takes_of_each_net(net, description):
    """The comparison names what Muon and AdamW take of the net as it is (an MLP has no conv filters)."""
    models = {**compare_optimizers.DATASETS["mnist1d"]["models"], **compare_optimizers.DATASETS["digits"]["models"]}
    assert compare_optimizers.MuonWithAdamW(models[net](), 0.01, 0.001).description == description


def claims_rows(stdout: str) -> list[list[str]]:
    """The rows of paper.py's claims table: [claim, paper, measured here, holds?]."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("claims:")) + 1
    return [line.split(" | ") for line in lines[start:] if " | " in line]


def check_paper_output(stdout: str, out: Path, dataset: str) -> None:
    import paper

    rows = table_rows(stdout, f"1A/2B/3A/4B {dataset}, mini-batch")
    assert sorted(row[0].rstrip("*") for row in rows) == sorted(paper.EXPERIMENTS["mini-batch"])
    for row in rows:  # the smoke run's grids: two points each
        lr_axis, damping_axis = paper.first_grid("mini-batch", row[0].rstrip("*"), paper.SMOKE)
        assert float(row[1]) in [pytest.approx(lr) for lr in lr_axis], row
        assert (None if row[2] == "-" else float(row[2])) in damping_axis, row
        assert float(row[4]) == float(row[3])  # one seed: the mean is seed 0's loss
    claims = [row for row in claims_rows(stdout) if row[0].startswith(dataset + " ")]
    assert len(claims) == 11 and all(row[3] in ("holds", "does not hold") for row in claims), claims
    for figure in ("fig1.png", "fig2.png", "fig3.png", "fig4.png"):
        assert (out / figure).read_bytes()[:8] == PNG_MAGIC


def test_paper_smoke_on_mnist1d(tmp_path):
    result = run_example("paper.py", "--smoke", "--out", "figures", cwd=tmp_path)
    assert result.stdout.startswith("paper.py: MNIST-1D (300 training examples of 40); MLP width 12")
    check_paper_output(result.stdout, tmp_path / "figures", "MNIST-1D")
    assert [p.name for p in tmp_path.iterdir()] == ["figures"], "MNIST-1D is neither cached nor downloaded"


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_paper_reads_mnist_and_fashion_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("data/MNIST/raw", "data/fashion"):
        write_idx(tmp_path / folder / "train-images-idx3-ubyte", rng.integers(0, 256, (310, 28, 28)))
        write_idx(tmp_path / folder / "train-labels-idx1-ubyte", rng.integers(0, 10, 310))
    result = run_example("paper.py", "--smoke", "--data-dir", "data", cwd=tmp_path)
    assert result.stdout.startswith("paper.py: MNIST (300 training examples of 784), Fashion-MNIST (300 training "
                                    "examples of 784)")
    for dataset in ("MNIST", "Fashion-MNIST"):
        check_paper_output(result.stdout, tmp_path / "paper", dataset)
    missing = run_example("paper.py", "--smoke", "--data-dir", "nowhere", cwd=tmp_path, expect_ok=False)
    assert missing.returncode != 0 and "no MNIST or Fashion-MNIST under nowhere" in missing.stderr
