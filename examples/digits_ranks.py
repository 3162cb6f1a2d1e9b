"""What the torchrun examples share: the process group of this rank, the digits data and conv net,
each rank's slice of every global batch, the loss report."""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch size, split over the ranks")
    return parser


def init() -> tuple[int, int, torch.device]:
    """(rank, world size, device) after joining the process group torchrun describes: NCCL on GPUs,
    gloo on CPU."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits: images [N, 1, 8, 8] in [0, 1] and labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1).div(16).to(device)
    return x, torch.tensor(data.target).to(device)


def digits_net(device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).to(device)


def rank_batches(size: int, steps: int, batch: int, rank: int, world: int):
    """(step, this rank's sample indices) for steps 1…steps: every rank draws the same global batch,
    then takes its slice."""
    g = torch.Generator().manual_seed(1)
    per_rank = batch // world
    for step in range(1, steps + 1):
        yield step, torch.randint(0, size, (batch,), generator=g)[rank * per_rank:(rank + 1) * per_rank]


def print_loss(step: int, steps: int, loss: torch.Tensor, rank: int, world: int) -> None:
    """Rank 0 prints the loss averaged over the ranks every 50 steps and at the last."""
    if step % 50 == 0 or step == steps:
        dist.all_reduce(loss.detach_())
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item() / world:.4f}", flush=True)
