"""Triton twin of `fastfoof.reference.damped_inverse`: P = (s·M + λI)⁻¹ for many layers at once.

Small float32 matrices (D ≤ KERNEL_MAX_DIM) are inverted by one Triton program each, the whole
matrix in registers, one launch per power-of-two bucket: a table of (offset, size, layer, index)
addresses every matrix of the bucket in one flat copy of the inputs, so mixed layers share a launch,
and the padding to the bucket size is an identity block built in registers. Larger or float64
matrices go through the reference's batched torch route (cholesky_ex). The fallbacks of DESIGN §1.3
are decided for all of them together, with one host synchronisation.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from fastfoof.kernels.tables import to_device
from fastfoof.reference import bucket_dim, bucket_inverses, resolve_failures

KERNEL_MAX_DIM = 64
# One warp per 16 rows keeps each register tile at BLOCK²/(32·warps) = BLOCK/2 values per thread.
NUM_WARPS = {16: 1, 32: 2, 64: 4}
TABLE_COLUMNS = 4  # offset (elements) of the matrix in the flat buffer, its size D, its layer, its index


@triton.jit
def _damped_inverse_kernel(mats_ptr, out_ptr, table_ptr, scales_ptr, info_ptr, damping,
                           BLOCK: tl.constexpr):
    entry = table_ptr + tl.program_id(0) * 4
    offset = tl.load(entry)
    dim = tl.load(entry + 1).to(tl.int32)
    layer = tl.load(entry + 2)
    index = tl.load(entry + 3)
    scale = tl.load(scales_ptr + layer)

    idx = tl.arange(0, BLOCK)
    rows = idx[:, None]
    cols = idx[None, :]
    inside = (rows < dim) & (cols < dim)
    # Only the lower triangle is read (as LAPACK does): A stays exactly symmetric through the updates.
    lower = tl.load(mats_ptr + offset + tl.maximum(rows, cols) * dim + tl.minimum(rows, cols), mask=inside,
                    other=0.0)
    # blockdiag(s·M + λI, I): the identity padding factors to itself.
    a = lower * scale + tl.where(rows == cols, tl.where(rows < dim, damping, 1.0), 0.0)
    x = tl.where(rows == cols, 1.0, 0.0)
    # A non-finite input fails even where the factorisation would absorb it (an inf pivot).
    failures = tl.sum(tl.sum(tl.where(tl.abs(a) <= 3.4028234e38, 0, 1), axis=1), axis=0)
    p = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)

    # Right-looking Cholesky A = L·Lᵀ, fused with forward substitution X = L⁻¹ (L·X = I): step j
    # produces column j of L and row j of X, then removes them from the trailing rows.
    for j in range(0, dim):
        col = tl.sum(tl.where(cols == j, a, 0.0), axis=1)
        row = tl.sum(tl.where(rows == j, a, 0.0), axis=0)
        pivot = tl.sum(tl.where(idx == j, col, 0.0), axis=0)
        failures += tl.where(pivot > 0.0, 0, 1)  # also counts a NaN pivot
        root = tl.sqrt_rn(tl.where(pivot > 0.0, pivot, 1.0))  # IEEE, not the approximate sqrt
        l_col = tl.where(idx > j, tl.div_rn(col, root), 0.0)
        l_row = tl.where(idx > j, tl.div_rn(row, root), 0.0)
        a -= l_col[:, None] * l_row[None, :]
        x_row = tl.div_rn(tl.sum(tl.where(rows == j, x, 0.0), axis=0), root)
        x = tl.where(rows == j, x_row[None, :], x)
        x -= l_col[:, None] * x_row[None, :]
        p += x_row[:, None] * x_row[None, :]  # row j of L⁻¹ is final: P = L⁻ᵀ·L⁻¹ = Σ_j x_jᵀ·x_j
    failures += tl.sum(tl.sum(tl.where(tl.abs(p) <= 3.4028234e38, 0, 1), axis=1), axis=0)
    tl.store(info_ptr + index, failures)
    # The lower triangle, mirrored: the output is exactly symmetric.
    tl.store(out_ptr + offset + rows * dim + cols, p, mask=inside & (rows >= cols))
    tl.store(out_ptr + offset + cols * dim + rows, p, mask=inside & (rows > cols))


def kernel_block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


@lru_cache(maxsize=32)
def _launch_plan(layout: tuple[tuple[int, int], ...], device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """[(BLOCK, table on device)] for layers of (groups, D) laid out one after another in a flat
    buffer. Cached: an optimizer inverts the same layout every round (no host-to-device copy then)."""
    entries: dict[int, list[tuple[int, int, int, int]]] = {}
    offset = index = 0
    for layer, (groups, dim) in enumerate(layout):
        for _ in range(groups):
            entries.setdefault(kernel_block(dim), []).append((offset, dim, layer, index))
            offset += dim * dim
            index += 1
    return [(block, to_device(torch.tensor(rows, dtype=torch.int64), device))
            for block, rows in sorted(entries.items())]


def _kernel_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(s·M + λI)⁻¹ of float32 matrices of size ≤ KERNEL_MAX_DIM, one launch per bucket; returns
    the inverses (views of one buffer) and per matrix a [G] bool tensor of failures."""
    device = mats[0].device
    flat = torch.cat([m.reshape(-1) for m in mats])
    out = torch.empty_like(flat)
    groups = [m.shape[0] for m in mats]
    info = torch.empty(sum(groups), dtype=torch.int32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    scale_table = torch.stack([one if s is None else s.to(device=device, dtype=torch.float32).reshape(())
                               for s in scales])
    for block, table in _launch_plan(tuple((m.shape[0], m.shape[-1]) for m in mats), device):
        _damped_inverse_kernel[(table.shape[0],)](flat, out, table, scale_table, info, float(damping),
                                                  BLOCK=block, num_warps=NUM_WARPS[block])
    inverses = [p.view(m.shape) for m, p in zip(mats, out.split([m.numel() for m in mats]))]
    return inverses, list((info != 0).split(groups))


def damped_inverse(mats: list[torch.Tensor], damping: float, *, scales: list[torch.Tensor] | None = None,
                   previous: list[torch.Tensor | None] | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Same contract as `fastfoof.reference.damped_inverse`."""
    scales = scales if scales is not None else [None] * len(mats)
    inverses: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    failed: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        if m.dtype == torch.float32 and m.shape[-1] <= KERNEL_MAX_DIM and m.numel():
            key = ("kernel", m.device)
        else:
            key = (bucket_dim(m.shape[-1], m.device), m.dtype, m.device)
        buckets.setdefault(key, []).append(i)
    for key, members in buckets.items():
        args = [mats[i] for i in members], damping, [scales[i] for i in members]
        results = _kernel_inverses(*args) if key[0] == "kernel" else bucket_inverses(*args, key[0])
        for i, inv, fail in zip(members, *results):
            inverses[i], failed[i] = inv, fail
    return resolve_failures(mats, damping, scales, previous, inverses, failed)


def compile_specs() -> list[dict]:
    """One config per bucket the launcher can pick (BLOCK = 16 … KERNEL_MAX_DIM)."""
    args = dict(mats_ptr=torch.empty(16), out_ptr=torch.empty(16), table_ptr=torch.empty(4, dtype=torch.int64),
                scales_ptr=torch.empty(1), info_ptr=torch.empty(1, dtype=torch.int32), damping=1.0)
    return [{"kernel": "_damped_inverse_kernel", "config": f"BLOCK={block},w{warps}", "fn": _damped_inverse_kernel,
             "args": args, "constexprs": {"BLOCK": block}, "num_warps": warps, "num_stages": 1, "mma": False}
            for block, warps in NUM_WARPS.items()]
