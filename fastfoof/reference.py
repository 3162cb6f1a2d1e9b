"""Plain-PyTorch reference of FOOF's hot operations (DESIGN §2): runs on any device, oracle in tests.

Each op here (`patch_gram_`, `fold_statistics_`, `damped_inverse_with_status`, `preconditioned_update_`)
has a Triton twin in `fastfoof.kernels` with the same signature; `fastfoof.ops` chooses between them.
The damped inverse's factorisations are `fastfoof.linalg`'s (LAPACK/cuSOLVER), which the kernels use
for what they do not factor themselves.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import linalg
from .geometry import PatchGeometry, patch_input
from .linalg import KEPT_PREVIOUS, OK, RETRIED, stat_dtype  # noqa: F401 — the status codes, re-exported

# The reference patch gram unfolds the batch in chunks of samples whose workspace (the chunk's patch
# vectors and its zero-padded input) stays within this many bytes; a sample that needs more takes a
# chunk alone.
GRAM_WORKSPACE_BYTES = 48 << 20
# Rows per block row of the one-triangle gram: one matmul each, against the rows from its diagonal on.
# On 2 x86 cores at D' = 4608, 256 and 512 are within noise of each other, at 0.6× the full product.
GRAM_BLOCK = 256

def zero_padding(geom: PatchGeometry) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dim that makes every patch a slice of the input."""
    pads = []
    for n, lo, k, s, d, m in zip(geom.in_size, geom.padding, geom.kernel, geom.stride, geom.dilation,
                                 geom.out_size):
        extent = (m - 1) * s + (k - 1) * d + 1
        pads.append((lo, max(0, extent - lo - n)))
    return pads


