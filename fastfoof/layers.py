"""The layers FOOF preconditions, how they are found, and the blocks the update works on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .geometry import LAYER_TYPES, SAME_PADDING, STOCK, computation, patch_dim

Skip = Union[None, str, type, Callable[[str, nn.Module], bool], Iterable[Union[str, type]]]


@dataclass(eq=False)
class Block:
    """Parameters updated together: a layer's weight (and bias, as the last column of [Ŵ | b]) with
    its preconditioner (dense P or low-rank (Q, s)), or a single parameter that has none (U = G/λ, or G when grafting)."""

    params: list[torch.Tensor]
    options: list[dict]  # each parameter's param group: hyperparameters are read at step time
    groups: int = 1
    precond: torch.Tensor | None = None  # [groups, D', D']
    # the gradient [Ĝ | g_b] already transformed from the left ([groups, rows, D']; KFAC), or None
    # for the parameters' own gradients: U = grad·precond
    grad: torch.Tensor | None = None
    # a low-rank preconditioner in place of precond (DESIGN §1.3): the top eigenvectors Q [groups, D', r]
    # and eigenvalues s [groups, r] of the statistic, U = (grad − (grad·Q)·diag(s/(s+λ))·Qᵀ)/λ
    eigvecs: torch.Tensor | None = None
    eigvals: torch.Tensor | None = None


@dataclass(eq=False)
class Layer:
    """A Linear/Conv module whose weight FOOF may precondition, with what it observed since the last
    step: the inputs its forward hook recorded, and the statistic made of them."""

    name: str
    module: nn.Module
    # the weight parameter as found at construction, which keys the optimizer state: FSDP2 sets
    # `module.weight` to an unsharded copy while it is gathered (in and after a forward that does
    # not reshard)
    weight: torch.Tensor
    groups: int
    dim: int  # D, without the bias row
    # inputs recorded by a compiled forward, not yet turned into statistics (an eager forward's
    # statistic is computed in its hook)
    inputs: list = field(default_factory=list)
    stat: torch.Tensor | None = None  # Σ a aᵀ over the inputs taken since the last step
    samples: int = 0  # Σ B over those inputs
    # KFAC: the output gradients' statistic since the last step, the samples it holds, the batch
    # sizes of the forwards they came from, and (Monte Carlo Fisher) the outputs with their batch
    # sizes, kept for `KFAC.backward_fisher`
    grad_stat: torch.Tensor | None = None
    grad_samples: int = 0
    grad_batch: int = 0
    outputs: list = field(default_factory=list)
    handed: bool = False  # these two are set from the optimizer's parameters
    bias_row: bool = False
    same_padding: bool = False  # its forward pads its input to TensorFlow's "SAME" first (timm's Conv2dSame)
    called: bool = False  # its forward ran since the last step (in any mode)

    @property
    def active(self) -> bool:
        """Preconditioned at the coming step: its weight is handed to the optimizer and trains."""
        return self.handed and self.weight.requires_grad

    @property
    def dim_out(self) -> int:
        return self.dim + self.bias_row

    @property
    def rows(self) -> int:
        """Rows of Ŵ per group (output features or channels per group)."""
        return self.weight.shape[0] // self.groups

    def take_inputs(self) -> list[torch.Tensor]:
        """The recorded inputs, now forgotten."""
        records = list(self.inputs)
        self.inputs.clear()  # in place: a compiled forward's side effects append to this very list
        return records

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.samples = self.grad_samples = self.grad_batch = 0
        self.called = False


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
    """Every Linear/Conv layer of `model` not skipped, in `named_modules` order, each weight once;
    and the (name, reason) of those whose forward does not compute what their patch vectors assume."""
    modules = list(unwrap_compiled(model).named_modules())
    skipped = _skip_predicate(skip, {name for name, _ in modules})
    layers, excluded, claimed = [], [], set()
    for name, module in modules:
        if not isinstance(module, LAYER_TYPES) or skipped(name, module):
            continue
        if not isinstance(module.weight, torch.Tensor) or id(module.weight) in claimed:
            continue  # a tied weight is preconditioned by its first layer only
        claimed.add(id(module.weight))
        kind = computation(module)
        if kind not in (STOCK, SAME_PADDING):
            excluded.append((name, kind))
            continue
        groups, dim = patch_dim(module)
        layers.append(Layer(name, module, module.weight, groups, dim, same_padding=kind == SAME_PADDING))
    return layers, excluded
