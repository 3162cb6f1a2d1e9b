"""Patch gram by implicit im2col (DESIGN §2.1): out ← β·out + α·Σ a aᵀ straight from the input.

Four paths behind one op (`patch_gram_`); tests and benchmarks force each through `run_patch_gram`:
- "implicit" (`_partial_gram_kernel`): any Linear/Conv1d/Conv2d input, any strides, columns in
  F.unfold order. Every patch entry has its own index arithmetic and bounds mask (the zero
  padding), so its loads are scalar (32-bit fp32, 16-bit bf16 in sm_90 SASS).
- "dense" (`_dense_partial_kernel`): inputs whose patch rows are a strided [outer, inner, channels]
  view (`dense_rows`: Linear with any leading dims, 1×1 stride-1 unpadded convs). No per-entry
  arithmetic; loads vectorise along whichever of rows (NCHW: positions) or channels (Linear,
  channels_last) has stride 1 (128-bit LDGSTS where the launcher sees 16-divisible strides).
- "channels_last" (`_partial_gram_kernel` with TAP_MAJOR): any conv; vector loads where the
  channel stride is 1. Column tiles are (kernel offset, channel block) in the padded tap-major
  order p = offset·channels_pad + channel, so a tile is one offset's contiguous channels and its
  bounds test is per row; the reduce pass maps p back to the F.unfold order (channel-major, then
  kernel offsets) when it writes `out`. The bias entry sits right after the last real channel.
- "matmul" (`gram_matmul_`): dense inputs with a single row level (Linear, channels_last 1×1,
  one-sample NCHW 1×1): AᵀA is one cuBLAS bmm over a view of x (fp32 output from 16-bit inputs),
  the bias row from column sums, the lower triangle mirrored.

`choose_path` is the dispatch rule: matmul for one row level, dense for NCHW 1×1, channels_last
for channel-contiguous inputs with a channel count per group divisible by 16, implicit otherwise.
DESIGN asks for the fastest measured path per shape; nobody has measured these on a GPU yet, so
the rule encodes the expected winners and bench/test_bench_patch_gram.py has a row per path.

The Triton paths take two launches, no atomics:
1. a partial kernel, grid (tile pairs, splits, groups): each program owns one upper-triangle tile
   pair (i ≤ j) of the group's [D', D'] matrix (in the path's column order) and one contiguous
   chunk of the patch rows, and accumulates Aᵢᵀ·Aⱼ in fp32 with `tl.dot` into a workspace slot.
   The bias column is a constant 1 in valid rows.
2. `_reduce_kernel`, grid (tile pairs, row blocks, groups): sums a pair's partials over the splits
   in a fixed order (bitwise reproducible), applies β·out + α·Σ and writes the tile and its mirror
   at their `out` positions.

Every op is treated as a 2-d convolution: Linear rows are samples with 1×1 "images", Conv1d has
height 1. Conv3d and float64 stay on the reference.

Index widths: offsets inside one sample and patch-row numbers are int32; sample bases, the dense
path's row offsets, workspace slots and `out` offsets (D'² may pass 2³¹) are int64.
`samples_per_launch` keeps the int32 ones in range by launching the batch in chunks of samples
(beta = 1 after the first), and `patch_gram_` sends an input whose single sample spans more than
2³¹ elements, or has 2³⁰ patch rows, to the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from fastfoof import reference
from fastfoof.geometry import PatchGeometry, patch_input


@triton.jit
def _tile_pair(pair):
    """Upper-triangle tile pair (ti ≤ tj) numbered pair = tj·(tj+1)/2 + ti."""
    tj = ((tl.sqrt(8.0 * pair + 1.0) - 1.0) * 0.5).to(tl.int32)
    # the float root can be one off either way
    tj = tl.where(tj * (tj + 1) // 2 > pair, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pair, tj + 1, tj)
    return pair - tj * (tj + 1) // 2, tj


# Marks a row or column whose loads must all be masked off: far outside any input, and two of them
# added still fit in int32.
OUTSIDE = tl.constexpr(-(1 << 29))


@triton.jit
def _with_bias(a, valid, is_bias, dtype):
    """A loaded tile with 1 in the bias column of valid rows, in the input dtype for tl.dot."""
    return tl.where(valid[:, None] & is_bias[None, :], 1.0, a).to(dtype)


@triton.jit
def _patch_rows(x_ptr, n, end, positions_per_sample, out_w, stride_h, stride_w, pad_h, pad_w,
                x_stride_b, x_stride_h, x_stride_w):
    """Per patch row n (sample, output position): its sample's base pointer, the input coordinates
    of its kernel offset (0, 0) (ih = OUTSIDE past `end`), its offset in the sample, and validity."""
    valid = n < end
    sample = n // positions_per_sample
    position = n % positions_per_sample
    ih = tl.where(valid, (position // out_w) * stride_h - pad_h, OUTSIDE)
    iw = (position % out_w) * stride_w - pad_w
    return x_ptr + sample.to(tl.int64) * x_stride_b, ih, iw, ih * x_stride_h + iw * x_stride_w, valid


@triton.jit
def _store_partial(ws_ptr, acc, group, split, pair, num_pairs, num_splits, BLOCK_D: tl.constexpr):
    r = tl.arange(0, BLOCK_D)
    slot = ((group * num_splits + split).to(tl.int64) * num_pairs + pair) * (BLOCK_D * BLOCK_D)
    tl.store(ws_ptr + slot + r[:, None] * BLOCK_D + r[None, :], acc)


@triton.jit
def _column_tile(tile, group, channels, channels_pad, kernel_w, kernel_hw, bias_index, dil_h, dil_w,
                 x_stride_c, x_stride_h, x_stride_w, BLOCK_D: tl.constexpr, TAP_MAJOR: tl.constexpr):
    """One column tile: its entries' offsets in a sample, kernel displacements dh, dw, which
    entries are real patch entries, and which is the bias entry.

    F.unfold order (d = channel·kernel_hw + offset): per-entry displacements, with dh = OUTSIDE
    past the patch, which masks those loads off. TAP_MAJOR (p = offset·channels_pad + channel, the
    tile within one offset): scalar dh, dw, and `real` masks the channel padding."""
    d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    if TAP_MAJOR:
        first = tile * BLOCK_D
        offset = first // channels_pad
        c = first % channels_pad + tl.arange(0, BLOCK_D)
        real = c < tl.where(offset < kernel_hw, channels, 0)  # one compare (the interpreter mistypes a scalar &)
    else:
        offset = d % kernel_hw
        c = d // kernel_hw
        real = d < channels * kernel_hw
    dh = (offset // kernel_w) * dil_h
    dw = (offset % kernel_w) * dil_w
    address = (group * channels + c) * x_stride_c + (dh * x_stride_h + dw * x_stride_w)
    if not TAP_MAJOR:
        dh = tl.where(real, dh, OUTSIDE)
    return address, dh, dw, real, d == bias_index


@triton.jit
def _load_patch_tile(row_ptr, row_address, ih, iw, valid, address, dh, dw, real, is_bias, in_h, in_w,
                     TAP_MAJOR: tl.constexpr):
    """[positions, patch entries] tile of A: zero outside the input, 1 in the bias column."""
    if TAP_MAJOR:
        # one bounds test per row; signed compares, as the unsigned trick below leaves ptxas an
        # unused stack frame here (BLOCK_D = 16, sm_90), which reads as a spill
        h = ih + dh
        w = iw + dw
        inside = valid & (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w)
        mask = inside[:, None] & real[None, :]
    else:
        h = ih[:, None] + dh[None, :]
        w = iw[:, None] + dw[None, :]
        # one unsigned compare per bound: negative coordinates wrap to huge values
        mask = (h.to(tl.uint32) < in_h) & (w.to(tl.uint32) < in_w)
    a = tl.load(row_ptr[:, None] + (row_address[:, None] + address[None, :]), mask=mask, other=0.0)
    return _with_bias(a, valid, is_bias, row_ptr.dtype.element_ty)


@triton.jit
def _partial_gram_kernel(
    x_ptr, ws_ptr,
    n_positions, positions_per_sample, out_w, chunk,
    channels, channels_pad, kernel_w, kernel_hw, bias_index,
    in_h, in_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    num_pairs, num_splits,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, TAP_MAJOR: tl.constexpr,
):
    """Partial pass over samples × output positions: the "implicit" path, or with TAP_MAJOR the
    "channels_last" one (see `_column_tile`)."""
    pair = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    ti, tj = _tile_pair(pair)
    address_i, dh_i, dw_i, real_i, bias_i = _column_tile(
        ti, group, channels, channels_pad, kernel_w, kernel_hw, bias_index, dil_h, dil_w,
        x_stride_c, x_stride_h, x_stride_w, BLOCK_D, TAP_MAJOR)
    address_j, dh_j, dw_j, real_j, bias_j = _column_tile(
        tj, group, channels, channels_pad, kernel_w, kernel_hw, bias_index, dil_h, dil_w,
        x_stride_c, x_stride_h, x_stride_w, BLOCK_D, TAP_MAJOR)

    start = split * chunk
    end = tl.minimum(start + chunk, n_positions)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for k in range(start, end, BLOCK_K):
        row_ptr, ih, iw, row_address, valid = _patch_rows(
            x_ptr, k + tl.arange(0, BLOCK_K), end, positions_per_sample, out_w, stride_h, stride_w,
            pad_h, pad_w, x_stride_b, x_stride_h, x_stride_w)
        a_i = _load_patch_tile(row_ptr, row_address, ih, iw, valid, address_i, dh_i, dw_i, real_i, bias_i,
                               in_h, in_w, TAP_MAJOR)
        a_j = _load_patch_tile(row_ptr, row_address, ih, iw, valid, address_j, dh_j, dw_j, real_j, bias_j,
                               in_h, in_w, TAP_MAJOR)
        acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision=INPUT_PRECISION)
    _store_partial(ws_ptr, acc, group, split, pair, num_pairs, num_splits, BLOCK_D)


@triton.jit
def _load_dense_tile(row_ptr, valid, address, cols, dim, dim_p):
    a = tl.load(row_ptr[:, None] + address[None, :], mask=valid[:, None] & (cols < dim)[None, :], other=0.0)
    return _with_bias(a, valid, (cols == dim) & (cols < dim_p), row_ptr.dtype.element_ty)


@triton.jit
def _dense_partial_kernel(
    x_ptr, ws_ptr,
    inner, blocks_per_outer, num_blocks, chunk_blocks,
    dim, dim_p, stride_outer, stride_inner, stride_channel,
    num_pairs, num_splits,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The "dense" path's partial pass: row (o, i) of the patch matrix starts at
    o·stride_outer + i·stride_inner, its entries `stride_channel` apart. Row blocks never straddle
    two outer indices, so a stride-1 inner dim gives contiguous rows."""
    pair = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    ti, tj = _tile_pair(pair)
    cols_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    address_i = (group * dim + cols_i) * stride_channel
    address_j = (group * dim + cols_j) * stride_channel

    first = split * chunk_blocks
    last = tl.minimum(first + chunk_blocks, num_blocks)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for block in range(first, last):
        outer = block // blocks_per_outer
        rows = (block - outer * blocks_per_outer) * BLOCK_K + tl.arange(0, BLOCK_K)
        valid = rows < inner
        # int64 rows: a Linear's flattened input may hold more than 2³¹ elements
        row_ptr = x_ptr + outer.to(tl.int64) * stride_outer + rows.to(tl.int64) * stride_inner
        a_i = _load_dense_tile(row_ptr, valid, address_i, cols_i, dim, dim_p)
        a_j = _load_dense_tile(row_ptr, valid, address_j, cols_j, dim, dim_p)
        acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision=INPUT_PRECISION)
    _store_partial(ws_ptr, acc, group, split, pair, num_pairs, num_splits, BLOCK_D)


