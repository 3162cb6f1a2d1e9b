"""Triton kernel 3: the preconditioned update of every layer in one grouped GEMM (DESIGN §1.3, §1.4, §2.3).

`U = Ĝ·P` for all preconditioned layers and conv groups runs as one launch per parameter dtype and
variant over a device table of problems (pointers, sizes, strides, scalar slots). Each tile reads `Ĝ`
straight from `weight.grad` viewed as [O, D] (the bias gradient enters as a rank-1 update for column
D', no concatenated copy) and its epilogue applies the SGD step of §1.4 (momentum buffer, nesterov,
decoupled weight decay, parameter write) to the weight and the bias in place; nothing is written to
`.grad`. Hyperparameters live in a second device table (never constexpr: changing lr does not
recompile). Both tables are rebuilt only when a host-side key (addresses, shapes, strides,
hyperparameters, first-step flags) changes; the step itself never synchronises with the device.

Two variants. The kernel reads its pointers and strides from the table, so the compiler knows
nothing of their alignment: the *vector* variant (VEC = elements per 16 bytes) is told, by
`tl.multiple_of`, that every address is 16-byte aligned and every row stride, D and P's readable
width are multiples of 16 bytes, so its Ĝ, P, weight and buffer accesses are 128-bit. The host
checks all of it per block (`_vector_ready`); the rest (D not a multiple of 4 or 8, a P that
arrived unaligned, e.g. from a state_dict) takes the scalar variant (VEC = 1), same code.

channels_last convolution weights (and grads) are preconditioned in their memory order
(kernel offset major, channel minor): U_mem = Ĝ_mem·(Π P Πᵀ), with a permuted, padded copy of P
made once per new P (`_memory_order_precond`); P itself, the optimizer state and the state_dict stay
in DESIGN order. Offsets are 32-bit: a problem whose offsets could exceed int32 takes the reference
(`offsets_fit_int32`).

Low-rank preconditioners (DESIGN §1.3: the top eigenpairs (Q [D', r], s) of Σ̂, U = (Ĝ − (Ĝ·Q)·
diag(s/(s+λ))·Qᵀ)/λ) take two launches per dtype and variant over a table of the same problem
columns plus s and a workspace slice: `low_rank_project_kernel` writes Y = (Ĝ·Q)·diag(s/(s+λ))
([rows, r], fp32, K loop over D'), then `low_rank_update_kernel` forms U tile by tile from Ĝ and Y·Qᵀ
(K loop over r) with the same epilogue. λ is a run-time argument; the two products cost 4·rows·D'·r
flops against the dense 2·rows·D'². channels_last weights get Q's rows in memory order, once per Q.

Parameters without a preconditioner (U = G/λ) take `plain_update_kernel`: one launch per dtype and
variant over a table of entries. float64 parameters, and weights, grads and buffers with different
layouts (or neither DESIGN nor channels_last order) take the reference path, block by block.

Grafting (`graft` = κ, the optimizers' graft="sgd", DESIGN §1.4: each preconditioned block's U, weight
and bias of all groups, rescaled by min(‖Ĝ‖_F/‖U‖_F, κλ); U = G for the other parameters) needs a
reduction over a whole layer before any of its tiles may step, and FSDP2's `reduce_norms` between the
two. So it runs in two passes:
1. The GEMM kernels above with GRAFT on (a constexpr: the same K loops, tiles and schedule) store
   their tile of U (fp32, GradScaler's scale still in it) into an update workspace, [rows, D' rounded
   up to 4] per problem at an offset in the problem table, and the tile's Σu² into its own slot of a
   partials buffer [grafted blocks, most tiles of one] (the slot is the tile table's 4th column; the
   buffer is zero-filled once per layout, so the slots no tile owns stay 0). No atomics: ‖U‖² =
   partials.sum(1) is a fixed-order sum, the same every run.
2. On the host, without a synchronisation: ‖Ĝ‖² of the parameters' own gradients (not KFAC's
   `block.left_transformed_grad`) by one `torch._foreach_norm`; blocks the kernels cannot take compute
   their U and both norms with the reference (`reference.graft_squares`) and join the same [n, 2]
   rows, in block order; then `reduce_norms` (called once, also with n = 0) and
   `reference.graft_scales`. `graft_step_kernel` then reads each tile of U back, multiplies it by its
   block's scale / grad_scale and runs the same SGD epilogue (`_step_tile`); the reference blocks step
   with their own scale.
Why store U rather than recompute Ĝ·P in the second pass: the second pass then moves U twice (an fp32
write and a read, 8·rows·D' bytes) instead of reading P again (4·D'² bytes, often the larger, e.g.
ResNet-18's 3×3 convs of 512 channels: U 512×4608 = 9.4 MB against P 4608² = 84.9 MB) and redoing the
GEMM's 2·rows·D'² flops; the low-rank update would redo both of its products. Over a network the
stored U moves less (ResNet-18: 93 MB against 416 MB of P and Ĝ read again; ResNet-50: 204 against
601 MB); per layer only where rows > D' would the recompute move less (ResNet-50's expanding 1×1
convs, e.g. 2048×512: U 4.2 MB, P 1.0 MB), not worth a second kind of second pass. The cost is the
workspace: 4 bytes per element of the grafted weights (about the size of their momentum buffers).
graft=None launches the GRAFT-off builds, the code it ran before.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from fastfoof import linalg, reference
from fastfoof.kernels.tables import Plans, column

# tl.dot input precision for fp32 operands: TF32 on tensor cores by default; tests set "ieee".
DOT_PRECISION = "tf32"

# Tile configs (spill-free on sm_80 and sm_90: `python -m fastfoof.kernels.compile_check`).
# "async": software-pipelined, 3 stages of asynchronous copies (LDGSTS) to shared memory. On sm_90
#   tf32 wgmma needs both operands K-major in shared memory while P's tiles are N-major, so those
#   copies of P go 32 bits at a time (sm_80's stay 128-bit).
# "registers": 128-bit loads to registers, transposed on the store to shared memory, no pipelining
#   (a longer K step gives each thread more loads in flight).
# "ieee": FMA dots (tests), 8 warps to hold the operands in registers.
# sm_80 runs "async"; sm_90 runs HOPPER_CONFIG. Which of the two is faster on sm_90 only a GPU can
# tell: bench/test_bench_update.py has a row for each.
CONFIGS = {"async": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
           "registers": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1),
           "ieee": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=1)}
HOPPER_CONFIG = "registers"

PARAM_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
VECTOR_BYTES = 16

# Problem table: one int64 row per (layer, conv group). Column indices are shared with the kernel,
# which reads them in pairs (one 128-bit load each). A momentum buffer shares its parameter's strides
# (the host checks), so one offset serves both. precond_cols: the columns of P a tile may read (D',
# or D' rounded up to 4 within P's row padding). Grafting (0 without): the offset (elements) of the
# problem's U in the update workspace, U's row stride there (D' rounded up to 4) and the block's row
# of graft scales.
PROBLEM_COLUMNS = ("grad_w", "precond", "weight", "buf_w", "rows", "dim", "grad_w_row", "weight_row",
                   "precond_row", "precond_cols", "slot_w", "grad_b", "grad_b_stride", "dim_p", "bias", "buf_b",
                   "slot_b", "bias_stride", "update", "update_row", "graft_row", "pad")
PROBLEM_FIELDS = tl.constexpr(len(PROBLEM_COLUMNS))
# where the kernels load each pair of columns (`column` checks that the pair is one 128-bit load)
GRAD_W = tl.constexpr(column(PROBLEM_COLUMNS, "grad_w", "precond"))
WEIGHT = tl.constexpr(column(PROBLEM_COLUMNS, "weight", "buf_w"))
ROWS = tl.constexpr(column(PROBLEM_COLUMNS, "rows", "dim"))
GRAD_W_ROW = tl.constexpr(column(PROBLEM_COLUMNS, "grad_w_row", "weight_row"))
PRECOND_ROW = tl.constexpr(column(PROBLEM_COLUMNS, "precond_row", "precond_cols"))
SLOT_W = tl.constexpr(column(PROBLEM_COLUMNS, "slot_w", "grad_b"))
GRAD_B_STRIDE = tl.constexpr(column(PROBLEM_COLUMNS, "grad_b_stride", "dim_p"))
BIAS = tl.constexpr(column(PROBLEM_COLUMNS, "bias", "buf_b"))
SLOT_B = tl.constexpr(column(PROBLEM_COLUMNS, "slot_b", "bias_stride"))
UPDATE = tl.constexpr(column(PROBLEM_COLUMNS, "update", "update_row"))
GRAFT_ROW = tl.constexpr(column(PROBLEM_COLUMNS, "graft_row", "pad"))
# Low-rank problems (U = (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ): the same columns, "precond" holding Q
# ([D', r] of the group), "precond_row" its row stride and "precond_cols" r, then s of the group,
# the offset (elements) of the problem's slice of the launch's workspace for Y = (Ĝ·Q)·diag(s/(s+λ))
# ([rows, r]) and Y's row stride (r rounded up to 4).
LOW_RANK_COLUMNS = PROBLEM_COLUMNS + ("eigvals", "projection", "projection_row", "unused")
LOW_RANK_FIELDS = tl.constexpr(len(LOW_RANK_COLUMNS))
EIGVALS = tl.constexpr(column(LOW_RANK_COLUMNS, "eigvals", "projection"))
PROJECTION_ROW = tl.constexpr(column(LOW_RANK_COLUMNS, "projection_row", "unused"))
# Tile schedule: (problem, tile row, tile column, slot) int32, one 128-bit load per tile. slot: the
# tile's entry in grafting's buffer of partial sums Σu² ([grafted blocks, most tiles of one], 0 without).
TILE_FIELDS = tl.constexpr(4)
# Scalar table: one fp32 row per parameter: lr, 1 − lr·wd, μ, 1 − τ, nesterov, first step, μ ≠ 0, unused,
# read as two quads of 32-bit values.
SCALAR_COLUMNS = ("lr", "decay", "momentum", "undamped", "nesterov", "first", "use_momentum", "unused")
SCALAR_FIELDS = tl.constexpr(len(SCALAR_COLUMNS))
NESTEROV = tl.constexpr(SCALAR_COLUMNS.index("nesterov"))
# Parameters without a preconditioner: one int64 row each (grad, param, buffer, numel, scalar slot,
# unused) and a schedule of (entry, block) int64 pairs; PLAIN_BLOCK elements per program.
ENTRY_COLUMNS = ("grad", "param", "buf", "numel", "slot", "unused")
ENTRY_FIELDS = tl.constexpr(len(ENTRY_COLUMNS))
ENTRY_GRAD = tl.constexpr(column(ENTRY_COLUMNS, "grad", "param"))
ENTRY_BUF = tl.constexpr(column(ENTRY_COLUMNS, "buf", "numel"))
ENTRY_SLOT = tl.constexpr(ENTRY_COLUMNS.index("slot"))
PLAIN_BLOCK = 1024
PLAIN_WARPS = 4
# Grafting's second pass (`graft_step_kernel`: elementwise over the first pass's tiles): 4 warps, whatever
# the GEMM config (its BLOCK_M and BLOCK_N are the GEMM's: the tile schedule is shared).
GRAFT_STEP_WARPS = 4


@triton.jit
def _load_pair(ptr):
    """ptr[0], ptr[1] by one vector load (128 bits for 16-byte-aligned int64 pairs)."""
    return tl.split(tl.load(ptr + tl.arange(0, 2)))


@triton.jit
def _load_quad(ptr):
    """ptr[0 … 3] by one vector load (128 bits for 16-byte-aligned 32-bit values)."""
    even, odd = tl.split(tl.reshape(tl.load(ptr + tl.arange(0, 4)), (2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _param_pointer(address, PARAM_KIND: tl.constexpr):
    if PARAM_KIND == 0:
        return address.to(tl.pointer_type(tl.float32))
    elif PARAM_KIND == 1:
        return address.to(tl.pointer_type(tl.bfloat16))
    else:
        return address.to(tl.pointer_type(tl.float16))


@triton.jit
def _sgd_epilogue(u, param, buf, offsets, mask, scalars):
    """§1.4 on a tile of U: V ← μV + (1−τ)U (V = U on a first step), D, W ← W·(1 − η·wd) − η·D."""
    lr, decay, momentum, one_minus_dampening = _load_quad(scalars)
    nesterov, first, use_momentum, _ = _load_quad(scalars + NESTEROV)
    nesterov = nesterov != 0
    # The 0/1 float flags are folded into the masks as integers by tl.where (the interpreter cannot
    # `&` a block mask with a scalar bool; an integer mask keeps the compiler's alignment facts, so
    # the buffer accesses vectorise like the parameter's).
    read_old = (use_momentum * (1 - first)).to(tl.int32)
    old = tl.load(buf + offsets, mask=tl.where(mask, read_old, 0) != 0, other=0.0)
    v = tl.where(first != 0, u, momentum * old + one_minus_dampening * u)
    tl.store(buf + offsets, v, mask=tl.where(mask, use_momentum.to(tl.int32), 0) != 0)
    use_momentum = use_momentum != 0
    direction = tl.where(use_momentum, tl.where(nesterov, u + momentum * v, v), u)
    p = tl.load(param + offsets, mask=mask, other=0.0)
    tl.store(param + offsets, (p.to(tl.float32) * decay - lr * direction).to(p.dtype), mask=mask)


@triton.jit
def _problem(row, PARAM_KIND: tl.constexpr, VEC: tl.constexpr):
    """The columns every problem row starts with (PROBLEM_COLUMNS up to grad_b): typed pointers and
    int32 sizes and strides, with the vector variant's alignment facts where VEC > 1. Returns (grad_w,
    factor (P or Q), weight, buf_w, rows, D, Ĝ's and W's row strides, the factor's row stride and
    readable columns, slot_w, grad_b's address)."""
    grad_w, factor = _load_pair(row + GRAD_W)
    weight, buf_w = _load_pair(row + WEIGHT)
    grad_w = _param_pointer(grad_w, PARAM_KIND)
    factor = factor.to(tl.pointer_type(tl.float32))
    weight = _param_pointer(weight, PARAM_KIND)
    buf_w = buf_w.to(tl.pointer_type(tl.float32))
    # Sizes and strides as int32 (the host sends only problems whose offsets fit, with unit column
    # strides): 32-bit offsets from one base pointer keep the register count down.
    rows_total, dim = _load_pair(row + ROWS)
    g_row, w_row = _load_pair(row + GRAD_W_ROW)
    f_row, f_cols = _load_pair(row + PRECOND_ROW)
    slot_w, grad_b_address = _load_pair(row + SLOT_W)
    rows_total, dim, g_row, w_row = rows_total.to(tl.int32), dim.to(tl.int32), g_row.to(tl.int32), w_row.to(tl.int32)
    f_row, f_cols = f_row.to(tl.int32), f_cols.to(tl.int32)
    if VEC > 1:
        grad_w = tl.multiple_of(grad_w, 16)
        weight = tl.multiple_of(weight, 16)
        buf_w = tl.multiple_of(buf_w, 16)
        factor = tl.multiple_of(factor, 16)
        dim = tl.multiple_of(dim, VEC)
        g_row = tl.multiple_of(g_row, VEC)
        w_row = tl.multiple_of(w_row, VEC)
        f_row = tl.multiple_of(f_row, 4)
        f_cols = tl.multiple_of(f_cols, 4)
    return grad_w, factor, weight, buf_w, rows_total, dim, g_row, w_row, f_row, f_cols, slot_w, grad_b_address


