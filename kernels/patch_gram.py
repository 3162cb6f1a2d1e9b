"""Patch gram by implicit im2col (DESIGN §2.1): out ← β·out + α·Σ a aᵀ straight from the input.

Two launches, no atomics:
1. `_partial_gram_kernel`, grid (tile pairs, splits, groups): each program owns one upper-triangle
   tile pair (i ≤ j) of the [D', D'] matrix of one group and one contiguous chunk of the patch
   positions (samples × output positions). It loads patch tiles straight from `x` by index
   arithmetic (masked loads give the zero padding), the bias row as a constant-1 entry of valid
   positions, and accumulates Aᵢᵀ·Aⱼ in fp32 with `tl.dot` into a workspace slot.
2. `_reduce_kernel`, grid (tile pairs, groups): sums a pair's partials over the splits in a fixed
   order (bitwise reproducible), applies β·out + α·Σ and writes the tile and its mirror.

Every op is treated as a 2-d convolution: Linear rows are samples with 1×1 "images", Conv1d has
height 1. Conv3d and float64 stay on the reference.
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
def _patch_columns(tile, group, dim, dim_out, channels_per_group, kernel_w, kernel_hw, dil_h, dil_w,
                   x_stride_c, x_stride_h, x_stride_w, BLOCK_D: tl.constexpr):
    """Per patch entry of a column tile: offset in a sample, kernel displacement (OUTSIDE past the
    patch, which masks the loads off), and whether it is the bias entry."""
    d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    offset = d % kernel_hw
    dh = (offset // kernel_w) * dil_h
    dw = (offset % kernel_w) * dil_w
    address = (group * channels_per_group + d // kernel_hw) * x_stride_c + dh * x_stride_h + dw * x_stride_w
    return address, tl.where(d < dim, dh, OUTSIDE), dw, (d == dim) & (d < dim_out)


@triton.jit
def _load_patch_tile(row_ptr, row_address, ih, iw, valid, address, dh, dw, is_bias, in_h, in_w):
    """[positions, patch entries] tile of A: zero outside the input, 1 in the bias column."""
    h = ih[:, None] + dh[None, :]
    w = iw[:, None] + dw[None, :]
    # one unsigned compare per bound: negative coordinates wrap to huge values
    inside = (h.to(tl.uint32) < in_h) & (w.to(tl.uint32) < in_w)
    a = tl.load(row_ptr[:, None] + (row_address[:, None] + address[None, :]), mask=inside, other=0.0)
    return tl.where(valid[:, None] & is_bias[None, :], 1.0, a).to(row_ptr.dtype.element_ty)


@triton.jit
def _partial_gram_kernel(
    x_ptr, ws_ptr,
    n_positions, positions_per_sample, out_w, chunk,
    dim, dim_out, channels_per_group, kernel_w, kernel_hw,
    in_h, in_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    num_pairs, num_splits,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pair = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    ti, tj = _tile_pair(pair)
    address_i, dh_i, dw_i, bias_i = _patch_columns(
        ti, group, dim, dim_out, channels_per_group, kernel_w, kernel_hw, dil_h, dil_w,
        x_stride_c, x_stride_h, x_stride_w, BLOCK_D)
    address_j, dh_j, dw_j, bias_j = _patch_columns(
        tj, group, dim, dim_out, channels_per_group, kernel_w, kernel_hw, dil_h, dil_w,
        x_stride_c, x_stride_h, x_stride_w, BLOCK_D)

    start = split * chunk
    end = tl.minimum(start + chunk, n_positions)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for k in range(start, end, BLOCK_K):
        n = k + tl.arange(0, BLOCK_K)
        valid = n < end
        sample = n // positions_per_sample
        position = n % positions_per_sample
        ih = tl.where(valid, (position // out_w) * stride_h - pad_h, OUTSIDE)
        iw = (position % out_w) * stride_w - pad_w
        row_ptr = x_ptr + sample.to(tl.int64) * x_stride_b
        row_address = ih * x_stride_h + iw * x_stride_w
        a_i = _load_patch_tile(row_ptr, row_address, ih, iw, valid, address_i, dh_i, dw_i, bias_i, in_h, in_w)
        a_j = _load_patch_tile(row_ptr, row_address, ih, iw, valid, address_j, dh_j, dw_j, bias_j, in_h, in_w)
        acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision=INPUT_PRECISION)

    r = tl.arange(0, BLOCK_D)
    slot = ((group * num_splits + split).to(tl.int64) * num_pairs + pair) * (BLOCK_D * BLOCK_D)
    tl.store(ws_ptr + slot + r[:, None] * BLOCK_D + r[None, :], acc)


@triton.jit
def _reduce_kernel(
    ws_ptr, out_ptr, alpha, beta,
    dim_out, num_pairs, num_splits,
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
        partials += num_pairs * (BLOCK_D * BLOCK_D)  # one split's workspace

    rows = ti * BLOCK_D + r
    cols = tj * BLOCK_D + c
    inside = (rows[:, None] < dim_out) & (cols[None, :] < dim_out)
    # The tile goes to (i, j) and its mirror to (j, i). On a diagonal tile the upper part (with
    # the diagonal) is written from here and the strict lower part as its mirror: an exactly
    # symmetric update, and no element is written twice.
    upper = inside & (rows[:, None] <= cols[None, :])
    lower = inside & (rows[:, None] < cols[None, :])
    keep = beta != 0  # β = 0 overwrites: NaN/inf already in `out` must not survive
    base = out_ptr + group.to(tl.int64) * out_stride_g
    ptr_upper = base + rows[:, None] * out_stride_r + cols[None, :] * out_stride_c
    ptr_lower = base + cols[None, :] * out_stride_r + rows[:, None] * out_stride_c
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


def choose_config(dim_out: int) -> TileConfig:
    for config in CONFIGS:
        if dim_out <= config.block_d:
            return config
    return CONFIGS[-1]


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
    """Whether the kernel handles this call; float64 and Conv3d stay on the reference."""
    return (out.dtype == torch.float32 and x.dtype in TRITON_DTYPES
            and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)))


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


def launch_patch_gram(out: torch.Tensor, x: torch.Tensor, module: nn.Module, *, alpha: float, beta: float,
                      bias: bool, input_precision: str, splits: int | None = None,
                      config: TileConfig | None = None) -> torch.Tensor:
    """`patch_gram_` with the kernel's knobs exposed (tests force IEEE dots, split counts, configs)."""
    x, geom = patch_input(x, module)
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        # Triton's interpreter (3.9) multiplies bf16 bit patterns in tl.dot; fp32 holds bf16 exactly.
        x = x.float()
    groups, dim = geom.groups, geom.dim
    dim_out = dim + bias
    n_positions = x.shape[0] * geom.positions
    if n_positions == 0:
        return out.mul_(beta) if beta else out.zero_()
    config = config or choose_config(dim_out)
    tiles = triton.cdiv(dim_out, config.block_d)
    num_pairs = tiles * (tiles + 1) // 2
    if splits is None:
        sm_count = (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda
                    else INTERPRETER_SMS)
        splits = choose_splits(n_positions, num_pairs * groups, config, sm_count)
    chunk = triton.cdiv(triton.cdiv(n_positions, splits), config.block_k) * config.block_k
    splits = triton.cdiv(n_positions, chunk)
    shape, (sb, sc, sh, sw) = as_2d_conv(x, geom)
    (kh, kw), (out_h, out_w) = shape["kernel"], shape["out_size"]
    workspace = torch.empty(groups * splits * num_pairs * config.block_d ** 2, dtype=torch.float32,
                            device=out.device)
    _partial_gram_kernel[(num_pairs, splits, groups)](
        x, workspace,
        n_positions, out_h * out_w, out_w, chunk,
        dim, dim_out, geom.channels // groups, kw, kh * kw,
        *shape["in_size"], *shape["stride"], *shape["padding"], *shape["dilation"],
        sb, sc, sh, sw,
        num_pairs, splits,
        BLOCK_D=config.block_d, BLOCK_K=config.block_k, INPUT_PRECISION=input_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    reduce_rows = min(REDUCE_ELEMENTS // config.block_d, config.block_d)
    _reduce_kernel[(num_pairs, config.block_d // reduce_rows, groups)](
        workspace, out, float(alpha), float(beta),
        dim_out, num_pairs, splits,
        *out.stride(),
        BLOCK_D=config.block_d, BLOCK_R=reduce_rows, num_warps=REDUCE_WARPS,
    )
    return out


def patch_gram_(out: torch.Tensor, x: torch.Tensor, module: nn.Module, *, alpha: float = 1.0,
                beta: float = 0.0, bias: bool) -> torch.Tensor:
    """out ← β·out + α·Σ a aᵀ over all samples and positions of input x, per group ([G, D', D'])."""
    if not kernel_applies(out, x, module):
        return reference.patch_gram_(out, x, module, alpha=alpha, beta=beta, bias=bias)
    return launch_patch_gram(out, x, module, alpha=alpha, beta=beta, bias=bias,
                             input_precision=default_input_precision(x))


def compile_specs() -> list[dict]:
    """Every kernel and config the dispatch can pick, for `fastfoof.kernels.compile_check`."""
    # Representative run-time arguments: ResNet-18 layer1's 3×3 conv (64 → 64 channels, 56×56,
    # stride 1, padding 1) on a contiguous batch of 32, as the launcher passes them.
    partial_ints = dict(n_positions=32 * 56 * 56, positions_per_sample=56 * 56, out_w=56, chunk=1024, dim=576,
                        dim_out=576, channels_per_group=64, kernel_w=3, kernel_hw=9, in_h=56, in_w=56,
                        stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1, x_stride_b=64 * 56 * 56,
                        x_stride_c=56 * 56, x_stride_h=56, x_stride_w=1, num_pairs=55, num_splits=98)
    workspace = torch.empty(16, dtype=torch.float32)
    specs = []
    for config in CONFIGS:
        for torch_dtype, dtype in TRITON_DTYPES.items():
            # the dispatch runs fp32 with TF32 dots (IEEE ones are for tests); the precision
            # argument does not apply to 16-bit inputs
            for precision in (("tf32",) if dtype == "fp32" else ("ieee",)):
                specs.append({
                    "kernel": f"patch_gram_partial[{dtype},{precision}]", "config": str(config),
                    "fn": _partial_gram_kernel,
                    "args": dict(x_ptr=torch.empty(16, dtype=torch_dtype), ws_ptr=workspace, **partial_ints),
                    "constexprs": {"BLOCK_D": config.block_d, "BLOCK_K": config.block_k,
                                   "INPUT_PRECISION": precision},
                    "num_warps": config.num_warps, "num_stages": config.num_stages,
                    "mma": True,
                })
        reduce_rows = min(REDUCE_ELEMENTS // config.block_d, config.block_d)
        specs.append({
            "kernel": "patch_gram_reduce", "config": f"BLOCK_D={config.block_d},BLOCK_R={reduce_rows},w{REDUCE_WARPS}",
            "fn": _reduce_kernel,
            "args": dict(ws_ptr=workspace, out_ptr=workspace, alpha=1.0, beta=0.0, dim_out=576, num_pairs=55,
                         num_splits=98, out_stride_g=576 * 576, out_stride_r=576, out_stride_c=1),
            "constexprs": {"BLOCK_D": config.block_d, "BLOCK_R": reduce_rows},
            "num_warps": REDUCE_WARPS, "num_stages": 1, "mma": False,
        })
    return specs
