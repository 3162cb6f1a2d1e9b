"""Triton kernel 3: the preconditioned update of every layer in one grouped GEMM (DESIGN §1.4, §2.3).

`U = Ĝ·P` for all preconditioned layers and conv groups runs as one launch per parameter dtype over
a device table of problems (pointers, sizes, strides, scalar slots). Each tile reads `Ĝ` straight
from `weight.grad` viewed as [O, D] (the bias gradient enters as a rank-1 update for column D', no
concatenated copy) and its epilogue applies the SGD step of §1.4 (momentum buffer, nesterov,
decoupled weight decay, parameter write) to the weight and the bias in place; nothing is written to
`.grad`. Hyperparameters live in a second device table (never constexpr: changing lr does not
recompile). Both tables are rebuilt only when a host-side key (addresses, shapes, strides,
hyperparameters, first-step flags) changes; the step itself never synchronises with the device.

Parameters without a preconditioner (U = G/λ) take one `torch._foreach_*` update per param group,
device and dtype. float64 parameters, non-contiguous parameters (e.g. channels_last convolution
weights) and gradients that cannot be viewed as [O, D] with unit column stride take the reference
path, block by block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastfoof import reference
from fastfoof.kernels.tables import to_device
from fastfoof.reference import stat_dtype

# tl.dot input precision for fp32 operands: TF32 on tensor cores by default; tests set "ieee".
DOT_PRECISION = "tf32"

# Tile config per dot precision (spill-free on sm_80 and sm_90: `python -m fastfoof.kernels.compile_check`);
# the FMA (ieee) dot needs 8 warps to hold its operands in registers.
CONFIGS = {"tf32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
           "ieee": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)}

PARAM_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Problem table: one int64 row per (layer, conv group). Column indices are shared with the kernel.
# A momentum buffer shares its parameter's strides (the host checks), so one offset serves both.
PROBLEM_COLUMNS = ("grad_w", "grad_b", "precond", "weight", "bias", "buf_w", "buf_b", "rows", "dim", "dim_p",
                   "grad_w_row", "weight_row", "precond_row", "grad_b_stride", "bias_stride", "slot_w", "slot_b")
PROBLEM_FIELDS = tl.constexpr(len(PROBLEM_COLUMNS))
# Scalar table: one fp32 row per parameter: lr, 1 − lr·wd, μ, 1 − τ, nesterov, first step, μ ≠ 0.
SCALAR_FIELDS = tl.constexpr(8)


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
    lr = tl.load(scalars)
    decay = tl.load(scalars + 1)
    momentum = tl.load(scalars + 2)
    one_minus_dampening = tl.load(scalars + 3)
    nesterov = tl.load(scalars + 4) != 0
    first = tl.load(scalars + 5)
    use_momentum = tl.load(scalars + 6)
    # The flags are 0/1 floats folded into the masks by tl.where (the interpreter cannot `&` a
    # block mask with a scalar bool).
    old = tl.load(buf + offsets, mask=tl.where(mask, use_momentum * (1 - first), 0.0) != 0, other=0.0)
    v = tl.where(first != 0, u, momentum * old + one_minus_dampening * u)
    tl.store(buf + offsets, v, mask=tl.where(mask, use_momentum, 0.0) != 0)
    use_momentum = use_momentum != 0
    direction = tl.where(use_momentum, tl.where(nesterov, u + momentum * v, v), u)
    p = tl.load(param + offsets, mask=mask, other=0.0)
    tl.store(param + offsets, (p.to(tl.float32) * decay - lr * direction).to(p.dtype), mask=mask)


@triton.jit
def grouped_update_kernel(problems_ptr, tiles_ptr, scalars_ptr, scale_ptr,
                          PARAM_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of U = Ĝ·P of one problem, then its SGD epilogue."""
    tile = tl.program_id(0)
    problem = tl.load(tiles_ptr + 3 * tile).to(tl.int64)
    m0 = tl.load(tiles_ptr + 3 * tile + 1) * BLOCK_M
    n0 = tl.load(tiles_ptr + 3 * tile + 2) * BLOCK_N
    row = problems_ptr + problem * PROBLEM_FIELDS
    grad_w = _param_pointer(tl.load(row + 0), PARAM_KIND)
    grad_b_address = tl.load(row + 1)
    precond = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    weight = _param_pointer(tl.load(row + 3), PARAM_KIND)
    buf_w = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    # Sizes and strides as int32 (the host sends only tensors of < 2**31 elements with unit column
    # strides): 32-bit offsets from one base pointer keep the register count down.
    rows_total = tl.load(row + 7).to(tl.int32)
    dim = tl.load(row + 8).to(tl.int32)
    dim_p = tl.load(row + 9).to(tl.int32)
    p_row_stride = tl.load(row + 12).to(tl.int32)

    rows = m0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < rows_total
    col_ok = cols < dim_p
    a_offsets = rows[:, None] * tl.load(row + 10).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        a = tl.load(grad_w + (a_offsets + ks[None, :]), mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(precond + (ks[:, None] * p_row_stride + cols[None, :]), mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a.to(tl.float32), b, acc, input_precision=INPUT_PRECISION)
    if grad_b_address != 0:  # the bias gradient is column D of [Ĝ | g_b]: a rank-1 update with row D of P
        grad_b = _param_pointer(grad_b_address, PARAM_KIND)
        gb = tl.load(grad_b + rows * tl.load(row + 13).to(tl.int32), mask=row_ok, other=0.0).to(tl.float32)
        pb = tl.load(precond + (dim * p_row_stride + cols), mask=col_ok, other=0.0)
        acc += gb[:, None] * pb[None, :]
    u = acc / tl.load(scale_ptr)

    w_mask = row_ok[:, None] & (cols < dim)[None, :]
    w_offsets = rows[:, None] * tl.load(row + 11).to(tl.int32) + cols[None, :]
    _sgd_epilogue(u, weight, buf_w, w_offsets, w_mask, scalars_ptr + tl.load(row + 15) * SCALAR_FIELDS)

    if (grad_b_address != 0) & (n0 <= dim) & (dim < n0 + BLOCK_N):  # this tile holds column D
        u_b = tl.sum(tl.where(cols[None, :] == dim, u, 0.0), axis=1)
        bias = _param_pointer(tl.load(row + 4), PARAM_KIND)
        buf_b = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        _sgd_epilogue(u_b, bias, buf_b, rows * tl.load(row + 14).to(tl.int32), row_ok,
                      scalars_ptr + tl.load(row + 16) * SCALAR_FIELDS)


def compile_specs() -> list[dict]:
    """Every configuration the launcher can pick, for fastfoof.kernels.compile_check."""
    args = dict(problems_ptr=torch.empty(len(PROBLEM_COLUMNS), dtype=torch.int64),
                tiles_ptr=torch.empty(3, dtype=torch.int32), scalars_ptr=torch.empty(SCALAR_FIELDS.value),
                scale_ptr=torch.ones(()))
    specs = []
    for kind_name, kind in (("fp32", 0), ("bf16", 1), ("fp16", 2)):
        for precision, config in CONFIGS.items():
            tiles = {k: v for k, v in config.items() if k.startswith("BLOCK")}
            specs.append(dict(kernel="grouped_update_kernel",
                              config=f"{kind_name},{precision}," + ",".join(f"{k}={v}" for k, v in tiles.items())
                                     + f",w{config['num_warps']},s{config['num_stages']}",
                              fn=grouped_update_kernel, args=args,
                              constexprs=dict(PARAM_KIND=kind, INPUT_PRECISION=precision, **tiles),
                              num_warps=config["num_warps"], num_stages=config["num_stages"],
                              mma=precision == "tf32"))
    return specs


# ---- host side --------------------------------------------------------------------------------

# (device, dtype, table name) -> (host key, device tensor). The key holds every address, shape,
# stride and scalar the table encodes, so a hit is exactly a table that is still valid.
_TABLES: dict[tuple, tuple[tuple, torch.Tensor]] = {}
_ONES: dict[torch.device, torch.Tensor] = {}


def _device_table(name: tuple, key: tuple, build) -> torch.Tensor:
    cached = _TABLES.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    table = to_device(build(), name[0])
    _TABLES[name] = (key, table)
    return table


def _row_stride(t: torch.Tensor, rows: int) -> int | None:
    """Row stride of t viewed as [rows, numel/rows] with unit column stride, None if there is no such
    view (e.g. a channels_last convolution weight) or it is too large for 32-bit offsets."""
    try:
        view = t.view(rows, -1)
    except RuntimeError:
        return None
    if view.shape[1] > 1 and view.stride(1) != 1 or t.numel() >= 2 ** 31:
        return None
    return view.stride(0)


def _same_strides(param: torch.Tensor, buf: torch.Tensor | None) -> bool:
    return buf is None or (buf.shape == param.shape and buf.stride() == param.stride())


def _scalars(group: dict, first: bool) -> tuple[float, ...]:
    lr, momentum = group["lr"], group["momentum"]
    return (lr, 1 - lr * group["weight_decay"], momentum, 1 - group["dampening"], float(group["nesterov"]),
            float(first), float(momentum != 0), 0.0)


def _fused_problems(block, slot: int, buffers: list, scalar_rows: list, keep_alive: list) -> list[tuple] | None:
    """The problem rows of one preconditioned block, or None if it needs the reference path."""
    weight = block.params[0]
    bias = block.params[1] if len(block.params) == 2 else None
    grad_w = weight.grad
    grad_b = None if bias is None else bias.grad
    groups = block.groups
    out_rows = weight.shape[0]
    if weight.dtype not in PARAM_KINDS or grad_w.dtype != weight.dtype or out_rows % groups:
        return None
    if bias is not None and (bias.dtype != weight.dtype or (grad_b is not None and grad_b.dtype != weight.dtype)):
        return None
    rows, dim = out_rows // groups, weight[0].numel()
    dim_p = dim + (bias is not None)
    precond = block.precond
    if precond.dtype != torch.float32 or tuple(precond.shape) != (groups, dim_p, dim_p) or precond.numel() >= 2 ** 31:
        return None
    if precond.stride(2) != 1:  # a copy each step (damped_inverse returns row-major P), alive until the launch
        precond = precond.contiguous()
        keep_alive.append(precond)
    # Contiguous parameters, so that buffers made by empty_like share their strides.
    if not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return None
    w_row, g_row = _row_stride(weight, out_rows), _row_stride(grad_w, out_rows)
    if None in (w_row, g_row) or not _same_strides(weight, buffers[slot]):
        return None
    if bias is not None and not _same_strides(bias, buffers[slot + 1]):
        return None

    def ensure_buffer(i: int, param: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        buf, group = buffers[slot + i], block.options[i]
        if group["momentum"] == 0 or buf is not None:
            return buf, False
        buffers[slot + i] = torch.empty_like(param, dtype=torch.float32)
        return buffers[slot + i], True

    buf_w, first_w = ensure_buffer(0, weight)
    slot_w = len(scalar_rows)
    scalar_rows.append(_scalars(block.options[0], first_w))
    slot_b, buf_b = 0, None
    if grad_b is not None:
        buf_b, first_b = ensure_buffer(1, bias)
        slot_b = len(scalar_rows)
        scalar_rows.append(_scalars(block.options[1], first_b))
    size = weight.element_size()
    problems = []
    for g in range(groups):
        r0 = g * rows
        problems.append((
            grad_w.data_ptr() + r0 * g_row * size,
            0 if grad_b is None else grad_b.data_ptr() + r0 * grad_b.stride(0) * size,
            precond.data_ptr() + g * precond.stride(0) * 4,
            weight.data_ptr() + r0 * w_row * size,
            0 if bias is None else bias.data_ptr() + r0 * bias.stride(0) * size,
            0 if buf_w is None else buf_w.data_ptr() + r0 * w_row * 4,
            0 if buf_b is None else buf_b.data_ptr() + r0 * buf_b.stride(0) * 4,
            rows, dim, dim_p, g_row, w_row, precond.stride(1),
            0 if grad_b is None else grad_b.stride(0), 0 if bias is None else bias.stride(0), slot_w, slot_b))
    return problems


def _tile_schedule(problems: list[tuple], block_m: int, block_n: int) -> torch.Tensor:
    """[tiles, 3] int32 (problem, tile row, tile column), the longest K loops first."""
    dim, dim_p, rows = (PROBLEM_COLUMNS.index(c) for c in ("dim", "dim_p", "rows"))
    order = sorted(range(len(problems)), key=lambda i: -problems[i][dim])  # a tile's work is ∝ its K = D
    tiles = [(i, tm, tn) for i in order
             for tm in range(triton.cdiv(problems[i][rows], block_m))
             for tn in range(triton.cdiv(problems[i][dim_p], block_n))]
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3)


def _launch_grouped(device: torch.device, dtype: torch.dtype, problems: list[tuple], scalar_rows: list,
                    grad_scale: torch.Tensor | None) -> None:
    config = CONFIGS[DOT_PRECISION]
    key = tuple(problems)
    problem_table = _device_table((device, dtype, "problems"), key,
                                  lambda: torch.tensor(problems, dtype=torch.int64))
    tiles = _device_table((device, dtype, "tiles"), (config["BLOCK_M"], config["BLOCK_N"]) + key,
                          lambda: _tile_schedule(problems, config["BLOCK_M"], config["BLOCK_N"]))
    scalars = _device_table((device, dtype, "scalars"), tuple(scalar_rows),
                            lambda: torch.tensor(scalar_rows, dtype=torch.float32))
    if grad_scale is None:
        if device not in _ONES:
            _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
        grad_scale = _ONES[device]
    grouped_update_kernel[(tiles.shape[0],)](
        problem_table, tiles, scalars, grad_scale.to(torch.float32), PARAM_KIND=PARAM_KINDS[dtype],
        INPUT_PRECISION=DOT_PRECISION, **config)


def _foreach_updates(entries: list[tuple], buffers: list, damping: float,
                     grad_scale: torch.Tensor | None) -> None:
    """U = G/λ and torch.optim.SGD's multi-tensor step, one pass per (param group, device, dtype)."""
    batches: dict[tuple, tuple[dict, list]] = {}
    for p, slot, group in entries:
        if p.grad is not None:
            batches.setdefault((id(group), p.device, p.dtype), (group, []))[1].append((p, slot))
    for group, members in batches.values():
        params = [p for p, _ in members]
        grads = [p.grad for p in params]
        dtype = stat_dtype(params[0].dtype)
        if all(g.dtype == dtype for g in grads):
            u = torch._foreach_div(grads, damping)
        else:
            u = [torch.empty_like(g, dtype=dtype) for g in grads]
            torch._foreach_copy_(u, grads)
            torch._foreach_div_(u, damping)
        if grad_scale is not None:
            torch._foreach_div_(u, grad_scale)
        lr, momentum = group["lr"], group["momentum"]
        direction = u
        if momentum != 0:
            later = [i for i, (_, slot) in enumerate(members) if buffers[slot] is not None]
            if later:
                old = [buffers[members[i][1]] for i in later]
                torch._foreach_mul_(old, momentum)
                torch._foreach_add_(old, [u[i] for i in later], alpha=1 - group["dampening"])
            for i, (_, slot) in enumerate(members):
                if buffers[slot] is None:  # first step: V = U (u holds fresh tensors, never a grad)
                    buffers[slot] = u[i]
            bufs = [buffers[slot] for _, slot in members]
            direction = torch._foreach_add(u, bufs, alpha=momentum) if group["nesterov"] else bufs
        if group["weight_decay"] != 0:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, direction, alpha=-lr)


