"""Tests on gloo ranks that the test spawns on this machine (loopback, collective timeouts, and every
thread's stack dumped before the parent gives up on a rank), and what the DDP and FSDP2 tests share: the
optimizer settings, the batches and each rank's share of them, checkpoints through
torch.distributed.checkpoint, and the comparison with one process."""
from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import state_dict as dsd

WORLD = 2
SPAWN_TIMEOUT_S = 300  # the ranks of a test module take 10–30 s on 2 cores
COLLECTIVE_TIMEOUT_S = 120
STEPS = 7  # with T = 3: inversions at t = 1, 3, 6
KW = dict(lr=0.2, damping=0.5, momentum=0.9, weight_decay=0.01, inv_period=3, stats_steps=2, backend="reference")


def _rank(rank: int, world: int, worker, out_dir: str) -> None:
    # A rank stuck anywhere prints every thread's stack before the parent gives up on it.
    faulthandler.dump_traceback_later(SPAWN_TIMEOUT_S - 30, exit=True)
    torch.set_num_threads(1)  # two ranks on two cores
    # Gloo connects the ranks over the address the hostname resolves to, which on some machines is
    # an interface that does not carry local traffic; both ranks are on this machine, so use loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    torch.save(worker(rank, world, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(worker, out) -> list:
    """worker(rank, world, out_dir) on WORLD gloo ranks of this machine: what each rank returned, by
    rank. pytest.fail if they do not finish in SPAWN_TIMEOUT_S."""
    sys.path.insert(0, os.path.dirname(__file__))  # spawned workers import the test module by name
    ranks = mp.spawn(_rank, args=(WORLD, worker, str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ranks.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:  # a rank that died silently leaves the other in a collective
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def batches(dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of 2 samples per rank: [2·WORLD, 3, 6, 8] inputs, labels of 4 classes."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * WORLD, 3, 6, 8, generator=g, dtype=dtype),
             torch.randint(0, 4, (2 * WORLD,), generator=g)) for _ in range(STEPS)]


def shard(batch, rank: int, world: int, memory_format=torch.contiguous_format):
    """The rank's share of a batch (its input in `memory_format`)."""
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n].to(memory_format=memory_format), y[rank * n:(rank + 1) * n]


def dcp_save(model, opt, folder: str) -> None:
    """The model's and optimizer's state dicts through torch.distributed.checkpoint, every rank writing."""
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)},
             checkpoint_id=folder)


def dcp_load(model, opt, folder: str) -> None:
    """`dcp_save`'s checkpoint into a fresh model and optimizer, whose state dicts DCP loads into."""
    state = {"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=folder)
    dsd.set_model_state_dict(model, state["model"])
    dsd.set_optimizer_state_dict(model, opt, state["optim"])


def assert_close(params, expected, tol: float) -> None:
    """Every parameter within `tol` of one process's, relatively."""
    for p, q in zip(params, expected):
        assert ((p - q).norm() / q.norm()).item() <= tol
