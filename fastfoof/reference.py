"""Plain-PyTorch reference of FOOF's hot operations (DESIGN §2): runs on any device, oracle in tests.

Each function here has a Triton twin in `fastfoof.kernels` with the same signature; `fastfoof.ops`
chooses between them.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import PatchGeometry, patch_input

# The reference patch gram unfolds the batch in chunks of samples whose workspace (the chunk's patch
# vectors and its zero-padded input) stays within this many bytes; a sample that needs more takes a
# chunk alone.
GRAM_WORKSPACE_BYTES = 48 << 20
# Rows per block row of the one-triangle gram: one matmul each, against the rows from its diagonal on.
# On 2 x86 cores at D' = 4608, 256 and 512 are within noise of each other, at 0.6× the full product.
GRAM_BLOCK = 256

OK, RETRIED, KEPT_PREVIOUS = 0, 1, 2  # damped_inverse status per matrix


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, preconditioners and updates are float32, float64 for float64 parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# ---- damped inverse (DESIGN §1.3, §2.2) -----------------------------------------------------------
#
# Methods (a call's `method=`, else the environment variable FASTFOOF_INVERSE, else
# DEFAULT_INVERSE_METHOD):
# - "cholesky": LAPACK/cuSOLVER factorisations batched by size (small matrices share identity-padded
#   buckets on GPUs), large ones one call each; the inverse from the factor by a triangular solve and
#   one matmul (potri on CPU for large matrices).
# - "blocked", "blocked_tf32x3": the same Cholesky factorisation by recursive halving for matrices
#   larger than BLOCKED_LEAF_MAX: past the leaves all work is matmuls, on every matrix of one size at
#   once. "_tf32x3" runs them on CUDA as three TF32 tensor-core products of split operands.
# - "newton_schulz": X ← X + X(I − AX) from the previous P, NEWTON_SCHULZ_STEPS times; the result
#   serves only if ‖AX − I‖_F/√D ≤ NEWTON_SCHULZ_TOLERANCE, computed on the device; other matrices,
#   float64 ones and those without a previous P take "cholesky".
#
# Layout of every returned P ([G, D, D]): the row stride is D rounded up to a multiple of
# ROW_ALIGNMENT elements, the group stride D·(row stride), the base 16-byte aligned and the padding
# columns zero: a view of a [G, D, row stride] buffer, contiguous when D is a multiple of
# ROW_ALIGNMENT. Kernels can then load P's rows with 128-bit loads.

INVERSE_METHODS = ("cholesky", "blocked", "blocked_tf32x3", "newton_schulz")
DEFAULT_INVERSE_METHOD = "cholesky"
ROW_ALIGNMENT = 4  # elements: 16 bytes of float32
# Matrices up to this size share power-of-two buckets on GPUs, padded with identity blocks.
PADDED_BUCKET_MAX = 128
# On CPU, L⁻¹ by triangular solve then L⁻ᵀL⁻¹ beats potri up to this size (measured, 2-core x86).
TRIANGULAR_SOLVE_MAX_CPU = 128
# Larger matrices are factored one call each: batched cholesky_ex is slower there (H200: 3×2304
# batched 5.3 ms vs 0.9 ms each; 3×4608 21 ms vs 2.7 ms each). On CPU, where LAPACK factors one
# matrix at a time anyway, from TRIANGULAR_SOLVE_MAX_CPU on (batching measured slower on ResNet sizes).
BATCHED_FACTOR_MAX = 1024
# "blocked": the recursion stops at matrices of at most this size (one cholesky_ex call per leaf).
BLOCKED_LEAF_MAX = 512
# Newton–Schulz from the previous P: digits training (FOOF defaults) needed 2–3 steps to 1e-3 once
# past the first rounds, from residuals ‖I − AP‖_F/√D of 0.1–0.3.
NEWTON_SCHULZ_STEPS = 3
NEWTON_SCHULZ_TOLERANCE = 1e-3  # DESIGN §2.2


def inverse_method(method: str | None) -> str:
    """The method a call runs: `method`, else FASTFOOF_INVERSE, else DEFAULT_INVERSE_METHOD."""
    method = method or os.environ.get("FASTFOOF_INVERSE") or DEFAULT_INVERSE_METHOD
    if method not in INVERSE_METHODS:
        raise ValueError(f"method: expected one of {INVERSE_METHODS}, got {method!r}")
    return method


def damped_inverse(mats: list[torch.Tensor], damping: float, *, scales: list[torch.Tensor] | None = None,
                   previous: list[torch.Tensor | None] | None = None, method: str | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """P = (s·M + λI)⁻¹ for each [G, D, D] symmetric M (DESIGN §1.3), by `method` (see above); only
    the lower triangle of M is read.

    A factorisation that fails (not positive definite, non-finite) is retried in float64; if that
    fails too, the matrix keeps `previous` (identity/λ where there is none). Returns the inverses, in
    the layout above, and a status per matrix ([G] int8: OK, RETRIED or KEPT_PREVIOUS). One host
    synchronisation per call, to decide the fallbacks; a second where Newton–Schulz missed its
    tolerance for some matrix.
    """
    return invert(mats, damping, scales, previous, inverse_method(method), factor_inverses)


def invert(mats, damping, scales, previous, method, factor):
    """damped_inverse's steps, shared with the Triton backend, which passes its own `factor`
    (same contract as `factor_inverses`)."""
    if not mats:
        return [], []
    count = len(mats)
    scales = scales if scales is not None else [None] * count
    previous = previous if previous is not None else [None] * count
    warm = [i for i in range(count) if method == "newton_schulz" and _usable_start(previous[i], mats[i])]
    cold = sorted(set(range(count)) - set(warm))
    inverses: list[torch.Tensor] = [None] * count  # type: ignore[list-item]
    failed: list[torch.Tensor] = [None] * count  # type: ignore[list-item]
    if warm:
        results = newton_schulz_inverses([mats[i] for i in warm], damping, [scales[i] for i in warm],
                                         [previous[i] for i in warm])
        assign_results(warm, results, inverses, failed)
    if cold:
        results = factor([mats[i] for i in cold], damping, [scales[i] for i in cold], method)
        assign_results(cold, results, inverses, failed)
    for i in range(count):  # one at a time: each original is freed as its copy is made
        inverses[i] = aligned(inverses[i])
    failed_host = _read_failures(failed)
    missed = [(i, failed_host[i].nonzero().squeeze(1).to(mats[i].device)) for i in warm if failed_host[i].any()]
    if missed:  # Newton–Schulz results over the tolerance: those matrices take Cholesky
        subsets = [mats[i][idx] for i, idx in missed]
        results = factor(subsets, damping, [scales[i] for i, _ in missed], "cholesky")
        for (i, idx), inverse, fails in zip(missed, *results):
            inverses[i][idx] = inverse
            failed[i] = torch.zeros_like(failed[i]).index_put_((idx,), fails)
        failed_host = _read_failures(failed)
    return resolve_failures(mats, damping, scales, previous, inverses, failed_host)


def _usable_start(start: torch.Tensor | None, m: torch.Tensor) -> bool:
    """A previous P Newton–Schulz may start from; float64 statistics keep Cholesky's accuracy."""
    return (start is not None and m.dtype == torch.float32 and start.dtype == m.dtype and start.shape == m.shape
            and start.device == m.device)


