"""FOOF across torch.distributed ranks (DESIGN §7): the `Distributor`, and the collectives it runs.

Each rank observes its own forwards. The EMA is linear in the statistics, so averaging the EMA and
its weight n over the ranks once per inversion round equals averaging every step's statistics over
the ranks, i.e. the statistic of the union of the ranks' batches (for equal per-rank batch sizes).
"""
from __future__ import annotations

import heapq
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from . import ops, sharded
from .layers import Block
from .reference import joint_gradient


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


class Distributor:
    """Who does what across processes (DESIGN §7). In a single process: everything here, nothing to share.
    Under DDP: the running averages averaged over the ranks once per inversion round, the inversions spread
    over them (greedily by cost) and their results broadcast. Under FSDP2 (parameters sharded along dim 0)
    also: each rank updates its rows of every layer (grafting's norms summed over the ranks), KFAC's left
    factor takes a layer's gathered gradient, and the statistics, each rank's own between rounds, are saved
    one row per rank."""

    def __init__(self, process_group, params: Iterable[torch.Tensor]):
        # under FSDP2 the ranks of the parameters' mesh share statistics and inversions
        mesh_group = sharded.mesh_group(params)
        self.process_group = process_group if process_group is not None else mesh_group
        self.mesh = None  # the FSDP2 mesh, where parameters are sharded (`follow`)

    def follow(self, params: Iterable[torch.Tensor]) -> None:
        """The parameters handed to the optimizer now (a param group was added)."""
        self.mesh = next((p.device_mesh for p in params if sharded.is_sharded(p)), None)

    @property
    def group(self):
        """The process group to communicate over, or None alone (read at each use: the default group may be
        initialised after the optimizer was built)."""
        return active_group(self.process_group)

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced by its mean over the ranks (nothing alone)."""
        group = self.group
        if group is not None:
            average_(tensors, group)

    def assign(self, costs: list[float]) -> tuple[list[int], list[int]]:
        """(the rank that computes each item, the items this rank computes)."""
        group = self.group
        owner = owners(costs, group)
        return owner, [i for i, r in enumerate(owner) if r == rank(group)]

    def share_(self, results: list[dict], codes: list, owner: list[int], like: Callable[[int], tuple]) -> None:
        """Every rank ends with every item's `results` (dicts of tensors) and status `codes`: where this rank
        computed none (None), `like(i)`'s empty (results, code) are filled by a broadcast from the owner."""
        group = self.group
        if group is None:
            return
        keys = []
        for i in range(len(results)):
            template = like(i)
            if codes[i] is None:
                results[i].update(template[0])
                codes[i] = template[1]
            keys.append(sorted(template[0]))
        tensors = [results[i][k] for i in range(len(results)) for k in keys[i]] + codes
        share_(tensors, [owner[i] for i in range(len(results)) for _ in keys[i]] + owner, group)

    def update_(self, blocks: list[Block], state: dict, **options) -> None:
        """`ops.preconditioned_update_` with the momentum buffers in `state` (the optimizer's); under FSDP2
        on this rank's rows of every block (`sharded.preconditioned_update_`)."""
        if self.mesh is not None:
            sharded.preconditioned_update_(blocks, state, self.group, **options)
            return
        params = [p for block in blocks for p in block.params]
        buffers = [state[p].get("momentum_buffer") for p in params]
        ops.preconditioned_update_(blocks, buffers, **options)
        for p, buf in zip(params, buffers):
            if buf is not None:
                state[p]["momentum_buffer"] = buf

    @staticmethod
    def joint_gradient(block: Block) -> torch.Tensor:
        """[Ĝ | g_b] of a preconditioned block, all rows (under FSDP2 gathered from the ranks' shards)."""
        return sharded.full_joint_gradient(block) if sharded.is_sharded(block.params[0]) else joint_gradient(block)

    @staticmethod
    def left_product(block: Block, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left @ right per group; under FSDP2 only the rows this rank holds."""
        return sharded.left_product(block, left, right) if sharded.is_sharded(block.params[0]) else left @ right

    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """A statistic as a state dict holds it: under FSDP2 this rank's row of a rank-stacked DTensor."""
        return t if self.mesh is None else sharded.rank_stacked(t, self.mesh)

    @staticmethod
    def loaded(t: torch.Tensor) -> torch.Tensor:
        """A statistic as `saved` held it, back to this rank's own."""
        return sharded.own_row(t) if sharded.is_sharded(t) else t
