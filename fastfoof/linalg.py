"""The production linear algebra of the inversion round (DESIGN §1.3, §2.2): batched damped inverses by
several methods with one fallback rule, the randomized top eigenpairs of the low-rank preconditioner,
eigendecompositions (KFAC's exact damping), and P's memory layout. FOOF, KFAC, the reference op and the
Triton kernels all take it from here; `fastfoof.reference` is the oracle that tests compare against.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

OK, RETRIED, KEPT_PREVIOUS = 0, 1, 2  # status per matrix of an inversion round


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, preconditioners and updates are float32, float64 for float64 parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def damped_inverse_with_status(mats: list[torch.Tensor], damping: float, *,
                               scales: list[torch.Tensor | None] | None = None,
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
    """`damped_inverse_with_status` with the factorisation `factor` (the contract of `factor_inverses`,
    which the reference passes; the Triton backend passes its own)."""
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
    return inverses, _inverse_fallbacks(mats, damping, scales, previous, inverses, failed_host)


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
    inv, failed = cholesky_inverse(_damped(mats, damping, scales, dim))
    sizes = [m.shape[0] for m in mats]
    inverses = [p[:, :m.shape[-1], :m.shape[-1]] for m, p in zip(mats, inv.split(sizes))]  # views
    return inverses, list(failed.split(sizes))


def _one_by_one_inverses(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """bucket_inverses for large matrices: one factorisation call per matrix (BATCHED_FACTOR_MAX)."""
    inverses, failed = [], []
    for m, s in zip(mats, scales):
        results = [cholesky_inverse(_damped([one], damping, [s])) for one in m.split(1)]
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
    """(s·M + λI)⁻¹ of same-size matrices by `blocked_inverse`, all in one batch: the inverses (views
    of one buffer) and per matrix a [G] bool tensor of failures; nothing is synchronised."""
    batch = _damped(mats, damping, scales)
    leaves: list[tuple[torch.Tensor, torch.Tensor]] = []
    inv, _ = blocked_inverse(batch, product_precision(precision, batch), leaves, factor=False)
    # A leaf failed, or a pivot or the inverse is not finite (one sum for all pivots: an overflow
    # fails too, and the float64 retry settles it).
    infos, pivot_sums = (torch.stack(column) for column in zip(*leaves))
    failed = (infos != 0).any(0) | ~torch.isfinite(pivot_sums.sum(0) + inv.sum((-2, -1)))
    sizes = [m.shape[0] for m in mats]
    return list(inv.split(sizes)), list(failed.split(sizes))


def blocked_inverse(a: torch.Tensor, precision: str, leaves: list, factor: bool = True
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
    inv11, chol_inv11 = blocked_inverse(a[:, :h, :h], precision, leaves)
    chol21 = _product(a[:, h:, :h], chol_inv11.mT, precision)
    inv22, chol_inv22 = blocked_inverse(a[:, h:, h:] - _product(chol21, chol21.mT, precision), precision, leaves)
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
        accurate, fast = product_precision("tf32x3", a), product_precision("tf32", a)
        for _ in range(NEWTON_SCHULZ_STEPS):
            x = _symmetric(x + _product(x, eye - _product(a, x, accurate), fast))
        residual = torch.linalg.matrix_norm(eye - _product(a, x, accurate)) / math.sqrt(dim)
        sizes = [mats[i].shape[0] for i in members]
        missed = ~(residual <= NEWTON_SCHULZ_TOLERANCE)  # NaN misses too
        assign_results(members, (x.split(sizes), missed.split(sizes)), inverses, failed)
    return inverses, failed


def fall_back_(mats: list[torch.Tensor], results: list[tuple[torch.Tensor, ...]], failed: list[torch.Tensor],
               retry, previous: list[tuple[torch.Tensor, ...] | None], default) -> list[torch.Tensor]:
    """DESIGN §1.3's fallbacks of one batched call, in place on `results` (per matrix a tuple of [G, ...]
    tensors): the groups `failed` flags (host bool tensors, one per matrix) are retried in float64 by
    `retry(i, index)` (-> the float64 tensors of matrix i's groups `index` and a bool per group: failed
    again); where that fails too they keep `previous[i]` (a tuple like the results) or, where there is
    none, `default(i, count)`. Returns the status per matrix ([G] int8: OK, RETRIED, KEPT_PREVIOUS)."""
    status = [torch.zeros(m.shape[0], dtype=torch.int8, device=m.device) for m in mats]
    for i, fails in enumerate(failed):
        if not fails.any():
            continue
        index = fails.nonzero().squeeze(1).to(mats[i].device)
        *retried, failed64 = retry(i, index)
        kept = default(i, len(index)) if previous[i] is None else tuple(t[index] for t in previous[i])
        for result, value, keep in zip(results[i], retried, kept):
            again = failed64.view(-1, *[1] * (value.dim() - 1))
            result[index] = torch.where(again, keep.to(result.dtype), value.to(result.dtype))
        status[i][index] = torch.where(failed64, KEPT_PREVIOUS, RETRIED).to(torch.int8)
    return status


def _inverse_fallbacks(mats: list[torch.Tensor], damping: float, scales: list[torch.Tensor | None],
                       previous: list[torch.Tensor | None], inverses: list[torch.Tensor],
                       failed: list[torch.Tensor]) -> list[torch.Tensor]:
    """`fall_back_` for damped inverses: the float64 retry by Cholesky, identity/λ where there is no
    previous P."""
    def retry(i, index):
        damped = mats[i][index].double()
        if scales[i] is not None:
            damped = damped * scales[i].double()
        damped.diagonal(dim1=-2, dim2=-1).add_(damping)
        return cholesky_inverse(damped)

    def default(i, count):
        dim = mats[i].shape[-1]
        return ((torch.eye(dim, dtype=inverses[i].dtype, device=mats[i].device) / damping).expand(count, -1, -1),)

    return fall_back_(mats, [(inverse,) for inverse in inverses], failed, retry,
                      [None if p is None else (p,) for p in previous], default)


def cholesky_inverse(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def product_precision(wanted: str, a: torch.Tensor) -> str:
    """`wanted` where tensor cores take it (float32 on CUDA), IEEE products elsewhere."""
    return wanted if a.is_cuda and a.dtype == torch.float32 else "ieee"


def _product(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b with float32 dots in `precision`: "ieee"; "tf32" (10-bit mantissas, about 5e-4 relative
    per product); "tf32x3": hi·hi + hi·lo + lo·hi of operands split into TF32 parts (see
    `split_tf32`), float32-class accuracy from tensor cores (the dropped lo·lo term is 2⁻²²)."""
    if precision == "tf32x3":
        a_hi, a_lo = split_tf32(a)
        b_hi, b_lo = split_tf32(b)
        return matmul(a_hi, b_hi, tf32=True) + (matmul(a_hi, b_lo, tf32=True) + matmul(a_lo, b_hi, tf32=True))
    return matmul(a, b, tf32=precision == "tf32")


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x = hi + lo, exactly, with hi rounded to TF32's 10 mantissa bits (tensor cores take
    it unchanged) and |lo| ≤ 2⁻¹¹|x|."""
    hi = ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return hi, x - hi


def matmul(a: torch.Tensor, b: torch.Tensor, *, tf32: bool) -> torch.Tensor:
    """a @ b with float32 dots in TF32 or IEEE whatever torch's global setting; CPUs have no TF32."""
    if not a.is_cuda:
        return a @ b
    with float32_matmul_precision("high" if tf32 else "highest"):
        return a @ b


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
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


