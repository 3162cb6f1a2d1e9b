"""FOOF across torch.distributed ranks: averaged statistics, inversions spread over the ranks.

Each rank observes its own forwards. The EMA is linear in the statistics, so averaging the EMA and
its weight n over the ranks once per inversion round equals averaging every step's statistics over
the ranks, i.e. the statistic of the union of the ranks' batches (for equal per-rank batch sizes).
"""
from __future__ import annotations

import heapq
from typing import Iterable

import torch
import torch.distributed as dist


def active_group(process_group):
    """The group FOOF communicates over, or None when it runs alone."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    return process_group if dist.get_world_size(process_group) > 1 else None


def average_(tensors: Iterable[torch.Tensor], group) -> None:
    """Replace each tensor by its mean over the group's ranks: one all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    world = dist.get_world_size(group)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        flat /= world
        for t, chunk in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(chunk.view_as(t))


def owners(costs: list[float], group) -> list[int]:
    """Greedy balance: the costliest matrix goes to the least-loaded rank (rank in the group)."""
    world = 1 if group is None else dist.get_world_size(group)
    load = [(0.0, r) for r in range(world)]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        total, r = heapq.heappop(load)
        owner[i] = r
        heapq.heappush(load, (total + costs[i], r))
    return owner


def rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def share_(tensors: list[torch.Tensor], owner: list[int], group) -> None:
    """Broadcast each tensor from the rank that owns it into the same tensor on every rank:
    one broadcast per rank and dtype."""
    for r in range(dist.get_world_size(group)):
        src = dist.get_global_rank(group, r) if group is not dist.group.WORLD else r
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t, o in zip(tensors, owner):
            if o == r:
                by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.broadcast(flat, src=src, group=group)
            for t, chunk in zip(ts, flat.split([t.numel() for t in ts])):
                t.copy_(chunk.view_as(t))
