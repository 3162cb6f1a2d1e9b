"""The examples run end to end in their --smoke modes and print what they promise."""
from __future__ import annotations

import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import compare_optimizers  # noqa: E402  (the grids and settings that the printed tables must show)
import tune_foof  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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


def check_comparison(stdout: str, dataset: str, model: str, muon_matrices: int, plot: Path) -> None:
    """One model's two tables: every grid point once, then the best of each optimizer."""
    grids = compare_optimizers.DATASETS[dataset]["grids"]
    runs = table_rows(stdout, f"{model}: all runs")
    points = sorted((r[0], float(r[1]), None if r[2] == "-" else float(r[2])) for r in runs)
    assert points == sorted((name, lr, damping) for name, grid in grids.items() for lr, damping in grid)
    for row in runs:
        assert math.isfinite(float(row[3])) and 0 <= float(row[4].rstrip("%")) <= 100, row
        assert float(row[5]) > 0 and float(row[6]) > 0, row
        assert row[7] == "never" or float(row[7]) > 0
    best = table_rows(stdout, f"{model}: best setting")
    assert sorted(row[0] for row in best) == sorted(grids)
    losses = [float(row[3]) for row in best]
    assert losses == sorted(losses), "the best-per-optimizer table is sorted by loss"
    sgd_mean_ms = float(next(row for row in best if row[0] == "SGD")[5])
    for row in best:
        own = [r for r in runs if r[0] == row[0]]
        assert float(row[3]) == min(float(r[3]) for r in own)
        assert row[1:5] in [r[1:5] for r in own]  # the best run's lr, damping, loss and accuracy
        assert row[5] in [r[6] for r in own]  # and its mean step
        assert float(row[6].rstrip("x")) == approx_ratio(float(row[5]), sgd_mean_ms)
    assert f"Muon: {muon_matrices} conv filters and hidden weight matrices" in stdout
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("device", DEVICES)
def test_compare_optimizers_smoke_on_digits(tmp_path, device):
    result = run_example("compare_optimizers.py", "--smoke", "--device", device, "--plot", "plots/loss.png",
                         cwd=tmp_path)
    assert result.stdout.startswith("digits: 1437 training / 360 test examples of shape (1, 8, 8); batch 64")
    assert f"device {device}" in result.stdout.splitlines()[0]
    check_comparison(result.stdout, "digits", "SmallConvNet", 3, tmp_path / "plots" / "loss.png")


def test_compare_optimizers_smoke_on_mnist1d(tmp_path):
    result = run_example("compare_optimizers.py", "--smoke", "--dataset", "mnist1d", "--device", "cpu", cwd=tmp_path)
    assert result.stdout.startswith("mnist1d: 4000 training / 1000 test examples of shape (1, 40); batch 100")
    assert "1 CPU threads" in result.stdout.splitlines()[0]
    for model, parameters, muon_matrices in (("CNN", 5_210, 3), ("MLP", 15_210, 2)):
        assert f"\n{model}: {parameters:,} parameters." in result.stdout
        check_comparison(result.stdout, "mnist1d", model, muon_matrices, tmp_path / "compare_optimizers.png")
    assert [p.name for p in tmp_path.iterdir()] == ["compare_optimizers.png"], "MNIST-1D is neither cached nor downloaded"


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
    check_comparison(result.stdout, "cifar10", "SmallConvNet", 3, tmp_path / "compare_optimizers.png")


def test_missing_cifar10_is_a_clear_error(tmp_path):
    result = run_example("compare_optimizers.py", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                         cwd=tmp_path, expect_ok=False)
    assert result.returncode != 0
    assert "CIFAR-10 not found" in result.stderr and "data_batch_1" in result.stderr


def training_losses(line: str) -> list[float]:
    """The per-seed numbers after "final training loss" in a line of tune_foof.py."""
    return [float(v) for v in line.split("final training loss ")[1].split(",")[0].split()]


def test_tune_foof_settings_smoke(tmp_path):
    result = run_example("tune_foof.py", "settings", "--smoke", cwd=tmp_path)
    lines = result.stdout.splitlines()
    lr, damping = tune_foof.SNIPPET["lr"], tune_foof.SNIPPET["damping"]
    snippet = next(line for line in lines if line.startswith(f"Use snippet FOOF(lr={lr}, damping={damping}, "))
    sgd = next(line for line in lines if line.startswith(f"SGD(lr={tune_foof.SGD_LR}, momentum=0.9): "))
    wins = sum(f < s for f, s in zip(training_losses(snippet), training_losses(sgd)))
    assert f"lower than SGD's on {wins} of 1 seeds" in result.stdout
    # With one seed the grid's cell is that seed's loss: the snippet's row, at the snippet's lr.
    header = next(line for line in lines if line.strip().startswith("lr="))
    column = header.split().index(f"lr={lr:g}")
    row = next(line for line in lines if line.startswith(f"FOOF λ={damping:g} ")).split()
    assert float(row[2 + 2 * column]) == pytest.approx(training_losses(snippet)[0], rel=1e-2)
    assert len([line for line in lines if line.startswith("FOOF λ=")]) == len(tune_foof.SETTINGS_DAMPINGS)


def test_readme_use_snippet_is_the_swept_one():
    readme = (EXAMPLES.parent / "README.md").read_text()
    lr, damping = tune_foof.SNIPPET["lr"], tune_foof.SNIPPET["damping"]
    assert f"opt = fastfoof.FOOF(model, lr={lr}, damping={damping}, momentum=0.9)" in readme


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