def assign_results(members: list[int], results: tuple[list, list], inverses: list, failed: list) -> None:
    """Scatter (inverses, failed) computed for the matrices `members` into the lists of all."""
    for i, inverse, fails in zip(members, *results):
        inverses[i], failed[i] = inverse, fails


def _read_failures(failed: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every matrix's failure flags on the host: one device-to-host copy (a synchronisation)."""
    device = failed[0].device
    return list(torch.cat([f.to(device) for f in failed]).cpu().split([f.numel() for f in failed]))


def padded_row(dim: int) -> int:
    """The row stride of a P of size `dim`: `dim` rounded up to ROW_ALIGNMENT."""
    return -(-dim // ROW_ALIGNMENT) * ROW_ALIGNMENT


def padded_zeros(groups: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero [groups, dim, dim] tensor in P's layout (the module's damped-inverse notes)."""
    return torch.zeros(groups, dim, padded_row(dim), dtype=dtype, device=device)[..., :dim]


def aligned(p: torch.Tensor) -> torch.Tensor:
    """`p` itself where it has P's layout, else a copy that has."""
    dim = p.shape[-1]
    row = padded_row(dim)
    if p.stride() == (dim * row, row, 1) and p.data_ptr() % 16 == 0:
        return p
    return padded_zeros(p.shape[0], dim, p.dtype, p.device).copy_(p)


def factor_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None], method: str
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(s·M + λI)⁻¹ by Cholesky, per size bucket: batched, one by one (large), or blocked where
    `method` says so. Returns the inverses and per matrix a [G] bool tensor of failed
    factorisations; nothing is synchronised."""
    inverses: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    failed: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((bucket_dim(m.shape[-1], m.device), m.dtype, m.device), []).append(i)
    for (dim, _, _), members in buckets.items():
        args = [mats[i] for i in members], damping, [scales[i] for i in members]
        if method.startswith("blocked") and dim > BLOCKED_LEAF_MAX:
            results = blocked_inverses(*args, "tf32x3" if method == "blocked_tf32x3" else "ieee")
        else:
            results = bucket_inverses(*args, dim)
        assign_results(members, results, inverses, failed)
    return inverses, failed


def bucket_dim(dim: int, device: torch.device) -> int:
    """The size a matrix of size `dim` is padded to so that layers of similar size share one call.

    blockdiag(M + λI, I) factors to blockdiag(L, I), so padding changes no result. On CPU, LAPACK
    factors each matrix of a batch separately: padding would only add work, sizes stay exact.
    """
    if device.type == "cpu" or dim > PADDED_BUCKET_MAX:
        return dim
    return max(16, 1 << (dim - 1).bit_length())


def bucket_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None], dim: int
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(s·M + λI)⁻¹ of same-dtype matrices in one batched call, each padded to `dim` with identity.

    Returns the inverses (views of one buffer) and per matrix a [G] bool tensor of failed
    factorisations; nothing is synchronised.
    """
    if dim > (BATCHED_FACTOR_MAX if mats[0].device.type == "cuda" else TRIANGULAR_SOLVE_MAX_CPU):
        return _one_by_one_inverses(mats, damping, scales)
    inv, failed = _cholesky_inverse(_damped(mats, damping, scales, dim))
    sizes = [m.shape[0] for m in mats]
    inverses = [p[:, :m.shape[-1], :m.shape[-1]] for m, p in zip(mats, inv.split(sizes))]  # views
    return inverses, list(failed.split(sizes))


def _one_by_one_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """bucket_inverses for large matrices: one factorisation call per matrix (BATCHED_FACTOR_MAX)."""
    inverses, failed = [], []
    for m, s in zip(mats, scales):
        results = [_cholesky_inverse(_damped([one], damping, [s])) for one in m.split(1)]
        inverses.append(results[0][0] if len(results) == 1 else torch.cat([r[0] for r in results]))
        failed.append(torch.cat([r[1] for r in results]))
    return inverses, failed


def _damped(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None], dim: int | None = None
            ) -> torch.Tensor:
    """[ΣG, dim, dim]: each s·M + λI in a fresh batch, padded to `dim` as blockdiag(s·M + λI, I)."""
    dim = dim or mats[0].shape[-1]
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
    return batch


