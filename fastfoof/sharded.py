"""FOOF and KFAC under FSDP2 (`torch.distributed.fsdp.fully_shard`, DESIGN §7).

FSDP2 shards every parameter along dim 0 as a DTensor: a rank holds a contiguous range of a layer's
output rows, of the weight and of the bias alike, and receives the gradient of those rows
(reduce-scattered, averaged over the ranks). `U = Ĝ·P` acts on each row alone, so a rank updates its
rows with the full, replicated P of their group: the blocks of a step are cut to this rank's rows
(`preconditioned_update_`), plain tensor views of the local shards with the local gradient as their
`.grad`, and go through `ops.preconditioned_update_` unchanged. KFAC's left factor mixes the rows of
a layer: it takes the whole gradient, gathered once per layer and step (`full_joint_gradient`), and
computes only the rows this rank holds (`left_product`).

Momentum buffers are DTensors placed as their parameter; statistics and preconditioners are plain
tensors, the same on every rank after an inversion round (averaged over the mesh's process group).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from . import ops, reference
from .layers import Block
from .linalg import stat_dtype
from .reference import joint_gradient


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def mesh_group(params):
    """The process group of the mesh the DTensor parameters are sharded over (None if there are
    none); ValueError for a sharding other than FSDP2's dim-0 shards on one 1-d mesh."""
    meshes = set()
    for p in params:
        if is_sharded(p):
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(f"params: a DTensor parameter on a {p.device_mesh.ndim}-d mesh placed "
                                 f"{tuple(p.placements)}; only FSDP2's Shard(0) on a 1-d mesh is supported")
            meshes.add(p.device_mesh)
    if len(meshes) > 1:
        raise ValueError(f"params: DTensor parameters on {len(meshes)} different device meshes; expected one")
    return next(iter(meshes)).get_group() if meshes else None


