"""The one dispatch point between the reference operations and their Triton kernels (DESIGN §2).

Triton runs CUDA tensors when it is importable; the reference runs everything else.
`FASTFOOF_BACKEND=reference|triton` or a `backend=` argument forces one; `TRITON_INTERPRET=1`
lets the Triton kernels run on CPU tensors (that is how the tests exercise them).
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch
from torch import nn

from . import linalg, reference
from .geometry import check_input, layer_patches_input, patch_dim
from .kernels.tables import Plans as KernelPlans

BACKENDS = ("auto", "reference", "triton")

# op name -> module of fastfoof.kernels that defines a function of the same name and signature
TRITON_KERNELS: dict[str, str] = {
    "patch_gram_": "fastfoof.kernels.patch_gram",
    "damped_inverse_with_status": "fastfoof.kernels.damped_inverse",
    "preconditioned_update_": "fastfoof.kernels.update",
    "fold_statistics_": "fastfoof.kernels.fold_statistics",
}


def check_backend(backend: str | None) -> str:
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """'reference' or 'triton' for tensors on `device`; ValueError where a forced Triton cannot run."""
    backend = check_backend(backend)
    if backend == "auto":
        backend = check_backend(os.environ.get("FASTFOOF_BACKEND", "auto"))
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' needs the triton package, which is not importable here")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend: 'triton' cannot run {device.type} tensors (CUDA tensors, or CPU "
                             "tensors with TRITON_INTERPRET=1 set before triton is imported)")
    return backend


def implementation(op: str, backend: str | None, device: torch.device):
    """The function that runs `op` for tensors on `device`: the Triton kernel or the reference."""
    if resolve_backend(backend, device) == "triton" and op in TRITON_KERNELS:
        return getattr(importlib.import_module(TRITON_KERNELS[op]), op)
    return getattr(reference, op)


def _run(op: str, backend: str | None, device: torch.device, plans: KernelPlans | None, *args, **kwargs):
    """`op` on `device`: a kernel gets the caller's `plans` (its tables, kept between calls; None: built
    for this call alone), the reference needs none."""
    fn = implementation(op, backend, device)
    if fn is not getattr(reference, op):
        kwargs["plans"] = plans
    return fn(*args, **kwargs)


@torch.no_grad()
def patch_gram_(out: torch.Tensor, x: torch.Tensor, module: nn.Module, *, alpha: float = 1.0,
                beta: float = 0.0, bias: bool | None = None, backend: str | None = None) -> torch.Tensor:
    """out ← β·out + α·Σ a aᵀ over the patch vectors of input `x` of `module` ([groups, D', D']), as the
    optimizer takes them: after the TF "SAME" padding of a module whose forward pads its input first;
    ValueError for a module whose forward is not a convolution or F.linear of its weight.

    `bias=None` appends the constant-1 bias row iff the module has a bias.
    """
    if bias is None:
        bias = getattr(module, "bias", None) is not None
    groups, dim = patch_dim(module)
    expected = (groups, dim + bias, dim + bias)
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape {expected} for {type(module).__name__}, got {tuple(out.shape)}")
    x = layer_patches_input(x, module)
    check_input(x, module)
    fn = implementation("patch_gram_", backend, x.device)
    return fn(out, x.detach(), module, alpha=alpha, beta=beta, bias=bias)


def patch_gram(x: torch.Tensor, module: nn.Module, *, bias: bool | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Σ a aᵀ over the patch vectors of input `x` of `module`: [groups, D', D'], float32
    (float64 for float64 inputs)."""
    if bias is None:
        bias = getattr(module, "bias", None) is not None
    groups, dim = patch_dim(module)
    out = torch.empty(groups, dim + bias, dim + bias, dtype=linalg.stat_dtype(x.dtype), device=x.device)
    return patch_gram_(out, x, module, bias=bias, backend=backend)


@torch.no_grad()
def fold_statistics_(emas, counts, stats, scales, decay, *, found_inf=None, backend=None, plans=None) -> torch.Tensor:
    """EMA fold of many layers' statistics with the non-finite drop of DESIGN §1.3; nothing is folded
    where `found_inf` ≠ 0 (GradScaler's skipped step, decided on the device). `plans`: the caller's
    `KernelPlans` (an optimizer's), which the kernels keep their tables in."""
    if not emas:
        return torch.zeros((), dtype=torch.int64)
    return _run("fold_statistics_", backend, emas[0].device, plans, emas, counts, stats, scales, decay, found_inf)


@torch.no_grad()
def damped_inverse_with_status(mats, damping, *, scales=None, previous=None, backend=None, method=None, plans=None):
    """(inverses, status per matrix): `reference.damped_inverse_with_status` through the dispatch. `method`:
    one of `linalg.INVERSE_METHODS`; None takes FASTFOOF_INVERSE, else the default."""
    if not mats:
        return [], []
    return _run("damped_inverse_with_status", backend, mats[0].device, plans, [m.detach() for m in mats], damping,
                scales=scales, previous=previous, method=method)


def damped_inverse(mats: list[torch.Tensor], damping: float, *, backend: str | None = None) -> list[torch.Tensor]:
    """(M + λI)⁻¹ for each [groups, D, D] symmetric matrix, same shapes and order."""
    if not damping > 0:
        raise ValueError(f"damping: must be > 0, got {damping}")
    return damped_inverse_with_status(mats, damping, backend=backend)[0]


@torch.no_grad()
def preconditioned_update_(blocks, momentum_buffers, *, damping, graft=None, grad_scale=None, found_inf=None,
                           reduce_norms=None, backend=None, plans=None) -> None:
    """DESIGN §1.4 for all blocks: U = Ĝ·P (low rank: (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ, §1.3; G/λ without
    either), grafted to the gradient's norm per preconditioned block with the bound κ = `graft` (None:
    eq. 6; U = G for the others), then each parameter's SGD epilogue; nothing changes where `found_inf` ≠ 0
    (decided on the device). `reduce_norms`: see `reference.grafted_updates` (FSDP2 sums the norms over
    ranks)."""
    reference.check_graft(graft)
    if not blocks:
        return
    _run("preconditioned_update_", backend, blocks[0].params[0].device, plans, blocks, momentum_buffers,
         damping=damping, graft=graft, grad_scale=grad_scale, found_inf=found_inf, reduce_norms=reduce_norms)


@torch.no_grad()
def eigh_with_status(mats, *, scales=None, previous=None, backend=None):
    """(w, Q) with s·M = Q diag(w) Qᵀ for each [groups, D, D] symmetric M, batched by size, with the
    fallbacks of DESIGN §1.3 (KFAC's exact damping): `linalg.eigh_with_status` on every backend
    (torch.linalg.eigh calls cuSOLVER)."""
    resolve_backend(backend, mats[0].device if mats else torch.device("cpu"))
    return linalg.eigh_with_status([m.detach() for m in mats], scales=scales, previous=previous)


def top_eigenpairs_with_status(mats, rank, damping, *, scales=None, previous=None, backend=None):
    """(s, Q): the top `rank` eigenvalues and eigenvectors of s·M for each [groups, D, D] symmetric M,
    with the fallbacks of DESIGN §1.3 (the low-rank preconditioner): `linalg.top_eigenpairs_with_status` on
    every backend (matmuls, QR and a small eigh, which torch runs on any device)."""
    resolve_backend(backend, mats[0].device if mats else torch.device("cpu"))
    return linalg.top_eigenpairs_with_status([m.detach() for m in mats], rank, damping, scales=scales,
                                             previous=previous)
