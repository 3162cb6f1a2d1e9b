"""Triton kernel: the EMA fold of every layer's statistic with the non-finite drop (DESIGN §1.2, §1.3).

Two launches per (device, dtype, variant), over a tile schedule of (layer, block) pairs read from device
tables of addresses, so that the separately allocated EMAs, counts and statistics need no copy:

1. `nonfinite_flags_kernel`: every tile of a statistic that holds a NaN or an infinity writes the
   call's number (`epoch`) into its layer's flag. All writers of a flag write the same value, so
   plain stores are race-free and deterministic, and a flag from an earlier call never equals the
   current epoch: the flags need no reset launch. Tile 0 also zeroes the dropped counter.
2. `fold_kernel`: tiles of layers whose flag is not the current epoch apply
   `Σ ← m·Σ + (s·(1−m))·C`; block 0 of each layer updates `n ← m·n + (1−m)`, or, for a dropped
   layer, adds 1 to the dropped counter (an integer atomic: deterministic).

The formula and its rounding follow `fastfoof.reference.fold_statistics_`: `m`, `1−m` and each
`s·(1−m)` are formed in Python float64, then rounded to the statistics' dtype, and the fold is
compiled without FMA contraction (`enable_fp_fusion=False`): each product is rounded as in the
reference's separate PyTorch operations (bitwise equal under the interpreter; the sm_80/sm_90
builds hold no FFMA). The scalars travel
in a small device table, rebuilt (one asynchronous host-to-device copy) only when a scale or the
decay changes; the address tables are rebuilt only when a tensor's address or size changes. Nothing
synchronises with the host. float32 and float64 statistics have their own launches; a layer whose
tensors are not contiguous takes the reference.

The kernels read their addresses from the table, so the compiler knows nothing of their alignment:
layers whose EMA and statistic start 16-byte aligned (any fresh allocation) take the *vector*
variant (VEC = elements per 16 bytes), told so by `tl.multiple_of`: its tiles move
`numel − numel % VEC` elements in 128-bit accesses, and the tile holding the last `numel % VEC`
does those element-wise. Other layers take the scalar variant (VEC = 1) in their own launches.
Offsets are 64-bit (a layer of 2**31 or more elements folds correctly); the tile table holds
32-bit block numbers, so a layer may have up to 2**31 · BLOCK[dtype] elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastfoof import reference
from fastfoof.kernels.tables import Plans, column, to_device

# Elements per tile by dtype: 16 KiB of each operand (the fp64 fold stays well within its registers).
BLOCK = {torch.float32: 4096, torch.float64: 2048}
NUM_WARPS = 4
KERNEL_DTYPES = {torch.float32: False, torch.float64: True}  # dtype -> FP64 constexpr

# Layer table: one int64 row per layer. Column indices are shared with the kernels.
LAYER_COLUMNS = ("ema", "stat", "count", "numel")
LAYER_FIELDS = tl.constexpr(len(LAYER_COLUMNS))
EMA = tl.constexpr(column(LAYER_COLUMNS, "ema", "stat"))
COUNT = tl.constexpr(column(LAYER_COLUMNS, "count", "numel"))
# Scalar table (statistics' dtype): decay, 1 − decay, then s·(1 − decay) per layer.
SCALAR_COLUMNS = ("decay", "undecayed")
SCALAR_HEADER = tl.constexpr(len(SCALAR_COLUMNS))
UNDECAYED = tl.constexpr(SCALAR_COLUMNS.index("undecayed"))


@triton.jit
def _stat_pointer(address, FP64: tl.constexpr):
    if FP64:
        return address.to(tl.pointer_type(tl.float64))
    else:
        return address.to(tl.pointer_type(tl.float32))


@triton.jit
def _tile(layers_ptr, tiles_ptr, FP64: tl.constexpr, VEC: tl.constexpr):
    """This program's layer, block, the layer's EMA, statistic and count pointers and numel, and
    the end of its vector body (numel rounded down to VEC; numel itself for VEC = 1). VEC > 1: the
    host guarantees 16-byte-aligned EMA and statistic."""
    layer, block = tl.split(tl.load(tiles_ptr + 2 * tl.program_id(0) + tl.arange(0, 2)))
    row = layers_ptr + layer * LAYER_FIELDS
    ema, stat = tl.split(tl.load(row + EMA + tl.arange(0, 2)))
    count, numel = tl.split(tl.load(row + COUNT + tl.arange(0, 2)))
    ema, stat = _stat_pointer(ema, FP64), _stat_pointer(stat, FP64)
    body = numel
    if VEC > 1:
        ema = tl.multiple_of(ema, 16)
        stat = tl.multiple_of(stat, 16)
        body = tl.multiple_of(numel // VEC * VEC, VEC)
    return layer, block, ema, stat, _stat_pointer(count, FP64), numel, body


@triton.jit
def _tail(block, numel, body, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Offsets and mask of the numel − body < VEC last elements, for the tile that holds offset body."""
    offsets = body + tl.arange(0, VEC)
    return offsets, (offsets < numel) & (offsets // BLOCK == block)


@triton.jit
def _has_nonfinite(stat, offsets, mask):
    x = tl.load(stat + offsets, mask=mask, other=0.0)
    return tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0) != 0