@triton.jit
def _out_index(p, channels_pad, channels, kernel_hw, bias_index, dim):
    """Row/column of `out` (F.unfold order) of padded tap-major index p = offset·channels_pad + c,
    and whether p is a real entry. channels_pad = channels = D', kernel_hw = 1 is the identity."""
    tap = p // channels_pad
    c = p % channels_pad
    is_bias = p == bias_index
    return tl.where(is_bias, dim, c * kernel_hw + tap), ((c < channels) & (tap < kernel_hw)) | is_bias


@triton.jit
def _reduce_kernel(
    ws_ptr, out_ptr, alpha, beta,
    channels_pad, channels, kernel_hw, bias_index, dim,
    num_pairs, num_splits,
    out_stride_g, out_stride_r, out_stride_c,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows [BLOCK_R·program_id(1), +BLOCK_R) of one tile pair's sum over the splits, to `out`."""
    pair = tl.program_id(0)
    row_block = tl.program_id(1)
    group = tl.program_id(2)
    ti, tj = _tile_pair(pair)
    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    slot = (group.to(tl.int64) * num_splits * num_pairs + pair) * (BLOCK_D * BLOCK_D)
    partials = ws_ptr + slot + r[:, None] * BLOCK_D + c[None, :]
    total = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for _ in range(0, num_splits):  # fixed order: reruns are bitwise equal
        total += tl.load(partials)
        # one split's workspace: int32 suffices, as with 2 splits or more it is < WORKSPACE_ELEMENTS
        partials += num_pairs * (BLOCK_D * BLOCK_D)

    rows = ti * BLOCK_D + r
    cols = tj * BLOCK_D + c
    out_rows, real_rows = _out_index(rows, channels_pad, channels, kernel_hw, bias_index, dim)
    out_cols, real_cols = _out_index(cols, channels_pad, channels, kernel_hw, bias_index, dim)
    inside = real_rows[:, None] & real_cols[None, :]
    # The tile goes to (i, j) and its mirror to (j, i). On a diagonal tile the upper part (with
    # the diagonal) is written from here and the strict lower part as its mirror: an exactly
    # symmetric update, and no element is written twice.
    upper = inside & (rows[:, None] <= cols[None, :])
    lower = inside & (rows[:, None] < cols[None, :])
    keep = beta != 0  # β = 0 overwrites: NaN/inf already in `out` must not survive
    out_rows = out_rows.to(tl.int64)  # D'² may pass 2³¹
    out_cols = out_cols.to(tl.int64)
    base = out_ptr + group.to(tl.int64) * out_stride_g
    ptr_upper = base + out_rows[:, None] * out_stride_r + out_cols[None, :] * out_stride_c
    ptr_lower = base + out_cols[None, :] * out_stride_r + out_rows[:, None] * out_stride_c
    old_upper = tl.load(ptr_upper, mask=upper & keep, other=0.0)
    old_lower = tl.load(ptr_lower, mask=lower & keep, other=0.0)
    tl.store(ptr_upper, beta * old_upper + alpha * total, mask=upper)
    tl.store(ptr_lower, beta * old_lower + alpha * total, mask=lower)


@dataclass(frozen=True)
class TileConfig:
    block_d: int  # patch entries per tile side
    block_k: int  # positions per tl.dot
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"BLOCK_D={self.block_d},BLOCK_K={self.block_k},w{self.num_warps},s{self.num_stages}"


# The dispatch picks the smallest tile side that covers D' (tiny-D depthwise layers get 16).
CONFIGS = (
    TileConfig(16, 32, 4, 2),
    TileConfig(32, 32, 4, 2),
    TileConfig(64, 32, 8, 2),
    TileConfig(128, 16, 8, 2),
)
# The dense and channels_last paths' tiles: the same sides, with three cp.async stages (their loads
# are vector LDGSTS; with two stages ptxas spills a register in some builds: 16-bit BLOCK_D ≥ 64 on
# sm_80, fp32 BLOCK_D = 32 on sm_90, under the launcher's specialisation).
PIPELINED_CONFIGS = tuple(TileConfig(c.block_d, c.block_k, c.num_warps, 3) for c in CONFIGS)
PATHS = ("implicit", "dense", "channels_last", "matmul")
REDUCE_WARPS = 4
REDUCE_ELEMENTS = 2048  # elements of a tile one reduce program writes (keeps its registers low)
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Splits aim at this many programs per SM; each split covers at least MIN_SPLIT_BLOCKS dot steps,
# and all partials together stay under WORKSPACE_ELEMENTS fp32 values.
PROGRAMS_PER_SM = 4
MIN_SPLIT_BLOCKS = 4
WORKSPACE_ELEMENTS = 1 << 25
MAX_GRID_Y = 65535
INTERPRETER_SMS = 4  # stands in for the SM count of CPU tensors (TRITON_INTERPRET)
INT32_MAX = 2 ** 31 - 1
# Patch rows per launch: row indices, `split·chunk` and `start + chunk` stay below 2³¹.
MAX_LAUNCH_POSITIONS = 1 << 30


def choose_config(dim_p: int, configs: tuple[TileConfig, ...] = CONFIGS) -> TileConfig:
    for config in configs:
        if dim_p <= config.block_d:
            return config
    return configs[-1]


def choose_tap_config(channels: int) -> TileConfig:
    """The channels_last tile: least channel padding per kernel offset, then the widest tile."""
    return min(PIPELINED_CONFIGS, key=lambda c: (triton.cdiv(channels, c.block_d) * c.block_d, -c.block_d))


def choose_splits(n_positions: int, work_items: int, config: TileConfig, sm_count: int) -> int:
    """How many position chunks: enough programs to fill the GPU, bounded workspace and chunk size."""
    splits = triton.cdiv(PROGRAMS_PER_SM * sm_count, work_items)
    splits = min(splits, triton.cdiv(n_positions, MIN_SPLIT_BLOCKS * config.block_k))
    splits = min(splits, WORKSPACE_ELEMENTS // (work_items * config.block_d ** 2), MAX_GRID_Y)
    return max(1, splits)


def default_input_precision(x: torch.Tensor) -> str:
    """TF32 dots for fp32 inputs on the GPU (DESIGN §4 bound 5e-3); exact fp32 elsewhere."""
    return "tf32" if x.is_cuda and x.dtype == torch.float32 else "ieee"


def kernel_applies(out: torch.Tensor, x: torch.Tensor, module: nn.Module) -> bool:
    """Whether the kernels handle this call; float64 and Conv3d stay on the reference."""
    return (out.dtype == torch.float32 and x.dtype in TRITON_DTYPES
            and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)))