def patch_rows_(a: torch.Tensor, x: torch.Tensor, geom: PatchGeometry) -> None:
    """Write the patch vectors of `x` ([b, C, *in]; Linear: [b, F]) into `a` ([G, D, b·L]), in
    F.unfold's order (channel-major, then kernel offsets), one kernel offset at a time."""
    groups, batch = a.shape[0], x.shape[0]
    if not geom.kernel:
        a.copy_(x.t().unsqueeze(0))
        return
    pads = zero_padding(geom)
    if any(p for pair in pads for p in pair):
        x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    taps = a.view(groups, geom.channels // groups, math.prod(geom.kernel), batch, *geom.out_size)
    for k, offset in enumerate(itertools.product(*(range(k) for k in geom.kernel))):
        window = tuple(slice(o * d, o * d + s * (m - 1) + 1, s)
                       for o, d, s, m in zip(offset, geom.dilation, geom.stride, geom.out_size))
        source = x[(Ellipsis,) + window].unflatten(1, (groups, -1))  # [b, G, C/G, *out]
        taps[:, :, k].copy_(source.movedim(0, 2))


def _add_upper_gram_(out: torch.Tensor, x: torch.Tensor, geom: PatchGeometry, bias: bool, alpha: float,
                     blocks: list[tuple[int, int]]) -> None:
    """out += α·Σ a aᵀ over the patch vectors of `x` on the block rows' diagonal blocks and to their
    right (the upper block triangle); the patch vectors are this call's workspace."""
    groups, dim_p = out.shape[0], out.shape[-1]
    a = out.new_empty(groups, dim_p, x.shape[0] * geom.positions)
    patch_rows_(a[:, :geom.dim], x, geom)
    if bias:
        a[:, geom.dim].fill_(1.0)
    for i0, i1 in blocks:
        # the diagonal block mirrored in itself: a BLAS gram need not be bitwise symmetric, and
        # Cholesky reads one triangle
        diag = torch.bmm(a[:, i0:i1], a[:, i0:i1].mT)
        out[:, i0:i1, i0:i1].add_(diag.triu().add_(diag.triu(1).mT), alpha=alpha)
        if i1 < dim_p:
            out[:, i0:i1, i1:].baddbmm_(a[:, i0:i1], a[:, i1:].mT, alpha=alpha)


def patch_gram_(out: torch.Tensor, x: torch.Tensor, module: nn.Module, *, alpha: float = 1.0,
                beta: float = 0.0, bias: bool) -> torch.Tensor:
    """out ← β·out + α·Σ a aᵀ over all samples and positions of input x, per group ([G, D', D']).

    One triangle of Σ a aᵀ is computed, as matmuls of GRAM_BLOCK-row blocks against the rows from
    their diagonal on, straight into `out`, and mirrored at the end: `out` is its own accumulator,
    so the workspace is one chunk of the batch (GRAM_WORKSPACE_BYTES), whatever the batch. β scales
    every entry of `out` as it is (a non-symmetric `out` stays so): until the mirror, the strict lower
    block region holds β·(L − Uᵀ), the part of β·out that the mirrored upper triangle does not carry.
    """
    x, geom = patch_input(x, module)
    groups, dim_p = out.shape[0], out.shape[-1]
    blocks = [(i, min(i + GRAM_BLOCK, dim_p)) for i in range(0, dim_p, GRAM_BLOCK)]
    if beta:
        out.mul_(beta)
        for i0, i1 in blocks[:-1]:
            out[:, i1:, i0:i1].sub_(out[:, i0:i1, i1:].mT)
    else:
        out.zero_()  # β = 0 overwrites: NaN/inf already in `out` must not survive
    padded = geom.channels * math.prod(n + lo + hi for n, (lo, hi) in zip(geom.in_size, zero_padding(geom)))
    per_sample = groups * dim_p * geom.positions * out.element_size() + padded * x.element_size()
    for chunk in x.split(max(1, GRAM_WORKSPACE_BYTES // per_sample)):
        _add_upper_gram_(out, chunk, geom, bias, alpha, blocks)
    for i0, i1 in blocks[:-1]:
        lower, upper = out[:, i1:, i0:i1], out[:, i0:i1, i1:].mT
        lower.add_(upper) if beta else lower.copy_(upper)
    return out


def fold_statistics_(emas: list[torch.Tensor], counts: list[torch.Tensor], stats: list[torch.Tensor],
                     scales: list[float], decay: float, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """EMA fold of DESIGN §1.2 for many layers: Σ ← mΣ + (1−m)·s·S, n ← m·n + (1−m).

    A statistic with a non-finite entry is not folded (§1.3); with `found_inf` ≠ 0 (GradScaler's
    skipped step, a device scalar) none is, and none counts as dropped. Returns the number dropped,
    as a device tensor (no host synchronisation). The statistics are consumed: a non-finite entry
    is zeroed in place.

    In-place passes, no temporaries (the matrices are D'² and the fold runs on every observed step):
    a sum (finite iff every entry is, short of overflow, which is dropped too), the zeroing, then
    Σ ← a·Σ + (b·S), each product rounded as the kernel rounds it, with device scalars (a, b) =
    (m, (1−m)·s) where the statistic folds and (1, 0) where it does not.
    """
    dropped = torch.zeros((), dtype=torch.int64, device=emas[0].device) if emas else torch.zeros((), dtype=torch.int64)
    live = None if found_inf is None or not emas else found_inf.to(emas[0].device) == 0
    for ema, count, stat, scale in zip(emas, counts, stats, scales):
        finite = torch.isfinite(stat.sum())
        fold = finite if live is None else finite & live
        one, zero = torch.ones((), dtype=ema.dtype, device=ema.device), torch.zeros((), dtype=ema.dtype, device=ema.device)
        stat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # 0·inf would be NaN where nothing folds
        ema.mul_(torch.where(fold, decay, one)).add_(stat.mul_(torch.where(fold, scale * (1 - decay), zero)))
        count.mul_(torch.where(fold, decay, one)).add_(torch.where(fold, 1 - decay, zero))
        dropped += (~finite if live is None else ~finite & live).to(torch.int64)
    return dropped



def damped_inverse_with_status(mats: list[torch.Tensor], damping: float, *,
                               scales: list[torch.Tensor | None] | None = None,
                               previous: list[torch.Tensor | None] | None = None, method: str | None = None
                               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """P = (s·M + λI)⁻¹ of each [G, D, D] symmetric M (its lower triangle) with DESIGN §1.3's fallbacks,
    in P's layout, and a status per matrix ([G] int8: OK, RETRIED, KEPT_PREVIOUS): see
    `linalg.damped_inverse_with_status` (`method`: one of `linalg.INVERSE_METHODS`; None takes
    FASTFOOF_INVERSE, else the default)."""
    return linalg.damped_inverse_with_status(mats, damping, scales=scales, previous=previous, method=method)


def damped_inverse(mats: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """(M + λI)⁻¹ of each [G, D, D] symmetric matrix, same shapes and order (`ops.damped_inverse`)."""
    return damped_inverse_with_status(mats, damping)[0]


def preconditioned_update_(blocks: list, momentum_buffers: list[torch.Tensor | None], *, damping: float,
                           graft: float | None = None, grad_scale: torch.Tensor | None = None,
                           found_inf: torch.Tensor | None = None, reduce_norms=None) -> None:
    """DESIGN §1.4: U = Ĝ·P per block (low rank: from (Q, s), §1.3; G/λ without P), then each
    parameter's SGD epilogue.

    `blocks` are `fastfoof.layers.Block`s; each parameter's lr, momentum, dampening, nesterov and
    weight_decay come from its param group. `momentum_buffers` is aligned with the blocks'
    parameters in order and updated in place (None entries are created on a first step).
    `graft` = κ (the optimizer's `graft="sgd"`): each preconditioned block's U takes its gradient's
    Frobenius norm, scaled by at most κλ, the others step with U = G (`grafted_updates`); None: eq. 6.
    `grad_scale` is GradScaler's scale of the gradients, divided out of U; with `found_inf` ≠ 0 (its
    flag of non-finite gradients, a device scalar) no parameter or buffer changes, decided on the device.
    A step that creates a momentum buffer is decided on the host (the optimizer reads found_inf then), so
    found_inf never has to undo a buffer's creation.
    """
    skip = None if found_inf is None else found_inf != 0
    # without grafting one block's U is alive at a time; grafting needs every norm before the first step
    updates = (block_updates(block, damping) for block in blocks) if graft is None else \
        grafted_updates(blocks, damping, graft, reduce_norms)
    slot = 0
    for block, block_us in zip(blocks, updates):
        step_block_(block, block_us, momentum_buffers, slot, grad_scale, skip)
        slot += len(block.params)


def step_block_(block, block_us: list[torch.Tensor | None], momentum_buffers: list, slot: int,
                grad_scale: torch.Tensor | None, skip: torch.Tensor | None) -> None:
    """The SGD epilogue of each parameter of a block on its U (None: not stepped), grad_scale divided out;
    its momentum buffers are momentum_buffers[slot:], updated in place."""
    for i, (p, u, group) in enumerate(zip(block.params, block_us, block.options)):
        if u is not None:
            if grad_scale is not None:
                u = u / grad_scale
            momentum_buffers[slot + i] = sgd_step_(p, u, momentum_buffers[slot + i], group, skip)


def grafted(block) -> bool:
    """Whether grafting rescales the block's U: a layer with a preconditioner and a weight gradient."""
    return (block.precond is not None or block.eigvecs is not None) and block.params[0].grad is not None


def check_graft(graft) -> None:
    """ValueError unless `graft` is None (eq. 6) or grafting's bound κ > 0 (DESIGN §1.4)."""
    if graft is not None and not (isinstance(graft, (int, float)) and not isinstance(graft, bool) and graft > 0):
        raise ValueError(f"graft: expected None or grafting's bound κ > 0, got {graft!r}")


def graft_scales(squares: torch.Tensor, cap: float) -> torch.Tensor:
    """min(‖Ĝ‖_F / ‖U‖_F, cap) per row of [‖Ĝ‖², ‖U‖²] (DESIGN §1.4: cap = κλ), 0 where U = 0."""
    g, u = squares.unbind(-1)
    return torch.where(u > 0, (g / u).sqrt(), 0.0).clamp_(max=cap)


def grafted_updates(blocks: list, damping: float, bound: float, reduce_norms=None) -> list[list[torch.Tensor | None]]:
    """Per block the U of `block_updates`, grafted (DESIGN §1.4): a preconditioned block's U rescaled to
    its gradient's Frobenius norm (at most by κλ, κ = `bound`), all groups, weight and bias together; U = G
    for the others.

    `reduce_norms(squares, blocks)`, if given, is called once with [‖Ĝ‖², ‖U‖²] of the grafted blocks
    ([n, 2], in their order, even where n = 0) and returns them summed with the other ranks' rows of
    the same layers (FSDP2)."""
    updates = [block_updates(block, damping if grafted(block) else 1.0) for block in blocks]  # U = G/λ, λ = 1
    rows = [i for i, block in enumerate(blocks) if grafted(block)]
    squares = graft_squares([blocks[i] for i in rows], [updates[i] for i in rows], blocks[0].params[0])
    if reduce_norms is not None:
        squares = reduce_norms(squares, [blocks[i] for i in rows])
    scale_updates_([updates[i] for i in rows], graft_scales(squares, bound * damping))
    return updates


def graft_squares(blocks: list, updates: list[list[torch.Tensor | None]], first: torch.Tensor) -> torch.Tensor:
    """[‖Ĝ‖², ‖U‖²] per grafted block ([n, 2], in the blocks' statistics dtype; `first`: a parameter for the
    device and dtype where n = 0): Ĝ its parameters' own gradients (also where KFAC's
    `block.left_transformed_grad` holds a transformed one), U its `block_updates` (weight and bias; None: not
    counted). One norm call for all: each block contributes (weight, bias) of each, an empty tensor standing
    in for a missing one."""
    dtype = functools.reduce(torch.promote_types, [stat_dtype(b.params[0].dtype) for b in blocks],
                             stat_dtype(first.dtype))
    if not blocks:
        return first.new_zeros(0, 2, dtype=dtype)
    empty = first.new_empty(0, dtype=dtype)
    tensors = []
    for block, block_us in zip(blocks, updates):
        for values in ([p.grad for p in block.params], block_us):
            values = [empty if t is None else t for t in values]
            tensors += values + [empty] * (2 - len(values))
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    return norms.square().view(len(blocks), 2, 2).sum(-1)


def scale_updates_(updates: list[list[torch.Tensor | None]], scales: torch.Tensor) -> None:
    """Each block's U times its row's scale, in place."""
    pairs = [(u, scale) for block_us, scale in zip(updates, scales.unbind()) for u in block_us if u is not None]
    if pairs:
        torch._foreach_mul_([u for u, _ in pairs], [scale for _, scale in pairs])


def sgd_step_(p: torch.Tensor, u: torch.Tensor, buf: torch.Tensor | None, group: dict,
              skip: torch.Tensor | None = None) -> torch.Tensor | None:
    """torch.optim.SGD's step on direction u instead of the gradient, decoupled weight decay; with
    `skip` (a device bool) true, p and an existing buffer keep their values."""
    lr, momentum = group["lr"], group["momentum"]
    if momentum != 0:
        if buf is None:
            buf = u.clone()
        else:
            new = buf * momentum + u * (1 - group["dampening"])
            buf.copy_(new if skip is None else torch.where(skip, buf, new))
        u = u.add(buf, alpha=momentum) if group["nesterov"] else buf
    decay = 1 - lr * group["weight_decay"]
    if skip is None and p.dtype == u.dtype:
        if decay != 1:
            p.mul_(decay)
        p.add_(u, alpha=-lr)
        return buf
    # W·(1 − η·wd) − η·D in the statistics' dtype, rounded once to a low-precision parameter
    new = (p.to(u.dtype) * decay).add_(u, alpha=-lr)
    p.copy_(new if skip is None else torch.where(skip, p.to(u.dtype), new))
    return buf


def joint_gradient(block) -> torch.Tensor:
    """[Ĝ | g_b] of a preconditioned block per group, [groups, rows, D'], in the statistics' dtype
    (a bias without a gradient contributes zeros)."""
    weight = block.params[0]
    dtype = stat_dtype(weight.dtype)
    groups, rows = block.groups, weight.shape[0] // block.groups
    g = weight.grad.reshape(groups, rows, -1).to(dtype)
    if len(block.params) == 2:  # the bias is the last column of [Ŵ | b]
        bias = block.params[1]
        gb = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        g = torch.cat([g, gb.reshape(groups, rows, 1).to(dtype)], -1)
    return g


def block_updates(block, damping: float) -> list[torch.Tensor | None]:
    """U for each parameter of a block, in the statistics' dtype; None where the grad is None."""
    grads = [p.grad for p in block.params]
    dtype = stat_dtype(block.params[0].dtype)
    if block.precond is None and block.eigvecs is None:
        return [None if g is None else g.to(dtype) / damping if damping != 1 else g.to(dtype) for g in grads]
    weight = block.params[0]
    if grads[0] is None:
        return [None] * len(grads)
    g = joint_gradient(block) if block.left_transformed_grad is None else block.left_transformed_grad
    if block.eigvecs is None:
        u = torch.bmm(g, block.precond)
    else:  # U = (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ (DESIGN §1.3)
        q, s = block.eigvecs, block.eigvals
        u = torch.baddbmm(g, torch.bmm(g, q) * (s / (s + damping))[:, None, :], q.mT, alpha=-1).div_(damping)
    dim = weight[0].numel()
    updates = [u[..., :dim].reshape(weight.shape)]
    if len(grads) == 2:
        updates.append(None if grads[1] is None else u[..., dim].reshape(block.params[1].shape))
    return updates