def eigh_with_status(mats: list[torch.Tensor], *, scales: list[torch.Tensor] | None = None,
                     previous: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Eigendecompositions s·M = Q diag(w) Qᵀ of symmetric [G, D, D] matrices, batched by size:
    [(w, Q)] and a status per matrix ([G] int8, as `damped_inverse_with_status`). A decomposition that fails or
    is non-finite is retried in float64, then keeps `previous` ((w, Q)), or (0, I) — no curvature —
    where there is none. One host synchronisation per call, to decide the fallbacks."""
    if not mats:
        return [], []
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
    previous = previous if previous is not None else [None] * len(mats)

    def retry(i, index):  # one by one: LAPACK fails a whole batch for one bad matrix
        m = mats[i][index].double()
        m = m if scales[i] is None else m * scales[i].double()
        return (torch.cat(parts) for parts in zip(*(_eigh(one) for one in m.split(1))))

    def default(i, count):  # no curvature
        w, q = results[i]
        return torch.zeros(count, *w.shape[1:], dtype=w.dtype, device=w.device), \
            torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand(count, -1, -1)

    return results, fall_back_(mats, results, _read_failures(failed), retry, previous, default)


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


def top_eigenpairs_with_status(mats: list[torch.Tensor], rank: int, damping: float, *,
                               scales: list[torch.Tensor | None] | None = None,
                               previous: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
                               ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """(s, Q) for each symmetric [G, D, D] M (D > rank): the top `rank` eigenvalues [G, r] (descending)
    and eigenvectors [G, D, r] of s·M, by the randomized method above, and a status per matrix ([G]
    int8, as `damped_inverse_with_status`). A decomposition that is non-finite, fails, or leaves Σ̂_r + λI
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

    def retry(i, index):  # one by one: LAPACK fails a whole batch for one bad matrix
        scale = None if scales[i] is None else scales[i].double()
        return (torch.cat(parts) for parts in zip(*(_top_eigenpairs(one, scale, rank, damping)
                                                    for one in mats[i][index].double().split(1))))

    def default(i, count):  # P = I/λ
        s, q = results[i]
        return torch.zeros(count, rank, dtype=s.dtype, device=s.device), \
            torch.eye(q.shape[1], rank, dtype=q.dtype, device=q.device).expand(count, -1, -1)

    return results, fall_back_(mats, results, _read_failures(failed), retry, previous, default)


def _top_eigenpairs(m: torch.Tensor, scale: torch.Tensor | None, rank: int, damping: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, Q, failed) of one batch [G, D, D]: `top_eigenpairs_with_status` without the fallbacks; failed: [G] bool."""
    groups, dim = m.shape[0], m.shape[-1]
    generator = torch.Generator(m.device).manual_seed(LOW_RANK_SEED)
    omega = torch.randn(groups, dim, sketch_size(dim, rank), generator=generator, dtype=m.dtype, device=m.device)
    y = matmul(m, omega, tf32=False)
    for _ in range(LOW_RANK_POWER_STEPS):
        y = matmul(m, torch.linalg.qr(y).Q, tf32=False)
    basis = torch.linalg.qr(y).Q
    values, vectors, bad = _eigh(_symmetric(matmul(basis.mT, matmul(m, basis, tf32=False), tf32=False)))
    s = values[..., -rank:].flip(-1)
    q = matmul(basis, vectors[..., -rank:].flip(-1), tf32=False)
    if scale is not None:
        s = s * scale.to(s.dtype)
    bad = bad | ~torch.isfinite(s.sum(-1)) | ~torch.isfinite(q.sum((-2, -1))) | ~(s > -damping).all(-1)
    return s, q, bad
