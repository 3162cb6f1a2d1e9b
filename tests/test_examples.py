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


def check_comparison(stdout: str, plot: Path) -> None:
    runs = table_rows(stdout, "All runs")
    assert sorted(row[0] for row in runs) == ["Adam"] * 3 + ["FOOF"] * 3 + ["KFAC"] * 3 + ["Muon"] * 3 + ["SGD"] * 3
    for row in runs:
        assert math.isfinite(float(row[2])) and float(row[4]) > 0, row
        assert row[5] == "never" or float(row[5]) > 0
    best = table_rows(stdout, "Best learning rate")
    assert sorted(row[0] for row in best) == ["Adam", "FOOF", "KFAC", "Muon", "SGD"]
    assert "Muon: 3 conv filters and hidden weight matrices" in stdout  # it says which parameters take Muon
    losses = [float(row[2]) for row in best]
    assert losses == sorted(losses), "the best-per-optimizer table is sorted by loss"
    for row in best:
        lrs = {float(r[1]) for r in runs if r[0] == row[0]}
        assert float(row[1]) in lrs
        assert float(row[2]) == min(float(r[2]) for r in runs if r[0] == row[0])
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("device", DEVICES)
def test_compare_optimizers_smoke_on_digits(tmp_path, device):
    result = run_example("compare_optimizers.py", "--smoke", "--device", device, "--plot", "plots/loss.png",
                         cwd=tmp_path)
    assert result.stdout.startswith("digits: 1437 training / 360 test images of shape (1, 8, 8)")
    assert f"device {device}" in result.stdout.splitlines()[0]
    check_comparison(result.stdout, tmp_path / "plots" / "loss.png")


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
    assert result.stdout.startswith("cifar10: 80 training / 16 test images of shape (3, 32, 32)")
    check_comparison(result.stdout, tmp_path / "compare_optimizers.png")


def test_missing_cifar10_is_a_clear_error(tmp_path):
    result = run_example("compare_optimizers.py", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                         cwd=tmp_path, expect_ok=False)
    assert result.returncode != 0
    assert "CIFAR-10 not found" in result.stderr and "data_batch_1" in result.stderr


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