def local_rows(p: DTensor) -> tuple[int, int]:
    """[start, stop): the rows of `p` this rank holds. FSDP2 chunks dim 0 as torch.chunk does (the
    last ranks may hold fewer rows, or none)."""
    rows, world = p.shape[0], p.device_mesh.size()
    chunk = -(-rows // world)
    start = min(p.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    held = p.to_local().shape[0]
    if held != stop - start:
        raise RuntimeError(f"a parameter of {rows} rows holds {held} on rank {p.device_mesh.get_local_rank()} of "
                           f"{world}, not the {stop - start} of torch.chunk's split that the update assumes")
    return start, stop


def _local(p: DTensor, rows: slice) -> torch.Tensor:
    """A plain view of rows of p's local shard, with the same rows of its gradient as `.grad`."""
    view = p.to_local()[rows]
    if p.grad is not None:
        view.grad = p.grad.to_local()[rows]
    return view


def _spans(start: int, stop: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) cut where groups of `rows` rows begin, whole groups kept together: at most a
    part of one group, whole groups, a part of one group."""
    head = min(stop, -(-start // rows) * rows)
    tail = max(head, stop // rows * rows)
    return [(a, b) for a, b in ((start, head), (head, tail), (tail, stop)) if a < b]


def _groups_of(span: tuple[int, int], rows: int) -> tuple[int, int]:
    """The groups [first, last + 1) a span of rows covers."""
    return span[0] // rows, (span[1] - 1) // rows + 1


def _pieces(block: Block) -> list[tuple[Block, list[tuple[torch.Tensor, slice]]]]:
    """The block cut to this rank's rows: local blocks of plain views, each with (parameter, rows of
    its local shard) per view. A preconditioned block is cut where groups begin, so that each piece
    takes its groups' P or (Q, s) (and, KFAC, its rows of the transformed gradient, which holds this rank's
    rows only: `left_product`)."""
    weight = block.params[0]
    if not is_sharded(weight):
        return [(block, [(p, None) for p in block.params])]
    if block.precond is None and block.eigvecs is None:  # U = G/λ (or G) on the whole local shard
        return [(Block([_local(weight, slice(None))], block.options), [(weight, slice(None))])]
    start, stop = local_rows(weight)
    for p in block.params[1:]:
        if local_rows(p) != (start, stop):
            raise RuntimeError("a layer's bias is sharded over other rows than its weight")
    rows = weight.shape[0] // block.groups
    pieces = []
    for span in _spans(start, stop, rows):
        here = slice(span[0] - start, span[1] - start)
        first, last = _groups_of(span, rows)
        transformed = block.left_transformed_grad
        grad = None if transformed is None else transformed[here].view(last - first, -1, transformed.shape[-1])
        piece = Block([_local(p, here) for p in block.params], block.options, last - first,
                      None if block.precond is None else block.precond[first:last], grad,
                      None if block.eigvecs is None else block.eigvecs[first:last],
                      None if block.eigvals is None else block.eigvals[first:last])
        pieces.append((piece, [(p, here) for p in block.params]))
    return pieces


def preconditioned_update_(blocks: list[Block], state: dict, group=None, **options) -> None:
    """`ops.preconditioned_update_` (same keyword arguments) on this rank's rows of every block,
    with the momentum buffers in `state` (the optimizer's): a buffer created by this update becomes
    a DTensor placed as its parameter, also on a rank that holds no rows of it. Grafting's norms are
    the layers' whole norms: summed over the ranks of `group` (`_layer_norms`)."""
    local, owners, buffers, layer_of = [], [], [], {}
    grafted = [block for block in blocks if reference.grafted(block)]
    index = {id(block): i for i, block in enumerate(grafted)}
    for block in blocks:
        for piece, views in _pieces(block):
            local.append(piece)
            if id(block) in index:
                layer_of[id(piece)] = index[id(block)]
            for p, rows in views:
                buf = state[p].get("momentum_buffer")
                owners.append((p, rows))
                buffers.append(buf if buf is None or rows is None else buf.to_local()[rows])
    reduce_norms = None
    if options.get("graft") is not None and group is not None:
        reduce_norms = partial(_layer_norms, layer_of=layer_of, layers=len(grafted), group=group)
    if local:
        ops.preconditioned_update_(local, buffers, reduce_norms=reduce_norms, **options)
    elif reduce_norms is not None:  # no rows here, but the other ranks' all-reduce counts on this one
        weight = blocks[0].params[0]
        reduce_norms(torch.zeros(0, 2, dtype=stat_dtype(weight.dtype), device=weight.device), [])
    created: dict[int, list] = {}
    for (p, rows), buf in zip(owners, buffers):
        if buf is not None and "momentum_buffer" not in state[p]:
            created.setdefault(id(p), []).append((rows, buf))
    for block in blocks:
        for p, group_options in zip(block.params, block.options):
            if "momentum_buffer" in state[p]:
                continue
            if not is_sharded(p):
                if id(p) in created:
                    state[p]["momentum_buffer"] = created[id(p)][0][1]
            elif p.grad is not None and group_options["momentum"] != 0:
                shard = p.to_local()
                whole = shard.new_empty(shard.shape, dtype=stat_dtype(p.dtype))
                for rows, buf in created.get(id(p), []):
                    whole[rows] = buf
                state[p]["momentum_buffer"] = DTensor.from_local(whole, p.device_mesh, p.placements, run_check=False,
                                                                 shape=p.shape, stride=p.stride())


def _layer_norms(squares: torch.Tensor, pieces: list[Block], *, layer_of: dict, layers: int, group) -> torch.Tensor:
    """Grafting's [‖Ĝ‖², ‖U‖²] of each piece (`reference.grafted_updates`' reduce_norms) replaced by its
    layer's: the pieces of a layer summed on this rank, in order, then over the ranks in one all-reduce
    of [layers, 2] (a layer this rank holds no rows of contributes zeros)."""
    sums: dict[int, torch.Tensor] = {}
    for row, piece in zip(squares, pieces):
        layer = layer_of[id(piece)]
        sums[layer] = sums[layer] + row if layer in sums else row
    zero = squares.new_zeros(2)
    totals = torch.stack([sums.get(layer, zero) for layer in range(layers)]) if layers else squares.new_zeros(0, 2)
    dist.all_reduce(totals, group=group)
    return torch.stack([totals[layer_of[id(piece)]] for piece in pieces]) if pieces else squares


def full_joint_gradient(block: Block) -> torch.Tensor:
    """[Ĝ | g_b] with all rows of a sharded layer, [groups, rows, D'] (as `reference.joint_gradient`),
    gathered from the ranks' shards: one all-gather."""
    weight = block.params[0]
    start, stop = local_rows(weight)
    dim = math.prod(weight.shape[1:]) + (len(block.params) == 2)
    if stop > start:
        shard = joint_gradient(Block([_local(p, slice(None)) for p in block.params], block.options))[0]
    else:  # an empty shard: nothing to join, but the gather needs this rank too
        shard = weight.grad.to_local().new_zeros(0, dim, dtype=stat_dtype(weight.dtype))
    whole = DTensor.from_local(shard, weight.device_mesh, [Shard(0)], run_check=False,
                               shape=(weight.shape[0], dim), stride=(dim, 1)).full_tensor()
    return whole.view(block.groups, -1, dim)


def left_product(block: Block, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds of `left @ right` ([groups, rows, rows] @ [groups, rows, D']), as
    [local rows, D']: only those rows are computed."""
    start, stop = local_rows(block.params[0])
    rows, dim = left.shape[-1], right.shape[-1]
    parts = []
    for span in _spans(start, stop, rows):
        first, last = _groups_of(span, rows)
        offset = span[0] - first * rows  # where the span starts in its first group
        part = left[first:last, offset:offset + (span[1] - span[0]) // (last - first)] @ right[first:last]
        parts.append(part.reshape(-1, dim))
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else right.new_empty(0, dim)


def rank_stacked(t: torch.Tensor, mesh) -> DTensor:
    """This rank's `t` as its row of a [ranks, ...] DTensor sharded over `mesh`: how a state dict holds what
    differs between ranks (the statistics since the last inversion round), so that
    torch.distributed.checkpoint, which takes a plain tensor for the same on every rank, keeps each rank's."""
    t = t.contiguous()
    return DTensor.from_local(t.unsqueeze(0), mesh, [Shard(0)], run_check=False, shape=(mesh.size(), *t.shape),
                              stride=(t.numel(), *t.stride()))


def own_row(t: DTensor) -> torch.Tensor:
    """This rank's row of a `rank_stacked` tensor (a checkpoint resumes on as many ranks as saved it:
    the rows' count is the stacked tensor's global size)."""
    return t.to_local()[0]