def blocked_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None], precision: str
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(s·M + λI)⁻¹ of same-size matrices by `_blocked_inverse`, all in one batch: the inverses (views
    of one buffer) and per matrix a [G] bool tensor of failures; nothing is synchronised."""
    batch = _damped(mats, damping, scales)
    leaves: list[tuple[torch.Tensor, torch.Tensor]] = []
    inv, _ = _blocked_inverse(batch, _precision(precision, batch), leaves, factor=False)
    # A leaf failed, or a pivot or the inverse is not finite (one sum for all pivots: an overflow
    # fails too, and the float64 retry settles it).
    infos, pivot_sums = (torch.stack(column) for column in zip(*leaves))
    failed = (infos != 0).any(0) | ~torch.isfinite(pivot_sums.sum(0) + inv.sum((-2, -1)))
    sizes = [m.shape[0] for m in mats]
    return list(inv.split(sizes)), list(failed.split(sizes))


def _blocked_inverse(a: torch.Tensor, precision: str, leaves: list, factor: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(A⁻¹, L⁻¹ where `factor`) of a batch of SPD matrices, from their lower triangles; appends each
    leaf's (cholesky_ex info, sum of its pivots L_ii) to `leaves`.

    Cholesky by recursive halving, A = [[A11, ·], [A21, A22]] = L·Lᵀ with
        L11 = chol(A11),  L21 = A21·L11⁻ᵀ,  L22 = chol(A22 − L21·L21ᵀ),
        L⁻¹ = [[L11⁻¹, 0], [−L22⁻¹·L21·L11⁻¹, L22⁻¹]],
        A⁻¹ = L⁻ᵀ·L⁻¹ = [[A11⁻¹ + (L⁻¹)21ᵀ(L⁻¹)21, ·], [L22⁻ᵀ·(L⁻¹)21, (A22 − L21·L21ᵀ)⁻¹]],
    where A11⁻¹, L11⁻¹ and the last block come from the recursion: past the leaves (at most
    BLOCKED_LEAF_MAX) all work is matmuls. Explicit triangular inverses in place of triangular
    solves keep potri's accuracy (measured in float32 within 2× of LAPACK, cond 1e2–1e6), unlike the
    plain Schur-complement recursion, whose error grows as cond^1.5.
    """
    n = a.shape[-1]
    if n <= BLOCKED_LEAF_MAX:
        chol, info = torch.linalg.cholesky_ex(a)
        leaves.append((info, chol.diagonal(dim1=-2, dim2=-1).sum(-1)))
        chol_inv = _triangular_inverse(chol)
        return _symmetric(_product(chol_inv.mT, chol_inv, precision)), chol_inv
    h = (n + 64) // 128 * 64 if n >= 192 else n // 2  # about half; whole 64-wide matmul tiles where n allows
    inv11, chol_inv11 = _blocked_inverse(a[:, :h, :h], precision, leaves)
    chol21 = _product(a[:, h:, :h], chol_inv11.mT, precision)
    inv22, chol_inv22 = _blocked_inverse(a[:, h:, h:] - _product(chol21, chol21.mT, precision), precision, leaves)
    chol_inv21 = -_product(chol_inv22, _product(chol21, chol_inv11, precision), precision)
    inv = torch.empty_like(a)
    inv[:, :h, :h] = _symmetric(inv11 + _product(chol_inv21.mT, chol_inv21, precision))
    inv[:, h:, :h] = _product(chol_inv22.mT, chol_inv21, precision)
    inv[:, :h, h:] = inv[:, h:, :h].mT
    inv[:, h:, h:] = inv22
    chol_inv = None
    if factor:
        chol_inv = torch.zeros_like(a)
        chol_inv[:, :h, :h], chol_inv[:, h:, :h], chol_inv[:, h:, h:] = chol_inv11, chol_inv21, chol_inv22
    return inv, chol_inv