def preconditioned_update_(blocks: list, momentum_buffers: list[torch.Tensor | None], *, damping: float,
                           grad_scale: torch.Tensor | None = None) -> None:
    """DESIGN §1.4 for all blocks: U = Ĝ·P (G/λ without P), then each parameter's SGD epilogue.

    Same contract as `fastfoof.reference.preconditioned_update_`.
    """
    grouped: dict[tuple, tuple[list, list]] = {}  # (device, dtype) -> (problems, scalar rows)
    plain, keep_alive, slot = [], [], 0
    for block in blocks:
        if block.precond is None:
            plain.append((block.params[0], slot, block.options[0]))
        elif block.params[0].grad is not None:
            weight = block.params[0]
            problems, scalar_rows = grouped.setdefault((weight.device, weight.dtype), ([], []))
            rows = _fused_problems(block, slot, momentum_buffers, scalar_rows, keep_alive)
            if rows is None:
                _reference_block(block, slot, momentum_buffers, damping, grad_scale)
            else:
                problems += rows
        slot += len(block.params)
    for (device, dtype), (problems, scalar_rows) in grouped.items():
        if problems:
            _launch_grouped(device, dtype, problems, scalar_rows, grad_scale)
    _foreach_updates(plain, momentum_buffers, damping, grad_scale)


def _reference_block(block, slot: int, buffers: list, damping: float, grad_scale: torch.Tensor | None) -> None:
    for i, (p, u, group) in enumerate(zip(block.params, reference.block_updates(block, damping), block.options)):
        if u is not None:
            if grad_scale is not None:
                u = u / grad_scale
            buffers[slot + i] = reference.sgd_step_(p, u, buffers[slot + i], group)
