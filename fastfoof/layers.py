"""The layers FOOF preconditions, how they are found, and the blocks the update works on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .geometry import LAYER_TYPES, SAME_PADDING, STOCK, layer_kind, patch_dim

# Why a layer is not preconditioned where its weight is no parameter of its own: FOOF's update is of the
# weight the layer multiplies its inputs with, not of the parameters it is computed from (DESIGN §1.1)
COMPUTED_WEIGHT = ("its weight is computed from other parameters (weight_norm, spectral_norm or another "
                   "parametrization), which FOOF does not precondition")

Skip = Union[None, str, type, Callable[[str, nn.Module], bool], Iterable[Union[str, type]]]


@dataclass(eq=False)
class Block:
    """Parameters updated together: a layer's weight (and bias, as the last column of [Ŵ | b]) with
    its preconditioner (dense P or low-rank (Q, s)), or a single parameter that has none (U = G/λ, or G when grafting)."""

    params: list[torch.Tensor]
    options: list[dict]  # each parameter's param group: hyperparameters are read at step time
    groups: int = 1
    precond: torch.Tensor | None = None  # [groups, D', D']
    # KFAC's gradient [Ĝ | g_b] already multiplied from the left (G⁻¹Ĝ, or the exact damping's rotated
    # and divided one; [groups, rows, D′]), or None for the parameters' own gradients: U = that·precond
    left_transformed_grad: torch.Tensor | None = None
    # a low-rank preconditioner in place of precond (DESIGN §1.3): the top eigenvectors Q [groups, D′, r]
    # and eigenvalues s [groups, r] of the statistic, U = (Ĝ − (Ĝ·Q)·diag(s/(s+λ))·Qᵀ)/λ
    eigvecs: torch.Tensor | None = None
    eigvals: torch.Tensor | None = None


@dataclass(eq=False)
class Layer:
    """A Linear/Conv weight FOOF may precondition, with the modules that multiply their inputs by it (one;
    several where modules share the weight Parameter, DESIGN §1.2). What it observed lives in the
    optimizer's statistics store (`fastfoof.statistics`)."""

    name: str  # the first module's (`modules[0]`, whose geometry the weight matrix Ŵ takes)
    modules: list[nn.Module]
    # the weight parameter as found at construction, which keys the optimizer state: FSDP2 sets
    # `module.weight` to an unsharded copy while it is gathered (in and after a forward that does
    # not reshard)
    weight: torch.Tensor
    groups: int
    dim: int  # D, without the bias row
    handed: bool = False  # these two are set from the optimizer's parameters
    bias_row: bool = False

    @property
    def module(self) -> nn.Module:
        """The module whose geometry Ŵ takes (all modules of a shared weight have its groups)."""
        return self.modules[0]

    @property
    def active(self) -> bool:
        """Preconditioned at the coming step: its weight is handed to the optimizer and trains."""
        return self.handed and self.weight.requires_grad

    @property
    def dim_p(self) -> int:
        """D′: D plus the bias row (`dim_p` wherever the code means D′)."""
        return self.dim + self.bias_row

    @property
    def rows(self) -> int:
        """Rows of Ŵ per group (output features or channels per group)."""
        return self.weight.shape[0] // self.groups


def _skip_predicate(skip: Skip, names_in_model: set[str]) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if isinstance(skip, (str, type)):
        skip = [skip]
    elif callable(skip):
        return skip
    entries = list(skip)
    names = {e for e in entries if isinstance(e, str)}
    types = tuple(e for e in entries if isinstance(e, type))
    if len(names) + len(types) != len(entries):
        raise ValueError("skip: expected module names, module types, or a predicate(name, module)")
    unknown = sorted(names - names_in_model)
    if unknown:  # a typo would silently precondition the layer
        raise ValueError(f"skip: no module named {', '.join(map(repr, unknown))} in the model")
    return lambda name, module: name in names or isinstance(module, types)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper compiles (its names are the user's names)."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def find_layers(model: nn.Module, skip: Skip) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Every Linear/Conv weight of `model` whose layers are not skipped, in `named_modules` order, with the
    modules that multiply by it (modules sharing one weight Parameter make one Layer); and the (name,
    reason) of those not preconditioned: a weight that is no parameter of its module, a forward that
    does not compute what its patch vectors assume, modules sharing a weight in different groups."""
    modules = list(unwrap_compiled(model).named_modules())
    skipped = _skip_predicate(skip, {name for name, _ in modules})
    users: dict[int, list[tuple[str, nn.Module]]] = {}  # id(weight) -> the (name, module)s that multiply by it
    excluded = []
    for name, module in modules:
        if not isinstance(module, LAYER_TYPES) or skipped(name, module):
            continue
        if module._parameters.get("weight") is None:  # read before `module.weight`, which may compute it
            excluded.append((name, COMPUTED_WEIGHT))
            continue
        users.setdefault(id(module.weight), []).append((name, module))
    layers = []
    for shared in users.values():
        names = ", ".join(name for name, _ in shared)
        if len({patch_dim(module) for _, module in shared}) > 1:
            excluded.append((names, "modules sharing one weight split it into different groups"))
            continue
        kinds = [layer_kind(module) for _, module in shared]
        wrong = next((kind for kind in kinds if kind not in (STOCK, SAME_PADDING)), None)
        if wrong is not None:
            excluded.append((names, wrong))
            continue
        name, module = shared[0]
        groups, dim = patch_dim(module)
        layers.append(Layer(name, [m for _, m in shared], module.weight, groups, dim))
    return layers, excluded