def newton_schulz_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None],
                           starts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(s·M + λI)⁻¹ by NEWTON_SCHULZ_STEPS Newton–Schulz steps X ← X + X(I − AX) from `starts`,
    all matrices of one size in one batch. Returns the results and per matrix a [G] bool tensor:
    the residual ‖AX − I‖_F/√D missed NEWTON_SCHULZ_TOLERANCE (or is not finite).

    The residual squares each step (I − AX' = (I − AX)²), so from a positive definite start (every
    P returned here is one) a matrix passes only if it is positive definite: an indefinite A gives
    AX a negative eigenvalue, whose residual grows. On CUDA, I − AX (which cancels) takes
    float32-class "tf32x3" products and the correction X·R (small) plain TF32; the check's own
    rounding is about 1e-7·cond(A).
    """
    inverses: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    failed: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[-1], m.dtype, m.device), []).append(i)
    for (dim, _, _), members in groups.items():
        a = _damped([mats[i] for i in members], damping, [scales[i] for i in members])
        a = a.tril() + a.tril(-1).mT  # the lower triangle rules, as for Cholesky
        x = torch.cat([starts[i] for i in members])
        eye = torch.eye(dim, dtype=a.dtype, device=a.device)
        accurate, fast = _precision("tf32x3", a), _precision("tf32", a)
        for _ in range(NEWTON_SCHULZ_STEPS):
            x = _symmetric(x + _product(x, eye - _product(a, x, accurate), fast))
        residual = torch.linalg.matrix_norm(eye - _product(a, x, accurate)) / math.sqrt(dim)
        sizes = [mats[i].shape[0] for i in members]
        missed = ~(residual <= NEWTON_SCHULZ_TOLERANCE)  # NaN misses too
        assign_results(members, (x.split(sizes), missed.split(sizes)), inverses, failed)
    return inverses, failed


def resolve_failures(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None],
                     previous: list[torch.Tensor | None], inverses: list[torch.Tensor],
                     failed: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """DESIGN §1.3's fallbacks, in place on `inverses`, from the failure flags on the host: failed
    matrices are retried in float64, and keep `previous` (identity/λ) if that fails too. Returns
    (inverses, status per matrix)."""
    device = mats[0].device
    sizes = [m.shape[0] for m in mats]
    status = list(torch.zeros(sum(sizes), dtype=torch.int8, device=device).split(sizes))
    for i, fails in enumerate(failed):
        if not fails.any():
            continue
        m, inv, code = mats[i], inverses[i], status[i]
        idx = fails.nonzero().squeeze(1).to(m.device)
        damped = m[idx].double()
        if scales[i] is not None:
            damped = damped * scales[i].double()
        damped.diagonal(dim1=-2, dim2=-1).add_(damping)
        inv64, failed64 = _cholesky_inverse(damped)
        if previous[i] is not None:
            kept = previous[i][idx].to(inv.dtype)
        else:
            kept = (torch.eye(m.shape[-1], dtype=inv.dtype, device=m.device) / damping).expand(len(idx), -1, -1)
        inv[idx] = torch.where(failed64[:, None, None], kept, inv64.to(inv.dtype))
        code[idx] = torch.where(failed64, KEPT_PREVIOUS, RETRIED).to(torch.int8)
    return inverses, status


def _cholesky_inverse(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched SPD inverse via Cholesky, symmetric, and a bool per matrix: the factorisation failed.
    Never raises on bad numbers: a failed factor (zero or NaN pivots, which potri refuses) is
    replaced by the identity before it is inverted, and flagged."""
    chol, info = torch.linalg.cholesky_ex(a)
    broken = (info != 0) | ~torch.isfinite(chol.diagonal(dim1=-2, dim2=-1).sum(-1))
    chol = torch.where(broken[:, None, None], torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device), chol)
    if chol.device.type == "cpu" and chol.shape[-1] > TRIANGULAR_SOLVE_MAX_CPU:
        inv = torch.cholesky_inverse(chol)  # LAPACK potri: fills both triangles, exactly symmetric
        if inv.stride(-1) != 1:
            inv = inv.mT  # column-major from LAPACK: the same symmetric matrix row-major, no copy
    else:
        # L⁻¹ by a triangular solve, then L⁻ᵀL⁻¹ as one batched matmul: faster than potri for small
        # matrices on CPU and for all on CUDA (where cholesky_inverse loops over the batch).
        chol_inv = _triangular_inverse(chol)
        inv = _symmetric(_product(chol_inv.mT, chol_inv, "ieee"))
    return inv, broken | ~torch.isfinite(inv.sum((-2, -1)))


