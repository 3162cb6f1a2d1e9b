"""Independent float64 computations the tests compare against (never the code under test)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def importorskip(name: str):
    """pytest.importorskip that also skips where the package is installed but cannot be imported here (a
    torchvision built for another torch raises RuntimeError, which pytest.importorskip lets through)."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 — any failure to import means: not usable here
        pytest.skip(f"could not import {name!r}: {type(error).__name__}: {error}", allow_module_level=True)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (DESIGN §4)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def batched_and_padded(x: torch.Tensor, conv: nn.Module) -> tuple[torch.Tensor, int | tuple]:
    """A conv's input with a batch dimension, padded explicitly where the conv's padding is a string or
    not zeros; and the padding left for the convolution (or unfold) to apply."""
    if x.dim() == len(conv.kernel_size) + 1:
        x = x.unsqueeze(0)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    return x, conv.padding


def patches64(x: torch.Tensor, module: nn.Module, bias: bool) -> torch.Tensor:
    """[groups, N, D'] patch vectors in float64, built by convolving with identity filters."""
    x = x.double()
    if isinstance(module, nn.Linear):
        a = x.reshape(-1, module.in_features).unsqueeze(0)
    else:
        nd = len(module.kernel_size)
        x, padding = batched_and_padded(x, module)
        g = module.groups
        cg = module.in_channels // g
        k = int(torch.tensor(module.kernel_size).prod())
        eye = torch.eye(cg * k, dtype=torch.float64).reshape(cg * k, cg, *module.kernel_size)
        weight = eye.repeat(g, *([1] * (nd + 1)))  # group j's filters see channels of group j
        cols = CONV[nd](x, weight, None, module.stride, padding, module.dilation, g)
        a = cols.reshape(x.shape[0], g, cg * k, -1).permute(1, 0, 3, 2).reshape(g, -1, cg * k)
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=torch.float64)], -1)
    return a


def gram64(x: torch.Tensor, module: nn.Module, bias: bool) -> torch.Tensor:
    """Σ a aᵀ over samples and positions, [groups, D', D'], float64."""
    a = patches64(x, module, bias)
    return a.transpose(1, 2) @ a


def position_mean_gram64(x: torch.Tensor, module: nn.Module, bias: bool) -> torch.Tensor:
    """Σ a aᵀ over samples, averaged over each sample's positions: one forward's share of grafted FOOF's
    statistic and of KFAC's A (DESIGN §1.2, §6), [groups, D', D'], float64."""
    a = patches64(x, module, bias)
    return a.transpose(1, 2) @ a / (a.shape[1] // x.shape[0])  # rows per sample: its positions


def damped_inverse64(m: torch.Tensor, damping: float) -> torch.Tensor:
    """(M + λI)⁻¹ by torch.linalg.inv in float64."""
    m = m.double()
    return torch.linalg.inv(m + damping * torch.eye(m.shape[-1], dtype=torch.float64))


def random_spd(groups: int, dim: int, generator, dtype=torch.float32) -> torch.Tensor:
    """[groups, dim, dim] symmetric positive definite, eigenvalues within about [0.1, 6].

    Symmetrised explicitly: a batched a·aᵀ need not be bitwise symmetric (MKL), and Cholesky reads
    one triangle only, while torch.linalg.inv reads both.
    """
    a = torch.randn(groups, dim, 2 * dim + 3, generator=generator, dtype=dtype)
    m = a @ a.mT / dim
    return 0.5 * (m + m.mT)


def with_condition(groups: int, dim: int, cond: float, damping: float, generator) -> torch.Tensor:
    """[groups, dim, dim] float32 M with cond(M + λI) = cond (eigenvalues log-spaced, random basis)."""
    q, _ = torch.linalg.qr(torch.randn(groups, dim, dim, dtype=torch.float64, generator=generator))
    eig = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), dim, dtype=torch.float64)
    m = (q * (eig - damping)) @ q.mT
    return (0.5 * (m + m.mT)).float()


def preconditioner64(x, module, damping, graft="sgd"):
    """(C + λI)⁻¹ of one batch, [groups, D', D'] float64: a layer's first P (the EMA is bias corrected); C the
    mean over samples of the sum over positions, divided by the positions per sample where grafted (§1.2)."""
    gram = gram64 if graft is None else position_mean_gram64
    stat = gram(x, module, module.bias is not None) / x.shape[0]
    return torch.linalg.inv(stat + damping * torch.eye(stat.shape[-1], dtype=torch.float64))
