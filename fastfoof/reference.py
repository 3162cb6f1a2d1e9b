"""Plain-PyTorch reference of FOOF's hot operations (DESIGN §2): runs on any device, oracle in tests.

Each function here has a Triton twin in `fastfoof.kernels` with the same signature; `fastfoof.ops`
chooses between them.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import PatchGeometry, patch_input

# Patches of one chunk of the batch are materialised at once; this bounds their size (elements).
CHUNK_ELEMENTS = 1 << 22

OK, RETRIED, KEPT_PREVIOUS = 0, 1, 2  # damped_inverse status per matrix


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, preconditioners and updates are float32, float64 for float64 parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unfold_patches(x: torch.Tensor, geom: PatchGeometry) -> torch.Tensor:
    """[b, C, *in] -> [b, C·K, L]: F.unfold's order (channel-major, then kernel offsets), any ndim."""
    pads = []
    for n, lo, k, s, d, m in zip(geom.in_size, geom.padding, geom.kernel, geom.stride, geom.dilation,
                                 geom.out_size):
        extent = (m - 1) * s + (k - 1) * d + 1
        pads.append((lo, max(0, extent - lo - n)))
    x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    taps = []
    for offset in itertools.product(*(range(k) for k in geom.kernel)):
        window = tuple(slice(o * d, o * d + s * (m - 1) + 1, s)
                       for o, d, s, m in zip(offset, geom.dilation, geom.stride, geom.out_size))
        taps.append(x[(Ellipsis,) + window])
    patches = torch.stack(taps, 2)
    return patches.reshape(x.shape[0], -1, geom.positions)


