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
    total = None
    for chunk in chunks:
        chunk = chunk.to(out.dtype)
        if geom.kernel:
            p = unfold_patches(chunk, geom)
            b = p.shape[0]
            a = p.reshape(b, groups, dim, -1).permute(1, 2, 0, 3).reshape(groups, dim, -1)
        else:
            a = chunk.t().unsqueeze(0)
        if bias:
            a = torch.cat([a, a.new_ones(groups, 1, a.shape[-1])], 1)
        total = torch.bmm(a, a.mT) if total is None else total.baddbmm_(a, a.mT)
    # A BLAS gram need not be bitwise symmetric; Cholesky reads one triangle, so mirror it.
    total = total.tril().add_(total.tril(-1).mT)
    return out.mul_(beta).add_(total, alpha=alpha) if beta else torch.mul(total, alpha, out=out)


def fold_statistics_(emas: list[torch.Tensor], counts: list[torch.Tensor], stats: list[torch.Tensor],
                     scales: list[float], decay: float, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """EMA fold of DESIGN §1.2 for many layers: Σ ← mΣ + (1−m)·s·S, n ← m·n + (1−m).

    A statistic with a non-finite entry is not folded (§1.3); with `found_inf` ≠ 0 (GradScaler's
    skipped step, a device scalar) none is, and none counts as dropped. Returns the number dropped,
    as a device tensor (no host synchronisation).
    """
    dropped = torch.zeros((), dtype=torch.int64, device=emas[0].device) if emas else torch.zeros((), dtype=torch.int64)
    live = None if found_inf is None or not emas else found_inf.to(emas[0].device) == 0
    for ema, count, stat, scale in zip(emas, counts, stats, scales):
        finite = torch.isfinite(stat).all()
        fold = finite if live is None else finite & live
        ema.copy_(torch.where(fold, ema * decay + stat * (scale * (1 - decay)), ema))
        count.copy_(torch.where(fold, count * decay + (1 - decay), count))
        dropped += (~finite if live is None else ~finite & live).to(torch.int64)
    return dropped


# Matrices up to this size share power-of-two buckets on GPUs, padded with identity blocks.
PADDED_BUCKET_MAX = 128
# On CPU, L⁻¹ by triangular solve then L⁻ᵀL⁻¹ beats potri up to this size (measured, 2-core x86).
TRIANGULAR_SOLVE_MAX_CPU = 128
# Larger matrices are factored one call each: batched cholesky_ex is slower there (H200: 3×2304
# batched 5.3 ms vs 0.9 ms each; 3×4608 21 ms vs 2.7 ms each). On CPU, where LAPACK factors one
# matrix at a time anyway, from TRIANGULAR_SOLVE_MAX_CPU on (batching measured slower on ResNet sizes).
BATCHED_FACTOR_MAX = 1024


def bucket_dim(dim: int, device: torch.device) -> int:
    """The size a matrix of size `dim` is padded to so that layers of similar size share one call.

    blockdiag(M + λI, I) factors to blockdiag(L, I), so padding changes no result. On CPU, LAPACK
    factors each matrix of a batch separately: padding would only add work, sizes stay exact.
    """
    if device.type == "cpu" or dim > PADDED_BUCKET_MAX:
        return dim
    return max(16, 1 << (dim - 1).bit_length())


def damped_inverse(mats: list[torch.Tensor], damping: float, *, scales: list[torch.Tensor] | None = None,
                   previous: list[torch.Tensor | None] | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """P = (s·M + λI)⁻¹ for each [G, D, D] symmetric M, by Cholesky, batched by size (DESIGN §1.3).

    A factorisation that fails (not positive definite, non-finite) is retried in float64; if that
    fails too, the matrix keeps `previous` (identity/λ where there is none). Returns the inverses
    and a status per matrix ([G] int8: OK, RETRIED or KEPT_PREVIOUS). One host synchronisation per
    call, to decide the fallbacks.
    """
    scales = scales if scales is not None else [None] * len(mats)
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((bucket_dim(m.shape[-1], m.device), m.dtype, m.device), []).append(i)
    inverses: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    failed: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    for (dim, _, _), members in buckets.items():
        for i, inv, fail in zip(members, *bucket_inverses([mats[i] for i in members], damping,
                                                          [scales[i] for i in members], dim)):
            inverses[i], failed[i] = inv, fail
    return resolve_failures(mats, damping, scales, previous, inverses, failed)


def bucket_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None], dim: int
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(s·M + λI)⁻¹ of same-dtype matrices in one batched call, each padded to `dim` with identity.

    Returns the inverses (views of one buffer where no padding was needed) and per matrix a [G] bool
    tensor of failed factorisations; nothing is synchronised.
    """
    if dim > (BATCHED_FACTOR_MAX if mats[0].device.type == "cuda" else TRIANGULAR_SOLVE_MAX_CPU):
        return _one_by_one_inverses(mats, damping, scales)
    sizes = [m.shape[0] for m in mats]
    padded = any(m.shape[-1] != dim for m in mats)
    if padded:
        batch = mats[0].new_zeros(sum(sizes), dim, dim)
        for m, block in zip(mats, batch.split(sizes)):
            block[:, :m.shape[-1], :m.shape[-1]] = m
    else:
        batch = torch.cat(mats) if len(mats) > 1 else mats[0].clone()
    if any(s is not None for s in scales):
        one = torch.ones((), dtype=batch.dtype, device=batch.device)
        factors = torch.cat([(one if s is None else s.to(batch.dtype)).expand(g) for s, g in zip(scales, sizes)])
        batch.mul_(factors[:, None, None])
    if padded:
        diag = batch.new_full((sum(sizes), dim), damping)
        for m, d in zip(mats, diag.split(sizes)):
            d[:, m.shape[-1]:] = 1.0  # the identity block
        batch.diagonal(dim1=-2, dim2=-1).add_(diag)
    else:
        batch.diagonal(dim1=-2, dim2=-1).add_(damping)
    inv, info = _cholesky_inverse(batch)
    inverses = [p[:, :m.shape[-1], :m.shape[-1]] if m.shape[-1] != dim else p
                for m, p in zip(mats, inv.split(sizes))]
    inverses = [p.contiguous() for p in inverses]
    return inverses, list((info != 0).split(sizes))


def _one_by_one_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """bucket_inverses for large matrices: one factorisation call per matrix (BATCHED_FACTOR_MAX)."""
    inverses, failed = [], []
    for m, s in zip(mats, scales):
        results = []
        for one in m.split(1):
            damped = one.clone() if s is None else one * s.to(one.dtype)
            damped.diagonal(dim1=-2, dim2=-1).add_(damping)
            results.append(_cholesky_inverse(damped))
        inverses.append(results[0][0] if len(results) == 1 else torch.cat([r[0] for r in results]))
        failed.append(torch.cat([r[1] for r in results]) != 0)
    return inverses, failed


def resolve_failures(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None],
                     previous: list[torch.Tensor | None] | None, inverses: list[torch.Tensor],
                     failed: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """DESIGN §1.3's fallbacks, in place on `inverses`: failed matrices are retried in float64, and
    keep `previous` (identity/λ) if that fails too. Returns (inverses, status per matrix).

    The one host synchronisation of an inversion round: which matrices failed.
    """
    if not mats:
        return [], []
    device = mats[0].device
    sizes = [m.shape[0] for m in mats]
    status = list(torch.zeros(sum(sizes), dtype=torch.int8, device=device).split(sizes))
    failed_host = torch.cat([f.to(device) for f in failed]).cpu()
    if not failed_host.any():
        return inverses, status
    previous = previous if previous is not None else [None] * len(mats)
    for i, fails in enumerate(failed_host.split(sizes)):
        if not fails.any():
            continue
        m, inv, code = mats[i], inverses[i], status[i]
        idx = fails.nonzero().squeeze(1).to(m.device)
        damped = m[idx].double()
        if scales[i] is not None:
            damped = damped * scales[i].double()
        damped.diagonal(dim1=-2, dim2=-1).add_(damping)
        inv64, info64 = _cholesky_inverse(damped)
        retried = info64 == 0
        if previous[i] is not None:
            kept = previous[i][idx].to(inv.dtype)
        else:
            kept = (torch.eye(m.shape[-1], dtype=inv.dtype, device=m.device) / damping).expand(len(idx), -1, -1)
        inv[idx] = torch.where(retried[:, None, None], inv64.to(inv.dtype), kept)
        code[idx] = torch.where(retried, RETRIED, KEPT_PREVIOUS).to(torch.int8)
    return inverses, status


def _cholesky_inverse(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched SPD inverse via Cholesky, symmetric; info ≠ 0 where it failed or went non-finite
    (an inf pivot too: it would give a finite inverse)."""
    chol, info = torch.linalg.cholesky_ex(a)
    dim = chol.shape[-1]
    if chol.device.type == "cpu" and dim > TRIANGULAR_SOLVE_MAX_CPU:
        inv = torch.cholesky_inverse(chol)  # LAPACK potri: fills both triangles, exactly symmetric
    else:
        # L⁻¹ by a triangular solve, then L⁻ᵀL⁻¹ as one batched matmul: faster than potri for small
        # matrices on CPU and for all on CUDA (where cholesky_inverse loops over the batch).
        eye = torch.eye(dim, dtype=chol.dtype, device=chol.device).expand_as(chol)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        inv = chol_inv.mT @ chol_inv
        inv = (inv + inv.mT).mul_(0.5)
    # A sum is non-finite iff an entry is (or it overflows, which a float64 retry then settles).
    finite = torch.isfinite(chol.diagonal(dim1=-2, dim2=-1).sum(-1)) & torch.isfinite(inv.sum((-2, -1)))
    return inv, torch.where(finite, info, torch.ones_like(info))


def preconditioned_update_(blocks: list, momentum_buffers: list[torch.Tensor | None], *, damping: float,
                           grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """DESIGN §1.4: U = Ĝ·P per block (G/λ without P), then each parameter's SGD epilogue.

    `blocks` are `fastfoof.layers.Block`s; each parameter's lr, momentum, dampening, nesterov and
    weight_decay come from its param group. `momentum_buffers` is aligned with the blocks'
    parameters in order and updated in place (None entries are created on a first step).
    `grad_scale` is GradScaler's scale of the gradients, divided out of U; with `found_inf` ≠ 0 (its
    flag of non-finite gradients, a device scalar) no parameter or buffer changes, decided on the
    device. A step that creates a momentum buffer is decided on the host (the optimizer reads
    found_inf then), so found_inf never has to undo a buffer's creation.
    """
    skip = None if found_inf is None else found_inf != 0
    slot = 0
    for block in blocks:
        for p, u, group in zip(block.params, block_updates(block, damping), block.options):
            if u is not None:
                if grad_scale is not None:
                    u = u / grad_scale
                momentum_buffers[slot] = sgd_step_(p, u, momentum_buffers[slot], group, skip)
            slot += 1


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
    if block.precond is None:
        return [None if g is None else g.to(dtype) / damping for g in grads]
    weight = block.params[0]
    if grads[0] is None:
        return [None] * len(grads)
    u = torch.bmm(joint_gradient(block) if block.grad is None else block.grad, block.precond)
    dim = weight[0].numel()
    updates = [u[..., :dim].reshape(weight.shape)]
    if len(grads) == 2:
        updates.append(None if grads[1] is None else u[..., dim].reshape(block.params[1].shape))
    return updates


def eigh_with_status(mats: list[torch.Tensor], *, scales: list[torch.Tensor] | None = None,
                     previous: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Eigendecompositions s·M = Q diag(w) Qᵀ of symmetric [G, D, D] matrices, batched by size:
    [(w, Q)] and a status per matrix ([G] int8, as `damped_inverse`). A decomposition that fails or
    is non-finite is retried in float64, then keeps `previous` ((w, Q)), or (0, I) — no curvature —
    where there is none. One host synchronisation per call, to decide the fallbacks."""
    scales = scales if scales is not None else [None] * len(mats)
    results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(mats)  # type: ignore[list-item]
    failed: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((m.shape[-1], m.dtype, m.device), []).append(i)
    for members in buckets.values():
        batch = torch.cat([mats[i] if scales[i] is None else mats[i] * scales[i].to(mats[i].dtype)
                           for i in members])
        values, vectors, bad = _eigh(batch)
        sizes = [mats[i].shape[0] for i in members]
        for i, w, q, f in zip(members, values.split(sizes), vectors.split(sizes), bad.split(sizes)):
            results[i], failed[i] = (w, q), f
    status = [torch.zeros(m.shape[0], dtype=torch.int8, device=m.device) for m in mats]
    if not mats or not torch.cat([f.cpu() for f in failed]).any():
        return results, status
    previous = previous if previous is not None else [None] * len(mats)
    for i, fails in enumerate(failed):
        idx = fails.cpu().nonzero().squeeze(1).to(mats[i].device)
        if not len(idx):
            continue
        m = mats[i][idx].double()
        m = m if scales[i] is None else m * scales[i].double()
        # one by one: LAPACK fails a whole batch for one bad matrix
        w64, q64, bad64 = (torch.cat(parts) for parts in zip(*(_eigh(one) for one in m.split(1))))
        w, q = results[i]
        if previous[i] is not None:
            kept_w, kept_q = (t[idx].to(w.dtype) for t in previous[i])
        else:
            kept_w = torch.zeros_like(w[idx])
            kept_q = torch.eye(m.shape[-1], dtype=q.dtype, device=q.device).expand(len(idx), -1, -1)
        retried = ~bad64
        w[idx] = torch.where(retried[:, None], w64.to(w.dtype), kept_w)
        q[idx] = torch.where(retried[:, None, None], q64.to(q.dtype), kept_q)
        status[i][idx] = torch.where(retried, RETRIED, KEPT_PREVIOUS).to(torch.int8)
    return results, status


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched symmetric eigendecomposition and a [batch] bool of failed (or non-finite) matrices."""
    try:
        values, vectors = torch.linalg.eigh(a)
    except RuntimeError:  # LAPACK reports non-convergence as an error for the whole batch
        values = torch.zeros(a.shape[:-1], dtype=a.dtype, device=a.device)
        vectors = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a).clone()
        return values, vectors, torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    bad = ~(torch.isfinite(values.sum(-1)) & torch.isfinite(vectors.sum((-2, -1))))
    return values, vectors, bad