@dataclass(frozen=True)
class DenseRows:
    """The patch rows of a Linear or 1×1 stride-1 unpadded conv input as the strided view
    [outer, inner, channels]: row (o, i) starts at o·stride_outer + i·stride_inner."""
    outer: int
    inner: int
    stride_outer: int
    stride_inner: int
    stride_channel: int


def dense_rows(x: torch.Tensor, geom: PatchGeometry) -> DenseRows | None:
    """`x` (from `patch_input`) as DenseRows, or None where its patch rows need more than two
    stride levels (or the layer is not 1×1, stride 1, unpadded)."""
    if any(k != 1 for k in geom.kernel) or any(s != 1 for s in geom.stride) or any(geom.padding):
        return None
    # row dims: samples, then spatial dims; size-1 dims carry no stride
    levels = [(n, s) for n, s in zip(x.shape[:1] + x.shape[2:], x.stride()[:1] + x.stride()[2:]) if n != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in reversed(levels):  # innermost first
        if merged and stride == merged[-1][0] * merged[-1][1]:
            merged[-1] = (size * merged[-1][0], merged[-1][1])
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        return None
    # a missing level gets stride 0, not 1: a 16-divisible stride keeps the row pointers' alignment
    # visible to the compiler (a stride of 1 would be specialised to a constant of unknown multiple)
    inner, stride_inner = merged[0] if merged else (1, 0)
    outer, stride_outer = merged[1] if len(merged) == 2 else (1, 0)
    return DenseRows(outer, inner, stride_outer, stride_inner, x.stride(1))


def applicable_paths(x: torch.Tensor, geom: PatchGeometry) -> tuple[str, ...]:
    """The paths that can run this input (x, geom from `patch_input`). "channels_last" runs any
    conv, with vector loads only where the channel stride is 1."""
    rows = dense_rows(x, geom)
    return (("implicit",) + (("channels_last",) if geom.kernel else ()) + (("dense",) if rows else ())
            + (("matmul",) if rows and rows.outer == 1 else ()))


def choose_path(x: torch.Tensor, geom: PatchGeometry) -> str:
    """The path for one input (x, geom from `patch_input`). DESIGN's rule is the fastest measured
    path per shape; until a GPU run of bench/test_bench_patch_gram.py's per-path rows sets it, each
    line is the expected winner:
    - one row level (Linear, channels_last 1×1): AᵀA is a plain GEMM, where cuBLAS is at the roofline;
    - NCHW 1×1: per-sample [channels, positions] rows, contiguous along positions: vector loads;
    - channels_last with a channel count per group that no tile pads: contiguous channel loads;
    - everything else (NCHW k×k, depthwise, few channels): per-entry index arithmetic.
    """
    rows = dense_rows(x, geom)
    if rows is not None:
        return "matmul" if rows.outer == 1 else "dense"
    if x.stride(1) == 1 and (geom.channels // geom.groups) % CONFIGS[0].block_d == 0:
        return "channels_last"
    return "implicit"


def sample_span(x: torch.Tensor) -> int:
    """Largest element offset inside one sample of `x`."""
    return sum((n - 1) * abs(s) for n, s in zip(x.shape[1:], x.stride()[1:]))


def samples_per_launch(x: torch.Tensor, geom: PatchGeometry) -> int:
    """How many samples one Triton launch may take with its int32 indices in range: offsets inside
    a sample (including the kernel displacements) and patch-row numbers. 0: not even one sample
    (the input must take the reference)."""
    if sample_span(x) > INT32_MAX or geom.positions > MAX_LAUNCH_POSITIONS:
        return 0
    return MAX_LAUNCH_POSITIONS // geom.positions


def gram_matmul_(out: torch.Tensor, x: torch.Tensor, geom: PatchGeometry, rows: DenseRows, *,
                 alpha: float, beta: float, bias: bool) -> torch.Tensor:
    """The "matmul" path: AᵀA by one cuBLAS bmm over a strided view of `x` (no copy of A in fp32
    or 16-bit), the bias row from column sums, then the mirrored lower triangle into `out`."""
    groups, dim = geom.groups, geom.dim
    a = x.as_strided((groups, rows.inner, dim), (dim * rows.stride_channel, rows.stride_inner, rows.stride_channel))
    if a.dtype != torch.float32 and not a.is_cuda:  # CPU bmm has no fp32 output for 16-bit inputs
        a = a.float()
    gram = out.new_empty(out.shape)
    if a.dtype == torch.float32:
        torch.bmm(a.mT, a, out=gram[:, :dim, :dim])
    else:
        gram[:, :dim, :dim] = torch.bmm(a.mT, a, out_dtype=torch.float32)
    if bias:
        gram[:, dim, :dim] = a.sum(1, dtype=torch.float32)
        gram[:, dim, dim] = rows.inner
    # a GEMM's AᵀA need not be bitwise symmetric: mirror the lower triangle (DESIGN §2.1)
    gram = gram.tril().add_(gram.tril(-1).mT)
    return out.mul_(beta).add_(gram, alpha=alpha) if beta else torch.mul(gram, alpha, out=out)


def _splits(row_blocks: int, work_items: int, config: TileConfig, splits: int | None, device) -> tuple[int, int]:
    """(row blocks per split, splits) for a partial pass over `row_blocks` blocks of block_k rows."""
    if splits is None:
        sm_count = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                    else INTERPRETER_SMS)
        splits = choose_splits(row_blocks * config.block_k, work_items, config, sm_count)
    chunk = triton.cdiv(row_blocks, splits)
    return chunk, triton.cdiv(row_blocks, chunk)


def _reduce(workspace, out, alpha, beta, config, num_pairs, splits, groups, out_index):
    reduce_rows = min(REDUCE_ELEMENTS // config.block_d, config.block_d)
    _reduce_kernel[(num_pairs, config.block_d // reduce_rows, groups)](
        workspace, out, float(alpha), float(beta),
        *out_index,
        num_pairs, splits,
        *out.stride(),
        BLOCK_D=config.block_d, BLOCK_R=reduce_rows, num_warps=REDUCE_WARPS, num_stages=1,
    )


def as_2d_conv(x: torch.Tensor, geom: PatchGeometry) -> tuple[dict, tuple[int, ...]]:
    """Geometry of a Linear/Conv1d/Conv2d input as a 2-d convolution, and x's [b, c, h, w] strides."""
    nd = len(geom.kernel)
    pad = (0,) * (2 - nd)
    one = (1,) * (2 - nd)
    shape = {
        "kernel": one + geom.kernel, "stride": one + geom.stride, "dilation": one + geom.dilation,
        "padding": pad + geom.padding, "in_size": one + geom.in_size, "out_size": one + geom.out_size,
    }
    strides = tuple(x.stride())
    strides = strides[:2] + (0,) * (2 - nd) + strides[2:]
    return shape, strides


def _identity_index(dim_p: int, dim: int) -> tuple[int, int, int, int, int]:
    """`_reduce`'s out_index for a workspace already in F.unfold order: tile row i is out row i."""
    return (dim_p, dim_p, 1, -1, dim)


def launch_positions(out, x, geom, *, alpha, beta, dim_p, path, input_precision, splits, config):
    """The implicit and channels_last paths: partial pass over samples × output positions, reduce."""
    groups = geom.groups
    shape, (sb, sc, sh, sw) = as_2d_conv(x, geom)
    (kh, kw), (out_h, out_w) = shape["kernel"], shape["out_size"]
    channels = geom.channels // groups
    tap_major = path == "channels_last"
    bias = dim_p - geom.dim
    if tap_major:
        config = config or choose_tap_config(channels)
        channels_pad = triton.cdiv(channels, config.block_d) * config.block_d
        padded = (kh * kw - 1) * channels_pad + channels + bias  # the bias right after the last channel
        bias_index = padded - 1 if bias else -1
        out_index = (channels_pad, channels, kh * kw, bias_index, geom.dim)
    else:
        config = config or choose_config(dim_p)
        channels_pad = channels  # F.unfold order: no padding between kernel offsets
        padded = dim_p
        bias_index = geom.dim if bias else -1
        out_index = _identity_index(dim_p, geom.dim)
    tiles = triton.cdiv(padded, config.block_d)
    num_pairs = tiles * (tiles + 1) // 2
    n_positions = x.shape[0] * geom.positions
    chunk, splits = _splits(triton.cdiv(n_positions, config.block_k), num_pairs * groups, config, splits, x.device)
    chunk *= config.block_k
    workspace = torch.empty(groups * splits * num_pairs * config.block_d ** 2, dtype=torch.float32,
                            device=out.device)
    _partial_gram_kernel[(num_pairs, splits, groups)](
        x, workspace,
        n_positions, out_h * out_w, out_w, chunk,
        channels, channels_pad, kw, kh * kw, bias_index,
        *shape["in_size"], *shape["stride"], *shape["padding"], *shape["dilation"],
        sb, sc, sh, sw,
        num_pairs, splits,
        BLOCK_D=config.block_d, BLOCK_K=config.block_k, INPUT_PRECISION=input_precision, TAP_MAJOR=tap_major,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _reduce(workspace, out, alpha, beta, config, num_pairs, splits, groups, out_index)


def launch_dense(out, x, geom, rows, *, alpha, beta, dim_p, input_precision, splits, config):
    config = config or choose_config(dim_p, PIPELINED_CONFIGS)
    tiles = triton.cdiv(dim_p, config.block_d)
    num_pairs = tiles * (tiles + 1) // 2
    blocks_per_outer = triton.cdiv(rows.inner, config.block_k)
    num_blocks = rows.outer * blocks_per_outer
    chunk, splits = _splits(num_blocks, num_pairs * geom.groups, config, splits, x.device)
    workspace = torch.empty(geom.groups * splits * num_pairs * config.block_d ** 2, dtype=torch.float32,
                            device=out.device)
    _dense_partial_kernel[(num_pairs, splits, geom.groups)](
        x, workspace,
        rows.inner, blocks_per_outer, num_blocks, chunk,
        geom.dim, dim_p, rows.stride_outer, rows.stride_inner, rows.stride_channel,
        num_pairs, splits,
        BLOCK_D=config.block_d, BLOCK_K=config.block_k, INPUT_PRECISION=input_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _reduce(workspace, out, alpha, beta, config, num_pairs, splits, geom.groups,
            _identity_index(dim_p, geom.dim))


def run_patch_gram(out: torch.Tensor, x: torch.Tensor, geom: PatchGeometry, *, alpha: float, beta: float,
                   bias: bool, input_precision: str, path: str | None = None, splits: int | None = None,
                   config: TileConfig | None = None) -> torch.Tensor:
    """`patch_gram_` on an input already through `patch_input`, with the knobs exposed (tests force
    paths, IEEE dots, split counts and configs). `config` sets the tile; for "channels_last" its
    block_d also sets the channel padding."""
    path = path or choose_path(x, geom)
    if path not in applicable_paths(x, geom):
        raise ValueError(f"path: {path!r} is not one of this input's paths {applicable_paths(x, geom)}")
    if x.shape[0] == 0:
        return out.mul_(beta) if beta else out.zero_()
    if path == "matmul":
        return gram_matmul_(out, x, geom, dense_rows(x, geom), alpha=alpha, beta=beta, bias=bias)
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        # Triton's interpreter (3.9) multiplies bf16 bit patterns in tl.dot; fp32 holds bf16 exactly.
        x = x.float()
    per_launch = samples_per_launch(x, geom)
    if per_launch == 0:
        raise ValueError("x: one sample exceeds the kernels' int32 offsets; use the reference")
    knobs = dict(dim_p=geom.dim + bias, input_precision=input_precision, splits=splits, config=config)
    for start in range(0, x.shape[0], per_launch):  # later chunks accumulate onto the first
        chunk = x[start:start + per_launch]
        if path == "dense":
            launch_dense(out, chunk, geom, dense_rows(chunk, geom), alpha=alpha, beta=beta, **knobs)
        else:
            launch_positions(out, chunk, geom, alpha=alpha, beta=beta, path=path, **knobs)
        beta = 1.0
    return out


def launch_patch_gram(out: torch.Tensor, x: torch.Tensor, module: nn.Module, *, alpha: float, beta: float,
                      bias: bool, input_precision: str, **knobs) -> torch.Tensor:
    """`patch_gram_` with the kernel's knobs exposed (see `run_patch_gram`)."""
    x, geom = patch_input(x, module)
    return run_patch_gram(out, x, geom, alpha=alpha, beta=beta, bias=bias, input_precision=input_precision,
                          **knobs)


def patch_gram_(out: torch.Tensor, x: torch.Tensor, module: nn.Module, *, alpha: float = 1.0,
                beta: float = 0.0, bias: bool) -> torch.Tensor:
    """out ← β·out + α·Σ a aᵀ over all samples and positions of input x, per group ([G, D', D'])."""
    if kernel_applies(out, x, module):
        patches, geom = patch_input(x, module)
        path = choose_path(patches, geom)
        if path == "matmul" or samples_per_launch(patches, geom):
            return run_patch_gram(out, patches, geom, alpha=alpha, beta=beta, bias=bias, path=path,
                                  input_precision=default_input_precision(x))
    return reference.patch_gram_(out, x, module, alpha=alpha, beta=beta, bias=bias)


def _partial_specs(name: str, fn, configs, ints: dict, constexprs: dict) -> list[dict]:
    """A partial kernel's builds: every config × input dtype, with the run-time integers the launcher
    passes for the path's representative input (`ints`; Triton specialises them as it does at launch)."""
    specs = []
    workspace = torch.empty(16, dtype=torch.float32)
    for config in configs:
        for torch_dtype, dtype in TRITON_DTYPES.items():
            # the dispatch runs fp32 with TF32 dots (IEEE ones are for tests); the precision
            # argument does not apply to 16-bit inputs
            precision = "tf32" if dtype == "fp32" else "ieee"
            specs.append({
                "kernel": f"{name}[{dtype},{precision}]", "config": str(config), "fn": fn,
                "args": dict(x_ptr=torch.empty(16, dtype=torch_dtype), ws_ptr=workspace, **ints),
                "constexprs": {**constexprs, "BLOCK_D": config.block_d, "BLOCK_K": config.block_k,
                               "INPUT_PRECISION": precision},
                "num_warps": config.num_warps, "num_stages": config.num_stages, "mma": True,
            })
    return specs


def compile_specs() -> list[dict]:
    """Every kernel and config the dispatch can pick, for `fastfoof.kernels.compile_check`.

    The run-time integers are those the launcher passes on an H100/H200 (132 SMs) for representative
    inputs at batch 128: the 3×3 conv of a CIFAR ResNet-18's first stage (64 → 64 channels, 32×32,
    stride 1, padding 1, no bias) in NCHW ("implicit") and in channels_last ("channels_last"), and a
    ResNet-50 1×1 stride-1 conv (256 channels, 32×32) in NCHW ("dense").
    tests/test_compile_check.py checks that they specialise as those launches do.
    """
    positions = dict(n_positions=128 * 32 * 32, positions_per_sample=32 * 32, out_w=32, channels=64, channels_pad=64,
                     kernel_w=3, kernel_hw=9, bias_index=-1, in_h=32, in_w=32, stride_h=1, stride_w=1, pad_h=1,
                     pad_w=1, dil_h=1, dil_w=1, x_stride_b=64 * 32 * 32)
    specs = _partial_specs("patch_gram_partial", _partial_gram_kernel, CONFIGS,
                           dict(positions, chunk=3648, x_stride_c=32 * 32, x_stride_h=32, x_stride_w=1, num_pairs=15,
                                num_splits=36), {"TAP_MAJOR": False})
    specs += _partial_specs("patch_gram_tap_major", _partial_gram_kernel, PIPELINED_CONFIGS,
                            dict(positions, chunk=10944, x_stride_c=1, x_stride_h=32 * 64, x_stride_w=64, num_pairs=45,
                                 num_splits=12), {"TAP_MAJOR": True})
    specs += _partial_specs("patch_gram_dense", _dense_partial_kernel, PIPELINED_CONFIGS,
                            dict(inner=32 * 32, blocks_per_outer=64, num_blocks=128 * 64, chunk_blocks=47, dim=256,
                                 dim_p=256, stride_outer=256 * 32 * 32, stride_inner=1, stride_channel=32 * 32,
                                 num_pairs=3, num_splits=175), {})
    workspace = torch.empty(16, dtype=torch.float32)
    # The reduce pass writes in F.unfold order: the identity map (implicit, dense; kernel_hw = 1 is
    # specialised away) or the tap-major one (channels_last)
    orders = {"identity": dict(channels_pad=576, channels=576, kernel_hw=1, num_pairs=15, num_splits=36),
              "tap_major": dict(channels_pad=64, channels=64, kernel_hw=9, num_pairs=45, num_splits=12)}
    for config in CONFIGS:
        reduce_rows = min(REDUCE_ELEMENTS // config.block_d, config.block_d)
        for order, ints in orders.items():
            specs.append({
                "kernel": f"patch_gram_reduce[{order}]",
                "config": f"BLOCK_D={config.block_d},BLOCK_R={reduce_rows},w{REDUCE_WARPS}",
                "fn": _reduce_kernel,
                "args": dict(ws_ptr=workspace, out_ptr=workspace, alpha=1.0, beta=0.0, bias_index=-1, dim=576,
                             out_stride_g=576 * 576, out_stride_r=576, out_stride_c=1, **ints),
                "constexprs": {"BLOCK_D": config.block_d, "BLOCK_R": reduce_rows},
                "num_warps": REDUCE_WARPS, "num_stages": 1, "mma": False,
            })
    return specs