def _triangular_inverse(chol: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def _symmetric(x: torch.Tensor) -> torch.Tensor:
    return (x + x.mT).mul_(0.5)


def _precision(wanted: str, a: torch.Tensor) -> str:
    """`wanted` where tensor cores take it (float32 on CUDA), IEEE products elsewhere."""
    return wanted if a.is_cuda and a.dtype == torch.float32 else "ieee"


def _product(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b with float32 dots in `precision`: "ieee"; "tf32" (10-bit mantissas, about 5e-4 relative
    per product); "tf32x3": hi·hi + hi·lo + lo·hi of operands split into TF32 parts (see
    `_split_tf32`), float32-class accuracy from tensor cores (the dropped lo·lo term is 2⁻²²)."""
    if precision == "tf32x3":
        a_hi, a_lo = _split_tf32(a)
        b_hi, b_lo = _split_tf32(b)
        return _matmul(a_hi, b_hi, tf32=True) + (_matmul(a_hi, b_lo, tf32=True) + _matmul(a_lo, b_hi, tf32=True))
    return _matmul(a, b, tf32=precision == "tf32")


def _split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x = hi + lo, exactly, with hi rounded to TF32's 10 mantissa bits (tensor cores take
    it unchanged) and |lo| ≤ 2⁻¹¹|x|."""
    hi = ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return hi, x - hi


def _matmul(a: torch.Tensor, b: torch.Tensor, *, tf32: bool) -> torch.Tensor:
    """a @ b with float32 dots in TF32 or IEEE whatever torch's global setting; CPUs have no TF32."""
    if not a.is_cuda:
        return a @ b
    with _float32_matmul_precision("high" if tf32 else "highest"):
        return a @ b


@contextlib.contextmanager
def _float32_matmul_precision(precision: str):
    """torch's float32 matmul precision ("highest": IEEE, "high": TF32) for the block, then restored.

    Through the legacy setter, which sets torch ≥ 2.9's per-backend value along with it; left alone
    where a caller has mixed the two APIs (torch then refuses to read the legacy value).
    """
    try:
        saved = torch.get_float32_matmul_precision()
    except RuntimeError:
        saved = None
    if saved is None or saved == precision:
        yield
        return
    saved_cuda = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)
        if saved_cuda is not None:
            torch.backends.cuda.matmul.fp32_precision = saved_cuda


GRAFTS = (None, "sgd")


def preconditioned_update_(blocks: list, momentum_buffers: list[torch.Tensor | None], *, damping: float,
                           graft: str | None = None, grad_scale: torch.Tensor | None = None,
                           found_inf: torch.Tensor | None = None, reduce_norms=None) -> None:
    """DESIGN §1.4: U = Ĝ·P per block (low rank: from (Q, s), §1.3; G/λ without P), then each
    parameter's SGD epilogue.

    `blocks` are `fastfoof.layers.Block`s; each parameter's lr, momentum, dampening, nesterov and
    weight_decay come from its param group. `momentum_buffers` is aligned with the blocks'
    parameters in order and updated in place (None entries are created on a first step).
    `graft="sgd"`: each preconditioned block's U takes its gradient's Frobenius norm, the others step
    with U = G (`grafted_updates`). `grad_scale` is GradScaler's scale of the gradients, divided out of
    U; with `found_inf` ≠ 0 (its flag of non-finite gradients, a device scalar) no parameter or buffer
    changes, decided on the device. A step that creates a momentum buffer is decided on the host (the
    optimizer reads found_inf then), so found_inf never has to undo a buffer's creation.
    """
    skip = None if found_inf is None else found_inf != 0
    # without grafting one block's U is alive at a time; grafting needs every norm before the first step
    updates = (block_updates(block, damping) for block in blocks) if graft is None else \
        grafted_updates(blocks, damping, reduce_norms)
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


# Grafting's bound on its scale, in units of λ: a grafted step is at most GRAFT_BOUND times eq. 6's at
# lr = λ·lr (DESIGN §1.4): along a direction its inputs barely vary in, at most 10× SGD's
GRAFT_BOUND = 10.0


def graft_scales(squares: torch.Tensor, damping: float) -> torch.Tensor:
    """min(‖Ĝ‖_F / ‖U‖_F, GRAFT_BOUND·λ) per row of [‖Ĝ‖², ‖U‖²] (DESIGN §1.4), 0 where U = 0."""
    g, u = squares.unbind(-1)
    return torch.where(u > 0, (g / u).sqrt(), 0.0).clamp_(max=GRAFT_BOUND * damping)


def grafted_updates(blocks: list, damping: float, reduce_norms=None) -> list[list[torch.Tensor | None]]:
    """Per block the U of `block_updates`, grafted (DESIGN §1.4): a preconditioned block's U rescaled to
    its gradient's Frobenius norm (at most by GRAFT_BOUND·λ), all groups, weight and bias together; U = G
    for the others.

    `reduce_norms(squares, blocks)`, if given, is called once with [‖Ĝ‖², ‖U‖²] of the grafted blocks
    ([n, 2], in their order, even where n = 0) and returns them summed with the other ranks' rows of
    the same layers (FSDP2)."""
    updates = [block_updates(block, damping if grafted(block) else 1.0) for block in blocks]  # U = G/λ, λ = 1
    rows = [i for i, block in enumerate(blocks) if grafted(block)]
    squares = graft_squares([blocks[i] for i in rows], [updates[i] for i in rows], blocks[0].params[0])
    if reduce_norms is not None:
        squares = reduce_norms(squares, [blocks[i] for i in rows])
    scale_updates_([updates[i] for i in rows], graft_scales(squares, damping))
    return updates


def graft_squares(blocks: list, updates: list[list[torch.Tensor | None]], first: torch.Tensor) -> torch.Tensor:
    """[‖Ĝ‖², ‖U‖²] per grafted block ([n, 2], in the blocks' statistics dtype; `first`: a parameter for the
    device and dtype where n = 0): Ĝ its parameters' own gradients (also where KFAC's `block.grad` holds a
    transformed one), U its `block_updates` (weight and bias; None: not counted). One norm call for all:
    each block contributes (weight, bias) of each, an empty tensor standing in for a missing one."""
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
    g = joint_gradient(block) if block.grad is None else block.grad
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


# ---- low-rank preconditioner (DESIGN §1.3, `rank`) ----------------------------------------------
#
# The top r eigenpairs of s·M by randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg.
# 4.4 with Rayleigh–Ritz, 5.3): Y = M·Ω for a Gaussian Ω of k = `sketch_size` columns (r plus an
# oversampling of r/4, at least LOW_RANK_MIN_OVERSAMPLING), LOW_RANK_POWER_STEPS times Y ← M·orth(Y),
# then the eigenpairs of QᵀMQ on Q = orth(Y), the top r kept: (LOW_RANK_POWER_STEPS + 2)·2·D²·k flops
# per matrix against Cholesky's and the inverse's 4/3·D³. Measured on flat (Wishart) and slowly
# decaying (k^-0.5, k^-1, k^-2, e^(-k/30)) spectra and a ReLU conv gram, D' = 577, r ∈ {32, 128, 256}:
# ‖M − Q diag(s) Qᵀ‖_F within 1.031× of the exact truncation's (DESIGN asks 1.05×); one power step
# less, or an oversampling of 10, gives up to 1.11×. Ω is drawn from a generator seeded with
# LOW_RANK_SEED for every matrix, so that a decomposition depends on its matrix alone (not on the
# others in the call, the rank that computes it under DDP, or a resume).
LOW_RANK_POWER_STEPS = 3
LOW_RANK_MIN_OVERSAMPLING = 10
LOW_RANK_SEED = 0


def sketch_size(dim: int, rank: int) -> int:
    """Columns of the random subspace for the top `rank` eigenpairs of a `dim`-sized matrix."""
    return min(dim, rank + max(LOW_RANK_MIN_OVERSAMPLING, rank // 4))


def top_eigenpairs(mats: list[torch.Tensor], rank: int, damping: float, *,
                   scales: list[torch.Tensor | None] | None = None,
                   previous: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """(s, Q) for each symmetric [G, D, D] M (D > rank): the top `rank` eigenvalues [G, r] (descending)
    and eigenvectors [G, D, r] of s·M, by the randomized method above, and a status per matrix ([G]
    int8, as `damped_inverse`). A decomposition that is non-finite, fails, or leaves Σ̂_r + λI
    indefinite (an eigenvalue ≤ −λ) is retried in float64, then keeps `previous` ((s, Q)), or (0, I[:, :r])
    where there is none: P = I/λ. One host synchronisation per call, to decide the fallbacks."""
    if not mats:
        return [], []
    scales = scales if scales is not None else [None] * len(mats)
    previous = previous if previous is not None else [None] * len(mats)
    results, failed = [], []
    for m, scale in zip(mats, scales):
        s, q, bad = _top_eigenpairs(m, scale, rank, damping)
        results.append((s, q))
        failed.append(bad)
    status = [torch.zeros(m.shape[0], dtype=torch.int8, device=m.device) for m in mats]
    for i, fails in enumerate(_read_failures(failed)):
        if not fails.any():
            continue
        idx = fails.nonzero().squeeze(1).to(mats[i].device)
        scale = None if scales[i] is None else scales[i].double()
        # one by one: LAPACK fails a whole batch for one bad matrix
        s64, q64, bad64 = (torch.cat(parts) for parts in zip(*(_top_eigenpairs(one, scale, rank, damping)
                                                               for one in mats[i][idx].double().split(1))))
        s, q = results[i]
        if previous[i] is not None:
            kept_s, kept_q = (t[idx].to(s.dtype) for t in previous[i])
        else:
            kept_s = torch.zeros_like(s[idx])
            kept_q = torch.eye(q.shape[1], rank, dtype=q.dtype, device=q.device).expand(len(idx), -1, -1)
        retried = ~bad64
        s[idx] = torch.where(retried[:, None], s64.to(s.dtype), kept_s)
        q[idx] = torch.where(retried[:, None, None], q64.to(q.dtype), kept_q)
        status[i][idx] = torch.where(retried, RETRIED, KEPT_PREVIOUS).to(torch.int8)
    return results, status


def _top_eigenpairs(m: torch.Tensor, scale: torch.Tensor | None, rank: int, damping: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, Q, failed) of one batch [G, D, D]: `top_eigenpairs` without the fallbacks; failed: [G] bool."""
    groups, dim = m.shape[0], m.shape[-1]
    generator = torch.Generator(m.device).manual_seed(LOW_RANK_SEED)
    omega = torch.randn(groups, dim, sketch_size(dim, rank), generator=generator, dtype=m.dtype, device=m.device)
    y = _matmul(m, omega, tf32=False)
    for _ in range(LOW_RANK_POWER_STEPS):
        y = _matmul(m, torch.linalg.qr(y).Q, tf32=False)
    basis = torch.linalg.qr(y).Q
    values, vectors, bad = _eigh(_symmetric(_matmul(basis.mT, _matmul(m, basis, tf32=False), tf32=False)))
    s = values[..., -rank:].flip(-1)
    q = _matmul(basis, vectors[..., -rank:].flip(-1), tf32=False)
    if scale is not None:
        s = s * scale.to(s.dtype)
    bad = bad | ~torch.isfinite(s.sum(-1)) | ~torch.isfinite(q.sum((-2, -1))) | ~(s > -damping).all(-1)
    return s, q, bad