@triton.jit
def _fold(ema, stat, offsets, mask, decay, coefficient):
    old = tl.load(ema + offsets, mask=mask, other=0.0)
    c = tl.load(stat + offsets, mask=mask, other=0.0)
    tl.store(ema + offsets, old * decay + c * coefficient, mask=mask)


# epoch changes every call: not specialised, so that no value of it triggers a new compilation.
@triton.jit(do_not_specialize=["epoch"])
def nonfinite_flags_kernel(layers_ptr, tiles_ptr, flags_ptr, dropped_ptr, epoch,
                           FP64: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """flags[layer] ← epoch if this tile of the layer's statistic has a non-finite entry."""
    if tl.program_id(0) == 0:
        tl.store(dropped_ptr, 0)  # fold_kernel, launched next, counts into it
    layer, block, ema, stat, count, numel, body = _tile(layers_ptr, tiles_ptr, FP64, VEC)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    nonfinite = _has_nonfinite(stat, offsets, offsets < body)
    if VEC > 1:
        tail, tail_mask = _tail(block, numel, body, BLOCK, VEC)
        nonfinite |= _has_nonfinite(stat, tail, tail_mask)
    if nonfinite:
        tl.store(flags_ptr + layer, epoch)


@triton.jit(do_not_specialize=["epoch"])
def fold_kernel(layers_ptr, tiles_ptr, flags_ptr, dropped_ptr, scalars_ptr, found_inf_ptr, epoch,
                FP64: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """Σ ← m·Σ + (s·(1−m))·C on one tile of a layer with a finite statistic; n and the drop count
    by the layer's block 0. Nothing at all on a step GradScaler skips (found_inf ≠ 0)."""
    layer, block, ema, stat, count, numel, body = _tile(layers_ptr, tiles_ptr, FP64, VEC)
    if tl.load(found_inf_ptr) != 0:
        pass
    elif tl.load(flags_ptr + layer) != epoch:
        decay = tl.load(scalars_ptr)
        coefficient = tl.load(scalars_ptr + SCALAR_HEADER + layer)
        offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _fold(ema, stat, offsets, offsets < body, decay, coefficient)
        if VEC > 1:
            tail, tail_mask = _tail(block, numel, body, BLOCK, VEC)
            _fold(ema, stat, tail, tail_mask, decay, coefficient)
        if block == 0:
            tl.store(count, tl.load(count) * decay + tl.load(scalars_ptr + UNDECAYED))
    elif block == 0:
        tl.atomic_add(dropped_ptr, 1)


def vector_width(dtype: torch.dtype) -> int:
    """Elements of `dtype` in one 128-bit access."""
    return 16 // dtype.itemsize


def compile_specs() -> list[dict]:
    """Every configuration the launcher can pick, for fastfoof.kernels.compile_check."""
    specs = []
    for dtype, fp64 in KERNEL_DTYPES.items():
        # The launcher passes freshly allocated tables and flags (16-byte aligned).
        common = dict(layers_ptr=torch.empty(len(LAYER_COLUMNS), dtype=torch.int64),
                      tiles_ptr=torch.empty(2, dtype=torch.int32), flags_ptr=torch.empty(1, dtype=torch.int64),
                      dropped_ptr=torch.empty((), dtype=torch.int64))
        # The fold is built without FMA contraction (module docstring), as it is launched.
        kernels = ((nonfinite_flags_kernel, dict(common, epoch=3), {}),
                   (fold_kernel, dict(common, scalars_ptr=torch.empty(SCALAR_HEADER.value + 1, dtype=dtype),
                                      found_inf_ptr=torch.zeros(()), epoch=3),
                    dict(enable_fp_fusion=False)))
        for fn, args, options in kernels:
            for vec in (vector_width(dtype), 1):
                specs.append(dict(kernel=fn.__name__,
                                  config=f"{'fp64' if fp64 else 'fp32'},{'vector' if vec > 1 else 'scalar'},"
                                         f"BLOCK={BLOCK[dtype]},w{NUM_WARPS}",
                                  fn=fn, args=args, constexprs=dict(FP64=fp64, VEC=vec, BLOCK=BLOCK[dtype]),
                                  num_warps=NUM_WARPS, num_stages=1, options=options, mma=False))
    return specs


# ---- host side --------------------------------------------------------------------------------

class _Plan:
    """Device tables for one set of layers of one (device, dtype, VEC): addresses, tile schedule, flags,
    and the call counter (`epoch`)."""

    def __init__(self, device: torch.device, block: int, rows: list[tuple]):
        numel = LAYER_COLUMNS.index("numel")
        tiles = [(i, b) for i, row in enumerate(rows) for b in range(triton.cdiv(row[numel], block))]
        self.layers = to_device(torch.tensor(rows, dtype=torch.int64), device)
        self.tiles = to_device(torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2), device)
        self.flags = torch.zeros(len(rows), dtype=torch.int64, device=device)
        self.epoch = 0


def _fusable(ema: torch.Tensor, count: torch.Tensor, stat: torch.Tensor) -> bool:
    return (ema.dtype in KERNEL_DTYPES and stat.dtype == ema.dtype and count.dtype == ema.dtype
            and ema.shape == stat.shape and count.numel() == 1 and ema.numel() > 0
            and ema.is_contiguous() and stat.is_contiguous() and ema.device == stat.device == count.device)


def fold_statistics_(emas: list[torch.Tensor], counts: list[torch.Tensor], stats: list[torch.Tensor],
                     scales: list[float], decay: float, found_inf: torch.Tensor | None = None, *,
                     plans: Plans | None = None) -> torch.Tensor:
    """EMA fold of DESIGN §1.2 for many layers: Σ ← mΣ + (1−m)·s·S, n ← m·n + (1−m).

    Same contract as `fastfoof.reference.fold_statistics_`: a statistic with a non-finite entry is
    not folded, nothing is with found_inf ≠ 0; returns the number dropped as an int64 device tensor,
    without host synchronisation. `plans`: the caller's kernel plans, kept between its calls (the
    optimizer folds the same layers every step); None builds them for this call.
    """
    plans = Plans() if plans is None else plans
    grouped: dict[tuple, list[int]] = {}  # (device, dtype, VEC) -> layers
    rest = []
    for i, (ema, count, stat) in enumerate(zip(emas, counts, stats)):
        if _fusable(ema, count, stat):
            aligned = ema.data_ptr() % 16 == 0 and stat.data_ptr() % 16 == 0
            grouped.setdefault((ema.device, ema.dtype, vector_width(ema.dtype) if aligned else 1), []).append(i)
        else:
            rest.append(i)
    dropped = None
    for group, members in grouped.items():
        found = _launch(group, [emas[i] for i in members], [counts[i] for i in members],
                        [stats[i] for i in members], [scales[i] for i in members], decay, found_inf, plans)
        dropped = found if dropped is None else dropped + found
    if rest:
        found = reference.fold_statistics_([emas[i] for i in rest], [counts[i] for i in rest],
                                           [stats[i] for i in rest], [scales[i] for i in rest], decay, found_inf)
        dropped = found if dropped is None else dropped + found.to(dropped.device)
    if dropped is None:
        return torch.zeros((), dtype=torch.int64)
    return dropped


def _launch(group: tuple, emas: list[torch.Tensor], counts: list[torch.Tensor], stats: list[torch.Tensor],
            scales: list[float], decay: float, found_inf: torch.Tensor | None, plans: Plans) -> torch.Tensor:
    """The two launches for the layers of one (device, dtype, VEC); returns their dropped count."""
    device, dtype, vec = group
    rows = [tuple(dict(ema=e.data_ptr(), stat=s.data_ptr(), count=c.data_ptr(), numel=e.numel())[column]
                  for column in LAYER_COLUMNS) for e, c, s in zip(emas, counts, stats)]
    plan = plans.get(("fold",) + group, tuple(rows), lambda: _Plan(device, BLOCK[dtype], rows))
    decay = float(decay)
    scalar_key = (decay,) + tuple(float(s) for s in scales)
    # Python float64 products, rounded once to the table's dtype: the reference's rounding.
    scalars = plans.table(("fold scalars",) + group, scalar_key, lambda: torch.tensor(
        [decay, 1 - decay] + [s * (1 - decay) for s in scalar_key[1:]], dtype=dtype), device)
    plan.epoch += 1
    dropped = torch.empty((), dtype=torch.int64, device=device)  # zeroed by the first kernel
    grid = (plan.tiles.shape[0],)
    fp64 = KERNEL_DTYPES[dtype]
    nonfinite_flags_kernel[grid](plan.layers, plan.tiles, plan.flags, dropped, plan.epoch,
                                 FP64=fp64, VEC=vec, BLOCK=BLOCK[dtype], num_warps=NUM_WARPS, num_stages=1)
    found_inf = plans.constant(0.0, device) if found_inf is None else found_inf  # (0: without a GradScaler)
    fold_kernel[grid](plan.layers, plan.tiles, plan.flags, dropped, scalars, found_inf.to(torch.float32), plan.epoch,
                      FP64=fp64, VEC=vec, BLOCK=BLOCK[dtype], num_warps=NUM_WARPS, num_stages=1,
                      enable_fp_fusion=False)
    return dropped
