"""Tests on gloo ranks that the test spawns on this machine: loopback, collective timeouts, and every
thread's stack dumped before the parent gives up on a rank."""
from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SPAWN_TIMEOUT_S = 300  # the ranks of a test module take 10–30 s on 2 cores
COLLECTIVE_TIMEOUT_S = 120


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
