"""Triton twin of `fastfoof.reference.damped_inverse_with_status`: P = (s·M + λI)⁻¹ for many layers at once.

Small float32 matrices (D ≤ KERNEL_MAX_DIM) are factored by one Triton program each, the whole
matrix in registers, one launch per power-of-two bucket: a table of (input offset, size, layer,
index, output offset, output row stride) addresses every matrix of the bucket in one flat copy of the
inputs, so mixed layers share a launch, and the padding to the bucket size is an identity block built
in registers.
Everything else (larger or float64 matrices, the "blocked" and "newton_schulz" methods, the
fallbacks of DESIGN §1.3 with their one host synchronisation) is `fastfoof.linalg`'s.

Layout of the returned P: [G, D, D] views whose row stride is D rounded up to a multiple of 4
elements (16 bytes), base 16-byte aligned, padding zero (contiguous when D % 4 == 0); the kernel
writes that layout directly. See the damped-inverse notes in `fastfoof.linalg`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastfoof.kernels.tables import Plans, column
from fastfoof.linalg import assign_results, factor_inverses, inverse_method, invert, padded_row

KERNEL_MAX_DIM = 64
# One warp per 16 rows keeps each register tile at BLOCK²/(32·warps) = BLOCK/2 values per thread.
NUM_WARPS = {16: 1, 32: 2, 64: 4}
# Offset (elements) of the matrix in the flat input, its size D, its layer, its index, its offset in the
# flat output and its row stride there (`padded_row(D)`).
TABLE_COLUMNS = ("offset", "dim", "layer", "index", "out_offset", "out_row")
TABLE_FIELDS = tl.constexpr(len(TABLE_COLUMNS))
DIM, LAYER, INDEX, OUT_OFFSET, OUT_ROW = (tl.constexpr(column(TABLE_COLUMNS, name)) for name in TABLE_COLUMNS[1:])


@triton.jit
def _damped_inverse_kernel(mats_ptr, out_ptr, table_ptr, scales_ptr, info_ptr, damping,
                           BLOCK: tl.constexpr):
    entry = table_ptr + tl.program_id(0) * TABLE_FIELDS
    offset = tl.load(entry)  # the first column
    dim = tl.load(entry + DIM).to(tl.int32)
    layer = tl.load(entry + LAYER)
    index = tl.load(entry + INDEX)
    out_offset = tl.load(entry + OUT_OFFSET)
    out_row = tl.load(entry + OUT_ROW).to(tl.int32)
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
    # The lower triangle, mirrored: the output is exactly symmetric (the padding columns stay zero).
    tl.store(out_ptr + out_offset + rows * out_row + cols, p, mask=inside & (rows >= cols))
    tl.store(out_ptr + out_offset + cols * out_row + rows, p, mask=inside & (rows > cols))


def kernel_block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _launch_plan(layout: tuple[tuple[int, int], ...], device: torch.device, plans: Plans
                 ) -> list[tuple[int, torch.Tensor]]:
    """[(BLOCK, table on device)] for layers of (groups, D) laid out one after another in a flat input
    buffer and a flat output buffer of padded rows. Kept in `plans`: an optimizer inverts the same layout
    every round (no host-to-device copy then)."""
    entries: dict[int, list[tuple[int, ...]]] = {}
    offset = out_offset = index = 0
    for layer, (groups, dim) in enumerate(layout):
        row = padded_row(dim)
        for _ in range(groups):
            entry = dict(offset=offset, dim=dim, layer=layer, index=index, out_offset=out_offset, out_row=row)
            entries.setdefault(kernel_block(dim), []).append(tuple(entry[c] for c in TABLE_COLUMNS))
            offset += dim * dim
            out_offset += dim * row
            index += 1
    return [(block, plans.table(("inverse", device, block), layout, lambda: torch.tensor(rows, dtype=torch.int64),
                                device)) for block, rows in sorted(entries.items())]


def _kernel_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None], plans: Plans
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(s·M + λI)⁻¹ of float32 matrices of size ≤ KERNEL_MAX_DIM, one launch per bucket; returns
    the inverses (views of one buffer, in P's layout) and per matrix a [G] bool tensor of failures."""
    device = mats[0].device
    flat = torch.cat([m.reshape(-1) for m in mats])
    out_sizes = [m.shape[0] * m.shape[-1] * padded_row(m.shape[-1]) for m in mats]
    out = torch.zeros(sum(out_sizes), dtype=torch.float32, device=device)
    groups = [m.shape[0] for m in mats]
    info = torch.empty(sum(groups), dtype=torch.int32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    scale_table = torch.stack([one if s is None else s.to(device=device, dtype=torch.float32).reshape(())
                               for s in scales])
    for block, table in _launch_plan(tuple((m.shape[0], m.shape[-1]) for m in mats), device, plans):
        _damped_inverse_kernel[(table.shape[0],)](flat, out, table, scale_table, info, float(damping),
                                                  BLOCK=block, num_warps=NUM_WARPS[block])
    inverses = [p.view(m.shape[0], m.shape[-1], padded_row(m.shape[-1]))[..., :m.shape[-1]]
                for m, p in zip(mats, out.split(out_sizes))]
    return inverses, list((info != 0).split(groups))


def _factor_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None], method: str,
                     plans: Plans) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`fastfoof.linalg.factor_inverses` with the small float32 matrices in the kernel."""
    small = [i for i, m in enumerate(mats) if m.dtype == torch.float32 and m.shape[-1] <= KERNEL_MAX_DIM and m.numel()]
    rest = sorted(set(range(len(mats))) - set(small))
    inverses: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    failed: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    if small:
        assign_results(small, _kernel_inverses([mats[i] for i in small], damping, [scales[i] for i in small],
                                               plans), inverses, failed)
    if rest:
        assign_results(rest, factor_inverses([mats[i] for i in rest], damping, [scales[i] for i in rest], method),
                       inverses, failed)
    return inverses, failed


def damped_inverse_with_status(mats: list[torch.Tensor], damping: float, *,
                               scales: list[torch.Tensor | None] | None = None,
                               previous: list[torch.Tensor | None] | None = None, method: str | None = None,
                               plans: Plans | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Same contract as `fastfoof.reference.damped_inverse_with_status`; `plans`: the caller's kernel plans
    (None: built for this call)."""
    plans = Plans() if plans is None else plans
    return invert(mats, damping, scales, previous, inverse_method(method),
                  lambda *args: _factor_inverses(*args, plans))


def compile_specs() -> list[dict]:
    """One config per bucket the launcher can pick (BLOCK = 16 … KERNEL_MAX_DIM)."""
    args = dict(mats_ptr=torch.empty(16), out_ptr=torch.empty(16), table_ptr=torch.empty(4, dtype=torch.int64),
                scales_ptr=torch.empty(1), info_ptr=torch.empty(1, dtype=torch.int32), damping=1.0)
    return [{"kernel": "_damped_inverse_kernel", "config": f"BLOCK={block},w{warps}", "fn": _damped_inverse_kernel,
             "args": args, "constexprs": {"BLOCK": block}, "num_warps": warps, "num_stages": 1, "mma": False}
            for block, warps in NUM_WARPS.items()]