def patch_gram_(out: torch.Tensor, x: torch.Tensor, module: nn.Module, *, alpha: float = 1.0,
                beta: float = 0.0, bias: bool) -> torch.Tensor:
    """out ← β·out + α·Σ a aᵀ over all samples and positions of input x, per group ([G, D', D'])."""
    x, geom = patch_input(x, module)
    groups, dim = geom.groups, geom.dim
    if geom.kernel:
        per_sample = geom.channels * math.prod(geom.kernel) * geom.positions
    else:
        per_sample = geom.channels
    chunks = x.split(max(1, CHUNK_ELEMENTS // max(per_sample, 1)))
    if not chunks or x.shape[0] == 0:
        return out.mul_(beta) if beta else out.zero_()
    for i, chunk in enumerate(chunks):
        chunk = chunk.to(out.dtype)
        if geom.kernel:
            p = unfold_patches(chunk, geom)
            b = p.shape[0]
            a = p.reshape(b, groups, dim, -1).permute(1, 2, 0, 3).reshape(groups, dim, -1)
        else:
            a = chunk.t().unsqueeze(0)
        if bias:
            a = torch.cat([a, a.new_ones(groups, 1, a.shape[-1])], 1)
        out.baddbmm_(a, a.transpose(1, 2), beta=beta if i == 0 else 1.0, alpha=alpha)
    return out


def fold_statistics_(emas: list[torch.Tensor], counts: list[torch.Tensor], stats: list[torch.Tensor],
                     scales: list[float], decay: float) -> torch.Tensor:
    """EMA fold of DESIGN §1.2 for many layers: Σ ← mΣ + (1−m)·s·S, n ← m·n + (1−m).

    A statistic with a non-finite entry is not folded (§1.3). Returns the number dropped, as a
    device tensor (no host synchronisation).
    """
    dropped = torch.zeros((), dtype=torch.int64, device=emas[0].device) if emas else torch.zeros((), dtype=torch.int64)
    for ema, count, stat, scale in zip(emas, counts, stats, scales):
        finite = torch.isfinite(stat).all()
        ema.copy_(torch.where(finite, ema * decay + stat * (scale * (1 - decay)), ema))
        count.copy_(torch.where(finite, count * decay + (1 - decay), count))
        dropped += (~finite).to(torch.int64)
    return dropped


def damped_inverse(mats: list[torch.Tensor], damping: float, *, scales: list[torch.Tensor] | None = None,
                   previous: list[torch.Tensor | None] | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """P = (s·M + λI)⁻¹ for each [G, D, D] symmetric M, by Cholesky, batched by size (DESIGN §1.3).

    A factorisation that fails (not positive definite, non-finite) is retried in float64; if that
    fails too, the matrix keeps `previous` (identity/λ where there is none). Returns the inverses
    and a status per matrix ([G] int8: OK, RETRIED or KEPT_PREVIOUS).
    """
    scales = scales if scales is not None else [None] * len(mats)
    previous = previous if previous is not None else [None] * len(mats)
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((m.shape[-1], m.dtype, m.device), []).append(i)
    inverses: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    status: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    for (dim, dtype, device), members in buckets.items():
        eye = torch.eye(dim, dtype=dtype, device=device)
        damped = []
        for i in members:
            m = mats[i] if scales[i] is None else mats[i] * scales[i]
            damped.append(m + damping * eye)
        sizes = [mats[i].shape[0] for i in members]
        batch = torch.cat(damped)
        inv, info = _cholesky_inverse(batch)
        failed = info != 0
        code = torch.zeros(len(batch), dtype=torch.int8, device=device)
        if failed.any():  # the one host synchronisation: a fallback must be decided
            idx = failed.nonzero().squeeze(1)
            inv64, info64 = _cholesky_inverse(batch[idx].double())
            inv[idx] = inv64.to(dtype)
            code[idx] = torch.where(info64 == 0, RETRIED, KEPT_PREVIOUS).to(torch.int8)
            prev = torch.cat([previous[i] if previous[i] is not None
                              else (eye / damping).expand(mats[i].shape) for i in members])
            kept = code == KEPT_PREVIOUS
            inv[kept] = prev[kept]
        for i, p, c in zip(members, inv.split(sizes), code.split(sizes)):
            inverses[i], status[i] = p, c
    return inverses, status


def _cholesky_inverse(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched SPD inverse via Cholesky; info ≠ 0 where it failed or produced non-finite values."""
    chol, info = torch.linalg.cholesky_ex(a)
    inv = torch.cholesky_inverse(chol)
    inv = 0.5 * (inv + inv.mT)
    info = torch.where(torch.isfinite(inv).flatten(1).all(1), info, torch.ones_like(info))
    return inv, info


def preconditioned_update_(blocks: list, momentum_buffers: list[torch.Tensor | None], *, damping: float,
                           grad_scale: torch.Tensor | None = None) -> None:
    """DESIGN §1.4: U = Ĝ·P per block (G/λ without P), then each parameter's SGD epilogue.

    `blocks` are `fastfoof.layers.Block`s; each parameter's lr, momentum, dampening, nesterov and
    weight_decay come from its param group. `momentum_buffers` is aligned with the blocks'
    parameters in order and updated in place (None entries are created on a first step).
    `grad_scale` is GradScaler's scale of the gradients, divided out of U.
    """
    slot = 0
    for block in blocks:
        for p, u, group in zip(block.params, block_updates(block, damping), block.options):
            if u is not None:
                if grad_scale is not None:
                    u = u / grad_scale
                momentum_buffers[slot] = sgd_step_(p, u, momentum_buffers[slot], group)
            slot += 1


def sgd_step_(p: torch.Tensor, u: torch.Tensor, buf: torch.Tensor | None, group: dict) -> torch.Tensor | None:
    """torch.optim.SGD's step on direction u instead of the gradient, decoupled weight decay."""
    lr, momentum = group["lr"], group["momentum"]
    if momentum != 0:
        if buf is None:
            buf = u.clone()
        else:
            buf.mul_(momentum).add_(u, alpha=1 - group["dampening"])
        u = u.add(buf, alpha=momentum) if group["nesterov"] else buf
    if group["weight_decay"] != 0:
        p.mul_(1 - lr * group["weight_decay"])
    p.add_(u, alpha=-lr)
    return buf


def block_updates(block, damping: float) -> list[torch.Tensor | None]:
    """U for each parameter of a block, in the statistics' dtype; None where the grad is None."""
    grads = [p.grad for p in block.params]
    dtype = stat_dtype(block.params[0].dtype)
    if block.precond is None:
        return [None if g is None else g.to(dtype) / damping for g in grads]
    weight = block.params[0]
    if grads[0] is None:
        return [None] * len(grads)
    groups, rows = block.groups, weight.shape[0] // block.groups
    g = grads[0].reshape(groups, rows, -1).to(dtype)
    if len(grads) == 2:  # the bias is the last column of [Ŵ | b]
        gb = grads[1] if grads[1] is not None else torch.zeros_like(block.params[1])
        g = torch.cat([g, gb.reshape(groups, rows, 1).to(dtype)], -1)
    u = torch.bmm(g, block.precond)
    dim = weight[0].numel()
    updates = [u[..., :dim].reshape(weight.shape)]
    if len(grads) == 2:
        updates.append(None if grads[1] is None else u[..., dim].reshape(block.params[1].shape))
    return updates
