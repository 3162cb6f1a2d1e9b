"""CIFAR-10 from the python-pickle batches (the format torchvision's reader uses), no torchvision needed."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"


def cifar10_folder(data_dir: Path) -> Path:
    """The folder holding data_batch_1..5 and test_batch: data_dir/cifar-10-batches-py or data_dir."""
    data_dir = Path(data_dir).expanduser()
    for folder in (data_dir / "cifar-10-batches-py", data_dir):
        if (folder / TRAIN_FILES[0]).is_file():
            return folder
    raise SystemExit(f"error: CIFAR-10 not found under {data_dir}: expected 'cifar-10-batches-py/data_batch_1' ... "
                     f"'data_batch_5' and 'test_batch' there (cifar-10-python.tar.gz, extracted)")


def read_cifar10(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): uint8 [N, 3, 32, 32] and int64 [N]."""
    folder = cifar10_folder(data_dir)

    def read(names):
        images, labels = [], []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise SystemExit(f"error: CIFAR-10 file missing: {path}")
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.int64))
        return torch.cat(images), torch.cat(labels)

    return (*read(TRAIN_FILES), *read([TEST_FILE]))


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float, per-channel standardised with the given statistics of [0, 1] pixels."""
    return (images.float() / 255 - mean) / std


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images as [0, 1] pixels, shaped [1, C, 1, 1]."""
    pixels = images.float() / 255
    return pixels.mean((0, 2, 3), keepdim=True), pixels.std((0, 2, 3), keepdim=True)
