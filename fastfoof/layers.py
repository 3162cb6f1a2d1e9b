"""The layers FOOF preconditions, how they are found, and the blocks the update works on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .geometry import LAYER_TYPES, patch_dim

Skip = Union[None, str, type, Callable[[str, nn.Module], bool], Iterable[Union[str, type]]]


@dataclass(eq=False)
class Block:
    """Parameters updated together: a layer's weight (and bias, as the last column of [Ŵ | b]) with
    its preconditioner, or a single parameter that has none (U = G/λ)."""

    params: list[torch.Tensor]
    options: list[dict]  # each parameter's param group: hyperparameters are read at step time
    groups: int = 1
    precond: torch.Tensor | None = None  # [groups, D', D']


@dataclass(eq=False)
class Layer:
    """A Linear/Conv module whose weight FOOF may precondition, with its pending statistic."""

    name: str
    module: nn.Module
    groups: int
    dim: int  # D, without the bias row
    stat: torch.Tensor | None = None  # Σ a aᵀ over the forwards observed since the last step
    samples: int = 0  # Σ B over those forwards
    seen_in_forward: bool = False  # observed outside backward since the last step
    bias_row: bool = False  # these two are set from the optimizer's parameters
    active: bool = False  # its weight is handed to the optimizer: preconditioned

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def clear(self) -> None:
        self.samples = 0
        self.seen_in_forward = False


def _skip_predicate(skip: Skip) -> Callable[[str, nn.Module], bool]:
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
    return lambda name, module: name in names or isinstance(module, types)


def find_layers(model: nn.Module, skip: Skip) -> list[Layer]:
    """Every Linear/Conv layer of `model` not skipped, in `named_modules` order, each weight once."""
    skipped = _skip_predicate(skip)
    layers, claimed = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES) or skipped(name, module):
            continue
        if not isinstance(module.weight, torch.Tensor) or id(module.weight) in claimed:
            continue  # a tied weight is preconditioned by its first layer only
        claimed.add(id(module.weight))
        groups, dim = patch_dim(module)
        layers.append(Layer(name, module, groups, dim))
    return layers


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (checkpointing may re-run forwards)."""
    return torch._C._current_graph_task_id() != -1