@triton.jit
def _tile(problems_ptr, tiles_ptr, FIELDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of the schedule: its problem's row of the table (FIELDS columns a row), the tile's
    slot among grafting's partial sums, its first column n0, and its rows and columns."""
    problem, tile_row, tile_col, slot = _load_quad(tiles_ptr + tl.program_id(0) * TILE_FIELDS)
    n0 = tile_col * BLOCK_N
    rows = tile_row * BLOCK_M + tl.arange(0, BLOCK_M)
    return problems_ptr + problem.to(tl.int64) * FIELDS, slot, n0, rows, n0 + tl.arange(0, BLOCK_N)


@triton.jit
def grouped_update_kernel(problems_ptr, tiles_ptr, scalars_ptr, scale_ptr, found_inf_ptr, updates_ptr, partials_ptr,
                          PARAM_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, VEC: tl.constexpr,
                          GRAFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of U = Ĝ·P of one problem, then its SGD epilogue, unless
    GradScaler found non-finite gradients (found_inf ≠ 0: nothing is written). GRAFT: grafting's first
    pass instead of the epilogue (`_store_update`; scale_ptr, scalars_ptr and found_inf_ptr unread).
    VEC > 1: the host guarantees the 16-byte alignment of the vector variant (module docstring)."""
    row, slot, n0, rows, cols = _tile(problems_ptr, tiles_ptr, PROBLEM_FIELDS, BLOCK_M, BLOCK_N)
    (grad_w, precond, weight, buf_w, rows_total, dim, g_row, w_row, p_row, p_cols, slot_w,
     grad_b_address) = _problem(row, PARAM_KIND, VEC)
    row_ok = rows < rows_total
    grad_b_stride, dim_p = _load_pair(row + GRAD_B_STRIDE)  # D' only sizes the host's tile schedule
    acc = _gradient_product(grad_w, precond, rows, cols, row_ok, cols < p_cols, dim, g_row, p_row, grad_b_address,
                            grad_b_stride.to(tl.int32), PARAM_KIND, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if GRAFT:
        _store_update(acc, row, rows, cols, row_ok, dim, grad_b_address, updates_ptr, partials_ptr + slot)
    else:
        _step_tile(acc / tl.load(scale_ptr), row, rows, cols, row_ok, n0, dim, w_row, weight, buf_w, slot_w,
                   grad_b_address, scalars_ptr, found_inf_ptr, PARAM_KIND, BLOCK_N)


@triton.jit
def _tile_product(a, a_row, b, b_k, b_n, rows, cols, row_ok, col_ok, depth, INPUT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k A[rows, k]·B[k, cols] over k < depth, fp32 accumulation (tl.dot in INPUT_PRECISION): A's rows
    `a_row` apart with unit column stride, B's entry (k, n) at b + k·b_k + n·b_n (a literal 1 for either
    stride is folded, keeping that dimension contiguous to the compiler)."""
    a_offsets = rows[:, None] * a_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < depth
        x = tl.load(a + (a_offsets + ks[None, :]), mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(b + (ks[:, None] * b_k + cols[None, :] * b_n), mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x.to(tl.float32), y, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _gradient_product(grad_w, factor, rows, cols, row_ok, col_ok, dim, g_row, f_row, grad_b_address, grad_b_stride,
                      PARAM_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile of [Ĝ | g_b]·F (F: P, or a low-rank Q; row stride f_row): the K loop
    over D reads Ĝ from the weight's gradient, and the bias gradient, column D of [Ĝ | g_b], enters as
    a rank-1 update with row D of F (no concatenated copy)."""
    acc = _tile_product(grad_w, g_row, factor, f_row, 1, rows, cols, row_ok, col_ok, dim, INPUT_PRECISION,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    if grad_b_address != 0:
        grad_b = _param_pointer(grad_b_address, PARAM_KIND)
        gb = tl.load(grad_b + rows * grad_b_stride, mask=row_ok, other=0.0).to(tl.float32)
        fb = tl.load(factor + (dim * f_row + cols), mask=col_ok, other=0.0)
        acc += gb[:, None] * fb[None, :]
    return acc


@triton.jit
def _step_tile(u, row, rows, cols, row_ok, n0, dim, w_row, weight, buf_w, slot_w, grad_b_address, scalars_ptr,
               found_inf_ptr, PARAM_KIND: tl.constexpr, BLOCK_N: tl.constexpr):
    """The SGD epilogue of a [BLOCK_M, BLOCK_N] tile of U (columns n0 …) of the problem at `row`: the
    weight's columns, and the bias where the tile holds column D; nothing where found_inf ≠ 0."""
    if tl.load(found_inf_ptr) == 0:
        w_mask = row_ok[:, None] & (cols < dim)[None, :]
        w_offsets = rows[:, None] * w_row + cols[None, :]
        _sgd_epilogue(u, weight, buf_w, w_offsets, w_mask, scalars_ptr + slot_w * SCALAR_FIELDS)

        if (grad_b_address != 0) & (n0 <= dim) & (dim < n0 + BLOCK_N):  # this tile holds column D
            u_b = tl.sum(tl.where(cols[None, :] == dim, u, 0.0), axis=1)
            bias, buf_b = _load_pair(row + BIAS)
            slot_b, bias_stride = _load_pair(row + SLOT_B)
            _sgd_epilogue(u_b, _param_pointer(bias, PARAM_KIND), buf_b.to(tl.pointer_type(tl.float32)),
                          rows * bias_stride.to(tl.int32), row_ok, scalars_ptr + slot_b * SCALAR_FIELDS)


@triton.jit
def _update_columns(row, updates_ptr):
    """Grafting's columns of a problem row: (its U in the update workspace, U's row stride there, the
    block's row of graft scales). The host lays every U out 16-byte aligned with rows padded to 4."""
    update, update_row = _load_pair(row + UPDATE)
    graft_row, pad = _load_pair(row + GRAFT_ROW)
    return tl.multiple_of(updates_ptr + update, 16), tl.multiple_of(update_row.to(tl.int32), 4), graft_row


@triton.jit
def _store_update(u, row, rows, cols, row_ok, dim, grad_b_address, updates_ptr, partial_ptr):
    """Grafting's first pass on a tile of U (fp32, GradScaler's scale still in it): the tile into its
    problem's U in the workspace, and its Σu² into the tile's own slot of the partial sums (a fixed
    slot, no atomics: deterministic). Σu² counts the columns that step, as `reference.graft_squares`:
    the weight's, and the bias's where it has a gradient; the other columns (P's row padding the vector
    variant reads) are stored as 0. Rows past the problem's are 0 already (both GEMMs load their Ĝ and
    Y rows masked)."""
    update, update_row, _ = _update_columns(row, updates_ptr)
    width = dim + (grad_b_address != 0).to(tl.int32)
    u = tl.where((cols < width)[None, :], u, 0.0)  # the rows too would cost a spill (sm_90, "ieee" config)
    # masked at the padded width (a multiple of 4): 128-bit stores
    tl.store(update + (rows[:, None] * update_row + cols[None, :]), u,
             mask=row_ok[:, None] & (cols < update_row)[None, :])
    tl.store(partial_ptr, tl.sum(tl.sum(u * u, axis=1), axis=0))


@triton.jit
def graft_step_kernel(problems_ptr, tiles_ptr, updates_ptr, factors_ptr, scalars_ptr, found_inf_ptr,
                      FIELDS: tl.constexpr, PARAM_KIND: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Grafting's second pass over the first pass's tiles (dense or low-rank problems: FIELDS columns a
    row): the tile of U from the workspace times its block's factor (graft scale / grad_scale), then the
    SGD epilogue of `_step_tile`, unless found_inf ≠ 0."""
    row, slot, n0, rows, cols = _tile(problems_ptr, tiles_ptr, FIELDS, BLOCK_M, BLOCK_N)
    (grad_w, factor, weight, buf_w, rows_total, dim, g_row, w_row, f_row, f_cols, slot_w,
     grad_b_address) = _problem(row, PARAM_KIND, VEC)
    update, update_row, graft_row = _update_columns(row, updates_ptr)
    row_ok = rows < rows_total
    u = tl.load(update + (rows[:, None] * update_row + cols[None, :]),
                mask=row_ok[:, None] & (cols < update_row)[None, :], other=0.0)
    _step_tile(u * tl.load(factors_ptr + graft_row), row, rows, cols, row_ok, n0, dim, w_row, weight, buf_w, slot_w,
               grad_b_address, scalars_ptr, found_inf_ptr, PARAM_KIND, BLOCK_N)


@triton.jit
def _low_rank_columns(row, workspace_ptr, VEC: tl.constexpr):
    """The columns a low-rank problem row has beyond `_problem`'s: (grad_b's stride, D', s, Y's slice of
    the workspace, Y's row stride), with the vector variant's alignment facts."""
    grad_b_stride, dim_p = _load_pair(row + GRAD_B_STRIDE)
    eigvals, projection = _load_pair(row + EIGVALS)
    y_row, unused = _load_pair(row + PROJECTION_ROW)
    eigvals = eigvals.to(tl.pointer_type(tl.float32))
    projection = workspace_ptr + projection
    y_row = y_row.to(tl.int32)
    if VEC > 1:
        eigvals = tl.multiple_of(eigvals, 16)
        projection = tl.multiple_of(projection, 16)
        y_row = tl.multiple_of(y_row, 4)
    return grad_b_stride.to(tl.int32), dim_p.to(tl.int32), eigvals, projection, y_row


@triton.jit
def _low_rank_tile(problems_ptr, tiles_ptr, workspace_ptr, PARAM_KIND: tl.constexpr, VEC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_tile` of a low-rank problem, which of its rows are the problem's, and the problem's columns
    (`_problem` but the row count, then `_low_rank_columns`)."""
    row, slot, n0, rows, cols = _tile(problems_ptr, tiles_ptr, LOW_RANK_FIELDS, BLOCK_M, BLOCK_N)
    (grad_w, basis, weight, buf_w, rows_total, dim, g_row, w_row, q_row, rank, slot_w,
     grad_b_address) = _problem(row, PARAM_KIND, VEC)
    grad_b_stride, dim_p, eigvals, projection, y_row = _low_rank_columns(row, workspace_ptr, VEC)
    return (row, slot, n0, rows, cols, rows < rows_total, grad_w, basis, weight, buf_w, dim, g_row, w_row, q_row,
            rank, slot_w, grad_b_address, grad_b_stride, dim_p, eigvals, projection, y_row)


@triton.jit
def low_rank_project_kernel(problems_ptr, tiles_ptr, workspace_ptr, damping, PARAM_KIND: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The first skinny product of a low-rank update (DESIGN §1.3): one [BLOCK_M, BLOCK_N] tile of
    Y = (Ĝ·Q)·diag(s/(s+λ)) ([rows, r]) of one problem, into its slice of the workspace. VEC > 1: the
    host guarantees the vector variant's alignment (module docstring)."""
    (row, slot, n0, rows, cols, row_ok, grad_w, basis, weight, buf_w, dim, g_row, w_row, q_row, rank, slot_w,
     grad_b_address, grad_b_stride, dim_p, eigvals, projection, y_row) = _low_rank_tile(
        problems_ptr, tiles_ptr, workspace_ptr, PARAM_KIND, VEC, BLOCK_M, BLOCK_N)
    col_ok = cols < rank
    acc = _gradient_product(grad_w, basis, rows, cols, row_ok, col_ok, dim, g_row, q_row, grad_b_address,
                            grad_b_stride, PARAM_KIND, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    s = tl.load(eigvals + cols, mask=col_ok, other=0.0)
    acc = acc * (s / (s + damping))[None, :]
    tl.store(projection + (rows[:, None] * y_row + cols[None, :]), acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def low_rank_update_kernel(problems_ptr, tiles_ptr, workspace_ptr, scalars_ptr, scale_ptr, found_inf_ptr, damping,
                           updates_ptr, partials_ptr, PARAM_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                           VEC: tl.constexpr, GRAFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """The second skinny product and the epilogue: one [BLOCK_M, BLOCK_N] tile of U = (Ĝ − Y·Qᵀ)/λ of
    one problem ([rows, D']), with Y from `low_rank_project_kernel`, then the SGD step of §1.4, unless
    found_inf ≠ 0. GRAFT: grafting's first pass instead of the epilogue (`_store_update`). VEC > 1: the
    host guarantees the vector variant's alignment."""
    (row, slot, n0, rows, cols, row_ok, grad_w, basis, weight, buf_w, dim, g_row, w_row, q_row, rank, slot_w,
     grad_b_address, grad_b_stride, dim_p, eigvals, projection, y_row) = _low_rank_tile(
        problems_ptr, tiles_ptr, workspace_ptr, PARAM_KIND, VEC, BLOCK_M, BLOCK_N)
    col_ok = cols < dim_p
    acc = _tile_product(projection, y_row, basis, 1, q_row, rows, cols, row_ok, col_ok, rank, INPUT_PRECISION,
                        BLOCK_M, BLOCK_N, BLOCK_K)  # Y·Qᵀ, K loop over r
    g = tl.load(grad_w + (rows[:, None] * g_row + cols[None, :]), mask=row_ok[:, None] & (cols < dim)[None, :],
                other=0.0).to(tl.float32)
    if grad_b_address != 0:
        grad_b = _param_pointer(grad_b_address, PARAM_KIND)
        gb = tl.load(grad_b + rows * grad_b_stride, mask=row_ok, other=0.0).to(tl.float32)
        g = tl.where(cols[None, :] == dim, gb[:, None], g)
    if GRAFT:  # GradScaler's scale leaves with the graft scale, in the second pass
        _store_update((g - acc) / damping, row, rows, cols, row_ok, dim, grad_b_address, updates_ptr,
                      partials_ptr + slot)
    else:
        u = (g - acc) / (damping * tl.load(scale_ptr))
        _step_tile(u, row, rows, cols, row_ok, n0, dim, w_row, weight, buf_w, slot_w, grad_b_address, scalars_ptr,
                   found_inf_ptr, PARAM_KIND, BLOCK_N)


@triton.jit
def plain_update_kernel(entries_ptr, tiles_ptr, scalars_ptr, scale_ptr, found_inf_ptr, damping,
                        PARAM_KIND: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """U = G/λ and the SGD epilogue on one block of one parameter without a preconditioner (all such
    parameters of a dtype in one launch), unless found_inf ≠ 0. VEC > 1: the host guarantees 16-byte
    aligned tensors and a numel that is a multiple of VEC."""
    entry, block = _load_pair(tiles_ptr + tl.program_id(0) * 2)
    row = entries_ptr + entry.to(tl.int64) * ENTRY_FIELDS
    grad, param = _load_pair(row + ENTRY_GRAD)
    buf, numel = _load_pair(row + ENTRY_BUF)
    grad = _param_pointer(grad, PARAM_KIND)
    param = _param_pointer(param, PARAM_KIND)
    buf = buf.to(tl.pointer_type(tl.float32))
    if VEC > 1:
        grad = tl.multiple_of(grad, 16)
        param = tl.multiple_of(param, 16)
        buf = tl.multiple_of(buf, 16)
        numel = tl.multiple_of(numel, VEC)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    u = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32) / damping / tl.load(scale_ptr)
    if tl.load(found_inf_ptr) == 0:
        _sgd_epilogue(u, param, buf, offsets, mask, scalars_ptr + tl.load(row + ENTRY_SLOT) * SCALAR_FIELDS)


def launch_config(device: torch.device) -> str:
    """The name of the tile config the launcher uses on `device` (module constants above)."""
    if DOT_PRECISION == "ieee":
        return "ieee"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return HOPPER_CONFIG
    return "async"


def vector_width(dtype: torch.dtype) -> int:
    """Elements of `dtype` in one 128-bit access."""
    return VECTOR_BYTES // dtype.itemsize


def compile_specs() -> list[dict]:
    """Every configuration the launcher can pick, for fastfoof.kernels.compile_check."""
    # The launcher passes freshly allocated tables and workspaces (16-byte aligned) and a scalar grad scale;
    # without grafting, the scalar table stands in for the first pass's outputs.
    scalars = torch.empty(SCALAR_FIELDS.value)
    args = dict(problems_ptr=torch.empty(len(PROBLEM_COLUMNS), dtype=torch.int64),
                tiles_ptr=torch.empty(TILE_FIELDS.value, dtype=torch.int32), scalars_ptr=scalars,
                scale_ptr=torch.ones(()), found_inf_ptr=torch.zeros(()))
    plain_args = dict(entries_ptr=torch.empty(len(ENTRY_COLUMNS), dtype=torch.int64),
                      tiles_ptr=torch.empty(2, dtype=torch.int64), scalars_ptr=scalars,
                      scale_ptr=torch.ones(()), found_inf_ptr=torch.zeros(()), damping=0.7)
    low_rank = dict(problems_ptr=torch.empty(len(LOW_RANK_COLUMNS), dtype=torch.int64),
                    tiles_ptr=torch.empty(TILE_FIELDS.value, dtype=torch.int32), workspace_ptr=torch.empty(16),
                    damping=0.7)
    low_rank_update = dict(low_rank, **{k: args[k] for k in ("scalars_ptr", "scale_ptr", "found_inf_ptr")})
    # the first pass's outputs: stand-ins (GRAFT off) or grafting's workspace and partial sums
    outputs = {False: dict(updates_ptr=scalars, partials_ptr=scalars),
               True: dict(updates_ptr=torch.empty(64), partials_ptr=torch.zeros(4, 16))}
    second_pass = dict(tiles_ptr=args["tiles_ptr"], updates_ptr=outputs[True]["updates_ptr"], factors_ptr=torch.ones(4),
                       scalars_ptr=scalars, found_inf_ptr=torch.zeros(()))
    # kernel name -> (kernel, representative arguments, the GRAFT values it has): the grouped GEMM, and
    # the two low-rank passes
    tiled = {"grouped_update_kernel": (grouped_update_kernel, args, (False, True)),
             "low_rank_project_kernel": (low_rank_project_kernel, low_rank, (None,)),
             "low_rank_update_kernel": (low_rank_update_kernel, low_rank_update, (False, True))}
    specs = []
    for dtype, kind in PARAM_KINDS.items():
        kind_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        specs += _gemm_specs(dtype, kind, kind_name, tiled, outputs)
        specs += _elementwise_specs(dtype, kind, kind_name, plain_args, second_pass)
    return specs


def _gemm_specs(dtype: torch.dtype, kind: int, kind_name: str, tiled: dict, outputs: dict) -> list[dict]:
    """The GEMM kernels' builds for one parameter dtype: every config, variant and GRAFT value."""
    specs = []
    for name, config in CONFIGS.items():
        precision = "ieee" if name == "ieee" else "tf32"
        tiles = {k: v for k, v in config.items() if k.startswith("BLOCK")}
        for vec in (vector_width(dtype), 1):
            variant = "vector" if vec > 1 else "scalar"
            for kernel, (fn, fn_args, grafts) in tiled.items():
                for graft in grafts:
                    constexprs = dict(PARAM_KIND=kind, INPUT_PRECISION=precision, VEC=vec, **tiles)
                    spec_args = fn_args
                    if graft is not None:
                        constexprs["GRAFT"] = graft
                        spec_args = dict(fn_args, **outputs[graft])
                    specs.append(dict(kernel=kernel,
                                      config=f"{kind_name},{'graft,' if graft else ''}{name},{variant},"
                                             + ",".join(f"{k}={v}" for k, v in tiles.items())
                                             + f",w{config['num_warps']},s{config['num_stages']}",
                                      fn=fn, args=spec_args, constexprs=constexprs,
                                      num_warps=config["num_warps"], num_stages=config["num_stages"],
                                      mma=precision == "tf32"))
    return specs


def _elementwise_specs(dtype: torch.dtype, kind: int, kind_name: str, plain_args: dict, second_pass: dict
                       ) -> list[dict]:
    """The elementwise kernels' builds for one parameter dtype: the plain update, grafting's second pass."""
    specs = []
    for vec in (vector_width(dtype), 1):
        variant = "vector" if vec > 1 else "scalar"
        specs.append(dict(kernel="plain_update_kernel",
                          config=f"{kind_name},{variant},BLOCK={PLAIN_BLOCK},w{PLAIN_WARPS}",
                          fn=plain_update_kernel, args=plain_args,
                          constexprs=dict(PARAM_KIND=kind, VEC=vec, BLOCK=PLAIN_BLOCK),
                          num_warps=PLAIN_WARPS, num_stages=1, mma=False))
        # grafting's second pass: one build per tile shape of the GEMM configs, dense and low-rank tables
        for block_m, block_n in sorted({(c["BLOCK_M"], c["BLOCK_N"]) for c in CONFIGS.values()}):
            for table, fields in (("dense", PROBLEM_FIELDS.value), ("low_rank", LOW_RANK_FIELDS.value)):
                specs.append(dict(kernel="graft_step_kernel",
                                  config=f"{kind_name},{table},{variant},BLOCK_M={block_m},BLOCK_N={block_n},"
                                         f"w{GRAFT_STEP_WARPS}",
                                  fn=graft_step_kernel,
                                  args=dict(second_pass, problems_ptr=torch.empty(fields, dtype=torch.int64)),
                                  constexprs=dict(FIELDS=fields, PARAM_KIND=kind, VEC=vec, BLOCK_M=block_m,
                                                  BLOCK_N=block_n),
                                  num_warps=GRAFT_STEP_WARPS, num_stages=1, mma=False))
    return specs


# ---- host side --------------------------------------------------------------------------------

def offsets_fit_int32(rows: int, dim_p: int, row_stride: int, precond_row: int, config: dict) -> bool:
    """Whether every 32-bit offset the kernel forms for one problem fits in int32, the masked rows and
    columns of partial tiles included: `rows` × D' of U, the largest row stride of Ĝ, W, the
    buffers and the bias vectors, and P's row stride."""
    block_cols = max(config["BLOCK_N"], config["BLOCK_K"])
    last_row = triton.cdiv(rows, config["BLOCK_M"]) * config["BLOCK_M"] - 1
    last_col = triton.cdiv(dim_p, block_cols) * block_cols - 1
    return max(last_row * row_stride, last_col * precond_row) + last_col < 2 ** 31


def _matrix_view(t: torch.Tensor, rows: int) -> tuple[torch.Tensor, bool] | None:
    """t as [rows, D] with unit column stride and whether that is channels-last order (a conv
    tensor [O, C, *kernel] stored with C innermost: columns k·C + c), or None if neither order is
    such a view. DESIGN order (c·K + k) comes first: where C = 1 or K = 1 both orders agree."""
    orders = [(t, False)]
    if t.dim() >= 3:
        orders.append((t.permute(0, *range(2, t.dim()), 1), True))
    for tensor, channels_last in orders:
        try:
            view = tensor.view(rows, -1)
        except RuntimeError:
            continue
        if view.shape[1] == 1 or view.stride(1) == 1:
            return view, channels_last
    return None


def _same_strides(param: torch.Tensor, buf: torch.Tensor | None) -> bool:
    return buf is None or (buf.shape == param.shape and buf.stride() == param.stride())


def _aligned(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.data_ptr() % VECTOR_BYTES == 0 for t in tensors)


def _precond_vector_cols(precond: torch.Tensor) -> int | None:
    """D' rounded up to 4 if P ([G, D', D'], unit column stride) can be read in 16-byte vectors up to
    that width: aligned base, row and group strides multiples of 4 fp32, and storage (the row padding)
    behind every row's last vector; None otherwise."""
    groups, dim_p, _ = precond.shape
    cols = math.ceil(dim_p / 4) * 4
    if not _aligned(precond) or precond.stride(0) % 4 or precond.stride(1) % 4 or cols > precond.stride(1):
        return None
    last = precond.storage_offset() + (groups - 1) * precond.stride(0) + (dim_p - 1) * precond.stride(1) + cols
    return cols if last * 4 <= precond.untyped_storage().nbytes() else None


def _memory_order_precond(precond: torch.Tensor, channels: int, kernel: int, plans: Plans,
                          columns: bool = True) -> torch.Tensor:
    """Π P Πᵀ per group for a channels-last weight of C = `channels` input channels per group and K =
    `kernel` offsets: rows and, where `columns` (a dense P; not a low-rank Q), columns in memory order
    k·C + c (the bias stays last), in a new 16-byte-aligned tensor whose rows are padded to a multiple
    of 4. Made once per P and version (`plans.derived`: dropped with its P)."""
    def build() -> torch.Tensor:
        groups, dim_p, width = precond.shape
        order = torch.arange(channels * kernel, device=precond.device).view(channels, kernel).t().reshape(-1)
        order = torch.cat([order, torch.arange(channels * kernel, dim_p, device=precond.device)])
        padded = torch.empty(groups, dim_p, math.ceil(width / 4) * 4, dtype=precond.dtype, device=precond.device)
        permuted = padded[..., :width]
        rows = precond.index_select(1, order)
        return permuted.copy_(rows.index_select(2, order) if columns else rows)

    return plans.derived("permuted", precond, (channels, kernel, columns), build)


def _scalars(group: dict, first: bool) -> tuple[float, ...]:
    """A parameter's row of the scalar table (SCALAR_COLUMNS)."""
    lr, momentum = group["lr"], group["momentum"]
    row = dict(lr=lr, decay=1 - lr * group["weight_decay"], momentum=momentum, undamped=1 - group["dampening"],
               nesterov=float(group["nesterov"]), first=float(first), use_momentum=float(momentum != 0), unused=0.0)
    return tuple(row[c] for c in SCALAR_COLUMNS)


@dataclass
class _Launches:
    """What one call launches for the parameters of one device and dtype: problem rows by VEC (dense P,
    low rank, parameters without a preconditioner), their scalar rows, and the low-rank Y's workspace
    elements taken so far."""
    dense: dict = field(default_factory=dict)
    low_rank: dict = field(default_factory=dict)
    plain: dict = field(default_factory=dict)
    scalar_rows: list = field(default_factory=list)
    projection: int = 0

    def scalar_slot(self, group: dict, first: bool) -> int:
        self.scalar_rows.append(_scalars(group, first))
        return len(self.scalar_rows) - 1


@dataclass
class _Call:
    """One `preconditioned_update_` call: its plans, arguments, the momentum buffers (created as the blocks
    are laid out), grafting's state and the copies that must outlive the launches."""
    plans: Plans
    damping: float
    buffers: list
    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None
    grafting: _Grafting | None
    keep_alive: list = field(default_factory=list)

    def buffer(self, slot: int, param: torch.Tensor, group: dict, **layout) -> tuple[torch.Tensor | None, bool]:
        """The momentum buffer of the parameter at `slot` (made now, fp32, on its first step with momentum)
        and whether this step makes it."""
        buf = self.buffers[slot]
        if group["momentum"] == 0 or buf is not None:
            return buf, False
        self.buffers[slot] = torch.empty_like(param, dtype=torch.float32, **layout)
        return self.buffers[slot], True


@dataclass
class _Operands:
    """A preconditioned block as the GEMM kernels read it: [rows, D] views of the weight and of Ĝ (KFAC's
    left-transformed gradient where it has one), the bias and its gradient, the right factor (P [G, D', D'],
    or Q [G, D', r] with s [G, r]) and the layout they share."""
    weight: torch.Tensor
    grad_w: torch.Tensor
    bias: torch.Tensor | None
    grad_b: torch.Tensor | None
    factor: torch.Tensor
    eigvals: torch.Tensor | None
    weight_view: torch.Tensor
    grad_view: torch.Tensor
    channels_last: bool
    rows: int  # per group
    dim: int
    width: int  # of the factor: D' (P) or r (Q)

    @property
    def dim_p(self) -> int:
        return self.dim + (self.bias is not None)


def _fused_operands(block) -> _Operands | None:
    """The block's operands, or None where the kernels cannot take it (dtypes, shapes, layouts)."""
    weight = block.params[0]
    bias = block.params[1] if len(block.params) == 2 else None
    grad_w, grad_b = weight.grad, None if bias is None else bias.grad
    groups, out_rows = block.groups, weight.shape[0]
    if weight.dtype not in PARAM_KINDS or grad_w.dtype != weight.dtype or out_rows % groups:
        return None
    transformed = block.left_transformed_grad  # KFAC's [groups, rows, D'] fp32 gradient, in DESIGN order
    if transformed is not None and (weight.dtype != torch.float32 or (bias is not None and grad_b is None)
                                    or not transformed.is_contiguous()):
        return None  # the kernel reads Ĝ in the parameter's dtype; the bias column is read with the bias
    if bias is not None and (bias.dtype != weight.dtype or (grad_b is not None and grad_b.dtype != weight.dtype)):
        return None
    dim = weight[0].numel()
    low_rank = block.eigvecs is not None
    factor, eigvals = (block.eigvecs, block.eigvals) if low_rank else (block.precond, None)
    width = eigvals.shape[-1] if low_rank else dim + (bias is not None)
    if factor.dtype != torch.float32 or tuple(factor.shape) != (groups, dim + (bias is not None), width):
        return None
    if low_rank and (eigvals.dtype != torch.float32 or tuple(eigvals.shape) != (groups, width)
                     or eigvals.stride(1) != 1):
        return None
    weight_view, grad_view = _matrix_view(weight, out_rows), _matrix_view(grad_w, out_rows)
    if weight_view is None or grad_view is None or weight_view[1] != grad_view[1]:
        return None
    (weight_view, channels_last), (grad_view, _) = weight_view, grad_view
    if transformed is not None:
        if channels_last:
            return None
        grad_view = transformed.view(out_rows, dim + (bias is not None))
        grad_w, grad_b = grad_view[:, :dim], None if bias is None else grad_view[:, dim]
    return _Operands(weight, grad_w, bias, grad_b, factor, eigvals, weight_view, grad_view, channels_last,
                     out_rows // groups, dim, width)


def _fused_problems(block, slot: int, launch: _Launches, call: _Call, graft_row: int | None = None
                    ) -> tuple[list[tuple], int] | None:
    """The problem rows of one preconditioned block (dense P: PROBLEM_COLUMNS; low rank (Q, s):
    LOW_RANK_COLUMNS, whose slices of Y are taken from the launch's workspace) and their VEC (1: the scalar
    variant), or None if the block needs the reference path. Grafted: row `graft_row` of its scales, its U
    in the call's update workspace."""
    ops = _fused_operands(block)
    if ops is None or not _same_strides(ops.weight, call.buffers[slot]) or \
            (ops.bias is not None and not _same_strides(ops.bias, call.buffers[slot + 1])):
        return None
    if ops.channels_last:
        ops.factor = _memory_order_precond(ops.factor, ops.weight.shape[1], ops.dim // ops.weight.shape[1],
                                           call.plans, columns=ops.eigvals is None)
    elif ops.factor.stride(2) != 1:  # a copy each step (damped_inverse returns row-major P), alive until the launch
        ops.factor = ops.factor.contiguous()
        call.keep_alive.append(ops.factor)
    strides = [ops.weight_view.stride(0), ops.grad_view.stride(0)] + \
        [t.stride(0) for t in (ops.bias, ops.grad_b) if t is not None]
    if call.grafting is not None:
        strides.append(linalg.padded_row(ops.dim_p))  # U's rows in the update workspace
    if not offsets_fit_int32(ops.rows, ops.dim_p, max(strides), ops.factor.stride(1),
                             CONFIGS[launch_config(ops.weight.device)]):
        return None
    buf_w, first_w = call.buffer(slot, ops.weight, block.options[0])
    slots = [launch.scalar_slot(block.options[0], first_w), 0]
    buf_b = None
    if ops.grad_b is not None:
        buf_b, first_b = call.buffer(slot + 1, ops.bias, block.options[1])
        slots[1] = launch.scalar_slot(block.options[1], first_b)
    vec, factor_cols = _vector_variant(ops, buf_w)
    problems = _problem_rows(ops, buf_w, buf_b, slots, factor_cols, launch, call.grafting, graft_row)
    if call.grafting is not None:
        call.grafting.fused(graft_row, block, problems, launch_config(ops.weight.device))
    return problems, vec


def _vector_variant(ops: _Operands, buf_w: torch.Tensor | None) -> tuple[int, int]:
    """(VEC, the factor's readable columns) of a block: the vector variant where every address, row stride
    and D allows it (module docstring), else (1, its width)."""
    vec = vector_width(ops.weight.dtype)
    factor, width = ops.factor, ops.width
    if ops.eigvals is not None:  # precond_cols is r in both variants
        factor_cols = width
        vector_factor = (_aligned(factor, ops.eigvals) and width % 4 == 0 and ops.eigvals.stride(0) % 4 == 0
                         and factor.stride(0) % 4 == 0 and factor.stride(1) % 4 == 0)
    else:
        factor_cols = _precond_vector_cols(factor)
        vector_factor = factor_cols is not None
    rows = (ops.dim, ops.weight_view.stride(0), ops.grad_view.stride(0))
    if not vector_factor or not _aligned(ops.weight, ops.grad_w, buf_w) or any(n % vec for n in rows):
        return 1, width
    return vec, factor_cols


def _problem_rows(ops: _Operands, buf_w: torch.Tensor | None, buf_b: torch.Tensor | None, slots: list[int],
                  factor_cols: int, launch: _Launches, grafting: _Grafting | None, graft_row: int | None
                  ) -> list[tuple]:
    """One problem row per group of a fused block (its columns by name, laid out by the table's columns)."""
    size, factor, eigvals, rows = ops.weight.element_size(), ops.factor, ops.eigvals, ops.rows
    w_row, g_row = ops.weight_view.stride(0), ops.grad_view.stride(0)
    grad_b, bias = ops.grad_b, ops.bias
    problems = []
    for g in range(factor.shape[0]):
        r0 = g * rows
        columns = dict(
            grad_w=ops.grad_w.data_ptr() + r0 * g_row * size, precond=factor.data_ptr() + g * factor.stride(0) * 4,
            weight=ops.weight.data_ptr() + r0 * w_row * size,
            buf_w=0 if buf_w is None else buf_w.data_ptr() + r0 * w_row * 4, rows=rows, dim=ops.dim,
            grad_w_row=g_row, weight_row=w_row, precond_row=factor.stride(1), precond_cols=factor_cols,
            slot_w=slots[0], grad_b=0 if grad_b is None else grad_b.data_ptr() + r0 * grad_b.stride(0) * size,
            grad_b_stride=0 if grad_b is None else grad_b.stride(0), slot_b=slots[1],
            bias=0 if bias is None else bias.data_ptr() + r0 * bias.stride(0) * size,
            bias_stride=0 if bias is None else bias.stride(0),
            buf_b=0 if buf_b is None else buf_b.data_ptr() + r0 * buf_b.stride(0) * 4, dim_p=ops.dim_p,
            update=0, update_row=0, graft_row=0, pad=0)
        if grafting is not None:
            update_row = linalg.padded_row(ops.dim_p)
            columns.update(update=grafting.elements, update_row=update_row, graft_row=graft_row)
            grafting.elements += rows * update_row
        if eigvals is not None:
            y_row = linalg.padded_row(ops.width)
            columns.update(eigvals=eigvals.data_ptr() + g * eigvals.stride(0) * 4, projection=launch.projection,
                           projection_row=y_row, unused=0)
            launch.projection += rows * y_row
        problems.append(tuple(columns[c] for c in (PROBLEM_COLUMNS if eigvals is None else LOW_RANK_COLUMNS)))
    return problems


def _tile_schedule(problems: list[tuple], block_m: int, block_n: int, columns: str = "dim_p",
                   most: int = 0) -> torch.Tensor:
    """[tiles, TILE_FIELDS] int32 (problem, tile row, tile column, slot) over `rows` × `columns` (a problem
    column: U's D', or the low-rank Y's r, "precond_cols"), the longest K loops first. slot: grafting's
    partial sum of the tile, graft_row·most + the tile's index among its block's (most = 0: 0)."""
    dim, width, rows, graft_row = (PROBLEM_COLUMNS.index(c) for c in ("dim", columns, "rows", "graft_row"))
    order = sorted(range(len(problems)), key=lambda i: -problems[i][dim])  # a tile's work is ∝ its K = D
    taken: dict[int, int] = {}
    tiles = []
    for i in order:
        for tm in range(triton.cdiv(problems[i][rows], block_m)):
            for tn in range(triton.cdiv(problems[i][width], block_n)):
                block_row = problems[i][graft_row]
                index = taken[block_row] = taken.get(block_row, -1) + 1
                tiles.append((i, tm, tn, block_row * most + index if most else 0))
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, TILE_FIELDS.value)


def _graft_arguments(grafting: _Grafting | None, scalars: torch.Tensor) -> dict:
    """The first pass's grafting arguments of the GEMM kernels: its outputs, or (GRAFT off) stand-ins
    that are never read."""
    if grafting is None:
        return dict(updates_ptr=scalars, partials_ptr=scalars, GRAFT=False)
    return dict(updates_ptr=grafting.updates, partials_ptr=grafting.partials, GRAFT=True)


def _problem_tables(plans: Plans, name: tuple, problems: list[tuple], device: torch.device) -> torch.Tensor:
    return plans.table(name, tuple(problems), lambda: torch.tensor(problems, dtype=torch.int64), device)


def _launch_grouped(device: torch.device, dtype: torch.dtype, launch: _Launches, scalars: torch.Tensor,
                    grad_scale: torch.Tensor, found_inf: torch.Tensor, call: _Call) -> None:
    """One launch per variant (VEC) of this device and dtype (grafted: the first pass)."""
    config = CONFIGS[launch_config(device)]
    grafting = call.grafting
    most = 0 if grafting is None else grafting.most
    for vec, problems in launch.dense.items():
        problem_table = _problem_tables(call.plans, (device, dtype, "problems", vec), problems, device)
        tiles = call.plans.table((device, dtype, "tiles", vec), (config["BLOCK_M"], config["BLOCK_N"], most) +
                                 tuple(problems), lambda: _tile_schedule(problems, config["BLOCK_M"],
                                                                         config["BLOCK_N"], most=most), device)
        grouped_update_kernel[(tiles.shape[0],)](
            problem_table, tiles, scalars, grad_scale, found_inf, PARAM_KIND=PARAM_KINDS[dtype],
            INPUT_PRECISION=DOT_PRECISION, VEC=vec, **_graft_arguments(grafting, scalars), **config)
        if grafting is not None:
            grafting.second_pass.append((problem_table, tiles, PROBLEM_FIELDS.value, dtype, vec, config, scalars,
                                         found_inf))


def _launch_low_rank(device: torch.device, dtype: torch.dtype, launch: _Launches, scalars: torch.Tensor,
                     grad_scale: torch.Tensor, found_inf: torch.Tensor, call: _Call) -> None:
    """Two launches per variant (VEC) of this device and dtype: Y = (Ĝ·Q)·diag(s/(s+λ)) for every
    low-rank problem, then U = (Ĝ − Y·Qᵀ)/λ with the SGD epilogue (grafted: grafting's first pass)."""
    if not launch.low_rank:
        return
    config = CONFIGS[launch_config(device)]
    tiles = (config["BLOCK_M"], config["BLOCK_N"])
    grafting, damping = call.grafting, float(call.damping)
    most = 0 if grafting is None else grafting.most
    # the fp32 workspace of Y, grown as needed (offsets live in the problem tables, the base is an argument)
    workspace = call.plans.workspace((device, dtype, "projection"), device, launch.projection)
    for vec, problems in launch.low_rank.items():
        key = tuple(problems)
        table = _problem_tables(call.plans, (device, dtype, "low_rank_problems", vec), problems, device)
        project = call.plans.table((device, dtype, "low_rank_project_tiles", vec), tiles + key,
                                   lambda: _tile_schedule(problems, *tiles, columns="precond_cols"), device)
        steps = call.plans.table((device, dtype, "low_rank_update_tiles", vec), tiles + (most,) + key,
                                 lambda: _tile_schedule(problems, *tiles, most=most), device)
        knobs = dict(PARAM_KIND=PARAM_KINDS[dtype], INPUT_PRECISION=DOT_PRECISION, VEC=vec, **config)
        low_rank_project_kernel[(project.shape[0],)](table, project, workspace, damping, **knobs)
        low_rank_update_kernel[(steps.shape[0],)](table, steps, workspace, scalars, grad_scale, found_inf,
                                                   damping, **_graft_arguments(grafting, scalars), **knobs)
        if grafting is not None:
            grafting.second_pass.append((table, steps, LOW_RANK_FIELDS.value, dtype, vec, config, scalars, found_inf))


def _plain_entry(p: torch.Tensor, slot: int, group: dict, launch: _Launches, call: _Call) -> tuple[tuple, int]:
    """The entry row of a parameter without a preconditioner, and its VEC (1: the scalar variant)."""
    buf, first = call.buffer(slot, p, group, memory_format=torch.contiguous_format)
    scalar_slot = launch.scalar_slot(group, first)
    vec = vector_width(p.dtype)
    if not _aligned(p, p.grad, buf) or p.numel() % vec:
        vec = 1
    row = dict(grad=p.grad.data_ptr(), param=p.data_ptr(), buf=0 if buf is None else buf.data_ptr(),
               numel=p.numel(), slot=scalar_slot, unused=0)
    return tuple(row[c] for c in ENTRY_COLUMNS), vec


def _plain_ready(p: torch.Tensor, buf: torch.Tensor | None) -> bool:
    return (p.dtype in PARAM_KINDS and p.grad.dtype == p.dtype and p.is_contiguous() and p.grad.is_contiguous()
            and (buf is None or buf.is_contiguous()) and p.numel() < 2 ** 31)


def _launch_plain(device: torch.device, dtype: torch.dtype, launch: _Launches, scalars: torch.Tensor,
                  grad_scale: torch.Tensor, found_inf: torch.Tensor, call: _Call) -> None:
    damping = float(call.damping if call.grafting is None else 1.0)  # grafted calls step them with U = G
    numel = ENTRY_COLUMNS.index("numel")
    for vec, entries in launch.plain.items():
        entry_table = _problem_tables(call.plans, (device, dtype, "entries", vec), entries, device)
        tiles = call.plans.table((device, dtype, "plain_tiles", vec), tuple(entries), lambda: torch.tensor(
            [(i, b) for i, row in enumerate(entries) for b in range(triton.cdiv(row[numel], PLAIN_BLOCK))],
            dtype=torch.int64).reshape(-1, 2), device)
        plain_update_kernel[(tiles.shape[0],)](entry_table, tiles, scalars, grad_scale, found_inf, damping,
                                               PARAM_KIND=PARAM_KINDS[dtype], VEC=vec, BLOCK=PLAIN_BLOCK,
                                               num_warps=PLAIN_WARPS, num_stages=1)


def preconditioned_update_(blocks: list, momentum_buffers: list[torch.Tensor | None], *, damping: float,
                           graft: float | None = None, grad_scale: torch.Tensor | None = None,
                           found_inf: torch.Tensor | None = None, reduce_norms=None, plans: Plans | None = None
                           ) -> None:
    """DESIGN §1.4 for all blocks: U = Ĝ·P (low rank: (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ; G/λ without
    either), grafted with the bound κ = `graft` where it is not None (two passes, module docstring), then
    each parameter's SGD epilogue.

    Same contract as `fastfoof.reference.preconditioned_update_`: with found_inf ≠ 0 (a device
    scalar; GradScaler's non-finite gradients) nothing is written, decided on the device; `reduce_norms`
    is called once with the grafted blocks' [‖Ĝ‖², ‖U‖²] (`reference.grafted_updates`). `plans`: the
    caller's kernel plans (tables, workspaces), kept between its calls; None builds them for this call.
    """
    reference.check_graft(graft)
    if not blocks:
        return
    plans = Plans() if plans is None else plans
    grafting = None if graft is None else _Grafting(blocks[0].params[0], plans)
    call = _Call(plans, damping, momentum_buffers, grad_scale, found_inf, grafting)
    launches: dict[tuple, _Launches] = {}  # (device, dtype) -> its launches
    slot = 0
    for block in blocks:
        first = block.params[0]
        _lay_out(block, slot, launches.setdefault((first.device, first.dtype), _Launches()), call)
        slot += len(block.params)
    if grafting is not None:
        grafting.allocate()
    for (device, dtype), launch in launches.items():
        if not launch.scalar_rows:
            continue
        scalars = plans.table((device, dtype, "scalars"), tuple(launch.scalar_rows),
                              lambda: torch.tensor(launch.scalar_rows, dtype=torch.float32), device)
        scale = plans.constant(1.0, device) if grad_scale is None else grad_scale.to(torch.float32)
        skip = plans.constant(0.0, device) if found_inf is None else found_inf.to(torch.float32)
        for run in (_launch_grouped, _launch_low_rank, _launch_plain):
            run(device, dtype, launch, scalars, scale, skip, call)
    if grafting is not None:
        grafting.finish(momentum_buffers, grad_scale, found_inf, reduce_norms, graft * damping)


def _lay_out(block, slot: int, launch: _Launches, call: _Call) -> None:
    """A block's rows in its device and dtype's launches, or its reference update (`reference_block`)."""
    first = block.params[0]
    if first.grad is None:
        return
    if block.precond is None and block.eigvecs is None:
        if _plain_ready(first, call.buffers[slot]):
            entry, vec = _plain_entry(first, slot, block.options[0], launch, call)
            launch.plain.setdefault(vec, []).append(entry)
        else:
            reference_block(block, slot, call, damping=call.damping if call.grafting is None else 1.0)
        return
    row = None if call.grafting is None else call.grafting.add(block)
    fused = _fused_problems(block, slot, launch, call, row)
    if fused is None:
        reference_block(block, slot, call, graft_row=row)
    else:
        (launch.dense if block.eigvecs is None else launch.low_rank).setdefault(fused[1], []).extend(fused[0])


def reference_block(block, slot: int, call: _Call, *, damping: float | None = None,
                    graft_row: int | None = None) -> None:
    """Where a block goes that the kernels cannot take: the reference update (`damping` for a block without
    a preconditioner: λ, or 1 when grafting). Grafted (`graft_row` given): its U now, its norms with the
    others' and its step once the scales are known (`_Grafting.finish`)."""
    damping = call.damping if damping is None else damping
    if graft_row is not None:
        call.grafting.defer(graft_row, block, slot, reference.block_updates(block, damping))
        return
    own = call.buffers[slot:slot + len(block.params)]
    reference.preconditioned_update_([block], own, damping=damping, grad_scale=call.grad_scale,
                                     found_inf=call.found_inf)
    call.buffers[slot:slot + len(own)] = own


class _Grafting:
    """Grafting's state for one call (DESIGN §1.4), on the device of the call's blocks: a row of
    [‖Ĝ‖², ‖U‖²] per grafted block, in block order (`reduce_norms`' rows).

    Fused blocks: the first pass (the GEMM kernels with GRAFT on) stores U, fp32 with GradScaler's scale
    in it, in the update workspace and each tile's Σu² in its own slot of `partials` ([rows, most tiles
    of a row], zero-filled once per layout; the slots a layout's tiles own are rewritten every call, the
    others stay 0), so ‖U‖² = partials.sum(1), a fixed-order sum, and nothing is atomic. ‖Ĝ‖² of their
    parameters' own gradients: one torch._foreach_norm (fp32) for them all. Reference blocks (`defer`):
    both from `reference.graft_squares`, their U kept until the scales are known. `finish`: the scales
    of `reference.graft_scales` (after `reduce_norms`), the second pass (`graft_step_kernel`: U read
    back, times scale / grad_scale, the SGD epilogue), and the reference blocks' steps."""

    def __init__(self, first: torch.Tensor, plans: Plans):
        self.first = first  # the call's first parameter: the device, and the dtype of an empty [0, 2]
        self.plans = plans
        self.blocks: list = []  # the grafted blocks
        self.tiles: list[int] = []  # per row: the first pass's tiles of its problems (0: a reference block)
        self.grads: list[torch.Tensor] = []  # the fused rows' own gradients (weight and bias)
        self.grad_rows: list[tuple[int, int]] = []  # per row: its positions in grads (-1: none)
        self.deferred: list[tuple] = []  # (row, block, slot, U) of the reference blocks
        self.second_pass: list[tuple] = []  # what each first-pass launch hands to graft_step_kernel
        self.elements = 0  # update workspace elements taken
        self.most = 0  # tiles of the row with the most: the partial sums' row length
        self.partials = self.updates = None  # the first pass's outputs (`allocate`)

    def add(self, block) -> int:
        """A grafted block's row."""
        if block.params[0].device != self.first.device:
            raise ValueError(f"graft: the blocks of one call must share a device, got {self.first.device} "
                             f"and {block.params[0].device}")
        self.blocks.append(block)
        self.tiles.append(0)
        self.grad_rows.append((-1, -1))
        return len(self.blocks) - 1

    def fused(self, row: int, block, problems: list[tuple], config: str) -> None:
        rows, dim_p = PROBLEM_COLUMNS.index("rows"), PROBLEM_COLUMNS.index("dim_p")
        block_m, block_n = CONFIGS[config]["BLOCK_M"], CONFIGS[config]["BLOCK_N"]
        self.tiles[row] = sum(triton.cdiv(p[rows], block_m) * triton.cdiv(p[dim_p], block_n) for p in problems)
        grads = [p.grad for p in block.params if p.grad is not None]
        self.grad_rows[row] = tuple(range(len(self.grads), len(self.grads) + len(grads))) + (-1,) * (2 - len(grads))
        self.grads += grads

    def defer(self, row: int, block, slot: int, block_us: list) -> None:
        self.deferred.append((row, block, slot, block_us))

    def allocate(self) -> None:
        """The first pass's outputs, once every block has its row."""
        device = self.first.device
        self.most = max(self.tiles, default=0) or 1
        self.partials = self.plans.table((device, "graft_partials"), (self.most,) + tuple(self.tiles),
                                         lambda: torch.zeros(len(self.tiles), self.most), device)
        # grafting's U of the fused blocks of every dtype, grown as needed (offsets live in the problem tables)
        self.updates = self.plans.workspace((device, "updates"), device, self.elements)

    def squares(self) -> torch.Tensor:
        """[‖Ĝ‖², ‖U‖²] per row (the reference's dtype: the rows' statistics dtypes promoted)."""
        first = self.first
        if not self.blocks:
            return first.new_zeros(0, 2, dtype=linalg.stat_dtype(first.dtype))
        u2 = self.partials.sum(1)
        g2 = torch.zeros_like(u2)
        if self.grads:
            norms = torch.stack(torch._foreach_norm(self.grads, 2, dtype=torch.float32))
            none = len(self.grads)  # the index of the zero appended for a missing gradient
            index = self.plans.table((first.device, "graft_grad_rows"), tuple(self.grad_rows), lambda: torch.tensor(
                [[none if i < 0 else i for i in row] for row in self.grad_rows], dtype=torch.int64), first.device)
            g2 = torch.cat([norms.square(), norms.new_zeros(1)])[index].sum(1)
        dtype = functools.reduce(torch.promote_types, [linalg.stat_dtype(b.params[0].dtype) for b in self.blocks])
        squares = torch.stack([g2, u2], 1).to(dtype)
        if self.deferred:
            rows, blocks, _, block_us = zip(*self.deferred)
            squares[list(rows)] = reference.graft_squares(list(blocks), list(block_us), first).to(dtype)
        return squares

    def finish(self, buffers: list, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
               reduce_norms, cap: float) -> None:
        squares = self.squares()
        if reduce_norms is not None:
            squares = reduce_norms(squares, self.blocks)
        scales = reference.graft_scales(squares, cap)
        if self.second_pass:
            factors = scales.to(torch.float32)
            if grad_scale is not None:
                factors = factors / grad_scale.to(torch.float32)
            for table, tiles, fields, dtype, vec, config, scalars, skip in self.second_pass:
                graft_step_kernel[(tiles.shape[0],)](
                    table, tiles, self.updates, factors, scalars, skip, FIELDS=fields, PARAM_KIND=PARAM_KINDS[dtype],
                    VEC=vec, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], num_warps=GRAFT_STEP_WARPS,
                    num_stages=1)
        skip = None if found_inf is None else found_inf != 0
        if self.deferred:
            rows, _, _, block_us = zip(*self.deferred)
            reference.scale_updates_(list(block_us), scales[list(rows)])
        for _, block, slot, block_us in self.deferred:
            reference.step_block_(block, block_us, buffers, slot, grad_scale, skip)
