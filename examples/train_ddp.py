"""FOOF under DistributedDataParallel: a small conv net on scikit-learn's bundled digits.

    torchrun --nproc_per_node=2 examples/train_ddp.py

Each rank trains on its own slice of every batch. FOOF needs nothing beyond the usual DDP setup:
it averages its statistics over the ranks once per inversion round and spreads the inversions.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastfoof


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch size, split over the ranks")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).div(16).to(device)
    y = torch.tensor(digits.target).to(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).to(device)
    model = DistributedDataParallel(model)
    opt = fastfoof.FOOF(model, lr=0.1, damping=1.0, momentum=0.9, inv_period=10, stats_steps=2)  # README's Use

    g = torch.Generator().manual_seed(1)  # every rank draws the same global batch, then takes its slice
    per_rank = args.batch // world
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            dist.all_reduce(loss.detach_())
            if rank == 0:
                print(f"step {step:4d}  loss {loss.item() / world:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
